"""Benchmark: one LoRA job through lorapipe, a bare TRL + PEFT script, and LLaMA-Factory (issue 11, benchmarks 1-2).

The job: a ~25 M-parameter random Llama (`build_tiny_model(size="25m")`: hidden 512, 8 layers, the tiny model's
tokenizer, seed 0), the quickstart data's train split as lorapipe draws it (quickstart's split fractions and salt, so
every tool trains on the same rows), quickstart's LoRA settings (r16, alpha 32, dropout 0, all 7 projections), lr
5e-3 linear with 5 warm-up steps, weight decay 0.01, adamw_torch, micro-batch 8, no accumulation, 2 epochs,
max 256 tokens, fp32 on the CPU, gradient checkpointing off, seed 42.

  (a) bare:         a plain TRL SFTTrainer script on prompt/completion rows (what a notebook user writes);
  (b) lorapipe:     `lorapipe run --no-cache` (all steps: validate, split, preflight, train, evaluate, merge, register);
  (c) llamafactory: `llamafactory-cli train peers.yaml` from its own virtualenv (bench/.peers/llamafactory-venv).

Each run is a fresh process tree. Measured: whole-process wall time, the training loop's own runtime as each tool
logs it (HF Trainer's train_runtime; lorapipe's train_seconds), tokens/s over one common token count (lorapipe's
encoding of the trained rows, x epochs), peak RSS of the process tree (psutil, every 0.2 s, children summed), the
final train loss. Interleaved rounds (a, b, c, a, b, c, ...); BENCH_RUNS rounds (default 3). lorapipe's time is
broken down from its ZenML step runs' start/end times. Writes bench/results/peers.json.

Setup of (c), once:
  python -m venv bench/.peers/llamafactory-venv
  bench/.peers/llamafactory-venv/bin/pip install torch==2.13.0 && ... pip install llamafactory==0.9.5
  ... pip uninstall -y torchvision torchaudio   (see TORCHAUDIO_STUB below)
  ... pip install torch==2.13.0                 (llamafactory's install upgraded torch to 2.14.1)
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / ".peers"
MODEL = WORK / "model-25m"
DATA = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
LF_VENV = WORK / "llamafactory-venv"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TOOLS = [t for t in os.environ.get("BENCH_TOOLS", "bare,lorapipe,llamafactory").split(",") if t]
SEED, MICRO, EPOCHS, MAX_LEN, LR, WARMUP, WD, LOG_STEPS = 42, 8, 2, 256, 5e-3, 5, 0.01, 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LLaMA-Factory 0.9.5 imports torchaudio at module level; the torchaudio wheel pip pulls cannot load against torch
# 2.13 (and the CUDA torchvision it pulls breaks `import transformers`). Both are uninstalled from its venv and this
# stub package, on PYTHONPATH for that venv only, satisfies the import; nothing in a text-only SFT job calls it.
TORCHAUDIO_STUB = ('"""Stub: lets LLaMA-Factory import on torch 2.13 CPU without a loadable torchaudio."""\n'
                   '__version__ = "0.0.0+stub"\n')

BARE = r'''
import json, sys, time
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer
cfg = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(cfg["data"])]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                         "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(cfg["model"])
args = SFTConfig(output_dir=cfg["out"], per_device_train_batch_size=cfg["micro"], gradient_accumulation_steps=1,
                 num_train_epochs=cfg["epochs"], max_length=cfg["max_len"], learning_rate=cfg["lr"],
                 lr_scheduler_type="linear", warmup_steps=cfg["warmup"], weight_decay=cfg["wd"], optim="adamw_torch",
                 logging_steps=cfg["log_steps"], save_strategy="no", report_to="none", use_cpu=True,
                 gradient_checkpointing=False, bf16=False, fp16=False, seed=cfg["seed"], disable_tqdm=True,
                 loss_type="chunked_nll")
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=cfg["targets"], task_type="CAUSAL_LM")
set_seed(cfg["seed"])  # before SFTTrainer wraps the model, so the LoRA init is seeded
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype="float32")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
out = trainer.train()
trainer.save_model(cfg["out"] + "/adapter")
logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("BARE_RESULT " + json.dumps({"train_runtime": out.metrics["train_runtime"],
                                   "train_loss": out.metrics["train_loss"],
                                   "last_logged_loss": logged[-1] if logged else None,
                                   "steps": trainer.state.global_step}))
'''

STEPS_OF_RUN = r'''
import json
from zenml.client import Client
run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
run = Client().get_pipeline_run(run.id)
print("STEPS " + json.dumps({"run": str(run.name), "status": str(run.status),
    "steps": {n: (s.end_time - s.start_time).total_seconds() if s.start_time and s.end_time else None
              for n, s in run.steps.items()}}))
'''


def prepare() -> dict:
    """The model, lorapipe's train split as JSONL, lorapipe's config, LLaMA-Factory's YAML and dataset_info."""
    sys.path.insert(0, str(REPO))
    if not (MODEL / "model.safetensors").exists():
        from lorapipe.models.tiny import build_tiny_model
        build_tiny_model(MODEL, [DATA], seed=0, size="25m")
    quick = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    from lorapipe.data.formats import read_records
    from lorapipe.data.render import encode
    from lorapipe.data.split import split_records
    from lorapipe.models.loading import load_tokenizer
    records = read_records([str(DATA)]).records
    train, _, _ = split_records(records, quick["split"]["eval_fraction"], quick["split"]["test_fraction"],
                                quick["split"]["salt"])
    data_dir = WORK / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_rows = [json.loads(r.raw) for r in train.records]
    (data_dir / "train.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in train_rows))
    (data_dir / "dataset_info.json").write_text(json.dumps({"peers_train": {
        "file_name": "train.jsonl", "formatting": "alpaca", "columns": {"prompt": "prompt", "response": "completion"}}},
        indent=2))
    tok = load_tokenizer(str(MODEL))
    tokens = EPOCHS * sum(len(encode(tok, r, MAX_LEN).input_ids) for r in train.records)

    cfg = dict(quick)
    cfg["seed"] = SEED
    cfg["model"] = dict(quick["model"], name_or_path=str(MODEL))
    cfg["data"] = dict(quick["data"], paths=[str(DATA)])
    cfg["train"] = dict(quick["train"], backend="hf", device="cpu", dtype="float32", micro_batch_size=MICRO,
                        effective_batch_size=MICRO, epochs=EPOCHS, max_seq_length=MAX_LEN, gradient_checkpointing=False,
                        resume=False, output_root=str(WORK / "lorapipe-runs"))
    assert cfg["train"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS, "bias": "none"}
    assert (cfg["train"]["learning_rate"], cfg["train"]["warmup_steps"], cfg["train"]["weight_decay"],
            cfg["train"]["lr_scheduler"], cfg["train"]["optimizer"]) == (LR, WARMUP, WD, "linear", "adamw_torch")
    (WORK / "lorapipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    lf = {"model_name_or_path": str(MODEL), "stage": "sft", "do_train": True, "finetuning_type": "lora",
          "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": ",".join(TARGETS),
          "dataset": "peers_train", "dataset_dir": str(data_dir), "cutoff_len": MAX_LEN, "overwrite_cache": True,
          "output_dir": str(WORK / "lf-out"), "overwrite_output_dir": True, "logging_steps": LOG_STEPS,
          "save_strategy": "no", "plot_loss": False, "report_to": "none", "per_device_train_batch_size": MICRO,
          "gradient_accumulation_steps": 1, "learning_rate": LR, "num_train_epochs": float(EPOCHS),
          "lr_scheduler_type": "linear", "warmup_steps": WARMUP, "weight_decay": WD, "optim": "adamw_torch",
          "bf16": False, "fp16": False, "pure_bf16": False, "disable_gradient_checkpointing": True, "seed": SEED,
          "use_cpu": True, "disable_tqdm": True}
    (WORK / "llamafactory.yaml").write_text(yaml.safe_dump(lf, sort_keys=False))
    stub = WORK / "lf-stub" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(TORCHAUDIO_STUB)
    return {"train_rows": len(train_rows), "tokens": tokens, "lorapipe_config": cfg, "llamafactory_config": lf}


def monitored(cmd: list[str], env: dict, log: Path) -> tuple[float, float, int, str]:
    """Run `cmd`; return wall seconds, peak RSS (MB) of its process tree, exit code, output."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        peak = 0
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                rss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    return seconds, peak / 2**20, proc.returncode, log.read_text(errors="replace")


def base_env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                ZENML_ANALYTICS_OPT_IN="false", ZENML_CONFIG_PATH=str(WORK / "zen"), PYTHONHASHSEED="0")


def run_bare(i: int) -> dict:
    out = WORK / f"bare-out-{i}"
    cfg = {"model": str(MODEL), "data": str(WORK / "data" / "train.jsonl"), "out": str(out), "micro": MICRO,
           "epochs": EPOCHS, "max_len": MAX_LEN, "lr": LR, "warmup": WARMUP, "wd": WD, "log_steps": LOG_STEPS,
           "seed": SEED, "targets": TARGETS}
    wall, rss, rc, text = monitored([str(REPO / ".venv" / "bin" / "python"), "-c", BARE, json.dumps(cfg)], base_env(),
                                    WORK / f"bare-{i}.log")
    if rc:
        return {"error": text[-1500:]}
    res = json.loads(next(line for line in text.splitlines() if line.startswith("BARE_RESULT "))[12:])
    return {"wall_s": wall, "peak_rss_mb": rss, **res}


def run_lorapipe(i: int, extra: tuple[str, ...] = (), name: str = "lorapipe") -> dict:
    env = base_env()
    wall, rss, rc, text = monitored([str(REPO / ".venv" / "bin" / "lorapipe"), "run", "-c", str(WORK / "lorapipe.yaml"),
                                     "--no-cache", *extra], env, WORK / f"{name}-{i}.log")
    if rc:
        return {"error": text[-1500:]}
    meta = max((WORK / "zen").rglob("lorapipe_adapter.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(meta.read_text())["result"]
    log_file = meta.parent / "training_log.jsonl"
    logs = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] if log_file.exists() else []
    logged = [e["loss"] for e in logs if "loss" in e]
    q = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", STEPS_OF_RUN], cwd=REPO, env=env,
                       capture_output=True, text=True)
    steps = json.loads(next(line for line in q.stdout.splitlines() if line.startswith("STEPS "))[6:])
    return {"wall_s": wall, "peak_rss_mb": rss, "train_runtime": result.get("train_seconds"),
            "train_loss": result.get("train_loss"), "last_logged_loss": logged[-1] if logged else None,
            "steps": result.get("steps") or result.get("global_step"), "adapter_result": result, "zenml": steps}


def run_llamafactory(i: int) -> dict:
    out = WORK / "lf-out"
    env = dict(base_env(), PYTHONPATH=str(WORK / "lf-stub"), DISABLE_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="",
               VIRTUAL_ENV=str(LF_VENV), PATH=f"{LF_VENV / 'bin'}:{os.environ['PATH']}")
    env.pop("ZENML_CONFIG_PATH")
    cmd = [str(LF_VENV / "bin" / "llamafactory-cli"), "train", str(WORK / "llamafactory.yaml")]
    wall, rss, rc, text = monitored(cmd, env, WORK / f"llamafactory-{i}.log")
    if rc:
        return {"error": text[-1500:]}
    res = json.loads((out / "train_results.json").read_text())
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "trainer_log.jsonl").exists() else []
    logged = [e["loss"] for e in logs if e.get("loss") is not None]
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else {}
    return {"wall_s": wall, "peak_rss_mb": rss, "train_runtime": res["train_runtime"], "train_loss": res["train_loss"],
            "last_logged_loss": logged[-1] if logged else None, "steps": state.get("global_step")}


def run_lorapipe_grouped(i: int) -> dict:
    """lorapipe with its own batching for this job: rows grouped by length (train.group_by_length)."""
    return run_lorapipe(i, ("--set", "train.group_by_length=true"), "lorapipe_grouped")


RUNNERS = {"bare": run_bare, "lorapipe": run_lorapipe, "llamafactory": run_llamafactory,
           "lorapipe_grouped": run_lorapipe_grouped}
CATEGORIES = {"validation": ("validate", "resolve_data"), "preflight": ("preflight",), "train": ("train",),
              "evaluate": ("evaluate",), "merge": ("merge",), "register": ("register", "score_holder")}


def breakdown(run: dict) -> dict:
    """lorapipe's wall time by step category; `other` = steps not in a category + everything outside the steps."""
    steps = run["zenml"]["steps"]
    out = {c: 0.0 for c in CATEGORIES}
    other_steps = 0.0
    for name, sec in steps.items():
        cat = next((c for c, keys in CATEGORIES.items() if any(name == k or name.startswith(k) for k in keys)), None)
        if cat:
            out[cat] += sec or 0.0
        else:
            other_steps += sec or 0.0
    out["other_steps"] = other_steps
    out["outside_steps"] = run["wall_s"] - sum(s or 0.0 for s in steps.values())
    out["other"] = out["other_steps"] + out["outside_steps"]
    return out


def versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['torch','transformers','trl','peft','accelerate','datasets','zenml','llamafactory'] "
            "if any(d.metadata['Name'].lower()==p for d in m.distributions())}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}


def med(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    job = prepare()
    init_store = "from zenml.client import Client; Client().zen_store"
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", init_store], env=base_env(), cwd=REPO,
                   capture_output=True)  # the store exists before any timed run
    out_path = REPO / "bench" / "results" / os.environ.get("BENCH_OUT", "peers.json")
    rounds: list[dict] = []
    for i in range(RUNS):
        rnd = {}
        for tool in TOOLS:
            r = RUNNERS[tool](i)
            if "train_runtime" in r and r.get("train_runtime"):
                r["tokens_per_second"] = job["tokens"] / r["train_runtime"]
            rnd[tool] = r
            print(f"round {i + 1} {tool}: " + (f"wall {r['wall_s']:.1f}s, train {r['train_runtime']:.1f}s, "
                  f"peak {r['peak_rss_mb']:.0f} MB, loss {r['train_loss']}" if "error" not in r else
                  "FAILED " + r["error"][-400:]), flush=True)
        rounds.append(rnd)
        write(out_path, job, rounds)
    print(out_path.read_text())


def write(out_path: Path, job: dict, rounds: list[dict]) -> None:
    medians = {}
    for tool in TOOLS:
        ok = [r[tool] for r in rounds if "error" not in r.get(tool, {"error": 1})]
        if not ok:
            continue
        medians[tool] = {k: med(ok, k) for k in ("wall_s", "train_runtime", "tokens_per_second", "peak_rss_mb",
                                                   "train_loss", "last_logged_loss")}
        medians[tool]["runs"] = len(ok)
        if tool.startswith("lorapipe"):
            parts = [breakdown(r) for r in ok]
            medians[tool]["breakdown_s"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    ratios = {}
    lp = medians.get("lorapipe")
    pairs = [("lorapipe", "bare", "lorapipe/bare"), ("lorapipe", "llamafactory", "lorapipe/llamafactory"),
             ("lorapipe_grouped", "bare", "lorapipe_grouped/bare")]
    for mine, other, label in pairs:
        lp = medians.get(mine)
        if lp and other in medians:
            o = medians[other]
            ratios[label] = {k: f"{lp[k] / o[k]:.2f}x" for k in ("wall_s", "train_runtime", "peak_rss_mb")
                             if lp.get(k) and o.get(k)}
            ratios[label]["tokens_per_second"] = f"{lp['tokens_per_second'] / o['tokens_per_second']:.2f}x"
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {
        "benchmark": "peers", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, CPU only",
        "rounds": len(rounds), "order": "interleaved: " + ", ".join(TOOLS) + " per round",
        "versions": {"lorapipe_and_bare": versions(str(REPO / ".venv" / "bin" / "python")),
                     "llamafactory_venv": versions(str(LF_VENV / "bin" / "python"))},
        "job": {"model": "build_tiny_model(size='25m'): random Llama, hidden 512, 8 layers, 8 heads / 4 kv heads, "
                         "intermediate 1408, vocab 1024 (the tiny model's tokenizer), seed 0",
                "data": "quickstart train split as lorapipe draws it (eval 0.1, test 0.1, salt lorapipe)",
                "train_rows": job["train_rows"], "tokens_trained": job["tokens"],
                "tokens_note": "lorapipe's encoding of the train rows (chat template, <= 256) x epochs; one count for "
                               "every tool, so tokens/s compares training-loop time only",
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": TARGETS},
                "micro_batch": MICRO, "grad_accum": 1, "epochs": EPOCHS, "max_seq_length": MAX_LEN, "lr": LR,
                "scheduler": "linear", "warmup_steps": WARMUP, "weight_decay": WD, "optimizer": "adamw_torch",
                "dtype": "float32", "gradient_checkpointing": False, "seed": SEED, "device": "cpu"},
        "tools": {
            "bare": "TRL SFTTrainer + PEFT LoraConfig, conversational prompt/completion rows (TRL applies the "
                    "tokenizer's chat template, loss on the completion only), set_seed(42) before the LoRA layers "
                    "are created, gradient_checkpointing=False, save_strategy=no; the adapter saved once at the end",
            "lorapipe": "lorapipe run -c bench/.peers/lorapipe.yaml --no-cache: quickstart.yaml with train.backend hf, "
                        "device cpu, dtype float32, micro/effective batch 8, epochs 2, gradient_checkpointing false, "
                        "resume false, output_root bench/.peers/lorapipe-runs; ZENML_CONFIG_PATH=bench/.peers/zen "
                        "(created before the first timed run); every step runs (validate, split, preflight, train, "
                        "evaluate base vs tuned, merge + check, register)",
            "llamafactory": "llamafactory-cli train bench/.peers/llamafactory.yaml (stage sft, finetuning_type lora, "
                            "dataset_info.json maps prompt->prompt, completion->response, alpaca formatting; no "
                            "`template`, so it parses the tokenizer's chat template; cutoff_len 256; "
                            "disable_gradient_checkpointing true; save_strategy no, adapter saved at the end)",
        },
        "llamafactory_install": (
            "python -m venv bench/.peers/llamafactory-venv; pip install torch==2.13.0 (CPU wheel); pip install "
            "llamafactory==0.9.5, which upgraded torch to 2.14.1 and pulled torchvision 0.29.1 and torchaudio 2.11.1; "
            "pip uninstall -y torchvision torchaudio (torchvision is a CUDA build that breaks `import transformers`, "
            "torchaudio cannot load against torch 2.13; both taken from the issue's notes, not re-tested); pip install "
            "torch==2.13.0 again (pip check then lists only the two missing packages); a stub package "
            "bench/.peers/lf-stub/torchaudio/__init__.py (a docstring and __version__) on PYTHONPATH for "
            "LLaMA-Factory's runs only satisfies its module-level `import torchaudio` (never called for text SFT); "
            "env DISABLE_VERSION_CHECK=1, CUDA_VISIBLE_DEVICES=''"),
        "measures": {"wall_s": "whole process, start to exit", "train_runtime": "training loop as the tool logs it "
                     "(HF Trainer train_runtime; lorapipe: the adapter's train_seconds)",
                     "peak_rss_mb": "process tree RSS summed over children, psutil every 0.2 s",
                     "train_loss": "HF Trainer's train_loss (mean over the run)",
                     "last_logged_loss": "last loss the tool logged (every 10 steps)",
                     "breakdown_s": "lorapipe: ZenML step durations by category; other = other steps (split_data, "
                                    "score_stage_holder) "
                                    "+ time outside steps (imports, store, orchestration)"},
        "per_round": rounds, "medians": medians, "ratios": ratios,
    }
    out_path.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
