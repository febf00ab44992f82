"""A classifier's untuned baseline: the same (unquantised) base, precision and schedule with only its head trained
(the body frozen, no LoRA), so evaluation can say what the fine-tune adds over a head on frozen features. Its head
weights are kept in the adapter folder (`baseline_head/head.safetensors`) with its record."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends.base import PreparedData
from lorapipe.catalog import TASKS
from lorapipe.config import ModelSection, TrainSection
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.tasks.classification.model import (
    classifier_trainer,
    head_modules,
    in_modules,
    load_classifier,
    trainable_in_fp32,
)

log = logging.getLogger(__name__)

BASELINE_DIR = "baseline_head"  # in the adapter folder: the head-only baseline's head weights and its record
BASELINE_WEIGHTS = "head.safetensors"
BASELINE_RECORD = "baseline.json"


def eval_printer(tag: str) -> Any:
    """A callback logging one line per evaluation with the classifier's metrics (the baseline's run has no monitor
    of its own)."""
    from transformers import TrainerCallback

    class EvalPrinter(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and metrics:
                log.info("%sstep %d: eval loss %.4f, accuracy %.3f, macro F1 %.3f", tag, state.global_step,
                         metrics.get("eval_loss", float("nan")), metrics.get("eval_accuracy", float("nan")),
                         metrics.get("eval_macro_f1", float("nan")))

    return EvalPrinter()


def train_baseline(m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, tokenizer: Any,
                   data: PreparedData, work_dir: Path, adapter_dir: Path, is_main: bool = True) -> None:
    """Train the baseline when `train.head_only_baseline` asks for it (every data-parallel rank trains, the process
    group needs them all; the main one writes), and record it in the adapter's metadata (`baseline_head`). Under
    QLoRA it is skipped, with the reason: transformers trains a quantised base only through adapters, and the
    unquantised base may not fit where the plan put the QLoRA run; the untuned baseline is then the majority class."""
    from lorapipe.training.adapter import update_adapter_metadata
    from lorapipe.training.monitoring import free_memory

    if not t.head_only_baseline:
        return
    if plan.quantization != "none":
        record: dict[str, Any] = {
            "skipped": f"train.quantization={plan.quantization}: a quantised base trains through adapters only, and "
                       "the unquantised one is outside the memory plan; the evaluation's untuned baseline is the "
                       "majority class"}
        if is_main:
            log.info("head-only baseline skipped: %s", record["skipped"])
    else:
        free_memory(plan.device)
        record = _train(m, t, seed, plan, tokenizer, data, work_dir, adapter_dir, is_main)
    if is_main:
        update_adapter_metadata(adapter_dir, baseline_head=record)


def _train(m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, tokenizer: Any, data: PreparedData,
           work_dir: Path, adapter_dir: Path, is_main: bool) -> dict[str, Any]:
    """The baseline's run; its head weights go to `baseline_head/head.safetensors`. Returns its record (steps, loss,
    best metric)."""
    from safetensors.torch import save_file
    from transformers import PrinterCallback, set_seed

    from lorapipe.backends.trainer import (
        checkpoint_files,
        early_stopping,
        trainer_arguments,
    )

    labels, weights = data.facts["labels"], data.facts["weights"]
    set_seed(seed)
    model = load_classifier(m, plan, labels, tokenizer)
    heads = head_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad = in_modules(name, heads)
    trainable_in_fp32(model)
    evaluating = data.eval is not None and bool(t.eval_steps)
    out = work_dir / BASELINE_DIR
    arguments = trainer_arguments(t, plan.model_copy(update={"gradient_checkpointing": False}), seed, out, evaluating,
                                  TASKS["classification"].best_model_metrics[0])
    arguments["save_total_limit"] = 1
    trainer = classifier_trainer(model, arguments, tokenizer, data.train, data.eval, labels, weights,
                                 [eval_printer("head-only baseline: "), *early_stopping(t, evaluating)])
    trainer.lorapipe_checkpoint_files = checkpoint_files(trainer.args.world_size, "model.safetensors")
    trainer.remove_callback(PrinterCallback)
    if is_main:
        log.info("training the head-only baseline (%s on the frozen base, the same schedule)", ", ".join(heads))
    from lorapipe.backends.trainer import NoProgressBars

    with NoProgressBars():
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


def load_baseline(adapter_dir: str, meta: dict, phase: PhasePlan) -> Optional[Any]:
    """The untuned baseline: the base classifier with the head the baseline trained, or None when none was."""
    from safetensors.torch import load_file

    from lorapipe.backends.peft_adapter import load_base

    weights = Path(adapter_dir) / BASELINE_DIR / BASELINE_WEIGHTS
    if not weights.is_file():
        return None
    model = load_base(meta, phase.dtype, phase.device)
    missing = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{weights}: weights {missing.unexpected_keys[:3]} are not in the base's head")
    return model.to(phase.device)
