"""task: classification on the hf backend: `AutoModelForSequenceClassification` trained with transformers' Trainer.

- `train.method: lora`: PEFT `task_type=SEQ_CLS`; the classification head (classifier / score) is trained in full
  through `modules_to_save`, the body through LoRA (QLoRA with `train.quantization`). `full`: every weight, for
  small encoders.
- evaluation every `train.eval_steps` with accuracy and macro/weighted F1, early stopping (patience, threshold),
  the best checkpoint reloaded at the end by `train.metric_for_best_model` (macro F1 by default);
- `train.class_weights: balanced`: the loss weighs each class by n / (k x its rows in the training split);
- the label set is frozen before training (the validation report's, carried by the plan) and written into the
  model's config (id2label / label2id), so the merged model loads with its labels;
- `train.head_only_baseline`: the head alone is trained on the frozen base with the same schedule, the untuned
  baseline the evaluation compares with; its weights are kept in `baseline_head/` in the adapter folder.

Checkpoints, resume (bit-identical on the CPU), SIGTERM and a full disk are handled as on the SFT path.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends.base import AdapterInfo, TrainingRun, checkpoint_step, finish_training
from lorapipe.backends.trainer import resume_point
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan

BASELINE_DIR = "baseline_head"  # in the adapter folder: the head-only baseline's head weights and its record
BASELINE_WEIGHTS = "head.safetensors"
BASELINE_RECORD = "baseline.json"
HEAD_NAMES = ("classifier", "score")  # transformers' sequence-classification heads (encoders, decoders)


def plan_labels(plan: TrainingPlan) -> list[str]:
    """The frozen label set the plan carries (ids 0..n-1)."""
    labels = list(plan.labels)
    if len(labels) < 2:
        raise ValueError("task: classification needs the label set in the training plan (from the validation "
                         "report): run the pipeline's validate and preflight steps first")
    return labels


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


def load_classifier(m: ModelSection, plan: TrainingPlan, labels: Optional[list[str]], tokenizer: Any,
                    device: Optional[str] = None) -> Any:
    """The base as a sequence classifier with the frozen labels (a fresh head when the base has none), on the plan's
    device and dtype."""
    from lorapipe.models.loading import load_model

    # full fine-tuning keeps fp32 master weights (the Trainer autocasts to plan.dtype): plan.load_dtype
    model = load_model(m.name_or_path, plan.load_dtype, m.revision, m.trust_remote_code, plan.quantization,
                       device=device or plan.device, attn_implementation=m.attn_implementation,
                       task="classification", labels=labels)
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


def checkpoint_files(method: str, world_size: int = 1) -> tuple[str, ...]:
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    rng = ("rng_state.pth",) if world_size <= 1 else tuple(f"rng_state_{i}.pth" for i in range(world_size))
    return (weights, "optimizer.pt", "scheduler.pt", *rng, "trainer_state.json")


_TRAINER_CLS: Any = None


def _trainer_class() -> Any:
    """transformers' Trainer with a full disk said in lorapipe's words (and the cut checkpoint removed)."""
    global _TRAINER_CLS
    if _TRAINER_CLS is None:
        from transformers import Trainer
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from lorapipe.training.disk import checkpoint_write, trainable_bytes_estimate

        class ClassifierTrainer(Trainer):
            lorapipe_checkpoint_files: tuple[str, ...] = ()

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # classifiers take **kwargs in forward, so the Trainer would think they divide their loss over
                # gradient accumulation themselves; their mean loss does not: the Trainer must (or weighted_loss does)
                self.model_accepts_loss_kwargs = False

            def _save_checkpoint(self, model: Any, trial: Any) -> None:
                folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                with checkpoint_write(folder, self.lorapipe_checkpoint_files,
                                      lambda: trainable_bytes_estimate(self.model),
                                      main_process=self.args.should_save):
                    super()._save_checkpoint(model, trial)

        _TRAINER_CLS = ClassifierTrainer
    return _TRAINER_CLS


def _args(t: TrainSection, plan: TrainingPlan, seed: int, out: Path, evaluating: bool) -> Any:
    from transformers import TrainingArguments

    from lorapipe.backends.trainer import sft_config_kwargs

    kwargs = sft_config_kwargs(t, plan, seed, out)
    kwargs.pop("max_length")  # an SFT argument; the rows are truncated when tokenised
    metric = t.metric_for_best_model or "macro_f1"
    return TrainingArguments(
        **kwargs,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=t.eval_steps if evaluating else None,
        metric_for_best_model=metric if evaluating else None,
        greater_is_better=(metric != "eval_loss") if evaluating else None,
        load_best_model_at_end=t.load_best_model_at_end and evaluating,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        gradient_checkpointing=plan.gradient_checkpointing,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
    )


def eval_printer(tag: str) -> Any:
    """A callback printing one line per evaluation with the classifier's metrics (the head-only baseline's run,
    which has no monitor of its own)."""
    from transformers import TrainerCallback

    class EvalPrinter(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero and metrics:
                print(f"{tag}step {state.global_step}: eval loss {metrics.get('eval_loss', float('nan')):.4f}, "
                      f"accuracy {metrics.get('eval_accuracy', float('nan')):.3f}, macro F1 "
                      f"{metrics.get('eval_macro_f1', float('nan')):.3f}", flush=True)

    return EvalPrinter()


def _prepare(m: ModelSection, t: TrainSection, plan: TrainingPlan, labels: list[str], tokenizer: Any, method: str,
             seed: int) -> tuple[Any, list[str]]:
    """The model to train and the modules trained in full: the base as a classifier, with LoRA (QLoRA) and the head
    saved in full, or every weight."""
    from transformers import set_seed

    set_seed(seed)
    model = load_classifier(m, plan, labels, tokenizer)
    heads = head_modules(model)
    if method == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if plan.quantization != "none":
            quantised = [name for name, module in model.named_modules() if in_modules(name, heads)
                         and type(module).__name__ in ("Linear4bit", "Linear8bitLt")]
            if quantised:  # a module trained in full must hold real weights, not 4/8-bit codes
                raise ValueError(f"train.quantization={plan.quantization}: {', '.join(quantised)} of "
                                 f"{m.name_or_path} loaded quantised, but it is trained in full (a head, or weights "
                                 "the checkpoint lacks): set train.quantization: none for this model")
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
            raise ValueError(f"train.lora.target_modules {t.lora.target_modules} matches no layer of "
                             f"{m.name_or_path}; its linear layers are named {', '.join(names)}: set "
                             "train.lora.target_modules: all-linear, or names from that list") from None
        trainable_in_fp32(model)
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    return model, heads


def _early_stopping(t: TrainSection, evaluating: bool) -> list[Any]:
    from transformers import EarlyStoppingCallback

    if not (evaluating and t.early_stopping_patience):
        return []
    return [EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience,
                                  early_stopping_threshold=t.early_stopping_threshold)]


class _NoProgressBars:
    """transformers' own bars (a full model's checkpoint shards being written) hidden while training: the monitor's
    line is the progress; restored after, so a hub download later still shows its bar."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()


def train_classifier(m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, train: ConversationDataset,
                     eval: ConversationDataset, work_dir: Path, adapter_dir: Path,  # noqa: A002
                     extra_callbacks: Optional[list[Any]] = None) -> AdapterInfo:
    """Train the classifier (LoRA + head, or every weight), then the head-only baseline; save the adapter folder."""
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, PrinterCallback

    from lorapipe.backends.hf import oom_backoff
    from lorapipe.backends.trainer import monitor_callback, new_monitor
    from lorapipe.models.loading import load_tokenizer
    from lorapipe.training.monitoring import free_memory, peak_memory_gb, process_memory_gb, reset_peak_memory
    from lorapipe.training.preemption import Preemption

    transformers.logging.set_verbosity_error()
    resident_at_start = None
    if plan.device != "cuda":
        resident_at_start = round(process_memory_gb(), 3)
        reset_peak_memory(plan.device)
    work_dir, adapter_dir = Path(work_dir), Path(adapter_dir)
    labels = plan_labels(plan)
    label2id = {name: i for i, name in enumerate(labels)}
    if t.eval_steps and not len(eval):
        raise ValueError("train.eval_steps (and early stopping / load_best_model_at_end) need a non-empty eval split: "
                         "raise split.eval_fraction (or, with files named train/valid/test, give a valid file), or "
                         "set train.eval_steps: null")
    tokenizer = load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code)
    train_ds = tokenize_rows(train, tokenizer, plan.max_seq_length, label2id)
    eval_ds = tokenize_rows(eval, tokenizer, plan.max_seq_length, label2id) if len(eval) else None
    evaluating = bool(t.eval_steps) and eval_ds is not None
    counts = class_counts(train, labels)
    weights = balanced_weights(counts) if t.class_weights == "balanced" else None
    method = plan.method

    ckpt_dir = work_dir / "checkpoints"
    backoffs: list[dict[str, Any]] = []
    while True:  # once, or again with half the micro-batch after a CUDA out-of-memory error in the first steps
        model, heads = _prepare(m, t, plan, labels, tokenizer, method, seed)
        trainer = _trainer_class()(
            model=model, args=_args(t, plan, seed, ckpt_dir, evaluating), train_dataset=train_ds,
            eval_dataset=eval_ds, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=trainer_metrics(labels), compute_loss_func=weighted_loss(weights),
            callbacks=[monitor_callback(new_monitor(adapter_dir, m, t, plan, seed)),
                       *_early_stopping(t, evaluating), *(extra_callbacks or [])])
        trainer.lorapipe_checkpoint_files = checkpoint_files(method, trainer.args.world_size)
        trainer.remove_callback(PrinterCallback)
        resume_from = resume_point(t, ckpt_dir, trainer.args.world_size, trainer.lorapipe_checkpoint_files)
        if not backoffs:
            quantized = f", QLoRA {plan.quantization}" if plan.quantization != "none" else ""
            print(f"training a {len(labels)}-label classifier ({method}{quantized}) on {len(train)} rows; trained in "
                  f"full: {', '.join(heads)}; labels {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}"
                  + (f"; class weights {[round(w, 3) for w in weights]}" if weights else ""), flush=True)
        start = time.perf_counter()
        try:
            with Preemption(enabled=trainer.args.world_size == 1) as preemption, _NoProgressBars():
                trainer.add_callback(preemption.callback())
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            break
        except torch.cuda.OutOfMemoryError as exc:
            smaller = oom_backoff(exc, trainer, plan, resume_from, backoffs)
        del trainer, model
        free_memory(plan.device)
        plan = smaller
    seconds = time.perf_counter() - start
    state = trainer.state
    max_steps = state.max_steps
    stopped_early = evaluating and bool(t.early_stopping_patience) and state.global_step < max_steps
    tokens = sum(len(x) for x in train_ds["input_ids"])
    run = TrainingRun(backend="hf", steps=state.global_step,
                      train_loss=float(result.training_loss) if result.training_loss is not None else None,
                      train_tokens=int(tokens * min(t.epochs, state.epoch or t.epochs)), train_seconds=seconds,
                      peak_memory_gb=round(peak_memory_gb(plan.device), 3),
                      resumed_from=str(resume_from) if resume_from else None, log_history=list(state.log_history),
                      world_size=trainer.args.world_size, resident_at_start_gb=resident_at_start)
    best = {"metric": trainer.args.metric_for_best_model, "value": state.best_metric,
            "step": checkpoint_step(Path(state.best_model_checkpoint)) if state.best_model_checkpoint else None,
            "loaded": bool(trainer.args.load_best_model_at_end)}
    if stopped_early:
        print(f"early stopping at step {state.global_step} of {max_steps}: {t.early_stopping_patience} evaluation(s) "
              f"without {best['metric']} improving by more than {t.early_stopping_threshold:g} (best {best['value']} "
              f"at step {best['step']})", flush=True)
    extra = {"task": "classification", "method": method, "labels": labels, "head_modules": heads,
             "train_class_counts": counts, "class_weights": weights, "best": best, "stopped_early": stopped_early,
             "max_steps": max_steps, "text_pair": any(r.text_pair is not None for r in train.records),
             "pad_token_id": tokenizer.pad_token_id, "oom_backoff": backoffs}
    is_main = trainer.is_world_process_zero()

    def save_weights(folder: Path) -> None:
        trainer.model.save_pretrained(str(folder), safe_serialization=True)

    info = finish_training(run, adapter_dir, m, t, seed, plan, train, tokenizer, save_weights, extra=extra,
                           is_main=is_main)
    del trainer, model
    baseline: Optional[dict[str, Any]] = None
    if t.head_only_baseline and plan.quantization != "none":
        # transformers trains a quantised base only through adapters, and the unquantised base may not fit where the
        # plan put the QLoRA run: the untuned baseline is then the majority class alone
        baseline = {"skipped": f"train.quantization={plan.quantization}: a quantised base trains through adapters "
                               "only, and the unquantised one is outside the memory plan; the evaluation's untuned "
                               "baseline is the majority class"}
        if is_main:
            print(f"head-only baseline skipped: {baseline['skipped']}", flush=True)
    elif t.head_only_baseline:  # every data-parallel rank trains it (the process group needs them all); one writes
        free_memory(plan.device)
        baseline = train_head_only(m, t, seed, plan, labels, tokenizer, train_ds, eval_ds, work_dir, adapter_dir,
                                   weights, is_main)
    if baseline is not None and is_main:
        meta_path = adapter_dir / "lorapipe_adapter.json"
        meta = json.loads(meta_path.read_text())
        meta["baseline_head"] = baseline
        meta_path.write_text(json.dumps(meta, indent=2))
    return info


def train_head_only(m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, labels: list[str],
                    tokenizer: Any, train_ds: Any, eval_ds: Any, work_dir: Path, adapter_dir: Path,
                    weights: Optional[list[float]], is_main: bool = True) -> dict[str, Any]:
    """The untuned baseline: the same (unquantised) base, precision and schedule, only the head trained (the body
    frozen, no LoRA). Its head weights go to `baseline_head/head.safetensors`; returns its record (steps, loss, best
    metric)."""
    from safetensors.torch import save_file
    from transformers import DataCollatorWithPadding, PrinterCallback, set_seed

    set_seed(seed)
    model = load_classifier(m, plan, labels, tokenizer)
    heads = head_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad = in_modules(name, heads)
    trainable_in_fp32(model)
    evaluating = eval_ds is not None and bool(t.eval_steps)
    out = work_dir / BASELINE_DIR
    args = _args(t, plan.model_copy(update={"gradient_checkpointing": False}), seed, out, evaluating)
    args.save_total_limit = 1
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                               compute_metrics=trainer_metrics(labels), compute_loss_func=weighted_loss(weights),
                               callbacks=[eval_printer("head-only baseline: "),
                                          *_early_stopping(t, evaluating)])
    trainer.lorapipe_checkpoint_files = checkpoint_files("full", trainer.args.world_size)
    trainer.remove_callback(PrinterCallback)
    if is_main:
        print(f"training the head-only baseline ({', '.join(heads)} on the frozen base, the same schedule)",
              flush=True)
    with _NoProgressBars():
        result = trainer.train()
    record = {"steps": trainer.state.global_step, "train_loss": float(result.training_loss),
              "best_metric": trainer.state.best_metric, "head_modules": heads,
              "weights": f"{BASELINE_DIR}/{BASELINE_WEIGHTS}"}
    trainer.accelerator.wait_for_everyone()  # every rank has reloaded the best checkpoint before one deletes it
    if is_main:
        folder = adapter_dir / BASELINE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").float().contiguous() for k, v in model.state_dict().items()
                 if in_modules(k, heads)}
        save_file(state, str(folder / BASELINE_WEIGHTS))
        (folder / BASELINE_RECORD).write_text(json.dumps(record, indent=2))
        shutil.rmtree(out, ignore_errors=True)  # its checkpoints served the best-model reload only
    return record
