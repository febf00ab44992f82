"""What a run learns: one module per task, each described once in the catalog (`lorapipe.catalog.TASKS`).

A task supplies what differs between tasks on the same backend: its tokenizer and rows, its model (the Auto class
and head, LoRA or full), its trainer (collator, loss, metrics), what training records beside the adapter, and, after
training, its evaluation, its scoring of a saved model, its merge check and what a merged folder serves with. The
backends train any task their catalog entry lists through one loop (`lorapipe.backends.hf`); the phases pick the task
an adapter names (`get_task`). A new task is a module here, a `TaskSpec` in the catalog and a line in `get_task`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapipe.catalog import task_spec

if TYPE_CHECKING:
    from lorapipe.tasks.base import Task


def get_task(name: str) -> "Task":
    """The task named by the config (or by an adapter's metadata). Explicit imports, one per catalog entry: the code
    fingerprint (lorapipe.code_version) follows them, so a step that trains depends on the tasks' code."""
    task_spec(name)  # an unknown name fails here, listing the catalog's
    if name == "sft":
        from lorapipe.tasks.sft import SFT

        return SFT()
    if name == "classification":
        from lorapipe.tasks.classification import Classification

        return Classification()
    if name == "preference":
        from lorapipe.tasks.preference import Preference

        return Preference()
    raise NotImplementedError(f"the catalog lists task {name!r} but get_task has no class for it")


__all__ = ["get_task"]
