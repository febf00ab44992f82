"""Score the untuned base on the test split, once per (base model, test rows, evaluation settings): the step's cache
key holds exactly those, not the adapter, so a retraining with other hyperparameters (learning rate, rank, epochs)
reuses these scores and only the tuned model is scored again (task sft; a classifier's baselines are of its own
labels and scored in its evaluation)."""

from typing import Annotated

from zenml import step

from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.evaluation.metrics import BaseScores
from lorapipe.hardware.plan import PhasePlan
from lorapipe.phases.evaluate import score_base
from materializers import ReportMaterializer
from steps.caching import library_cache_policy


@step(output_materializers=ReportMaterializer, cache_policy=library_cache_policy(__file__))
def evaluate_base_model(
    test_split: ConversationDataset, base_evaluation_plan: PhasePlan, evaluate: EvaluateSection, model: ModelSection,
    task: str, seed: int,
) -> Annotated[BaseScores, "base_scores"]:
    """The base alone on the test rows, scored as the evaluation scores it beside an adapter.

    Args:
        test_split: held-out rows.
        base_evaluation_plan: device, dtype, batch size and sequence length (the evaluation plan, adapter left out).
        evaluate: the config's `evaluate` section (rows scored and generated, the generation budget, metrics).
        model: the config's `model` section: the base and its chat template.
        task: the config's task (one whose catalog entry has scores_base_apart).
        seed: the run's seed, set before generating.

    Returns:
        The base's scores, per-row losses and generations.
    """
    return score_base(model, task, test_split, base_evaluation_plan, evaluate, seed)
