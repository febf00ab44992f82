"""The train phase: the task the plan names, trained by the backend the plan chose, in this process or over the
plan's data-parallel processes (launched here with torchrun: `lorapipe.phases.launch`), in a folder keyed by the
training's inputs and code so that re-running the same command resumes."""

from __future__ import annotations

from pathlib import Path

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.phases.launch import needs_launch, train_data_parallel
from lorapipe.phases.train_in_process import train_in_process
from lorapipe.training.adapter import AdapterInfo
from lorapipe.training.checkpoints import (
    training_code_version,
    training_key,
    work_dir_for,
)


def training_folder(model: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, train: ConversationDataset,
                    eval_split: ConversationDataset) -> Path:
    """`train.output_root/<inputs>-<code>`: checkpoints of the same code resume; those of older code are set aside
    (train.resume_from resumes one on purpose)."""
    return work_dir_for(t.output_root, training_key(model, t, seed, plan, train, eval_split),
                        training_code_version(plan.backend, plan.task), t.resume_from)


def train_adapter(model: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, train: ConversationDataset,
                  eval_split: ConversationDataset, work_dir: Path, adapter_dir: Path) -> AdapterInfo:
    """Train and save the adapter: over `plan.world_size` processes when the plan trains data-parallel and this
    process is not one of them yet, else here."""
    if needs_launch(plan):
        return train_data_parallel(model, t, seed, plan, train, eval_split, Path(work_dir), Path(adapter_dir))
    return train_in_process(model, t, seed, plan, train, eval_split, work_dir, adapter_dir)
