"""transformers + PEFT + TRL backend: CPU, CUDA, and QLoRA via a bitsandbytes quantization config.

Beyond a plain SFTTrainer run, `HFBackend.train`:

- resumes bit-identically on CPU: data order comes from `data_seed` (accelerate's seedable sampler, or, with
  `train.group_by_length`, a length-grouped sampler re-seeded from `data_seed + epoch`), and the Trainer restores the
  RNG state (dropout) saved in the checkpoint; it resumes from the latest *complete* checkpoint (a newer one cut short
  by a crash is said and set aside, see `trl_sft.resume_point`);
- on SIGTERM (spot machine, Kubernetes) saves a checkpoint at the end of the current step and stops with
  `PreemptedError` (`lorapipe.training.preemption`): the same command resumes;
- continues an existing adapter (`train.init_adapter`) instead of adding new LoRA layers;
- evaluates every `train.eval_steps`, with early stopping and best-model reloading on `eval_loss`;
- groups rows by length or packs them padding-free (TRL's BFD packing: position ids restart per row, so rows do not
  attend across each other), and reports the padding actually fed (`padding_waste` in the adapter metadata);
- writes metrics/plots, prints progress and feeds the stack's tracker through the shared
  `lorapipe.training.monitoring.TrainingMonitor`;
- backs off on a CUDA out-of-memory error in the first steps: half the micro-batch, twice the accumulation (in one
  process only: data-parallel ranks cannot change their batch geometry alone);
- runs data-parallel in the processes the train step launches (`lorapipe.phases.launch`, or an outside
  `torchrun`): each rank on its own GPU, the padding counted over all ranks, and only the main process writes the
  adapter folder, the metrics and the progress lines.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends import peft_adapter
from lorapipe.backends.base import AdapterInfo, checkpoint_step
from lorapipe.backends.trainer import (
    checkpoint_save_guard,
    finish_trainer_run,
    lora_config,
    monitor_callback,
    new_monitor,
    resume_point,
    sft_config_kwargs,
    tokenize_dataset,
    train_tokens,
)
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.training.preemption import Preemption

# A CUDA OOM before this many optimizer steps of an attempt have completed triggers the micro-batch backoff; a later
# one is raised (it is then a long-row problem, not a batch-geometry one).
OOM_BACKOFF_WITHIN_STEPS = 10


class PaddingCounter:
    """Counts the real and the padded token positions of every micro-batch the trainer fed to the model.

    Counted in `training_step` (not in the collator, which accelerate's dataloader runs one batch ahead)."""

    def __init__(self) -> None:
        self.real_tokens = 0
        self.padded_tokens = 0
        self.batches = 0
        self.padding_free = False

    def count(self, inputs: dict[str, Any], real_tokens: Optional[int] = None) -> None:
        ids = inputs["input_ids"]
        total = int(ids.numel())
        mask = inputs.get("attention_mask")
        # padding-free batches (packing) carry position ids and no mask: flattened into one row nothing is padding;
        # kept as rows (PackedRowsCollator), the collator says how many positions are real
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


class PackedRowsCollator:
    """Packed rows kept as rows. TRL's BFD packing flattens a micro-batch of packs into one sequence ([1, B x L]): with
    FlashAttention that is varlen attention, but sdpa and eager then attend over all B x L positions under a
    block-diagonal mask, B times the work of the packs themselves (measured: packing slower than naive padding on the
    CPU). Here each pack stays a row ([B, L], right-padded to the longest pack), position ids restart at every packed
    sequence and there is no attention mask: transformers builds each row's block-diagonal causal mask from the
    position ids (masking_utils.find_packed_sequence_indices), so rows never attend across each other."""

    REAL_TOKENS = "lorapipe_real_tokens"  # popped by the trainer before the model sees the batch

    def __init__(self, inner: Any, pad_token_id: int) -> None:
        self.inner, self.pad_token_id = inner, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        if "seq_lengths" in examples[0]:
            positions = self.inner.get_position_ids_from_packed_seq_lengths([e["seq_lengths"] for e in examples])
        else:
            positions = [torch.arange(n) for n in lengths]
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
        position_ids = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, (example, n) in enumerate(zip(examples, lengths)):
            ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]))
            position_ids[row, :n] = positions[row]
            # the padding after a pack: positions restarting at 0, so it is a sequence of its own (labels -100), which
            # attends neither into the pack nor from it
            position_ids[row, n:] = torch.arange(longest - n)
        labels[position_ids == 0] = -100  # a sequence's first token is not predicted from the one before it
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids, self.REAL_TOKENS: sum(lengths)}


_TRAINER_CLS: Any = None


def _trainer_class() -> Any:
    """SFTTrainer with a reproducible length-grouped sampler and a count of the padding it trains on."""
    global _TRAINER_CLS
    if _TRAINER_CLS is not None:
        return _TRAINER_CLS
    import torch
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
    from trl import SFTTrainer

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """Length-grouped order drawn from `seed + epoch`, never from the global RNG: the same order on a resumed
        run (whose global RNG differs when the dataloader starts) and on every data-parallel rank."""

        def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.seed = seed
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):  # noqa: ANN204
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class LorapipeSFTTrainer(SFTTrainer):
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
            real = inputs.pop(PackedRowsCollator.REAL_TOKENS, None)
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
            with checkpoint_save_guard(self, trial):
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

    _TRAINER_CLS = LorapipeSFTTrainer
    return _TRAINER_CLS


def _backed_off(plan: TrainingPlan) -> TrainingPlan:
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
    smaller = _backed_off(plan)
    backoffs.append({"from": plan.micro_batch_size, "to": smaller.micro_batch_size, "step": oom_step,
                     "gradient_accumulation_steps": {"from": plan.gradient_accumulation_steps,
                                                     "to": smaller.gradient_accumulation_steps},
                     "effective_batch_size": smaller.effective_batch_size})
    print(f"CUDA out of memory at step {oom_step} with micro-batch {plan.micro_batch_size}: retrying with "
          f"micro-batch {smaller.micro_batch_size} x accumulation {smaller.gradient_accumulation_steps} "
          f"(effective {smaller.effective_batch_size})", flush=True)
    return smaller


class HFBackend:
    name = "hf"

    def train(self, model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval: ConversationDataset, work_dir: Path,  # noqa: A002
              adapter_dir: Path, extra_callbacks: Optional[list[Any]] = None) -> AdapterInfo:
        """Train and save the adapter. `extra_callbacks`: more `TrainerCallback`s (tests use it to inject crashes
        and simulated OOMs); the same instances are reused by an OOM retry."""
        if plan.task == "classification":
            from lorapipe.backends.hf_classifier import train_classifier

            return train_classifier(model_cfg, t, seed, plan, train, eval, work_dir, adapter_dir, extra_callbacks)
        import torch
        import transformers
        from transformers import set_seed

        from lorapipe.models.loading import load_tokenizer
        from lorapipe.training.monitoring import free_memory, process_memory_gb, reset_peak_memory

        transformers.logging.set_verbosity_error()
        resident_at_start = None
        if plan.device != "cuda":  # the CPU phase's resident peak starts here (CUDA's counter after the model loads)
            resident_at_start = round(process_memory_gb(), 3)
            reset_peak_memory(plan.device)
        m = model_cfg
        work_dir, adapter_dir = Path(work_dir), Path(adapter_dir)
        if t.eval_steps and not len(eval):
            raise ValueError("train.eval_steps (and early stopping / load_best_model_at_end) need a non-empty eval "
                             "split: raise split.eval_fraction or set train.eval_steps: null")
        init_adapter = self._check_init_adapter(t, m)
        tokenizer = load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code, m.chat_template)
        train_ds = tokenize_dataset(train, tokenizer, plan.max_seq_length)
        eval_ds = tokenize_dataset(eval, tokenizer, plan.max_seq_length) if len(eval) else None
        ckpt_dir = work_dir / "checkpoints"

        backoffs: list[dict[str, Any]] = []
        while True:
            set_seed(seed)
            model = self._load_model(m, plan, init_adapter)
            trainer = self._trainer(model, m, t, seed, plan, tokenizer, train_ds, eval_ds, ckpt_dir, adapter_dir,
                                    init_adapter, extra_callbacks)
            resume_from = resume_point(t, ckpt_dir, trainer.args.world_size)
            oom_step: Optional[int] = None
            start = time.perf_counter()
            try:
                # a SIGTERM saves a checkpoint at the next step end and raises PreemptedError (one process only)
                with Preemption(enabled=trainer.args.world_size == 1) as preemption:
                    trainer.add_callback(preemption.callback())
                    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except torch.cuda.OutOfMemoryError as exc:
                oom_step = trainer.state.global_step
                smaller = oom_backoff(exc, trainer, plan, resume_from, backoffs)
            if oom_step is None:
                break
            del trainer, model
            free_memory(plan.device)
            plan = smaller

        seconds = time.perf_counter() - start
        state = trainer.state
        if trainer.args.world_size > 1:
            trainer.padding_counter.add_other_ranks(trainer.accelerator)
        extra: dict[str, Any] = {
            "padding_waste": trainer.padding_counter.summary(),
            "batching": {"group_by_length": t.group_by_length, "packing": t.packing,
                         "packing_strategy": "bfd" if t.packing else None},
            "oom_backoff": backoffs,
            "world_size": trainer.args.world_size,
            "init_adapter": str(init_adapter) if init_adapter else None,
        }
        if t.eval_steps:
            extra["evaluation"] = {
                "eval_steps": t.eval_steps, "best_eval_loss": state.best_metric,
                "best_checkpoint": state.best_model_checkpoint,
                "stopped_early": bool(t.early_stopping_patience) and state.global_step < state.max_steps,
                "loaded_best_model": t.load_best_model_at_end,
            }
        info = finish_trainer_run(trainer, result, seconds, train_tokens(train_ds, t, plan), self.name, adapter_dir,
                                  m, t, seed, plan, train, tokenizer, resume_from, extra,
                                  resident_at_start_gb=resident_at_start)
        trainer.accelerator.wait_for_everyone()
        device = plan.device
        del trainer, model, result
        free_memory(device)
        return info

    # -- pieces ----------------------------------------------------------------------------------------------------
    # after training: what every PEFT adapter folder shares, whichever TRL backend wrote it
    eval_models = staticmethod(peft_adapter.eval_models)
    merge = staticmethod(peft_adapter.merge)
    reference_logits = staticmethod(peft_adapter.reference_logits)

    @staticmethod
    def _check_init_adapter(t: TrainSection, m: ModelSection) -> Optional[Path]:
        if not t.init_adapter:
            return None
        path = Path(t.init_adapter).expanduser().resolve()
        cfg_path = path / "adapter_config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"train.init_adapter: {path} is not a PEFT adapter folder (no adapter_config.json)")
        cfg = json.loads(cfg_path.read_text())
        base = cfg.get("base_model_name_or_path")
        if base and base != m.name_or_path:
            print(f"warning: train.init_adapter {path} was trained on {base}, continuing it on {m.name_or_path}",
                  flush=True)
        if cfg.get("r") != t.lora.r or cfg.get("lora_alpha") != t.lora.alpha:
            print(f"note: train.init_adapter keeps its own LoRA shape (r={cfg.get('r')}, "
                  f"alpha={cfg.get('lora_alpha')}); train.lora is not applied", flush=True)
        return path

    @staticmethod
    def _load_model(m: ModelSection, plan: TrainingPlan, init_adapter: Optional[Path]) -> Any:
        import torch
        from peft import prepare_model_for_kbit_training

        from lorapipe.models.loading import load_model

        device = plan.device
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            # a data-parallel rank trains on its own GPU: "cuda" (and the peak-memory counter) then means that one
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{torch.cuda.current_device()}"
        model = load_model(m.name_or_path, plan.dtype, m.revision, m.trust_remote_code, plan.quantization,
                           device=device, attn_implementation=m.attn_implementation)
        if plan.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
        if init_adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return model

    @staticmethod
    def _trainer(model: Any, m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, tokenizer: Any,
                 train_ds: Any, eval_ds: Any, ckpt_dir: Path, adapter_dir: Path, init_adapter: Optional[Path],
                 extra_callbacks: Optional[list[Any]]) -> Any:
        from transformers import EarlyStoppingCallback, PrinterCallback
        from trl import SFTConfig

        evaluating = bool(t.eval_steps) and eval_ds is not None
        if t.packing:
            # Padding-free batches carry position ids and no attention mask; transformers turns restarting position
            # ids into a block-diagonal causal mask (sdpa/eager/flex) or varlen kernels (flash), provided no KV cache.
            model.config.use_cache = False
            impl = str(getattr(model.config, "_attn_implementation", None))
            if impl not in ("sdpa", "eager", "flex_attention") and "flash" not in impl:
                print(f"warning: train.packing with attention implementation {impl!r}: rows may attend across each "
                      "other unless the model builds its mask from position ids", flush=True)
        args = SFTConfig(
            **sft_config_kwargs(t, plan, seed, ckpt_dir),
            eval_strategy="steps" if evaluating else "no",
            eval_steps=t.eval_steps if evaluating else None,
            metric_for_best_model="eval_loss" if evaluating else None,
            greater_is_better=False if evaluating else None,
            load_best_model_at_end=t.load_best_model_at_end and evaluating,
            # transformers 5 names group_by_length a sampling strategy; the sampler itself is seeded below
            train_sampling_strategy="group_by_length" if t.group_by_length else "random",
            packing=t.packing,
            packing_strategy="bfd",
            padding_free=t.packing,
            ddp_find_unused_parameters=False,
            gradient_checkpointing=plan.gradient_checkpointing,
        )

        callbacks: list[Any] = [monitor_callback(new_monitor(adapter_dir, m, t, plan, seed))]
        if evaluating and t.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
        callbacks.extend(extra_callbacks or [])
        trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                   processing_class=tokenizer,
                                   peft_config=None if init_adapter is not None else lora_config(t.lora),
                                   callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # the monitor prints one compact line per log instead
        if t.packing and "flash" not in str(getattr(model.config, "_attn_implementation", "")):
            trainer.data_collator = PackedRowsCollator(trainer.data_collator, tokenizer.pad_token_id)
        return trainer
