"""The training plan: backend, device, dtype, quantization and batch geometry, decided in exactly one place.

`decide_plan` takes the config, the hardware probe and the model's size, and either returns a plan that
can run here or raises `PlanError` listing every reason it cannot (with the install command or the config
key to change). Downstream steps receive the plan, never flags.
"""

from __future__ import annotations

import math
from typing import Optional

from pydantic import BaseModel

from lorapipe.config import TrainSection
from lorapipe.hardware.probe import BACKEND_PACKAGES, HardwareProbe


HF_ONLY = ("init_adapter", "eval_steps", "early_stopping_patience", "load_best_model_at_end", "packing",
           "group_by_length")


class PlanError(RuntimeError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight refused the training plan:\n" + "\n".join(f"  - {p}" for p in problems))


class ModelSize(BaseModel):
    parameters: int
    hidden_size: int
    layers: int
    vocab_size: int


class MemoryEstimate(BaseModel):
    weights_gb: float
    lora_and_optimizer_gb: float
    activations_gb: float
    total_gb: float
    budget_gb: float


class TrainingPlan(BaseModel):
    backend: str
    device: str
    dtype: str
    quantization: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    max_seq_length: int
    gradient_checkpointing: bool
    optimizer: str
    memory: MemoryEstimate
    reasons: list[str]
    warnings: list[str]


def _installed(probe: HardwareProbe, backend: str) -> list[str]:
    mods, _ = BACKEND_PACKAGES[backend]
    return [m for m in mods if not probe.packages.get(m)]


def _bytes_per_param(dtype: str, quantization: str) -> float:
    if quantization == "nf4":
        return 0.55  # 4-bit weights + double-quantised scales
    if quantization == "int8":
        return 1.05
    return 4.0 if dtype == "float32" else 2.0


def estimate_memory(size: ModelSize, plan_dtype: str, quantization: str, micro_batch: int, seq: int,
                    lora_r: int, checkpointing: bool, budget_gb: float) -> MemoryEstimate:
    """Back-of-envelope arithmetic (weights, LoRA + Adam state, activations), like the seed MLX notes."""
    gb = 2**30
    weights = size.parameters * _bytes_per_param(plan_dtype, quantization) / gb
    lora_params = 2 * lora_r * size.hidden_size * 7 * size.layers  # ~7 projections per layer
    lora_opt = lora_params * (4 + 4 + 8) / gb  # fp32 weights + grads + two Adam moments
    act_bytes = 2 if plan_dtype != "float32" else 4
    per_layer = micro_batch * seq * size.hidden_size * act_bytes * (2 if checkpointing else 16)
    logits = micro_batch * seq * size.vocab_size * 4 * 2
    activations = (per_layer * size.layers + logits) / gb
    total = weights + lora_opt + activations
    return MemoryEstimate(weights_gb=round(weights, 4), lora_and_optimizer_gb=round(lora_opt, 4),
                          activations_gb=round(activations, 4), total_gb=round(total, 4), budget_gb=round(budget_gb, 2))


def choose_backend(requested: str, probe: HardwareProbe) -> tuple[str, str]:
    """(backend, reason). `auto`: unsloth on CUDA when installed, else hf; mlx on Apple Silicon; else hf on CPU."""
    if requested != "auto":
        return requested, f"train.backend={requested} was requested"
    if probe.cuda_available:
        if probe.packages.get("unsloth"):
            return "unsloth", "CUDA is present and unsloth is installed"
        return "hf", "CUDA is present, unsloth is not installed: transformers+PEFT (bitsandbytes for QLoRA)"
    if probe.apple_silicon and probe.packages.get("mlx_lm"):
        return "mlx", "Apple Silicon with mlx-lm installed"
    return "hf", "no CUDA and no Apple Silicon: transformers+PEFT on CPU"


def decide_plan(train: TrainSection, probe: HardwareProbe, size: ModelSize) -> TrainingPlan:
    problems: list[str] = []
    warnings: list[str] = []
    backend, why = choose_backend(train.backend, probe)
    reasons = [f"backend {backend}: {why}"]
    missing = _installed(probe, backend)
    if missing:
        problems.append(f"train.backend={backend} needs {', '.join(missing)}, not installed here; install with: "
                        f"{BACKEND_PACKAGES[backend][1]} (or set train.backend to auto/hf)")

    if backend != "hf":  # what only the transformers+PEFT backend implements is refused, never ignored
        for key in HF_ONLY:
            if getattr(train, key) not in (None, False):
                problems.append(f"train.{key} is supported by the hf backend only; the plan chose {backend}: "
                                f"set train.backend: hf, or unset train.{key}")

    # device
    if train.device == "auto":
        device = "cuda" if probe.cuda_available and backend != "mlx" else ("mps" if backend == "mlx" else "cpu")
        if backend == "mlx":
            device = "mlx"
    else:
        device = train.device
    if device == "cuda" and not probe.cuda_available:
        problems.append("train.device=cuda: the device cuda is not available on this machine (set train.device: auto)")
    if device == "mps" and backend != "mlx" and not probe.mps_available:
        problems.append("train.device=mps: the device mps is not available on this machine (set train.device: auto)")
    if backend == "unsloth" and not probe.cuda_available:
        warnings.append("unsloth without CUDA trains through its slow CPU fallback")
    if backend == "mlx" and not probe.apple_silicon:
        warnings.append("mlx off Apple Silicon runs on mlx's CPU backend")
    reasons.append(f"device {device}")

    # dtype: bf16 where the GPU supports it, else fp16 on CUDA, fp32 on CPU
    if train.dtype != "auto":
        dtype = train.dtype
    elif device == "cuda":
        dtype = "bfloat16" if probe.cuda_devices and probe.cuda_devices[0].bf16 else "float16"
    elif device == "mlx":
        dtype = "bfloat16" if probe.apple_silicon else "float32"
    else:
        dtype = "float32"
    reasons.append(f"dtype {dtype}" + (" (auto)" if train.dtype == "auto" else ""))
    if device == "cpu" and dtype == "float16":
        problems.append("train.dtype=float16 is not supported for training on cpu; allowed here: float32, bfloat16, auto")

    quant = train.quantization
    if quant != "none" and backend in ("hf", "unsloth") and not probe.packages.get("bitsandbytes"):
        problems.append(f"train.quantization={quant} needs bitsandbytes; install with: pip install -e '.[cuda]' "
                        "(or set train.quantization: none)")

    optimizer = train.optimizer
    if optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") and not probe.packages.get("bitsandbytes"):
        problems.append(f"train.optimizer={optimizer} needs bitsandbytes (pip install -e '.[cuda]'); or use adamw_torch")
    if optimizer.startswith("paged") and device != "cuda":
        warnings.append(f"{optimizer} pages only on CUDA; bitsandbytes falls back to a non-paged optimizer here")

    # memory budget: GPU memory on CUDA, 80% of available RAM elsewhere (unified memory on Apple)
    if device == "cuda" and probe.cuda_devices:
        budget = probe.cuda_devices[0].total_memory_gb * 0.9
    else:
        budget = probe.ram_available_gb * 0.8
    seq = train.max_seq_length
    if isinstance(train.micro_batch_size, int):
        candidates = [train.micro_batch_size]
    else:
        candidates = [2**k for k in range(int(math.log2(train.max_micro_batch_size)), -1, -1)]
    chosen: Optional[int] = None
    estimate = None
    for mb in candidates:
        estimate = estimate_memory(size, dtype, quant, mb, seq, train.lora.r, train.gradient_checkpointing, budget)
        if estimate.total_gb <= budget:
            chosen = mb
            break
    assert estimate is not None
    if chosen is None:
        problems.append(
            f"estimated memory {estimate.total_gb:.1f} GB at micro-batch {candidates[-1]} exceeds the budget "
            f"{budget:.1f} GB on {device}: lower train.max_seq_length, set train.quantization: nf4, "
            "or turn on train.gradient_checkpointing")
        chosen = candidates[-1]
    chosen = min(chosen, train.effective_batch_size)
    ga = max(1, math.ceil(train.effective_batch_size / chosen))
    reasons.append(f"micro-batch {chosen} x accumulation {ga} = effective {chosen * ga} "
                   f"(estimated {estimate.total_gb:.2f} of {budget:.1f} GB)")
    if probe.disk_free_gb < 1.0 + size.parameters * 2 * 2 / 2**30:
        problems.append(f"only {probe.disk_free_gb:.1f} GB free at {probe.disk_path}: checkpoints and the merged model "
                        "need about twice the model's 16-bit size; free disk or move train.output_root")
    if problems:
        raise PlanError(problems)
    return TrainingPlan(backend=backend, device=device, dtype=dtype, quantization=quant, micro_batch_size=chosen,
                        gradient_accumulation_steps=ga, effective_batch_size=chosen * ga, max_seq_length=seq,
                        gradient_checkpointing=train.gradient_checkpointing, optimizer=optimizer, memory=estimate,
                        reasons=reasons, warnings=warnings)


def model_size(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> ModelSize:
    """Size from the model's config alone (no weights are loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    inter = getattr(cfg, "intermediate_size", 4 * h)
    params = V * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + L * (4 * h * h + 3 * h * inter)
    return ModelSize(parameters=params, hidden_size=h, layers=L, vocab_size=V)
