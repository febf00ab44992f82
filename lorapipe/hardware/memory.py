"""The memory model: what training, evaluation and merge of a LoRA/QLoRA fine-tune hold, term by term, from the
model's `config.json` alone (no weights are read).

`model_facts` reads the config (a local folder, or the hub cache / hub where reachable) and counts parameters per
module kind and the shape of every linear layer LoRA can wrap (GQA makes k/v smaller than q). `estimate` turns
facts and settings (`MemoryInputs`) into the peak of each phase with the terms that make it up. Every term is
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
    """A causal LM's sizes from its config: parameter counts per module kind and one decoder layer's linear shapes."""

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
    parameter_counts: dict[str, int]  # embeddings, attention, mlp, norms, lm_head (0 when tied)
    linears: list[LinearShape]  # one decoder layer's linear modules
    counted: Literal["formula", "meta"] = "formula"

    @property
    def total_parameters(self) -> int:
        return sum(self.parameter_counts.values())

    @property
    def layer_linear_parameters(self) -> int:
        """Weights of the decoder layers' linear modules: what quantisation compresses."""
        return self.layers * sum(s.in_features * s.out_features for s in self.linears)


class ModelFactsError(RuntimeError):
    """The model's config could not be read (no such folder, no hub, not a causal LM): one line that says so."""


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


def facts_from_config(cfg: Any, source: str = "config") -> ModelFacts:
    """Counts by formula for Llama-family configs; any other architecture is built on the meta device and counted."""
    if getattr(cfg, "model_type", None) not in LLAMA_LIKE or getattr(cfg, "num_local_experts", None):
        return count_on_meta(cfg, source)
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
    return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=V, hidden_size=h, intermediate_size=inter,
                      layers=L, heads=heads, kv_heads=kv, head_dim=d, tied_embeddings=tied, parameter_counts=counts,
                      linears=linears)


def count_on_meta(cfg: Any, source: str = "config") -> ModelFacts:
    """Build the model on the meta device (no memory, no weights) and count its parameters per module kind."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except ValueError as exc:
        raise ModelFactsError(f"{source}: not a causal language model transformers can build "
                              f"({str(exc).splitlines()[0]})") from None
    counts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
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
            if id(p) in out_ids:
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
    linears = []
    for name, module in (layer0.named_modules() if layer0 is not None else []):
        shape = _linear_shape(module)
        if shape is not None:
            leaf = name.rsplit(".", 1)[-1]
            kind = "attention" if any(k in name.lower() for k in ("attn", "attention")) else "mlp"
            linears.append(LinearShape(name=leaf, in_features=shape[0], out_features=shape[1], kind=kind))
    inter = max((s.out_features for s in linears if s.kind == "mlp"), default=4 * h)
    tied = out_emb is not None and any(id(p) in in_ids for p in out_emb.parameters())
    return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=h,
                      intermediate_size=inter, layers=L, heads=heads, kv_heads=kv,
                      head_dim=cfg_dict.get("head_dim") or h // heads, tied_embeddings=bool(tied),
                      parameter_counts=counts, linears=linears, counted="meta")


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


def model_facts(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> ModelFacts:
    """The model's facts from its config alone: a local folder, or a hub id read from the cache or the hub."""
    cfg = read_config(name_or_path, revision, trust_remote_code)
    return facts_from_config(cfg, source=name_or_path)


def load_test(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False
              ) -> tuple[ModelFacts, ModelFacts]:
    """(by formula, counted on the meta device): `estimate-memory --load-test` checks that the two agree."""
    cfg = read_config(name_or_path, revision, trust_remote_code)
    return facts_from_config(cfg, name_or_path), count_on_meta(cfg, name_or_path)


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
    return [s for s in facts.linears if s.name in wanted]


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
    saved-tensor hooks): the frozen layer's own saves, plus what each LoRA-wrapped module adds."""
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


def estimate(facts: ModelFacts, x: MemoryInputs, budget_gb: float = 0.0) -> MemoryEstimate:
    """Each phase's peak, term by term. See docs/MEMORY.md."""
    a = DTYPE_BYTES[x.dtype]
    tokens = x.micro_batch_size * x.seq_len
    L, V, h = facts.layers, facts.vocab_size, facts.hidden_size
    terms: list[MemoryTerm] = []

    def add(phase: str, name: str, nbytes: float, formula: str) -> None:
        terms.append(MemoryTerm(phase=phase, name=name, bytes=int(nbytes), formula=formula))  # type: ignore[arg-type]

    # --- train
    weight_terms, dequant = _weights_terms(facts, x)
    for name, nbytes, formula in weight_terms:
        add("train", name, nbytes, formula)
    if dequant:
        add("train", "dequantised weight (one layer at a time)", dequant, f"largest linear x {a} B")
    lora_n = lora_parameters(facts, x.lora_r, x.lora_targets)
    lora_bytes = 4 if x.backend == "hf" else a  # PEFT keeps adapters in fp32; unsloth and mlx in the compute dtype
    add("train", "LoRA weights", lora_n * lora_bytes, f"{lora_n:,} x {lora_bytes} B")
    add("train", "LoRA gradients", lora_n * lora_bytes, f"{lora_n:,} x {lora_bytes} B")
    opt = OPTIMIZER_STATE_BYTES.get(x.optimizer, 8.0)
    add("train", "optimizer state", lora_n * opt, f"{lora_n:,} x {opt:g} B ({x.optimizer})")
    per_layer, formula = _activation_bytes_per_token_layer(facts, x)
    if x.gradient_checkpointing:
        add("train", "activations (checkpointed layer inputs)", L * tokens * a * h,
            f"layers x tokens x a*h ({L} x {tokens} x {a * h} B)")
        add("train", "activations (one layer recomputed)", tokens * per_layer,
            f"tokens x ({formula}) = {tokens} x {per_layer} B")
    else:
        add("train", "activations", L * tokens * per_layer,
            f"layers x tokens x ({formula}) = {L} x {tokens} x {per_layer} B")
    fp32 = LOGITS_FP32_COPIES * 4 / x.loss_chunks
    logits = tokens * V * (a + fp32 if a != 4 else max(4, fp32))
    add("train", "logits and loss", logits,
        f"tokens x vocab x ({'a + ' if a != 4 else ''}{LOGITS_FP32_COPIES:g} x 4 B"
        + (f" / {x.loss_chunks} chunks" if x.loss_chunks > 1 else "") + f") = {tokens} x {V}")
    _overhead(add, "train", x, [t.bytes for t in terms if t.phase == "train"])

    # --- eval: scoring batches (logits + loss in fp32) and greedy generation with a KV cache
    # evaluation loads the base unquantised, in the training precision on CUDA and in float32 on the CPU (where mlx
    # adapters are scored too, fused into a torch model): lorapipe.hardware.plan's evaluation phase
    e_device = "cuda" if x.device == "cuda" else "cpu"
    e_dtype = x.eval_dtype or (x.dtype if e_device == "cuda" else "float32")
    ea = DTYPE_BYTES[e_dtype]
    add("eval", "base weights", facts.total_parameters * ea,
        f"{facts.total_parameters:,} x {ea} B ({e_dtype}, unquantised)")
    add("eval", "LoRA weights", lora_n * 4, f"{lora_n:,} x 4 B")
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
    # those stay resident (all of a small model, the k/v projections of an 8B one)
    m = DTYPE_BYTES[x.merge_dtype]
    model_bytes = facts.total_parameters * m
    shard = min(model_bytes, x.max_shard_bytes)
    add("merge", "16-bit base with the adapter", model_bytes + lora_n * 4,
        f"{facts.total_parameters:,} x {m} B ({x.merge_dtype}) + LoRA in fp32")
    retained = _small_tensor_bytes(facts, m) if x.device != "mps" or x.backend != "mlx" else 0
    # the read-back maps the safetensors files (their pages are resident while mapped) and copies the tensors out
    later = retained + 2 * model_bytes - (model_bytes + lora_n * 4)
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
        weights_gb=round(weights / GIB, 4), lora_and_optimizer_gb=round(lora_n * (2 * lora_bytes + opt) / GIB, 4),
        activations_gb=round(act / GIB, 4), total_gb=round(train_total / GIB, 4), budget_gb=round(budget_gb, 2),
        eval_peak_gb=round(sum(t.bytes for t in terms if t.phase == "eval") / GIB, 4),
        merge_peak_gb=round(sum(t.bytes for t in terms if t.phase == "merge") / GIB, 4),
        terms=terms, trainable_parameters=lora_n)


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
    small += emb * (1 if facts.tied_embeddings else 2) if emb < GLIBC_MMAP_THRESHOLD_MAX else 0
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

