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
from pathlib import Path
from typing import Any, Iterator, Optional

from lorapipe.backends.base import PreparedData
from lorapipe.catalog import TASKS
from lorapipe.config import EvaluateSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.evaluation.metrics import BaseScores, EvalMetrics, ModelScores
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.tasks.sft import SFT, init_adapter_folder, lora_config

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
        init_adapter = data.facts["init_adapter"]
        return trainer_class(trainer_cls)(model=model, args=args, train_dataset=train_rows, eval_dataset=data.eval,
                                          processing_class=tokenizer,
                                          peft_config=None if init_adapter is not None else lora_config(t.lora),
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
        pairs = [r for r in test.records if r.rejected is not None][:evaluate.max_samples]
        if not pairs:
            raise ValueError("the test split holds no chosen/rejected pair: preference evaluation needs pairs (raise "
                             "split.test_fraction, or give pairs)")
        meta = read_adapter_metadata(adapter_dir)
        beta = float((meta.get("preference") or {}).get("beta") or 0.1)
        tokenizer = load_tokenizer(adapter_dir, chat_template=chat_template)
        generated = pairs[:evaluate.generation_samples]
        with PhaseMemory(phase.device) as memory, _policy_and_start(adapter_dir, phase) as models:
            logps, scores, generations = {}, {}, {}
            for label in ("base", "tuned"):
                with models[label]() as model:
                    logps[label] = pair_logps(model, tokenizer, pairs, phase)
                    scores[label], generations[label] = _scores(model, tokenizer, logps[label], generated, phase,
                                                                evaluate, seed)
        margins = [beta * ((tc - sc) - (tr - sr)) for (tc, tr, _, _), (sc, sr, _, _)
                   in zip(logps["tuned"], logps["base"])]
        scores["tuned"].reward_margin = sum(margins) / len(margins)
        scores["tuned"].reward_accuracy = sum(m > 0 for m in margins) / len(margins)
        samples = [{"source": t["source"], "prompt": t["prompt"], "reference": t["reference"],
                    "rejected": rec.rejected[-1]["content"] if rec.rejected else "",
                    "base": b["prediction"], "base_stopped": b["stopped"], "base_new_tokens": b["new_tokens"],
                    "tuned": t["prediction"], "tuned_stopped": t["stopped"], "tuned_new_tokens": t["new_tokens"]}
                   for rec, b, t in zip(generated, generations["base"], generations["tuned"])]
        b, t = scores["base"], scores["tuned"]
        gain = (b.perplexity - t.perplexity) / b.perplexity
        from lorapipe.tasks.sft import _generation_settings

        return EvalMetrics(test_rows=len(test), scored_rows=len(pairs), generated_rows=len(samples),
                           scored_tokens=sum(n for _, _, n, _ in logps["tuned"]), base=b, tuned=t,
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

        pairs = [r for r in test.records if r.rejected is not None][:evaluate.max_samples]
        tokenizer = load_tokenizer(folder, chat_template=chat_template)
        model = load_model(folder, phase.dtype, device=phase.device)
        try:
            scores, generations = _scores(model, tokenizer, pair_logps(model, tokenizer, pairs, phase),
                                          pairs[:evaluate.generation_samples], phase, evaluate, seed)
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

    from lorapipe.backends.peft_adapter import load_base, release_memory
    from lorapipe.training.adapter import read_adapter_metadata

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


def pair_logps(model: Any, tokenizer: Any, pairs: list[Record], phase: PhasePlan) -> list[tuple[float, float, int,
                                                                                                    int]]:
    """Per pair: (summed log-probability of the chosen answer's tokens, of the rejected answer's, chosen tokens,
    rejected tokens), each answer rendered after its prompt as training renders it, cut to the phase's length."""
    from lorapipe.evaluation.metrics import masked_loss

    out = []
    sides = {}
    for name in ("chosen", "rejected"):
        rows = [p.side(name) for p in pairs]
        _, _, row_losses = masked_loss(model, tokenizer, rows, phase.max_seq_length, phase.batch_size)
        counts = [_answer_tokens(tokenizer, r, phase.max_seq_length) for r in rows]
        sides[name] = [(-(loss or 0.0) * n, n) for loss, n in zip(row_losses, counts)]
    for (c, nc), (r, nr) in zip(sides["chosen"], sides["rejected"]):
        out.append((c, r, nc, nr))
    return out


def _answer_tokens(tokenizer: Any, rec: Record, max_length: int) -> int:
    """The tokens masked_loss scores on a row: its trained tokens after the first (a label predicts the next token)."""
    from lorapipe.data.render import encode

    mask = encode(tokenizer, rec, max_length).assistant_mask
    return sum(mask[1:])


def _scores(model: Any, tokenizer: Any, logps: list[tuple[float, float, int, int]], generated: list[Record],
            phase: PhasePlan, evaluate: EvaluateSection, seed: int) -> tuple[ModelScores, list[dict]]:
    """One model's preference scores from its pair log-probabilities, and its generations for the test prompts
    (scored against the chosen answer; ROUGE-L against the rejected one too)."""
    from lorapipe.evaluation.metrics import generate_scores, text_scores

    chosen_tokens = sum(nc for _, _, nc, _ in logps) or 1
    rejected_tokens = sum(nr for _, _, _, nr in logps) or 1
    chosen_loss = -sum(c for c, _, _, _ in logps) / chosen_tokens
    scores = ModelScores(loss=chosen_loss, perplexity=math.exp(min(chosen_loss, 50.0)), chosen_loss=chosen_loss,
                         preference_accuracy=sum(c > r for c, r, _, _ in logps) / len(logps),
                         chosen_logp_per_token=sum(c for c, _, _, _ in logps) / chosen_tokens,
                         rejected_logp_per_token=sum(r for _, r, _, _ in logps) / rejected_tokens)
    generations: list[dict] = []
    if generated:
        gscores, generations = generate_scores(model, tokenizer, [p.side("chosen") for p in generated],
                                               evaluate.max_new_tokens, phase.batch_size, seed,
                                               evaluate.generation_metrics)
        for key, value in gscores.items():
            setattr(scores, key, value)
        scores.rouge_l_rejected = text_scores([g["prediction"] for g in generations],
                                              [p.rejected[-1]["content"] if p.rejected else "" for p in generated],
                                              ["rouge_l"])["rouge_l"]
    return scores, generations
