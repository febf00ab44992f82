"""task: classification's offline evaluation: the tuned classifier against its baselines on every test row.

Models compared, on the same rows, on the evaluate phase's device, dtype and batch size:

- **majority**: always the most frequent label of the training split (its probabilities: the training frequencies);
- **head_only**: the untuned model, the base with only its classification head trained (`train.head_only_baseline`,
  trained beside the fine-tune with the same schedule);
- **tuned**: base + adapter (LoRA and the head), or the fully fine-tuned model.

Each gets accuracy, macro/weighted precision, recall and F1, the per-class report, the confusion matrix and the
expected calibration error (`lorapipe.evaluation.classification`); the loss is the mean cross-entropy of the true
label. A saved classifier folder (the merged model, a stage holder's) is scored the same way by
`score_classifier_folder`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.evaluation.metrics import ClassifierEvaluation, EvalMetrics, ModelScores
from lorapipe.hardware.plan import PhasePlan

SAMPLE_ROWS = 20  # test rows shown with every model's prediction in the report


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


def load_head_only(adapter_dir: str, meta: dict, phase: PhasePlan) -> Optional[Any]:
    """The untuned baseline: the base classifier with the head the baseline trained, or None when none was."""
    from safetensors.torch import load_file

    from lorapipe.backends.hf_classifier import BASELINE_DIR, BASELINE_WEIGHTS
    from lorapipe.backends.peft_adapter import _base

    weights = Path(adapter_dir) / BASELINE_DIR / BASELINE_WEIGHTS
    if not weights.is_file():
        return None
    model = _base(meta, phase.dtype, phase.device)
    missing = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{weights}: weights {missing.unexpected_keys[:3]} are not in the base's head")
    return model.to(phase.device)


def load_tuned(adapter_dir: str, meta: dict, phase: PhasePlan) -> Any:
    """base + adapter (LoRA and the trained head), or the fully fine-tuned model in the adapter folder."""
    from lorapipe.backends.peft_adapter import _base
    from lorapipe.models.loading import load_model

    if meta.get("method") == "full":
        return load_model(adapter_dir, phase.dtype, device=phase.device, task="classification")
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(meta, phase.dtype, phase.device), adapter_dir)


def evaluate_classifier(adapter_dir: str, test: ConversationDataset, phase: PhasePlan, max_length: int) -> EvalMetrics:
    """The tuned classifier, the head-only baseline and the majority class on every test row."""
    from lorapipe.backends.base import read_adapter_metadata
    from lorapipe.evaluation.classification import classification_report, majority_baseline
    from lorapipe.models.loading import load_tokenizer
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
        for name, loader in (("head_only", load_head_only), ("tuned", load_tuned)):
            model = loader(adapter_dir, meta, phase)
            if model is None:
                continue
            probs, tokens = predict(model, tokenizer, records, max_length, phase.batch_size)
            del model
            free_memory(phase.device)
            predicted = [max(range(len(p)), key=p.__getitem__) for p in probs]
            reports[name] = classification_report(true, predicted, labels, probs)
            scores[name] = _scores(reports[name], probs, true)
            predictions[name] = predicted
    untuned = "head_only" if "head_only" in scores else "majority"
    base, tuned = scores[untuned], scores["tuned"]
    samples = [{"source": r.source, "line": r.line, "text": r.text, "text_pair": r.text_pair, "label": r.label,
                **{name: labels[p[i]] for name, p in predictions.items()}} for i, r in enumerate(records[:SAMPLE_ROWS])]
    for name in reports:
        print(f"{name:>10}: accuracy {reports[name].accuracy:.3f}, macro F1 {reports[name].macro_f1:.3f}, weighted F1 "
              f"{reports[name].weighted_f1:.3f}" + (f", ECE {reports[name].ece:.3f}" if reports[name].ece is not None
                                                     else ""), flush=True)
    return EvalMetrics(
        test_rows=len(records), scored_rows=len(records), generated_rows=0, scored_tokens=tokens, base=base,
        tuned=tuned, perplexity_gain=(base.perplexity - tuned.perplexity) / base.perplexity,
        tuned_beats_base=(tuned.macro_f1 or 0) > (base.macro_f1 or 0), samples=samples,
        memory_gb=memory.gb, memory_at_start_gb=memory.start_gb,
        classification=ClassifierEvaluation(labels=labels, reports={k: v.model_dump() for k, v in reports.items()},
                                            baselines=[k for k in reports if k != "tuned"], untuned=untuned))


def score_classifier_folder(model_dir: str, test: ConversationDataset, phase: PhasePlan,
                            max_length: int) -> ModelScores:
    """A saved classifier (a merged model: AutoModelForSequenceClassification with its id2label) on every test row,
    scored as `evaluate_classifier` scores the tuned one. Raises ValueError when the folder is not a classifier of
    the test rows' labels."""
    from lorapipe.evaluation.classification import classification_report
    from lorapipe.models.loading import load_model, load_tokenizer
    from lorapipe.training.monitoring import free_memory

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, phase.dtype, device=phase.device, task="classification")
    try:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        true = _true_ids(test.records, labels)
        probs, _ = predict(model, tokenizer, test.records, max_length, phase.batch_size)
    finally:
        del model
        free_memory(phase.device)
    predicted = [max(range(len(p)), key=p.__getitem__) for p in probs]
    return _scores(classification_report(true, predicted, labels, probs), probs, true)
