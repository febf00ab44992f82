"""The interface every training backend implements, and what a backend asks of the task it trains.

A backend trains a task it lists in its catalog entry (`lorapipe.catalog.BACKENDS`); the task object is handed to
`train` (`lorapipe.tasks.get_task`), so a backend never imports a task and a new task needs no new backend code. The
end of every training run (the adapter folder) and where checkpoints live are in `lorapipe.training`, shared by all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

from lorapipe.catalog import BACKENDS, TaskSpec
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.training.adapter import AdapterInfo


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says why and what to install."""

    @classmethod
    def not_importable(cls, backend: str, packages: str, exc: ImportError) -> "BackendUnavailable":
        """`packages` (as a person names them) cannot be imported: the catalog's install command, or hf."""
        return cls(f"train.backend={backend} needs {packages}, which cannot be imported here ({exc}); install with: "
                   f"{BACKENDS[backend].install}, or set train.backend: hf")


@dataclass
class PreparedData:
    """A task's rows made ready for a Trainer: the tokenised splits and what the task worked out from them."""

    train: Any  # datasets.Dataset
    eval: Optional[Any]  # datasets.Dataset, or None without eval rows
    rows: ConversationDataset  # the training split as given (its records)
    facts: dict[str, Any] = field(default_factory=dict)  # the task's own: labels, class weights, init adapter, ...


class TrainingTask(Protocol):
    """What a Trainer backend (hf; unsloth, which trains sft only) asks of the task it trains, in the order it asks.
    `lorapipe.tasks.sft.SFT` documents each."""

    spec: TaskSpec

    def tokenizer(self, model: ModelSection) -> Any: ...

    def prepare(self, model: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                train: ConversationDataset, eval_split: ConversationDataset) -> PreparedData: ...

    def load_model(self, model: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                   data: PreparedData, device: str) -> Any: ...

    def trainer(self, model: Any, arguments: dict[str, Any], t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                data: PreparedData, callbacks: list[Any]) -> Any: ...

    def checkpoint_files(self, plan: TrainingPlan, world_size: int) -> tuple[str, ...]: ...

    def announce(self, model: Any, plan: TrainingPlan, data: PreparedData) -> None: ...

    def train_tokens(self, trainer: Any, data: PreparedData, t: TrainSection, plan: TrainingPlan) -> int: ...

    def metadata(self, trainer: Any, t: TrainSection, plan: TrainingPlan, data: PreparedData,
                 evaluating: bool) -> dict[str, Any]: ...

    def after_training(self, model: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, tokenizer: Any,
                       data: PreparedData, work_dir: Path, adapter_dir: Path, is_main: bool) -> None: ...


class TokenizingTask(TrainingTask, Protocol):
    """A task whose rows a backend that builds its own model and trainer (unsloth) can tokenize without the task's
    `prepare`: sft. The backend checks the task's name against its catalog entry before asking."""

    def tokenize(self, dataset: ConversationDataset, tokenizer: Any, plan: TrainingPlan) -> Any: ...


class TrainingBackend(Protocol):
    """What the phases need from a backend: training a task, and after it the adapter's models, merge and reference
    logits, all keyed by the adapter folder, which names its backend, so the steps after training never choose one."""

    name: str

    def train(self, task: TrainingTask, model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval_split: ConversationDataset, work_dir: Path,
              adapter_dir: Path) -> AdapterInfo:
        """Train (resuming from the last checkpoint in `work_dir` if allowed) and save the adapter."""
        ...

    def eval_models(self, adapter_dir: str, phase: PhasePlan) -> dict[str, Callable[[], ContextManager[Any]]]:
        """{"base": ..., "tuned": ...}: context managers yielding transformers models to score side by side, on the
        evaluate phase's device and dtype."""
        ...

    def merge(self, adapter_dir: str, out_dir: str, phase: PhasePlan) -> None:
        """Write base+adapter folded into one `save_pretrained` folder (safetensors + tokenizer) in the merge
        phase's dtype."""
        ...

    def reference_logits(self, adapter_dir: str, phase: PhasePlan) -> Callable[[Any], Any]:
        """ids -> float32 logits of base+adapter, unmerged, in the adapter's own ecosystem (the merge check)."""
        ...
