"""Everything lorapipe knows about each task and each training backend, written once.

A task (`TaskSpec`) is what a run learns: its rows, its model class, the methods and metrics it allows, the config
values it sets where the config is silent and the options it refuses. The config reads it to check and complete a
config, the memory model to count the model (a vocabulary-wide lm_head, or a head of labels), the plan to refuse a
backend that cannot train it. The code that trains and scores a task is `lorapipe.tasks.<name>`.

A backend (`BackendSpec`) is what trains: the probe reads the packages to look for, the plan reads devices,
quantisation kinds, optimizers, optional features, tasks and training methods (and refuses what a backend lacks, or
passes it over for backend auto), `get_backend` checks names against it, the CLI prints the table and takes its
option choices from it.

Adding a task is a `TaskSpec` here and a module in `lorapipe/tasks/`; adding a supported option to a backend is adding
its name to one tuple here. No heavy imports: the config, the CLI and the cache key read this module without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

ModelKind = Literal["causal_lm", "sequence_classifier"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, as the config, the plan and the memory model read it."""

    name: str
    summary: str
    # the transformers Auto class it trains (AutoModelForCausalLM / AutoModelForSequenceClassification), and what the
    # memory model counts: logits over the vocabulary at every token, or over the labels
    model_kind: ModelKind
    # data.format values its rows are read as; `auto` means the first
    data_formats: tuple[str, ...]
    methods: tuple[str, ...]  # train.method values (lora covers QLoRA with train.quantization)
    metrics: tuple[str, ...]  # register.primary_metric values it can promote by; the first is the default
    best_model_metrics: tuple[str, ...]  # train.metric_for_best_model values early stopping may compare
    default_model_name: str  # register.model_name where the config gives none: a stage holder of one task only
    generates: bool  # evaluation generates text (KV cache, stop rate); the merged folder gets a generation config
    # the untuned base is scored in a step of its own, cached on (base model, test rows, evaluation settings), not on
    # the adapter: retraining with other hyperparameters does not score it again (a classifier's baselines are
    # trained on the run's own label set, so they stay in its evaluation)
    scores_base_apart: bool = False
    # config values set where the config is silent (dotted keys)
    defaults: dict[str, Any] = field(default_factory=dict)
    # train options it cannot honour: key -> why, and the fix
    refuses: dict[str, str] = field(default_factory=dict)
    # the trainer's evaluation figures the progress line and metrics.jsonl carry beside eval_loss
    progress_metrics: tuple[str, ...] = ()


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(
        name="sft", summary="instruction/chat fine-tuning of a causal LM: the loss on the assistant's tokens",
        model_kind="causal_lm", data_formats=("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"),
        methods=("lora",), metrics=("perplexity", "loss", "rouge_l", "exact_match", "bleu", "chrf", "stop_rate"),
        best_model_metrics=("eval_loss",), default_model_name="lorapipe-model", generates=True,
        scores_base_apart=True),
    TaskSpec(
        name="classification", summary="a label per text (or text pair): AutoModelForSequenceClassification, encoder "
                                       "or decoder",
        model_kind="sequence_classifier", data_formats=("classification",), methods=("lora", "full"),
        metrics=("macro_f1", "accuracy", "weighted_f1"),
        best_model_metrics=("macro_f1", "accuracy", "weighted_f1", "eval_loss"),
        default_model_name="lorapipe-classifier", generates=False, progress_metrics=("eval_accuracy", "eval_macro_f1"),
        # encoders name their projections query/key/value/dense: every linear layer, whatever the family
        defaults={"train.lora.target_modules": "all-linear", "train.metric_for_best_model": "macro_f1"},
        refuses={"train.packing": "joins rows into one sequence; a classifier needs one label per row: unset "
                                  "train.packing",
                 "train.init_adapter": "continues a causal-LM adapter; task: classification starts one with its "
                                       "head: unset train.init_adapter"}),
    TaskSpec(
        name="preference", summary="preference tuning of an SFT causal LM on chosen/rejected pairs (DPO, ORPO) or "
                                   "desirable/undesirable answers (KTO): train.method",
        model_kind="causal_lm",
        data_formats=("auto_preference", "preference", "sharegpt_preference", "alpaca_preference", "unpaired"),
        methods=("dpo", "kto", "orpo"),
        metrics=("preference_accuracy", "chosen_loss", "rouge_l", "stop_rate"),
        best_model_metrics=("eval_loss",), default_model_name="lorapipe-preference", generates=True,
        defaults={"train.method": "dpo"}, progress_metrics=("rewards/margins", "rewards/accuracies"),
        refuses={"train.packing": "joins rows into one sequence; a preference pair is two sequences compared with "
                                  "each other: unset train.packing",
                 "train.group_by_length": "groups rows by one length; a pair has two: unset train.group_by_length"}),
)}
# train options only some tasks read, with the value that means "off": set on another task, the config is refused
TASK_OPTIONS = {"train.class_weights": ("none", ("classification",))}
# the data formats of unpaired feedback (KTO's): DPO and ORPO need pairs
UNPAIRED_FORMATS = ("unpaired",)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task: {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


def tasks_with(attribute: str, value: str) -> list[str]:
    """The tasks whose `attribute` (a tuple: methods, metrics, data_formats, ...) holds `value`."""
    return [name for name, spec in TASKS.items() if value in getattr(spec, attribute)]


# train.* options that not every backend implements. Set on a backend whose `features` lacks them, preflight refuses
# the run naming the key, rather than ignoring it.
OPTIONAL_FEATURES = ("init_adapter", "eval_steps", "early_stopping_patience", "load_best_model_at_end", "packing",
                     "group_by_length")
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
    tasks: tuple[str, ...] = ("sft",)  # the TASKS it trains; preflight refuses the others with `limits_note`
    methods: tuple[str, ...] = ("lora",)  # the train.method values it implements (lora covers QLoRA)
    limits_note: Optional[str] = None  # why it lacks a task or method: said when the plan refuses it
    # train.method dpo: the train.preference.loss_type values it implements (None: every one TRL has) and whether
    # it honours label_smoothing (robust/conservative DPO)
    dpo_loss_types: Optional[tuple[str, ...]] = None
    dpo_label_smoothing: bool = True
    # DPO: the reference log-probabilities are always computed once before training (the policy at step 0 is the
    # reference), whatever train.preference.precompute_reference says
    reference_precomputed: bool = False
    # trains the embedding rows of tokens a built-in chat template adds to the vocabulary (PEFT's trainable tokens)
    trains_new_tokens: bool = False
    # task sft: the loss projects only the trained tokens through lm_head, this many at a time (TRL's chunked_nll:
    # `trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE`), so the vocabulary-wide logits never span the batch;
    # None: the model's own loss over every position's logits
    sft_loss_chunk_tokens: Optional[int] = None


# every value of the train options backends differ in: the config's choices; each backend lists those it honours
DEVICES = ("cpu", "cuda", "mps")
QUANTIZATIONS = ("none", "nf4", "int8")
OPTIMIZERS = ("adamw_torch", *BITSANDBYTES_OPTIMIZERS, "sgd")
LORA_BIAS = ("none", "all", "lora_only")

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(
        name="hf", summary="transformers + PEFT + TRL: CPU, CUDA, Apple MPS; QLoRA through bitsandbytes",
        modules=("torch", "transformers", "peft", "trl"), install="pip install -e .",
        devices=("cuda", "cpu", "mps"), auto_on=("cuda", "cpu"), quantization=QUANTIZATIONS,
        quantized_by="bitsandbytes", optimizers=OPTIMIZERS, lora_bias=LORA_BIAS, features=OPTIONAL_FEATURES,
        adapter_format="peft", data_parallel=True, tasks=("sft", "classification", "preference"),
        methods=("lora", "full", "dpo", "kto", "orpo"), sft_loss_chunk_tokens=256, trains_new_tokens=True),
    BackendSpec(
        name="unsloth", summary="Unsloth + TRL: fused kernels and 4-bit QLoRA on CUDA",
        modules=("torch", "transformers", "peft", "trl", "unsloth", "bitsandbytes"), install="pip install -e '.[cuda]'",
        devices=("cuda", "cpu"), auto_on=("cuda",), quantization=QUANTIZATIONS, quantized_by="bitsandbytes",
        optimizers=OPTIMIZERS, lora_bias=LORA_BIAS, features=(), adapter_format="peft",
        cpu_note="unsloth without CUDA trains through its slow CPU fallback",
        tasks=("sft", "preference"), methods=("lora", "dpo", "kto", "orpo"),
        limits_note="unsloth's FastLanguageModel trains causal LMs with LoRA only (no sequence-classification head, "
                    "no full fine-tuning)"),
    BackendSpec(
        name="mlx", summary="mlx-lm: Apple Silicon's unified memory (mlx[cpu] on Linux)",
        modules=("mlx", "mlx_lm"),
        install="pip install -e '.[mlx]'  (on Linux: pip install 'mlx[cpu]' mlx-lm mlx-lm-lora)",
        devices=("mps", "cpu"), auto_on=("mps",), quantization=QUANTIZATIONS, quantized_by="mlx",
        optimizers=("adamw_torch", "sgd"), lora_bias=("none",), features=(), adapter_format="mlx-lm",
        cpu_note="mlx off Apple Silicon runs on mlx's CPU backend",
        tasks=("sft", "preference"), methods=("lora", "dpo", "orpo"),
        dpo_loss_types=("sigmoid", "ipo", "hinge"), dpo_label_smoothing=False, reference_precomputed=True,
        limits_note="mlx-lm trains causal LMs with LoRA only (no sequence-classification head, no full fine-tuning); "
                    "its preference losses come from mlx-lm-lora, which has DPO (sigmoid, ipo, hinge) and ORPO but "
                    "no KTO"),
)}
# train.backend=auto: the first of these whose `auto_on` holds the machine's accelerator and whose packages are
# installed; the last is the fallback that always applies.
AUTO_PREFERENCE = ("unsloth", "mlx", "hf")


# the config's choices that the catalog decides (lorapipe.config builds its Literals from these; the CLI its options)
BACKEND_CHOICES = ("auto", *BACKENDS)
TASK_CHOICES = tuple(TASKS)
METHOD_CHOICES = tuple(dict.fromkeys(m for spec in TASKS.values() for m in spec.methods))
DATA_FORMAT_CHOICES = ("auto", *dict.fromkeys(f for spec in TASKS.values() for f in spec.data_formats if f != "auto"))
METRIC_CHOICES = tuple(dict.fromkeys(m for spec in TASKS.values() for m in spec.metrics))
BEST_MODEL_METRIC_CHOICES = tuple(dict.fromkeys(m for spec in TASKS.values() for m in spec.best_model_metrics))


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
        needed.append((spec.quantized_by, f"train.quantization={quantization}",
                       OPTIONAL_PACKAGE_INSTALL[spec.quantized_by]))
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
