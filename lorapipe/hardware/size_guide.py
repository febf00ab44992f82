"""Hardware guidance by model size, computed rather than written down: for a list of models, which methods (full
fine-tuning, LoRA, QLoRA) fit which memory sizes, with gradient checkpointing or without, from the same memory model
the plan uses (`lorapipe estimate-memory --guide`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lorapipe.catalog import BACKENDS, task_spec
from lorapipe.hardware.facts import ModelFacts
from lorapipe.hardware.memory import MemoryInputs, estimate
from lorapipe.hardware.plan import CUDA_BUDGET_FRACTION, RAM_BUDGET_FRACTION
from lorapipe.units import GIB

# The methods the size guide compares: train.quantization and whether every weight is trained (train.method: full).
GUIDE_METHODS = {"full": ("none", True), "lora": ("none", False), "qlora": ("nf4", False)}
GUIDE_BUDGETS_GIB = (8, 16, 24, 48, 80)


def size_guide(facts_by_name: dict[str, ModelFacts], budgets_gib: Sequence[float] = GUIDE_BUDGETS_GIB, *,
               task: str = "sft", seq_len: int = 512, micro_batch_size: int = 8, device: str = "cuda",
               methods: Optional[Sequence[str]] = None, dtype: Optional[str] = None, optimizer: str = "adamw_torch",
               lora_r: int = 16, lora_targets: Any = "all-linear") -> list[dict[str, Any]]:
    """Hardware guidance by model size, from the memory model: for each model and method (full fine-tuning, LoRA,
    QLoRA), the predicted training peak with gradient checkpointing off and on, and for each memory size whether it
    fits the share the plan may fill (90% of a GPU; 80% of RAM on the CPU or a Mac).

    Args:
        facts_by_name: display name -> the model's facts, counted for `task` (`model_facts(..., task=task)`).
        budgets_gib: the memory sizes to check (GiB, as torch and the probe report a GPU).
        task: sft or classification (each model's facts carry its number of labels).
        seq_len: tokens per row (train.max_seq_length).
        micro_batch_size: rows per step.
        device: cuda, cpu or mps.
        methods: which of full, lora, qlora; default all three for classification, lora and qlora for sft (full
            fine-tuning is for classifiers).
        dtype: the compute dtype; default bfloat16 on a GPU, float32 on the CPU.
        optimizer: train.optimizer.
        lora_r: train.lora.r.
        lora_targets: train.lora.target_modules.

    Returns:
        One dict per (model, method): model, method, parameters, trainable_parameters, train_peak_gib,
        train_peak_gc_gib (with gradient checkpointing), eval_peak_gib, fits ({budget: "yes" | "gradient
        checkpointing" | "no"}) and the settings (with budget_fraction).
    """
    spec = task_spec(task)
    # the task's methods, LoRA shown with and without a quantised base (qlora)
    methods = list(methods or [m for m in GUIDE_METHODS if GUIDE_METHODS[m][1] is False or "full" in spec.methods])
    unknown = [m for m in methods if m not in GUIDE_METHODS]
    if unknown:
        raise ValueError(f"size_guide: unknown method(s) {', '.join(unknown)}; known: {', '.join(GUIDE_METHODS)}")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    fraction = CUDA_BUDGET_FRACTION if device == "cuda" else RAM_BUDGET_FRACTION
    backend = "mlx" if device == "mps" and task in BACKENDS["mlx"].tasks else "hf"
    settings = {"task": task, "seq_len": seq_len, "micro_batch_size": micro_batch_size, "device": device,
                "dtype": dtype, "optimizer": optimizer, "lora_r": lora_r, "backend": backend,
                "budget_fraction": fraction}
    rows = []
    for name, facts in facts_by_name.items():
        if facts.task != task:
            raise ValueError(f"size_guide(task={task!r}): {name}'s facts were counted for task {facts.task}: count "
                             f"them with model_facts(..., task={task!r})")
        for method in methods:
            quantization, full = GUIDE_METHODS[method]
            x = MemoryInputs(device=device, backend=backend, dtype=dtype, quantization=quantization, seq_len=seq_len,
                             micro_batch_size=micro_batch_size, lora_r=lora_r, lora_targets=lora_targets,
                             optimizer=optimizer, eval_batch_size=micro_batch_size, task=task,
                             num_labels=facts.num_labels or 2, full_finetune=full)
            plain = estimate(facts, x)
            checkpointed = estimate(facts, x.model_copy(update={"gradient_checkpointing": True}))
            fits = {}
            for budget in budgets_gib:
                limit = budget * fraction * GIB
                fits[budget] = ("yes" if plain.train_peak_bytes <= limit else "gradient checkpointing"
                                if checkpointed.train_peak_bytes <= limit else "no")
            rows.append({"model": name, "method": method, "parameters": facts.total_parameters,
                         "trainable_parameters": plain.trainable_parameters,
                         "train_peak_gib": round(plain.train_peak_bytes / GIB, 2),
                         "train_peak_gc_gib": round(checkpointed.train_peak_bytes / GIB, 2),
                         "eval_peak_gib": round(plain.eval_peak_bytes / GIB, 2), "fits": fits, "settings": settings})
    return rows


def format_size_guide(rows: list[dict[str, Any]]) -> list[str]:
    """`size_guide`'s rows as a text table: one line per model and method, a column per memory size ("yes", "gc":
    only with gradient checkpointing, "-": does not fit)."""
    if not rows:
        return []
    st = rows[0]["settings"]
    budgets = list(rows[0]["fits"])
    mark = {"yes": "yes", "gradient checkpointing": "gc", "no": "-"}
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"training peak by method: task {st['task']}, seq {st['seq_len']} x micro-batch {st['micro_batch_size']}, "
             f"{st['device']} {st['dtype']}, {st['optimizer']}, LoRA r={st['lora_r']}; a size fits when the peak is "
             f"at most {st['budget_fraction']:.0%} of it (gc: only with train.gradient_checkpointing)",
             f"{'model'.ljust(width)}  {'params':>8}  {'method':<6}  {'trained':>8}  {'peak GiB':>8}  {'gc GiB':>6}  "
             + "  ".join(f"{b:g} GiB".rjust(7) for b in budgets)]
    for r in rows:
        lines.append(f"{r['model'].ljust(width)}  {_count(r['parameters']):>8}  {r['method']:<6}  "
                     f"{_count(r['trainable_parameters']):>8}  {r['train_peak_gib']:>7.1f}  "
                     f"{r['train_peak_gc_gib']:>6.1f}  " + "  ".join(mark[r["fits"][b]].rjust(6) for b in budgets))
    return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
