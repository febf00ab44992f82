"""README.md of a merged model: a Hugging Face model card (YAML front matter, then Markdown) written from what the
merge step knows: the adapter's own metadata (base model, plan, training config and result, data fingerprint) and
the merge check. Evaluation runs beside the merge, so its metrics are not here; the card says where they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lorapipe.catalog import task_spec

MODEL_CARD = "README.md"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows])


def front_matter(adapter_meta: dict, check: dict, ollama_family: Optional[str]) -> dict:
    """The card's metadata. `base_model`, `library_name`, `pipeline_tag` and `tags` are the hub's own keys; the
    training data is named by its content hash under `lorapipe`, not under the hub's `datasets` (which takes
    dataset ids: a hash there would link to a dataset that does not exist)."""
    plan = adapter_meta.get("plan", {})
    quantization = plan.get("quantization", "none")
    tags = ["lorapipe", "lora", "peft" if plan.get("backend") != "mlx" else "mlx", "merged"]
    if quantization != "none":
        tags.append("qlora")
    if ollama_family:
        tags.append("ollama")
    classifier = task_spec(adapter_meta.get("task") or "sft").model_kind == "sequence_classifier"
    if classifier:
        tags = ["lorapipe", "text-classification"] + (["lora", "peft", "merged"] if adapter_meta.get("method") != "full"
                                                      else ["full-fine-tune"]) + (["qlora"] if quantization != "none"
                                                                                  else [])
    meta: dict[str, Any] = {"base_model": adapter_meta.get("base_model"), "library_name": "transformers",
                            "pipeline_tag": "text-classification" if classifier else "text-generation", "tags": tags}
    meta["lorapipe"] = {
        "train_data_sha256": adapter_meta.get("data_fingerprint"),
        "base_revision": adapter_meta.get("base_revision"),
        "backend": plan.get("backend"), "quantization": quantization,
        "merged_dtype": check.get("dtype"), "merge_check_passed": check.get("passed"),
    }
    return meta


def model_card(adapter_meta: dict, check: dict, *, test_rows: int, adapter_fingerprint: str,
               ollama_family: Optional[str], ollama_note: str, files: list[str]) -> str:
    """The whole README.md. `test_rows`: the held-out split's size (the merge check used the first few)."""
    import yaml

    plan = adapter_meta.get("plan", {})
    result = adapter_meta.get("result", {})
    cfg = adapter_meta.get("training_config", {})
    lora = cfg.get("lora", {})
    base = adapter_meta.get("base_model", "?")
    quantization = plan.get("quantization", "none")
    dtype = check.get("dtype", "?")
    meta = front_matter(adapter_meta, check, ollama_family)

    training = _table([
        ("base model", base), ("base revision", adapter_meta.get("base_revision")),
        ("backend", result.get("backend", plan.get("backend"))), ("device", result.get("device", plan.get("device"))),
        ("training dtype", plan.get("dtype")), ("quantization", quantization),
        *([("method", "full fine-tuning: every weight")] if adapter_meta.get("method") == "full" else [
            ("LoRA r / alpha / dropout", f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}"),
            ("target modules", ", ".join(lora["target_modules"]) if isinstance(lora.get("target_modules"), list)
             else lora.get("target_modules"))]),
        ("epochs", cfg.get("epochs")), ("learning rate", cfg.get("learning_rate")),
        ("effective batch size", plan.get("effective_batch_size")), ("max sequence length", plan.get("max_seq_length")),
        ("seed", adapter_meta.get("seed")), ("training rows", result.get("train_rows")), ("steps", result.get("steps")),
        ("final train loss", result.get("train_loss")), ("tokens trained", result.get("train_tokens")),
        ("training seconds", result.get("train_seconds")),
        ("training data sha256", adapter_meta.get("data_fingerprint")), ("adapter sha256", adapter_fingerprint),
    ])
    merge = _table([
        ("merged dtype", dtype), ("rows compared", check.get("rows_checked")),
        ("max abs logit difference", check.get("max_abs_logit_diff")),
        ("mean abs logit difference", check.get("mean_abs_logit_diff")),
        ("greedy-token agreement", check.get("greedy_agreement")), ("tolerance (max abs)", check.get("tolerance")),
        ("passed", check.get("passed")),
    ])
    qlora = ("\n- Trained as QLoRA on a 4-bit base, merged into the 16-bit base: merging into quantised weights would "
             "round the adapter's update away. The merged model therefore differs slightly from the 4-bit base + "
             "adapter that training and evaluation ran." if quantization != "none" else "")
    ollama = (f"`ollama create <name> -f Modelfile` from this folder; its TEMPLATE is translated from the "
              f"{ollama_family} chat template ({ollama_note})." if ollama_family else
              f"the Modelfile here has no TEMPLATE: {ollama_note}. Write one before serving chat with Ollama.")
    if task_spec(adapter_meta.get("task") or "sft").model_kind == "sequence_classifier":
        return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + _classifier_body(
            adapter_meta, check, training, merge, test_rows, files, qlora)
    body = f"""# {Path(str(base)).name} + LoRA, merged ({dtype})

A LoRA adapter fine-tuned by lorapipe on `{base}`, folded into a {dtype} copy of the base
weights. It loads like its base: no PEFT needed.

## Training

{training}

## Merge check

The merged weights were saved, reloaded and compared with the base + adapter (unmerged) on the first
{check.get("rows_checked")} rows of the held-out test split: logits position by position, and the greedy (argmax)
token at each position.

{merge}

## Evaluation

Not in this card: evaluation runs beside the merge in lorapipe's pipeline. Its metrics (perplexity, generation
scores, the learned-to-stop rate, base vs tuned) are recorded on this model's version in ZenML's model registry
(`lorapipe runs`, `lorapipe lineage`, or the dashboard).

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

`generation_config.json` lists every end token (EOS and the chat template's turn end), so `generate` stops at the
end of the assistant's turn. Ollama: {ollama}

## Limits

- Evaluated offline only, on held-out rows of the training data's own distribution (the test split held
  {test_rows} rows); no safety, bias or out-of-distribution evaluation was run.
- The merge check covers {check.get("rows_checked")} rows: it proves the merge is faithful to the adapter, not that
  the adapter is good.
- Trained on {result.get("train_rows", "?")} rows; the base model's license and limits apply.{qlora}

## Files

{", ".join(f"`{f}`" for f in files)}
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def _classifier_body(adapter_meta: dict, check: dict, training: str, merge: str, test_rows: int, files: list[str],
                     qlora: str) -> str:
    """The card of a sequence classifier: its labels, how it loads, how the merge was checked (label logits)."""
    base = adapter_meta.get("base_model", "?")
    full = adapter_meta.get("method") == "full"
    labels = adapter_meta.get("labels") or []
    label_table = "\n".join(["| id | label | training rows |", "|---|---|---|"] + [
        f"| {i} | {name} | {_fmt((adapter_meta.get('train_class_counts') or {}).get(name))} |"
        for i, name in enumerate(labels)])
    how = (f"`{base}` with every weight fine-tuned" if full else
           f"a LoRA adapter and a trained classification head on `{base}`, folded into a {check.get('dtype')} copy of "
           "the base weights")
    how = "full fine-tune" if full else "LoRA, merged"
    return f"""# {Path(str(base)).name} classifier ({len(labels)} labels, {how})

A sequence classifier trained by lorapipe: {how}. It loads with its labels (`id2label` in `config.json`).

## Labels

{label_table}

## Training

{training}

## Merge check

The saved model was reloaded and its label logits compared with the trained model's on the first
{check.get("rows_checked")} rows of the held-out test split (and the predicted label of each).

{merge}

## Evaluation

Not in this card: the classification report (accuracy, macro/weighted F1, per-class scores, the confusion matrix,
calibration) against the majority class and the head-only baseline is recorded on this model's version in ZenML's
model registry (`lorapipe lineage`, or the dashboard).

## Use

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
probs = model(**tokenizer(["a text"], return_tensors="pt")).logits.softmax(-1)
```

or `lorapipe predict path/to/this/folder "a text"`.

## Limits

- Evaluated offline only, on held-out rows of the training data's own distribution (the test split held
  {test_rows} rows).
- It predicts one of its {len(labels)} labels for any text, including texts unlike any it was trained on.{qlora}

## Files

{", ".join(f"`{f}`" for f in files)}
"""


def write_model_card(folder: str | Path, text: str) -> Path:
    path = Path(folder) / MODEL_CARD
    path.write_text(text, encoding="utf-8")
    return path
