"""Benchmark: the memory model against published figures (issue 8, "published anchors"); arithmetic only.

Public config.json values (tests/data/model_configs, no weights) and each source's stated settings go through
`lorapipe.hardware.memory.estimate`. One rule for every anchor: the predicted training peak as torch's allocated
peak (neither the CUDA context nor the allocator's overhead, which torch's peak counters leave out), in the unit the
source writes its figure in (torchtune: GiB, as torch reports; LLaMA-Factory: GB, 10**9 bytes). Each row carries the
`lorapipe estimate-memory` command that reproduces it. Sources and settings are in docs/MEMORY.md. Writes
bench/results/memory_anchors.json.

  .venv/bin/python bench/memory_anchors.py
"""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lorapipe.hardware.memory import CUDA_OVERHEAD_TERMS, MemoryInputs, estimate  # noqa: E402
from lorapipe.units import GIB  # noqa: E402
from tests.model_facts import facts  # noqa: E402

GOAL = 0.15
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the hub id each test config was copied from (the command line reads its config.json from the hub or its cache)
HUB_IDS = {"llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
           "deepseek-coder-6.7b": "deepseek-ai/deepseek-coder-6.7b-base", "mistral-7b": "mistralai/Mistral-7B-v0.1"}
UNITS = {"GiB": 2**30, "GB": 10**9}
# (name, model, published figure or None, its unit, kind, the settings as MemoryInputs, source note)
ANCHORS = [
    ("torchtune LoRA, Llama-3.1-8B, 1x RTX 4090", "llama-3.1-8b", 16.2, "GiB", "measured",
     dict(device="cuda", backend="unsloth", dtype="bfloat16", micro_batch_size=2, seq_len=2048, lora_r=8,
          lora_targets=["q_proj", "v_proj"], gradient_checkpointing=True, loss_chunks=8),
     "torchtune README (v0.3.1): batch 2, packed to 2048, compile on; 8B_lora_single_device: q,v r8, activation "
     "checkpointing, CEWithChunkedOutputLoss (8 chunks), bf16, fused AdamW; 16-bit adapters (backend 'unsloth' "
     "here means: nothing upcast to fp32)"),
    ("torchtune QLoRA, Llama-3.1-8B, 1x RTX 4090", "llama-3.1-8b", 7.4, "GiB", "measured",
     dict(device="cuda", backend="unsloth", dtype="bfloat16", quantization="nf4", micro_batch_size=2, seq_len=2048,
          lora_r=8, lora_targets=ALL, gradient_checkpointing=True, loss_chunks=8),
     "torchtune README (v0.3.1): as above; 8B_qlora_single_device: q,k,v,o + MLP r8, NF4 base"),
    ("LLaMA-Factory LoRA fp16, LLaMA2-7B", "llama-2-7b", 18.0, "GB", "quoted",
     dict(device="cuda", dtype="float16", micro_batch_size=4, seq_len=1024, lora_r=8,
          lora_targets=["q_proj", "v_proj"], gradient_checkpointing=True, sft_loss="full_logits"),
     "figure as quoted in issue 8 (batch 4, GA 2, r8, cutoff 1024); its source was not found in LLaMA-Factory's "
     "README, docs or paper; LLaMA-Factory defaults: gradient checkpointing on, then-default targets q,v"),
    ("LLaMA-Factory QLoRA 4-bit, LLaMA2-7B", "llama-2-7b", 9.0, "GB", "quoted",
     dict(device="cuda", dtype="float16", quantization="nf4", micro_batch_size=4, seq_len=1024, lora_r=8,
          lora_targets=["q_proj", "v_proj"], gradient_checkpointing=True, sft_loss="full_logits"),
     "as above, 4-bit"),
]
SEED_PROFILES = [
    ("seed QLoRA conservative, DeepSeek-Coder-6.7B, 24 GB", 18.0, dict(seq_len=512, lora_r=32)),
    ("seed QLoRA balanced, DeepSeek-Coder-6.7B, 24 GB", 20.0, dict(seq_len=1024, lora_r=64)),
    ("seed QLoRA quality, DeepSeek-Coder-6.7B, 24 GB", 22.0, dict(seq_len=2048, lora_r=128,
                                                               attn_implementation="flash_attention_2")),
]


def allocated_peak_bytes(est) -> int:
    """torch's allocated training peak: the estimate less the CUDA context and the allocator's overhead."""
    return sum(t.bytes for t in est.terms if t.phase == "train" and t.name not in CUDA_OVERHEAD_TERMS)


def command(model: str, settings: dict) -> str:
    """The `lorapipe estimate-memory` line that gives the same estimate (its JSON's terms)."""
    flags = {"device": "--device", "backend": "--backend", "dtype": "--dtype", "quantization": "--quantization",
             "micro_batch_size": "--micro-batch-size", "seq_len": "--seq-len", "lora_r": "--lora-rank",
             "loss_chunks": "--loss-chunks", "sft_loss": "--sft-loss", "optimizer": "--optimizer",
             "attn_implementation": "--attn-implementation"}
    parts = ["lorapipe estimate-memory", HUB_IDS[model]]
    for key, value in settings.items():
        if key == "lora_targets":
            parts.append(f"--lora-targets {value if isinstance(value, str) else ','.join(value)}")
        elif key == "gradient_checkpointing":
            parts.append("--gradient-checkpointing" if value else "--no-gradient-checkpointing")
        else:
            parts.append(f"{flags[key]} {value}")
    return " ".join(parts) + " --json"


def main() -> int:
    rows = []
    for name, model, published, unit, kind, settings, source in ANCHORS:
        est = estimate(facts(model), MemoryInputs(**settings))
        predicted = allocated_peak_bytes(est) / UNITS[unit]
        rows.append({"anchor": name, "model": model, "published": published, "unit": unit, "kind": kind,
                     "predicted": round(predicted, 2), "error": round(predicted / published - 1, 4),
                     "rule": "torch's allocated peak (no CUDA context, no allocator overhead), in the source's unit",
                     "settings": settings, "command": command(model, settings), "source": source,
                     "terms_gib": {t.name: round(t.bytes / GIB, 3) for t in est.terms if t.phase == "train"}})
    for name, claimed, settings in SEED_PROFILES:
        inputs = MemoryInputs(device="cuda", dtype="bfloat16", quantization="nf4", micro_batch_size=1,
                              gradient_checkpointing=True, optimizer="paged_adamw_32bit", lora_targets=ALL, **settings)
        est = estimate(facts("deepseek-coder-6.7b"), inputs)
        rows.append({"anchor": name, "model": "deepseek-coder-6.7b", "published": claimed, "unit": "GB",
                     "kind": "claim", "predicted": round(allocated_peak_bytes(est) / UNITS["GB"], 2),
                     "predicted_with_context_and_overhead": round(est.train_peak_bytes / UNITS["GB"], 2),
                     "error": None, "settings": inputs.model_dump(), "source": "../shared/SEED_FEATURES.md item 3 "
                     "(a claim, not a measurement; micro-batch 1, NF4 double-quant, gradient checkpointing, "
                     "paged_adamw_32bit, all 7 projections assumed)"})
    mac = estimate(facts("mistral-7b"), MemoryInputs(device="mps", backend="mlx", dtype="bfloat16",
                                                      quantization="nf4", micro_batch_size=1, seq_len=256, lora_r=8,
                                                      lora_targets=["q_proj", "v_proj"]))
    rows.append({"anchor": "Mistral-7B on a 16 GB Mac (MLX 4-bit, seq 256, r8)", "model": "mistral-7b",
                 "published": None, "unit": "GiB", "kind": "no published figure",
                 "predicted": round(mac.train_peak_bytes / GIB, 2),
                 "error": None, "settings": mac.model_dump(include={"total_gib"}),
                 "source": "seed MLX notes (trained on a 16 GB M1); no memory figure is published by mlx-lm"})
    for r in rows:
        err = f"{r['error'] * 100:+.1f}%" if r["error"] is not None else "-"
        print(f"{r['anchor']:<58} published {r['published'] or '-':>5} {r['unit']:3s}  predicted "
              f"{r['predicted']:6.2f}  {err}")
    measured = [r for r in rows if r["kind"] in ("measured", "quoted")]
    out = {"benchmark": "memory_anchors", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "goal": f"within +-{GOAL:.0%} of torchtune's and LLaMA-Factory's figures",
           "rule": "every anchor: torch's allocated peak (no CUDA context, no allocator overhead), in its source's "
                   "unit",
           "within_goal": sum(abs(r["error"]) <= GOAL for r in measured), "anchors": len(measured),
           "worst_abs_error": max(abs(r["error"]) for r in measured), "rows": rows}
    (REPO / "bench" / "results" / "memory_anchors.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
