"""mlx-lm backend (Apple Silicon; mlx[cpu] on Linux). mlx imports stay inside the functions."""

from __future__ import annotations

from lorapipe.backends.base import BackendUnavailable


class MLXBackend:
    name = "mlx"

    def train(self, model, train_cfg, seed, plan, train, eval, work_dir, adapter_dir):  # noqa: A002
        raise BackendUnavailable(
            "the mlx backend's training loop is not in this release yet (tracked as the training-backends "
            "issue); set train.backend: hf or auto"
        )
