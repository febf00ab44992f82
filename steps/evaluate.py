"""Offline evaluation on the test split: base vs tuned loss/perplexity, ROUGE-L and stop rate."""

from typing import Annotated

from zenml import step

from lorapipe.artifacts import AdapterFolder
from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.evaluation.metrics import EvalMetrics, evaluate_adapter
from lorapipe.hardware.plan import TrainingPlan
from materializers import ReportMaterializer


@step(output_materializers=ReportMaterializer)
def evaluate_model(
    adapter: AdapterFolder, test_split: ConversationDataset, training_plan: TrainingPlan, evaluate: dict, model: dict,
) -> Annotated[EvalMetrics, "eval_metrics"]:
    """Score base and base+adapter on the same held-out rows.

    Args:
        adapter: the trained adapter folder.
        test_split: held-out rows.
        training_plan: gives the device and sequence length.
        evaluate: the config's `evaluate` section.
        model: the config's `model` section.

    Returns:
        Base and tuned metrics.
    """
    e, m = EvaluateSection(**evaluate), ModelSection(**model)
    device = training_plan.device if training_plan.device in ("cpu", "cuda") else "cpu"
    return evaluate_adapter(adapter.path, test_split, e.max_samples, e.generation_samples, e.max_new_tokens,
                            training_plan.max_seq_length, e.batch_size, device=device, chat_template=m.chat_template,
                            dtype=training_plan.dtype if device == "cuda" else "float32")
