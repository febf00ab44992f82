"""Offline evaluation's scores and the functions that compute them: masked loss / perplexity, batched greedy
generation, and the generation metrics.

Definitions (the same for base, tuned and any model folder scored with `compare.score_model_folder`):

- **loss / perplexity**: mean NLL over assistant tokens only (the tokens training learns), batched; perplexity is
  its exp.
- **generation**: greedy (`do_sample=False`), `torch.manual_seed(seed)` first, `batch_size` prompts at a time,
  left-padded with the pad token, at most `max_new_tokens` new tokens, stopping on *every* end token
  (`lorapipe.data.end_tokens.end_token_ids`: EOS and the chat template's turn end). Padding on the left keeps
  each prompt's last token next to its first generated token; batched output equals one-at-a-time output.
- **exact_match**: share of generations equal to the reference after whitespace normalisation (runs of
  whitespace -> one space, ends stripped); case-sensitive.
- **rouge_l**: ROUGE-L F1 from `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` (sentence level, the mean over
  rows; its default tokenizer lowercases and keeps only [a-z0-9] words, no stemming), on a 0..1 scale.
- **bleu, chrf**: `sacrebleu.corpus_bleu` / `sacrebleu.corpus_chrf` over all generated rows at once (corpus level,
  one reference per row; sacrebleu's default tokenisation), on sacrebleu's 0..100 scale.
- **stop_rate** (the learned-to-stop rate): share of generations that ended on an end token before
  `max_new_tokens` ran out. A model that never learned to stop rambles until the budget ends.
- **overshoot**: for each generation, the tokens it generated (its end token not counted) beyond the reference
  answer's own length in tokens (same tokenizer, no special tokens), 0 when it is not longer; the mean over all
  generated rows. A model that stops where the reference ends scores 0; one that never stops scores about
  `max_new_tokens` minus the reference length.
- **generation_seconds**: wall time of that model's generation over all rows (not the loss scoring).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from pydantic import BaseModel, Field

from lorapipe.data.records import Record
from lorapipe.units import ReadsGbNames

TEXT_METRICS = ("exact_match", "rouge_l", "bleu", "chrf")


class EvaluationError(ValueError):
    """The test rows cannot be scored as configured (a user's fix, named in the message)."""


class ModelScores(BaseModel):
    loss: float
    perplexity: float
    rouge_l: Optional[float] = None  # 0..1, rouge-score F1, mean over rows
    exact_match: Optional[float] = None  # 0..1, whitespace-normalised
    bleu: Optional[float] = None  # 0..100, sacrebleu corpus BLEU
    chrf: Optional[float] = None  # 0..100, sacrebleu corpus chrF
    stop_rate: Optional[float] = None  # learned-to-stop rate: generations ending on an end token
    overshoot: Optional[float] = None  # mean tokens generated beyond the reference's length
    generation_seconds: Optional[float] = None  # wall time of this model's generation
    # task: preference (lorapipe.tasks.preference): on held-out pairs
    preference_accuracy: Optional[float] = None  # share of pairs whose chosen answer has the higher log-probability
    reward_margin: Optional[float] = None  # tuned only: mean DPO implicit reward of chosen minus rejected (vs start)
    reward_accuracy: Optional[float] = None  # tuned only: share of pairs with a positive implicit reward margin
    chosen_loss: Optional[float] = None  # mean NLL per token of the chosen answers
    chosen_logp_per_token: Optional[float] = None
    rejected_logp_per_token: Optional[float] = None
    rouge_l_rejected: Optional[float] = None  # ROUGE-L of the generations against the rejected answers
    # task: classification (see lorapipe.tasks.classification): over every test row
    accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    weighted_f1: Optional[float] = None
    ece: Optional[float] = None  # expected calibration error, 10 bins of the top label's probability


class BaseScores(BaseModel):
    """The untuned base alone, scored on a test split as `evaluate` scores a tuned model (task sft): computed once
    per (base model, test rows, evaluation settings) by its own cached step and handed to every evaluation of an
    adapter trained on that base, so retraining with other hyperparameters does not score the base again."""

    model: str  # the base's hub id or folder
    revision: Optional[str] = None
    scores: ModelScores
    scored_tokens: int
    row_losses: list[Optional[float]]
    generations: list[dict]  # per generated row: source, prompt, reference, prediction, stopped, new_tokens
    memory_gib: float = 0.0  # the scoring's peak (as EvalMetrics.memory_gib)
    memory_at_start_gib: Optional[float] = None


class EvalMetrics(ReadsGbNames):
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
    memory_gib: float = 0.0  # this phase's peak: CUDA's allocated peak, the process's resident high-water mark on CPU
    memory_at_start_gib: Optional[float] = None  # what the process held when the phase began
    # how the generations were made: max_new_tokens, batch_size, greedy, seed, end_tokens
    generation: dict[str, Any] = Field(default_factory=dict)
    # task: classification: every model's report (majority, head_only, tuned), per-class scores and confusion matrix
    classification: Optional["ClassifierEvaluation"] = None


class ClassifierEvaluation(BaseModel):
    """A classifier against its baselines on the test split: `base` of EvalMetrics is the untuned model (the head
    trained alone on the frozen base, else the majority class)."""

    labels: list[str]
    reports: dict[str, Any]  # model name -> lorapipe.evaluation.classification.ClassificationReport (as a dict)
    baselines: list[str]  # the names in `reports` that are baselines
    untuned: str  # which baseline `base` holds

    def report(self, name: str) -> Any:
        from lorapipe.evaluation.classification import ClassificationReport

        return ClassificationReport.model_validate(self.reports[name])


@dataclass
class StopStatistics:
    stopped: list[bool]  # per generation: ended on an end token
    lengths: list[int]  # per generation: tokens generated, its end token not counted
    overshoots: list[int]  # per generation: max(0, length - reference length)
    stop_rate: Optional[float]  # None when nothing was generated
    overshoot: Optional[float]


def stop_statistics(new_tokens: list[list[int]], reference_lengths: list[int],
                    end_ids: Iterable[int]) -> StopStatistics:
    """The learned-to-stop rate and the mean overshoot (see the module docstring) of generations given as their new
    token ids, as `generate_batched` returns them (cut after the first end token; a row that never stopped holds
    its `max_new_tokens` tokens). Pure: no model, no tokenizer."""
    if len(new_tokens) != len(reference_lengths):
        raise ValueError(f"{len(new_tokens)} generations but {len(reference_lengths)} reference lengths")
    ends = set(end_ids)
    stopped, lengths = [], []
    for tokens in new_tokens:
        first_end = next((i for i, t in enumerate(tokens) if t in ends), None)
        stopped.append(first_end is not None)
        lengths.append(len(tokens) if first_end is None else first_end)
    overshoots = [max(0, n - ref) for n, ref in zip(lengths, reference_lengths)]
    count = len(new_tokens)
    return StopStatistics(stopped=stopped, lengths=lengths, overshoots=overshoots,
                          stop_rate=sum(stopped) / count if count else None,
                          overshoot=sum(overshoots) / count if count else None)


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def text_scores(predictions: list[str], references: list[str],
                metrics: Iterable[str] = TEXT_METRICS) -> dict[str, Optional[float]]:
    """The asked text metrics of predictions against references, through rouge-score and sacrebleu (definitions
    and scales in the module docstring); None for a metric not asked or when there is no row."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    asked = set(metrics)
    unknown = asked - set(TEXT_METRICS)
    if unknown:
        raise ValueError(f"evaluate.generation_metrics: {sorted(unknown)} not among {list(TEXT_METRICS)}")
    scores: dict[str, Optional[float]] = dict.fromkeys(TEXT_METRICS)
    n = len(predictions)
    if not n:
        return scores
    if "exact_match" in asked:
        scores["exact_match"] = sum(normalise_whitespace(p) == normalise_whitespace(r)
                                    for p, r in zip(predictions, references)) / n
    if "rouge_l" in asked:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores["rouge_l"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n
    if "bleu" in asked or "chrf" in asked:
        import sacrebleu

        if "bleu" in asked:
            scores["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
        if "chrf" in asked:
            scores["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    return scores


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


def generate_batched(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
                     end_ids: list[int], seed: int) -> list[list[int]]:
    """Greedy generation for each prompt, `batch_size` prompts at a time, left-padded with the pad token, stopping
    on any of `end_ids`. Returns each prompt's new token ids in the prompts' order, cut after the first end token
    (a row that finished before its batch carries pad tokens after it; they are not part of its generation)."""
    import torch

    from lorapipe.progress import progress

    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids), None)
    ends = set(end_ids)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    # longest first: rows of similar length share a batch (less padding), and the largest batch runs first, so
    # an out-of-memory shows at once
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: list[list[int]] = [[] for _ in prompts]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column: every prompt must end there
    torch.manual_seed(seed)
    model.eval()
    try:
        for start in progress(range(0, len(order), batch_size), "generating", unit="batch"):
            rows = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(input_ids=enc["input_ids"].to(device),
                                     attention_mask=enc["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, eos_token_id=list(end_ids) or None,
                                     pad_token_id=pad_id)
            for row, new in zip(rows, out[:, enc["input_ids"].shape[1]:].tolist()):
                first_end = next((k for k, t in enumerate(new) if t in ends), None)
                results[row] = new if first_end is None else new[:first_end + 1]
    finally:
        tokenizer.padding_side = padding_side
    return results


@dataclass
class GenerationRow:
    source: str  # file:line
    prompt: str  # the conversation up to the answer, rendered with the generation prompt
    asked: str  # the last user message, for the side-by-side table
    reference: str  # the answer in the data


def generation_rows(tokenizer: Any, records: list[Record]) -> list[GenerationRow]:
    """The rows that can be generated: conversations ending on an assistant answer (plain text rows have no
    prompt/answer boundary and are skipped)."""
    from lorapipe.data.render import render, tool_schemas

    rows = []
    for rec in records:
        if rec.text is not None or not rec.messages or rec.messages[-1]["role"] != "assistant":
            continue
        prompt_msgs = rec.messages[:-1]
        asked = next((m for m in reversed(prompt_msgs) if m["role"] == "user"), prompt_msgs[-1] if prompt_msgs else {})
        rows.append(GenerationRow(
            source=f"{rec.source}:{rec.line}",
            prompt=render(tokenizer, prompt_msgs, tool_schemas(rec.tools), add_generation_prompt=True),
            asked=asked.get("content") or "", reference=rec.messages[-1]["content"] or ""))
    return rows


def generate_scores(model: Any, tokenizer: Any, records: list[Record], max_new_tokens: int, batch_size: int = 1,
                    seed: int = 0, metrics: Iterable[str] = TEXT_METRICS,
                    end_ids: Optional[list[int]] = None) -> tuple[dict, list[dict]]:
    """Generate every generable row and score it: the text metrics asked, the learned-to-stop rate, the mean
    overshoot and the generation time (ModelScores fields), and one sample per row (source, prompt, reference,
    prediction, stopped, new_tokens)."""
    from lorapipe.data.end_tokens import end_token_ids

    end_ids = end_ids if end_ids is not None else end_token_ids(tokenizer)
    rows = generation_rows(tokenizer, records)
    if not rows:
        return {}, []
    started = time.perf_counter()
    new_tokens = generate_batched(model, tokenizer, [r.prompt for r in rows], max_new_tokens, batch_size, end_ids,
                                  seed)
    seconds = time.perf_counter() - started
    ends = set(end_ids)
    predictions = [tokenizer.decode([t for t in tokens if t not in ends], skip_special_tokens=True).strip()
                   for tokens in new_tokens]
    references = [r.reference.strip() for r in rows]
    reference_lengths = [len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]
    stops = stop_statistics(new_tokens, reference_lengths, end_ids)
    scores = {**text_scores(predictions, references, metrics), "stop_rate": stops.stop_rate,
              "overshoot": stops.overshoot, "generation_seconds": round(seconds, 3)}
    samples = [{"source": r.source, "prompt": r.asked[:500], "reference": r.reference[:500], "prediction": p[:500],
                "stopped": s, "new_tokens": n}
               for r, p, s, n in zip(rows, predictions, stops.stopped, stops.lengths)]
    return scores, samples


EvalMetrics.model_rebuild()
