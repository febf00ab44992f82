"""Benchmark: the memory model's predicted peaks against measured ones on this CPU (issue 8, "CPU accuracy matrix").

For each configuration (two model sizes built locally: the tiny model, and a randomly initialised ~56 M Llama with a
32,000-row vocabulary, `build_tiny_model(size="56m-v32k")`; sequence 128-1024, micro-batch 1-8, rank 8-64, gradient
checkpointing on/off, fp32 and NF4), the plan's prediction (`decide_plan` -> `lorapipe.hardware.memory.estimate`)
is set beside the measured peak of each phase, run by `lorapipe.phases.measure.measure_phase` in a fresh process:
3 real training steps of the hf backend on rows that fill the sequence (train), the evaluation of one batch with
generation (eval), the merge and its check (merge). CPU peak = the process's resident high-water mark (VmHWM, reset
at the phase's start). Goal: training within +-10% for every configuration. Writes bench/results/memory_accuracy.json.

  .venv/bin/python bench/memory_accuracy.py            # all configurations (~10 minutes on 2 cores)
  BENCH_ONLY=3,5 .venv/bin/python bench/memory_accuracy.py
"""

import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lorapipe.config import EvaluateSection, MergeSection, ModelSection, TrainSection  # noqa: E402
from lorapipe.hardware.plan import decide_plan, model_size  # noqa: E402
from lorapipe.hardware.probe import package_versions, probe  # noqa: E402
from lorapipe.phases.measure import measure_phase  # noqa: E402

MODELS = REPO / "bench" / ".models"
CORPUS = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
# (model, seq, micro-batch, rank, gradient checkpointing, quantization)
CONFIGS = [
    ("tiny", 128, 1, 8, False, "none"),
    ("tiny", 1024, 8, 64, False, "none"),
    ("56m-v32k", 128, 1, 64, False, "none"),
    ("56m-v32k", 256, 4, 16, False, "none"),
    ("56m-v32k", 512, 8, 16, False, "none"),
    ("56m-v32k", 512, 8, 16, True, "none"),
    ("56m-v32k", 1024, 2, 32, True, "none"),
    ("56m-v32k", 1024, 4, 8, False, "none"),
    ("56m-v32k", 256, 4, 16, False, "nf4"),
    ("56m-v32k", 512, 2, 32, True, "nf4"),
]
GOAL = 0.10


def model_dir(size: str) -> Path:
    from lorapipe.models.tiny import build_tiny_model

    folder = MODELS / f"llama-{size}"
    if not (folder / "config.json").exists():
        build_tiny_model(folder, [CORPUS], size=size)
    return folder


def main() -> int:
    only = {int(i) for i in os.environ.get("BENCH_ONLY", "").split(",") if i}
    rows = []
    hw = probe(".")
    for i, (size, seq, mb, r, gc, quant) in enumerate(CONFIGS, 1):
        if only and i not in only:
            continue
        folder = model_dir(size)
        with tempfile.TemporaryDirectory(prefix="lorapipe-mem-") as work:
            train = TrainSection(backend="hf", device="cpu", dtype="float32", max_seq_length=seq, micro_batch_size=mb,
                                 effective_batch_size=mb, lora={"r": r, "alpha": 2 * r}, gradient_checkpointing=gc,
                                 quantization=quant, output_root=work)
            evaluate, merge = EvaluateSection(batch_size=4, max_new_tokens=64), MergeSection()
            model = ModelSection(name_or_path=str(folder))
            plan = decide_plan(train, hw, model_size(str(folder)), evaluate, merge)
            predicted = {"train": plan.train.memory.total_gib, "eval": plan.evaluate.predicted_peak_gib,
                         "merge": plan.merge.predicted_peak_gib}
            row = {"config": i, "model": size, "parameters": model_size(str(folder)).total_parameters,
                   "seq": seq, "micro_batch": mb, "rank": r, "gradient_checkpointing": gc, "quantization": quant,
                   "terms": [t.model_dump() for t in plan.train.memory.terms], "phases": {}}
            for phase in ("train", "eval", "merge"):
                m = measure_phase(phase, model, train, plan.train, work, plan.evaluate, plan.merge,
                                  max_new_tokens=evaluate.max_new_tokens)
                if m.error:
                    print(f"  config {i} {phase}: {m.error}", flush=True)
                ratio = predicted[phase] / m.peak_gib if m.peak_gib else None
                row["phases"][phase] = {"predicted_gib": round(predicted[phase], 4), "measured_gib": m.peak_gib,
                                        "resident_at_start_gib": m.resident_at_start_gib,
                                        "error": None if ratio is None else round(ratio - 1, 4),
                                        "seconds": m.seconds, "failed": m.error}
            print(f"{i:2d} {size:9s} seq {seq:4d} mb {mb} r {r:2d} gc {'on ' if gc else 'off'} {quant:4s}  "
                  + "  ".join(f"{p} {v['predicted_gib']:.3f}/{v['measured_gib']:.3f} "
                              f"({(v['error'] or 0) * 100:+.1f}%)" for p, v in row["phases"].items()), flush=True)
            rows.append(row)
    worst = {p: max((abs(r["phases"][p]["error"] or 0) for r in rows), default=None)
             for p in ("train", "eval", "merge")}
    out = {"benchmark": "memory_accuracy", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "ram_gib": hw.ram_total_gib, "python": platform.python_version()},
           "packages": {k: v for k, v in package_versions().items() if v},
           "measured": "process resident high-water mark (VmHWM reset at the phase start), fresh process per phase",
           "goal": f"train within +-{GOAL:.0%}", "worst_abs_error": worst,
           "train_within_goal": all(abs(r["phases"]["train"]["error"] or 1) <= GOAL for r in rows), "rows": rows}
    if not only:
        (REPO / "bench" / "results" / "memory_accuracy.json").write_text(json.dumps(out, indent=2) + "\n")
    print("worst |error|: " + ", ".join(f"{p} {w * 100:.1f}%" for p, w in worst.items() if w is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
