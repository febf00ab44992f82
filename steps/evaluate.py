"""Offline evaluation on the test split: base vs tuned loss/perplexity, then batched greedy generations scored with
exact match, ROUGE-L, BLEU, chrF, the learned-to-stop rate and the overshoot; for task: classification, the
classifier against the majority class and its head-only baseline (lorapipe.evaluation.classify)."""

from typing import Annotated

from zenml import step

from lorapipe.artifacts import AdapterFolder
from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.phases.evaluate import evaluate_adapter
from lorapipe.evaluation.metrics import EvalMetrics
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from materializers import ReportMaterializer
from steps.caching import library_cache_policy

DEFAULT_SEED = 42  # LorapipeConfig.seed's default, for a pipeline that does not pass the run's seed


@step(output_materializers=ReportMaterializer, cache_policy=library_cache_policy(__file__))
def evaluate_model(
    adapter: AdapterFolder, test_split: ConversationDataset, training_plan: TrainingPlan, evaluation_plan: PhasePlan,
    evaluate: dict, model: dict, seed: int = DEFAULT_SEED,
) -> Annotated[EvalMetrics, "eval_metrics"]:
    """Score base and base+adapter on the same held-out rows.

    Args:
        adapter: the trained adapter folder.
        test_split: held-out rows.
        training_plan: gives the sequence length rows were trained at.
        evaluation_plan: the device, dtype and batch size to score and generate with.
        evaluate: the config's `evaluate` section.
        model: the config's `model` section.
        seed: the run's seed, set before generating.

    Returns:
        Base and tuned metrics.
    """
    e, m = EvaluateSection(**evaluate), ModelSection(**model)
    if adapter.metadata.get("task") == "classification":
        from lorapipe.evaluation.classify import evaluate_classifier

        # every test row, against the majority class and the head-only baseline (no generation: nothing to sample)
        return evaluate_classifier(adapter.path, test_split, evaluation_plan, training_plan.max_seq_length)
    return evaluate_adapter(adapter.path, test_split, evaluation_plan, e.max_samples, e.generation_samples,
                            e.max_new_tokens, training_plan.max_seq_length, chat_template=m.chat_template, seed=seed,
                            generation_metrics=e.generation_metrics)
