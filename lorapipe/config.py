"""The run configuration: one typed model, validated once, with errors that name the key.

YAML < `--set dotted.key=value` overrides, both validated the same way. Cross-field checks live here,
not in the pipeline body.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorapipe.catalog import (
    BACKEND_CHOICES,
    BEST_MODEL_METRIC_CHOICES,
    DATA_FORMAT_CHOICES,
    DEVICES,
    LORA_BIAS,
    METHOD_CHOICES,
    METRIC_CHOICES,
    OPTIMIZERS,
    QUANTIZATIONS,
    TASK_CHOICES,
    TASK_OPTIONS,
    TASKS,
    tasks_with,
)


class ConfigError(ValueError):
    """A configuration problem (or several), each naming the key and what is allowed."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    # protected_namespaces=(): sections are named `model` and `register`, which pydantic would flag
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSection(_Section):
    name_or_path: str = Field(description="Hub id (e.g. meta-llama/Llama-3.1-8B-Instruct) or local folder")
    revision: Optional[str] = Field(None, description="Hub revision/commit; recorded with the adapter")
    trust_remote_code: bool = False
    chat_template: Optional[str] = Field(
        None, description="Jinja template (or path to one) used when the tokenizer ships none"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Switches the chat template reads (e.g. Qwen3's {enable_thinking: false}), "
                                          "passed alike to training, evaluation, predict and export, and saved with "
                                          "the adapter and the merged model")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = Field(
        None, description="null: transformers' default; flash_attention_2 needs the flash-attn package and a GPU"
    )
    registered_version: Optional[str] = Field(
        None, description="Set by lorapipe, not in a config: name_or_path named a registered version (MODEL:STAGE or "
                          "MODEL:VERSION), resolved to its merged model's folder; recorded on the new version")
    folder_fingerprint: Optional[str] = Field(
        None, description="Set by lorapipe, not in a config: for a local folder, a digest of its files' names, sizes "
                          "and modification times when the run was prepared, so the steps that read the model (and "
                          "their cache keys) see a changed folder as a changed model")


class DataSourceEntry(_Section):
    """One source of a mixture (`data.sources`): files or a named artifact, how many of its rows the mixture takes,
    and how its rows are read (unset keys are data's)."""

    path: Optional[str] = Field(None, description="A JSONL/JSON file or a glob pattern (expanded when the run starts)")
    artifact: Optional[str] = Field(None, description="A ZenML artifact's name: its latest version's rows")
    name: Optional[str] = Field(None, description="What the report and the model version call it (default: the path "
                                                  "or artifact)")
    weight: Optional[float] = Field(
        None, gt=0, description="Its share of the mixture, relative to the other sources' weights (give every source "
                                "a weight, or none). The mixture's size is data.mixture_rows, else the largest that "
                                "repeats no row")
    max_rows: Optional[int] = Field(None, ge=1, description="At most this many of its accepted rows")
    format: Optional[Literal[DATA_FORMAT_CHOICES]] = Field(  # type: ignore[valid-type]
        None, description="Its rows' format (default: data.format)")
    prompt_key: Optional[str] = None
    completion_key: Optional[str] = None

    @model_validator(mode="after")
    def _one_place(self) -> "DataSourceEntry":
        if bool(self.path) == bool(self.artifact):
            raise ValueError("a data.sources entry needs exactly one of path (a file or glob) and artifact (a name)")
        return self

    def label(self) -> str:
        return self.name or self.path or f"artifact {self.artifact}"


class DataSection(_Section):
    paths: list[str] = Field(
        default_factory=list,
        description="JSONL/JSON files or glob patterns (e.g. data/drops/*.jsonl), relative to the repo; "
                    "globs are expanded when the run starts, so a scheduled run reads the newest files")
    artifact: Optional[str] = Field(
        None, description="Name of a ZenML artifact whose latest version holds the rows (a list of dicts, "
                          "JSONL text or a JSONL file path); read when the run starts, instead of paths")
    format: Literal[DATA_FORMAT_CHOICES] = Field(  # type: ignore[valid-type]
        "auto", description="auto: detected per row for task sft; classification: rows of text (and an optional text "
                            "pair) with a label, what task: classification reads")
    sources: list[DataSourceEntry] = Field(
        default_factory=list, description="A weighted mixture: several sources, each with a weight (its share) or "
                                          "max_rows and its own format keys, sampled by the run's seed; instead of "
                                          "paths or artifact")
    mixture_rows: Optional[int] = Field(
        None, ge=1, description="data.sources with weights: the rows of the mixture (null: the largest that takes no "
                                "source's row twice)")
    reasoning: Literal["keep", "drop"] = Field(
        "keep", description="Reasoning traces of assistant turns (a reasoning_content field, or <think>...</think> "
                            "before the answer): keep trains them where the template renders them; drop trains the "
                            "answers alone")
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    text_key: str = Field("text", description="task: classification: the field holding the text to classify")
    text_pair_key: Optional[str] = Field(
        None, description="task: classification: a second text field, classified as a pair with text_key "
                          "(e.g. NLI premise/hypothesis, query/document)")
    label_key: str = Field("label", description="task: classification: the field holding the label (string or "
                                                "integer)")
    labels: Optional[Union[list[str], dict[str, str]]] = Field(
        None, description="task: classification: the label set, frozen in this order (ids 0..n-1), or a mapping "
                          "from the values in the rows to label names (e.g. {0: negative, 1: positive}); null: "
                          "inferred from the rows, sorted")

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, v: Any) -> Any:
        # YAML reads `{0: negative}` with integer keys and `[0, 1]` as integers: labels are compared as strings
        values = list(v.items()) if isinstance(v, dict) else v if isinstance(v, list) else []
        if any(isinstance(x, bool) for item in values for x in (item if isinstance(item, tuple) else (item,))):
            raise ValueError("YAML reads yes/no/true/false/on/off as booleans: quote the labels, e.g. ['yes', 'no']")
        if isinstance(v, dict):
            return {str(k): str(x) for k, x in v.items()}
        if isinstance(v, list):
            return [str(x) for x in v]
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if sum(map(bool, (self.paths, self.artifact, self.sources))) != 1:
            raise ValueError("data needs exactly one source: data.paths (files or globs), data.artifact (a name) or "
                             "data.sources (a mixture)")
        weighted = [bool(s.weight) for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("data.sources: give every source a weight (its share of the mixture), or none; without "
                             "weights each source gives all its rows, or max_rows of them: sources "
                             + ", ".join(s.label() for s in self.sources if not s.weight) + " have none")
        if self.mixture_rows is not None and not any(weighted):
            raise ValueError("data.mixture_rows sizes a weighted mixture: give data.sources weights, or unset it")
        labels = [s.label() for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError("data.sources names a source twice: give each a distinct name")
        if self.labels is not None:
            names = list(self.labels.values()) if isinstance(self.labels, dict) else self.labels
            if len(set(names)) < 2:
                raise ValueError("data.labels needs at least two distinct label names")
            if isinstance(self.labels, list) and len(set(names)) != len(names):
                raise ValueError("data.labels names a label twice")
        return self

    def label_names(self) -> Optional[list[str]]:
        """The frozen label order given in the config (ids 0..n-1), or None to infer it from the rows."""
        if self.labels is None:
            return None
        return list(dict.fromkeys(self.labels.values())) if isinstance(self.labels, dict) else list(self.labels)


class ValidationSection(_Section):
    on_bad_rows: Literal["fail", "quarantine"] = "fail"
    max_bad_fraction: float = Field(0.0, ge=0.0, le=1.0)
    overlength: Literal["drop", "truncate", "fail"] = "fail"
    min_rows: int = Field(10, ge=1)
    max_class_imbalance: float = Field(
        10.0, ge=1.0, description="task: classification: warn when the largest class has more than this many times "
                                  "the rows of the smallest (consider train.class_weights: balanced)")


class SplitSection(_Section):
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    salt: str = Field("lorapipe", description="Changes which rows land in which split, deterministically")
    group_key: Optional[str] = Field(None, description="Row field whose value keeps rows together in one split")
    stratify_key: Optional[str] = Field(None, description="Row field (a class label) to keep proportions per split")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitSection":
        if self.eval_fraction + self.test_fraction >= 0.9:
            raise ValueError("split.eval_fraction + split.test_fraction must leave at least 10% for training")
        return self


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: Literal[LORA_BIAS] = "none"  # type: ignore[valid-type]


class PreferenceSection(_Section):
    """task: preference: the settings of its methods (train.method: dpo | kto | orpo)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (DPO, KTO); ORPO's "
                                               "weight of the odds-ratio term")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                       "exo_pair", "bco_pair", "discopop", "aot", "aot_unpaired"] = Field(
        "sigmoid", description="DPO's loss (TRL's DPOConfig.loss_type): sigmoid is DPO's own, ipo IPO, hinge SLiC, ...")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="DPO: the share of pairs assumed mislabelled "
                                                                      "(robust / conservative DPO)")
    precompute_reference: bool = Field(
        False, description="Compute the reference model's log-probabilities once before training, instead of a "
                           "forward without gradients each step (DPO, KTO)")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: the loss weight of desirable answers")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: the loss weight of undesirable answers")


class TrainSection(_Section):
    backend: Literal[BACKEND_CHOICES] = "auto"  # type: ignore[valid-type]
    device: Literal[("auto", *DEVICES)] = Field(  # type: ignore[valid-type]
        "auto", description="mps: Apple's GPU (torch MPS or mlx)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal[QUANTIZATIONS] = Field(  # type: ignore[valid-type]
        "none", description="QLoRA = LoRA + this; nf4 uses double quantisation"
    )
    max_seq_length: int = Field(1024, ge=16)
    micro_batch_size: Union[int, Literal["auto"]] = "auto"
    max_micro_batch_size: int = Field(8, ge=1)
    effective_batch_size: int = Field(16, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs`")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal[OPTIMIZERS] = "adamw_torch"  # type: ignore[valid-type]
    gradient_checkpointing: bool = False
    profile: Optional[Literal["conservative", "balanced", "quality"]] = Field(
        None, description="Memory profile: the plan chooses quantization, gradient_checkpointing, optimizer, the "
                          "micro-batch and evaluate.batch_size where the config leaves them unset, to fit with a "
                          "margin (25%, 15%, 10%); null: the config's values as given")
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(200, ge=1)
    save_total_limit: int = Field(2, ge=1)
    resume: bool = Field(True, description="Resume from the last checkpoint of the same training inputs and code")
    resume_from: Optional[str] = Field(
        None, description="Resume from this checkpoint folder on purpose, e.g. one set aside after a code change")
    init_adapter: Optional[str] = Field(
        None, description="Continue training an existing adapter folder on new data (no new LoRA layers)")
    eval_steps: Optional[int] = Field(None, ge=1, description="Evaluate on the eval split every N steps; null: never")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after N evaluations without improvement (needs eval_steps)")
    load_best_model_at_end: bool = Field(False,
                                         description="Keep the checkpoint with the best eval loss (needs eval_steps)")
    group_by_length: bool = Field(False, description="Batch rows of similar length together: less padding")
    packing: bool = Field(False, description="Padding-free packing of rows, without attention across rows")
    output_root: str = Field("runs", description="Working folder for checkpoints (not the artifact store)")
    processes: Union[int, Literal["auto"]] = Field(
        "auto", description="Data-parallel training processes. auto: one per CUDA GPU (hf backend), else 1; "
                            "an integer > 1 on the CPU trains with gloo (slow; for testing the launch)")
    lora: LoraSection = Field(default_factory=LoraSection)
    method: Literal[METHOD_CHOICES] = Field(  # type: ignore[valid-type]
        "lora", description="lora (QLoRA with train.quantization); full: every weight trained, for small encoder "
                            "classifiers (task: classification); dpo | kto | orpo: task: preference (LoRA, QLoRA "
                            "with train.quantization)")
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    metric_for_best_model: Optional[Literal[BEST_MODEL_METRIC_CHOICES]] = Field(  # type: ignore[valid-type]
        None, description="What early stopping and load_best_model_at_end compare; null: eval_loss, or macro_f1 for "
                          "task: classification")
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="An evaluation improves on the best only by more than this (absolute)")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="task: classification: balanced weighs each class's loss by n_rows / (n_classes x "
                            "class rows) of the training split, for imbalanced labels")
    head_only_baseline: bool = Field(
        True, description="task: classification: also train the classifier head alone on the frozen base (same "
                          "schedule): the untuned baseline evaluation compares the fine-tune with (skipped with "
                          "train.quantization, where the majority class is)")

    @model_validator(mode="after")
    def _cross(self) -> "TrainSection":
        if isinstance(self.processes, int) and self.processes < 1:
            raise ValueError("train.processes must be 'auto' or an integer >= 1")
        if isinstance(self.micro_batch_size, int) and self.micro_batch_size < 1:
            raise ValueError("train.micro_batch_size must be 'auto' or an integer >= 1")
        if (self.early_stopping_patience or self.load_best_model_at_end) and not self.eval_steps:
            raise ValueError("train.early_stopping_patience and train.load_best_model_at_end need train.eval_steps")
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise ValueError("train.load_best_model_at_end needs train.save_steps to be a multiple of train.eval_steps")
        if self.resume_from is not None and not self.resume:
            raise ValueError("train.resume_from resumes a checkpoint and train.resume: false starts over: set one")
        if self.packing and self.group_by_length:
            raise ValueError("train.packing and train.group_by_length are alternatives: set one")
        return self


class EvaluateSection(_Section):
    max_samples: int = Field(64, ge=1, description="Test rows scored for loss/perplexity")
    generation_samples: int = Field(8, ge=0, description="Test rows generated for ROUGE-L and the stop rate")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(4, ge=1)
    generation_metrics: list[Literal["exact_match", "rouge_l", "bleu", "chrf"]] = Field(
        default_factory=lambda: ["exact_match", "rouge_l", "bleu", "chrf"],
        description="Scores of the greedy generations against the reference (rouge-score, sacrebleu); "
                    "perplexity and the learned-to-stop rate are always measured")


class MergeSection(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    check_samples: int = Field(4, ge=1, description="Rows whose logits are compared, merged vs base+adapter")
    logits_atol: Optional[float] = Field(None, gt=0, description="null: by dtype (f32 1e-4, f16/bf16 scaled)")
    max_shard_size: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)$",
                                description="Largest safetensors shard of the merged model, e.g. 2GB, 500MB")
    parity_samples: int = Field(4, ge=0, description="Test prompts answered greedily by base+adapter and by the merged "
                                                     "model as served (its own tokenizer and template); answers that "
                                                     "part ways beyond a near tie keep the version from promotion. "
                                                     "0: no parity check")
    parity_max_new_tokens: int = Field(16, ge=1, description="Tokens generated per parity prompt")


class PreflightSection(_Section):
    probe: bool = Field(False, description="Before training, run 3 real training steps and one evaluation batch at "
                                           "the planned sizes and set their measured peaks beside the predicted ones")


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

def shard_bytes(size: str) -> int:
    """'2GB' -> 2_000_000_000, '1.5 GiB' -> 1610612736 (transformers' own parser takes integers only)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, flags=re.I)
    if not match:
        raise ValueError(f"merge.max_shard_size: {size!r} is not a size like 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


class RegisterSection(_Section):
    model_name: str = Field("lorapipe-model", min_length=1)
    stage_if_better: Literal["staging", "production", "none"] = Field(
        "staging", description="The stage a version earns by beating the base and that stage's current holder")
    primary_metric: Literal[METRIC_CHOICES] = Field(  # type: ignore[valid-type]
        "perplexity", description="The metric promotion compares (lower is better for perplexity and loss); "
                                  "task: classification defaults to macro_f1")
    margin: float = Field(0.0, ge=0.0, description="Relative improvement of the primary metric over the base and "
                                                   "over the stage's holder needed to promote, e.g. 0.02 = 2%")
    min_stop_rate: float = Field(0.0, ge=0.0, le=1.0,
                                 description="Share of the tuned model's generations that must end on an end token")


# `register` shadows ABCMeta.register on the class, never on instances: the warning is noise.
warnings.filterwarnings("ignore", message='Field name "register"')


class LorapipeConfig(_Section):
    seed: int = 42
    task: Literal[TASK_CHOICES] = Field(  # type: ignore[valid-type]
        "sft", description="; ".join(f"{name}: {spec.summary}" for name, spec in TASKS.items()))
    model: ModelSection
    data: DataSection
    validation: ValidationSection = Field(default_factory=ValidationSection)
    split: SplitSection = Field(default_factory=SplitSection)
    preflight: PreflightSection = Field(default_factory=PreflightSection)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    register: RegisterSection = Field(default_factory=RegisterSection)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v < 0:
            raise ValueError("seed must be >= 0")
        return v

    @model_validator(mode="after")
    def _task(self) -> "LorapipeConfig":
        """The keys that belong to a task, checked against the task's catalog entry (lorapipe.catalog.TASKS), and
        the task's defaults where the config is silent. Every problem is collected."""
        spec, problems = TASKS[self.task], []
        t, r, d = self.train, self.register, self.data

        def needs(key: str, value: Any, attribute: str) -> str:
            others = [name for name in tasks_with(attribute, value) if name != self.task]
            return (f"{key}={value} needs task: {' or '.join(others)}" if others else f"{key}={value} is no task's") + (
                f"; task {self.task} allows {', '.join(getattr(spec, attribute))}")

        if d.format == "auto":
            d.format = spec.data_formats[0]
        elif d.format not in spec.data_formats:
            problems.append(needs("data.format", d.format, "data_formats") + ": set data.format: auto")
        for i, source in enumerate(d.sources):
            if source.format == "auto":
                source.format = spec.data_formats[0]
            elif source.format is not None and source.format not in spec.data_formats:
                problems.append(needs(f"data.sources[{i}].format", source.format, "data_formats"))
        if "primary_metric" not in r.model_fields_set:
            r.primary_metric = spec.metrics[0]
        elif r.primary_metric not in spec.metrics:
            problems.append(needs("register.primary_metric", r.primary_metric, "metrics"))
        if "model_name" not in r.model_fields_set:  # not another task's default: a stage holder of one task only
            r.model_name = spec.default_model_name
        for key, value in spec.defaults.items():
            *path, name = key.split(".")
            owner = self
            for part in path:
                owner = getattr(owner, part)
            if name not in owner.model_fields_set:
                setattr(owner, name, value)
        if t.method not in spec.methods:  # after the task's defaults: a preference task's method is dpo by default
            problems.append(needs("train.method", t.method, "methods") + f": set train.method: {spec.methods[0]}")
        if t.preference.model_fields_set and self.task != "preference":
            problems.append(f"train.preference ({', '.join(sorted(t.preference.model_fields_set))}) needs task: "
                            "preference")
        if self.task == "preference" and t.method != "dpo" and "loss_type" in t.preference.model_fields_set:
            problems.append(f"train.preference.loss_type chooses DPO's loss (sigmoid, ipo, ...); train.method: "
                            f"{t.method} has its own: unset it, or set train.method: dpo")
        if t.metric_for_best_model not in (None, *spec.best_model_metrics):
            problems.append(needs("train.metric_for_best_model", t.metric_for_best_model, "best_model_metrics"))
        for key, why in spec.refuses.items():
            if getattr(t, key.split(".", 1)[1]) not in (None, False):
                problems.append(f"{key} {why}")
        if t.method == "full" and t.quantization != "none":  # not the task's: collected with its problems all the same
            problems.append(f"train.method: full trains every weight, which train.quantization={t.quantization} "
                            "freezes in 4/8 bit: set train.quantization: none, or train.method: lora (QLoRA)")
        for key, (off, tasks) in TASK_OPTIONS.items():
            if self.task not in tasks and getattr(t, key.split(".", 1)[1]) != off:
                problems.append(f"{key}={getattr(t, key.split('.', 1)[1])} needs task: {' or '.join(tasks)}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolve_paths(self, base_dir: Path) -> "LorapipeConfig":
        """Make relative data/model paths absolute against `base_dir` (the repo or the config's folder)."""
        out = self.model_copy(deep=True)
        out.data.paths = [str((base_dir / p).resolve()) if not Path(p).is_absolute() else p for p in self.data.paths]
        for source in out.data.sources:
            if source.path and not Path(source.path).is_absolute():
                source.name = source.label()  # the name as written, not the machine's absolute path
                source.path = str((base_dir / source.path).resolve())
        local = base_dir / self.model.name_or_path
        if not Path(self.model.name_or_path).is_absolute() and local.exists():
            out.model.name_or_path = str(local.resolve())
        out.train.output_root = str((base_dir / self.train.output_root).resolve())
        if self.train.resume_from is not None:
            out.train.resume_from = str((base_dir / self.train.resume_from).resolve())
        return out

    def fingerprint(self) -> str:
        """sha256 of the canonical config, the part of the model version's name that is not data."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    cur: Any = model
    for part in loc[:-1]:
        field = cur.model_fields.get(part) if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cur is None:
            return []
    return sorted(cur.model_fields) if cur is not None else []


def _explain(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(LorapipeConfig, loc)
            problems.append(f"unknown key '{key}'; allowed keys here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            problems.append(f"missing required key '{key}'")
        elif not loc:  # a cross-section check: each of its problems on a line of its own, without the whole config
            problems.extend(e["msg"].replace("Value error, ", "").splitlines())
        else:
            msg = e["msg"].replace("Value error, ", "")
            problems.append(f"'{key}': {msg} (got {e.get('input')!r})")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"override '{text}' must look like dotted.key=value, e.g. train.epochs=2"], "--set")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        cur = data
        for k in keys[:-1]:
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError([f"override '{text}': '{k}' is a value, not a section"], "--set")
            cur = nxt
        cur[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> LorapipeConfig:
    """Read, override and validate a YAML config; every problem is collected and raised once."""
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections (model, data, train, ...)"], str(path))
    data = apply_overrides(data, overrides or [])
    return validate_config(data, str(path))


def validate_config(data: dict, source: str = "config") -> LorapipeConfig:
    try:
        return LorapipeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err), source) from None
