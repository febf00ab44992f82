"""What the two TRL backends (hf, unsloth) share: tokenised data, the LoRA and SFT configs, checkpoints, the monitor
hook and the end of a Trainer run. Each backend calls these; neither imports the other.

Heavy imports (transformers, TRL, PEFT, datasets) stay inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends.base import (
    AdapterInfo,
    TrainingRun,
    checkpoint_problem,
    finish_training,
    latest_complete_checkpoint,
    resume_checkpoint,
    run_config,
)
from lorapipe.config import LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.training.monitoring import CLASSIFIER_EVAL_METRICS, TrainingMonitor, memory_gb, peak_memory_gb


def tokenize_dataset(dataset: ConversationDataset, tokenizer: Any, max_length: int) -> Any:
    """A `datasets.Dataset` of input_ids + labels (-100 outside assistant turns), truncated to max_length."""
    from datasets import Dataset

    from lorapipe.data.render import encode
    from lorapipe.progress import progress

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for rec in progress(dataset.records, f"tokenizing {dataset.name}"):
        enc = encode(tokenizer, rec, max_length)
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append([t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_mask)])
    return Dataset.from_dict(rows)


def lora_config(lora: LoraSection) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint-N


def checkpoint_files(world_size: int = 1) -> tuple[str, ...]:
    """What a Trainer checkpoint of a LoRA run holds to resume exactly: the adapter, the optimizer and scheduler, the
    RNG state of every process (dropout) and the trainer state (step, data position), written last."""
    rng = ("rng_state.pth",) if world_size <= 1 else tuple(f"rng_state_{i}.pth" for i in range(world_size))
    return ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", *rng, "trainer_state.json")


def checkpoint_save_guard(trainer: Any, trial: Any = None) -> Any:
    """A context manager around a Trainer's `_save_checkpoint`: a full disk raises `DiskFullError` naming the folder,
    the space needed and free, and the fix, and the cut checkpoint is removed (`lorapipe.training.disk`)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from lorapipe.training.disk import checkpoint_write, trainable_bytes_estimate

    folder = Path(trainer._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    return checkpoint_write(folder, checkpoint_files(trainer.args.world_size),
                            lambda: trainable_bytes_estimate(trainer.model), main_process=trainer.args.should_save)


def resume_point(t: TrainSection, ckpt_dir: Path, world_size: int = 1,
                 files: Optional[tuple[str, ...]] = None) -> Optional[Path]:
    """The checkpoint this run resumes from: its own latest complete one (incomplete newer ones are said and set
    aside), else `train.resume_from`, which must be complete (see resume_checkpoint). `files`: what a complete
    checkpoint holds (default: a LoRA adapter's, `checkpoint_files`)."""
    files = files or checkpoint_files(world_size)
    main_process = int(os.environ.get("RANK", "0")) == 0  # the one process that sets checkpoints aside
    own = latest_complete_checkpoint(ckpt_dir, files, CHECKPOINT_PREFIX, set_aside=main_process) if t.resume else None
    if own is None and t.resume_from is not None:
        # resumed on purpose, possibly from another process count: the RNG files are checked if present, not required
        problem = checkpoint_problem(Path(t.resume_from), [f for f in files if not f.startswith("rng_state")])
        if problem:
            raise ValueError(f"train.resume_from: {t.resume_from} cannot be resumed from ({problem}); name a complete "
                             "checkpoint folder, or unset train.resume_from to start over")
    return resume_checkpoint(own, t)


def train_tokens(train_ds: Any, t: TrainSection, plan: TrainingPlan) -> int:
    """Tokens a run trains on, all data-parallel processes together (they share the rows out, and the plan's
    effective batch counts every process's micro-batches): all rows' tokens x epochs, or the mean row length x rows
    seen in max_steps."""
    lengths = [len(x) for x in train_ds["input_ids"]]
    if t.max_steps < 0:
        return int(sum(lengths) * t.epochs)
    return int(sum(lengths) / max(len(lengths), 1) * t.max_steps * plan.effective_batch_size)


def sft_config_kwargs(t: TrainSection, plan: TrainingPlan, seed: int, ckpt_dir: Path) -> dict[str, Any]:
    """The SFTConfig every TRL-based backend shares: batch geometry, schedule, checkpoints, precision, seed.

    Metrics go to the stack's tracker through lorapipe's monitor (`report_to="none"`), the same rows for every
    backend; the Trainer's own printer is replaced by the monitor's progress line."""
    return dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=plan.micro_batch_size,
        per_device_eval_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=plan.optimizer,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=seed,
        data_seed=seed,
        bf16=plan.dtype == "bfloat16",
        fp16=plan.dtype == "float16",
        use_cpu=plan.device == "cpu",
        max_length=plan.max_seq_length,
        disable_tqdm=True,
        dataloader_num_workers=0,
        report_to="none",
        # CPU data parallelism (torchrun / accelerate launch --cpu) speaks gloo; a single process must not name a
        # backend (accelerate would then expect a process group)
        ddp_backend="gloo" if plan.device == "cpu" and plan.world_size > 1 else None,
    )


def monitor_callback(monitor: TrainingMonitor) -> Any:
    """A `TrainerCallback` that feeds a Trainer's logs and saves to the shared monitor."""
    from transformers import TrainerCallback

    class MonitorCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            monitor.is_main = state.is_world_process_zero
            monitor.begin(state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs = logs or {}
            if "train_runtime" in logs or ("loss" not in logs and "eval_loss" not in logs):
                return  # the end-of-training summary, or a log without a loss
            # TRL's num_tokens counts the tokens of all ranks since this process started training
            tokens = logs.get("num_tokens")
            if tokens is None:
                tokens = getattr(state, "num_input_tokens_seen", 0) or None
            monitor.log(state.global_step, loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                        grad_norm=logs.get("grad_norm"), eval_loss=logs.get("eval_loss"),
                        epoch=logs.get("epoch", state.epoch), tokens_seen=tokens,
                        eval_metrics={k: logs[k] for k in CLASSIFIER_EVAL_METRICS if k in logs})

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            monitor.checkpoint_saved(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            monitor.end()

    return MonitorCallback()


def new_monitor(adapter_dir: Path, model_cfg: ModelSection, t: TrainSection, plan: TrainingPlan,
                seed: int) -> TrainingMonitor:
    return TrainingMonitor(adapter_dir, lambda: memory_gb(plan.device), run_config(model_cfg, t, plan, seed))


def finish_trainer_run(trainer: Any, result: Any, seconds: float, tokens: int, backend: str, adapter_dir: Path,
                       model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
                       train: ConversationDataset, tokenizer: Any, resumed_from: Optional[Path],
                       extra: dict[str, Any], resident_at_start_gb: Optional[float] = None) -> AdapterInfo:
    """The end of a Trainer run: the PEFT adapter folder through the one `finish_training`."""
    state = trainer.state
    run = TrainingRun(
        backend=backend, steps=state.global_step,
        train_loss=float(result.training_loss) if result.training_loss is not None else None,
        train_tokens=tokens, train_seconds=seconds, peak_memory_gb=round(peak_memory_gb(plan.device), 3),
        resumed_from=str(resumed_from) if resumed_from else None, log_history=list(state.log_history),
        world_size=trainer.args.world_size, resident_at_start_gb=resident_at_start_gb)
    return finish_training(
        run, adapter_dir, model_cfg, t, seed, plan, train, tokenizer,
        save_weights=lambda folder: trainer.model.save_pretrained(str(folder), safe_serialization=True),
        extra=extra, is_main=trainer.is_world_process_zero())
