"""The run plan: backend, and each phase's device, dtype and batch size, decided in exactly one place.

`decide_plan` takes the config sections, the hardware probe and the model's facts, and either returns a `RunPlan`
that can run here or raises `PlanError` listing every reason it cannot (with the install command or the config key
to change). What a backend can and cannot do comes from `lorapipe.catalog`. The steps receive the plan's
phases (`train`, `evaluate`, `merge`), never flags, and no other module probes the hardware. The number of
data-parallel training processes is decided here too (`train.processes` and the probe's GPUs); the train step
launches that many (`lorapipe.phases.launch`). The task (`sft`, or `classification` with its number of labels) and
`train.method` (LoRA/QLoRA, or full fine-tuning) are planned here too: a backend that lacks them is refused (or, for
`train.backend: auto`, skipped), and the memory model counts the model the way it will train.

The plan depends only on the config and on facts that stay put between two runs on one machine (the memory budget
comes from total, not free, memory), so planning the same config on the same machine gives the same plan: the
steps after preflight are then served from ZenML's cache, which keys them on the plan's content.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, model_validator

from lorapipe.catalog import (
    AUTO_PREFERENCE,
    BACKENDS,
    OPTIONAL_FEATURES,
    BackendSpec,
    backends_for,
    required_modules,
    task_spec,
)
from lorapipe.config import EvaluateSection, MergeSection, TrainSection, shard_bytes
from lorapipe.hardware.facts import ModelFacts, model_facts
from lorapipe.hardware.memory import (
    ADAPTER_EVAL_TERMS,
    CUDA_ALLOCATOR_OVERHEAD,
    MERGE_CHECK_TOKENS,
    MemoryEstimate,
    MemoryInputs,
    MemoryTerm,
    estimate,
)
from lorapipe.hardware.probe import HardwareProbe
from lorapipe.units import GIB, ReadsGbNames, format_bytes, format_gib

Device = Literal["cpu", "cuda", "mps"]
Dtype = Literal["float32", "bfloat16", "float16"]
# Share of the device's memory the plan may fill: GPU memory on CUDA, total RAM (unified memory on Apple) elsewhere.
CUDA_BUDGET_FRACTION = 0.9
RAM_BUDGET_FRACTION = 0.8


class PlanError(RuntimeError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight refused the training plan:\n" + "\n".join(f"  - {p}" for p in problems))


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
    profile: Optional[str] = None  # train.profile the plan chose the unset knobs by
    task: str = "sft"  # sft (a causal LM) or classification (a sequence classifier with num_labels outputs)
    method: str = "lora"  # train.method: lora (QLoRA with quantization) or full (every weight trained, fp32)
    num_labels: Optional[int] = None  # classification: the head's outputs
    labels: list[str] = []  # classification: the label set validation froze (ids 0..n-1), the head's names

    @property
    def load_dtype(self) -> str:
        """The dtype to load the weights in: float32 for full fine-tuning (the optimizer updates fp32 weights, and a
        16-bit `dtype` is the Trainer's autocast compute dtype, as the memory model counts it), else `dtype`."""
        return "float32" if self.method == "full" else self.dtype


class PhasePlan(ReadsGbNames):
    """Where and how a phase after training runs: evaluation and merge read it instead of deciding."""

    phase: Literal["evaluate", "merge"]
    device: Device
    dtype: Dtype  # evaluate: the precision models are scored in; merge: the merged weights' precision
    batch_size: int
    # tokens per row: evaluate scores rows at the length training saw them; merge checks rows of at most
    # MERGE_CHECK_TOKENS (a check of the folded weights, not a second evaluation)
    max_seq_length: int
    reason: str
    predicted_peak_gib: float = 0.0  # the memory model's peak of this phase (see lorapipe.hardware.memory)
    memory_terms: list[MemoryTerm] = []  # what makes up that peak
    warnings: list[str] = []

    def base_alone(self) -> "PhasePlan":
        """The evaluation plan of the untuned base scored alone (task sft's base step): the same device, dtype, batch
        and length, the adapter's terms left out, so it is the same plan, and the base's scores the same cache entry,
        for every adapter trained on that base whatever its rank, targets or hyperparameters."""
        if self.phase != "evaluate":
            raise ValueError(f"base_alone() is of an evaluation plan, not of the {self.phase} plan")
        terms = [t for t in self.memory_terms if t.name not in ADAPTER_EVAL_TERMS]
        if any(t.name == "CUDA allocator overhead" for t in terms):  # a share of the rest: of the base's terms now
            rest = sum(t.bytes for t in terms if t.name not in ("CUDA allocator overhead", "CUDA context"))
            terms = [t.model_copy(update={"bytes": int(rest * CUDA_ALLOCATOR_OVERHEAD)})
                     if t.name == "CUDA allocator overhead" else t for t in terms]
        peak = round(sum(t.bytes for t in terms) / GIB, 4)
        # its own words and figures only: the evaluation plan's reason and warnings quote the peak with the adapter
        return PhasePlan(phase="evaluate", device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                         max_seq_length=self.max_seq_length,
                         reason=f"the untuned base alone, on {self.device} in {self.dtype}, batch {self.batch_size}: "
                                f"{format_gib(peak)} predicted", predicted_peak_gib=peak, memory_terms=terms)


class RunPlan(BaseModel):
    train: TrainingPlan
    evaluate: PhasePlan
    merge: PhasePlan

    @model_validator(mode="before")
    @classmethod
    def _phase_lengths_of_older_plans(cls, data: Any) -> Any:
        """Plans stored before 2026-12-07 carry no phase max_seq_length: those phases ran at the training's length
        (evaluate) and at most MERGE_CHECK_TOKENS (merge), as `decide_plan` now writes down."""
        if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
            return data
        length = data["train"].get("max_seq_length")
        data = dict(data)
        for phase, cap in (("evaluate", None), ("merge", MERGE_CHECK_TOKENS)):
            stored = data.get(phase)
            if isinstance(stored, dict) and "max_seq_length" not in stored and length is not None:
                data[phase] = {**stored, "max_seq_length": length if cap is None else min(length, cap)}
        return data


def _missing(probe: HardwareProbe, needed: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [n for n in needed if not probe.packages.get(n[0])]


def choose_backend(requested: str, probe: HardwareProbe, task: str = "sft", method: str = "lora") -> tuple[str, str]:
    """(backend, reason). `auto`: the catalog's preferred backend for this machine's accelerator that is installed
    (unsloth on CUDA, mlx-lm on Apple Silicon) and trains this task with this method, else hf."""
    if requested != "auto":
        return requested, f"train.backend={requested} was requested"
    accelerator = probe.accelerator
    passed_over = []
    for name in AUTO_PREFERENCE:
        spec = BACKENDS[name]
        if accelerator in spec.auto_on and all(probe.packages.get(m) for m in spec.modules):
            lacking = _lacking(spec, task, method)
            if lacking:
                passed_over.append(f"{name} is installed but cannot train {lacking}")
                continue
            return name, "".join(f"{p}; " for p in passed_over) + f"{accelerator} machine and {name} is installed"
    fallback = AUTO_PREFERENCE[-1]
    if passed_over:
        return fallback, "; ".join(passed_over) + f": {fallback}"
    return fallback, f"no backend prefers {accelerator} here: {fallback} on " + (
        "CUDA" if accelerator == "cuda" else "CPU")


def _task_refusals(spec: BackendSpec, task: str, method: str) -> list[str]:
    """The task or train.method this backend cannot train: one line with why and the fix."""
    lacking = _lacking(spec, task, method)
    if not lacking:
        return []
    why = spec.limits_note or "not in its catalog entry"
    fix = " or ".join([*backends_for(task, method), "auto"])
    return [f"train.backend={spec.name} cannot train {lacking}: {why}; set train.backend: {fix}"]


def _lacking(spec: BackendSpec, task: str, method: str) -> str:
    """'task X', 'train.method Y', both joined by 'with', or '' when the backend trains both."""
    parts = [f"task {task}"] * (task not in spec.tasks) + [f"train.method {method}"] * (method not in spec.methods)
    return " with ".join(parts)


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
    if train.method == "dpo":
        p = train.preference
        if spec.dpo_loss_types is not None and p.loss_type not in spec.dpo_loss_types:
            problems.append(f"train.preference.loss_type={p.loss_type} is not available on the {spec.name} backend; "
                            f"allowed there: {', '.join(spec.dpo_loss_types)} (or set train.backend: hf)")
        if p.label_smoothing and not spec.dpo_label_smoothing:
            problems.append(f"train.preference.label_smoothing={p.label_smoothing} is not available on the "
                            f"{spec.name} backend: set it to 0, or set train.backend: hf")
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


def _phase_plans(train_plan: TrainingPlan, merge: MergeSection, eval_batch: int, memory: MemoryEstimate,
                 notes: dict[str, list[str]]) -> tuple[PhasePlan, PhasePlan]:
    """Evaluation scores with torch on the training GPU (CUDA) in its dtype, else on the CPU in float32 (mlx
    adapters are scored as fused torch models); merges run on the CPU, so no GPU memory is held while the
    merged shards are written. Each carries its own predicted peak and terms."""
    if train_plan.device == "cuda":
        device, dtype, reason = "cuda", train_plan.dtype, f"on the training GPU in {train_plan.dtype}"
    else:
        device, dtype, reason = "cpu", "float32", "torch on the CPU in float32" + (
            " (the mlx adapter is fused and scored as a torch model)" if train_plan.backend == "mlx" else "")
    evaluation = PhasePlan(phase="evaluate", device=device, dtype=dtype, batch_size=eval_batch,
                           max_seq_length=train_plan.max_seq_length,
                           reason="; ".join([reason, *notes["evaluate_reasons"]]),
                           predicted_peak_gib=memory.eval_peak_gib or 0.0, memory_terms=memory.phase_terms("eval"),
                           warnings=notes["evaluate_warnings"])
    merging = PhasePlan(phase="merge", device="cpu", dtype=merge.dtype, batch_size=1,
                        max_seq_length=min(train_plan.max_seq_length, MERGE_CHECK_TOKENS),
                        reason=f"on the CPU, written as {merge.dtype} (merge.dtype); checked one row at a time",
                        predicted_peak_gib=memory.merge_peak_gib or 0.0, memory_terms=memory.phase_terms("merge"),
                        warnings=notes["merge_warnings"])
    return evaluation, merging


# What each profile tries, in order, for the knobs the config leaves to the plan (see docs/MEMORY.md): quantisation,
# gradient checkpointing, optimizer (CUDA / elsewhere), evaluation batch sizes, and the share of the budget kept free.
PROFILES: dict[str, dict[str, Any]] = {
    "conservative": {"combos": [("nf4", True)], "optimizer": ("paged_adamw_8bit", "adamw_torch"),
                     "eval_batches": (1,), "margin": 0.25},
    "balanced": {"combos": [("none", False), ("none", True), ("nf4", True)],
                 "optimizer": ("paged_adamw_32bit", "adamw_torch"), "eval_batches": (4, 2, 1), "margin": 0.15},
    "quality": {"combos": [("none", False), ("none", True), ("nf4", False), ("nf4", True)],
                "optimizer": ("adamw_torch", "adamw_torch"), "eval_batches": (8, 4, 2, 1), "margin": 0.10},
}
# the knobs a user sets in the config that the plan may otherwise choose (with a profile)
PLANNED_KNOBS = ("train.quantization", "train.gradient_checkpointing", "train.optimizer", "evaluate.batch_size")


def micro_batch_candidates(train: TrainSection) -> list[int]:
    """The micro-batch sizes the plan may choose, smallest first: `train.micro_batch_size` when set, else the powers
    of two up to `train.max_micro_batch_size`. Validation reports the padding waste of each."""
    if isinstance(train.micro_batch_size, int):
        return [train.micro_batch_size]
    return [2**k for k in range(int(math.log2(train.max_micro_batch_size)) + 1)]


def user_set_keys(train: TrainSection, evaluate: Optional[EvaluateSection] = None) -> set[str]:
    """The planned knobs (PLANNED_KNOBS) the config gave explicitly: pydantic remembers which fields were set. Only
    those, so that setting an unrelated key does not change the preflight step's inputs."""
    keys = {f"train.{k}" for k in train.model_fields_set}
    keys |= {f"evaluate.{k}" for k in (evaluate.model_fields_set if evaluate is not None else ())}
    return keys & set(PLANNED_KNOBS)


def memory_inputs(train: TrainSection, evaluate: EvaluateSection, merge: MergeSection, backend: str, device: str,
                  dtype: str, *, quantization: Optional[str] = None, micro_batch_size: Optional[int] = None,
                  seq_len: Optional[int] = None, gradient_checkpointing: Optional[bool] = None,
                  optimizer: Optional[str] = None, eval_batch_size: Optional[int] = None, lora_r: Optional[int] = None,
                  attn_implementation: Optional[str] = None, task: str = "sft", num_labels: int = 2,
                  method: Optional[str] = None) -> MemoryInputs:
    """The memory model's inputs for a config on a device; each keyword overrides the config's value."""
    method = method or train.method
    return MemoryInputs(task=task, num_labels=num_labels, full_finetune=method == "full",
        preference_method=method if task == "preference" else None,
        precompute_reference=train.preference.precompute_reference or BACKENDS[backend].reference_precomputed,
        device=device, backend=backend, dtype=dtype,
        quantization=quantization if quantization is not None else train.quantization,
        micro_batch_size=micro_batch_size or (train.micro_batch_size if isinstance(train.micro_batch_size, int) else 1),
        seq_len=seq_len or train.max_seq_length, lora_r=lora_r or train.lora.r, lora_targets=train.lora.target_modules,
        gradient_checkpointing=(train.gradient_checkpointing if gradient_checkpointing is None
                                else gradient_checkpointing),
        optimizer=optimizer or train.optimizer, attn_implementation=attn_implementation,
        eval_batch_size=eval_batch_size or evaluate.batch_size, max_new_tokens=evaluate.max_new_tokens,
        merge_dtype=merge.dtype, max_shard_bytes=shard_bytes(merge.max_shard_size))


def _what_fits(facts: ModelFacts, base: MemoryInputs, budget_bytes: float, spec: BackendSpec) -> list[str]:
    """For each knob on its own, a value that makes the training peak fit: the fixes a refusal names."""
    fixes = []
    need = estimate(facts, base).train_peak_bytes

    def first_fit(key: str, current: Any, values: list[Any], field: str, shown: Optional[dict] = None) -> None:
        for v in values:
            peak = estimate(facts, base.model_copy(update={field: v})).train_peak_bytes
            if peak <= budget_bytes:
                value = (shown or {}).get(v, v)
                fixes.append(f"{key} {current} needs {format_bytes(need)} of {format_bytes(budget_bytes)}; {value} "
                             f"fits at {format_bytes(peak)}")
                return

    seq = base.seq_len
    first_fit("train.max_seq_length", seq, [seq // 2**k for k in range(1, 8) if seq // 2**k >= 64], "seq_len")
    if base.micro_batch_size > 1:
        first_fit("train.micro_batch_size", base.micro_batch_size,
                  [base.micro_batch_size // 2**k for k in range(1, 8) if base.micro_batch_size // 2**k >= 1],
                  "micro_batch_size")
    if base.full_finetune:
        first_fit("train.method", "full", [False], "full_finetune", {False: "lora"})
    elif base.quantization == "none" and "nf4" in spec.quantization:
        first_fit("train.quantization", "none", ["nf4"], "quantization")
    if not base.gradient_checkpointing:
        first_fit("train.gradient_checkpointing", "false", [True], "gradient_checkpointing")
    if base.optimizer in ("adamw_torch", "paged_adamw_32bit") and "paged_adamw_8bit" in spec.optimizers:
        first_fit("train.optimizer", base.optimizer, ["paged_adamw_8bit"], "optimizer")
    if base.lora_r > 4 and not base.full_finetune:
        first_fit("train.lora.r", base.lora_r, [base.lora_r // 2**k for k in range(1, 6) if base.lora_r // 2**k >= 4],
                  "lora_r")
    return fixes


def _plan_memory(train: TrainSection, evaluate: EvaluateSection, merge: MergeSection, facts: ModelFacts,
                 spec: BackendSpec, device: str, dtype: str, budget: float, ram_budget: float, world: int,
                 user_set: set[str], attn_implementation: Optional[str], problems: list[str],
                 reasons: list[str], warnings: list[str], notes: dict[str, list[str]],
                 probe: HardwareProbe, task: str = "sft", num_labels: int = 2) -> tuple[dict[str, Any], MemoryEstimate]:
    """Choose quantisation, gradient checkpointing, optimizer, micro-batch and evaluation batch so every phase
    fits its budget (with the profile's margin); keep every value the config set, and when they cannot fit, name
    each knob and a value that does."""
    profile = PROFILES.get(train.profile or "")
    margin = profile["margin"] if profile else 0.0
    limit = budget * (1 - margin)
    cuda = device == "cuda"

    def given(key: str) -> bool:
        return profile is None or key in user_set

    def available(quantization: str, optimizer_name: str) -> bool:
        """The backend honours it on this device and its package is installed (a profile never picks what fails)."""
        if quantization not in spec.quantization or (quantization != "none" and device == "mps" and spec.name != "mlx"):
            return False
        if quantization != "none" and train.method == "full":  # full fine-tuning trains every weight: none frozen
            return False
        return not _missing(probe, required_modules(spec, quantization, optimizer_name))

    combos = [(train.quantization, train.gradient_checkpointing)]
    if profile:
        # a profile's 4-bit choice falls back to 16-bit where the backend, the device or the packages cannot quantise
        combos = list(dict.fromkeys(
            (train.quantization if given("train.quantization") else q if available(q, "adamw_torch") else "none",
             train.gradient_checkpointing if given("train.gradient_checkpointing") else g)
            for q, g in profile["combos"]))
    optimizer = train.optimizer
    if profile and not given("train.optimizer"):
        wanted = profile["optimizer"][0 if cuda else 1]
        optimizer = wanted if wanted in spec.optimizers and available("none", wanted) else "adamw_torch"
    micro = micro_batch_candidates(train)[::-1]  # the largest that fits
    eval_batches = [evaluate.batch_size] if given("evaluate.batch_size") else list(profile["eval_batches"])

    def inputs(q: str, gc: bool, mb: int, eb: int) -> MemoryInputs:
        return memory_inputs(train, evaluate, merge, spec.name, device, dtype, quantization=q, micro_batch_size=mb,
                             gradient_checkpointing=gc, optimizer=optimizer, eval_batch_size=eb,
                             attn_implementation=attn_implementation, task=task, num_labels=num_labels)

    chosen: Optional[tuple[str, bool, int]] = None
    for q, gc in combos:
        for mb in micro:
            if estimate(facts, inputs(q, gc, mb, eval_batches[-1])).train_peak_bytes <= limit * GIB:
                chosen = (q, gc, mb)
                break
        if chosen:
            break
    if chosen is None:
        q, gc = combos[-1]
        base = inputs(q, gc, micro[-1], eval_batches[-1])
        need = estimate(facts, base).train_peak_bytes
        fixes = _what_fits(facts, base, limit * GIB, spec)
        where = f"{format_gib(budget)} usable on {device}" + (f" less the {train.profile} profile's {margin:.0%} margin"
                                                        if margin else "")
        problems.append(f"training needs about {format_bytes(need)} at micro-batch {micro[-1]} and the budget is "
                        f"{format_gib(limit)} "
                        f"({where}): " + ("; ".join(fixes) if fixes else
                                         "no single change fits: use a machine with more memory or a smaller model"))
        chosen = (q, gc, micro[-1])
    q, gc, mb = chosen
    # the largest evaluation batch that fits the evaluation phase's budget (the GPU on CUDA, RAM elsewhere)
    eval_limit = limit if cuda else ram_budget * (1 - margin)
    eb = eval_batches[-1]
    for candidate in eval_batches:
        if estimate(facts, inputs(q, gc, mb, candidate)).eval_peak_bytes <= eval_limit * GIB:
            eb = candidate
            break
    memory = estimate(facts, inputs(q, gc, mb, eb), budget_gib=budget)
    if memory.eval_peak_gib > eval_limit:
        # said before training, as a warning of the evaluation phase: the adapter is trained and stored before the
        # evaluation, and evaluating it elsewhere (a machine with more memory) recovers the run
        weights = next(t.bytes for t in memory.terms if t.phase == "eval" and t.name == "base weights") / GIB
        if weights > eval_limit * 0.9:
            # evaluation and the stage holder's scoring load the base unquantised (QLoRA's 4-bit saving is training's)
            fix = (f"it loads the base unquantised ({format_gib(weights)} of weights alone): evaluate on a machine "
                   "with more memory, or train a smaller model")
        else:
            fix = ("set evaluate.batch_size: 1" if eb > 1 else "lower evaluate.max_new_tokens or train.max_seq_length")
        notes["evaluate_warnings"].append(
            f"evaluation needs about {format_gib(memory.eval_peak_gib)} at evaluate.batch_size {eb} and "
            f"{format_gib(eval_limit)} is usable on {'cuda' if cuda else 'cpu'}: it may run out of memory after "
            f"training; {fix}")
    if memory.merge_peak_gib > ram_budget:
        # a warning, not a refusal: the adapter is trained and stored before the merge, which can run again elsewhere
        notes["merge_warnings"].append(
            f"merge needs about {format_gib(memory.merge_peak_gib)} of RAM (a {merge.dtype} copy of the base with the "
            f"adapter, the shard being written, the read-back for the check) and {format_gib(ram_budget)} is usable "
            "here: the merge step may fail after training; the adapter is stored first, merge it on a machine with "
            "more RAM"
            + ("" if merge.dtype != "float32" else ", or set merge.dtype: bfloat16"))
    # training's choices are said in the training plan; evaluation's in its own (so that an evaluation setting leaves
    # the training plan, and the cached training, as they were)
    for key, value, default in (("train.quantization", q, train.quantization),
                                ("train.gradient_checkpointing", gc, train.gradient_checkpointing),
                                ("train.optimizer", optimizer, train.optimizer),
                                ("evaluate.batch_size", eb, evaluate.batch_size)):
        said = reasons if key.startswith("train.") else notes["evaluate_reasons"]
        if profile and not given(key):
            said.append(f"{key} {value} (profile {train.profile}" + (
                "" if value == default else f"; the default is {default}") + ")")
        elif profile:
            said.append(f"{key} {value} (set in the config, kept)")
    per = " per process" if world > 1 else ""
    reasons.append(f"memory: training {format_gib(memory.total_gib)} predicted; budget {format_gib(budget)}{per}"
                   + (f", {margin:.0%} kept free ({train.profile})" if margin else ""))
    notes["evaluate_reasons"].append(f"{format_gib(memory.eval_peak_gib)} predicted")
    return {"quantization": q, "gradient_checkpointing": gc, "optimizer": optimizer, "micro_batch_size": mb,
            "eval_batch_size": eb}, memory


def decide_plan(train: TrainSection, probe: HardwareProbe, facts: ModelFacts,
                evaluate: Optional[EvaluateSection] = None, merge: Optional[MergeSection] = None, *,
                attn_implementation: Optional[str] = None, user_set: Optional[set[str]] = None, task: str = "sft",
                num_labels: int = 2) -> RunPlan:
    """The plan of every phase, or PlanError with every reason not. `user_set`: the dotted keys the config set
    (default: what pydantic recorded as set on `train` and `evaluate`); with `train.profile` the plan chooses the
    others. `task`: sft or classification (with `num_labels`); `facts` must be counted for the same task
    (`model_size(..., task=..., num_labels=...)`). `train.method` says LoRA/QLoRA or full fine-tuning."""
    classifier = task_spec(task).model_kind == "sequence_classifier"
    if facts.task != task or (classifier and facts.num_labels != num_labels):
        raise ValueError(f"decide_plan(task={task!r}, num_labels={num_labels}) was given the facts of a "
                         f"{facts.task} model ({facts.num_labels} labels): count them with model_size(..., "
                         f"task={task!r}, num_labels={num_labels})")
    evaluate = evaluate or EvaluateSection()
    merge = merge or MergeSection()
    if user_set is None:
        user_set = user_set_keys(train, evaluate)
    problems: list[str] = []
    warnings: list[str] = []
    method = train.method
    backend, why = choose_backend(train.backend, probe, task, method)
    spec = BACKENDS[backend]
    reasons = [f"backend {backend}: {why}"]
    problems += _task_refusals(spec, task, method)
    if classifier:
        reasons.append(f"task {task}: a sequence classifier with {num_labels} labels ({facts.block}); "
                       + ("train.method full: every weight trained (fp32 weights, gradients and optimizer state)"
                          if method == "full" else "train.method lora: LoRA adapters and a trained copy of the head"))
    elif method == "full":
        problems.append("train.method full is for task: classification (small encoders); task sft trains LoRA: set "
                        "train.method: lora")
    for module, why, install in _missing(probe, required_modules(spec, train.quantization, train.optimizer)):
        problems.append(f"{why} needs {module}, not installed here; install with: {install}" + (
            " (or set train.backend to auto/hf)" if why.startswith("train.backend") else ""))
    problems += _refusals(spec, train)
    if facts.added_tokens and not spec.trains_new_tokens:
        problems.append(f"model.chat_template adds {facts.added_tokens} token(s) to the vocabulary, whose embeddings "
                        f"must train; the {spec.name} backend trains no embedding rows: set train.backend: hf, or "
                        "give a template whose tokens the tokenizer has")
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
        problems.append("train.dtype=float16 is not supported for training on cpu; allowed here: float32, bfloat16, "
                        "auto")
    world = _world_size(train, spec, device, probe, problems, reasons, warnings)

    # memory budget of one process: GPU memory on CUDA (the smallest of the GPUs it trains on), total RAM elsewhere
    # (unified memory on Apple), which the CPU processes of a data-parallel run share. Not free memory: the plan must
    # come out the same on one machine from run to run (preflight warns when too little is free right now).
    ram_budget = probe.ram_total_gib * RAM_BUDGET_FRACTION
    if device == "cuda" and probe.cuda_devices:
        budget = min(d.total_memory_gib for d in probe.cuda_devices[:world]) * CUDA_BUDGET_FRACTION
    elif device == "mps" and probe.mlx_working_set_gib:
        # Apple's GPU works within mlx's recommended working set, below total unified memory
        budget = min(ram_budget, probe.mlx_working_set_gib)
    else:
        budget = ram_budget / world
    notes: dict[str, list[str]] = {"evaluate_reasons": [], "evaluate_warnings": [], "merge_warnings": []}
    chosen, memory = _plan_memory(train, evaluate, merge, facts, spec, device, dtype, budget, ram_budget, world,
                                  user_set, attn_implementation, problems, reasons, warnings, notes, probe, task,
                                  num_labels)
    optimizer = chosen["optimizer"]
    if optimizer.startswith("paged") and device != "cuda":
        warnings.append(f"{optimizer} pages only on CUDA; bitsandbytes falls back to a non-paged optimizer here")
    chosen_mb = chosen["micro_batch_size"]
    # each process trains micro-batches of `chosen`; accumulation makes up the rest of the effective batch, shared
    # out over the processes, so a run's optimizer steps see the same batch whatever the process count
    chosen_mb = min(chosen_mb, max(1, train.effective_batch_size // world))
    # the largest micro-batch that fits and divides the effective batch exactly, so the batch asked for is the
    # batch trained; when the process count does not divide it, the nearest batch above, said as a warning
    exact = next((mb for mb in range(chosen_mb, 0, -1) if train.effective_batch_size % (mb * world) == 0), None)
    chosen_mb = exact or chosen_mb
    ga = max(1, math.ceil(train.effective_batch_size / (chosen_mb * world)))
    if chosen_mb * ga * world != train.effective_batch_size:
        warnings.append(f"train.effective_batch_size={train.effective_batch_size} is not a multiple of {world} "
                        f"processes: each optimizer step sees {chosen_mb * ga * world} rows (set a multiple of "
                        f"{world})")
    if chosen_mb != chosen["micro_batch_size"]:  # the memory of the micro-batch actually trained
        memory = estimate(facts, memory_inputs(train, evaluate, merge, backend, device, dtype,
                                               quantization=chosen["quantization"], micro_batch_size=chosen_mb,
                                               gradient_checkpointing=chosen["gradient_checkpointing"],
                                               optimizer=optimizer, eval_batch_size=chosen["eval_batch_size"],
                                               attn_implementation=attn_implementation, task=task,
                                               num_labels=num_labels), budget_gib=budget)
    per_step = f" x {world} processes" if world > 1 else ""
    reasons.append(f"micro-batch {chosen_mb} x accumulation {ga}{per_step} = effective {chosen_mb * ga * world} "
                   f"(estimated {memory.total_gib:.2f} of {format_gib(budget)}{' per process' if world > 1 else ''})")
    disk_need = 1.0 + facts.total_parameters * 2 * 2 / GIB
    if probe.disk_free_gib < disk_need:
        problems.append(f"only {format_gib(probe.disk_free_gib)} free at {probe.disk_path}: checkpoints and the "
                        f"merged model need about {format_gib(disk_need)} (twice the model's 16-bit size and 1 GiB); "
                        "free disk or move train.output_root")
    if problems:
        raise PlanError(problems)
    train_plan = TrainingPlan(
        backend=backend, device=device, dtype=dtype, quantization=chosen["quantization"], micro_batch_size=chosen_mb,
        gradient_accumulation_steps=ga, effective_batch_size=chosen_mb * ga * world,
        max_seq_length=train.max_seq_length,
        gradient_checkpointing=chosen["gradient_checkpointing"], optimizer=optimizer, world_size=world,
        memory=memory.training_only(), reasons=reasons, warnings=warnings, profile=train.profile, task=task,
        method=method, num_labels=num_labels if classifier else None)
    evaluation, merging = _phase_plans(train_plan, merge, chosen["eval_batch_size"], memory, notes)
    return RunPlan(train=train_plan, evaluate=evaluation, merge=merging)


def model_size(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
               task: str = "sft", num_labels: int = 2) -> ModelFacts:
    """The model's facts from its config alone (no weights are loaded): `lorapipe.hardware.facts.model_facts`;
    `task: classification` counts the sequence classifier with `num_labels` outputs."""
    return model_facts(name_or_path, revision, trust_remote_code, task=task, num_labels=num_labels)
