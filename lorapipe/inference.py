"""Generate with a fine-tuned model: a merged model folder, or an adapter folder over its base (no ZenML here).

Greedy decoding that stops at the tokenizer's end-of-sequence token, with the chat template the model trained
with; each answer says whether it stopped on its own or hit max_new_tokens (the "unstoppable generation" check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lorapipe.artifacts import AdapterFolder


def inference_device() -> tuple[str, str]:
    """(device, dtype): the first CUDA GPU in its half precision, else the CPU in float32, as evaluation does."""
    from lorapipe.hardware.plan import cuda_dtype
    from lorapipe.hardware.probe import probe

    hw = probe()
    return ("cuda", cuda_dtype(hw)) if hw.cuda_available else ("cpu", "float32")


def load_for_inference(folder: str | Path, device: str, dtype: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, what was loaded). An adapter folder loads its base (named in its metadata) + the adapter."""
    from lorapipe.backends.base import read_adapter_metadata
    from lorapipe.models.loading import load_model, load_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: neither a saved model (config.json) nor a PEFT adapter "
                                "(adapter_config.json)")
    tokenizer = load_tokenizer(str(folder))
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

    from lorapipe.data.render import render
    from lorapipe.models.end_tokens import end_token_ids

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
