"""A deterministic tiny Llama-architecture model for the quickstart and the tests.

Seeded random weights and a byte-level BPE tokenizer trained with `tokenizers` on the quickstart data,
a ChatML-style chat template, distinct EOS (`<|im_end|>`) and PAD. It is saved with `save_pretrained` and
read back through `lorapipe.models.loading`, the same code that loads a hub id.

For `task: classification`: `build_tiny_encoder` (a BERT-style encoder with a WordPiece tokenizer, saved as a bare
`BertModel` like bert-base-uncased) and `build_tiny_decoder_classifier` (the tiny Llama with a score head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]

# Model shapes by name. "tiny" (0.2 M parameters) is the quickstart's and the tests'; "25m" (~24.7 M: hidden 512,
# 8 layers, the same tokenizer) is for benchmarks where per-step overhead must not dominate; "56m-v32k" for the
# memory benchmarks.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2),
    "25m": dict(hidden_size=512, intermediate_size=1408, layers=8, heads=8, kv_heads=4),
    # ~56 M: the 25m shape with a 32,000-row vocabulary (rows past the tokenizer's are never produced by it), so the
    # vocabulary-wide logits weigh as in real models: the memory benchmarks' larger model
    "56m-v32k": dict(hidden_size=512, intermediate_size=1408, layers=8, heads=8, kv_heads=4, vocab_size=32000),
}


def _texts_from_jsonl(paths: Iterable[Path]) -> Iterator[str]:
    from lorapipe.data.formats import read_records

    result = read_records([str(p) for p in paths])
    for rec in result.records:
        if rec.text is not None:
            yield rec.text
        for m in rec.messages:
            if m.get("content"):
                yield m["content"]
    yield "user assistant system tool"


def build_tiny_model(out_dir: str | Path, corpus: list[Path], vocab_size: int = 1024, hidden_size: int | None = None,
                     layers: int | None = None, heads: int | None = None, kv_heads: int | None = None, seed: int = 0,
                     size: str = "tiny") -> Path:
    """Build a seeded random Llama and its BPE tokenizer in `out_dir`, saved with `save_pretrained`.

    Args:
        out_dir: Folder to write the tokenizer and model into (created if missing).
        corpus: JSONL files the tokenizer is trained on.
        vocab_size: Target BPE vocabulary size (special tokens included).
        hidden_size: Overrides the size's hidden width.
        layers: Overrides the size's number of decoder layers.
        heads: Overrides the size's attention heads.
        kv_heads: Overrides the size's key/value heads.
        seed: Seed for the weights.
        size: A key of `SIZES`: "tiny" (default), "25m" or "56m-v32k".
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    shape = SIZES[size]
    hidden_size = hidden_size or shape["hidden_size"]
    intermediate_size = shape["intermediate_size"] if hidden_size == shape["hidden_size"] else hidden_size * 2
    layers = layers or shape["layers"]
    heads = heads or shape["heads"]
    kv_heads = kv_heads or shape["kv_heads"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_texts_from_jsonl(corpus)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>", model_max_length=2048,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(len(fast), shape.get("vocab_size", 0)), hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "lorapipe_tiny.json").write_text(json.dumps(
        {"built_by": "lorapipe build-tiny-model", "seed": seed, "corpus": [str(p) for p in corpus],
         "size": size, "vocab_size": config.vocab_size, "tokenizer_size": len(fast), "hidden_size": hidden_size,
         "layers": layers,
         "parameters": model.num_parameters()}, indent=2))
    return out


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_encoder(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 2000, hidden_size: int = 64,
                       layers: int = 2, heads: int = 4, intermediate_size: int = 128, seed: int = 0,
                       num_labels: int | None = None) -> Path:
    """Build a seeded random BERT-style encoder and its WordPiece tokenizer in `out_dir`, saved with `save_pretrained`.

    The tokenizer is an uncased BERT pipeline (lower-casing normaliser, BERT pre-tokeniser, WordPiece) trained on
    `texts`, with `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` templates so text pairs get token_type_ids. Without
    `num_labels` the weights are a plain `BertModel`, so `AutoModelForSequenceClassification.from_pretrained(out,
    num_labels=k)` adds a fresh head exactly as it would to bert-base-uncased; with it, a
    `BertForSequenceClassification` with that many (unnamed) labels.

    Args:
        out_dir: Folder to write the tokenizer and model into (created if missing).
        texts: Texts the WordPiece vocabulary is trained on.
        vocab_size: Target WordPiece vocabulary size (special tokens included).
        hidden_size: Hidden width.
        layers: Number of encoder layers.
        heads: Attention heads.
        intermediate_size: Width of the feed-forward layers.
        seed: Seed for the weights.
        num_labels: Save a sequence classifier with this many labels instead of the bare encoder.
    """
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(fast), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate_size, max_position_embeddings=512,
                        type_vocab_size=2, pad_token_id=fast.pad_token_id,
                        **({"num_labels": num_labels} if num_labels is not None else {}))
    model = BertForSequenceClassification(config) if num_labels is not None else BertModel(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "lorapipe_tiny.json").write_text(json.dumps(
        {"built_by": "lorapipe build_tiny_encoder", "seed": seed, "architecture": type(model).__name__,
         "num_labels": num_labels, "vocab_size": config.vocab_size, "tokenizer_size": len(fast),
         "hidden_size": hidden_size, "layers": layers, "parameters": model.num_parameters()}, indent=2))
    return out


def build_tiny_decoder_classifier(out_dir: str | Path, corpus: list[Path], num_labels: int = 2, seed: int = 0) -> Path:
    """Build the tiny Llama of `build_tiny_model` as a `LlamaForSequenceClassification` in `out_dir`.

    The decoder weights are the causal tiny model's; the score head is new (seeded). `pad_token_id` is set in the
    config so a padded batch is classified from each row's last non-pad token.

    Args:
        out_dir: Folder to write the tokenizer and model into (created if missing).
        corpus: JSONL files the tokenizer is trained on.
        num_labels: Number of labels of the score head.
        seed: Seed for the weights.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    out = build_tiny_model(out_dir, corpus, seed=seed)
    causal = LlamaForCausalLM.from_pretrained(out)
    config = causal.config
    config.num_labels = num_labels
    config.pad_token_id = AutoTokenizer.from_pretrained(out).pad_token_id
    config.architectures = None
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(causal.model.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    facts_path = out / "lorapipe_tiny.json"
    facts = json.loads(facts_path.read_text())
    facts.update(built_by="lorapipe build_tiny_decoder_classifier", architecture=type(model).__name__,
                 num_labels=num_labels, parameters=model.num_parameters())
    facts_path.write_text(json.dumps(facts, indent=2))
    return out


# Small random-weight models of the families people fine-tune besides Llama, each with what sets its family apart
# (the memory model must hold on them: bench/memory_families.py, tests/test_memory_families.py). Widths are cut to
# CPU size; the vocabularies are the real ones, so the vocabulary-wide logits weigh as they do in the real models.
FAMILIES = {
    # Qwen2.5-0.5B's layout: tied input/output embeddings, a 151,936-row vocabulary, bias on q/k/v, GQA
    "qwen2": dict(config="Qwen2Config", vocab_size=151_936, hidden_size=256, intermediate_size=768, layers=4,
                  heads=8, kv_heads=2, tie_word_embeddings=True),
    # Qwen3: q/k RMSNorm per head and a head dimension that is not hidden/heads (64 with hidden 256, 8 heads)
    "qwen3": dict(config="Qwen3Config", vocab_size=151_936, hidden_size=256, intermediate_size=768, layers=4,
                  heads=8, kv_heads=4, head_dim=64, tie_word_embeddings=True),
    # Mistral-7B's: grouped-query attention (4 query heads per k/v head), a 32,768-row vocabulary, untied
    "mistral": dict(config="MistralConfig", vocab_size=32_768, hidden_size=512, intermediate_size=1792, layers=6,
                    heads=8, kv_heads=2, tie_word_embeddings=False),
    # Phi-3-mini's: fused qkv_proj and gate_up_proj, a 32,064-row vocabulary, untied
    "phi3": dict(config="Phi3Config", vocab_size=32_064, hidden_size=512, intermediate_size=1536, layers=6,
                 heads=8, kv_heads=8, tie_word_embeddings=False),
    # Gemma-2B's: a 256,000-row tied vocabulary, head_dim 256 whatever the width, one k/v head, GeGLU, embeddings
    # scaled by sqrt(hidden)
    "gemma": dict(config="GemmaConfig", vocab_size=256_000, hidden_size=256, intermediate_size=1024, layers=3,
                  heads=4, kv_heads=1, head_dim=256, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
}


def family_config(family: str, narrow: int = 1, layers: int | None = None, vocab_size: int | None = None,
                  **options: object) -> object:
    """`family`'s transformers config (a key of FAMILIES): its widths and head_dim divided by `narrow` (head counts
    kept), `layers` and `vocab_size` in place of its own where given, `options` (token ids, attention) passed on."""
    import transformers

    spec = dict(FAMILIES[family])
    config_class = getattr(transformers, spec.pop("config"))
    extra = {"head_dim": spec["head_dim"] // narrow} if "head_dim" in spec else {}
    if "hidden_act" in spec:
        extra["hidden_act"] = spec["hidden_act"]
    return config_class(
        vocab_size=vocab_size or spec["vocab_size"], hidden_size=spec["hidden_size"] // narrow,
        intermediate_size=spec["intermediate_size"] // narrow, num_hidden_layers=layers or spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        tie_word_embeddings=spec["tie_word_embeddings"], **extra, **options)


def build_family_model(out_dir: str | Path, family: str, tokenizer_from: str | Path, seed: int = 0,
                       dtype: str = "bfloat16") -> Path:
    """A seeded random causal LM of `family` (a key of FAMILIES) in `out_dir`, with the tokenizer of the model folder
    `tokenizer_from` (the tiny model's: its ids are a prefix of every family's vocabulary), saved with
    `save_pretrained` in `dtype` (bfloat16, as the public checkpoints ship: a float32 load then copies every weight
    out of the file, where a float32 file would be mapped and only the rows read would become resident) and read back
    through the same loading code as a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    tokenizer.save_pretrained(out)
    config = family_config(family, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "lorapipe_tiny.json").write_text(json.dumps(
        {"built_by": "lorapipe.models.tiny.build_family_model", "family": family, "seed": seed, "dtype": dtype,
         "tokenizer_from": str(tokenizer_from), "vocab_size": config.vocab_size,
         "parameters": model.num_parameters()}, indent=2))
    return out
