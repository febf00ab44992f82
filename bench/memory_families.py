"""Benchmark: the memory model on families no constant was fitted to (issue 20).

Random-weight models of five families built from their configs (`lorapipe.models.tiny.FAMILIES`: Qwen2's tied
151,936-row vocabulary and q/k/v bias, Qwen3's head_dim != hidden/heads and q/k norms, Mistral's grouped-query
attention, Phi-3's fused qkv_proj and gate_up_proj, Gemma's tied 256,000-row vocabulary, head_dim 256 and GeGLU) and
the 56 M Llama of bench/memory_accuracy.py. For each configuration (SFT and classification, fp32 and NF4, gradient
checkpointing on and off) each phase (train: 3 real steps of the hf backend; eval: one batch scored and generated;
merge and its check) runs in a fresh process (`lorapipe.phases.measure.measure_phase`), RUNS times, interleaved.
CPU peak = the process's resident high-water mark (VmHWM, reset at the phase's start).

The measurements do not depend on the memory model, so they are stored once (bench/results/memory_families_runs.json)
and the report (bench/results/memory_families.json) is computed from them with the memory model as it stands:
every prediction through `decide_plan`, as a run plans. The configurations are split in two: FIT (any constant of
the memory model may be set from these) and HELD_OUT (never used to set one); the goal is judged on HELD_OUT.

  .venv/bin/python bench/memory_families.py measure      # all configurations x RUNS (~40 minutes on 2 cores)
  .venv/bin/python bench/memory_families.py report       # predictions from the stored measurements
  BENCH_ONLY=qwen2-sft-fp32 .venv/bin/python bench/memory_families.py measure
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lorapipe.config import EvaluateSection, MergeSection, ModelSection, TrainSection  # noqa: E402
from lorapipe.hardware.plan import decide_plan, model_size  # noqa: E402
from lorapipe.hardware.probe import package_versions, probe  # noqa: E402

MODELS = REPO / "bench" / ".models"
RUNS_FILE = REPO / "bench" / "results" / "memory_families_runs.json"
REPORT_FILE = REPO / "bench" / "results" / "memory_families.json"
RUNS = int(os.environ.get("BENCH_RUNS", 3))
GOAL = 0.10

# name -> (model, task, seq, micro-batch, rank, gradient checkpointing, quantization, phases measured)
# eval and merge do not depend on training's quantisation or checkpointing: measured where they differ
CONFIGS = {
    "llama-sft-fp32": ("56m-v32k", "sft", 512, 4, 16, False, "none", ("train", "eval", "merge")),
    "llama-sft-nf4-gc": ("56m-v32k", "sft", 512, 4, 16, True, "nf4", ("train",)),
    "llama-cls-fp32": ("56m-v32k", "classification", 256, 8, 16, False, "none", ("train", "eval", "merge")),
    "qwen2-sft-fp32": ("qwen2", "sft", 256, 2, 16, False, "none", ("train", "eval", "merge")),
    "qwen2-sft-fp32-gc": ("qwen2", "sft", 512, 2, 16, True, "none", ("train", "eval")),
    "qwen2-sft-nf4": ("qwen2", "sft", 256, 2, 16, False, "nf4", ("train",)),
    "qwen2-cls-fp32": ("qwen2", "classification", 256, 4, 16, False, "none", ("train", "eval", "merge")),
    "qwen3-sft-fp32": ("qwen3", "sft", 256, 2, 16, False, "none", ("train", "eval", "merge")),
    "qwen3-sft-nf4-gc": ("qwen3", "sft", 512, 2, 16, True, "nf4", ("train", "eval")),
    "qwen3-cls-fp32-gc": ("qwen3", "classification", 512, 4, 16, True, "none", ("train", "eval", "merge")),
    "mistral-sft-fp32": ("mistral", "sft", 512, 2, 16, False, "none", ("train", "eval", "merge")),
    "mistral-sft-fp32-gc": ("mistral", "sft", 1024, 2, 32, True, "none", ("train", "eval")),
    "mistral-sft-nf4": ("mistral", "sft", 512, 2, 16, False, "nf4", ("train",)),
    "mistral-cls-nf4": ("mistral", "classification", 256, 8, 16, False, "nf4", ("train", "eval", "merge")),
    "phi3-sft-fp32": ("phi3", "sft", 512, 2, 16, False, "none", ("train", "eval", "merge")),
    "phi3-sft-nf4-gc": ("phi3", "sft", 512, 4, 16, True, "nf4", ("train", "eval")),
    "phi3-cls-fp32": ("phi3", "classification", 256, 8, 16, False, "none", ("train", "eval", "merge")),
    "gemma-sft-fp32": ("gemma", "sft", 256, 2, 16, False, "none", ("train", "eval", "merge")),
    "gemma-sft-fp32-gc": ("gemma", "sft", 512, 2, 16, True, "none", ("train", "eval")),
    "gemma-sft-nf4": ("gemma", "sft", 256, 2, 8, False, "nf4", ("train",)),
    "gemma-cls-fp32": ("gemma", "classification", 256, 4, 16, False, "none", ("train", "eval", "merge")),
}
# The constants may be set from these (Llama, Qwen2, Phi-3); the goal is judged on the rest (Qwen3, Mistral, Gemma).
FIT = {name for name in CONFIGS if name.split("-")[0] in ("llama", "qwen2", "phi3")}
HELD_OUT = [name for name in CONFIGS if name not in FIT]


def model_dir(model: str) -> Path:
    """The model's folder under bench/.models, built on first use; every one saved in bfloat16, as public checkpoints
    are (a float32 file would be mapped, and a classifier's unread embedding rows would never become resident)."""
    from lorapipe.models.tiny import build_family_model, build_tiny_model

    folder = MODELS / (f"llama-{model}-bf16" if model == "56m-v32k" else f"{model}-bf16")
    if not (folder / "config.json").exists():
        llama = MODELS / "llama-56m-v32k"
        if not (llama / "config.json").exists():
            build_tiny_model(llama, [REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"], size="56m-v32k")
        if model == "56m-v32k":
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            AutoTokenizer.from_pretrained(str(llama)).save_pretrained(folder)
            AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.bfloat16).save_pretrained(folder)
        else:
            build_family_model(folder, model, llama)
    return folder


def settings(name: str, work: str):
    model, task, seq, mb, r, gc, quant, _ = CONFIGS[name]
    # all-linear on both tasks (classification's default; sft's as the peers' recipes set it)
    train = TrainSection(backend="hf", device="cpu", dtype="float32", max_seq_length=seq, micro_batch_size=mb,
                         effective_batch_size=mb, lora={"r": r, "alpha": 2 * r, "target_modules": "all-linear"},
                         gradient_checkpointing=gc, quantization=quant, output_root=work)
    return train, EvaluateSection(batch_size=4, max_new_tokens=32), MergeSection()


def plan_for(name: str, hw, work: str = "/tmp/lorapipe-plan"):
    model, task, *_ = CONFIGS[name]
    folder = model_dir(model)
    train, evaluate, merge = settings(name, work)
    return decide_plan(train, hw, model_size(str(folder), task=task), evaluate, merge, task=task, num_labels=2)


def measure(only: set[str]) -> None:
    from lorapipe.phases.measure import measure_phase

    hw = probe(".")
    stored = json.loads(RUNS_FILE.read_text()) if RUNS_FILE.exists() else {"runs": {}}
    names = [n for n in CONFIGS if not only or n in only]
    # BENCH_PHASES=train: repeat runs of the training phase alone (evaluation and merge vary little between runs)
    asked = tuple(p for p in os.environ.get("BENCH_PHASES", "").split(",") if p)
    for run in range(RUNS):  # interleaved: run 1 of every configuration, then run 2, ...
        for name in names:
            model, task, *_, phases = CONFIGS[name]
            phases = tuple(p for p in phases if not asked or p in asked)
            folder = model_dir(model)
            with tempfile.TemporaryDirectory(prefix="lorapipe-mem-") as work:
                train, evaluate, _ = settings(name, work)
                plan = plan_for(name, hw, work)
                row = {}
                for phase in phases if "train" in phases else ("train", *phases):
                    m = measure_phase(phase, ModelSection(name_or_path=str(folder)), train, plan.train, work,
                                      plan.evaluate, plan.merge, max_new_tokens=evaluate.max_new_tokens)
                    row[phase] = {"peak_gib": m.peak_gib, "resident_at_start_gib": m.resident_at_start_gib,
                                  "seconds": m.seconds, "error": m.error}
                    if m.error:
                        print(f"  {name} {phase}: {m.error}", flush=True)
            stored["runs"].setdefault(name, []).append({"date": datetime.now(timezone.utc).isoformat(
                timespec="seconds"), **{p: v for p, v in row.items() if p in phases}})
            print(f"run {run + 1} {name:20s} " + "  ".join(f"{p} {v['peak_gib']:.3f} GiB" for p, v in row.items()
                                                           if p in phases), flush=True)
            stored.update(machine=_machine(hw), packages={k: v for k, v in package_versions().items() if v},
                          measured="process resident high-water mark (VmHWM reset at the phase start), fresh "
                                   "process per phase")
            RUNS_FILE.write_text(json.dumps(stored, indent=1) + "\n")


def _machine(hw) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "ram_gib": hw.ram_total_gib,
            "python": platform.python_version()}


def report() -> dict:
    hw = probe(".")
    stored = json.loads(RUNS_FILE.read_text())
    rows = []
    for name, runs in stored["runs"].items():
        if name not in CONFIGS:
            continue
        plan = plan_for(name, hw)
        predicted = {"train": plan.train.memory.total_gib, "eval": plan.evaluate.predicted_peak_gib,
                     "merge": plan.merge.predicted_peak_gib}
        row = {"config": name, "set": "fit" if name in FIT else "held-out", "phases": {}}
        for phase in CONFIGS[name][-1]:
            peaks = [r[phase]["peak_gib"] for r in runs if phase in r and not r[phase]["error"]]
            if not peaks:
                continue
            median = statistics.median(peaks)
            row["phases"][phase] = {"predicted_gib": round(predicted[phase], 4), "measured_gib": peaks,
                                    "runs": len(peaks),
                                    "median_gib": median, "spread": round((max(peaks) - min(peaks)) / median, 4),
                                    "error": round(predicted[phase] / median - 1, 4)}
        rows.append(row)
    summary = {}
    for which in ("fit", "held-out"):
        for phase in ("train", "eval", "merge"):
            errors = [r["phases"][phase]["error"] for r in rows if r["set"] == which and phase in r["phases"]]
            if errors:
                summary[f"{which} {phase}"] = {"n": len(errors), "worst_abs_error": max(map(abs, errors)),
                                               "within_goal": sum(abs(e) <= GOAL for e in errors)}
    out = {"benchmark": "memory_families", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "measurements_from": str(RUNS_FILE.relative_to(REPO)), "machine": stored.get("machine"),
           "packages": stored.get("packages"), "measured": stored.get("measured"),
           "goal": f"every peak within +-{GOAL:.0%} on the held-out configurations", "fit": sorted(FIT),
           "held_out": HELD_OUT, "summary": summary, "rows": rows}
    for r in rows:
        print(f"{r['config']:20s} {r['set']:8s} " + "  ".join(
            f"{p} {v['predicted_gib']:.3f}/{v['median_gib']:.3f} ({v['error'] * 100:+.1f}%, spread "
            f"{v['spread'] * 100:.1f}%)" for p, v in r["phases"].items()))
    for k, v in summary.items():
        print(f"{k:16s} worst |error| {v['worst_abs_error'] * 100:5.1f}%  within goal {v['within_goal']}/{v['n']}")
    return out


# The memory model's constants set from measured CPU training peaks, and the grid each is searched over (the process
# holds at least its imports, CPU_IMPORTS_BYTES: measured, not fitted).
FITTED = {"CPU_PROCESS_BYTES": [int(g / 100 * 2**30) for g in range(51, 81)],
          "CPU_ACTIVATION_RESIDENT_FACTOR": [1 + i / 20 for i in range(0, 41)],
          "CPU_RECOMPUTE_RESIDENT_FACTOR": [1 + i / 4 for i in range(0, 41)],
          "CHUNK_LOGITS_FP32_COPIES": [1 + i / 4 for i in range(0, 25)]}


def fit() -> dict:
    """The constants that make the FIT configurations' training peaks (medians of the runs) closest: the smallest
    worst |error|. The training estimate is linear in each constant, so each configuration's prediction is taken
    apart once (the estimate at two values of each) and the grid searched on those parts. HELD_OUT is not read."""
    import itertools

    from lorapipe.hardware import memory

    hw = probe(".")
    stored = json.loads(RUNS_FILE.read_text())["runs"]
    names = [n for n in FIT if n in stored]
    rows = []
    for name in names:
        peaks = [r["train"]["peak_gib"] for r in stored[name] if "train" in r and not r["train"]["error"]]
        saved = {k: getattr(memory, k) for k in FITTED}
        try:
            for k in FITTED:
                setattr(memory, k, 0)
            base = plan_for(name, hw).train.memory.total_gib
            slope = {}
            for k in FITTED:
                setattr(memory, k, 2**30 if k == "CPU_PROCESS_BYTES" else 1)
                slope[k] = plan_for(name, hw).train.memory.total_gib - base
                setattr(memory, k, 0)
        finally:
            for k, v in saved.items():
                setattr(memory, k, v)
        rows.append((name, statistics.median(peaks), base, slope))
    best = None
    for values in itertools.product(*FITTED.values()):
        chosen = dict(zip(FITTED, values))
        worst = max(abs((base + sum(slope[k] * (chosen[k] / 2**30 if k == "CPU_PROCESS_BYTES" else chosen[k])
                                    for k in FITTED)) / measured - 1) for _, measured, base, slope in rows)
        if best is None or worst < best[0]:
            best = (worst, chosen)
    worst, chosen = best
    print(f"fitted on {len(rows)} FIT configurations ({', '.join(names)}): worst |error| {worst * 100:.1f}%")
    for k, v in chosen.items():
        print(f"  {k} = {v / 2**30:.2f} GiB" if k == "CPU_PROCESS_BYTES" else f"  {k} = {v:g}")
    return {"fit_on": names, "worst_abs_error_on_fit": round(worst, 4),
            "constants": {k: (round(v / 2**30, 4) if k == "CPU_PROCESS_BYTES" else v) for k, v in chosen.items()}}


def main(argv: list[str]) -> int:
    only = {n for n in os.environ.get("BENCH_ONLY", "").split(",") if n}
    if argv[:1] == ["measure"]:
        measure(only)
    if argv[:1] == ["fit"]:
        fit()
        return 0
    out = report()
    if not only:
        REPORT_FILE.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
