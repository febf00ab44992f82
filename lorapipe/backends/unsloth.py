"""Unsloth backend (CUDA; CPU fallback). Its import patches transformers and TRL globally, so it is
imported only here, inside the functions."""

from __future__ import annotations

from lorapipe.backends.base import BackendUnavailable


class UnslothBackend:
    name = "unsloth"

    def train(self, model, train_cfg, seed, plan, train, eval, work_dir, adapter_dir):  # noqa: A002
        raise BackendUnavailable(
            "the unsloth backend's training loop is not in this release yet (tracked as the training-backends "
            "issue); set train.backend: hf (transformers+PEFT, with bitsandbytes for QLoRA) or auto"
        )
