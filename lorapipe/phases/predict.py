"""Generate with a fine-tuned model: a merged model folder, or an adapter folder over its base (no ZenML here).

Greedy decoding that stops at the tokenizer's end-of-sequence token, with the chat template the model trained
with; each answer says whether it stopped on its own or hit max_new_tokens (the "unstoppable generation" check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lorapipe import short_lived
from lorapipe.artifacts import AdapterFolder
from lorapipe.catalog import task_spec
from lorapipe.training.adapter import task_of


def inference_device() -> tuple[str, str]:
    """(device, dtype): the first CUDA GPU in its half precision, else the CPU in float32, as evaluation does."""
    from lorapipe.hardware.plan import cuda_dtype
    from lorapipe.hardware.probe import probe

    hw = probe()
    return ("cuda", cuda_dtype(hw)) if hw.cuda_available else ("cpu", "float32")


def load_for_inference(folder: str | Path, device: str, dtype: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, what was loaded). An adapter folder loads its base (named in its metadata) + the adapter."""
    short_lived.freeze_training_imports()  # no-op unless this process runs one command and ends
    from lorapipe.models.loading import load_model, load_tokenizer
    from lorapipe.training.adapter import read_adapter_metadata

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: neither a saved model (config.json) nor a PEFT adapter "
                                "(adapter_config.json)")
    tokenizer = load_tokenizer(str(folder))
    if is_classifier(folder):
        return _load_classifier(folder, device, dtype, tokenizer)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        meta = read_adapter_metadata(folder) if (folder / AdapterFolder.METADATA_FILE).is_file() else {}
        import json

        if meta.get("result", {}).get("backend") == "mlx":
            raise FileNotFoundError(f"{folder}: an mlx-lm adapter, which transformers cannot load: use the version's "
                                    "merged model (without --adapter), or mlx_lm.generate with --adapter-path")
        base = meta.get("base_model") or json.loads((folder / "adapter_config.json").read_text())[
            "base_model_name_or_path"]
        model = load_model(base, dtype, meta.get("base_revision"), device=device)
        model = PeftModel.from_pretrained(model, str(folder)).to(device)
        described = f"adapter {folder} over {base}"
    else:
        model = load_model(str(folder), dtype, device=device)
        described = f"model {folder}"
    model.eval()
    return model, tokenizer, described


def is_classifier(folder: str | Path) -> bool:
    """A sequence classifier: a saved model whose architecture is *ForSequenceClassification, or an adapter folder
    lorapipe trained for task: classification."""
    import json

    folder = Path(folder)
    meta_path = folder / AdapterFolder.METADATA_FILE
    if meta_path.is_file():
        return task_spec(task_of(json.loads(meta_path.read_text()))).model_kind == "sequence_classifier"
    config = folder / "config.json"
    if config.is_file():
        return any(a.endswith("ForSequenceClassification")
                   for a in json.loads(config.read_text()).get("architectures") or [])
    return False


def classifier_settings(folder: str | Path) -> dict[str, Any]:
    """What a lorapipe classifier was trained with, from its adapter or merge record: the sequence length and
    whether it reads text pairs (a folder lorapipe did not write: 512 and unknown)."""
    import json

    folder = Path(folder)
    meta: dict[str, Any] = {}
    if (folder / AdapterFolder.METADATA_FILE).is_file():
        meta = json.loads((folder / AdapterFolder.METADATA_FILE).read_text())
    elif (folder / "lorapipe_merge.json").is_file():
        meta = json.loads((folder / "lorapipe_merge.json").read_text()).get("adapter_metadata", {})
    return {"max_length": (meta.get("plan") or {}).get("max_seq_length", 512), "text_pair": meta.get("text_pair")}


def _load_classifier(folder: Path, device: str, dtype: str, tokenizer: Any) -> tuple[Any, Any, str]:
    from lorapipe.models.loading import load_model
    from lorapipe.training.adapter import read_adapter_metadata

    if (folder / AdapterFolder.METADATA_FILE).is_file():
        from lorapipe.hardware.plan import PhasePlan
        from lorapipe.tasks.classification import load_tuned

        meta = read_adapter_metadata(folder)
        phase = PhasePlan(phase="evaluate", device=device, dtype=dtype, batch_size=1,
                          max_seq_length=classifier_settings(folder)["max_length"], reason="lorapipe predict")
        model = load_tuned(str(folder), meta, phase)
        described = f"classifier adapter {folder} over {meta['base_model']}"
    else:
        model = load_model(str(folder), dtype, device=device, kind="sequence_classifier")
        described = f"classifier {folder}"
    model.eval()
    return model, tokenizer, described + f" ({model.config.num_labels} labels)"


def classify(model: Any, tokenizer: Any, text: str, text_pair: Optional[str] = None,
             max_length: int = 512) -> dict[str, Any]:
    """{"text", "text_pair", "label", "probabilities": {label: p}} with the labels in the model's order."""
    import torch

    enc = tokenizer(text, text_pair, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float()[0]
    probs = torch.softmax(logits, dim=-1).cpu().tolist()
    config = getattr(model, "config", None)
    names = [config.id2label.get(i, str(i)) for i in range(len(probs))]
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"text": text, "text_pair": text_pair, "label": names[best],
            "probabilities": {name: round(p, 6) for name, p in zip(names, probs)}}


def read_rows(path: str | Path, text_key: str = "text",
              text_pair_key: Optional[str] = "text_pair") -> list[tuple[str, Optional[str]]]:
    """(text, pair) of each row of a JSONL/JSON/CSV file of texts to classify; every problem said at once."""
    from lorapipe.data.formats import iter_raw_rows

    problems: list = []
    rows: list[tuple[str, Optional[str]]] = []
    bad: list[str] = []
    for row in iter_raw_rows(path, problems):
        text = row.obj.get(text_key) if isinstance(row.obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            bad.append(f"{row.source}:{row.line}: no '{text_key}' string")
            continue
        pair = row.obj.get(text_pair_key) if text_pair_key else None
        rows.append((text, pair if isinstance(pair, str) else None))
    bad += [f"{p.source}:{p.line}: {p.message}" for p in problems]
    if bad:
        raise ValueError("cannot read the rows to classify:\n" + "\n".join(f"  {b}" for b in bad))
    return rows


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Conversations to answer from a JSONL file: each line {"prompt": "..."} or {"messages": [...]} (a trailing
    assistant turn, e.g. a reference answer, is dropped), or a plain line of text. Every bad line is named at once."""
    import json

    conversations, problems = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = line.strip()
        if isinstance(row, str):
            conversations.append([{"role": "user", "content": row}])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            conversations.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"]):
            messages = row["messages"]
            conversations.append(messages[:-1] if messages[-1].get("role") == "assistant" else messages)
        else:
            problems.append(f"{path}:{number}: expected {{\"prompt\": ...}}, {{\"messages\": [{{\"role\": ..., "
                            "\"content\": ...}}, ...]}} or a line of text")
    if problems:
        raise ValueError("\n".join(problems))
    return conversations


def generate(model: Any, tokenizer: Any, prompt: str | list[dict], max_new_tokens: int = 256,
             system: Optional[str] = None, stream: Any = None) -> dict[str, Any]:
    """Greedy answer to a user prompt (or a conversation), stopping on any end token of the chat template.
    `stream`: a text stream the answer is written to token by token as it is generated."""
    import torch

    from lorapipe.data.end_tokens import end_token_ids
    from lorapipe.data.render import render

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    text = render(tokenizer, messages, None, add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    ends = end_token_ids(tokenizer)
    streamer = None
    if stream is not None:
        from transformers import TextStreamer

        class _To(TextStreamer):
            def on_finalized_text(self, chunk: str, stream_end: bool = False) -> None:
                stream.write(chunk + ("\n" if stream_end else ""))
                stream.flush()

        streamer = _To(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=ends, pad_token_id=tokenizer.pad_token_id,
                             streamer=streamer)
    new = out[0, ids.shape[1]:].tolist()
    asked = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    return {"prompt": asked, "completion": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "stopped": any(t in ends for t in new), "new_tokens": len(new)}
