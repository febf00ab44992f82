"""Benchmark: tokens/s and peak memory of each training backend on the same tiny job, plus bare TRL.

The job: the tiny Llama (models/tiny-llama), the first 128 rows of the quickstart data, two epochs, micro-batch 4,
no accumulation, max 128 tokens, LoRA r16 on all projections. Each run is a fresh process (peak RSS is the
run's own, model load included); tokens are counted the same way for every backend (the trained rows' token
ids after truncation); time is the training loop only. Medians of RUNS interleaved rounds. "bare_trl" is a plain TRL
SFTTrainer on the same rows (TRL's own prompt/completion tokenization), the baseline for lorapipe's overhead.
Writes bench/results/backends.json.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ROWS, MAX_LEN, MICRO, EPOCHS = 128, 128, 4, 2

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
backend, quant, repo = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.formats import read_records
from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan
from lorapipe.models.loading import load_tokenizer
from lorapipe.data.render import encode
model_dir = str(repo / "models" / "tiny-llama")
records = read_records([str(repo / "data" / "quickstart" / "wwdc25_train_slice.jsonl")]).records[:ROWS]
tok = load_tokenizer(model_dir)
tokens = EPOCHS * sum(len(encode(tok, r, MAX_LEN).input_ids) for r in records)
work = Path(tempfile.mkdtemp())
if backend == "bare_trl":
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from peft import LoraConfig
    ds = Dataset.from_list([{"prompt": r.messages[:-1], "completion": r.messages[-1:]} for r in records])
    # every setting lorapipe's side runs, written out: TRL turns gradient checkpointing and bf16 on by default, and
    # its loss is named as the hf backend names it
    args = SFTConfig(output_dir=str(work), per_device_train_batch_size=MICRO, num_train_epochs=EPOCHS,
                     max_length=MAX_LEN, gradient_checkpointing=False, bf16=False, fp16=False, loss_type="chunked_nll",
                     learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    lcfg = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=ds,
                         processing_class=tok, peft_config=lcfg)
    start = time.perf_counter(); trainer.train(); seconds = time.perf_counter() - start
    reported = None
else:
    from lorapipe.phases.train_in_process import train_in_process
    m = ModelSection(name_or_path=model_dir)
    t = TrainSection(max_seq_length=MAX_LEN, epochs=EPOCHS, learning_rate=5e-3, save_steps=10_000, resume=False,
                     output_root=str(work), effective_batch_size=MICRO)
    plan = TrainingPlan(backend=backend, device="cpu", dtype="float32",
                        quantization=quant, micro_batch_size=MICRO, gradient_accumulation_steps=1,
                        effective_batch_size=MICRO, max_seq_length=MAX_LEN, gradient_checkpointing=False,
                        optimizer="adamw_torch",
                        memory=MemoryEstimate(weights_gib=0, lora_and_optimizer_gib=0, activations_gib=0,
                                              total_gib=0, budget_gib=1),
                        reasons=[], warnings=[])
    ds = ConversationDataset(records, "train")
    info = train_in_process(m, t, 0, plan, ds, ConversationDataset([], "eval"), work / "w", work / "adapter")
    seconds, reported = info.train_seconds, info.peak_memory_gib
print(json.dumps({"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "backend_reported_peak_gib": reported}))
""".replace("ROWS", str(ROWS)).replace("MAX_LEN", str(MAX_LEN)).replace("MICRO", str(MICRO)) \
    .replace("EPOCHS", str(EPOCHS))

CASES = [("bare_trl", "none"), ("hf", "none"), ("hf", "nf4"), ("unsloth", "none"), ("mlx", "none"), ("mlx", "nf4")]


def run(backend: str, quant: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, backend, quant, str(REPO)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if not (REPO / "models" / "tiny-llama" / "config.json").exists():
        sys.exit("build the tiny model first: make tiny-model")
    results = {}
    # interleaved rounds (every case once per round), so a slow spell of the machine hits every case alike
    rounds = [[run(backend, quant) for backend, quant in CASES] for _ in range(RUNS)]
    for i, (backend, quant) in enumerate(CASES):
        name = backend if quant == "none" else f"{backend}+{quant}"
        runs = [r[i] for r in rounds]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            results[name] = {"error": runs[0]["error"]}
            print(f"{name}: failed: {runs[0]['error']}")
            continue
        results[name] = {"tokens": ok[0]["tokens"], "runs": len(ok),
                         "median_train_seconds": statistics.median(r["seconds"] for r in ok),
                         "median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in ok),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                         "backend_reported_peak_gib": ok[0]["backend_reported_peak_gib"]}
        r = results[name]
        print(f"{name}: {r['median_tokens_per_second']:,.0f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB")
    base = results.get("bare_trl", {}).get("median_tokens_per_second")
    if base:
        for r in results.values():
            if "median_tokens_per_second" in r:
                r["speed_vs_bare_trl"] = r["median_tokens_per_second"] / base
    out = {"benchmark": "backends", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
           "job": {"rows": ROWS, "max_seq_length": MAX_LEN, "micro_batch": MICRO, "epochs": EPOCHS, "lora_r": 16},
           "results": results}
    (REPO / "bench" / "results" / "backends.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
