"""The evaluate phase: an adapter scored by the task it was trained for (`lorapipe.tasks.<task>.evaluate`: base vs
tuned for sft, the classifier against its baselines for classification), and any saved model folder of a task
scored on the same rows the same way (`score_model_folder`: the stage holder, to compare with this run's), on the
evaluation plan's device, dtype, batch size and sequence length."""

from __future__ import annotations

from typing import Optional

from lorapipe import short_lived
from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.evaluation.metrics import BaseScores, EvalMetrics, ModelScores
from lorapipe.hardware.plan import PhasePlan
from lorapipe.tasks import get_task
from lorapipe.training.adapter import read_adapter_metadata, task_of


def evaluate_adapter(adapter_dir: str, test: ConversationDataset, phase: PhasePlan,
                     evaluate: Optional[EvaluateSection] = None, seed: int = 0,
                     chat_template: Optional[str] = None, base: Optional[BaseScores] = None) -> EvalMetrics:
    """The adapter's task scores it on the test rows (`evaluate`: rows scored and generated, the generation budget
    and metrics; the config's defaults when None); `base`: the untuned base's scores from `score_base` on the same
    rows and settings, not scored again."""
    short_lived.freeze_training_imports()  # no-op unless this process runs one command and ends
    task = get_task(task_of(read_adapter_metadata(adapter_dir)))
    return task.evaluate(adapter_dir, test, phase, evaluate or EvaluateSection(), seed, chat_template, base=base)


def score_base(model: ModelSection, task: str, test: ConversationDataset, phase: PhasePlan,
               evaluate: Optional[EvaluateSection] = None, seed: int = 0) -> BaseScores:
    """The untuned base of `model` scored on the test rows as `evaluate_adapter` would score it beside an adapter
    (tasks whose catalog entry has scores_base_apart)."""
    short_lived.freeze_training_imports()  # no-op unless this process runs one command and ends
    return get_task(task).score_base(model, test, phase, evaluate or EvaluateSection(), seed)


def score_model_folder(folder: str, task: str, test: ConversationDataset, phase: PhasePlan,
                       evaluate: Optional[EvaluateSection] = None, seed: int = 0,
                       chat_template: Optional[str] = None) -> tuple[ModelScores, list[dict]]:
    """A merged model folder of `task` scored exactly as `evaluate_adapter` scores the tuned model: its scores and
    generations."""
    short_lived.freeze_training_imports()  # no-op unless this process runs one command and ends
    return get_task(task).score_folder(folder, test, phase, evaluate or EvaluateSection(), seed, chat_template)
