"""Load a base model and tokenizer from a hub id or a local folder: the one path real and tiny models share."""

from __future__ import annotations

from typing import Any, Optional

from lorapipe.data.render import ensure_chat_template

def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   chat_template: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    # where the template came from (config, tokenizer, fallback): the audit reports it
    tok.lorapipe_chat_template_source = ensure_chat_template(tok, chat_template)
    if tok.pad_token is None:
        # Prefer a token that is not EOS; if only EOS exists, padding is still masked by position
        # (attention mask), never by token id, so EOS keeps being trained. No new token: no resized embeddings.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def quantization_config(quantization: str, compute_dtype: str) -> Any:
    """QLoRA is LoRA plus this: a bitsandbytes config, or None for plain LoRA."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(compute_dtype))
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"train.quantization: {quantization!r} is not one of none, nf4, int8")


def load_model(name_or_path: str, dtype: str, revision: Optional[str] = None, trust_remote_code: bool = False,
               quantization: str = "none", *, device: str, attn_implementation: Optional[str] = None) -> Any:
    """The model on the plan's device in the plan's dtype: both come from the caller's plan, never decided here."""
    from transformers import AutoModelForCausalLM

    qconf = quantization_config(quantization, dtype)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if qconf is None:
        model.to(device)
    return model
