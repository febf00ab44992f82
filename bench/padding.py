"""Benchmark: padding waste and trained tokens/s of naive padding vs `group_by_length` vs `packing` (issue 11, item 4).

The job: `alpaca_en_demo.json` (999 rows, ../shared/datasets, read as Alpaca by lorapipe), the ~25 M random Llama
(`build_tiny_model(size="25m")`), LoRA r16 on all 7 projections, micro-batch 8, no accumulation, max 512 tokens,
BENCH_STEPS optimizer steps (default 16), fp32 on the CPU, gradient checkpointing off, seed 42, through lorapipe's
hf backend (`HFBackend.train`). Measured per run: the fraction of padded token positions the trainer fed
(`padding_waste`, counted in the training step) and real (non-pad) tokens trained per second of the training loop.
Modes interleaved (naive, grouped, packed, naive, ...) for BENCH_RUNS rounds (default 3); medians; ratios against
naive padding. Writes bench/results/padding.json.
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

DATA = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"
MODEL = REPO / "bench" / ".models" / "llama-25m"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
STEPS = int(os.environ.get("BENCH_STEPS", "16"))
EPOCHS = int(os.environ.get("BENCH_EPOCHS", "2"))
EPOCH_MODEL = REPO / "bench" / ".models" / "llama-tiny-25m-tokenizer"
MODES = {"naive": {}, "group_by_length": {"group_by_length": True}, "packing": {"packing": True}}


def one_run(mode: str, work: Path, model: Path = MODEL, epochs: int = 0) -> dict:
    """`epochs` > 0: whole epochs instead of STEPS steps."""
    from lorapipe.backends.hf import HFBackend
    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.formats import read_records
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe

    records = read_records([str(DATA)]).records
    train = TrainSection(backend="hf", device="cpu", dtype="float32", max_seq_length=512, micro_batch_size=8,
                         effective_batch_size=8, max_steps=-1 if epochs else STEPS, epochs=epochs or 1,
                         learning_rate=2e-4, warmup_steps=2, save_steps=10_000, logging_steps=STEPS,
                         output_root=str(work), resume=False,
                         lora={"r": 16, "alpha": 32}, **MODES[mode])
    plan = decide_plan(train, probe(str(work)), model_size(str(model))).train
    from lorapipe.tasks.sft import SFT

    info = HFBackend().train(SFT(), ModelSection(name_or_path=str(model)), train, 42, plan,
                             ConversationDataset(records, name="alpaca"), ConversationDataset([], name="eval"),
                             work / "w", work / "adapter")
    meta = json.loads((work / "adapter" / "lorapipe_adapter.json").read_text())
    waste = meta["extra"]["padding_waste"] if "extra" in meta else meta.get("padding_waste")
    return {"mode": mode, "steps": info.steps, "train_seconds": info.train_seconds,
            "real_tokens": waste["real_tokens"], "padded_tokens": waste["padded_tokens"],
            "padding_fraction": waste["fraction"], "real_tokens_per_second": waste["real_tokens"] / info.train_seconds}


def main() -> int:
    import subprocess

    if len(sys.argv) == 3 and sys.argv[1] in ("--one", "--epochs"):  # a child: one run in a fresh process
        with tempfile.TemporaryDirectory(prefix="lorapipe-pad-") as work:
            run = (one_run(sys.argv[2], Path(work)) if sys.argv[1] == "--one"
                   else one_run(sys.argv[2], Path(work), EPOCH_MODEL, EPOCHS))
            print(json.dumps(run))
        return 0
    from lorapipe.models.tiny import build_tiny_model

    corpus = [REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"]
    if not (MODEL / "config.json").exists():
        build_tiny_model(MODEL, corpus, size="25m")
    if not (EPOCH_MODEL / "config.json").exists():
        build_tiny_model(EPOCH_MODEL, corpus, size="tiny")
    if (EPOCH_MODEL / "tokenizer.json").read_bytes() != (MODEL / "tokenizer.json").read_bytes():
        sys.exit(f"{EPOCH_MODEL} does not have {MODEL}'s tokenizer: its padding would be of other token counts")
    whole = {}
    if EPOCHS:
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--epochs", mode], capture_output=True, text=True,
                                 check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            whole[mode] = {k: row[k] for k in ("steps", "real_tokens", "padded_tokens", "padding_fraction")}
            print(f"{EPOCHS} epochs {mode:16s} waste {row['padding_fraction'] * 100:5.1f}% over {row['steps']} steps",
                  flush=True)
        naive_slots = whole["naive"]["real_tokens"] + whole["naive"]["padded_tokens"]
        for mode in MODES:  # token positions fed, relative to naive padding: what the padding alone saves
            slots = whole[mode]["real_tokens"] + whole[mode]["padded_tokens"]
            whole[mode]["positions_vs_naive"] = round(slots / naive_slots, 4)
    runs = []
    for round_ in range(RUNS):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--one", mode], capture_output=True, text=True,
                                 check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = round_ + 1
            runs.append(row)
            print(f"round {round_ + 1} {mode:16s} waste {row['padding_fraction'] * 100:5.1f}%  "
                  f"{row['real_tokens_per_second']:8.0f} real tok/s  ({row['train_seconds']:.1f} s)", flush=True)
    summary = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        summary[mode] = {"padding_fraction": statistics.median(r["padding_fraction"] for r in rows),
                         "real_tokens_per_second": statistics.median(r["real_tokens_per_second"] for r in rows)}
    base = summary["naive"]["real_tokens_per_second"]
    for mode in MODES:
        summary[mode]["speedup_vs_naive"] = round(summary[mode]["real_tokens_per_second"] / base, 3)
    from lorapipe.hardware.probe import package_versions

    out = {"benchmark": "padding", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()},
           "packages": {k: v for k, v in package_versions().items() if v},
           "job": {"data": "alpaca_en_demo.json (999 rows)", "model": "llama-25m", "micro_batch": 8,
                   "max_seq_length": 512, "steps": STEPS, "rounds": RUNS},
           "goals": {"packing_waste_below": 0.05, "packing_speedup_at_least": 1.5},
           "summary": summary, "runs": runs,
           "whole_epochs": {"epochs": EPOCHS, "model": "llama-tiny with llama-25m's tokenizer (identical bytes)",
                            "modes": whole}}
    (REPO / "bench" / "results" / "padding.json").write_text(json.dumps(out, indent=2) + "\n")
    for mode, s in summary.items():
        print(f"{mode:16s} waste {s['padding_fraction'] * 100:5.1f}%  {s['real_tokens_per_second']:8.0f} tok/s  "
              f"{s['speedup_vs_naive']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
