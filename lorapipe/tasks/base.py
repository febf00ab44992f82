"""The interface every task implements: what a Trainer backend asks of it while training (`TrainingTask`, defined
by the backends, which call it), and what the phases after training ask of it (below). Each method is documented on
`lorapipe.tasks.sft.SFT`, the reference implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

from lorapipe.backends.base import TrainingTask
from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.evaluation.merge_check import MergeCheck, ReferenceLogits
from lorapipe.evaluation.metrics import BaseScores, EvalMetrics, ModelScores
from lorapipe.hardware.plan import PhasePlan


class Task(TrainingTask, Protocol):
    def evaluate(self, adapter_dir: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                 seed: int = 0, chat_template: Optional[str] = None, base: Optional[BaseScores] = None) -> EvalMetrics:
        """The tuned model against its baselines on the test rows, on the evaluate phase's device, dtype, batch size
        and sequence length; `base`: the untuned base's scores from `score_base` (tasks whose catalog entry has
        scores_base_apart), not scored again."""
        ...

    def score_base(self, m: ModelSection, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                   seed: int = 0) -> BaseScores:
        """The untuned base of `m` alone on the test rows, as `evaluate` would score it (scores_base_apart tasks)."""
        ...

    def score_folder(self, folder: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                     seed: int = 0, chat_template: Optional[str] = None) -> tuple[ModelScores, list[dict]]:
        """A saved (merged) model of this task scored on the test rows exactly as `evaluate` scores the tuned one:
        its scores and its generations (none for a task that does not generate)."""
        ...

    def check_inputs(self, tokenizer: Any, rows: list[Record], max_length: int) -> list[Any]:
        """The merge check's inputs: each row encoded as training encoded it."""
        ...

    def compare_merged(self, folder: str | Path, inputs: list[Any], reference: ReferenceLogits, phase: PhasePlan,
                       tolerance: float) -> MergeCheck:
        """The merged folder reloaded and its logits compared with base + adapter's (`reference`)."""
        ...

    def serving_files(self, folder: Path, tokenizer: Any) -> tuple[list[str], Optional[str], str]:
        """What the merged folder serves with besides its weights and tokenizer: (end tokens, the Ollama Modelfile's
        chat family or None, a note on it)."""
        ...
