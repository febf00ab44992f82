"""task: preference on the mlx backend: DPO and ORPO with mlx-lm-lora's losses, inside lorapipe's own mlx loop.

The loop, data order, checkpoints, resume and monitor are SFT's (`lorapipe.backends.mlx_training`); only the objective
differs, and this module is it:

- **rows**: a pair's two sides, each its prompt with that answer rendered as SFT renders a row (`Record.side`), cut to
  plan.max_seq_length. Only the last assistant turn's tokens are scored (the answer judged; earlier assistant turns
  belong to the prompt), as `lorapipe.tasks.preference.answer_logps` scores them in evaluation.
- **micro-batches**: k pairs are one forward of 2k sequences (the k chosen, then the k rejected); the step's loss is
  the mean over its pairs.
- **losses**: mlx-lm-lora's own, `dpo_loss` over `compute_score(get_token_scores(...))` (sigmoid, ipo, hinge) and
  `orpo_loss` over `get_logps`.
- **the DPO reference** is the starting model, `model.name_or_path`: the model as LoRA'd before the first step, which
  computes the base exactly (LoRA's B starts at zero). It is scored once, in eval mode, before resume loads a
  checkpoint's weights, so a resumed run compares against the starting model, never the checkpoint; the scores are
  written to `work_dir/dpo_reference.json`. ORPO has no reference.

mlx and mlx-lm-lora imports stay inside the functions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends.mlx_training import MicroBatch
from lorapipe.catalog import BACKENDS
from lorapipe.config import PreferenceSection, TrainSection
from lorapipe.data.records import Record
from lorapipe.hardware.plan import TrainingPlan

log = logging.getLogger(__name__)

REFERENCE_SCORES = "dpo_reference.json"  # in the run's work_dir: the reference scores the run trained against


@dataclass(frozen=True)
class EncodedSide:
    """One side of a pair: its token ids and 1 on the judged answer's tokens."""

    ids: list[int]
    answer_mask: list[int]


def encode_side(tokenizer: Any, side: Record, max_length: int) -> EncodedSide:
    """A pair's side (`Record.side`) rendered as training renders an SFT row, scored on its last assistant turn."""
    from lorapipe.data.render import encode_judged_answer

    return EncodedSide(*encode_judged_answer(tokenizer, side, max_length))


def encode_pairs(tokenizer: Any, records: list[Record], max_length: int,
                 method: str) -> list[tuple[EncodedSide, EncodedSide]]:
    """(chosen, rejected) of every row; a ValueError naming the rows that are no pair, or when the cut leaves no
    pair an answer on both sides."""
    unpaired = [f"{r.source}:{r.line}" for r in records if r.rejected is None]
    if unpaired:
        more = f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else ""
        raise ValueError(f"train.method {method} trains on chosen/rejected pairs; rows of unpaired feedback (a "
                         f"completion and a label): {', '.join(unpaired[:3])}{more}. Give pairs, or set train.method: "
                         "kto with train.backend: hf")
    pairs = [(encode_side(tokenizer, r.side("chosen"), max_length),
              encode_side(tokenizer, r.side("rejected"), max_length)) for r in records]
    # position 0 is never predicted, so an answer counts from the second token on
    cut = sum(1 for c, r in pairs if not any(c.answer_mask[1:]) or not any(r.answer_mask[1:]))
    if cut == len(pairs):
        raise ValueError(f"train.max_seq_length={max_length} cuts away an answer of every pair (the prompts are "
                         "longer): raise train.max_seq_length, or shorten the prompts")
    if cut:
        log.warning("%d of %d pairs have an answer cut away entirely by train.max_seq_length=%d: they add no signal",
                    cut, len(pairs), max_length)
    return pairs


def pad_sides(pairs: list[tuple[EncodedSide, EncodedSide]], pad_id: int) -> tuple[Any, Any, int]:
    """(ids, answer mask, real tokens) of k pairs as 2k right-padded rows: the k chosen sides, then the k rejected.
    mlx-lm-lora's scorers shift by one themselves (position i predicts token i + 1, scored where the mask of i + 1
    is 1); padding sits after the real tokens, so causal attention never sees it, and its mask is 0."""
    import mlx.core as mx
    import numpy as np

    sides = [c for c, _ in pairs] + [r for _, r in pairs]
    width = max(max(len(s.ids) for s in sides), 2)
    ids = np.full((len(sides), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(sides), width), dtype=np.float32)
    for row, side in enumerate(sides):
        ids[row, :len(side.ids)] = side.ids
        mask[row, :len(side.answer_mask)] = side.answer_mask
    return mx.array(ids), mx.array(mask), sum(len(s.ids) for s in sides)


# ------------------------------------------------------------------------------------------------------- losses


def dpo_pair_loss(model: Any, ids: Any, mask: Any, reference: tuple[Any, Any],
                  p: PreferenceSection) -> tuple[Any, Any, Any]:
    """(mean DPO loss over the k pairs, chosen rewards, rejected rewards), by mlx-lm-lora. The rewards are DPO's
    implicit ones per pair, beta x (policy - reference): mlx-lm-lora's own `accuracies` compares the batch means."""
    from mlx_lm_lora.trainer.dpo_trainer import compute_score, dpo_loss, get_token_scores

    k = ids.shape[0] // 2
    scores = compute_score(get_token_scores(model, ids, mask), mask, p.loss_type)
    ref_chosen, ref_rejected = reference
    loss, _, _, _ = dpo_loss(scores[:k], scores[k:], ref_chosen, ref_rejected, mask[:k], mask[k:], p.beta,
                             delta=0.0, loss_type=p.loss_type)  # delta: only dpop's, which is not offered
    return loss, p.beta * (scores[:k] - ref_chosen), p.beta * (scores[k:] - ref_rejected)


def orpo_pair_loss(model: Any, ids: Any, mask: Any, reference: tuple[Any, ...],
                   p: PreferenceSection) -> tuple[Any, Any, Any]:
    """(mean ORPO loss over the k pairs, chosen rewards, rejected rewards), by mlx-lm-lora; ORPO's rewards (TRL's and
    mlx-lm-lora's): beta x the answer's mean log-probability per token."""
    import mlx.core as mx
    from mlx_lm_lora.trainer.orpo_trainer import get_logps, orpo_loss

    k = ids.shape[0] // 2
    logps, logits_mean = get_logps(model, ids, mask)
    loss, _, _, _ = orpo_loss(logps[:k], logits_mean, logps[k:], logits_mean, mask[:k], mask[k:],
                              preference_scores=mx.ones((k,)), beta=p.beta)
    return loss, p.beta * logps[:k], p.beta * logps[k:]


PAIR_LOSSES = {"dpo": dpo_pair_loss, "orpo": orpo_pair_loss}


class PreferenceObjective:
    """The objective of `lorapipe.backends.mlx_training.StepRunner` for task preference: rows are pairs, the loss is
    `train.method`'s (`PAIR_LOSSES`) as a mean over the step's pairs, the metrics TRL's reward margin and accuracy."""

    def __init__(self, pairs: list[tuple[EncodedSide, EncodedSide]], pad_id: int, t: TrainSection,
                 reference: Optional[tuple[Any, Any]]) -> None:
        self.pairs, self.pad_id, self.settings, self.reference = pairs, pad_id, t.preference, reference
        self.rows = len(pairs)
        self.pair_loss = PAIR_LOSSES[t.method]
        self.metadata = preference_metadata(t)

    def batch(self, indices: list[int]) -> MicroBatch:
        import mlx.core as mx

        ids, mask, real = pad_sides([self.pairs[i] for i in indices], self.pad_id)
        reference = () if self.reference is None else tuple(mx.array(r[indices]) for r in self.reference)
        return MicroBatch((ids, mask, *reference), len(indices), real)

    def loss(self, model: Any, arrays: tuple[Any, ...], denominator: Any) -> tuple[Any, dict[str, Any]]:
        import mlx.core as mx

        ids, mask, *reference = arrays
        mean, chosen, rejected = self.pair_loss(model, ids, mask, tuple(reference), self.settings)
        k = ids.shape[0] // 2
        # TRL's names, which the hf backend's log has and the task's progress line shows
        return mean * k / denominator, {"rewards/margins": (chosen - rejected).sum(),
                                        "rewards/accuracies": (chosen > rejected).astype(mx.float32).sum()}


# ---------------------------------------------------------------------------------------------- the reference


def reference_scores(model: Any, pairs: list[tuple[EncodedSide, EncodedSide]], micro: int, pad_id: int,
                     loss_type: str) -> tuple[Any, Any]:
    """(chosen, rejected) float32 numpy arrays: each pair's reference score as `dpo_pair_loss` compares the policy's
    with it (the answer's summed log-probability; ipo: its mean per token), by `model` in eval mode (no dropout),
    `micro` pairs a forward."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm_lora.trainer.dpo_trainer import compute_score, get_token_scores

    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), micro):
        ids, mask, _ = pad_sides(pairs[start:start + micro], pad_id)
        scores = compute_score(get_token_scores(model, ids, mask), mask, loss_type)
        mx.eval(scores)
        k = ids.shape[0] // 2
        chosen.append(np.array(scores[:k], dtype=np.float32))
        rejected.append(np.array(scores[k:], dtype=np.float32))
    model.train()
    return np.concatenate(chosen), np.concatenate(rejected)


def check_settings(t: TrainSection) -> None:
    """What preflight refuses on mlx, said again for a direct call: the reference and the losses depend on it."""
    spec, p = BACKENDS["mlx"], t.preference
    problems = []
    if t.method not in PAIR_LOSSES:
        problems.append(f"train.method={t.method} is not available on the mlx backend; set train.method to one of "
                        f"{', '.join(PAIR_LOSSES)}, or train.backend: hf")
    if t.method == "dpo" and spec.dpo_loss_types is not None and p.loss_type not in spec.dpo_loss_types:
        problems.append(f"train.preference.loss_type={p.loss_type} is not available on the mlx backend; set it to "
                        f"one of {', '.join(spec.dpo_loss_types)}, or train.backend: hf")
    if t.method == "dpo" and p.label_smoothing and not spec.dpo_label_smoothing:
        problems.append(f"train.preference.label_smoothing={p.label_smoothing} is not available on the mlx backend: "
                        "set it to 0, or train.backend: hf")
    if t.init_adapter:
        problems.append("train.init_adapter is not available on the mlx backend (the reference is model.name_or_path): "
                        "merge the SFT adapter into its base and set model.name_or_path to the merged folder")
    if problems:
        raise ValueError("; ".join(problems))


def preference_metadata(t: TrainSection) -> dict[str, Any]:
    """The adapter metadata's "preference" block, the keys the hf backend writes (`Preference.metadata`)."""
    p, dpo = t.preference, t.method == "dpo"
    return {"preference": {
        "method": t.method, "beta": p.beta, "loss_type": p.loss_type if dpo else None,
        "label_smoothing": p.label_smoothing if dpo else None,
        "precompute_reference": True if dpo else None,  # mlx always scores the reference once, before training
        "desirable_weight": None, "undesirable_weight": None,  # KTO's, which mlx does not train
        "reference": "starting_model" if dpo else None,
    }}


def preference_objective(model: Any, tokenizer: Any, t: TrainSection, plan: TrainingPlan, records: list[Record],
                         pad_id: int, work_dir: Path, starting_model: str) -> PreferenceObjective:
    """The objective of `train.method` on `records`. DPO's reference is scored here, by `model` as it is now: call
    it on the freshly LoRA'd model, before resume loads a checkpoint."""
    check_settings(t)
    try:  # the losses' package: said before any pair is encoded, with the install command
        import mlx_lm_lora  # noqa: F401
    except ImportError as exc:
        from lorapipe.backends.base import BackendUnavailable

        raise BackendUnavailable.not_importable("mlx", "mlx-lm-lora (preference tuning on mlx)", exc) from None
    pairs = encode_pairs(tokenizer, records, plan.max_seq_length, t.method)
    reference = None
    if t.method == "dpo":
        reference = reference_scores(model, pairs, plan.micro_batch_size, pad_id, t.preference.loss_type)
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / REFERENCE_SCORES).write_text(json.dumps({
            "reference": "starting_model", "model": starting_model, "loss_type": t.preference.loss_type,
            "chosen": [float(v) for v in reference[0]], "rejected": [float(v) for v in reference[1]]}))
    return PreferenceObjective(pairs, pad_id, t, reference)
