"""task: classification, a label per text (or text pair): `AutoModelForSequenceClassification`, encoder or decoder.

- **rows**: text (and an optional pair) with a label; the label set is frozen before training (the validation
  report's, carried by the plan) and written into the model's config (id2label / label2id), so the merged model
  loads with its labels;
- **model**: `train.method: lora`: PEFT `task_type=SEQ_CLS`, the head (classifier / score, and weights the checkpoint
  lacks, such as a pooler) trained in full through `modules_to_save`, the body through LoRA (QLoRA with
  `train.quantization`, the head kept unquantised); `full`: every weight, for small encoders (fp32 master weights);
- **trainer**: transformers' Trainer with padding to the longest row, evaluation every `train.eval_steps` by
  accuracy and macro/weighted F1, early stopping, the best checkpoint by `train.metric_for_best_model` (macro F1);
  `train.class_weights: balanced` weighs each class's loss by n / (k x its rows in the training split);
- **baseline**: `train.head_only_baseline` trains the head alone on the frozen base with the same schedule
  (`lorapipe.tasks.classification.baseline`), the untuned model evaluation compares the fine-tune with;
- **evaluation**: the tuned classifier, the head-only baseline and the majority class on every test row: accuracy,
  macro/weighted precision, recall and F1, per class, the confusion matrix, calibration
  (`lorapipe.evaluation.classification`); promoted by macro F1 unless register.primary_metric says otherwise;
- **merge check**: the merged classifier's label logits against base + adapter, and how often both pick the same
  label; no generation config or Modelfile (Ollama serves generation, not classifiers).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends.base import PreparedData
from lorapipe.catalog import TASKS
from lorapipe.config import EvaluateSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.evaluation.merge_check import MergeCheck, ReferenceLogits
from lorapipe.evaluation.metrics import BaseScores, ClassifierEvaluation, EvalMetrics, ModelScores
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.tasks.classification import baseline
from lorapipe.tasks.classification.model import (
    balanced_weights,
    class_counts,
    classifier_trainer,
    head_modules,
    load_classifier,
    plan_labels,
    tokenize_rows,
    wrap_lora,
)

log = logging.getLogger(__name__)

SAMPLE_ROWS = 20  # test rows shown with every model's prediction in the report


# -------------------------------------------------------------------------------------------------------- evaluation


def predict(model: Any, tokenizer: Any, records: list[Record], max_length: int,
            batch_size: int) -> tuple[list[list[float]], int]:
    """(label probabilities per row, tokens read), `batch_size` rows at a time, right-padded."""
    import torch

    probs: list[list[float]] = []
    tokens = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            pairs = [r.text_pair or "" for r in batch] if any(r.text_pair is not None for r in batch) else None
            enc = tokenizer([r.text or "" for r in batch], pairs, truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
            tokens += int(enc["attention_mask"].sum())
            logits = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float()
            probs.extend(torch.softmax(logits, dim=-1).cpu().tolist())
    return probs, tokens


def _scores(report: Any, probs: list[list[float]], true: list[int]) -> ModelScores:
    nll = [-math.log(max(p[t], 1e-12)) for p, t in zip(probs, true)]
    loss = sum(nll) / len(nll)
    return ModelScores(loss=loss, perplexity=math.exp(min(loss, 50.0)), accuracy=report.accuracy,
                       macro_f1=report.macro_f1, weighted_f1=report.weighted_f1, ece=report.ece)


def _true_ids(records: list[Record], labels: list[str]) -> list[int]:
    label2id = {name: i for i, name in enumerate(labels)}
    unknown = sorted({r.label for r in records if r.label not in label2id}, key=str)
    if unknown:
        raise ValueError(f"test rows carry label(s) {', '.join(map(repr, unknown))} the model was not trained on "
                         f"(its labels: {labels})")
    return [label2id[r.label] for r in records]


def load_tuned(adapter_dir: str, meta: dict, phase: PhasePlan) -> Any:
    """base + adapter (LoRA and the trained head), or the fully fine-tuned model in the adapter folder."""
    from lorapipe.backends.peft_adapter import load_base
    from lorapipe.models.loading import load_model

    if meta.get("method") == "full":
        return load_model(adapter_dir, phase.dtype, device=phase.device, kind="sequence_classifier")
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(meta, phase.dtype, phase.device), adapter_dir)


class Classification:
    """task: classification (see the module docstring)."""

    spec = TASKS["classification"]

    # ---------------------------------------------------------------------------------------------------- training

    def tokenizer(self, m: ModelSection) -> Any:
        from lorapipe.models.loading import load_tokenizer

        return load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code)

    def prepare(self, m: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                train: ConversationDataset, eval_split: ConversationDataset) -> PreparedData:
        labels = plan_labels(plan)
        label2id = {name: i for i, name in enumerate(labels)}
        counts = class_counts(train, labels)
        return PreparedData(
            train=tokenize_rows(train, tokenizer, plan.max_seq_length, label2id),
            eval=tokenize_rows(eval_split, tokenizer, plan.max_seq_length, label2id) if len(eval_split) else None,
            rows=train,
            facts={"labels": labels, "counts": counts,
                   "weights": balanced_weights(counts) if t.class_weights == "balanced" else None})

    def load_model(self, m: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any, data: PreparedData,
                   device: str) -> Any:
        """The base as a classifier with the frozen labels: LoRA (QLoRA) and the head saved in full, or every
        weight. The modules trained in full are recorded on the model (`lorapipe_heads`)."""
        model = load_classifier(m, plan, data.facts["labels"], tokenizer, device)
        heads = head_modules(model)
        if plan.method == "lora":
            model = wrap_lora(model, m, t, plan, heads)
        data.facts["heads"] = heads
        return model

    def trainer(self, model: Any, arguments: dict[str, Any], t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                data: PreparedData, callbacks: list[Any]) -> Any:
        f = data.facts
        return classifier_trainer(model, arguments, tokenizer, data.train, data.eval, f["labels"], f["weights"],
                                  callbacks)

    def announce(self, model: Any, plan: TrainingPlan, data: PreparedData) -> None:
        f, labels = data.facts, data.facts["labels"]
        quantized = f", QLoRA {plan.quantization}" if plan.quantization != "none" else ""
        log.info("training a %d-label classifier (%s%s) on %d rows; trained in full: %s; labels %s%s%s", len(labels),
                 plan.method, quantized, len(data.rows), ", ".join(f["heads"]), ", ".join(labels[:8]),
                 " ..." if len(labels) > 8 else "",
                 f"; class weights {[round(w, 3) for w in f['weights']]}" if f["weights"] else "")

    def train_tokens(self, trainer: Any, data: PreparedData, t: TrainSection, plan: TrainingPlan) -> int:
        tokens = sum(len(x) for x in data.train["input_ids"])
        return int(tokens * min(t.epochs, trainer.state.epoch or t.epochs))

    def metadata(self, trainer: Any, t: TrainSection, plan: TrainingPlan, data: PreparedData,
                 evaluating: bool) -> dict[str, Any]:
        from lorapipe.training.checkpoints import checkpoint_step

        state, f = trainer.state, data.facts
        stopped_early = evaluating and bool(t.early_stopping_patience) and state.global_step < state.max_steps
        best = {"metric": trainer.args.metric_for_best_model, "value": state.best_metric,
                "step": checkpoint_step(Path(state.best_model_checkpoint)) if state.best_model_checkpoint else None,
                "loaded": bool(trainer.args.load_best_model_at_end)}
        if stopped_early:
            log.info("early stopping at step %d of %d: %d evaluation(s) without %s improving by more than %g (best %s "
                     "at step %s)", state.global_step, state.max_steps, t.early_stopping_patience, best["metric"],
                     t.early_stopping_threshold, best["value"], best["step"])
        return {"method": plan.method, "labels": f["labels"],
                "head_modules": f["heads"], "train_class_counts": f["counts"], "class_weights": f["weights"],
                "best": best, "stopped_early": stopped_early, "max_steps": state.max_steps,
                "text_pair": any(r.text_pair is not None for r in data.rows.records),
                "pad_token_id": trainer.processing_class.pad_token_id}

    def after_training(self, m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, tokenizer: Any,
                       data: PreparedData, work_dir: Path, adapter_dir: Path, is_main: bool) -> None:
        """The head-only baseline, beside the adapter (see lorapipe.tasks.classification.baseline)."""
        baseline.train_baseline(m, t, seed, plan, tokenizer, data, work_dir, adapter_dir, is_main)

    def checkpoint_files(self, plan: TrainingPlan, world_size: int) -> tuple[str, ...]:
        from lorapipe.tasks.classification.model import checkpoint_files

        return checkpoint_files(plan.method, world_size)

    # -------------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, adapter_dir: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                 seed: int = 0, chat_template: Optional[str] = None, base: Optional[BaseScores] = None) -> EvalMetrics:
        """The tuned classifier, the head-only baseline and the majority class on every test row (no generation:
        nothing to sample, so `evaluate`'s row limits and the seed do not apply). The baselines depend on the run's
        label set, so they are scored here, never handed in (`base` must be None: the catalog's scores_base_apart)."""
        if base is not None:
            raise ValueError("task classification scores its baselines with the tuned classifier: base scores were "
                             "handed in (catalog: scores_base_apart is False)")
        from lorapipe.evaluation.classification import (
            classification_report,
            comparison_table,
            majority_baseline,
            report_table,
        )
        from lorapipe.models.loading import load_tokenizer
        from lorapipe.training.adapter import read_adapter_metadata
        from lorapipe.training.monitoring import PhaseMemory, free_memory

        records = test.records
        if not records:
            raise ValueError("the test split is empty: raise split.test_fraction or add data")
        meta = read_adapter_metadata(adapter_dir)
        labels = meta["labels"]
        true = _true_ids(records, labels)
        tokenizer = load_tokenizer(adapter_dir, trust_remote_code=meta.get("trust_remote_code", False))
        reports: dict[str, Any] = {}
        scores: dict[str, ModelScores] = {}
        predictions: dict[str, list[int]] = {}
        majority = majority_baseline(meta["train_class_counts"], true, labels)
        reports["majority"] = majority
        total = sum(meta["train_class_counts"].values())
        freq = [meta["train_class_counts"][name] / total for name in labels]
        scores["majority"] = _scores(majority, [freq] * len(true), true)
        predictions["majority"] = [max(range(len(labels)), key=lambda i: (freq[i], -i))] * len(true)
        tokens = 0
        with PhaseMemory(phase.device) as memory:
            for name, loader in (("head_only", baseline.load_baseline), ("tuned", load_tuned)):
                model = loader(adapter_dir, meta, phase)
                if model is None:
                    continue
                probs, tokens = predict(model, tokenizer, records, phase.max_seq_length, phase.batch_size)
                del model
                free_memory(phase.device)
                predicted = [max(range(len(p)), key=p.__getitem__) for p in probs]
                reports[name] = classification_report(true, predicted, labels, probs)
                scores[name] = _scores(reports[name], probs, true)
                predictions[name] = predicted
        untuned = "head_only" if "head_only" in scores else "majority"
        base, tuned = scores[untuned], scores["tuned"]
        samples = [{"source": r.source, "line": r.line, "text": r.text, "text_pair": r.text_pair, "label": r.label,
                    **{name: labels[p[i]] for name, p in predictions.items()}}
                   for i, r in enumerate(records[:SAMPLE_ROWS])]
        # the baselines beside the tuned classifier, then its per-label report and confusion matrix
        for line in comparison_table(reports, digits=3) + [""] + report_table(reports["tuned"], digits=3):
            log.info("%s", line)
        return EvalMetrics(
            test_rows=len(records), scored_rows=len(records), generated_rows=0, scored_tokens=tokens, base=base,
            tuned=tuned, perplexity_gain=(base.perplexity - tuned.perplexity) / base.perplexity,
            tuned_beats_base=(tuned.macro_f1 or 0) > (base.macro_f1 or 0), samples=samples,
            memory_gib=memory.peak_gib, memory_at_start_gib=memory.start_gib,
            classification=ClassifierEvaluation(labels=labels, reports={k: v.model_dump() for k, v in reports.items()},
                                                baselines=[k for k in reports if k != "tuned"], untuned=untuned))

    def score_base(self, m: ModelSection, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                   seed: int = 0) -> BaseScores:
        raise ValueError("task classification has no untuned base to score apart: its baselines (the majority class, "
                         "the head-only classifier) are of the run's own labels and scored in its evaluation")

    def score_folder(self, folder: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                     seed: int = 0, chat_template: Optional[str] = None) -> tuple[ModelScores, list[dict]]:
        """A saved classifier (a merged model: AutoModelForSequenceClassification with its id2label) on every test
        row, scored as `evaluate` scores the tuned one; no generations. Raises ValueError when the folder is not a
        classifier of the test rows' labels."""
        from lorapipe.evaluation.classification import classification_report
        from lorapipe.models.loading import load_model, load_tokenizer
        from lorapipe.training.monitoring import free_memory

        tokenizer = load_tokenizer(folder)
        model = load_model(folder, phase.dtype, device=phase.device, kind="sequence_classifier")
        try:
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            true = _true_ids(test.records, labels)
            probs, _ = predict(model, tokenizer, test.records, phase.max_seq_length, phase.batch_size)
        finally:
            del model
            free_memory(phase.device)
        predicted = [max(range(len(p)), key=p.__getitem__) for p in probs]
        return _scores(classification_report(true, predicted, labels, probs), probs, true), []

    # ------------------------------------------------------------------------------------------------------- merge

    def check_inputs(self, tokenizer: Any, rows: list[Record], max_length: int) -> list[Any]:
        """Each check row's text (and pair) encoded as training encoded it."""
        return [dict(tokenizer(rec.text, rec.text_pair, truncation=True, max_length=max_length, return_tensors="pt"))
                for rec in rows]

    def compare_merged(self, folder: str | Path, inputs: list[Any], reference: ReferenceLogits, phase: PhasePlan,
                       tolerance: float) -> MergeCheck:
        """The merged classifier reloaded with AutoModelForSequenceClassification: its label logits against the
        reference, and how often both pick the same label."""
        import torch

        from lorapipe.backends.peft_adapter import forward_logits, release_memory
        from lorapipe.models.loading import load_model

        reloaded = load_model(str(folder), phase.dtype, device=phase.device, kind="sequence_classifier").eval()
        max_diff, diff_sum, agree = 0.0, 0.0, 0
        with torch.no_grad():
            for row, enc in enumerate(inputs):
                got = forward_logits(reloaded, enc).float().cpu()[0]
                ref = next(reference.slices(row, got.shape[0])).float()
                agree += int(ref.argmax() == got.argmax())
                d = (ref - got).abs()
                max_diff = max(max_diff, float(d.max()))
                diff_sum += float(d.mean())
        del reloaded
        release_memory(phase.device)
        return MergeCheck(dtype=phase.dtype, max_abs_logit_diff=max_diff, mean_abs_logit_diff=diff_sum / len(inputs),
                          tolerance=tolerance, passed=max_diff <= tolerance, rows_checked=len(inputs),
                          greedy_agreement=agree / len(inputs), positions_checked=len(inputs))

    def serving_files(self, folder: Path, tokenizer: Any) -> tuple[list[str], Optional[str], str]:
        """None: Ollama serves text generation, not classifiers."""
        return [], None, "a sequence classifier: Ollama serves text generation"
