"""`generation_config.json` of a merged model that generates: every end token the chat template uses, so anything that
reads the file stops where the model learned to stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_generation_config(out: Path, tokenizer: Any) -> list[int]:
    """generation_config.json with `eos_token_id` listing every end token, so `generate` (and anything that reads
    the file) stops at the template's turn end as well as at EOS."""
    from transformers import AutoConfig, GenerationConfig

    from lorapipe.data.end_tokens import end_token_ids

    ends = end_token_ids(tokenizer)
    try:
        config = GenerationConfig.from_pretrained(str(out))
    except OSError:  # the backend wrote none
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out)))
    config.eos_token_id = ends
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(str(out))
    return ends
