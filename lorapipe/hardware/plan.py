"""The run plan: backend, and each phase's device, dtype and batch size, decided in exactly one place.

`decide_plan` takes the config sections, the hardware probe and the model's size, and either returns a `RunPlan`
that can run here or raises `PlanError` listing every reason it cannot (with the install command or the config key
to change). What a backend can and cannot do comes from `lorapipe.backends.catalog`. The steps receive the plan's
phases (`train`, `evaluate`, `merge`), never flags, and no other module probes the hardware. The number of
data-parallel training processes is decided here too (`train.processes` and the probe's GPUs); the train step
launches that many (`lorapipe.training.launch`).

The plan depends only on the config and on facts that stay put between two runs on one machine (the memory budget
comes from total, not free, memory), so planning the same config on the same machine gives the same plan: the
steps after preflight are then served from ZenML's cache, which keys them on the plan's content.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Optional

from pydantic import BaseModel

from lorapipe.backends.catalog import AUTO_PREFERENCE, BACKENDS, OPTIONAL_FEATURES, BackendSpec, required_modules
from lorapipe.config import EvaluateSection, MergeSection, TrainSection
from lorapipe.hardware.probe import HardwareProbe

Device = Literal["cpu", "cuda", "mps"]
Dtype = Literal["float32", "bfloat16", "float16"]
# Share of the device's memory the plan may fill: GPU memory on CUDA, total RAM (unified memory on Apple) elsewhere.
CUDA_BUDGET_FRACTION = 0.9
RAM_BUDGET_FRACTION = 0.8
# Backends whose training runs data-parallel over several processes (one per GPU; gloo on the CPU). Unsloth trains
# in one process and lorapipe's mlx loop has no process group. (A backend fact: its home is the catalog's BackendSpec.)


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
    """The train phase: what the train step and the backend read."""

    backend: str
    device: Device
    dtype: Dtype
    quantization: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    max_seq_length: int
    gradient_checkpointing: bool
    optimizer: str
    world_size: int = 1  # data-parallel processes the train step launches; micro x accumulation x this = effective
    memory: MemoryEstimate
    reasons: list[str]
    warnings: list[str]


class PhasePlan(BaseModel):
    """Where and how a phase after training runs: evaluation and merge read it instead of deciding."""

    phase: Literal["evaluate", "merge"]
    device: Device
    dtype: Dtype  # evaluate: the precision models are scored in; merge: the merged weights' precision
    batch_size: int
    reason: str


class RunPlan(BaseModel):
    train: TrainingPlan
    evaluate: PhasePlan
    merge: PhasePlan


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


def _missing(probe: HardwareProbe, needed: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [n for n in needed if not probe.packages.get(n[0])]


def choose_backend(requested: str, probe: HardwareProbe) -> tuple[str, str]:
    """(backend, reason). `auto`: the catalog's preferred backend for this machine's accelerator that is installed
    (unsloth on CUDA, mlx-lm on Apple Silicon), else hf."""
    if requested != "auto":
        return requested, f"train.backend={requested} was requested"
    accelerator = probe.accelerator
    for name in AUTO_PREFERENCE:
        spec = BACKENDS[name]
        if accelerator in spec.auto_on and all(probe.packages.get(m) for m in spec.modules):
            return name, f"{accelerator} machine and {name} is installed"
    return AUTO_PREFERENCE[-1], f"no backend prefers {accelerator} here: {AUTO_PREFERENCE[-1]} on " + (
        "CUDA" if accelerator == "cuda" else "CPU")


def _refusals(spec: BackendSpec, train: TrainSection) -> list[str]:
    """Every train.* option set in the config that this backend cannot honour, read from the catalog."""
    problems = []
    for key in OPTIONAL_FEATURES:
        if getattr(train, key) not in (None, False) and key not in spec.features:
            supported_by = [b.name for b in BACKENDS.values() if key in b.features]
            where = (f"is supported by the {', '.join(supported_by)} backend only; the plan chose {spec.name}: "
                     f"set train.backend: {supported_by[0]}, or unset train.{key}") if supported_by else \
                "is supported by no backend: unset it"
            problems.append(f"train.{key} {where}")
    for key, value, allowed in (("quantization", train.quantization, spec.quantization),
                                ("optimizer", train.optimizer, spec.optimizers),
                                ("lora.bias", train.lora.bias, spec.lora_bias)):
        if value not in allowed:
            problems.append(f"train.{key}={value} is not available on the {spec.name} backend; "
                            f"allowed there: {', '.join(allowed)}")
    return problems


def _train_device(train: TrainSection, spec: BackendSpec, probe: HardwareProbe, problems: list[str]) -> str:
    if train.device != "auto":
        device = train.device
        if device not in spec.devices:
            problems.append(f"train.device={device}: the {spec.name} backend trains on {', '.join(spec.devices)}; "
                            "set train.device: auto")
    else:  # the machine's accelerator where the catalog prefers this backend there (auto_on), else the CPU
        device = probe.accelerator if probe.accelerator in spec.auto_on else "cpu"
    if device == "cuda" and not probe.cuda_available:
        problems.append("train.device=cuda: the device cuda is not available on this machine (set train.device: auto)")
    if device == "mps" and not (probe.mps_available or (spec.name == "mlx" and probe.apple_silicon)):
        problems.append("train.device=mps: the device mps is not available on this machine (set train.device: auto)")
    return device


def cuda_dtype(probe: HardwareProbe) -> str:
    """The half precision of this machine's first GPU: bf16 where it supports it, else fp16."""
    return "bfloat16" if probe.cuda_devices and probe.cuda_devices[0].bf16 else "float16"


def _train_dtype(train: TrainSection, device: str, probe: HardwareProbe, spec: BackendSpec) -> str:
    """bf16 where the GPU supports it, else fp16 on CUDA; bf16 for mlx on Apple Silicon; fp32 on CPU."""
    if train.dtype != "auto":
        return train.dtype
    if device == "cuda":
        return cuda_dtype(probe)
    if device == "mps" and spec.name == "mlx":
        return "bfloat16"
    return "float32"


def data_parallel_backends() -> list[str]:
    return [name for name, spec in BACKENDS.items() if spec.data_parallel]


def _world_size(train: TrainSection, spec: BackendSpec, device: str, probe: HardwareProbe, problems: list[str],
                reasons: list[str], warnings: list[str]) -> int:
    """How many data-parallel processes train: `train.processes`, or for `auto` one per visible CUDA GPU where the
    backend trains data-parallel, else 1. The train step launches them; nothing reads WORLD_SIZE to decide."""
    gpus = len(probe.cuda_devices) if device == "cuda" else 0
    parallel = spec.data_parallel
    requested = train.processes
    if requested == "auto":
        if parallel and gpus > 1:
            reasons.append(f"data parallel over {gpus} processes: one per CUDA GPU (train.processes: auto)")
            return gpus
        if gpus > 1:
            warnings.append(f"the {spec.name} backend trains in one process: 1 of the {gpus} GPUs is used (set "
                            f"train.backend: hf to train on all {gpus})")
        reasons.append("1 process (train.processes: auto, " + (
            f"{gpus} CUDA GPU)" if device == "cuda" else f"on {device})"))
        return 1
    if requested == 1:
        reasons.append("1 process (train.processes: 1)")
        return 1
    if not parallel:
        problems.append(f"train.processes={requested}: the {spec.name} backend trains in one process; data-parallel "
                        f"training is supported by the {', '.join(data_parallel_backends())} backend only: set "
                        f"train.backend: {data_parallel_backends()[0]}, or train.processes: auto")
    elif device == "cuda" and requested > gpus:
        problems.append(f"train.processes={requested}: only {gpus} CUDA GPU(s) are visible here and each process "
                        f"trains on its own GPU: set train.processes: auto (or at most {gpus}), or widen "
                        "CUDA_VISIBLE_DEVICES")
    elif device == "mps":
        problems.append(f"train.processes={requested}: data parallel runs on CUDA GPUs (nccl) or the CPU (gloo), "
                        "not on mps: set train.processes: 1, or train.device: cpu")
    elif device == "cpu":
        warnings.append(f"train.processes={requested} on the CPU: {requested} gloo processes share this machine's "
                        "cores and RAM (slow; meant for testing the launch)")
    reasons.append(f"data parallel over {requested} processes (train.processes: {requested}, "
                   f"{'nccl' if device == 'cuda' else 'gloo'})")
    return requested


def _phase_plans(train_plan: TrainingPlan, evaluate: EvaluateSection, merge: MergeSection) -> tuple[PhasePlan, PhasePlan]:
    """Evaluation scores with torch on the training GPU (CUDA) in its dtype, else on the CPU in float32 (mlx
    adapters are scored as fused torch models); merges run on the CPU, so no GPU memory is held while the
    merged shards are written."""
    if train_plan.device == "cuda":
        evaluation = PhasePlan(phase="evaluate", device="cuda", dtype=train_plan.dtype, batch_size=evaluate.batch_size,
                               reason=f"on the training GPU in {train_plan.dtype}")
    else:
        evaluation = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=evaluate.batch_size,
                               reason="torch on the CPU in float32" + (
                                   " (the mlx adapter is fused and scored as a torch model)"
                                   if train_plan.backend == "mlx" else ""))
    merging = PhasePlan(phase="merge", device="cpu", dtype=merge.dtype, batch_size=1,
                        reason=f"on the CPU, written as {merge.dtype} (merge.dtype); checked one row at a time")
    return evaluation, merging


def decide_plan(train: TrainSection, probe: HardwareProbe, size: ModelSize,
                evaluate: Optional[EvaluateSection] = None, merge: Optional[MergeSection] = None) -> RunPlan:
    problems: list[str] = []
    warnings: list[str] = []
    backend, why = choose_backend(train.backend, probe)
    spec = BACKENDS[backend]
    reasons = [f"backend {backend}: {why}"]
    for module, why, install in _missing(probe, required_modules(spec, train.quantization, train.optimizer)):
        problems.append(f"{why} needs {module}, not installed here; install with: {install}" + (
            " (or set train.backend to auto/hf)" if why.startswith("train.backend") else ""))
    problems += _refusals(spec, train)
    if train.resume_from is not None and not os.path.isdir(train.resume_from):
        problems.append(f"train.resume_from: {train.resume_from} is not a folder; give a checkpoint folder "
                        "(e.g. runs/<key>/checkpoints/checkpoint-40) or unset it")

    device = _train_device(train, spec, probe, problems)
    if device == "cpu" and spec.cpu_note:
        warnings.append(spec.cpu_note)
    reasons.append(f"device {device}")
    dtype = _train_dtype(train, device, probe, spec)
    reasons.append(f"dtype {dtype}" + (" (auto)" if train.dtype == "auto" else ""))
    if device == "cpu" and dtype == "float16":
        problems.append("train.dtype=float16 is not supported for training on cpu; allowed here: float32, bfloat16, auto")
    optimizer = train.optimizer
    if optimizer.startswith("paged") and device != "cuda":
        warnings.append(f"{optimizer} pages only on CUDA; bitsandbytes falls back to a non-paged optimizer here")
    world = _world_size(train, spec, device, probe, problems, reasons, warnings)

    # memory budget of one process: GPU memory on CUDA (the smallest of the GPUs it trains on), total RAM elsewhere
    # (unified memory on Apple), which the CPU processes of a data-parallel run share. Not free memory: the plan must
    # come out the same on one machine from run to run (preflight warns when too little is free right now).
    if device == "cuda" and probe.cuda_devices:
        budget = min(d.total_memory_gb for d in probe.cuda_devices[:world]) * CUDA_BUDGET_FRACTION
    else:
        budget = probe.ram_total_gb * RAM_BUDGET_FRACTION / world
    quant = train.quantization
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
    # each process trains micro-batches of `chosen`; accumulation makes up the rest of the effective batch, shared
    # out over the processes, so a run's optimizer steps see the same batch whatever the process count
    chosen = min(chosen, max(1, train.effective_batch_size // world))
    # the largest micro-batch that fits and divides the effective batch exactly, so the batch asked for is the
    # batch trained; when the process count does not divide it, the nearest batch above, said as a warning
    exact = next((mb for mb in range(chosen, 0, -1) if train.effective_batch_size % (mb * world) == 0), None)
    chosen = exact or chosen
    ga = max(1, math.ceil(train.effective_batch_size / (chosen * world)))
    if chosen * ga * world != train.effective_batch_size:
        warnings.append(f"train.effective_batch_size={train.effective_batch_size} is not a multiple of {world} "
                        f"processes: each optimizer step sees {chosen * ga * world} rows (set a multiple of {world})")
    per_step = f" x {world} processes" if world > 1 else ""
    reasons.append(f"micro-batch {chosen} x accumulation {ga}{per_step} = effective {chosen * ga * world} "
                   f"(estimated {estimate.total_gb:.2f} of {budget:.1f} GB{' per process' if world > 1 else ''})")
    if probe.disk_free_gb < 1.0 + size.parameters * 2 * 2 / 2**30:
        problems.append(f"only {probe.disk_free_gb:.1f} GB free at {probe.disk_path}: checkpoints and the merged model "
                        "need about twice the model's 16-bit size; free disk or move train.output_root")
    if problems:
        raise PlanError(problems)
    train_plan = TrainingPlan(
        backend=backend, device=device, dtype=dtype, quantization=quant, micro_batch_size=chosen,
        gradient_accumulation_steps=ga, effective_batch_size=chosen * ga * world, max_seq_length=seq,
        gradient_checkpointing=train.gradient_checkpointing, optimizer=optimizer, world_size=world,
        memory=estimate, reasons=reasons, warnings=warnings)
    evaluation, merging = _phase_plans(train_plan, evaluate or EvaluateSection(), merge or MergeSection())
    return RunPlan(train=train_plan, evaluate=evaluation, merge=merging)


def model_size(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> ModelSize:
    """Size from the model's config alone (no weights are loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    inter = getattr(cfg, "intermediate_size", 4 * h)
    params = V * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + L * (4 * h * h + 3 * h * inter)
    return ModelSize(parameters=params, hidden_size=h, layers=L, vocab_size=V)
