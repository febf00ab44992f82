"""transformers + PEFT + TRL backend: CPU, CUDA, and QLoRA via a bitsandbytes quantization config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from lorapipe.backends.base import AdapterInfo, write_adapter_metadata
from lorapipe.config import LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan


def tokenize_dataset(dataset: ConversationDataset, tokenizer: Any, max_length: int) -> Any:
    """A `datasets.Dataset` of input_ids + labels (-100 outside assistant turns), truncated to max_length."""
    from datasets import Dataset

    from lorapipe.data.render import encode

    rows = {"input_ids": [], "labels": []}
    for rec in dataset.records:
        enc = encode(tokenizer, rec, max_length)
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append([t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_mask)])
    return Dataset.from_dict(rows)


def lora_config(lora: LoraSection) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def last_checkpoint(folder: Path) -> Optional[Path]:
    ckpts = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return ckpts[-1] if ckpts else None


def _peak_memory_gb(device: str) -> float:
    import psutil
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class HFBackend:
    name = "hf"

    def train(self, model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval: ConversationDataset, work_dir: Path,  # noqa: A002
              adapter_dir: Path) -> AdapterInfo:
        import torch
        import transformers
        from peft import prepare_model_for_kbit_training
        from transformers import TrainerCallback, set_seed
        from trl import SFTConfig, SFTTrainer

        from lorapipe.hardware.probe import package_versions
        from lorapipe.models.loading import load_model, load_tokenizer

        set_seed(seed)
        transformers.logging.set_verbosity_error()
        m = model_cfg
        tokenizer = load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code, m.chat_template)
        model = load_model(m.name_or_path, plan.dtype, m.revision, m.trust_remote_code, plan.quantization, plan.device)
        if plan.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        train_ds = tokenize_dataset(train, tokenizer, plan.max_seq_length)
        eval_ds = tokenize_dataset(eval, tokenizer, plan.max_seq_length) if len(eval) else None
        ckpt_dir = work_dir / "checkpoints"
        args = SFTConfig(
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
            eval_strategy="no",
            seed=seed,
            data_seed=seed,
            bf16=plan.dtype == "bfloat16",
            fp16=plan.dtype == "float16",
            use_cpu=plan.device == "cpu",
            gradient_checkpointing=plan.gradient_checkpointing,
            max_length=plan.max_seq_length,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )

        class _SaveAnnouncer(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
                print(f"checkpoint saved: step {state.global_step}", flush=True)

        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, peft_config=lora_config(t.lora),
                             callbacks=[_SaveAnnouncer()])
        resume_from = last_checkpoint(ckpt_dir) if t.resume else None
        if resume_from is not None:
            print(f"resuming from {resume_from} (set train.resume=false to start over)", flush=True)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        seconds = time.perf_counter() - start
        tokens = int(sum(len(x) for x in train_ds["input_ids"]) * t.epochs) if t.max_steps < 0 else \
            int(sum(len(x) for x in train_ds["input_ids"]) / max(len(train_ds), 1) * t.max_steps * plan.effective_batch_size)

        adapter_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter_dir))
        with open(adapter_dir / "training_log.jsonl", "w") as fh:
            for entry in trainer.state.log_history:
                fh.write(json.dumps(entry) + "\n")
        info = AdapterInfo(
            path=str(adapter_dir), backend=self.name, device=plan.device, base_model=m.name_or_path,
            base_revision=m.revision, data_fingerprint=train.fingerprint, train_rows=len(train),
            steps=trainer.state.global_step, train_loss=float(result.training_loss) if result.training_loss is not None else None,
            train_tokens=tokens, tokens_per_second=tokens / seconds if seconds > 0 else 0.0, train_seconds=seconds,
            peak_memory_gb=round(_peak_memory_gb(plan.device), 3),
            resumed_from=str(resume_from) if resume_from else None, versions=package_versions(),
        )
        write_adapter_metadata(adapter_dir, m, t, seed, plan, info)
        del trainer, model
        return info
