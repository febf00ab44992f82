"""Load a base model and tokenizer from a hub id or a local folder: the one path real and tiny models share."""

from __future__ import annotations

from typing import Any, Optional

from lorapipe.catalog import ModelKind
from lorapipe.data.render import ensure_chat_template, template_record


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


TEMPLATE_RECORD = "lorapipe_template.json"  # beside a tokenizer lorapipe saved: the template's switches and origin


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   chat_template: Optional[str] = None, template_kwargs: Optional[dict[str, Any]] = None) -> Any:
    """The tokenizer with its chat template (the config's, its own, or the fallback) and the template's switches
    (`model.chat_template_kwargs`; for a folder lorapipe saved, those it was trained with, unless given)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    # where the template came from (config, tokenizer, fallback): the audit reports it
    tok.lorapipe_chat_template_source = ensure_chat_template(tok, chat_template)
    record = Path(name_or_path) / TEMPLATE_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if template_kwargs is None:
        template_kwargs = saved.get("chat_template_kwargs")
    tok.lorapipe_template_kwargs = dict(template_kwargs or {})
    if saved.get("added_tokens"):  # a folder lorapipe saved: the tokens its template added, trained with it
        tok.lorapipe_added_tokens = list(dict.fromkeys([*saved["added_tokens"], *tok.lorapipe_added_tokens]))
    if tok.pad_token is None:
        # Prefer a token that is not EOS; if only EOS exists, padding is still masked by position
        # (attention mask), never by token id, so EOS keeps being trained. No new token: no resized embeddings.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def save_tokenizer(tokenizer: Any, folder: Any) -> None:
    """The tokenizer with its chat template, and beside it what lorapipe rendered with: the template's switches and
    where the template came from (read back by `load_tokenizer`, recorded on the model version)."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(str(folder))
    (Path(folder) / TEMPLATE_RECORD).write_text(json.dumps(template_record(tokenizer), indent=2, sort_keys=True))


# sequence classifiers: modules kept unquantised under QLoRA: the heads (trained in full; transformers keeps only
# the last parameter's module, e.g. classifier.bias, out of 4 bit otherwise) and the layers between body and head
# (transformers matches a name against the start or the end of a module's path: BERT's pooler is "bert.pooler.dense")
CLASSIFIER_UNQUANTISED = ("classifier", "score", "pooler", "pooler.dense", "pre_classifier")


def quantization_config(quantization: str, compute_dtype: str, skip_modules: Optional[tuple[str, ...]] = None) -> Any:
    """QLoRA is LoRA plus this: a bitsandbytes config, or None for plain LoRA. `skip_modules` stay unquantised."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(skip_modules)} if skip_modules else {}
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(compute_dtype), **skip)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    raise ValueError(f"train.quantization: {quantization!r} is not one of none, nf4, int8")


def load_model(name_or_path: str, dtype: str, revision: Optional[str] = None, trust_remote_code: bool = False,
               quantization: str = "none", *, device: str, attn_implementation: Optional[str] = None,
               kind: ModelKind = "causal_lm", labels: Optional[list[str]] = None,
               vocab_rows: Optional[int] = None) -> Any:
    """The model on the plan's device in the plan's dtype: both come from the caller's plan, never decided here.

    `vocab_rows`: the tokenizer's length; a tokenizer that gained special tokens (a built-in chat template's) needs
    that many embedding rows, and the model grows to it (`fit_embeddings`).

    `kind` (a task's `TaskSpec.model_kind`) "sequence_classifier": an `AutoModelForSequenceClassification`; with
    `labels`, its head has that many outputs and the names go into its config (id2label / label2id), a fresh head
    where the checkpoint has another or none."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifying = kind == "sequence_classifier"
    auto_class = AutoModelForSequenceClassification if classifying else AutoModelForCausalLM
    qconf = quantization_config(quantization, dtype, CLASSIFIER_UNQUANTISED if classifying else None)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    if labels is not None:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
    if classifying:
        # which weights the checkpoint lacked (a new head; a pooler an MLM checkpoint has not): they start random and
        # must be trained and saved with the adapter, or every later load would draw them again
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report of the new head: lorapipe says which modules train
        try:
            model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(level)
        model.lorapipe_new_weights = sorted(set(info.get("missing_keys") or []) | {
            k for k, *_ in (info.get("mismatched_keys") or [])})
    else:
        model = auto_class.from_pretrained(name_or_path, **kwargs)
    if vocab_rows is not None:
        fit_embeddings(model, vocab_rows)
    if qconf is None:
        model.to(device)
    return model


def fit_embeddings(model: Any, vocab_rows: int) -> list[int]:
    """Grow the input (and an untied output) embeddings to `vocab_rows` when the tokenizer has more tokens than the
    model has rows; each new row starts as the mean of the existing ones (deterministic: the base scores the same in
    every phase, and the adapter's trained rows replace them). Returns the new rows' ids."""
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_rows <= rows:
        return []
    model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                      and m.weight.shape[0] == vocab_rows}.values():
            layer.weight[rows:] = layer.weight[:rows].float().mean(0).to(layer.weight.dtype)
    return list(range(rows, vocab_rows))
