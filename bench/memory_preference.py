"""Benchmark: the memory model on preference training (issue 21: DPO, KTO, ORPO through TRL on the hf backend).

Each configuration's training peak, predicted by `decide_plan` as a run plans it and measured by
`lorapipe.hardware.measure` exactly as bench/memory_families.py measures SFT (a fresh process, 3 real steps on
synthetic pairs that fill the sequence length, the process's resident high-water mark), compared in the measured
quantity (`comparable_prediction_gib`). The models are bench/memory_families.py's (built from their configs with
random weights: `python bench/memory_families.py build`). No constant is fitted here: the preference terms (two
sequences per pair through the policy, the batch's full logits, the reference's logits) are the model's, as written,
judged on every configuration below. BENCH_RUNS runs each (default 1), interleaved. Writes
bench/results/memory_preference.json.
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
RUNS = int(os.environ.get("BENCH_RUNS", "1"))
# name: (model folder, method, micro-batch, sequence length, precompute the reference)
CONFIGS = {
    "llama56m-dpo-mb2-s256": ("llama-56m-v32k-bf16", "dpo", 2, 256, False),
    "llama56m-orpo-mb2-s256": ("llama-56m-v32k-bf16", "orpo", 2, 256, False),
    "llama56m-kto-mb2-s256": ("llama-56m-v32k-bf16", "kto", 2, 256, False),
    "qwen2-dpo-mb1-s256": ("qwen2-bf16", "dpo", 1, 256, False),
    "mistral-dpo-mb2-s128": ("mistral-bf16", "dpo", 2, 128, False),
}


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

    missing = [c[0] for c in CONFIGS.values() if not (MODELS / c[0] / "config.json").exists()]
    if missing:
        sys.exit(f"build the family models first (python bench/memory_families.py build): missing {missing}")
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(RUNS):
        for name, (folder, *_rest) in CONFIGS.items():
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
        rows[name] = {"model": CONFIGS[name][0], "method": CONFIGS[name][1], "micro_batch": CONFIGS[name][2],
                      "seq_len": CONFIGS[name][3], "predicted_gib": round(predicted, 4), "measured_gib": round(peak, 4),
                      "error": round(predicted / peak - 1, 4), "runs": measured}
    result = {"benchmark": "memory_preference", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "packages": {k: v for k, v in package_versions().items() if v},
              "measured": "process resident high-water mark, fresh process, 3 training steps on synthetic pairs",
              "within_10_percent": sum(abs(r["error"]) <= 0.10 for r in rows.values()), "configurations": len(rows),
              "rows": rows}
    (REPO / "bench" / "results" / "memory_preference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: (v["error"]) for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
