"""Unsloth backend: FastLanguageModel + TRL's trainers as unsloth patches them (SFT; DPO, KTO and ORPO for task
preference), on CUDA (and through unsloth's CPU fallback).

`import unsloth` patches transformers, PEFT and TRL for the whole process, so it is imported only here,
inside `train`; run this backend in a process of its own when the rest of the process must stay unpatched.
QLoRA is the same path with `load_in_4bit`; the adapter it saves is a plain PEFT folder, like the hf backend's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

from lorapipe.backends import peft_adapter
from lorapipe.backends.base import BackendUnavailable, TokenizingTask, TrainingTask
from lorapipe.backends.trainer import (
    finish_trainer_run,
    monitor_callback,
    new_monitor,
    resume_point,
    train_tokens,
    trainer_arguments,
    trainer_class,
)
from lorapipe.catalog import BACKENDS
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.training.adapter import AdapterInfo
from lorapipe.training.preemption import Preemption

log = logging.getLogger(__name__)

INSTALL_HINT = BACKENDS["unsloth"].install


def _import_unsloth() -> Any:
    """unsloth's FastLanguageModel, or BackendUnavailable saying why not and what to install."""
    try:
        import unsloth  # noqa: F401  (first: it patches transformers/TRL before they are used below)
        from unsloth import FastLanguageModel
    except ImportError as exc:
        raise BackendUnavailable.not_importable("unsloth", "unsloth", exc) from None
    except Exception as exc:  # noqa: BLE001 - unsloth raises e.g. NotImplementedError when it finds no device
        raise BackendUnavailable(
            f"unsloth is installed but refused to start here ({type(exc).__name__}: {exc}); reinstall with "
            f"{INSTALL_HINT} on a CUDA machine, or set train.backend: hf") from None
    return FastLanguageModel


def _quantization_applied(model: Any) -> str:
    """What the loaded weights really are: unsloth falls back to 16-bit silently when 4-bit cannot run."""
    names = {type(m).__name__ for m in model.modules()}
    if "Linear4bit" in names:
        return "nf4"
    if "Linear8bitLt" in names:
        return "int8"
    return "none"


def _point_adapter_at_base(adapter_dir: Path, m: ModelSection) -> None:
    """adapter_config.json names the base we were given (unsloth may have resolved a mirror of it)."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("base_model_name_or_path") != m.name_or_path or cfg.get("revision") != m.revision:
        cfg["base_model_name_or_path"] = m.name_or_path
        cfg["revision"] = m.revision
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _library_trainer(trainer: Any) -> str:
    """The library trainer class under lorapipe's wrapper: unsloth's patched one (e.g. unsloth_compiled_cache's
    UnslothDPOTrainer) when `import unsloth` replaced TRL's."""
    cls = next(c for c in type(trainer).__mro__ if not c.__module__.startswith("lorapipe."))
    return f"{cls.__module__}.{cls.__name__}"


class UnslothBackend:
    """Trains with Unsloth; its adapters are PEFT folders, evaluated and merged like the hf backend's."""

    name = "unsloth"

    def train(self, task: TrainingTask, model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval_split: ConversationDataset, work_dir: Path,
              adapter_dir: Path) -> AdapterInfo:
        if task.spec.name not in BACKENDS[self.name].tasks:  # preflight refuses it; a direct call is told the same
            raise ValueError(f"the unsloth backend trains task {', '.join(BACKENDS[self.name].tasks)}, not "
                             f"{task.spec.name}: {BACKENDS[self.name].limits_note}")
        FastLanguageModel = _import_unsloth()  # noqa: N806 - a class, as unsloth names it

        import transformers
        from transformers import PrinterCallback, set_seed
        from trl import SFTConfig, SFTTrainer

        from lorapipe.models.loading import torch_dtype

        set_seed(seed)
        transformers.logging.set_verbosity_error()
        m = model_cfg
        work_dir, adapter_dir = Path(work_dir), Path(adapter_dir)
        # The task's tokenizer (chat template override, pad token) so rendering and masking match the hf backend,
        # evaluation and merge exactly; unsloth's own tokenizer is not used.
        tokenizer = task.tokenizer(m)
        tokenizer.padding_side = "right"
        checkpointing = "unsloth" if plan.gradient_checkpointing else False
        model, _ = FastLanguageModel.from_pretrained(
            model_name=m.name_or_path, max_seq_length=plan.max_seq_length, dtype=torch_dtype(plan.dtype),
            load_in_4bit=plan.quantization == "nf4", load_in_8bit=plan.quantization == "int8",
            revision=m.revision, trust_remote_code=m.trust_remote_code,
            use_exact_model_name=True,  # the base we were given, never a pre-quantized hub mirror of it
            use_gradient_checkpointing=checkpointing,
        )
        applied = _quantization_applied(model)
        if applied != plan.quantization:
            log.warning("the plan asked for quantization %s but unsloth loaded %s weights on %s (recorded in "
                        "%s/lorapipe_adapter.json)", plan.quantization, applied, plan.device, adapter_dir.name)
        lora = t.lora
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            bias=lora.bias, use_gradient_checkpointing=checkpointing, random_state=seed,
            max_seq_length=plan.max_seq_length,
        )
        if plan.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

        ckpt_dir = work_dir / "checkpoints"
        arguments = trainer_arguments(t, plan, seed, ckpt_dir)
        # get_peft_model above already set checkpointing up (unsloth's offloaded variant on CUDA); the Trainer
        # enabling it again would replace that with the stock one
        arguments["gradient_checkpointing"] = False
        callbacks = [monitor_callback(new_monitor(adapter_dir, m, t, plan, seed))]
        data = None
        if task.spec.name == "sft":
            rows = cast(TokenizingTask, task)
            train_ds = rows.tokenize(train, tokenizer, plan)
            eval_ds = rows.tokenize(eval_split, tokenizer, plan) if len(eval_split) else None
            args = SFTConfig(**arguments, max_length=plan.max_seq_length)
            trainer = trainer_class(SFTTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                                processing_class=tokenizer, callbacks=callbacks)
        else:
            # preference: the task's rows and TRL trainer (DPO, KTO, ORPO), which `import unsloth` above replaced with
            # unsloth's patched ones; the model is already unsloth's PEFT model, so the reference is its adapter
            # switched off, as on the hf backend
            data = task.prepare(m, t, plan, tokenizer, train, eval_split)
            trainer = task.trainer(model, arguments, t, plan, tokenizer, data, callbacks)
            task.announce(model, plan, data)
        trainer.remove_callback(PrinterCallback)  # the monitor logs one compact line per log instead
        trainer.lorapipe_checkpoint_files = task.checkpoint_files(plan, trainer.args.world_size)
        resume_from = resume_point(t, ckpt_dir, trainer.args.world_size, trainer.lorapipe_checkpoint_files)
        start = time.perf_counter()
        with Preemption(enabled=trainer.args.world_size == 1) as preemption:  # SIGTERM: save, then PreemptedError
            trainer.add_callback(preemption.callback())
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        seconds = time.perf_counter() - start
        extra: dict[str, Any] = {"quantization_applied": applied,
                                 "optimizer_applied": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                                 "trainer_class": _library_trainer(trainer)}
        if data is None:
            tokens = train_tokens(train_ds, t, plan)
        else:
            tokens = task.train_tokens(trainer, data, t, plan)
            extra.update(task.metadata(trainer, t, plan, data, False))
        info = finish_trainer_run(trainer, result, seconds, tokens, self.name, adapter_dir, m, t, seed, plan, train,
                                  tokenizer, resume_from, extra=extra)
        _point_adapter_at_base(adapter_dir, m)
        del trainer, model
        return info

    # after training: what every PEFT adapter folder shares, whichever TRL backend wrote it
    eval_models = staticmethod(peft_adapter.eval_models)
    merge = staticmethod(peft_adapter.merge)
    reference_logits = staticmethod(peft_adapter.reference_logits)
