"""Training backends behind one small interface; the plan's `backend` picks one, here and nowhere else."""

from __future__ import annotations

from lorapipe.backends.base import AdapterInfo, BackendUnavailable, TrainingBackend


def get_backend(name: str) -> TrainingBackend:
    """The one selection point. Heavy imports stay inside each backend's functions."""
    if name == "hf":
        from lorapipe.backends.hf import HFBackend

        return HFBackend()
    if name == "unsloth":
        from lorapipe.backends.unsloth import UnslothBackend

        return UnslothBackend()
    if name == "mlx":
        from lorapipe.backends.mlx import MLXBackend

        return MLXBackend()
    raise ValueError(f"train.backend: {name!r} is not one of auto, hf, unsloth, mlx")


__all__ = ["AdapterInfo", "BackendUnavailable", "TrainingBackend", "get_backend"]
