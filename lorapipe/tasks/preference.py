"""task: preference: DPO, KTO and ORPO (`train.method`) on top of an SFT model, through TRL's trainers.

- **the starting model** is `model.name_or_path` (an SFT model folder: a merged SFT version), or that base with an SFT
  adapter (`train.init_adapter`).
- **the reference** (DPO, KTO) is the starting model, frozen, never the policy: a new LoRA adapter on the SFT model is
  switched off for the reference forward (TRL: `disable_adapter`); an SFT adapter continued by preference training is
  copied by TRL into a frozen adapter named "ref" and the reference forward runs with it. So at step 0 the policy is
  the reference, the DPO loss is ln 2 and every reward margin 0. ORPO has no reference.
- **rows**: the prompt (`Record.messages`) and the answers (`chosen`, `rejected`; or the one answer of unpaired
  feedback and its `desirable` label), handed to TRL in its conversational format, so TRL renders them with the
  project's tokenizer and chat template (the one validation checked).
- **evaluation**, on held-out pairs, of the starting model and the tuned one alike: preference accuracy (the model's
  summed log-probability of the chosen answer above the rejected one's), the mean reward margin and reward accuracy
  of the tuned model against the starting one (DPO's implicit reward, beta x the log-ratio), the chosen and rejected
  answers' mean log-probability per token, the loss on the chosen answers, and greedy generations for the test
  prompts (ROUGE-L against the chosen and the rejected answer, the stop rate).
- **after training** the adapter is a causal LM's PEFT adapter: merge, merge check and serving are SFT's, on the
  prompt with its chosen answer.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lorapipe.backends.base import PreparedData
from lorapipe.catalog import TASKS
from lorapipe.config import EvaluateSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.evaluation.metrics import BaseScores, EvalMetrics, ModelScores
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.tasks.sft import SFT, init_adapter_folder, lora_config, new_token_ids, ties_embeddings

log = logging.getLogger(__name__)

# the frozen copy of an SFT adapter TRL trains against (DPOTrainer/KTOTrainer: a PEFT model given with an adapter)
REFERENCE_ADAPTER = "ref"


def preference_trainer(method: str) -> tuple[type, type]:
    """(trainer class, config class) of `train.method` in TRL: the one place that knows where TRL keeps them (ORPO
    lives under trl.experimental in TRL 1.14; an upgrade that moves it is a change here)."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    raise ValueError(f"train.method {method!r} is not a preference method (dpo, kto, orpo)")


def trl_rows(dataset: ConversationDataset, method: str) -> Any:
    """The rows in TRL's conversational format: prompt/chosen/rejected pairs (DPO, ORPO), or prompt/completion/label
    (KTO; a pair becomes a desirable and an undesirable answer to the same prompt, as TRL's unpair_preference_dataset
    does)."""
    from datasets import Dataset

    rows: list[dict[str, Any]] = []
    for rec in dataset.records:
        if method == "kto":
            if rec.rejected is not None:
                rows.append({"prompt": rec.messages, "completion": rec.chosen, "label": True})
                rows.append({"prompt": rec.messages, "completion": rec.rejected, "label": False})
            else:
                rows.append({"prompt": rec.messages, "completion": rec.chosen, "label": bool(rec.desirable)})
        elif rec.rejected is None:
            raise ValueError(f"{rec.source}:{rec.line}: train.method {method} trains on chosen/rejected pairs; this "
                             "row is unpaired feedback (a completion and a label): set train.method: kto, or give "
                             "pairs")
        else:
            rows.append({"prompt": rec.messages, "chosen": rec.chosen, "rejected": rec.rejected})
    return Dataset.from_list(rows)


class Preference(SFT):
    """task: preference (see the module docstring). A preference model is a causal LM served as SFT's is: merge,
    merge check and serving files are SFT's, on the prompt with its chosen answer."""

    spec = TASKS["preference"]

    # ---------------------------------------------------------------------------------------------------- training

    def prepare(self, m: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                train: ConversationDataset, eval_split: ConversationDataset) -> PreparedData:
        return PreparedData(train=trl_rows(train, t.method),
                            eval=trl_rows(eval_split, t.method) if len(eval_split) else None,
                            rows=train, facts={"init_adapter": init_adapter_folder(t, m)})

    def trainer(self, model: Any, arguments: dict[str, Any], t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                data: PreparedData, callbacks: list[Any]) -> Any:
        from lorapipe.backends.trainer import trainer_class

        trainer_cls, config_cls = preference_trainer(t.method)
        p = t.preference
        settings: dict[str, Any] = {"max_length": plan.max_seq_length, "beta": p.beta}
        if t.method == "dpo":
            settings.update(loss_type=[p.loss_type], label_smoothing=p.label_smoothing,
                            precompute_ref_log_probs=p.precompute_reference)
        train_rows = data.train
        if t.method == "kto":
            settings.update(desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                            precompute_ref_log_probs=p.precompute_reference)
            # KTO's KL term pairs each answer with its neighbours' prompts in a fixed-order batch, so TRL needs the
            # sequential sampler: the rows are shuffled once here, by the run's seed (the same order every epoch)
            arguments = {**arguments, "train_sampling_strategy": "sequential"}
            train_rows = train_rows.shuffle(seed=arguments["seed"])
        args = config_cls(**arguments, **settings)
        # TRL adds the LoRA layers unless the model has them already: the SFT adapter continued (train.init_adapter),
        # or a backend that builds its own PEFT model (unsloth's get_peft_model)
        already_peft = data.facts["init_adapter"] is not None or hasattr(model, "peft_config")
        return trainer_class(trainer_cls)(model=model, args=args, train_dataset=train_rows, eval_dataset=data.eval,
                                          processing_class=tokenizer,
                                          peft_config=None if already_peft else lora_config(
                                              t.lora, new_token_ids(tokenizer), ties_embeddings(model)),
                                          callbacks=callbacks)

    def announce(self, model: Any, plan: TrainingPlan, data: PreparedData) -> None:
        reference = ("none (ORPO)" if plan.method == "orpo" else
                     "the SFT adapter, frozen (a copy named 'ref')" if data.facts["init_adapter"] is not None else
                     "the starting model (the new adapter switched off)")
        log.info("preference: %s on %d rows; reference: %s", plan.method, len(data.rows), reference)

    def train_tokens(self, trainer: Any, data: PreparedData, t: TrainSection, plan: TrainingPlan) -> int:
        """Tokens through the policy with gradients over the run: each trained side (a pair's two; KTO's one answer)
        rendered with its prompt and cut as training cuts it, counted by lorapipe's encoder (TRL names its token
        columns differently per trainer and version), times the epochs."""
        from lorapipe.data.render import RenderError, encode_batch

        sides = [r.side("chosen") for r in data.rows.records] + \
            [r.side("rejected") for r in data.rows.records if r.rejected is not None]
        tokens = sum(len(e.input_ids) for e in encode_batch(trainer.processing_class, sides, plan.max_seq_length)
                     if not isinstance(e, RenderError))
        epochs = t.epochs if t.max_steps <= 0 else 1
        return int(tokens * epochs)

    def metadata(self, trainer: Any, t: TrainSection, plan: TrainingPlan, data: PreparedData,
                 evaluating: bool) -> dict[str, Any]:
        p = t.preference
        extra = super().metadata(trainer, t, plan, data, evaluating)
        extra["preference"] = {
            "method": t.method, "beta": p.beta, "loss_type": p.loss_type if t.method == "dpo" else None,
            "label_smoothing": p.label_smoothing if t.method == "dpo" else None,
            "precompute_reference": p.precompute_reference if t.method != "orpo" else None,
            "desirable_weight": p.desirable_weight if t.method == "kto" else None,
            "undesirable_weight": p.undesirable_weight if t.method == "kto" else None,
            "reference": None if t.method == "orpo" else (
                "init_adapter" if data.facts["init_adapter"] is not None else "starting_model"),
        }
        return extra

    # -------------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, adapter_dir: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                 seed: int = 0, chat_template: Optional[str] = None, base: Optional[BaseScores] = None) -> EvalMetrics:
        """The starting model ("base": the adapter switched off, or the SFT adapter the run continued) and the tuned
        one on the same held-out pairs."""
        from lorapipe.models.loading import load_tokenizer
        from lorapipe.training.adapter import read_adapter_metadata
        from lorapipe.training.monitoring import PhaseMemory

        if base is not None:
            raise ValueError("task preference scores its starting model with the tuned one (catalog: "
                             "scores_base_apart is False)")
        answers = scored_answers(test, evaluate.max_samples)
        meta = read_adapter_metadata(adapter_dir)
        trained = meta.get("preference") or {}
        # DPO's and KTO's beta scales their implicit reward; ORPO's beta weighs its odds-ratio term, no reward: its
        # margin is the plain log-ratio against the starting model
        beta = float(trained.get("beta") or 0.1) if trained.get("method") in ("dpo", "kto") else 1.0
        tokenizer = load_tokenizer(adapter_dir, chat_template=chat_template)
        generated = _generated_rows(test, evaluate.generation_samples)
        with PhaseMemory(phase.device) as memory, _policy_and_start(adapter_dir, phase) as models:
            logps, scores, generations = {}, {}, {}
            for label in ("base", "tuned"):
                with models[label]() as model:
                    logps[label] = answer_logps(model, tokenizer, [a.record for a in answers], phase)
                    scores[label], generations[label] = _scores(model, tokenizer, answers, logps[label], generated,
                                                                phase, evaluate, seed)
        # the implicit reward of each answer against the starting model: beta x (log pi - log pi_start)
        rewards = [beta * (t - b) for (t, _), (b, _) in zip(logps["tuned"], logps["base"])]
        scores["tuned"].reward_margin, scores["tuned"].reward_accuracy = _margin_and_accuracy(answers, rewards)
        samples = [{"source": t["source"], "prompt": t["prompt"], "reference": t["reference"],
                    "rejected": rec.rejected[-1]["content"] if rec.rejected else "",
                    "base": b["prediction"], "base_stopped": b["stopped"], "base_new_tokens": b["new_tokens"],
                    "tuned": t["prediction"], "tuned_stopped": t["stopped"], "tuned_new_tokens": t["new_tokens"]}
                   for rec, b, t in zip(generated, generations["base"], generations["tuned"])]
        b, t = scores["base"], scores["tuned"]
        gain = (b.perplexity - t.perplexity) / b.perplexity
        from lorapipe.tasks.sft import _generation_settings

        return EvalMetrics(test_rows=len(test), scored_rows=len({a.row for a in answers}), generated_rows=len(samples),
                           scored_tokens=sum(n for _, n in logps["tuned"]), base=b, tuned=t,
                           perplexity_gain=gain, tuned_beats_base=t.preference_accuracy > b.preference_accuracy,
                           samples=samples, row_losses={}, memory_gib=memory.peak_gib,
                           memory_at_start_gib=memory.start_gib,
                           generation=_generation_settings(tokenizer, evaluate.max_new_tokens, phase.batch_size, seed))

    def score_folder(self, folder: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                     seed: int = 0, chat_template: Optional[str] = None) -> tuple[ModelScores, list[dict]]:
        """A merged preference model (e.g. the stage holder) scored on the test pairs as `evaluate` scores the tuned
        one, without the reward terms (they need the run's starting model)."""
        from lorapipe.models.loading import load_model, load_tokenizer
        from lorapipe.training.monitoring import free_memory

        answers = scored_answers(test, evaluate.max_samples)
        tokenizer = load_tokenizer(folder, chat_template=chat_template)
        model = load_model(folder, phase.dtype, device=phase.device)
        try:
            scores, generations = _scores(model, tokenizer, answers,
                                          answer_logps(model, tokenizer, [a.record for a in answers], phase),
                                          _generated_rows(test, evaluate.generation_samples), phase, evaluate, seed)
        finally:
            del model
            free_memory(phase.device)
        return scores, generations

    def score_base(self, m: ModelSection, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                   seed: int = 0) -> BaseScores:
        raise ValueError("task preference scores its starting model beside the tuned one: the reward margin needs "
                         "both on the same pairs")

    # ------------------------------------------------------------------------------------------------------- merge

    def check_inputs(self, tokenizer: Any, rows: list[Record], max_length: int) -> list[Any]:
        """The merge check's rows: each prompt with its chosen answer (or its one answer), as training encoded it."""
        return super().check_inputs(tokenizer, [r.side("chosen") if r.chosen is not None else r for r in rows],
                                    max_length)


@contextlib.contextmanager
def _policy_and_start(adapter_dir: str, phase: PhasePlan) -> Iterator[dict[str, Any]]:
    """{"base": the starting model, "tuned": the policy}, one loaded copy of the base: the adapter switched off (or
    switched to the frozen SFT adapter the run continued, kept in the folder as TRL saved it), and on."""
    from peft import PeftModel

    from lorapipe.backends import get_backend
    from lorapipe.backends.peft_adapter import load_base, release_memory
    from lorapipe.training.adapter import backend_of, read_adapter_metadata

    if backend_of(adapter_dir) == "mlx":  # an mlx-lm adapter: the base, and a fused copy, scored with transformers
        yield get_backend("mlx").eval_models(adapter_dir, phase)
        return
    meta = read_adapter_metadata(adapter_dir)
    model = PeftModel.from_pretrained(load_base(meta, phase.dtype, phase.device), adapter_dir).eval()
    reference = Path(adapter_dir) / REFERENCE_ADAPTER
    if (reference / "adapter_config.json").is_file():
        model.load_adapter(str(reference), adapter_name=REFERENCE_ADAPTER)

    @contextlib.contextmanager
    def start() -> Iterator[Any]:
        if REFERENCE_ADAPTER in model.peft_config:
            model.set_adapter(REFERENCE_ADAPTER)
            try:
                yield model
            finally:
                model.set_adapter("default")
        else:
            with model.disable_adapter():
                yield model

    models = {"base": start, "tuned": lambda: contextlib.nullcontext(model)}
    try:
        yield models
    finally:
        models.clear()  # the one loaded copy goes with the closures that hold it
        release_memory(phase.device)


@dataclass(frozen=True)
class ScoredAnswer:
    """One answer scored on its prompt: a pair's side (`row` names the pair) or one unpaired answer."""

    record: Record  # the prompt with this answer, as an SFT row
    desirable: bool  # chosen / labelled desirable
    row: int  # the test row it came from (a pair's two answers share it)
    paired: bool


def scored_answers(test: ConversationDataset, max_rows: int) -> list[ScoredAnswer]:
    """The answers evaluation scores: both sides of the first `max_rows` pairs, or the first `max_rows` unpaired
    answers (KTO's feedback) when the test split holds no pair; an error naming the fix when neither can be
    compared."""
    pairs = [r for r in test.records if r.rejected is not None][:max_rows]
    if pairs:
        return [ScoredAnswer(r.side(side), side == "chosen", i, True) for i, r in enumerate(pairs)
                for side in ("chosen", "rejected")]
    unpaired = [r for r in test.records if r.rejected is None and r.desirable is not None][:max_rows]
    kinds = {r.desirable for r in unpaired}
    if kinds != {True, False}:
        raise ValueError("the test split holds no chosen/rejected pair and not both desirable and undesirable answers: "
                         "preference evaluation compares the two (raise split.test_fraction, or add rows of the "
                         "missing kind)")
    return [ScoredAnswer(r.side("chosen"), bool(r.desirable), i, False) for i, r in enumerate(unpaired)]


def _generated_rows(test: ConversationDataset, n: int) -> list[Record]:
    """The rows whose prompts are generated: pairs (scored against the chosen answer), else desirable answers."""
    pairs = [r for r in test.records if r.rejected is not None]
    return (pairs or [r for r in test.records if r.desirable])[:n]


def answer_logps(model: Any, tokenizer: Any, rows: list[Record], phase: PhasePlan) -> list[tuple[float, int]]:
    """Per row: the summed log-probability of its last assistant turn's tokens (the answer being judged; earlier
    assistant turns belong to the prompt, as TRL's losses have it) and their number, the row rendered as training
    renders it and cut to the phase's length."""
    import torch

    from lorapipe.data.render import encode_judged_answer

    encoded = [encode_judged_answer(tokenizer, rec, phase.max_seq_length) for rec in rows]
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), phase.batch_size):
            batch = encoded[i:i + phase.batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for k, (row_ids, row_mask) in enumerate(batch):
                ids[k, :len(row_ids)] = torch.tensor(row_ids)
                attention[k, :len(row_ids)] = 1
                scored[k, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1))
            keep = scored[:, 1:].to(device)  # a token is predicted from the one before it
            sums = (logps.squeeze(-1) * keep).sum(-1)
            out += [(float(v), int(n)) for v, n in zip(sums.cpu(), keep.sum(-1).cpu())]
    return out


def _auc(good: list[float], bad: list[float]) -> float:
    """The share of (good, bad) combinations ranked good above bad (ties count half)."""
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


def _margin_and_accuracy(answers: list[ScoredAnswer], values: list[float]) -> tuple[float, float]:
    """Pairs: the mean of chosen minus rejected and the share above 0; unpaired: the mean of the desirable minus
    the mean of the undesirable, and the AUC of the two."""
    if answers and answers[0].paired:
        diffs = [values[i] - values[i + 1] for i in range(0, len(answers), 2)]
        return sum(diffs) / len(diffs), sum(d > 0 for d in diffs) / len(diffs)
    good = [v for a, v in zip(answers, values) if a.desirable]
    bad = [v for a, v in zip(answers, values) if not a.desirable]
    return sum(good) / len(good) - sum(bad) / len(bad), _auc(good, bad)


def _scores(model: Any, tokenizer: Any, answers: list[ScoredAnswer], logps: list[tuple[float, int]],
            generated: list[Record], phase: PhasePlan, evaluate: EvaluateSection,
            seed: int) -> tuple[ModelScores, list[dict]]:
    """One model's preference scores from its answers' log-probabilities (pairs: the summed log-probability ranks
    chosen above rejected; unpaired: the per-token log-probability ranks desirable above undesirable), and its
    generations for the test prompts (scored against the chosen answer; ROUGE-L against the rejected one too)."""
    from lorapipe.evaluation.metrics import generate_scores, text_scores

    good = [(s, n) for a, (s, n) in zip(answers, logps) if a.desirable]
    bad = [(s, n) for a, (s, n) in zip(answers, logps) if not a.desirable]
    good_tokens, bad_tokens = max(1, sum(n for _, n in good)), max(1, sum(n for _, n in bad))
    chosen_loss = -sum(s for s, _ in good) / good_tokens
    if answers[0].paired:
        _, accuracy = _margin_and_accuracy(answers, [s for s, _ in logps])
    else:
        accuracy = _auc([s / max(n, 1) for s, n in good], [s / max(n, 1) for s, n in bad])
    scores = ModelScores(loss=chosen_loss, perplexity=math.exp(min(chosen_loss, 50.0)), chosen_loss=chosen_loss,
                         preference_accuracy=accuracy, chosen_logp_per_token=-chosen_loss,
                         rejected_logp_per_token=sum(s for s, _ in bad) / bad_tokens)
    generations: list[dict] = []
    if generated:
        gscores, generations = generate_scores(model, tokenizer, [p.side("chosen") for p in generated],
                                               evaluate.max_new_tokens, phase.batch_size, seed,
                                               evaluate.generation_metrics)
        for key, value in gscores.items():
            setattr(scores, key, value)
        if all(p.rejected for p in generated):
            scores.rouge_l_rejected = text_scores([g["prediction"] for g in generations],
                                                  [p.rejected[-1]["content"] for p in generated],
                                                  ["rouge_l"])["rouge_l"]
    return scores, generations
