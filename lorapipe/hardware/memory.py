"""The memory model: what training, evaluation and merge of a LoRA/QLoRA (or, for a classifier, full) fine-tune
hold, term by term, from the model's `config.json` alone (no weights are read).

`estimate` turns a model's facts (`lorapipe.hardware.facts.model_facts`: parameter counts and linear shapes) and the
settings (`MemoryInputs`) into the peak of each phase with the terms that make it up. `task:
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

from lorapipe.catalog import BACKENDS, TASK_CHOICES, task_spec
from lorapipe.hardware.facts import (
    QKV_MODULES,
    LinearShape,
    ModelFacts,
)
from lorapipe.units import GIB, ReadsGbNames, format_bytes

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
# tokenizer and the trainer's bookkeeping (0.51 GiB after the imports alone, measured on torch 2.13 CPU). Fitted
# (with the three CPU constants below) on bench/memory_families.py's FIT configurations, 2026-12-07: the 56 M Llama,
# Qwen2 and Phi-3, SFT and classification, fp32 and NF4, checkpointing on and off, medians of 3 runs; judged on the
# HELD_OUT ones (Qwen3, Mistral, Gemma), which set nothing.
CPU_PROCESS_BYTES = int(0.72 * GIB)
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
# fp32 copies of one loss chunk's logits alive at its peak under TRL's chunked_nll (the hf backend's SFT loss): its
# logits, log_softmax, the entropy TRL logs and their gradients. Fitted with CPU_PROCESS_BYTES (above).
CHUNK_LOGITS_FP32_COPIES = 4.0
# On the CPU a training process's resident memory grows by about twice what autograd saves in the forward pass: the
# ops' temporaries are freed, but glibc keeps blocks under its mmap threshold (up to 32 MiB) in the heap, and the
# saved tensors between them keep it from shrinking (measured with VmHWM against saved-tensor hooks on Mistral and
# Qwen2 layers: 2.15x and 2.25x). Fitted with CPU_PROCESS_BYTES (above): 2.0.
CPU_ACTIVATION_RESIDENT_FACTOR = 2.0
# With gradient checkpointing, the layer recomputed in backward: its saved tensors, its forward's temporaries and its
# backward's (the gradients of each saved tensor), all resident at once. Fitted with CPU_PROCESS_BYTES (above).
CPU_RECOMPUTE_RESIDENT_FACTOR = 5.25

# task: preference on the hf backend (TRL 1.14's DPO, KTO and ORPO trainers, unfused loss path): TRL's
# entropy_from_logits, which DPO and KTO log, runs log_softmax over this many rows of the logits at a time
TRL_ENTROPY_CHUNK_ROWS = 128


MERGE_CHECK_TOKENS = 256  # tokens per row the merge check compares, at most (the merge plan's row length)

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
    # sft: "backend": the loss the backend computes (hf: TRL's chunked_nll over the trained tokens); "full_logits":
    # the model's own loss over every position's logits (a plain Trainer, LLaMA-Factory), to compare with a peer
    sft_loss: Literal["backend", "full_logits"] = "backend"
    eval_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # None: float32 on CPU, else dtype
    task: Literal[TASK_CHOICES] = "sft"  # type: ignore[valid-type]  # the facts must be counted for the same task
    num_labels: int = Field(2, ge=1)  # classification: the logits per row
    # train.method: full: every parameter trained, from fp32 weights (16-bit dtypes compute under autocast); no
    # LoRA, no quantisation
    full_finetune: bool = False
    # task: preference: train.method (dpo, kto, orpo): a pair's two sequences go through the policy together, and the
    # reference's forward (dpo, kto) runs without gradients after the policy's, unless its log-probabilities are
    # computed once before training (precompute_reference); the peak is the backward's (_preference_logits_terms)
    preference_method: Optional[Literal["dpo", "kto", "orpo"]] = None
    precompute_reference: bool = False


# the evaluation terms of the adapter itself; the rest is the base's, scored alone too (PhasePlan.base_alone)
ADAPTER_EVAL_TERMS = ("LoRA weights", "head (trained copy)")


class MemoryTerm(BaseModel):
    phase: Literal["train", "eval", "merge"]
    name: str
    bytes: int
    formula: str


class MemoryEstimate(ReadsGbNames):
    """Peaks per phase (GiB, as the plan reports them) and the terms that make them up (bytes).

    On CUDA a phase's peak is what one GPU holds (torch's allocations plus the allocator's overhead and the CUDA
    context); on the CPU and on Apple Silicon, the resident memory of the process."""

    weights_gib: float
    lora_and_optimizer_gib: float
    activations_gib: float
    total_gib: float  # the training peak
    budget_gib: float
    eval_peak_gib: Optional[float] = None  # None in a training plan: it carries the training phase only
    merge_peak_gib: Optional[float] = None
    terms: list[MemoryTerm] = Field(default_factory=list)
    trainable_parameters: int = 0

    def training_only(self) -> "MemoryEstimate":
        """The training phase alone: what the training plan carries, so that an evaluation or merge setting does
        not change the training plan's content (and so the cached training)."""
        return self.model_copy(update={"terms": [t for t in self.terms if t.phase == "train"],
                                       "eval_peak_gib": None, "merge_peak_gib": None})

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
                               "budget_bytes": int(self.budget_gib * GIB), "trainable_parameters":
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
              f"{other:,} parameters x {keep} B "
              f"({'fp32 after prepare_model_for_kbit_training' if keep == 4 else x.dtype})")]
    return terms, largest * a


def _activation_bytes_per_token_layer(facts: ModelFacts, x: MemoryInputs) -> tuple[int, str]:
    """Bytes autograd saves per token in one decoder layer (transformers' Llama layer, counted with torch's
    saved-tensor hooks): the frozen layer's own saves, plus what each LoRA-wrapped module adds, or, fully
    fine-tuned, what the trained weights need. Encoders: `_encoder_activation_bytes`."""
    if facts.block == "encoder":
        return _encoder_activation_bytes(facts, x)
    a = DTYPE_BYTES[x.dtype]
    h, I = facts.hidden_size, facts.intermediate_size  # noqa: E741, N806 - docs/MEMORY.md's names: hidden, intermediate
    q = facts.heads * facts.head_dim
    kv = 2 * facts.kv_heads * facts.head_dim
    # frozen layer: two RMSNorms save their fp32 input and rstd; attention saves q, k, v and its output (sdpa) and
    # logsumexp (fp32 per head); o_proj's input; the MLP saves gate, up, silu(gate) and their product
    base = 8 * h + 2 * a * q + a * kv + 3 * a * I + 4 * facts.heads + 8
    formula = f"8h + 2a*q + a*kv + 3a*I + 4*heads + 8 (a={a})"
    if facts.qk_norm:
        # an RMSNorm per head on q and k (Qwen3): each saves its fp32 input and one fp32 rstd per head
        base += 4 * (q + kv // 2) + 4 * (facts.heads + facts.kv_heads)
        formula += " + q/k norms: 4(q + kv/2) + 4(heads + kv_heads)"
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
        # fp32: a wrapped module's input is saved for its A gradient once per distinct input: the attention norm's
        # output (q/k/v, or a fused qkv), the MLP norm's (gate/up, or a fused gate_up), down's (the gated product).
        # o_proj's input is attention's output, saved already, unless q/k/v are fused: their slices reach sdpa as
        # strided views, its output comes back in another layout and the reshape before o_proj copies it
        # (hooks on Phi-3: tests/test_memory_families.py)
        distinct = {"qkv": h, "up": h, "down": I, "o": q if facts.fused_qkv else 0}
        lora += 4 * sum(distinct[r] for r in {_role(facts, s) for s in targets})
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
    h, I, heads = facts.hidden_size, facts.intermediate_size, facts.heads  # noqa: E741, N806 - as above
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


def estimate(facts: ModelFacts, x: MemoryInputs, budget_gib: float = 0.0) -> MemoryEstimate:
    """Each phase's peak, term by term. See docs/MEMORY.md."""
    _check_task(facts, x)
    a = DTYPE_BYTES[x.dtype]
    # task: preference: DPO and ORPO put a pair's two sides through the policy in one batch (TRL concatenates them);
    # KTO's row is one answer with gradients (its KL counterpart and the reference run without)
    sequences = 2 if x.task == "preference" and x.preference_method in ("dpo", "orpo") else 1
    tokens = x.micro_batch_size * x.seq_len * sequences
    L, V, h = facts.layers, facts.vocab_size, facts.hidden_size  # noqa: N806 - docs/MEMORY.md's layers, vocab
    classifying, full = task_spec(x.task).model_kind == "sequence_classifier", x.full_finetune
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
        if facts.added_tokens and not classifying:
            # a built-in chat template's new tokens train through PEFT's trainable tokens: their rows of the input
            # embeddings (and of an untied lm_head), and, each forward, a merged copy of each such matrix and its
            # gradient (TrainableTokensLayer.get_merged_weights; derived from its code, not measured)
            modules = 1 if facts.tied_embeddings else 2
            rows_n = facts.added_tokens * h * modules
            add("train", "new token rows (trainable) and their gradients", rows_n * 2 * a,
                f"{facts.added_tokens} tokens x {modules} module(s) x h x 2a")
            add("train", "new token rows: merged embedding copies and their gradients", modules * 2 * V * h * a,
                f"{modules} module(s) x 2 x vocab x h x a = {modules} x 2 x {V} x {h} x {a} B (PEFT's trainable "
                "tokens)")
            trainable += rows_n
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
    elif x.task == "preference":
        _preference_logits_terms(add, x, tokens, V, a)
    elif ((chunk := BACKENDS[x.backend].sft_loss_chunk_tokens) and x.loss_chunks == 1 and x.sft_loss == "backend"
          and x.task == "sft" and not (facts.added_tokens and not facts.tied_embeddings)):
        # TRL's chunked_nll: the final hidden states are gathered to the trained tokens (two copies: the shift and
        # the gather), then lm_head and the loss run on `chunk` of them at a time under checkpointing: one chunk's
        # logits, upcast to fp32, with log_softmax and the entropy TRL logs, forward and recomputed in backward
        rows = min(tokens, chunk)
        add("train", "final hidden states gathered for the loss", 2 * tokens * a * h,
            f"2 x tokens x a*h = 2 x {tokens} x {a * h} B")
        add("train", "logits and loss (one chunk)", rows * V * ((a if a != 4 else 0) + CHUNK_LOGITS_FP32_COPIES * 4),
            f"min(tokens, {chunk}) x vocab x ({'a + ' if a != 4 else ''}{CHUNK_LOGITS_FP32_COPIES:g} x 4 B) = "
            f"{rows} x {V}")
    else:
        fp32 = LOGITS_FP32_COPIES * 4 / x.loss_chunks
        logits = tokens * V * (a + fp32 if a != 4 else max(4, fp32))
        add("train", "logits and loss", logits,
            f"tokens x vocab x ({'a + ' if a != 4 else ''}{LOGITS_FP32_COPIES:g} x 4 B"
            + (f" / {x.loss_chunks} chunks" if x.loss_chunks > 1 else "") + f") = {tokens} x {V}")
    if x.device == "cpu":
        saved = {t.name: t.bytes for t in terms if t.phase == "train" and t.name.startswith("activations")}
        saved.pop("activations (checkpointed layer inputs)", None)  # kept tensors alone, no temporaries between them
        recomputed = saved.pop("activations (one layer recomputed)", 0)
        add("train", "CPU allocator: freed temporaries kept resident",
            sum(saved.values()) * (CPU_ACTIVATION_RESIDENT_FACTOR - 1)
            + recomputed * (CPU_RECOMPUTE_RESIDENT_FACTOR - 1),
            f"({CPU_ACTIVATION_RESIDENT_FACTOR:g} - 1) x the activations"
            + (f"; ({CPU_RECOMPUTE_RESIDENT_FACTOR:g} - 1) x the recomputed layer" if recomputed else "")
            + " (glibc keeps freed blocks under its mmap threshold in the heap)")
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
    if e_device == "cpu" and facts.stored_dtype and facts.stored_dtype != e_dtype and not full:
        # loaded in another dtype than the checkpoint's, the weights are copied out of the mapped files, whose pages
        # stay resident while the model lives
        stored = DTYPE_BYTES[facts.stored_dtype]
        add("eval", "the checkpoint's files, mapped", facts.total_parameters * stored,
            f"{facts.total_parameters:,} x {stored} B ({facts.stored_dtype} on disk, loaded as {e_dtype})")
    if not full:
        add("eval", ADAPTER_EVAL_TERMS[0], lora_n * 4, f"{lora_n:,} x 4 B")
    if head_n:
        add("eval", ADAPTER_EVAL_TERMS[1], head_n * 4, f"{head_n:,} x 4 B")
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
    mapped = facts.stored_dtype == x.merge_dtype and not full and x.backend != "mlx"
    if full:
        add("merge", "16-bit trained model (nothing to merge)", model_bytes,
            f"{facts.total_parameters:,} x {m} B ({x.merge_dtype})")
    elif mapped:
        # the checkpoint is stored in the merge dtype: its files are mapped, not copied; folding the adapter in
        # copies the wrapped layers' pages, saving reads every page, and the check maps the merged files the same
        # way. A tied causal LM holds the base's and the merged model's pages at once (lm_head reads the whole
        # embedding in both the reference and the check): measured 1.0x the model untied, 1.9-2.2x tied
        # (bench/memory_families.py; RssAnon/RssFile step by step on Qwen2 and Mistral)
        copies = 2 if facts.tied_embeddings and not classifying else 1
        add("merge", "the base's files, mapped, with the adapter folded in", copies * model_bytes + adapter * 4,
            f"{copies} x {facts.total_parameters:,} x {m} B ({x.merge_dtype} on disk and merged"
            + (", tied: the base's and the merged model's pages" if copies == 2 else "") + ") + LoRA in fp32")
    else:
        add("merge", "16-bit base with the adapter", model_bytes + adapter * 4,
            f"{facts.total_parameters:,} x {m} B ({x.merge_dtype}) + LoRA in fp32" + (" + the head's copy" if head_n
                                                                                     else ""))
    retained = _small_tensor_bytes(facts, m) if x.device != "mps" or x.backend != "mlx" else 0
    # the read-back maps the safetensors files (their pages are resident while mapped) and copies the tensors out
    later = retained + 2 * model_bytes - (model_bytes + adapter * 4)
    if mapped:
        pass  # the read-back maps the merged files: counted above
    elif shard >= later:
        add("merge", "shard being written", shard, f"min(model, merge.max_shard_size) = {format_bytes(shard)}")
    else:
        add("merge", "merged model read back for the check", later,
            f"the merged copy, mapped and loaded (2 x {format_bytes(model_bytes)}), with the heap's freed small "
            f"tensors of the first ({format_bytes(retained)}), less the first copy")
    if not classifying:
        # the check's logits over the vocabulary for one row, in the merge dtype: the base + adapter's (written to the
        # check's scratch folder) with lm_head's output beside them, then the reloaded model's
        check = min(x.seq_len, MERGE_CHECK_TOKENS)
        add("merge", "merge check: one row's logits", 2 * check * V * m,
            f"2 x min(seq, {MERGE_CHECK_TOKENS}) x vocab x {m} B = 2 x {check} x {V} x {m} B")
    add("merge", "process", CPU_EVAL_PROCESS_BYTES, "Python + torch + transformers + peft (measured)")

    train_total = sum(t.bytes for t in terms if t.phase == "train")
    weights = sum(b for _, b, _ in weight_terms) + dequant
    vocab_wide = ("logits", "final hidden", "policy logits", "gradient of the logits", "ORPO")  # preference's too
    act = sum(t.bytes for t in terms if t.phase == "train" and t.name.startswith(("activations", *vocab_wide)))
    return MemoryEstimate(
        weights_gib=round(weights / GIB, 4), lora_and_optimizer_gib=round(trainable * per_trained / GIB, 4),
        activations_gib=round(act / GIB, 4), total_gib=round(train_total / GIB, 4), budget_gib=round(budget_gib, 2),
        eval_peak_gib=round(sum(t.bytes for t in terms if t.phase == "eval") / GIB, 4),
        merge_peak_gib=round(sum(t.bytes for t in terms if t.phase == "merge") / GIB, 4),
        terms=terms, trainable_parameters=trainable)


def _preference_logits_terms(add: Any, x: MemoryInputs, tokens: int, V: int, a: int) -> None:  # noqa: N803
    """task: preference: the vocabulary-wide tensors a TRL 1.14 step (hf backend, its unfused loss path) holds at its
    peak, which is the first step of the backward, when every activation is still saved (docs/MEMORY.md). Counted on
    torch's allocations of a step on the CPU (a dispatch-mode trace) and checked against its resident peak."""
    per_copy = tokens * V * a
    # the policy's logits (lm_head's output) are saved for the backward: selective_log_softmax's logsumexp reads them
    add("train", "policy logits (saved for the backward)", per_copy,
        f"tokens x vocab x a = {tokens} x {V} x {a} B")
    # the backward of selective_log_softmax (x_label - logsumexp(x), one sequence at a time) starts with two
    # vocabulary-wide gradients beside the logits: the per-sequence logsumexp gradients stacked back into the batch,
    # and the gather's gradient scattered into zeros (summed in place, then sliced back into the full length)
    add("train", "gradient of the logits (logsumexp's stacked, the gather's scattered)", 2 * per_copy,
        f"2 x tokens x vocab x a = 2 x {tokens} x {V} x {a} B")
    if x.preference_method == "orpo":
        # ORPO adds the chosen half's NLL: cross_entropy's log_softmax output, saved for its backward
        add("train", "ORPO's chosen NLL: log_softmax output (saved)", per_copy // 2,
            f"tokens / 2 x vocab x a = {tokens // 2} x {V} x {a} B")
    if x.preference_method != "orpo" and not x.precompute_reference:
        # DPO's and KTO's reference forward runs without gradients after the policy's; its logits are freed before the
        # backward but sit beside the policy's while TRL logs its metrics: DPO masks a copy of the chosen half's logits
        # (1 + 1 + 0.5 copies), KTO first copies the chosen and the rejected rows out (index_select) and masks one of
        # them (1 + 1 + 1 + 0.5). Counted: what that side holds above the backward's 3 copies (DPO none, KTO half)
        forward = 3.5 if x.preference_method == "kto" else 2.5
        add("train", "reference forward (no gradients): logits, beside the metrics' copies", max(0.0, forward - 3)
            * per_copy, f"({forward:g} - 3 copies above, at least 0) x tokens x vocab x a")
    # the forward's other temporaries (the logged entropy's reshape copy of the logits, the metrics' masked copies)
    # also stay below the backward's peak
    if x.device != "cpu":
        return
    # glibc serves blocks under its mmap threshold (up to 32 MiB) from the heap and keeps them resident once freed:
    # what the loss allocates in such blocks stays in the process's peak. Bigger blocks are unmapped when freed.
    row = x.seq_len * V * 4
    if row < GLIBC_MMAP_THRESHOLD_MAX:
        # the backward's per-sequence temporaries (logsumexp's gradient: x - lse, its exp, the product), one sequence
        # at a time: resident about as much as the batch's logits once
        add("train", "CPU allocator: per-sequence loss temporaries kept resident", tokens * V * 4,
            f"tokens x vocab x 4 B, as seq x vocab x 4 B = {format_bytes(row)} is under glibc's mmap threshold "
            f"({format_bytes(GLIBC_MMAP_THRESHOLD_MAX)})")
    chunk = TRL_ENTROPY_CHUNK_ROWS * V * 4
    if x.preference_method in ("dpo", "kto") and chunk < GLIBC_MMAP_THRESHOLD_MAX:
        # the entropy TRL logs (no gradients): log_softmax, exp and their product over 128 rows at a time
        add("train", "CPU allocator: the logged entropy's chunks kept resident", tokens * V * 4,
            f"tokens x vocab x 4 B, as {TRL_ENTROPY_CHUNK_ROWS} rows x vocab x 4 B = {format_bytes(chunk)} is under "
            f"glibc's mmap threshold")


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
    one = facts.tied_embeddings or task_spec(facts.task).model_kind == "sequence_classifier"  # no lm_head
    small += emb * (1 if one else 2) if emb < GLIBC_MMAP_THRESHOLD_MAX else 0
    small += facts.parameter_counts.get("norms", 0) * nbytes_per
    return small


CUDA_OVERHEAD_TERMS = ("CUDA context", "CUDA allocator overhead")


def comparable_prediction_gib(terms: list[MemoryTerm], device: str, resident_at_start_gib: Optional[float]) -> float:
    """The prediction in the measured quantity: on CUDA torch's allocated peak (no context, no allocator overhead),
    on the CPU the process's peak re-based on what it held when the phase began (`predicted_in_process`)."""
    if device.startswith("cuda"):
        return sum(t.bytes for t in terms if t.name not in CUDA_OVERHEAD_TERMS) / GIB
    return predicted_in_process(sum(t.bytes for t in terms) / GIB, device, resident_at_start_gib)


def predicted_in_process(predicted_gib: float, device: str, resident_at_start_gib: Optional[float]) -> float:
    """A CPU phase's predicted peak in a process that held `resident_at_start_gib` when the phase began (a ZenML step
    also holds ZenML and the earlier steps' data): the measured start replaces the imports the prediction counts.
    CUDA peaks are the device's own: unchanged."""
    if device.startswith("cuda") or resident_at_start_gib is None:
        return predicted_gib
    return predicted_gib - CPU_IMPORTS_BYTES / GIB + max(resident_at_start_gib, CPU_IMPORTS_BYTES / GIB)


