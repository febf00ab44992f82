"""Offline evaluation's scores and the functions that compute them: masked loss / perplexity, generation metrics.

`evaluate.load("rouge")` needs the hub, so ROUGE-L is computed here (LCS over whitespace tokens).
The stop rate counts generations that ended on EOS before `max_new_tokens`: the symptom of a model
that never learned to stop.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from lorapipe.data.records import Record


class ModelScores(BaseModel):
    loss: float
    perplexity: float
    rouge_l: Optional[float] = None
    exact_match: Optional[float] = None
    stop_rate: Optional[float] = None


class EvalMetrics(BaseModel):
    test_rows: int
    scored_rows: int
    generated_rows: int
    scored_tokens: int
    base: ModelScores
    tuned: ModelScores
    perplexity_gain: float  # relative: (base - tuned) / base
    tuned_beats_base: bool
    samples: list[dict]  # per generated row: source, prompt, reference, base and tuned generation, stopped or not
    # per scored row (same order): mean masked NLL of base and tuned, for the per-row comparison
    row_losses: dict[str, list[Optional[float]]] = Field(default_factory=dict)
    memory_gb: float = 0.0  # this phase's peak on CUDA (counter reset first), the process RSS on CPU


def rouge_l(prediction: str, reference: str) -> float:
    a, b = prediction.split(), reference.split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def masked_loss(model: Any, tokenizer: Any, records: list[Record], max_length: int,
                batch_size: int) -> tuple[float, int, list[Optional[float]]]:
    """Mean token NLL over assistant tokens only, the number of tokens scored, and each row's own mean NLL."""
    import torch

    from lorapipe.data.render import encode

    device = next(model.parameters()).device
    total, count = 0.0, 0
    per_row: list[float] = []
    encs = [encode(tokenizer, r, max_length) for r in records]
    model.eval()
    from lorapipe.progress import progress

    with torch.no_grad():
        for i in progress(range(0, len(encs), batch_size), "scoring loss", unit="batch"):
            batch = encs[i:i + batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for k, e in enumerate(batch):
                n = len(e.input_ids)
                ids[k, :n] = torch.tensor(e.input_ids)
                att[k, :n] = 1
                labels[k, :n] = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, e.assistant_mask)])
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            token_nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100,
                reduction="none").view(shift_labels.shape)
            trained = (shift_labels != -100)
            total += float(token_nll.sum())
            count += int(trained.sum())
            # a row whose trained tokens were all cut off has no loss (None), not a loss of 0
            per_row += [float(r.sum() / m.sum()) if m.any() else None for r, m in zip(token_nll, trained)]
    return (total / count if count else float("nan")), count, per_row


def generate_scores(model: Any, tokenizer: Any, records: list[Record], max_new_tokens: int) -> tuple[dict, list[dict]]:
    import torch

    from lorapipe.data.render import render, tool_schemas

    device = next(model.parameters()).device
    from lorapipe.progress import progress

    rouge, exact, stops, samples = [], [], [], []
    for rec in progress(records, "generating"):
        if rec.text is not None or not rec.messages or rec.messages[-1]["role"] != "assistant":
            continue
        prompt_msgs, reference = rec.messages[:-1], rec.messages[-1]["content"]
        prompt = render(tokenizer, prompt_msgs, tool_schemas(rec.tools), add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        stopped = tokenizer.eos_token_id in new
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        rouge.append(rouge_l(text, reference))
        exact.append(float(text == reference.strip()))
        stops.append(float(stopped))
        asked = next((m for m in reversed(prompt_msgs) if m["role"] == "user"), prompt_msgs[-1])
        samples.append({"source": f"{rec.source}:{rec.line}", "prompt": (asked.get("content") or "")[:500],
                        "prediction": text[:500], "reference": reference[:500], "stopped": stopped})
    n = len(rouge)
    scores = {"rouge_l": sum(rouge) / n if n else None, "exact_match": sum(exact) / n if n else None,
              "stop_rate": sum(stops) / n if n else None}
    return scores, samples
