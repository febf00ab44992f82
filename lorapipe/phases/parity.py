"""Serving parity: the same test prompts, greedily, through base+adapter (rendered with the adapter's tokenizer, as
evaluation scored it) and through the merged folder as it will be served (its own saved tokenizer, chat template and
template switches; its own weights, loaded afresh). The merge check compares logits on token ids made once; this
compares what a user of the served model gets: a merged tokenizer with another template, a lost template switch or
weights that round differently show here as a prompt rendered to other tokens or an answer that parts ways.

A divergence is tolerated only where the adapter itself nearly tied: its two best logits at that position within
the dtype's tolerance (rounding may then pick either). Anything else fails, and the version is not promoted.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel

from lorapipe.data.records import Record
from lorapipe.hardware.plan import PhasePlan


class ParityRow(BaseModel):
    source: str
    same_prompt_tokens: bool
    adapter_tokens: int
    served_tokens: int
    first_divergence: Optional[int] = None  # index of the first generated token that differs; None: identical
    near_tie: bool = False  # the divergence is where the adapter's top two logits were within the tolerance


class ServingParity(BaseModel):
    form: str  # what was served: "merged" (later forms: each exported file)
    prompts: int
    max_new_tokens: int
    identical: int  # prompts whose prompt tokens and answer are identical
    tolerance: float
    passed: bool
    reason: str
    rows: list[ParityRow]


def parity_prompts(records: list[Record], n: int) -> list[tuple[str, list[dict], Any]]:
    """(source, prompt messages, tools) of the first `n` rows that end on an assistant answer."""
    from lorapipe.data.render import tool_schemas

    out = []
    for rec in records:
        messages = rec.messages if rec.chosen is None else [*rec.messages, *(rec.chosen or [])]
        if rec.text is None and messages and messages[-1]["role"] == "assistant":
            out.append((f"{rec.source}:{rec.line}", messages[:-1], tool_schemas(rec.tools)))
        if len(out) == n:
            break
    return out


def _greedy(model: Any, tokenizer: Any, prompts: list[tuple[str, list[dict], Any]],
            max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) of each prompt, rendered with `tokenizer`'s template, one at a time (no padding:
    nothing but the model and the template decides the tokens)."""
    import torch

    from lorapipe.data.end_tokens import end_token_ids
    from lorapipe.data.render import render

    ends = end_token_ids(tokenizer)
    device = next(model.parameters()).device
    out = []
    model.eval()
    for _, messages, tools in prompts:
        ids = tokenizer(render(tokenizer, messages, tools, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            generated = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                                       do_sample=False, num_beams=1, eos_token_id=ends or None,
                                       pad_token_id=tokenizer.pad_token_id)
        out.append((ids, generated[0, len(ids):].tolist()))
    return out


def _top_two_gap(model: Any, ids: list[int]) -> tuple[float, list[int]]:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), top.indices.tolist()


def serving_parity(adapter_dir: str, served_dir: str, records: list[Record], phase: PhasePlan, samples: int,
                   max_new_tokens: int, tolerance: float) -> ServingParity:
    """Generate the first `samples` test prompts through base+adapter and through the folder as served; see the
    module docstring. One model is loaded at a time (the merge plan's peak)."""
    from lorapipe.backends import get_backend
    from lorapipe.backends.peft_adapter import release_memory
    from lorapipe.models.loading import load_model, load_tokenizer
    from lorapipe.training.adapter import backend_of

    prompts = parity_prompts(records, samples)
    if not prompts:
        return ServingParity(form="merged", prompts=0, max_new_tokens=max_new_tokens, identical=0,
                             tolerance=tolerance, passed=True, rows=[],
                             reason="no test row ends on an assistant answer: nothing to generate")
    adapter_tokenizer = load_tokenizer(adapter_dir)
    with get_backend(backend_of(adapter_dir)).eval_models(adapter_dir, phase)["tuned"]() as model:
        adapter = _greedy(model, adapter_tokenizer, prompts, max_new_tokens)
    release_memory(phase.device)
    served_tokenizer = load_tokenizer(served_dir)
    served_model = load_model(served_dir, phase.dtype, device=phase.device)
    served = _greedy(served_model, served_tokenizer, prompts, max_new_tokens)
    rows: list[ParityRow] = []
    divergences: list[tuple[int, int]] = []  # (row, position) where the answers part ways
    for k, ((source, _, _), (a_prompt, a_new), (s_prompt, s_new)) in enumerate(zip(prompts, adapter, served)):
        first = next((i for i, (x, y) in enumerate(zip(a_new, s_new)) if x != y),
                     None if len(a_new) == len(s_new) else min(len(a_new), len(s_new)))
        rows.append(ParityRow(source=source, same_prompt_tokens=a_prompt == s_prompt, adapter_tokens=len(a_new),
                              served_tokens=len(s_new), first_divergence=first))
        if a_prompt == s_prompt and first is not None:
            divergences.append((k, first))
    del served_model
    release_memory(phase.device)
    if divergences:  # was the adapter itself torn between the two tokens there?
        with get_backend(backend_of(adapter_dir)).eval_models(adapter_dir, phase)["tuned"]() as model:
            for k, position in divergences:
                a_prompt, a_new = adapter[k]
                gap, best = _top_two_gap(model, a_prompt + a_new[:position])
                served_token = served[k][1][position] if position < len(served[k][1]) else None
                rows[k].near_tie = gap <= tolerance and served_token in best
        release_memory(phase.device)
    other_prompt = [r.source for r in rows if not r.same_prompt_tokens]
    apart = [r for r in rows if r.first_divergence is not None and r.same_prompt_tokens and not r.near_tie]
    identical = sum(r.same_prompt_tokens and r.first_divergence is None for r in rows)
    if other_prompt:
        reason = (f"the served tokenizer renders {len(other_prompt)} of {len(rows)} prompts to other tokens than "
                  f"training did (first: {other_prompt[0]}): its chat template or template switches differ")
    elif apart:
        reason = (f"{len(apart)} of {len(rows)} answers part ways with base+adapter beyond a near tie (first: "
                  f"{apart[0].source} at generated token {apart[0].first_divergence})")
    else:
        reason = f"{identical} of {len(rows)} answers identical" + (
            f", {len(rows) - identical} parting at a near tie (top two logits within {tolerance:g})"
            if identical < len(rows) else "")
    return ServingParity(form="merged", prompts=len(rows), max_new_tokens=max_new_tokens, identical=identical,
                         tolerance=tolerance, passed=not other_prompt and not apart, reason=reason, rows=rows)
