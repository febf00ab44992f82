"""Benchmark: one DPO job through lorapipe's preference task and through a bare TRL `DPOTrainer` script (issue 21).

The job, identical on both sides: the tiny local Llama (`models/tiny-llama`, built by `make tiny-model`) as the
starting model, 80 pairs a tiny model can learn (the quickstart's first 80 prompts; chosen = "Yes. " + the answer's
first 40 characters, rejected = "No. " + the same), TRL's conversational format rendered with the tokenizer's chat
template, DPO sigmoid loss, beta 0.1, LoRA r16 alpha 32 dropout 0 on all 7 projections, lr 5e-3 linear with 5
warm-up steps, weight decay 0.01, adamw_torch, micro-batch 4 x accumulation 2, 2 epochs (20 optimizer steps),
max 96 tokens, fp32 on the CPU, gradient checkpointing off, bf16 off (TRL's config turns checkpointing and bf16 on
by default: both sides set them off), the reference forward each step (no precompute), seed 7 set before the model
is built.

  (a) bare:     a plain script: AutoModelForCausalLM + DPOTrainer(peft_config=LoraConfig(...)), what a notebook user
                writes;
  (b) lorapipe: `HFBackend().train` with the preference task (the train step's library call: the adapter folder,
                metadata, monitor, checkpoints and plots included);
  (c) llamafactory: `llamafactory-cli train` with `stage: dpo` from its own virtualenv (bench/.peers/, set up as
                bench/peers.py says), the same pairs as an Alpaca ranking data set (`ranking: true`), no `template`
                (so it renders with the tokenizer's chat template), `pref_beta` 0.1, `pref_loss` sigmoid,
                `disable_gradient_checkpointing`, bf16 off; run when its virtualenv exists.

Each run is a fresh process. Measured: wall time of the process, the training loop's own seconds (HF Trainer's
train_runtime; lorapipe's train_seconds), peak RSS (the process's high-water mark), the per-step losses. BENCH_RUNS
interleaved rounds (default 3), medians; LLaMA-Factory's peak RSS is its process tree's (psutil, every 0.2 s).
Writes bench/results/preference.json.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "tiny-llama"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SEED, MAX_LEN, BETA = 7, 96, 0.1
SETTINGS = dict(learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=5, weight_decay=0.01, optim="adamw_torch",
                per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=1,
                gradient_checkpointing=False, bf16=False, seed=SEED, data_seed=SEED, use_cpu=True, report_to="none",
                save_strategy="no", disable_tqdm=True)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def pairs() -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl").open()][:80]
    return [{"prompt": [{"role": "user", "content": r["prompt"][:120]}],
             "chosen": [{"role": "assistant", "content": "Yes. " + r["completion"][:40]}],
             "rejected": [{"role": "assistant", "content": "No. " + r["completion"][:40]}]} for r in rows]


def bare(work: Path) -> dict:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    transformers.set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype="float32")
    args = DPOConfig(output_dir=str(work), max_length=MAX_LEN, beta=BETA, loss_type=["sigmoid"], **SETTINGS)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs()), processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    out = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"loop_seconds": out.metrics["train_runtime"], "losses": losses, "steps": trainer.state.global_step}


def lorapipe_run(work: Path) -> dict:
    from lorapipe.backends.hf import HFBackend
    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.records import Record
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe
    from lorapipe.tasks import get_task

    records = [Record("pairs", i + 1, "", "preference", messages=p["prompt"], chosen=p["chosen"],
                      rejected=p["rejected"]) for i, p in enumerate(pairs())]
    t = TrainSection(backend="hf", device="cpu", dtype="float32", method="dpo", max_seq_length=MAX_LEN,
                     micro_batch_size=4, effective_batch_size=8, epochs=2, learning_rate=5e-3, warmup_steps=5,
                     weight_decay=0.01, optimizer="adamw_torch", gradient_checkpointing=False, logging_steps=1,
                     save_steps=10_000, output_root=str(work), resume=False,
                     lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA["target_modules"]},
                     preference={"beta": BETA, "loss_type": "sigmoid"})
    plan = decide_plan(t, probe(str(work)), model_size(str(MODEL), task="preference"), task="preference").train
    info = HFBackend().train(get_task("preference"), ModelSection(name_or_path=str(MODEL)), t, SEED, plan,
                             ConversationDataset(records), ConversationDataset([]), work / "w", work / "adapter")
    log = [json.loads(line) for line in (work / "adapter" / "training_log.jsonl").open()]
    return {"loop_seconds": info.train_seconds, "losses": [r["loss"] for r in log if "loss" in r],
            "steps": info.steps, "predicted_train_peak_gib": plan.memory.total_gib,
            "measured_train_peak_gib": info.peak_memory_gib}


LF_VENV = REPO / "bench" / ".peers" / "llamafactory-venv"
LF_WORK = REPO / "bench" / ".peers" / "dpo"


def llamafactory_files() -> Path:
    """The pairs as LLaMA-Factory's Alpaca ranking data set, its dataset_info.json and the training YAML."""
    import yaml
    from peers import TORCHAUDIO_STUB

    data = LF_WORK / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "pairs.jsonl").write_text("".join(json.dumps({
        "instruction": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
        "rejected": p["rejected"][0]["content"]}) + "\n" for p in pairs()))
    (data / "dataset_info.json").write_text(json.dumps({"dpo_pairs": {
        "file_name": "pairs.jsonl", "formatting": "alpaca", "ranking": True,
        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}, indent=2))
    lf = {"model_name_or_path": str(MODEL), "stage": "dpo", "do_train": True, "finetuning_type": "lora",
          "lora_rank": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0,
          "lora_target": ",".join(LORA["target_modules"]), "pref_beta": BETA, "pref_loss": "sigmoid",
          "dataset": "dpo_pairs", "dataset_dir": str(data), "cutoff_len": MAX_LEN, "overwrite_cache": True,
          "output_dir": str(LF_WORK / "out"), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
          "plot_loss": False, "report_to": "none",
          "per_device_train_batch_size": SETTINGS["per_device_train_batch_size"],
          "gradient_accumulation_steps": SETTINGS["gradient_accumulation_steps"],
          "learning_rate": SETTINGS["learning_rate"], "num_train_epochs": float(SETTINGS["num_train_epochs"]),
          "lr_scheduler_type": "linear", "warmup_steps": SETTINGS["warmup_steps"],
          "weight_decay": SETTINGS["weight_decay"], "optim": "adamw_torch", "bf16": False, "fp16": False,
          "pure_bf16": False, "disable_gradient_checkpointing": True, "seed": SEED, "use_cpu": True,
          "disable_tqdm": True}
    (LF_WORK / "llamafactory.yaml").write_text(yaml.safe_dump(lf, sort_keys=False))
    stub = LF_WORK / "lf-stub" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(TORCHAUDIO_STUB)
    return LF_WORK / "llamafactory.yaml"


def run_llamafactory(config: Path) -> dict:
    from peers import monitored

    env = {k: v for k, v in os.environ.items() if k != "ZENML_CONFIG_PATH"}
    env.update(PYTHONPATH=str(LF_WORK / "lf-stub"), DISABLE_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="",
               VIRTUAL_ENV=str(LF_VENV), PATH=f"{LF_VENV / 'bin'}:{os.environ['PATH']}", TOKENIZERS_PARALLELISM="false")
    wall, rss, rc, text = monitored([str(LF_VENV / "bin" / "llamafactory-cli"), "train", str(config)], env,
                                    LF_WORK / "llamafactory.log")
    if rc:
        sys.exit(text[-3000:])
    out = LF_WORK / "out"
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_seconds": wall, "peak_rss_mb": rss,
            "loop_seconds": json.loads((out / "train_results.json").read_text())["train_runtime"],
            "losses": [e["loss"] for e in logs if e.get("loss") is not None], "steps": logs[-1]["current_steps"]}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":  # a child: one run in a fresh process
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lorapipe-dpo-") as work:
            row = (bare if sys.argv[2] == "bare" else lorapipe_run)(Path(work))
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["in_process_seconds"] = time.perf_counter() - start
        print("BENCH " + json.dumps(row))
        return 0
    if not (MODEL / "config.json").exists():
        sys.exit("build the tiny model first: make tiny-model")
    sides = ["bare", "lorapipe"]
    lf_config = None
    if (LF_VENV / "bin" / "llamafactory-cli").exists():
        lf_config = llamafactory_files()
        sides.append("llamafactory")
    runs = []
    for round_ in range(RUNS):
        for side in sides:
            if side == "llamafactory":
                row = run_llamafactory(lf_config)
                row.update(side=side, round=round_ + 1)
                runs.append(row)
                print(f"round {round_ + 1} {side:9s} wall {row['wall_seconds']:5.1f} s  loop "
                      f"{row['loop_seconds']:5.1f} s  RSS {row['peak_rss_mb']:.0f} MB  "
                      f"final loss {row['losses'][-1]:.4f}", flush=True)
                continue
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--one", side], capture_output=True, text=True,
                                 cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            wall = time.perf_counter() - start
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("BENCH "))[6:])
            row.update(side=side, round=round_ + 1, wall_seconds=wall)
            runs.append(row)
            print(f"round {round_ + 1} {side:9s} wall {wall:5.1f} s  loop {row['loop_seconds']:5.1f} s  "
                  f"RSS {row['peak_rss_mb']:.0f} MB  final loss {row['losses'][-1]:.4f}", flush=True)
    summary = {}
    for side in sides:
        rows = [r for r in runs if r["side"] == side]
        summary[side] = {k: statistics.median(r[k] for r in rows)
                         for k in ("wall_seconds", "loop_seconds", "peak_rss_mb")}
        summary[side]["final_loss"] = rows[0]["losses"][-1]
    lp = [r for r in runs if r["side"] == "lorapipe"]
    summary["lorapipe"]["memory_model"] = {
        "predicted_train_peak_gib": lp[0]["predicted_train_peak_gib"],
        "measured_train_peak_gib": statistics.median(r["measured_train_peak_gib"] for r in lp),
        "error": round(lp[0]["predicted_train_peak_gib"] / statistics.median(r["measured_train_peak_gib"] for r in lp)
                       - 1, 4)}
    first = {side: next(r for r in runs if r["side"] == side)["losses"] for side in sides}
    diffs = [abs(a - b) for a, b in zip(first["bare"], first["lorapipe"])]
    lf_diffs = [abs(a - b) for a, b in zip(first["bare"], first.get("llamafactory", []))]
    from lorapipe.hardware.probe import package_versions

    result = {
        "benchmark": "preference", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "packages": {k: v for k, v in package_versions().items() if v},
        "job": {"model": "tiny-llama", "pairs": 80, "method": "dpo", "loss_type": "sigmoid", "beta": BETA,
                "max_length": MAX_LEN, "lora": LORA, **{k: v for k, v in SETTINGS.items() if k != "report_to"}},
        "summary": summary,
        "ratios": {k: round(summary["lorapipe"][k] / summary["bare"][k], 3)
                   for k in ("wall_seconds", "loop_seconds", "peak_rss_mb")},
        "ratios_vs_llamafactory": {k: round(summary["lorapipe"][k] / summary["llamafactory"][k], 3)
                                   for k in ("wall_seconds", "loop_seconds", "peak_rss_mb")} if lf_config else None,
        "losses": {"steps": len(diffs), "max_abs_difference": max(diffs) if diffs else None,
                   "identical": bool(diffs) and max(diffs) == 0.0 and len(first["bare"]) == len(first["lorapipe"]),
                   "llamafactory_vs_bare_max_abs_difference": max(lf_diffs) if lf_diffs else None},
        "not_run": {} if lf_config else {"llamafactory": "its virtualenv (bench/.peers/llamafactory-venv) is not "
                                                         "installed on this machine"},
        "runs": runs,
    }
    (REPO / "bench" / "results" / "preference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("summary", "ratios", "losses")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
