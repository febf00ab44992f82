"""A deterministic tiny Llama-architecture model for the quickstart and the tests.

Seeded random weights and a byte-level BPE tokenizer trained with `tokenizers` on the quickstart data,
a ChatML-style chat template, distinct EOS (`<|im_end|>`) and PAD. It is saved with `save_pretrained` and
read back through `lorapipe.models.loading`, the same code that loads a hub id.
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


def build_tiny_model(out_dir: str | Path, corpus: list[Path], vocab_size: int = 1024, hidden_size: int = 64,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
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
         "vocab_size": len(fast), "hidden_size": hidden_size, "layers": layers}, indent=2))
    return out
