"""Benchmark: the memory model on preference training (DPO, KTO, ORPO through TRL 1.14 on the hf backend).

Each configuration's training peak, predicted by `decide_plan` as a run plans it and measured by
`lorapipe.phases.measure.measure_phase` exactly as bench/memory_families.py measures SFT (a fresh process, 3 real steps
on synthetic pairs that fill the sequence length, the process's resident high-water mark), compared in the measured
quantity (`comparable_prediction_gib`). The models are bench/memory_families.py's (built from their configs with random
weights: `python bench/memory_families.py build`).

The preference terms (docs/MEMORY.md, "task: preference") are counted, not fitted: which vocabulary-wide tensors a
step holds at its peak was read from traces of torch's allocations on FIT configurations (the 56 M Llama and Qwen2) and
TRL's code. The split is kept as for SFT: FIT configurations (Llama-56m, Qwen2, Phi-3) are the ones the structure was
read from, HELD-OUT ones (Qwen3, Mistral, Gemma) judge it. BENCH_RUNS runs each (default 3), interleaved; medians.
Writes bench/results/memory_preference.json.

    python bench/memory_preference.py            # every configuration
    python bench/memory_preference.py NAME ...   # only these (the JSON is rewritten with them alone)
    python bench/memory_preference.py --repredict  # the last JSON's measured peaks, today's predictions
"""

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
MODELS = REPO / "bench" / ".models"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
# name: (model folder, method, micro-batch, sequence length, precompute the reference)
FIT = {
    "llama56m-dpo-mb2-s256": ("llama-56m-v32k-bf16", "dpo", 2, 256, False),
    "llama56m-dpo-mb1-s512": ("llama-56m-v32k-bf16", "dpo", 1, 512, False),
    "llama56m-dpo-precomputed-mb2-s256": ("llama-56m-v32k-bf16", "dpo", 2, 256, True),
    "llama56m-orpo-mb2-s256": ("llama-56m-v32k-bf16", "orpo", 2, 256, False),
    "llama56m-kto-mb2-s256": ("llama-56m-v32k-bf16", "kto", 2, 256, False),
    "qwen2-dpo-mb1-s256": ("qwen2-bf16", "dpo", 1, 256, False),
    "qwen2-kto-mb2-s256": ("qwen2-bf16", "kto", 2, 256, False),
    "phi3-dpo-mb2-s256": ("phi3-bf16", "dpo", 2, 256, False),
}
HELD_OUT = {
    "mistral-dpo-mb2-s128": ("mistral-bf16", "dpo", 2, 128, False),
    "mistral-kto-mb2-s256": ("mistral-bf16", "kto", 2, 256, False),
    "qwen3-dpo-mb1-s256": ("qwen3-bf16", "dpo", 1, 256, False),
    "qwen3-orpo-mb1-s256": ("qwen3-bf16", "orpo", 1, 256, False),
    "gemma-dpo-mb1-s256": ("gemma-bf16", "dpo", 1, 256, False),
}
CONFIGS = {**FIT, **HELD_OUT}


def plan_for(name: str, work: str):
    from lorapipe.config import TrainSection
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe

    folder, method, mb, seq, precompute = CONFIGS[name]
    train = TrainSection(backend="hf", device="cpu", dtype="float32", method=method, micro_batch_size=mb,
                         effective_batch_size=mb, max_seq_length=seq, gradient_checkpointing=False,
                         lora={"r": 16, "alpha": 32, "target_modules": "all-linear"}, output_root=work,
                         preference={"precompute_reference": precompute})
    plan = decide_plan(train, probe(work), model_size(str(MODELS / folder), task="preference"), task="preference")
    return train, plan


def main() -> int:
    from lorapipe.config import ModelSection
    from lorapipe.hardware.memory import comparable_prediction_gib
    from lorapipe.hardware.probe import package_versions
    from lorapipe.phases.measure import measure_phase

    if sys.argv[1:] == ["--repredict"]:
        return repredict()
    names = sys.argv[1:] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configurations {unknown}: choose from {list(CONFIGS)}")
    missing = sorted({CONFIGS[n][0] for n in names if not (MODELS / CONFIGS[n][0] / "config.json").exists()})
    if missing:
        sys.exit(f"build the family models first (python bench/memory_families.py build): missing {missing}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(RUNS):
        for name in names:
            folder = CONFIGS[name][0]
            with tempfile.TemporaryDirectory(prefix="lorapipe-pref-mem-") as work:
                train, plan = plan_for(name, work)
                m = measure_phase("train", ModelSection(name_or_path=str(MODELS / folder)), train, plan.train, work)
                if m.error:
                    sys.exit(f"{name}: {m.error}")
                predicted = comparable_prediction_gib(plan.train.memory.terms, "cpu", m.resident_at_start_gib)
                runs[name].append({"peak_gib": m.peak_gib, "resident_at_start_gib": m.resident_at_start_gib,
                                   "predicted_gib": predicted})
                print(f"{name:26s} predicted {predicted:.3f} GiB  measured {m.peak_gib:.3f} GiB  "
                      f"({predicted / m.peak_gib - 1:+.1%})", flush=True)
    rows = {}
    for name, measured in runs.items():
        peak = statistics.median(r["peak_gib"] for r in measured)
        predicted = statistics.median(r["predicted_gib"] for r in measured)
        folder, method, mb, seq, precompute = CONFIGS[name]
        rows[name] = {"set": "fit" if name in FIT else "held_out", "model": folder, "method": method,
                      "micro_batch": mb, "seq_len": seq, "precompute_reference": precompute,
                      "predicted_gib": round(predicted, 4), "measured_gib": round(peak, 4),
                      "error": round(predicted / peak - 1, 4), "runs": measured}
    result = {"benchmark": "memory_preference", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "packages": {k: v for k, v in package_versions().items() if v},
              "measured": "process resident high-water mark, fresh process, 3 training steps on synthetic pairs",
              "runs_each": RUNS, "statistic": "median",
              "within_10_percent": sum(abs(r["error"]) <= 0.10 for r in rows.values()), "configurations": len(rows),
              "within_10_percent_fit": sum(abs(r["error"]) <= 0.10 for r in rows.values() if r["set"] == "fit"),
              "within_10_percent_held_out": sum(abs(r["error"]) <= 0.10 for r in rows.values()
                                                if r["set"] == "held_out"),
              "worst_error_fit": max((abs(r["error"]) for r in rows.values() if r["set"] == "fit"), default=None),
              "worst_error_held_out": max((abs(r["error"]) for r in rows.values() if r["set"] == "held_out"),
                                          default=None),
              "rows": rows}
    (REPO / "bench" / "results" / "memory_preference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: (v["error"]) for k, v in rows.items()}, indent=1))
    return 0


def repredict() -> int:
    """`--repredict`: the predictions of the last run's JSON recomputed from the memory model as it is now, beside the
    same measured peaks (each run re-based on its own resident memory at the start); the measurements are kept."""
    from lorapipe.hardware.memory import comparable_prediction_gib

    path = REPO / "bench" / "results" / "memory_preference.json"
    result = json.loads(path.read_text())
    for name, row in result["rows"].items():
        with tempfile.TemporaryDirectory(prefix="lorapipe-pref-mem-") as work:
            _, plan = plan_for(name, work)
        for r in row["runs"]:
            r["predicted_gib"] = comparable_prediction_gib(plan.train.memory.terms, "cpu", r["resident_at_start_gib"])
        row["predicted_gib"] = round(statistics.median(r["predicted_gib"] for r in row["runs"]), 4)
        row["error"] = round(row["predicted_gib"] / row["measured_gib"] - 1, 4)
    rows = result["rows"].values()
    result["repredicted"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["within_10_percent"] = sum(abs(r["error"]) <= 0.10 for r in rows)
    for split in ("fit", "held_out"):
        errors = [abs(r["error"]) for r in rows if r["set"] == split]
        result[f"within_10_percent_{split}"] = sum(e <= 0.10 for e in errors)
        result[f"worst_error_{split}"] = max(errors, default=None)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["error"] for k, v in result["rows"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
