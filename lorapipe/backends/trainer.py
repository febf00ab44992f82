"""What the two Trainer backends (hf, unsloth) share, whatever the task: the Trainer class every task's trainer is
built on, the arguments, checkpoints and resume, the monitor hook, the out-of-memory backoff and the end of a Trainer
run. Each backend calls these; neither imports the other. A task (`lorapipe.tasks`) supplies what differs: its data,
model, collator, loss and metrics.

Heavy imports (transformers, TRL, PEFT, datasets) stay inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from lorapipe.catalog import task_spec
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.training.adapter import (
    AdapterInfo,
    TrainingRun,
    finish_training,
    run_config,
)
from lorapipe.training.checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    latest_complete_checkpoint,
    resume_checkpoint,
)
from lorapipe.training.monitoring import (
    TrainingMonitor,
    memory_gib,
    peak_memory_gib,
)

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint-N
# A CUDA OOM before this many optimizer steps of an attempt have completed triggers the micro-batch backoff; a later
# one is raised (it is then a long-row problem, not a batch-geometry one).
OOM_BACKOFF_WITHIN_STEPS = 10
# a collator that keeps packed rows as rows says how many of a batch's positions are real under this key; the trainer
# pops it before the model sees the batch
REAL_TOKENS = "lorapipe_real_tokens"


def checkpoint_files(world_size: int = 1, weights: str = "adapter_model.safetensors") -> tuple[str, ...]:
    """What a Trainer checkpoint holds to resume exactly: the trained weights (a LoRA adapter's, or a whole model's),
    the optimizer and scheduler, the RNG state of every process (dropout) and the trainer state (step, data
    position), written last."""
    rng = ("rng_state.pth",) if world_size <= 1 else tuple(f"rng_state_{i}.pth" for i in range(world_size))
    return (weights, "optimizer.pt", "scheduler.pt", *rng, "trainer_state.json")


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


def trainer_arguments(t: TrainSection, plan: TrainingPlan, seed: int, ckpt_dir: Path, evaluating: bool = False,
                      best_metric: str = "eval_loss") -> dict[str, Any]:
    """The `TrainingArguments` every Trainer backend and task shares: batch geometry, schedule, checkpoints,
    precision, seed, and evaluation every `train.eval_steps` when `evaluating`, comparing `train.metric_for_best_model`
    (else `best_metric`, the task's own: `TaskSpec.best_model_metrics[0]`).

    Metrics go to the stack's tracker through lorapipe's monitor (`report_to="none"`), the same rows for every
    backend; the Trainer's own printer is replaced by the monitor's progress line."""
    metric = t.metric_for_best_model or best_metric
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
        disable_tqdm=True,
        dataloader_num_workers=0,
        report_to="none",
        # CPU data parallelism (torchrun / accelerate launch --cpu) speaks gloo; a single process must not name a
        # backend (accelerate would then expect a process group)
        ddp_backend="gloo" if plan.device == "cpu" and plan.world_size > 1 else None,
        ddp_find_unused_parameters=False,
        gradient_checkpointing=plan.gradient_checkpointing,
        # transformers 5 names group_by_length a sampling strategy; the sampler itself is seeded (trainer_class)
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        eval_strategy="steps" if evaluating else "no",
        eval_steps=t.eval_steps if evaluating else None,
        metric_for_best_model=metric if evaluating else None,
        greater_is_better=(metric != "eval_loss") if evaluating else None,
        load_best_model_at_end=t.load_best_model_at_end and evaluating,
    )


def early_stopping(t: TrainSection, evaluating: bool) -> list[Any]:
    """The early-stopping callback (patience and threshold) when evaluating with a patience, else none."""
    if not (evaluating and t.early_stopping_patience):
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience,
                                  early_stopping_threshold=t.early_stopping_threshold)]


class PaddingCounter:
    """Counts the real and the padded token positions of every micro-batch the trainer fed to the model.

    Counted in `training_step` (not in the collator, which accelerate's dataloader runs one batch ahead)."""

    def __init__(self) -> None:
        self.real_tokens = 0
        self.padded_tokens = 0
        self.batches = 0
        self.padding_free = False

    def count(self, inputs: dict[str, Any], real_tokens: Optional[int] = None) -> None:
        if "input_ids" not in inputs:  # a trainer that batches each side apart (ORPO: chosen_/rejected_input_ids)
            # a decoder sees each side with its prompt inside; the batch's prompt_input_ids never reach the model
            sides = [k[:-len("input_ids")] for k in inputs if k.endswith("_input_ids") and not k.startswith("prompt_")]
            for side in sides:
                self.count({"input_ids": inputs[f"{side}input_ids"], "attention_mask":
                            inputs.get(f"{side}attention_mask")})
            self.batches -= max(0, len(sides) - 1)  # one batch, whatever its sides
            return
        ids = inputs["input_ids"]
        total = int(ids.numel())
        mask = inputs.get("attention_mask")
        # padding-free batches (packing) carry position ids and no mask: flattened into one row nothing is padding;
        # kept as rows (a packing collator), the collator says how many positions are real
        real = real_tokens if real_tokens is not None else int(mask.sum()) if mask is not None else total
        self.real_tokens += real
        self.padded_tokens += total - real
        self.batches += 1
        self.padding_free = mask is None and "position_ids" in inputs

    def add_other_ranks(self, accelerator: Any) -> None:
        """Sum the counts of every data-parallel rank into this counter (a collective: every rank calls it)."""
        import torch

        counts = torch.tensor([self.real_tokens, self.padded_tokens, self.batches], dtype=torch.long,
                              device=accelerator.device)
        self.real_tokens, self.padded_tokens, self.batches = (int(x) for x in accelerator.reduce(counts, "sum"))

    def summary(self) -> dict[str, Any]:
        total = self.real_tokens + self.padded_tokens
        return {"real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens, "batches": self.batches,
                "fraction": round(self.padded_tokens / total, 6) if total else 0.0,
                "padding_free": self.padding_free}


_TRAINER_CLASSES: dict[type, type] = {}


def trainer_class(base: type) -> type:
    """`base` (transformers' Trainer, TRL's SFTTrainer, ...) with what lorapipe adds to every Trainer run: a
    reproducible length-grouped sampler, a count of the padding it trains on, a full disk said in lorapipe's words
    (the cut checkpoint removed), and CPU data-parallel ranks that can resume their optimizer."""
    if base in _TRAINER_CLASSES:
        return _TRAINER_CLASSES[base]
    import torch
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
    from transformers.trainer_pt_utils import (
        LengthGroupedSampler,
        get_length_grouped_indices,
    )
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from lorapipe.training.disk import checkpoint_write, trainable_bytes_estimate

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """Length-grouped order drawn from `seed + epoch`, never from the global RNG: the same order on a resumed
        run (whose global RNG differs when the dataloader starts) and on every data-parallel rank."""

        def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.seed = seed
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class LorapipeTrainer(base):  # type: ignore[misc, valid-type]
        # what a complete checkpoint of this run holds (its trained weights' file among them)
        lorapipe_checkpoint_files: tuple[str, ...] = checkpoint_files()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.padding_counter = PaddingCounter()

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self.args.train_sampling_strategy == "group_by_length":
                ds = train_dataset if train_dataset is not None else self.train_dataset
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthGroupedSampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps,
                    lengths=[len(x) for x in ds["input_ids"]], seed=seed)
            return super()._get_train_sampler(train_dataset)

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            real = inputs.pop(REAL_TOKENS, None)
            self.padding_counter.count(inputs, real)
            if real is not None and hasattr(self, "_total_train_tokens"):
                # TRL counts a batch without an attention mask as one flattened row (position_ids.size(1) tokens);
                # packs kept as rows hold `real`: the difference, summed over the ranks, before TRL adds its count
                extra = torch.tensor(real - inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(extra).sum().item())
            return super().training_step(model, inputs, *args, **kwargs)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            # a full disk cuts the checkpoint short with an error about one file (torch.save's has no errno): say the
            # folder, the space needed and the fix instead, and remove the cut folder so a resume skips it
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            with checkpoint_write(folder, self.lorapipe_checkpoint_files, lambda: trainable_bytes_estimate(self.model),
                                  main_process=self.args.should_save):
                super()._save_checkpoint(model, trial)

        def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
            folder = Path(checkpoint) if checkpoint else None
            if (folder is None or self.args.world_size == 1 or self.args.device.type != "cpu"
                    or not (folder / OPTIMIZER_NAME).is_file() or not (folder / SCHEDULER_NAME).is_file()):
                return super()._load_optimizer_and_scheduler(checkpoint)
            # CPU ranks: accelerate names their device cpu:<rank>, which the Trainer hands torch.load as map_location
            # and torch cannot restore to ("don't know how to restore data location"); their state lives on the CPU
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))

    LorapipeTrainer.__name__ = LorapipeTrainer.__qualname__ = f"Lorapipe{base.__name__}"
    _TRAINER_CLASSES[base] = LorapipeTrainer
    return LorapipeTrainer


def backed_off(plan: TrainingPlan) -> TrainingPlan:
    """Half the micro-batch, accumulation raised to keep the effective batch."""
    mb = max(1, plan.micro_batch_size // 2)
    ga = max(1, math.ceil(plan.effective_batch_size / (mb * plan.world_size)))
    return plan.model_copy(update={"micro_batch_size": mb, "gradient_accumulation_steps": ga,
                                   "effective_batch_size": mb * ga * plan.world_size})


def oom_backoff(exc: BaseException, trainer: Any, plan: TrainingPlan, resume_from: Optional[Path],
                backoffs: list[dict[str, Any]]) -> TrainingPlan:
    """After a CUDA out-of-memory error in a Trainer run: the plan to retry with (half the micro-batch, twice the
    accumulation; recorded in `backoffs` and said), or `exc` raised with a note saying why there is no retry."""
    oom_step = trainer.state.global_step
    first_step = (checkpoint_step(resume_from) or 0) if resume_from is not None else 0
    # one rank retrying alone would leave the others waiting in the all-reduce: data parallel raises
    data_parallel = trainer.args.world_size > 1
    if data_parallel or plan.micro_batch_size <= 1 or oom_step - first_step >= OOM_BACKOFF_WITHIN_STEPS:
        why = ("data parallel: the ranks cannot back off alone; set train.micro_batch_size lower"
               if data_parallel else "already 1" if plan.micro_batch_size <= 1 else "past the first steps")
        exc.add_note(f"lorapipe: out of memory at step {oom_step} with micro-batch {plan.micro_batch_size}"
                     f" (no backoff: {why}); lower train.max_seq_length, set train.quantization: nf4 or "
                     "turn on train.gradient_checkpointing")
        raise exc
    smaller = backed_off(plan)
    # the shape stored on adapters since the backoff shipped: dashboards and lineage read these keys
    backoffs.append({"from": plan.micro_batch_size, "to": smaller.micro_batch_size, "step": oom_step,
                     "gradient_accumulation_steps": {"from": plan.gradient_accumulation_steps,
                                                     "to": smaller.gradient_accumulation_steps},
                     "effective_batch_size": smaller.effective_batch_size})
    log.warning("CUDA out of memory at step %d with micro-batch %d: retrying with micro-batch %d x accumulation %d "
                "(effective batch %d kept)", oom_step, plan.micro_batch_size, smaller.micro_batch_size,
                smaller.gradient_accumulation_steps, smaller.effective_batch_size)
    return smaller


class NoProgressBars:
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


def monitor_callback(monitor: TrainingMonitor) -> Any:
    """A `TrainerCallback` that feeds a Trainer's logs and saves to the shared monitor."""
    from transformers import TrainerCallback

    class MonitorCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            monitor.is_main = state.is_world_process_zero
            monitor.begin(state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
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
                        eval_metrics={k: logs[k] for k in monitor.eval_metrics if k in logs})

        def on_save(self, args, state, control, **kwargs):
            monitor.checkpoint_saved(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            monitor.end()

    return MonitorCallback()


def new_monitor(adapter_dir: Path, model_cfg: ModelSection, t: TrainSection, plan: TrainingPlan,
                seed: int) -> TrainingMonitor:
    return TrainingMonitor(adapter_dir, lambda: memory_gib(plan.device), run_config(model_cfg, t, plan, seed),
                           eval_metrics=task_spec(plan.task).progress_metrics)


def finish_trainer_run(trainer: Any, result: Any, seconds: float, tokens: int, backend: str, adapter_dir: Path,
                       model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
                       train: ConversationDataset, tokenizer: Any, resumed_from: Optional[Path],
                       extra: dict[str, Any], resident_at_start_gib: Optional[float] = None) -> AdapterInfo:
    """The end of a Trainer run: the adapter folder (PEFT, or a whole model's) through the one `finish_training`."""
    state = trainer.state
    run = TrainingRun(
        backend=backend, steps=state.global_step,
        train_loss=float(result.training_loss) if result.training_loss is not None else None,
        train_tokens=tokens, train_seconds=seconds, peak_memory_gib=round(peak_memory_gib(plan.device), 3),
        resumed_from=str(resumed_from) if resumed_from else None, log_history=list(state.log_history),
        world_size=trainer.args.world_size, resident_at_start_gib=resident_at_start_gib)
    return finish_training(
        run, adapter_dir, model_cfg, t, seed, plan, train, tokenizer,
        save_weights=lambda folder: trainer.model.save_pretrained(str(folder), safe_serialization=True),
        extra=extra, is_main=trainer.is_world_process_zero())
