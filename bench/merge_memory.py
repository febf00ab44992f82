"""Benchmark: peak resident memory of the merge + equivalence check, now and before (commit OLD_COMMIT).

The job: a ~25M-parameter Llama, and a ~170M one for scale (random weights, saved in bfloat16 as hub checkpoints
are), with a LoRA adapter (r16 on all seven projections, random A and B so the merge changes every weight), merged
into bfloat16 and checked on 4 quickstart rows. Each run is a fresh process: the peak is VmHWM (the kernel's
high-water mark of the process's resident set; `ru_maxrss` would report the forking parent's size), restarted from
the current RSS (/proc/self/clear_refs) when the baseline is taken: the imports' own transient peak is higher than
a small model's whole merge. Two baselines:
- cold: after importing torch, transformers, peft, transformers' Llama module and lorapipe, before any weight is
  loaded;
- warm: after that, and after the same merge + check once on a toy model (1 layer, 32 wide): what a first merge
  costs whatever the model's size (kernel code paged in on the first forward pass, modules peft and transformers
  import lazily, allocator arenas), which a merge of a 7B model pays too but which is not model memory.
The figure that matters: (peak - baseline) / the model's 16-bit size; goal <= 1.5. The old path is the code of
OLD_COMMIT (lorapipe/merge.py and backends/peft_adapter.py then, read with `git show`), run unchanged, warmed up the
same way. Medians of RUNS interleaved rounds. Writes bench/results/merge_memory.json.

    .venv/bin/python bench/merge_memory.py          # BENCH_RUNS=3 by default
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
OLD_COMMIT = "f5964634737c90f61210ecb684b2a7bf1a780c00"  # the merge before issue 9: two models beside the merged one
OLD_FILES = ("lorapipe/phases/merge.py", "lorapipe/backends/peft_adapter.py")
GOAL = 1.5
# 25M: shaped like a small Llama, embeddings + untied head 2 x 4096 x 512 (17% of it, as in TinyLlama-sized models;
# a 16k vocabulary would make them 65% and the check's logits a third of the model), 7 layers x ~2.95M. The goal
# is judged on it. 170M shows how the fixed costs (the check's logits, LoRA weights, temporaries) shrink against
# the model as it grows. BENCH_SIZES=25M runs the first only.
SIZES = {
    "25M": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=7, num_attention_heads=8,
                num_key_value_heads=4),
    "170M": dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=8),
}
TOY = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2)

CHILD = r"""
import json, sys, time, types
from pathlib import Path

path, adapter, toy_adapter, out, rows_folder, old_dir = sys.argv[1:7]

def high_water_mb():
    # VmHWM, this process's own high-water mark. getrusage's ru_maxrss is no use in a child: it starts at the RSS
    # of the parent it was forked from (the parent process, torch loaded, is bigger than this whole merge)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024

def reset_high_water():
    # Linux >= 4.0: the mark restarts from the current RSS (the imports' transient peak is not the merge's)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return high_water_mb()

import torch, transformers, peft  # noqa: E401 - the baseline: code, no weights
import transformers.models.llama.modeling_llama  # noqa: F401
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan
import lorapipe.phases.merge  # noqa: F401
rows = ConversationDataset.read(rows_folder)
phase = PhasePlan(phase="merge", device="cpu", dtype="bfloat16", batch_size=1, reason="bench")

def merge(adapter_dir, out_dir):
    if path == "new":
        from lorapipe.phases.merge import merge_adapter
        return merge_adapter(adapter_dir, out_dir, rows, phase, check_samples=4)
    # the old code, verbatim, with its backend lookup pointed at the old peft_adapter functions
    def head_module(name, file):
        module = types.ModuleType(name)
        exec(compile(Path(old_dir, file).read_text(), f"{name} (old)", "exec"), module.__dict__)
        return module
    old_peft = head_module("old_peft_adapter", "peft_adapter.py")
    old = head_module("old_merge", "merge.py")
    old.get_backend = lambda name: types.SimpleNamespace(merge=old_peft.merge,
                                                         reference_logits=old_peft.reference_logits)
    return old.merge_adapter(adapter_dir, out_dir, rows, phase, check_samples=4)

cold = reset_high_water()
merge(toy_adapter, out + "-toy")
warm = reset_high_water()
start = time.perf_counter()
check = merge(adapter, out)
seconds = time.perf_counter() - start
print(json.dumps({"cold_baseline_mb": cold, "warm_baseline_mb": warm, "peak_mb": high_water_mb(),
                  "seconds": seconds, "passed": check.passed, "max_abs_logit_diff": check.max_abs_logit_diff}))
"""


def build_model(work: Path, shape: dict) -> dict:
    """A base model folder (tokenizer from the tiny builder, a Llama of `shape` in bf16) and an adapter lorapipe can
    merge (PEFT files + lorapipe_adapter.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.formats import read_records
    from lorapipe.data.render import encode
    from lorapipe.models.tiny import build_tiny_model

    base = build_tiny_model(work / "base", [DATA])  # its tokenizer; the weights are replaced below
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(base))
    parameters = sum(p.numel() for p in model.parameters())
    model.name_or_path = str(base)
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapter = work / "adapter"
    get_peft_model(model, lora).save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    (adapter / "lorapipe_adapter.json").write_text(json.dumps({
        "base_model": str(base), "base_revision": None, "trust_remote_code": False, "data_fingerprint": "bench",
        "seed": 0, "plan": {"backend": "hf", "device": "cpu", "dtype": "bfloat16", "quantization": "none"},
        "training_config": {}, "chat_template_override": None, "result": {}}))
    # what the new path holds besides the model: the check's reference logits (bf16) and the LoRA weights (fp32)
    positions = sum(len(encode(tokenizer, rec, 256).input_ids)
                    for rec in ConversationDataset(read_records([str(DATA)]).records[:4]).records)
    return {"adapter": str(adapter), "parameters": parameters, "model_16bit_mb": parameters * 2 / 2**20,
            "check_logits_mb": positions * shape["vocab_size"] * 2 / 2**20,
            "lora_fp32_mb": (adapter / "adapter_model.safetensors").stat().st_size / 2**20}


def build_job(work: Path) -> dict:
    """The toy model (for the warm-up), 4 check rows, and the old code's files."""
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.formats import read_records

    job = {"toy_adapter": build_model(work / "toy", TOY)["adapter"]}
    ConversationDataset(read_records([str(DATA)]).records[:4], name="check").write(work / "rows")
    old_dir = work / "old"
    old_dir.mkdir()
    for file in OLD_FILES:
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:{file}"], cwd=REPO, check=True, capture_output=True,
                                text=True).stdout
        (old_dir / Path(file).name).write_text(source)
    return {**job, "rows": str(work / "rows"), "old": str(old_dir)}


def run_once(job: dict, model: dict, path: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, path, model["adapter"], job["toy_adapter"], str(out),
                           job["rows"], job["old"]], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], size_mb: float) -> dict:
    def median(f):
        return round(statistics.median(f(r) for r in runs), 2)

    return {
        "median_peak_rss_mb": median(lambda r: r["peak_mb"]),
        "median_cold_baseline_mb": median(lambda r: r["cold_baseline_mb"]),
        "median_warm_baseline_mb": median(lambda r: r["warm_baseline_mb"]),
        "peak_over_cold_baseline_in_model_sizes": median(lambda r: (r["peak_mb"] - r["cold_baseline_mb"]) / size_mb),
        "peak_over_warm_baseline_in_model_sizes": median(lambda r: (r["peak_mb"] - r["warm_baseline_mb"]) / size_mb),
        "median_seconds": median(lambda r: r["seconds"]),
        "check_passed": all(r["passed"] for r in runs),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    import peft
    import torch
    import transformers

    sizes = [name.strip() for name in os.environ.get("BENCH_SIZES", ",".join(SIZES)).split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-merge-") as tmp:
        work = Path(tmp)
        job = build_job(work)
        for size_name in sizes:
            model = build_model(work / size_name, SIZES[size_name])
            runs: dict[str, list] = {"old": [], "new": []}
            for i in range(RUNS):  # interleaved, so drift hits both alike
                for path in runs:
                    runs[path].append(run_once(job, model, path, work / f"{size_name}-{path}-{i}"))
                    print(size_name, path, i, runs[path][-1], flush=True)
                    shutil.rmtree(work / f"{size_name}-{path}-{i}")
            shutil.rmtree(work / size_name)
            results[size_name] = {"parameters": model["parameters"],
                                  "model_16bit_mb": round(model["model_16bit_mb"], 1),
                                  "check_logits_mb": round(model["check_logits_mb"], 1),
                                  "lora_fp32_mb": round(model["lora_fp32_mb"], 1),
                                  **{path: summarise(rs, model["model_16bit_mb"]) for path, rs in runs.items()}}

    report = {
        "benchmark": "merge_memory",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "job": {"merged_dtype": "bfloat16", "base_saved_as": "bfloat16",
                "lora": "r16, all 7 projections, random A and B",
                "check_rows": 4, "check_tokens_per_row": "up to 256", "runs": RUNS, "old_code": OLD_COMMIT},
        "goal": f"peak - baseline <= {GOAL} x the 16-bit model size, on the 25M model",
        "goal_met": {baseline: results["25M"]["new"][f"peak_over_{baseline}_in_model_sizes"] <= GOAL
                     for baseline in ("cold_baseline", "warm_baseline")} if "25M" in results else None,
        "results": results,
    }
    out = REPO / "bench" / "results" / "merge_memory.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({size: {path: ({m: v for m, v in r.items() if m != "runs"} if isinstance(r, dict) else r)
                             for path, r in figures.items()} for size, figures in results.items()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
