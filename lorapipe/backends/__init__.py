"""Training backends behind one small interface (`base.TrainingBackend`); each trains the tasks its catalog entry
lists (`lorapipe.catalog.BACKENDS`), handed the task it trains. `get_backend` is the one place a backend's class is
imported, so heavy and platform-specific imports happen only for the backend in use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapipe.catalog import BACKENDS, backend_spec

if TYPE_CHECKING:
    from lorapipe.backends.base import TrainingBackend


def get_backend(name: str) -> "TrainingBackend":
    """The backend named by the plan (or by an adapter's metadata). Explicit imports, one per catalog entry: the
    code fingerprint (lorapipe.code_version) follows them, so a step that trains depends on the backends' code."""
    backend_spec(name)  # an unknown name fails here, listing the catalog's
    if name == "hf":
        from lorapipe.backends.hf import HFBackend

        return HFBackend()
    if name == "unsloth":
        from lorapipe.backends.unsloth import UnslothBackend

        return UnslothBackend()
    if name == "mlx":
        from lorapipe.backends.mlx import MLXBackend

        return MLXBackend()
    raise NotImplementedError(f"the catalog lists backend {name!r} but get_backend has no class for it")


__all__ = ["BACKENDS", "backend_spec", "get_backend"]
