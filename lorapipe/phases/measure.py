"""Measure the truth: a few real training steps and one evaluation batch at the planned sizes, and their peaks.

`measure_phase` runs one phase (train, eval or merge) of the real backends on synthetic rows that fill the planned
sequence length, in a fresh process (`python -m lorapipe.phases.measure_worker SPEC.json OUT.json`), so each phase's
peak is its own: torch's allocated peak on CUDA (counter reset first, reserved recorded too), the process's resident
high-water mark on the CPU, mlx's peak on Apple. `preflight.probe: true` runs train and eval this way before the
real training; bench/memory_accuracy.py and bench/memory_families.py run all three. The worker trains either task
(a classifier on synthetic labelled rows), but preflight's probe is skipped for `task: classification`, with a check
that says so.

This module only starts the worker and reads its result: the preflight step imports it, not the training code the
worker runs, so an edit to a backend re-plans nothing (the probe measures; the plan does not depend on it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from lorapipe.catalog import task_spec
from lorapipe.config import ModelSection, TrainSection
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.units import ReadsGbNames, format_gib


class PhaseMeasurement(ReadsGbNames):
    phase: str
    peak_gib: float  # CUDA: torch's allocated peak; elsewhere the process's resident high-water mark
    reserved_gib: Optional[float] = None  # CUDA: the allocator's reserved peak
    resident_at_start_gib: float  # the process before the phase (imports done, nothing loaded)
    seconds: float
    device: str
    error: Optional[str] = None


def measure_phase(phase: str, model: ModelSection, train: TrainSection, plan: TrainingPlan, work_dir: str | Path,
                  evaluate_plan: Optional[PhasePlan] = None, merge_plan: Optional[PhasePlan] = None,
                  max_new_tokens: int = 64, timeout_s: float = 3600) -> PhaseMeasurement:
    """Run `phase` in a fresh Python process and return its measured peak. eval and merge read the adapter the
    train phase left in `work_dir`."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"phase": phase, "model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"), "work_dir": str(work), "max_new_tokens": max_new_tokens,
            "eval_plan": evaluate_plan.model_dump(mode="json") if evaluate_plan else None,
            "merge_plan": merge_plan.model_dump(mode="json") if merge_plan else None}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-m", "lorapipe.phases.measure_worker", str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return PhaseMeasurement(phase=phase, peak_gib=0.0, resident_at_start_gib=0.0, seconds=0.0,
                                    device=plan.device, error=f"exit {proc.returncode}: " + " | ".join(tail))
        return PhaseMeasurement(**json.loads(out_path.read_text()))


PROBE_TOLERANCE = 0.15


def probe_checks(model: Any, train: Any, plan: Any, evaluate: Any, work_dir: str) -> tuple[list[Any], list[dict]]:
    """`preflight.probe`: a few real training steps and one evaluation batch at the planned sizes, each in a fresh
    process; their measured peaks beside the predictions (warn beyond 15%, fail when over the budget)."""
    from lorapipe.hardware.memory import comparable_prediction_gib
    from lorapipe.hardware.preflight import Check

    if task_spec(plan.train.task).model_kind != "causal_lm":
        # the worker trains and scores a causal LM (lorapipe.phases.measure_worker): measuring it would measure
        # another model than the classifier this run trains
        return [Check(section="probe", name="probe", status="warn", measured=f"skipped: task {plan.train.task}",
                      requirement="3 steps at the planned sizes run",
                      detail="the probe measures causal-LM training only; the predicted peaks stand unmeasured: "
                             "unset preflight.probe, or watch the first steps' peak in the training log")], []
    checks, rows = [], []
    budget = plan.train.memory.budget_gib
    for phase, terms, device in (("train", plan.train.memory.terms, plan.train.device),
                                 ("eval", plan.evaluate.memory_terms, plan.evaluate.device)):
        # in the measured quantity: torch's allocated peak on CUDA; the fresh process's whole peak elsewhere
        predicted = comparable_prediction_gib(terms, device, None)
        m = measure_phase(phase, model, train, plan.train, work_dir, plan.evaluate, plan.merge,
                          max_new_tokens=evaluate.max_new_tokens)
        row = {"phase": phase, "predicted_gib": predicted, **m.model_dump()}
        rows.append(row)
        if m.error:
            checks.append(Check(section="probe", name=f"{phase} probe", status="fail", measured=m.error,
                                requirement="3 steps at the planned sizes run",
                                detail="the run would fail the same way"))
            continue
        error = predicted / m.peak_gib - 1 if m.peak_gib else 0.0
        row["error"] = round(error, 4)
        # the budget is the training device's; evaluation on another device (the CPU) is checked against it only there
        over = m.peak_gib > budget and device == plan.train.device
        status = "fail" if over else "warn" if abs(error) > PROBE_TOLERANCE else "pass"
        checks.append(Check(section="probe", name=f"{phase} peak (measured)", status=status,
                            measured=f"{format_gib(m.peak_gib)} on {m.device}, predicted {format_gib(predicted)} "
                                     f"({error:+.0%})",
                            requirement=(f"<= {format_gib(budget)}; " if device == plan.train.device else "")
                            + f"within {PROBE_TOLERANCE:.0%} of the prediction",
                            detail="" if status == "pass" else "over the budget: lower the micro-batch or sequence"
                            if status == "fail" else "the memory model is off here; the measured figure is the truth"))
    return checks, rows
