"""The measuring process of `lorapipe.phases.measure`: `python -m lorapipe.phases.measure_worker SPEC.json OUT.json`
runs one phase (train, eval, merge) of the real backends on synthetic rows at the planned sizes and writes its
`PhaseMeasurement` (peak, resident memory at the start, seconds)."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lorapipe.config import ModelSection, TrainSection
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.phases.measure import PhaseMeasurement

PROBE_STEPS = 3
_WORDS = ("alpha beta gamma delta model train data memory token layer value check merge probe batch field "
          "shape label north south river stone cloud light sound water paper green").split()


def synthetic_rows(n: int, seq_len: int, seed: int = 0, labels: Sequence[str] = (), pairs: bool = False) -> Any:
    """`n` conversations long enough to fill `seq_len` tokens after truncation (a few words per token at worst); with
    `labels`, classification rows of such texts, the labels taken in turn; with `pairs`, preference pairs (the prompt,
    and two different answers that fill the length)."""
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.records import Record

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(_WORDS) for _ in range(16))
        answer = " ".join(rng.choice(_WORDS) for _ in range(seq_len + 16))
        if pairs:
            other = " ".join(rng.choice(_WORDS) for _ in range(seq_len + 16))
            rows.append(Record(source="probe", line=i + 1, raw="", format="preference",
                               messages=[{"role": "user", "content": prompt}],
                               chosen=[{"role": "assistant", "content": answer}],
                               rejected=[{"role": "assistant", "content": other}]))
        elif labels:
            rows.append(Record(source="probe", line=i + 1, raw="", format="classification",
                               text=f"{prompt} {answer}", label=labels[i % len(labels)]))
        else:
            rows.append(Record(source="probe", line=i + 1, raw="", format="messages",
                               messages=[{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}]))
    return ConversationDataset(rows, name="probe")


def _run_phase(spec: dict[str, Any]) -> PhaseMeasurement:
    """Inside the measuring process."""
    from lorapipe.logs import show_on_console
    from lorapipe.phases.train_in_process import train_in_process
    from lorapipe.quiet import quiet_env, quiet_loggers
    from lorapipe.training.monitoring import (
        peak_memory_gib,
        process_memory_gib,
        reset_peak_memory,
    )

    quiet_env()  # library noise off before the heavy imports
    quiet_loggers()
    show_on_console()

    phase = spec["phase"]
    model = ModelSection(**spec["model"])
    train = TrainSection(**spec["train"])
    plan = TrainingPlan(**spec["plan"])
    work = Path(spec["work_dir"])
    adapter_dir = work / "adapter"
    device = plan.device if phase == "train" else PhasePlan(**spec[f"{phase}_plan"]).device
    labels: list[str] = []  # sft: conversations
    if plan.task == "classification":
        # the label set validation would have frozen into the plan; a plan made for measuring alone names none
        labels = list(plan.labels) or [f"label_{i}" for i in range(plan.num_labels or 2)]
        plan = plan.model_copy(update={"labels": labels, "num_labels": len(labels)})
    # imported before the baseline is read: every phase needs them, and what a phase holds is counted from there
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    if phase == "train":
        import trl  # noqa: F401
    start_gib = process_memory_gib()
    began = time.perf_counter()
    reserved = None
    if phase == "train":
        rows = plan.micro_batch_size * plan.world_size * PROBE_STEPS
        probe_train = train.model_copy(update={"max_steps": PROBE_STEPS, "save_steps": 10_000, "eval_steps": None,
                                               "early_stopping_patience": None, "load_best_model_at_end": False,
                                               "resume": False, "resume_from": None, "logging_steps": PROBE_STEPS,
                                               "output_root": str(work)})
        probe_plan = plan.model_copy(update={"gradient_accumulation_steps": 1,
                                             "effective_batch_size": plan.micro_batch_size * plan.world_size})
        from lorapipe.data.dataset import ConversationDataset

        info = train_in_process(model, probe_train, 0, probe_plan,
                                synthetic_rows(rows, plan.max_seq_length, labels=labels,
                                               pairs=plan.task == "preference"),
                                ConversationDataset([], name="eval"), work / "train", adapter_dir)
        peak = info.peak_memory_gib
    else:
        reset_peak_memory(device)
        phase_plan = PhasePlan(**spec[f"{phase}_plan"])
        rows = synthetic_rows(phase_plan.batch_size if phase == "eval" else 1, plan.max_seq_length, seed=1,
                              labels=labels, pairs=plan.task == "preference")
        if phase == "eval":
            from lorapipe.config import EvaluateSection
            from lorapipe.phases.evaluate import evaluate_adapter

            settings = EvaluateSection(max_samples=len(rows), generation_samples=len(rows),
                                       max_new_tokens=spec["max_new_tokens"], generation_metrics=[])
            metrics = evaluate_adapter(str(adapter_dir), rows, phase_plan, settings)
            peak = metrics.memory_gib
        else:
            from lorapipe.phases.merge import merge_adapter

            check = merge_adapter(str(adapter_dir), str(work / "merged"), rows, phase_plan, check_samples=1)
            peak = check.memory_gib
    if device.startswith("cuda"):
        import torch

        reserved = round(torch.cuda.max_memory_reserved() / 2**30, 4)
    else:
        peak = max(peak, peak_memory_gib(device))
    return PhaseMeasurement(phase=phase, peak_gib=round(peak, 4), reserved_gib=reserved,
                            resident_at_start_gib=round(start_gib, 4), seconds=round(time.perf_counter() - began, 2),
                            device=device)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = _run_phase(spec)
    Path(argv[1]).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    from lorapipe import short_lived

    short_lived.begin()
    short_lived.end(main(sys.argv[1:]))

