"""A model's facts from its `config.json` alone (no weights are read): parameter counts per module kind and the shape of
every linear layer LoRA can wrap (GQA makes k/v smaller than q), counted as the task's model (a causal LM, or a
sequence classifier with its head). `model_facts` reads the config (a local folder, or the hub cache / hub where
reachable); Llama-family configs are counted by formula, any other architecture on the meta device. The memory model
(`lorapipe.hardware.memory`) turns these facts and the settings into each phase's peak.

transformers is imported only to read a config, torch only for `count_on_meta`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel

from lorapipe.catalog import TASK_CHOICES, task_spec

# Llama-family architectures with an RMSNorm on each head's q and k (head_dim weights each)
QK_NORM_TYPES = ("qwen3",)
# Llama-family architectures whose parameters are counted from the config by formula (the same decoder layer:
# q/k/v/o attention with GQA, a gated MLP, RMSNorms). Any other model_type is counted on the meta device.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "deepseek", "yi",
              "internlm2"}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# The projections that read a layer's (normalised) input: one saved tensor feeds all three. Encoders name them
# query/key/value (BERT, RoBERTa, ELECTRA) or q_lin/k_lin/v_lin (DistilBERT); fused, one linear puts out q, k and v
# together (Phi-3's qkv_proj, GPT-2's c_attn, Falcon's query_key_value, MPT's Wqkv, Baichuan's W_pack).
FUSED_QKV_MODULES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
QKV_MODULES = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q_lin", "k_lin", "v_lin", *FUSED_QKV_MODULES)
# The modules PEFT keeps a trainable copy of for a sequence classifier (modules_to_save; peft's SEQ_CLS_HEAD_NAMES),
# and what else counts as the head (BERT's pooler).
CLASSIFIER_HEADS = ("score", "classifier")
HEAD_MODULES = (*CLASSIFIER_HEADS, "pooler")


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
    added_tokens: int = 0  # special tokens a built-in chat template added (their embedding rows train)
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
    task: Literal[TASK_CHOICES] = "sft"  # type: ignore[valid-type]
    num_labels: Optional[int] = None  # classification: the head's outputs
    # decoder: the Llama-family layer's activation formula (any decoder is counted with it, with its own shapes);
    # encoder: a BERT-like layer (post-LayerNorm, GELU MLP, query/key/value, dropout)
    block: Literal["decoder", "encoder"] = "decoder"
    classifier_parameters: int = 0  # classification: the head PEFT trains a copy of (classifier / score)
    hidden_dropout: float = 0.0  # encoders: dropout on the hidden states (its masks are saved)
    attention_dropout: float = 0.0  # encoders: dropout on the attention probabilities
    qk_norm: bool = False  # an RMSNorm on each head's q and k before attention (Qwen3; others found on the meta device)
    # the dtype the checkpoint's weights are stored in (config.json's dtype / torch_dtype), None when it does not say:
    # loaded in that dtype the safetensors files are mapped, in another they are copied out (lorapipe.hardware.memory)
    stored_dtype: Optional[str] = None

    @property
    def fused_qkv(self) -> bool:
        """q, k and v come out of one linear (Phi-3's qkv_proj): their slices reach attention as views of it."""
        return any(s.name.rsplit(".", 1)[-1] in FUSED_QKV_MODULES for s in self.linears)

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


def stored_dtype(cfg: Any) -> Optional[str]:
    """config.json's dtype (transformers 5) or torch_dtype, as a name ("bfloat16"), or None."""
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else None
    return name if name in ("float32", "bfloat16", "float16") else None


def facts_from_config(cfg: Any, source: str = "config", task: str = "sft", num_labels: int = 2) -> ModelFacts:
    """Counts by formula for Llama-family configs; any other architecture is built on the meta device and counted.
    `task: classification` counts the sequence classifier (`AutoModelForSequenceClassification`, `num_labels`
    outputs): for Llama-family models a `score` head of hidden x labels in place of lm_head."""
    if getattr(cfg, "model_type", None) not in LLAMA_LIKE or getattr(cfg, "num_local_experts", None):
        return count_on_meta(cfg, source, task=task, num_labels=num_labels)
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size  # noqa: N806 - the names docs/MEMORY.md's formulas use
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
    qk_norm = 2 * d if cfg.model_type in QK_NORM_TYPES else 0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts = {
        "embeddings": V * h,
        "attention": L * (sum(s.in_features * s.out_features for s in linears[:4]) + attn_bias),
        "mlp": L * (sum(s.in_features * s.out_features for s in linears[4:]) + mlp_bias),
        "norms": L * (2 * h + qk_norm) + h,
        "lm_head": 0 if tied else V * h,
    }
    if task_spec(task).model_kind == "sequence_classifier":
        # LlamaForSequenceClassification (and its kin): a bias-free `score` linear, hidden -> labels, read at the last
        # token; no lm_head, tied or not
        del counts["lm_head"]
        counts["head"] = h * num_labels
        return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=V, hidden_size=h,
                          intermediate_size=inter, layers=L, heads=heads, kv_heads=kv, head_dim=d,
                          tied_embeddings=False, parameter_counts=counts, linears=linears, task=task,
                          num_labels=num_labels, classifier_parameters=h * num_labels, qk_norm=bool(qk_norm),
                          stored_dtype=stored_dtype(cfg))
    return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=V, hidden_size=h, intermediate_size=inter,
                      layers=L, heads=heads, kv_heads=kv, head_dim=d, tied_embeddings=tied, parameter_counts=counts,
                      linears=linears, qk_norm=bool(qk_norm), stored_dtype=stored_dtype(cfg), task=task)


def count_on_meta(cfg: Any, source: str = "config", task: str = "sft", num_labels: int = 2) -> ModelFacts:
    """Build the model on the meta device (no memory, no weights) and count its parameters per module kind: the
    causal LM (task sft) or the sequence classifier with `num_labels` outputs (task classification: any
    architecture transformers has one for, encoders such as BERT included; its classifier, score and pooler are
    counted as `head`)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifying = task_spec(task).model_kind == "sequence_classifier"
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
    L = cfg_dict.get("num_hidden_layers") or cfg_dict.get("n_layer") or cfg_dict.get("num_layers")  # noqa: N806 - as above
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
    # the config's width where it names one: a fused gate_up_proj (Phi-3) puts out twice the intermediate width
    inter = cfg_dict.get("intermediate_size") or max((s.out_features for s in linears if s.kind == "mlp"),
                                                     default=4 * h)
    tied = out_emb is not None and any(id(p) in in_ids for p in out_emb.parameters())
    encoder = (layer0 is not None and any(isinstance(m, torch.nn.LayerNorm) for m in layer0.modules())
               and sum(leaf in QKV_MODULES for leaf in leaves) == 3 and not cfg_dict.get("is_decoder"))
    extra: dict[str, Any] = {"task": task}  # a causal LM of any causal task (sft, preference)
    if classifying:
        extra = {"task": task, "num_labels": num_labels,
                 "classifier_parameters": sum(p.numel() for name in CLASSIFIER_HEADS if name in heads_of
                                              for p in heads_of[name].parameters())}
    if encoder:
        extra.update(block="encoder",
                     hidden_dropout=float(cfg_dict.get("hidden_dropout_prob", cfg_dict.get("dropout")) or 0.0),
                     attention_dropout=float(cfg_dict.get("attention_probs_dropout_prob",
                                                          cfg_dict.get("attention_dropout")) or 0.0))
    qk_norm = layer0 is not None and any(name.rsplit(".", 1)[-1] in ("q_norm", "k_norm")
                                         for name, _ in layer0.named_modules())
    return ModelFacts(source=source, model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=h,
                      intermediate_size=inter, layers=L, heads=heads, kv_heads=kv,
                      head_dim=cfg_dict.get("head_dim") or h // heads, tied_embeddings=bool(tied),
                      parameter_counts=counts, linears=linears, counted="meta", qk_norm=qk_norm,
                      stored_dtype=stored_dtype(cfg), **extra)


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
