"""task: classification's model and trainer: the base as a sequence classifier with the frozen labels, which modules
train in full (the head, and weights the checkpoint lacks), LoRA with `modules_to_save`, the rows tokenised with their
label ids, transformers' Trainer with the classifier's metrics and, with `train.class_weights: balanced`, a weighted
loss. Shared by the fine-tune and its head-only baseline."""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan

HEAD_NAMES = ("classifier", "score")  # transformers' sequence-classification heads (encoders, decoders)


def plan_labels(plan: TrainingPlan) -> list[str]:
    """The frozen label set the plan carries (ids 0..n-1)."""
    labels = list(plan.labels)
    if len(labels) < 2:
        raise ValueError("task: classification needs the label set in the training plan (from the validation "
                         "report): run the pipeline's validate and preflight steps first")
    return labels


def load_classifier(m: ModelSection, plan: TrainingPlan, labels: Optional[list[str]], tokenizer: Any,
                    device: Optional[str] = None) -> Any:
    """The base as a sequence classifier with the frozen labels (a fresh head when the base has none), on the plan's
    device and dtype."""
    from lorapipe.models.loading import load_model

    # full fine-tuning keeps fp32 master weights (the Trainer autocasts to plan.dtype): plan.load_dtype
    model = load_model(m.name_or_path, plan.load_dtype, m.revision, m.trust_remote_code, plan.quantization,
                       device=device or plan.device, attn_implementation=m.attn_implementation,
                       kind="sequence_classifier", labels=labels)
    if model.config.pad_token_id is None:
        # decoders classify from the last non-pad token: the model must know which id pads
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def tokenize_rows(dataset: ConversationDataset, tokenizer: Any, max_length: int, label2id: dict[str, int]) -> Any:
    """A `datasets.Dataset` of input_ids / attention_mask (/ token_type_ids) and the label id, truncated."""
    from datasets import Dataset

    texts = [r.text or "" for r in dataset.records]
    pairs = [r.text_pair or "" for r in dataset.records] if any(r.text_pair is not None for r in dataset.records) \
        else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    unknown = sorted({r.label for r in dataset.records if r.label not in label2id}, key=str)
    if unknown:
        raise ValueError(f"{dataset.name} split: label(s) {', '.join(map(repr, unknown))} are not in the frozen "
                         f"label set {list(label2id)}")
    columns = {k: list(v) for k, v in enc.items()}
    columns["labels"] = [label2id[r.label] for r in dataset.records]
    return Dataset.from_dict(columns)


def class_counts(dataset: ConversationDataset, labels: list[str]) -> dict[str, int]:
    counts = Counter(r.label for r in dataset.records)
    return {name: counts.get(name, 0) for name in labels}


def balanced_weights(counts: dict[str, int]) -> list[float]:
    """n / (k x n_c): scikit-learn's 'balanced' class weights (a class without training rows gets weight 0)."""
    n, k = sum(counts.values()), len(counts)
    return [n / (k * c) if c else 0.0 for c in counts.values()]


def trainer_metrics(labels: list[str]) -> Any:
    """`compute_metrics` for the Trainer: accuracy, macro and weighted F1 of the eval split."""
    def compute(eval_pred: Any) -> dict[str, float]:
        import numpy as np

        from lorapipe.evaluation.classification import classification_report

        logits, true = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        report = classification_report(true.tolist(), np.argmax(logits, axis=-1).tolist(), labels)
        return {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "weighted_f1": report.weighted_f1}

    return compute


def weighted_loss(weights: Optional[list[float]]) -> Any:
    """The Trainer's `compute_loss_func` for class weights (None: the model's own cross-entropy)."""
    if weights is None:
        return None

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        import torch

        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        w = torch.tensor(weights, dtype=torch.float32, device=logits.device)
        labels = labels.to(logits.device)
        if num_items_in_batch is None:  # one batch alone: torch's weighted mean
            return torch.nn.functional.cross_entropy(logits.float(), labels, weight=w)
        # over gradient accumulation the Trainer divides by nothing: the sum over the micro-batch, divided by the rows
        # of the whole accumulated batch (balanced weights average 1 over the data, so this is their weighted mean)
        total = torch.nn.functional.cross_entropy(logits.float(), labels, weight=w, reduction="sum")
        return total / torch.as_tensor(num_items_in_batch, device=total.device)

    return loss


def classifier_trainer(model: Any, arguments: dict[str, Any], tokenizer: Any, train_ds: Any, eval_ds: Any,
                       labels: list[str], weights: Optional[list[float]], callbacks: list[Any]) -> Any:
    """transformers' Trainer over a classifier's rows, padded to the longest of each batch, with lorapipe's Trainer
    additions (`lorapipe.backends.trainer.trainer_class`)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from lorapipe.backends.trainer import trainer_class

    trainer = trainer_class(Trainer)(
        model=model, args=TrainingArguments(**arguments, remove_unused_columns=False), train_dataset=train_ds,
        eval_dataset=eval_ds, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=trainer_metrics(labels), compute_loss_func=weighted_loss(weights), callbacks=callbacks)
    # classifiers take **kwargs in forward, so the Trainer would think they divide their loss over gradient
    # accumulation themselves; their mean loss does not: the Trainer must (or weighted_loss does)
    trainer.model_accepts_loss_kwargs = False
    return trainer


def checkpoint_files(method: str, world_size: int = 1) -> tuple[str, ...]:
    """A classifier checkpoint: the adapter (LoRA and the head's copy), or the whole model (full fine-tuning)."""
    from lorapipe.backends.trainer import checkpoint_files as trainer_checkpoint_files

    return trainer_checkpoint_files(world_size,
                                    "adapter_model.safetensors" if method == "lora" else "model.safetensors")


def wrap_lora(model: Any, m: ModelSection, t: TrainSection, plan: TrainingPlan, heads: list[str]) -> Any:
    """LoRA (QLoRA) on the body, the head modules trained in full (`modules_to_save`), the trained weights in fp32."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if plan.quantization != "none":
        quantised = [name for name, module in model.named_modules() if in_modules(name, heads)
                     and type(module).__name__ in ("Linear4bit", "Linear8bitLt")]
        if quantised:  # a module trained in full must hold real weights, not 4/8-bit codes
            raise ValueError(f"train.quantization={plan.quantization}: {', '.join(quantised)} of {m.name_or_path} "
                             "loaded quantised, but it is trained in full (a head, or weights the checkpoint lacks): "
                             "set train.quantization: none for this model")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    config = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout, bias=t.lora.bias,
                        target_modules=t.lora.target_modules, task_type="SEQ_CLS", modules_to_save=list(heads))
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError: the names are another architecture's
        if "No modules were targeted" not in str(exc):
            raise
        import torch

        names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                        if isinstance(mod, torch.nn.Linear) and not in_modules(n, heads)})
        raise ValueError(f"train.lora.target_modules {t.lora.target_modules} matches no layer of {m.name_or_path}; "
                         f"its linear layers are named {', '.join(names)}: set train.lora.target_modules: "
                         "all-linear, or names from that list") from None
    trainable_in_fp32(model)
    return model


def head_modules(model: Any) -> list[str]:
    """The modules trained in full and saved with the adapter: the classification head, and every module whose
    weights the checkpoint lacked (a pooler an MLM checkpoint has not, DistilBERT's pre_classifier), which would
    otherwise stay random and be drawn again at every load."""
    names = [n for n in HEAD_NAMES if hasattr(model, n)]
    new = [key.rsplit(".", 1)[0] for key in getattr(model, "lorapipe_new_weights", [])]
    names += [m for m in dict.fromkeys(new) if not any(m == n or m.startswith(n + ".") for n in names)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}: "
                         "lorapipe cannot tell which modules to train in full")
    return names


def in_modules(param_name: str, modules: list[str]) -> bool:
    return any(param_name == m or param_name.startswith(m + ".") for m in modules)


def trainable_in_fp32(model: Any) -> None:
    """The weights that train (LoRA, the head's copy) in fp32: a 16-bit base leaves the head's copy 16-bit, where
    AdamW's small steps round away; the Trainer's autocast still computes in the plan's dtype."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
