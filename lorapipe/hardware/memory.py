"""The memory model: what training, evaluation and merge of a LoRA/QLoRA (or, for a classifier, full) fine-tune
hold, term by term, from the model's `config.json` alone (no weights are read).

`model_facts` reads the config (a local folder, or the hub cache / hub where reachable) and counts parameters per
module kind and the shape of every linear layer LoRA can wrap (GQA makes k/v smaller than q). `estimate` turns
facts and settings (`MemoryInputs`) into the peak of each phase with the terms that make it up. `task:
classification` counts the model as a sequence classifier (a head of `num_labels` in place of the vocabulary-wide
lm_head) and adds encoders (BERT-like layers) and full fine-tuning to the terms. Every term is
documented in docs/MEMORY.md with its formula and where its constants come from; the constants below were counted
with torch's saved-tensor hooks on transformers' Llama layers and measured against real training on this project's
CI machine (bench/memory_accuracy.py).

Plain Python over pydantic: transformers is imported only to read a config, torch only for `count_on_meta`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

GIB = 2**30
# Llama-family architectures whose parameters are counted from the config by formula (the same decoder layer:
# q/k/v/o attention with GQA, a gated MLP, RMSNorms). Any other model_type is counted on the meta device.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "deepseek", "yi",
              "internlm2"}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# The projections that read a layer's (normalised) input: one saved tensor feeds all three. Encoders name them
# query/key/value (BERT, RoBERTa, ELECTRA) or q_lin/k_lin/v_lin (DistilBERT).
QKV_MODULES = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q_lin", "k_lin", "v_lin")
# The modules PEFT keeps a trainable copy of for a sequence classifier (modules_to_save; peft's SEQ_CLS_HEAD_NAMES),
# and what else counts as the head (BERT's pooler).
CLASSIFIER_HEADS = ("score", "classifier")
HEAD_MODULES = (*CLASSIFIER_HEADS, "pooler")

# Bytes per weight of a quantised linear layer (bitsandbytes): NF4 packs two 4-bit codes a byte plus one absmax per
# block of 64 weights, fp32 (4/64 B) or, double-quantised, 8-bit (1/64 B) with an fp32 scale per 256 blocks;
# LLM.int8 stores one byte plus one fp32 scale per output row (counted with the row's width).
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# mlx-lm's 4-bit affine quantisation: group size 64 with a 16-bit scale and bias per group.
MLX_4BIT_BYTES = 0.5 + 2 * 2 / 64
INT8_BYTES = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state per trainable parameter: two fp32 moments (AdamW), two 8-bit moments with block scales
# (bitsandbytes 8-bit AdamW), none for plain SGD (transformers' default momentum is 0).
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8.0, "paged_adamw_32bit": 8.0, "adamw_8bit": 2.0 + 8 / 256,
                         "paged_adamw_8bit": 2.0 + 8 / 256, "sgd": 0.0}

# Measured constants (see docs/MEMORY.md for how each was obtained).
# Resident set of the training process besides the model: Python, torch, transformers, peft, trl, datasets, the
# tokenizer and the trainer's bookkeeping (0.51 GiB after the imports alone, measured on torch 2.13 CPU).
CPU_PROCESS_BYTES = int(0.69 * GIB)
# Of that, the imports alone (torch, transformers, peft, trl): what a phase's process already holds when it runs
# inside a longer-lived process (a pipeline step), where the resident memory at the phase's start replaces it.
CPU_IMPORTS_BYTES = int(0.51 * GIB)
# The evaluation and merge phases need torch, transformers and peft (no trl training state).
CPU_EVAL_PROCESS_BYTES = int(0.53 * GIB)
# CUDA context and kernels (outside torch's allocator), and the allocator's fragmentation over what it hands out.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
CUDA_ALLOCATOR_OVERHEAD = 0.10
# fp32 copies of the vocabulary-wide logits alive at the loss's peak, per token: the fp32 logits, log_softmax's saved
# output and, in backward, their gradients, not all at once (the 16-bit logits are counted apart). Fitted on this
# CPU between a run where activations dominate (2.75 measured) and one where logits do (2.34): docs/MEMORY.md.
LOGITS_FP32_COPIES = 2.5


class LinearShape(BaseModel):
    name: str
    in_features: int
    out_features: int
    kind: Literal["attention", "mlp", "other"]


class ModelFacts(BaseModel):
    """A model's sizes from its config: parameter counts per module kind and one layer's linear shapes. `task`:
    counted as a causal LM (sft) or as a sequence classifier (a `head` bucket in place of `lm_head`)."""

    source: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    parameter_counts: dict[str, int]  # embeddings, attention, mlp, norms, lm_head (0 when tied) or head (classifier)
    linears: list[LinearShape]  # one layer's linear modules
    counted: Literal["formula", "meta"] = "formula"
    task: Literal["sft", "classification"] = "sft"
    num_labels: Optional[int] = None  # classification: the head's outputs
    # decoder: the Llama-family layer's activation formula (any decoder is counted with it, with its own shapes);
    # encoder: a BERT-like layer (post-LayerNorm, GELU MLP, query/key/value, dropout)
    block: Literal["decoder", "encoder"] = "decoder"
    classifier_parameters: int = 0  # classification: the head PEFT trains a copy of (classifier / score)
    hidden_dropout: float = 0.0  # encoders: dropout on the hidden states (its masks are saved)
    attention_dropout: float = 0.0  # encoders: dropout on the attention probabilities

    @property
    def total_parameters(self) -> int:
        return sum(self.parameter_counts.values())

    @property
    def layer_linear_parameters(self) -> int:
        """Weights of the decoder layers' linear modules: what quantisation compresses."""
        return self.layers * sum(s.in_features * s.out_features for s in self.linears)


class ModelFactsError(RuntimeError):
    """The model's config could not be read (no such folder, no hub, not a causal LM or classifier): one line."""


def read_config(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """The model's transformers config from a local folder, the hub cache, or the hub where reachable."""
    import os

    from transformers import AutoConfig

    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ModelFactsError(f"{name_or_path}: no readable config.json in this folder (a model folder holds the "
                              "config.json that save_pretrained writes)")
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if os.path.isdir(name_or_path):
            raise ModelFactsError(f"{name_or_path}: no readable config.json in this folder ({exc.__class__.__name__})"
                                  ) from None
        raise ModelFactsError(
            f"{name_or_path}: its config.json is not in the Hugging Face cache and the hub could not be reached (or "
            "the id does not exist / is gated): download it once with `hf download "
            f"{name_or_path} config.json`, or give a local folder") from None
    except ValueError as exc:
        raise ModelFactsError(f"{name_or_path}: {exc}".splitlines()[0]) from None


def facts_from_config(cfg: Any, source: str = "config", task: str = "sft", num_labels: int = 2) -> ModelFacts:
    """Counts by formula for Llama-family configs; any other architecture is built on the meta device and counted.
    `task: classification` counts the sequence classifier (`AutoModelForSequenceClassification`, `num_labels`
    outputs): for Llama-family models a `score` head of hidden x labels in place of lm_head."""
    if getattr(cfg, "model_type", None) not in LLAMA_LIKE or getattr(cfg, "num_local_experts", None):
        return count_on_meta(cfg, source, task=task, num_labels=num_labels)
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    inter = cfg.intermediate_size
    q_out, kv_out = heads * d, kv * d
    linears = [LinearShape(name="q_proj", in_features=h, out_features=q_out, kind="attention"),
               LinearShape(name="k_proj", in_features=h, out_features=kv_out, kind="attention"),
               LinearShape(name="v_proj", in_features=h, out_features=kv_out, kind="attention"),
               LinearShape(name="o_proj", in_features=q_out, out_features=h, kind="attention"),
               LinearShape(name="gate_proj", in_features=h, out_features=inter, kind="mlp"),
               LinearShape(name="up_proj", in_features=h, out_features=inter, kind="mlp"),
               LinearShape(name="down_proj", in_features=inter, out_features=h, kind="mlp")]
    attn_bias = (q_out + 2 * kv_out) if getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2" else 0
    attn_bias += h if getattr(cfg, "attention_bias", False) and cfg.model_type != "qwen2" else 0
    mlp_bias = (2 * inter + h) if getattr(cfg, "mlp_bias", False) else 0
    qk_norm = 2 * d if cfg.model_type == "qwen3" else 0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts = {
        "embeddings": V * h,
        "attention": L * (sum(s.in_features * s.out_features for s in linears[:4]) + attn_bias),
        "mlp": L * (sum(s.in_features * s.out_features for s in linears[4:]) + mlp_bias),
        "norms": L * (2 * h + qk_norm) + h,
        "lm_head": 0 if tied else V * h,
    }
    if task == "classification":
        # LlamaForSequenceClassification (and its kin): a bias-free `score` linear, hidden -> labels, read at the last
        # token; no lm_head, tied or not
        del counts["lm_head"]
        counts["head"] = h * num_labels
        return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=V, hidden_size=h,
                          intermediate_size=inter, layers=L, heads=heads, kv_heads=kv, head_dim=d,
                          tied_embeddings=False, parameter_counts=counts, linears=linears, task="classification",
                          num_labels=num_labels, classifier_parameters=h * num_labels)
    return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=V, hidden_size=h, intermediate_size=inter,
                      layers=L, heads=heads, kv_heads=kv, head_dim=d, tied_embeddings=tied, parameter_counts=counts,
                      linears=linears)


def count_on_meta(cfg: Any, source: str = "config", task: str = "sft", num_labels: int = 2) -> ModelFacts:
    """Build the model on the meta device (no memory, no weights) and count its parameters per module kind: the
    causal LM (task sft) or the sequence classifier with `num_labels` outputs (task classification: any
    architecture transformers has one for, encoders such as BERT included; its classifier, score and pooler are
    counted as `head`)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifying = task == "classification"
    try:
        with torch.device("meta"):
            if classifying:
                cfg = copy.deepcopy(cfg)
                cfg.num_labels = num_labels  # sets id2label/label2id to match
                model = AutoModelForSequenceClassification.from_config(cfg)
            else:
                model = AutoModelForCausalLM.from_config(cfg)
    except ValueError as exc:
        what = "sequence classifier" if classifying else "causal language model"
        raise ModelFactsError(f"{source}: not a {what} transformers can build "
                              f"({str(exc).splitlines()[0]})") from None
    counts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "head" if classifying else "lm_head": 0}
    heads_of = {name: getattr(model, name) for name in HEAD_MODULES
                if classifying and isinstance(getattr(model, name, None), torch.nn.Module)}
    # the head is an attribute of the classifier itself, except BERT's pooler, which lives in the base model
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if classifying and isinstance(getattr(base, "pooler", None), torch.nn.Module):
        heads_of.setdefault("pooler", base.pooler)
    head_ids = {id(p) for m in heads_of.values() for p in m.parameters()}
    seen: set[int] = set()
    out_emb = model.get_output_embeddings()
    in_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    # a tied head shares the input embeddings' weight: counted once, as embeddings
    out_ids = {id(p) for p in out_emb.parameters()} - in_ids if out_emb is not None else set()
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            lname = mod_name.lower()
            if id(p) in head_ids:
                kind = "head"
            elif id(p) in out_ids:
                kind = "lm_head"
            elif isinstance(module, torch.nn.Embedding):
                kind = "embeddings"
            elif "norm" in type(module).__name__.lower() or "ln" in lname.rsplit(".", 1)[-1]:
                kind = "norms"
            elif any(k in lname for k in ("attn", "attention")):
                kind = "attention"
            else:
                kind = "mlp"
            counts[kind] += p.numel()
    cfg_dict = cfg.to_dict()
    h = cfg_dict.get("hidden_size") or cfg_dict.get("n_embd") or cfg_dict.get("d_model")
    L = cfg_dict.get("num_hidden_layers") or cfg_dict.get("n_layer") or cfg_dict.get("num_layers")
    if not h or not L:
        raise ModelFactsError(f"{source}: the config names no hidden size or layer count lorapipe can read "
                              "(hidden_size / n_embd / d_model, num_hidden_layers / n_layer / num_layers)")
    heads = cfg_dict.get("num_attention_heads") or cfg_dict.get("n_head") or 1
    kv = cfg_dict.get("num_key_value_heads") or heads
    layer0 = _first_layer(model)
    found = []
    for name, module in (layer0.named_modules() if layer0 is not None else []):
        shape = _linear_shape(module)
        if shape is not None:
            kind = "attention" if any(k in name.lower() for k in ("attn", "attention")) else "mlp"
            found.append((name, shape, kind))
    # PEFT matches target_modules by the name's last part: the leaf names it, unless two linears of the layer share
    # it (BERT's three `dense`, GPT-2's two `c_proj`), which are then named by their path in the layer
    leaves = [name.rsplit(".", 1)[-1] for name, _, _ in found]
    linears = [LinearShape(name=leaf if leaves.count(leaf) == 1 else name, in_features=shape[0],
                           out_features=shape[1], kind=kind) for leaf, (name, shape, kind) in zip(leaves, found)]
    inter = max((s.out_features for s in linears if s.kind == "mlp"), default=4 * h)
    tied = out_emb is not None and any(id(p) in in_ids for p in out_emb.parameters())
    encoder = (layer0 is not None and any(isinstance(m, torch.nn.LayerNorm) for m in layer0.modules())
               and sum(leaf in QKV_MODULES for leaf in leaves) == 3 and not cfg_dict.get("is_decoder"))
    extra: dict[str, Any] = {}
    if classifying:
        extra = {"task": "classification", "num_labels": num_labels,
                 "classifier_parameters": sum(p.numel() for name in CLASSIFIER_HEADS if name in heads_of
                                              for p in heads_of[name].parameters())}
    if encoder:
        extra.update(block="encoder",
                     hidden_dropout=float(cfg_dict.get("hidden_dropout_prob", cfg_dict.get("dropout")) or 0.0),
                     attention_dropout=float(cfg_dict.get("attention_probs_dropout_prob",
                                                          cfg_dict.get("attention_dropout")) or 0.0))
    return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=h,
                      intermediate_size=inter, layers=L, heads=heads, kv_heads=kv,
                      head_dim=cfg_dict.get("head_dim") or h // heads, tied_embeddings=bool(tied),
                      parameter_counts=counts, linears=linears, counted="meta", **extra)


def _first_layer(model: Any) -> Any:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module[0]
    return None


def _linear_shape(module: Any) -> Optional[tuple[int, int]]:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def model_facts(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                task: str = "sft", num_labels: int = 2) -> ModelFacts:
    """The model's facts from its config alone: a local folder, or a hub id read from the cache or the hub. `task:
    classification` counts it as a sequence classifier with `num_labels` outputs."""
    cfg = read_config(name_or_path, revision, trust_remote_code)
    return facts_from_config(cfg, source=name_or_path, task=task, num_labels=num_labels)


def load_test(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
              task: str = "sft", num_labels: int = 2) -> tuple[ModelFacts, ModelFacts]:
    """(by formula, counted on the meta device): `estimate-memory --load-test` checks that the two agree."""
    cfg = read_config(name_or_path, revision, trust_remote_code)
    return (facts_from_config(cfg, name_or_path, task=task, num_labels=num_labels),
            count_on_meta(cfg, name_or_path, task=task, num_labels=num_labels))


# ------------------------------------------------------------------------------------------------- the estimate
class MemoryInputs(BaseModel):
    """The settings memory depends on. `device` decides the overhead terms; `backend` how weights are held."""

    device: Literal["cpu", "cuda", "mps"] = "cpu"
    backend: Literal["hf", "unsloth", "mlx"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "nf4", "int8"] = "none"
    double_quant: bool = True
    micro_batch_size: int = Field(1, ge=1)
    seq_len: int = Field(1024, ge=1)
    lora_r: int = Field(16, ge=1)
    lora_targets: Union[list[str], Literal["all-linear", "attention"]] = "all-linear"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch"
    attn_implementation: Optional[str] = None  # None: transformers' default (sdpa)
    eval_batch_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=0)
    merge_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_shard_bytes: int = 2_000_000_000  # merge.max_shard_size
    loss_chunks: int = Field(1, ge=1)  # >1: the fp32 loss is computed in chunks (torchtune's CEWithChunkedOutputLoss)
    eval_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # None: float32 on CPU, else dtype
    task: Literal["sft", "classification"] = "sft"  # classification: needs facts counted with the same task
    num_labels: int = Field(2, ge=1)  # classification: the logits per row
    # train.method: full: every parameter trained, from fp32 weights (16-bit dtypes compute under autocast); no
    # LoRA, no quantisation
    full_finetune: bool = False


class MemoryTerm(BaseModel):
    phase: Literal["train", "eval", "merge"]
    name: str
    bytes: int
    formula: str


class MemoryEstimate(BaseModel):
    """Peaks per phase (GiB, as the plan reports them) and the terms that make them up (bytes).

    On CUDA a phase's peak is what one GPU holds (torch's allocations plus the allocator's overhead and the CUDA
    context); on the CPU and on Apple Silicon, the resident memory of the process."""

    weights_gb: float
    lora_and_optimizer_gb: float
    activations_gb: float
    total_gb: float  # the training peak
    budget_gb: float
    eval_peak_gb: Optional[float] = None  # None in a training plan: it carries the training phase only
    merge_peak_gb: Optional[float] = None
    terms: list[MemoryTerm] = Field(default_factory=list)
    trainable_parameters: int = 0

    def training_only(self) -> "MemoryEstimate":
        """The training phase alone: what the training plan carries, so that an evaluation or merge setting does
        not change the training plan's content (and so the cached training)."""
        return self.model_copy(update={"terms": [t for t in self.terms if t.phase == "train"],
                                       "eval_peak_gb": None, "merge_peak_gb": None})

    def phase_terms(self, phase: str) -> list[MemoryTerm]:
        return [t for t in self.terms if t.phase == phase]

    @property
    def train_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.phase == "train")

    @property
    def eval_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.phase == "eval")

    @property
    def merge_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.phase == "merge")

    def as_json(self) -> dict[str, Any]:
        """The estimator's JSON: peaks in bytes, each phase's terms, the budget."""
        out: dict[str, Any] = {"train_peak_bytes": self.train_peak_bytes, "eval_peak_bytes": self.eval_peak_bytes,
                               "merge_peak_bytes": self.merge_peak_bytes,
                               "budget_bytes": int(self.budget_gb * GIB), "trainable_parameters":
                                   self.trainable_parameters, "terms": {}}
        for t in self.terms:
            out["terms"].setdefault(t.phase, {})[t.name] = {"bytes": t.bytes, "formula": t.formula}
        return out


def target_shapes(facts: ModelFacts, targets: Union[list[str], str]) -> list[LinearShape]:
    """The linear modules of one layer LoRA wraps: PEFT's all-linear (every linear but the output head), the
    attention projections, or the names given."""
    if targets == "all-linear":
        return list(facts.linears)
    if targets == "attention":
        return [s for s in facts.linears if s.kind == "attention"]
    wanted = set(targets)
    # PEFT matches a name or the end of a module's path (`dense` wraps BERT's three dense layers)
    return [s for s in facts.linears if s.name in wanted or s.name.rsplit(".", 1)[-1] in wanted]


def lora_parameters(facts: ModelFacts, r: int, targets: Union[list[str], str]) -> int:
    """A (in x r) and B (r x out) per wrapped module per layer."""
    return facts.layers * sum(r * (s.in_features + s.out_features) for s in target_shapes(facts, targets))


def _weights_terms(facts: ModelFacts, x: MemoryInputs) -> tuple[list[tuple[str, int, str]], int]:
    """Base weights by precision; returns the terms and the largest linear weight (dequantised on the fly)."""
    a = DTYPE_BYTES[x.dtype]
    linear = facts.layer_linear_parameters
    other = facts.total_parameters - linear
    largest = max((s.in_features * s.out_features for s in facts.linears), default=0)
    if x.quantization == "none":
        return [("base weights", linear * a + other * a,
                 f"{facts.total_parameters:,} parameters x {a} B ({x.dtype})")], 0
    if x.backend == "mlx":
        per, label = (MLX_4BIT_BYTES, "mlx 4-bit, group 64") if x.quantization == "nf4" else (
            1 + 4 / 64, "mlx 8-bit, group 64")
    elif x.quantization == "nf4":
        per = NF4_DOUBLE_QUANT_BYTES if x.double_quant else NF4_BYTES
        label = "NF4" + (" double-quantised" if x.double_quant else "")
    else:
        per, label = INT8_BYTES + 4 / max(1, facts.hidden_size), "int8 + fp32 row scales"
    # embeddings, norms and the output head stay unquantised; peft's prepare_model_for_kbit_training (hf backend)
    # casts them to fp32 for stable training, unsloth and mlx keep them 16-bit
    keep = 4 if x.backend == "hf" else a
    terms = [("base weights (quantised linear layers)", int(linear * per),
              f"{linear:,} layer weights x {per:.4f} B ({label})"),
             ("base weights (embeddings, norms, lm_head)", other * keep,
              f"{other:,} parameters x {keep} B ({'fp32 after prepare_model_for_kbit_training' if keep == 4 else x.dtype})")]
    return terms, largest * a


def _activation_bytes_per_token_layer(facts: ModelFacts, x: MemoryInputs) -> tuple[int, str]:
    """Bytes autograd saves per token in one decoder layer (transformers' Llama layer, counted with torch's
    saved-tensor hooks): the frozen layer's own saves, plus what each LoRA-wrapped module adds, or, fully
    fine-tuned, what the trained weights need. Encoders: `_encoder_activation_bytes`."""
    if facts.block == "encoder":
        return _encoder_activation_bytes(facts, x)
    a = DTYPE_BYTES[x.dtype]
    h, I = facts.hidden_size, facts.intermediate_size
    q = facts.heads * facts.head_dim
    kv = 2 * facts.kv_heads * facts.head_dim
    # frozen layer: two RMSNorms save their fp32 input and rstd; attention saves q, k, v and its output (sdpa) and
    # logsumexp (fp32 per head); o_proj's input; the MLP saves gate, up, silu(gate) and their product
    base = 8 * h + 2 * a * q + a * kv + 3 * a * I + 4 * facts.heads + 8
    formula = f"8h + 2a*q + a*kv + 3a*I + 4*heads + 8 (a={a})"
    if (x.attn_implementation or "sdpa") == "eager":
        # eager attention keeps the softmax probabilities (heads x seq per token) and k/v repeated to every head
        base += a * facts.heads * x.seq_len + a * max(0, 2 * q - kv)
        formula += " + eager: a*heads*seq + a*(2q - kv)"
    if x.full_finetune:
        # every linear saves its input for its weight's gradient (q/k/v share the attention norm's output, gate/up the
        # MLP norm's, o_proj's is saved already, down_proj's is the gated product) and each RMSNorm's weight its
        # normalised input
        base += 4 * a * h + a * I
        formula += " + full: 4a*h + a*I"
        if a != 4:
            # autocast over fp32 weights: the residual stream stays fp32, so the norms' weights save fp32 inputs, and
            # q/k/v and gate/up each save their own 16-bit cast of the shared input
            base += 2 * (4 - a) * h + 3 * a * h
            formula += " + autocast: 2(4-a)*h + 3a*h"
        return base, formula
    targets = target_shapes(facts, x.lora_targets)
    lora = 4 * x.lora_r * len(targets)  # each adapter's A output, fp32 (PEFT keeps adapters in fp32)
    if a == 4:
        # fp32: a wrapped module's input is saved for its A gradient once per distinct input (o_proj's input is
        # already saved by the frozen layer)
        inputs = {"attn_in": h if any(s.name in ("q_proj", "k_proj", "v_proj") for s in targets) else 0,
                  "mlp_in": h if any(s.name in ("gate_proj", "up_proj") for s in targets) else 0,
                  "down_in": I if any(s.name == "down_proj" for s in targets) else 0}
        lora += 4 * sum(inputs.values())
        other = [s for s in targets if s.name not in ATTENTION_MODULES + MLP_MODULES]
        lora += 4 * sum(s.in_features for s in other)
    else:
        # 16-bit compute: each adapter casts its input to fp32 and that copy is saved, once per wrapped module
        lora += 4 * sum(s.in_features for s in targets)
    return base + lora, formula + f" + LoRA ({len(targets)} modules, r={x.lora_r})"


def _role(facts: ModelFacts, s: LinearShape) -> str:
    """A layer linear's place: qkv (reads the layer's input), o (reads attention's output), up (reads the MLP's
    input), down (reads the MLP's intermediate)."""
    if s.name.rsplit(".", 1)[-1] in QKV_MODULES:
        return "qkv"
    if s.kind == "attention":
        return "o"
    return "down" if s.in_features == facts.intermediate_size and s.in_features != s.out_features else "up"


def _encoder_activation_bytes(facts: ModelFacts, x: MemoryInputs) -> tuple[int, str]:
    """Bytes autograd saves per token in one encoder layer (transformers' BERT layer with sdpa attention: post-
    LayerNorm, GELU MLP), counted with torch's saved-tensor hooks (tests/test_classification_plan.py)."""
    a = DTYPE_BYTES[x.dtype]
    h, I, heads = facts.hidden_size, facts.intermediate_size, facts.heads
    # sdpa saves q, k, v, its output (the output projection's input) and logsumexp (fp32 per head); two LayerNorms
    # their input and mean and rstd (in the compute dtype); GELU its input
    base = a * (6 * h + I) + 4 * a + 4 * heads
    formula = f"a*(6h + I) + 4a + 4*heads (a={a})"
    targets = [] if x.full_finetune else target_shapes(facts, x.lora_targets)
    if x.attn_implementation == "eager":
        # eager attention keeps the softmax probabilities (heads x seq per token), no logsumexp; its output is saved
        # only where the output dense trains in full or an fp32 adapter reads it
        base += a * heads * x.seq_len - 4 * heads
        formula += " + eager: a*heads*seq - 4*heads"
        if not (x.full_finetune or (a == 4 and "o" in {_role(facts, s) for s in targets})):
            base -= a * h
            formula += " - a*h"
        if facts.attention_dropout:
            # the dropout's mask (bool on CUDA, scaled noise in dtype on the CPU) and the dropped probabilities
            base += (1 if x.device == "cuda" else a) * heads * x.seq_len + a * heads * x.seq_len
            formula += " + attention dropout: " + ("" if x.device == "cuda" else "a*") + "heads*seq + a*heads*seq"
    if facts.hidden_dropout:
        # two dropouts on the hidden states: CUDA's fused dropout saves a bool mask, the CPU's the scaled noise in dtype
        drop = 2 * h * (1 if x.device == "cuda" else a)
        base += drop
        formula += " + dropout: 2h" + ("" if x.device == "cuda" else "*a")
    if facts.attention_dropout and x.device != "cuda" and x.attn_implementation != "eager":
        # CUDA's sdpa kernels drop attention probabilities inside the kernel (an RNG state); on the CPU dropout sends
        # sdpa to its math path, which keeps fp32 q, k, v, the probabilities, the mask and the dropped probabilities
        # (and no logsumexp)
        base += 12 * heads * x.seq_len - 4 * heads + 3 * (4 - a) * h
        formula += " + CPU attention dropout: 12*heads*seq - 4*heads + 3(4-a)*h"
    if x.full_finetune:
        # every linear saves its input: q/k/v share the layer's input, the intermediate dense reads the first
        # LayerNorm's output, the output dense the GELU's (the attention output dense's input is sdpa's output)
        base += a * (2 * h + I)
        formula += " + full: a*(2h + I)"
        if a != 4:
            # autocast over fp32 weights: LayerNorms run (and save) in fp32, and q/k/v each save their own 16-bit
            # cast of the shared input
            base += 2 * (4 - a) * h + 4 * (4 - a) + 2 * a * h
            formula += " + autocast: 2(4-a)*h + 4(4-a) + 2a*h"
        return base, formula
    lora = 4 * x.lora_r * len(targets)  # each adapter's A output, fp32
    if a == 4:
        # fp32: a wrapped module's input is saved once per distinct input (sdpa's output, the attention output
        # dense's input, is already saved)
        distinct = {"qkv": h, "up": h, "down": I, "o": 0}
        roles = {_role(facts, s) for s in targets}
        lora += 4 * sum(distinct[r] for r in roles)
    else:
        # 16-bit compute: each adapter saves an fp32 copy of its input
        lora += 4 * sum(s.in_features for s in targets)
    return base + lora, formula + f" + LoRA ({len(targets)} modules, r={x.lora_r})"


def _check_task(facts: ModelFacts, x: MemoryInputs) -> None:
    if x.task != facts.task:
        raise ValueError(f"the memory inputs say task {x.task} and the model's facts were counted for task "
                         f"{facts.task}: count them with model_facts(..., task={x.task!r})")
    if x.full_finetune and x.quantization != "none":
        raise ValueError("full fine-tuning trains every weight, which quantisation freezes: quantization must be none")


def estimate(facts: ModelFacts, x: MemoryInputs, budget_gb: float = 0.0) -> MemoryEstimate:
    """Each phase's peak, term by term. See docs/MEMORY.md."""
    _check_task(facts, x)
    a = DTYPE_BYTES[x.dtype]
    tokens = x.micro_batch_size * x.seq_len
    L, V, h = facts.layers, facts.vocab_size, facts.hidden_size
    classifying, full = x.task == "classification", x.full_finetune
    terms: list[MemoryTerm] = []

    def add(phase: str, name: str, nbytes: float, formula: str) -> None:
        terms.append(MemoryTerm(phase=phase, name=name, bytes=int(nbytes), formula=formula))  # type: ignore[arg-type]

    # --- train
    weight_terms, dequant = _full_weight_terms(facts, x) if full else _weights_terms(facts, x)
    for name, nbytes, formula in weight_terms:
        add("train", name, nbytes, formula)
    if dequant:
        add("train", "dequantised weight (one layer at a time)", dequant, f"largest linear x {a} B")
    lora_bytes = 4 if x.backend == "hf" else a  # PEFT keeps adapters in fp32; unsloth and mlx in the compute dtype
    opt = OPTIMIZER_STATE_BYTES.get(x.optimizer, 8.0)
    lora_n = head_n = 0
    if full:
        # every parameter has an fp32 gradient and its optimizer state
        trainable = facts.total_parameters
        add("train", "gradients", trainable * 4, f"{trainable:,} x 4 B (fp32, every parameter)")
        per_trained = 4 + opt
    else:
        lora_n = lora_parameters(facts, x.lora_r, x.lora_targets)
        add("train", "LoRA weights", lora_n * lora_bytes, f"{lora_n:,} x {lora_bytes} B")
        add("train", "LoRA gradients", lora_n * lora_bytes, f"{lora_n:,} x {lora_bytes} B")
        # a classifier's head is trained in full: PEFT's modules_to_save keeps a trainable copy beside the frozen one
        head_n = facts.classifier_parameters if classifying else 0
        if head_n:
            add("train", "head (trainable copy)", head_n * lora_bytes,
                f"{head_n:,} x {lora_bytes} B (PEFT modules_to_save)")
            add("train", "head gradients", head_n * lora_bytes, f"{head_n:,} x {lora_bytes} B")
        trainable = lora_n + head_n
        per_trained = 2 * lora_bytes + opt
    add("train", "optimizer state", trainable * opt, f"{trainable:,} x {opt:g} B ({x.optimizer})")
    per_layer, formula = _activation_bytes_per_token_layer(facts, x)
    if x.gradient_checkpointing:
        ra = 4 if full else a  # full fine-tuning under autocast keeps the residual stream (the layer inputs) in fp32
        add("train", "activations (checkpointed layer inputs)", L * tokens * ra * h,
            f"layers x tokens x a*h ({L} x {tokens} x {ra * h} B)")
        add("train", "activations (one layer recomputed)", tokens * per_layer,
            f"tokens x ({formula}) = {tokens} x {per_layer} B")
    else:
        add("train", "activations", L * tokens * per_layer,
            f"layers x tokens x ({formula}) = {L} x {tokens} x {per_layer} B")
    if classifying:
        # outside the layers: the embeddings' (full), the final norm's and the head's saves, bounded by 5h bytes a
        # token with LoRA and 14h fully fine-tuned (the hooks count 0.2-4.7h and 6.2-12.9h on small BERTs and Llamas)
        k = 14 if full else 5
        add("train", "activations (embeddings, final norm, head)", tokens * k * h,
            f"tokens x {k}h = {tokens} x {k * h} B")
        # no vocabulary-wide logits: labels per row (an encoder pools its first token; a decoder's score head runs at
        # every position and the last real token's row is read)
        rows, per = (x.micro_batch_size, "rows") if facts.block == "encoder" else (tokens, "tokens")
        add("train", "logits and loss", rows * x.num_labels * (a + LOGITS_FP32_COPIES * 4),
            f"{per} x labels x (a + {LOGITS_FP32_COPIES:g} x 4 B) = {rows} x {x.num_labels}")
    else:
        fp32 = LOGITS_FP32_COPIES * 4 / x.loss_chunks
        logits = tokens * V * (a + fp32 if a != 4 else max(4, fp32))
        add("train", "logits and loss", logits,
            f"tokens x vocab x ({'a + ' if a != 4 else ''}{LOGITS_FP32_COPIES:g} x 4 B"
            + (f" / {x.loss_chunks} chunks" if x.loss_chunks > 1 else "") + f") = {tokens} x {V}")
    _overhead(add, "train", x, [t.bytes for t in terms if t.phase == "train"])

    # --- eval: scoring batches (logits + loss in fp32) and greedy generation with a KV cache (sft); a classifier's
    # logits per row and no generation
    # evaluation loads the base unquantised, in the training precision on CUDA and in float32 on the CPU (where mlx
    # adapters are scored too, fused into a torch model): lorapipe.hardware.plan's evaluation phase
    e_device = "cuda" if x.device == "cuda" else "cpu"
    e_dtype = x.eval_dtype or (x.dtype if e_device == "cuda" else "float32")
    ea = DTYPE_BYTES[e_dtype]
    add("eval", "base weights", facts.total_parameters * ea,
        f"{facts.total_parameters:,} x {ea} B ({e_dtype}, unquantised)" + (", the trained model" if full else ""))
    if not full:
        add("eval", "LoRA weights", lora_n * 4, f"{lora_n:,} x 4 B")
    if head_n:
        add("eval", "head (trained copy)", head_n * 4, f"{head_n:,} x 4 B")
    if classifying:
        rows, per = ((x.eval_batch_size, "eval batch") if facts.block == "encoder"
                     else (x.eval_batch_size * x.seq_len, "eval batch x seq"))
        add("eval", "logits and loss", rows * x.num_labels * (ea + 4 * 2), f"{per} x labels x ({ea} + 2 x 4 B)")
    else:
        e_tokens = x.eval_batch_size * (x.seq_len + x.max_new_tokens)
        add("eval", "logits and loss", x.eval_batch_size * x.seq_len * V * (ea + 4 * 2),
            f"eval batch x seq x vocab x ({ea} + 2 x 4 B)")
        add("eval", "KV cache", 2 * L * facts.kv_heads * facts.head_dim * e_tokens * ea,
            f"2 x layers x kv_heads x head_dim x eval batch x (seq + max_new_tokens) x {ea} B")
    add("eval", "one layer's activations", x.eval_batch_size * x.seq_len * ea * (2 * h + 3 * facts.intermediate_size),
        "eval batch x seq x a x (2h + 3I)")
    _overhead(add, "eval", x.model_copy(update={"device": e_device}), [t.bytes for t in terms if t.phase == "eval"])

    # --- merge: on the CPU, a 16-bit copy of the base with the adapter folded in, one shard serialised at a time
    # (safetensors builds the shard's bytes in memory), then the saved folder read back for the merge check (mapped,
    # and copied out of the mapping). The
    # first copy is freed before the read-back, but glibc keeps freed blocks under its mmap threshold in the heap:
    # those stay resident (all of a small model, the k/v projections of an 8B one). Fully fine-tuned there is nothing
    # to merge: the trained model is copied in merge.dtype the same way
    m = DTYPE_BYTES[x.merge_dtype]
    model_bytes = facts.total_parameters * m
    shard = min(model_bytes, x.max_shard_bytes)
    adapter = lora_n + head_n
    if full:
        add("merge", "16-bit trained model (nothing to merge)", model_bytes,
            f"{facts.total_parameters:,} x {m} B ({x.merge_dtype})")
    else:
        add("merge", "16-bit base with the adapter", model_bytes + adapter * 4,
            f"{facts.total_parameters:,} x {m} B ({x.merge_dtype}) + LoRA in fp32" + (" + the head's copy" if head_n
                                                                                     else ""))
    retained = _small_tensor_bytes(facts, m) if x.device != "mps" or x.backend != "mlx" else 0
    # the read-back maps the safetensors files (their pages are resident while mapped) and copies the tensors out
    later = retained + 2 * model_bytes - (model_bytes + adapter * 4)
    if shard >= later:
        add("merge", "shard being written", shard, f"min(model, merge.max_shard_size) = {gib(shard)}")
    else:
        add("merge", "merged model read back for the check", later,
            f"the merged copy, mapped and loaded (2 x {gib(model_bytes)}), with the heap's freed small tensors of the first "
            f"({gib(retained)}), less the first copy")
    add("merge", "process", CPU_EVAL_PROCESS_BYTES, "Python + torch + transformers + peft (measured)")

    train_total = sum(t.bytes for t in terms if t.phase == "train")
    weights = sum(b for _, b, _ in weight_terms) + dequant
    act = sum(t.bytes for t in terms if t.phase == "train" and (t.name.startswith("activations")
                                                                or t.name.startswith("logits")))
    return MemoryEstimate(
        weights_gb=round(weights / GIB, 4), lora_and_optimizer_gb=round(trainable * per_trained / GIB, 4),
        activations_gb=round(act / GIB, 4), total_gb=round(train_total / GIB, 4), budget_gb=round(budget_gb, 2),
        eval_peak_gb=round(sum(t.bytes for t in terms if t.phase == "eval") / GIB, 4),
        merge_peak_gb=round(sum(t.bytes for t in terms if t.phase == "merge") / GIB, 4),
        terms=terms, trainable_parameters=trainable)


def _full_weight_terms(facts: ModelFacts, x: MemoryInputs) -> tuple[list[tuple[str, int, str]], int]:
    """Full fine-tuning: fp32 weights as loaded (the optimizer updates them); a 16-bit compute dtype runs under
    autocast, which keeps its 16-bit cast of every linear weight until backward."""
    a = DTYPE_BYTES[x.dtype]
    n = facts.total_parameters
    terms = [("base weights", n * 4, f"{n:,} parameters x 4 B (float32, every one trained)")]
    if a != 4:
        linear = sum(v for k, v in facts.parameter_counts.items() if k in ("attention", "mlp", "head", "lm_head"))
        terms.append(("16-bit weight copies (autocast)", linear * a,
                      f"{linear:,} linear-layer parameters x {a} B ({x.dtype} casts kept for backward)"))
    return terms, 0


def _overhead(add: Any, phase: str, x: MemoryInputs, phase_bytes: list[int]) -> None:
    if x.device == "cuda":
        add(phase, "CUDA allocator overhead", sum(phase_bytes) * CUDA_ALLOCATOR_OVERHEAD,
            f"{CUDA_ALLOCATOR_OVERHEAD:.0%} of the above (reserved over allocated)")
        add(phase, "CUDA context", CUDA_CONTEXT_BYTES, "kernels and context, outside torch's allocator")
    elif x.device == "cpu" or x.backend != "mlx":
        nbytes = CPU_PROCESS_BYTES if phase == "train" else CPU_EVAL_PROCESS_BYTES
        add(phase, "process", nbytes, "Python + torch + transformers + peft + trl (measured)")
    else:
        add(phase, "process", CPU_EVAL_PROCESS_BYTES, "Python + mlx + mlx-lm (unified memory)")


# glibc hands allocations of at least this size to mmap (its dynamic threshold's ceiling on 64-bit) and returns them
# to the system when freed; smaller blocks are reused from the heap and stay resident
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def _small_tensor_bytes(facts: ModelFacts, nbytes_per: int) -> int:
    """Bytes of the model's tensors under glibc's mmap threshold: what a freed copy leaves resident."""
    small = 0
    for s in facts.linears:
        size = s.in_features * s.out_features * nbytes_per
        small += facts.layers * size if size < GLIBC_MMAP_THRESHOLD_MAX else 0
    emb = facts.vocab_size * facts.hidden_size * nbytes_per
    one = facts.tied_embeddings or facts.task == "classification"  # a classifier has no lm_head
    small += emb * (1 if one else 2) if emb < GLIBC_MMAP_THRESHOLD_MAX else 0
    small += facts.parameter_counts.get("norms", 0) * nbytes_per
    return small


CUDA_OVERHEAD_TERMS = ("CUDA context", "CUDA allocator overhead")


def comparable_prediction_gb(terms: list[MemoryTerm], device: str, resident_at_start_gb: Optional[float]) -> float:
    """The prediction in the measured quantity: on CUDA torch's allocated peak (no context, no allocator overhead),
    on the CPU the process's peak re-based on what it held when the phase began (`predicted_in_process`)."""
    if device.startswith("cuda"):
        return sum(t.bytes for t in terms if t.name not in CUDA_OVERHEAD_TERMS) / GIB
    return predicted_in_process(sum(t.bytes for t in terms) / GIB, device, resident_at_start_gb)


def predicted_in_process(predicted_gb: float, device: str, resident_at_start_gb: Optional[float]) -> float:
    """A CPU phase's predicted peak in a process that held `resident_at_start_gb` when the phase began (a ZenML step
    also holds ZenML and the earlier steps' data): the measured start replaces the imports the prediction counts.
    CUDA peaks are the device's own: unchanged."""
    if device.startswith("cuda") or resident_at_start_gb is None:
        return predicted_gb
    return predicted_gb - CPU_IMPORTS_BYTES / GIB + max(resident_at_start_gb, CPU_IMPORTS_BYTES / GIB)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.0f} MiB"

