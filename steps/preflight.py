"""Hardware preflight: probe the machine and decide the training plan, or refuse with every reason."""

from typing import Annotated, Tuple

from zenml import step
from zenml.logger import get_logger

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.validation import ValidationReport
from lorapipe.hardware.plan import TrainingPlan, decide_plan, model_size
from lorapipe.hardware.probe import HardwareProbe, probe
from materializers import ReportMaterializer

logger = get_logger(__name__)


@step(output_materializers={"preflight_report": ReportMaterializer, "training_plan": ReportMaterializer})
def preflight(
    validation_report: ValidationReport, model: dict, train: dict,
) -> Tuple[Annotated[HardwareProbe, "preflight_report"], Annotated[TrainingPlan, "training_plan"]]:
    """Probe CPU/RAM/disk, CUDA and Apple/MLX and the installed packages; decide the plan in one function.

    Args:
        validation_report: the data's token statistics (checked against the sequence length).
        model: the config's `model` section (its config is read for the model's size; no weights load).
        train: the config's `train` section.

    Returns:
        The hardware probe and the training plan.
    """
    m, t = ModelSection(**model), TrainSection(**train)
    hw = probe(t.output_root)
    plan = decide_plan(t, hw, model_size(m.name_or_path, m.revision, m.trust_remote_code))
    stats = validation_report.token_stats
    if stats and stats.truncated_rows:
        plan.warnings.append(f"{stats.truncated_rows} row(s) are longer than max_seq_length={plan.max_seq_length}")
    for r in plan.reasons + [f"warning: {w}" for w in plan.warnings]:
        logger.info("plan: %s", r)
    return hw, plan
