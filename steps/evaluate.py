"""Offline evaluation on the test split by the adapter's task: for sft base vs tuned loss/perplexity, then batched
greedy generations scored with exact match, ROUGE-L, BLEU, chrF, the learned-to-stop rate and the overshoot; for
classification the classifier against the majority class and its head-only baseline."""

from typing import Annotated, Optional

from zenml import step

from lorapipe.artifacts import AdapterFolder
from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.evaluation.metrics import BaseScores, EvalMetrics
from lorapipe.hardware.plan import PhasePlan
from lorapipe.phases.evaluate import evaluate_adapter
from materializers import ReportMaterializer
from steps.caching import library_cache_policy


@step(output_materializers=ReportMaterializer, cache_policy=library_cache_policy(__file__))
def evaluate_model(
    adapter: AdapterFolder, test_split: ConversationDataset, evaluation_plan: PhasePlan, evaluate: EvaluateSection,
    model: ModelSection, seed: int, base_scores: Optional[BaseScores] = None,
) -> Annotated[EvalMetrics, "eval_metrics"]:
    """Score the tuned model and its baselines on the same held-out rows.

    Args:
        adapter: the trained adapter folder (it names its task and backend).
        test_split: held-out rows.
        evaluation_plan: the device, dtype, batch size and sequence length to score and generate with.
        evaluate: the config's `evaluate` section.
        model: the config's `model` section (its chat template override).
        seed: the run's seed, set before generating.
        base_scores: the untuned base's scores on the same rows (`evaluate_base_model`, task sft), not scored again.

    Returns:
        Base (or baseline) and tuned metrics.
    """
    return evaluate_adapter(adapter.path, test_split, evaluation_plan, evaluate, seed, model.chat_template,
                            base=base_scores)
