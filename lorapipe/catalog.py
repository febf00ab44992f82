"""Everything lorapipe knows about each training backend, written once.

The probe reads the packages to look for, the plan reads devices, quantisation kinds, optimizers, optional
features, tasks and training methods (and refuses what a backend lacks, or passes it over for backend auto),
`get_backend` checks names against it, the CLI prints the table.
Adding a supported option to a backend is adding its name to one tuple here. No heavy imports: the CLI and the
cache key read this module without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# train.* options that not every backend implements. Set on a backend whose `features` lacks them, preflight refuses
# the run naming the key, rather than ignoring it.
OPTIONAL_FEATURES = ("init_adapter", "eval_steps", "early_stopping_patience", "load_best_model_at_end", "packing",
                     "group_by_length")
# What `task` trains (lorapipe.config.TASKS) and `train.method` each backend implements: read by the plan, which refuses
# a backend that lacks the run's and skips it for train.backend: auto.
TASKS = ("sft", "classification")
METHODS = ("lora", "full")
# optimizers that come from bitsandbytes (the TRL backends import it for them)
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
# packages some settings need beyond a backend's own, with the extra that installs them
OPTIONAL_PACKAGE_INSTALL = {"bitsandbytes": "pip install -e '.[cuda]'"}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    summary: str
    modules: tuple[str, ...]  # import names that must be importable for it to run at all
    install: str  # the command that installs them
    devices: tuple[str, ...]  # plan devices it trains on: values train.device allows
    auto_on: tuple[str, ...]  # accelerators on which backend=auto may pick it and device=auto puts it (else the CPU)
    quantization: tuple[str, ...]  # train.quantization values it honours
    quantized_by: Optional[str]  # the package that quantises the base (needed only when quantization != none)
    optimizers: tuple[str, ...]  # train.optimizer values it honours
    lora_bias: tuple[str, ...]  # train.lora.bias values it honours
    features: tuple[str, ...]  # the OPTIONAL_FEATURES it implements
    adapter_format: str  # what its adapter folder is: "peft" (PeftModel.from_pretrained) or "mlx-lm"
    data_parallel: bool = False  # trains in N processes (torchrun; nccl on CUDA, gloo on the CPU)
    cpu_note: Optional[str] = None  # said as a plan warning when it trains on a CPU
    tasks: tuple[str, ...] = ("sft",)  # the TASKS it trains
    methods: tuple[str, ...] = ("lora",)  # the train.method values it implements (lora covers QLoRA)
    limits_note: Optional[str] = None  # why it lacks a task or method: said when the plan refuses it


_ALL_OPTIMIZERS = ("adamw_torch", *BITSANDBYTES_OPTIMIZERS, "sgd")
_ALL_BIAS = ("none", "all", "lora_only")

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(
        name="hf", summary="transformers + PEFT + TRL: CPU, CUDA, Apple MPS; QLoRA through bitsandbytes",
        modules=("torch", "transformers", "peft", "trl"), install="pip install -e .",
        devices=("cuda", "cpu", "mps"), auto_on=("cuda", "cpu"), quantization=("none", "nf4", "int8"),
        quantized_by="bitsandbytes", optimizers=_ALL_OPTIMIZERS, lora_bias=_ALL_BIAS, features=OPTIONAL_FEATURES,
        adapter_format="peft", data_parallel=True, tasks=("sft", "classification"), methods=("lora", "full")),
    BackendSpec(
        name="unsloth", summary="Unsloth + TRL: fused kernels and 4-bit QLoRA on CUDA",
        modules=("torch", "transformers", "peft", "trl", "unsloth", "bitsandbytes"), install="pip install -e '.[cuda]'",
        devices=("cuda", "cpu"), auto_on=("cuda",), quantization=("none", "nf4", "int8"), quantized_by="bitsandbytes",
        optimizers=_ALL_OPTIMIZERS, lora_bias=_ALL_BIAS, features=(), adapter_format="peft",
        cpu_note="unsloth without CUDA trains through its slow CPU fallback",
        limits_note="unsloth's FastLanguageModel trains causal LMs with LoRA only (no sequence-classification head, "
                    "no full fine-tuning)"),
    BackendSpec(
        name="mlx", summary="mlx-lm: Apple Silicon's unified memory (mlx[cpu] on Linux)",
        modules=("mlx", "mlx_lm"), install="pip install -e '.[mlx]'  (on Linux: pip install 'mlx[cpu]' mlx-lm)",
        devices=("mps", "cpu"), auto_on=("mps",), quantization=("none", "nf4", "int8"), quantized_by="mlx",
        optimizers=("adamw_torch", "sgd"), lora_bias=("none",), features=(), adapter_format="mlx-lm",
        cpu_note="mlx off Apple Silicon runs on mlx's CPU backend",
        limits_note="mlx-lm trains causal LMs with LoRA only (no sequence-classification head, no full fine-tuning)"),
)}
# train.backend=auto: the first of these whose `auto_on` holds the machine's accelerator and whose packages are
# installed; the last is the fallback that always applies.
AUTO_PREFERENCE = ("unsloth", "mlx", "hf")


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"train.backend: {name!r} is not one of auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backends_for(task: str, method: str = "lora") -> list[str]:
    """The backends that train `task` with `method`, in the catalog's order."""
    return [name for name, spec in BACKENDS.items() if task in spec.tasks and method in spec.methods]


def required_modules(spec: BackendSpec, quantization: str, optimizer: str) -> list[tuple[str, str, str]]:
    """(import name, why, install command) of every package a run with these settings needs on this backend."""
    needed = [(m, f"train.backend={spec.name}", spec.install) for m in spec.modules]
    if quantization != "none" and spec.quantized_by and spec.quantized_by not in spec.modules:
        needed.append((spec.quantized_by, f"train.quantization={quantization}", OPTIONAL_PACKAGE_INSTALL[spec.quantized_by]))
    if optimizer in BITSANDBYTES_OPTIMIZERS and "bitsandbytes" not in spec.modules:
        needed.append(("bitsandbytes", f"train.optimizer={optimizer}", OPTIONAL_PACKAGE_INSTALL["bitsandbytes"]))
    return needed


def tracked_modules() -> list[str]:
    """Every package a backend may need, for the probe and the lineage record."""
    seen: dict[str, None] = {}
    for spec in BACKENDS.values():
        for m in (*spec.modules, spec.quantized_by):
            if m:
                seen[m] = None
    seen["bitsandbytes"] = None
    return list(seen)
