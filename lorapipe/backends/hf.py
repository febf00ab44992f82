"""transformers + PEFT + TRL backend: CPU, CUDA, and QLoRA via a bitsandbytes quantization config, for every task in
its catalog entry (sft, classification) through one training loop; the task supplies its rows, model and trainer.

Beyond a plain Trainer run, `HFBackend.train`:

- resumes bit-identically on CPU: data order comes from `data_seed` (accelerate's seedable sampler, or, with
  `train.group_by_length`, a length-grouped sampler re-seeded from `data_seed + epoch`), and the Trainer restores the
  RNG state (dropout) saved in the checkpoint; it resumes from the latest *complete* checkpoint (a newer one cut
  short by a crash is said and set aside, see `trainer.resume_point`);
- on SIGTERM (spot machine, Kubernetes) saves a checkpoint at the end of the current step and stops with
  `PreemptedError` (`lorapipe.training.preemption`): the same command resumes;
- evaluates every `train.eval_steps`, with early stopping and best-model reloading by `train.metric_for_best_model`;
- reports the padding actually fed (`padding_waste` in the adapter metadata);
- writes metrics/plots, logs progress and feeds the stack's tracker through the shared
  `lorapipe.training.monitoring.TrainingMonitor`;
- backs off on a CUDA out-of-memory error in the first steps: half the micro-batch, twice the accumulation (in one
  process only: data-parallel ranks cannot change their batch geometry alone);
- runs data-parallel in the processes the train phase launches (`lorapipe.phases.launch`, or an outside
  `torchrun`): each rank on its own GPU, the padding counted over all ranks, and only the main process writes the
  adapter folder, the metrics and the progress lines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends import peft_adapter
from lorapipe.backends.base import TrainingTask
from lorapipe.backends.trainer import (
    NoProgressBars,
    early_stopping,
    finish_trainer_run,
    monitor_callback,
    new_monitor,
    oom_backoff,
    resume_point,
    trainer_arguments,
)
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.training.adapter import AdapterInfo
from lorapipe.training.preemption import Preemption


def rank_device(plan: TrainingPlan) -> str:
    """The device this process trains on: a data-parallel rank on CUDA trains on its own GPU (`cuda:<local rank>`,
    which the peak-memory counter then means too); otherwise the plan's device."""
    if plan.device == "cuda" and "LOCAL_RANK" in os.environ:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return f"cuda:{torch.cuda.current_device()}"
    return plan.device


class HFBackend:
    name = "hf"

    def train(self, task: TrainingTask, model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval_split: ConversationDataset, work_dir: Path, adapter_dir: Path,
              extra_callbacks: Optional[list[Any]] = None) -> AdapterInfo:
        import torch
        import transformers
        from transformers import PrinterCallback, set_seed

        from lorapipe.training.monitoring import (
            free_memory,
            process_memory_gib,
            reset_peak_memory,
        )

        transformers.logging.set_verbosity_error()
        resident_at_start = None
        if plan.device != "cuda":  # the CPU phase's resident peak starts here (CUDA's counter after the model loads)
            resident_at_start = round(process_memory_gib(), 3)
            reset_peak_memory(plan.device)
        work_dir, adapter_dir = Path(work_dir), Path(adapter_dir)
        if t.eval_steps and not len(eval_split):
            raise ValueError("train.eval_steps (and early stopping / load_best_model_at_end) need a non-empty eval "
                             "split: raise split.eval_fraction (or, with files named train/valid/test, give a valid "
                             "file), or set train.eval_steps: null")
        tokenizer = task.tokenizer(model_cfg)
        data = task.prepare(model_cfg, t, plan, tokenizer, train, eval_split)
        evaluating = bool(t.eval_steps) and data.eval is not None
        ckpt_dir = work_dir / "checkpoints"

        backoffs: list[dict[str, Any]] = []
        while True:  # once, or again with half the micro-batch after a CUDA out-of-memory error in the first steps
            set_seed(seed)
            model = task.load_model(model_cfg, t, plan, tokenizer, data, rank_device(plan))
            if plan.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            monitor = new_monitor(adapter_dir, model_cfg, t, plan, seed)
            monitor.plots_after_training = True  # drawn once `seconds` is measured, below
            callbacks = [monitor_callback(monitor), *early_stopping(t, evaluating), *(extra_callbacks or [])]
            arguments = trainer_arguments(t, plan, seed, ckpt_dir, evaluating, task.spec.best_model_metrics[0])
            trainer = task.trainer(model, arguments, t, plan, tokenizer, data, callbacks)
            trainer.remove_callback(PrinterCallback)  # the monitor logs one compact line per log instead
            trainer.lorapipe_checkpoint_files = task.checkpoint_files(plan, trainer.args.world_size)
            resume_from = resume_point(t, ckpt_dir, trainer.args.world_size, trainer.lorapipe_checkpoint_files)
            if not backoffs:
                task.announce(model, plan, data)
            start = time.perf_counter()
            try:
                # a SIGTERM saves a checkpoint at the next step end and raises PreemptedError (one process only)
                with Preemption(enabled=trainer.args.world_size == 1) as preemption, NoProgressBars():
                    trainer.add_callback(preemption.callback())
                    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                break
            except torch.cuda.OutOfMemoryError as exc:
                smaller = oom_backoff(exc, trainer, plan, resume_from, backoffs)
            del trainer, model
            free_memory(plan.device)
            plan = smaller

        seconds = time.perf_counter() - start
        monitor.draw_plots()
        if trainer.args.world_size > 1:
            trainer.padding_counter.add_other_ranks(trainer.accelerator)
        extra: dict[str, Any] = {"padding_waste": trainer.padding_counter.summary(), "oom_backoff": backoffs,
                                 "world_size": trainer.args.world_size,
                                 **task.metadata(trainer, t, plan, data, evaluating)}
        info = finish_trainer_run(trainer, result, seconds, task.train_tokens(trainer, data, t, plan), self.name,
                                  adapter_dir, model_cfg, t, seed, plan, train, tokenizer, resume_from, extra,
                                  resident_at_start_gib=resident_at_start)
        is_main = trainer.is_world_process_zero()
        trainer.accelerator.wait_for_everyone()
        del trainer, model, result
        free_memory(plan.device)
        task.after_training(model_cfg, t, seed, plan, tokenizer, data, work_dir, adapter_dir, is_main)
        return info

    # after training: what every PEFT adapter folder shares, whichever TRL backend wrote it
    eval_models = staticmethod(peft_adapter.eval_models)
    merge = staticmethod(peft_adapter.merge)
    reference_logits = staticmethod(peft_adapter.reference_logits)
