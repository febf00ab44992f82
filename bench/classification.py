"""Benchmark: task: classification on the routing set (data/classification/source_routing.jsonl: 450 requests,
general 200 / sql 150 / sports 100, split 70/10/20 stratified by label): the tuned classifier against the majority
class and its head-only baseline (the untuned model: the head trained alone on the frozen base, same schedule), on
the held-out test split (90 rows).

Setups, through lorapipe's own code (validate -> split -> hf backend -> the classification task's evaluation), CPU,
float32:
- encoder-full: the tiny random BERT-style encoder (`lorapipe build-tiny-model --encoder`), every weight trained,
  configs/classification-quickstart.yaml's settings (lr 3e-3, 4 epochs, eval every 10 steps, early stopping 3,
  best by macro F1);
- encoder-lora: the same encoder, LoRA r8 on all linear layers + the head, lr 1e-2;
- decoder-lora: the tiny Llama with a score head (`build_tiny_decoder_classifier`), LoRA r8 + the head, lr 1e-2.
Seeds 1..BENCH_RUNS (default 3), interleaved (each seed runs every setup); medians. The models are random, so the
figures say what the machinery learns from scratch on a separable task, not what BERT would reach.
Writes bench/results/classification.json.
"""

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO / "data" / "classification" / "source_routing.jsonl"
MODELS = REPO / "bench" / ".models"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
COMMON = dict(backend="hf", device="cpu", max_seq_length=128, micro_batch_size=16, effective_batch_size=16,
              epochs=4, warmup_steps=5, eval_steps=10, save_steps=10, early_stopping_patience=3,
              load_best_model_at_end=True, metric_for_best_model="macro_f1", logging_steps=10)
SETUPS = {
    "encoder-full": ("encoder", dict(method="full", learning_rate=3e-3)),
    "encoder-lora": ("encoder", dict(method="lora", learning_rate=1e-2, lora={"r": 8, "alpha": 16, "dropout": 0.1,
                                                                             "target_modules": "all-linear"})),
    "decoder-lora": ("decoder", dict(method="lora", learning_rate=1e-2, lora={"r": 8, "alpha": 16, "dropout": 0.1,
                                                                             "target_modules": "all-linear"})),
}


def models() -> dict[str, Path]:
    from lorapipe.data.formats import read_records
    from lorapipe.models.tiny import build_tiny_decoder_classifier, build_tiny_encoder

    out = {"encoder": MODELS / "tiny-encoder", "decoder": MODELS / "tiny-llama-cls3"}
    if not (out["encoder"] / "config.json").is_file():
        build_tiny_encoder(out["encoder"], [r.text for r in read_records([str(DATA)]).records])
    if not (out["decoder"] / "config.json").is_file():
        build_tiny_decoder_classifier(out["decoder"], [DATA], num_labels=3)
    return out


def one_run(setup: str, seed: int, model_dir: Path, splits, work: Path) -> dict:
    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.hardware.plan import PhasePlan, decide_plan, model_size
    from lorapipe.hardware.probe import probe
    from lorapipe.phases.evaluate import evaluate_adapter
    from lorapipe.phases.train_in_process import train_in_process

    _, extra = SETUPS[setup]
    t = TrainSection(output_root=str(work), resume=False, **COMMON, **extra)
    facts = model_size(str(model_dir), task="classification", num_labels=3)
    plan = decide_plan(t, probe(str(work)), facts, task="classification", num_labels=3).train
    plan.labels = ["general", "sports", "sql"]
    train, evals, test = splits
    start = time.perf_counter()
    info = train_in_process(ModelSection(name_or_path=str(model_dir)), t, seed, plan, train, evals, work / "w",
                            work / "adapter")
    seconds = time.perf_counter() - start
    meta = json.loads((work / "adapter" / "lorapipe_adapter.json").read_text())
    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=32, max_seq_length=128,
                      reason="bench")
    metrics = evaluate_adapter(str(work / "adapter"), test, phase)
    reports = metrics.classification.reports
    return {"setup": setup, "seed": seed, "steps": info.steps, "max_steps": meta["max_steps"],
            "stopped_early": meta["stopped_early"], "best_step": meta["best"]["step"],
            "train_seconds": round(info.train_seconds, 3), "train_and_baseline_seconds": round(seconds, 3),
            "predicted_train_peak_gib": plan.memory.total_gib, "measured_train_peak_gib": info.peak_memory_gib,
            **{f"{name}_{k}": round(reports[name][k], 4) for name in reports
               for k in ("accuracy", "macro_f1", "weighted_f1", "ece") if reports[name].get(k) is not None}}


def main() -> int:
    from lorapipe.data.formats import LabelFields
    from lorapipe.data.split import split_records
    from lorapipe.data.validation import validate_dataset
    from lorapipe.logs import show_on_console
    from lorapipe.quiet import quiet_env, quiet_loggers

    quiet_env()  # library noise off, lorapipe's own lines on
    quiet_loggers()
    show_on_console()

    folders = models()
    out = validate_dataset([str(DATA)], "classification", label_fields=LabelFields(), run_expectations=False)
    splits = split_records(out.records, 0.1, 0.2)
    rows = []
    for seed in range(1, RUNS + 1):
        for setup, (kind, _) in SETUPS.items():
            with tempfile.TemporaryDirectory(prefix="lorapipe-cls-") as work:
                row = one_run(setup, seed, folders[kind], splits, Path(work))
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for setup in SETUPS:
        mine = [r for r in rows if r["setup"] == setup]
        keys = [k for k in mine[0] if isinstance(mine[0][k], (int, float)) and not isinstance(mine[0][k], bool)
                and k != "seed"]
        summary[setup] = {k: statistics.median(r[k] for r in mine) for k in keys}
        summary[setup]["stopped_early_runs"] = sum(r["stopped_early"] for r in mine)
    result = {"benchmark": "classification", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count()},
              "data": {"file": str(DATA.relative_to(REPO)), "rows": len(out.records),
                       "train": len(splits[0]), "eval": len(splits[1]), "test": len(splits[2])},
              "settings": COMMON, "setups": {k: v[1] for k, v in SETUPS.items()}, "runs": RUNS,
              "median": summary, "rows": rows}
    path = REPO / "bench" / "results" / "classification.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
