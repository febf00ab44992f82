"""One process's training: the plan's task, trained by the plan's backend, here. A whole run on one device, or one
rank of a data-parallel run (`lorapipe.phases.train_worker`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lorapipe import short_lived
from lorapipe.backends import get_backend
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.tasks import get_task
from lorapipe.training.adapter import AdapterInfo


def train_in_process(model: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, train: ConversationDataset,
                     eval_split: ConversationDataset, work_dir: Path, adapter_dir: Path,
                     extra_callbacks: Optional[list[Any]] = None) -> AdapterInfo:
    """The plan's task on the plan's backend, in this process (one data-parallel rank, when launched as one)."""
    short_lived.freeze_training_imports()  # no-op unless this process runs one command and ends
    backend = get_backend(plan.backend)
    kwargs = {"extra_callbacks": extra_callbacks} if extra_callbacks else {}
    return backend.train(get_task(plan.task), model, t, seed, plan, train, eval_split, Path(work_dir),
                         Path(adapter_dir), **kwargs)
