"""The tokens that end an assistant's turn: EOS and the chat template's own turn-end token (ChatML's <|im_end|>,
Llama 3's <|eot_id|>, Gemma's <end_of_turn>, ...). Generation stops on any of them; the learned-to-stop rate,
the merged model's generation_config.json and the Ollama Modelfile's `stop` lines all use this one list."""

from __future__ import annotations

from typing import Any

from lorapipe.data.render import turn_end_text


def _template_turn_end(tokenizer: Any) -> list[int]:
    """The special token the template writes right after an assistant message (render.turn_end_text's first)."""
    tail = turn_end_text(tokenizer)
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [ids[0]] if ids and ids[0] in special else []


def end_token_ids(tokenizer: Any) -> list[int]:
    """EOS first (all of them when the tokenizer lists several), then the template's turn end; no duplicates."""
    eos = tokenizer.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    ids += _template_turn_end(tokenizer)
    return list(dict.fromkeys(int(i) for i in ids))


def end_tokens(tokenizer: Any) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in end_token_ids(tokenizer)]
