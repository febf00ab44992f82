"""Hardware preflight: probe the machine and decide the plan of every phase, or refuse with every reason."""

from typing import Annotated, Tuple

from zenml import step
from zenml.logger import get_logger

from lorapipe.config import EvaluateSection, MergeSection, ModelSection, TrainSection
from lorapipe.data.validation import ValidationReport
from lorapipe.hardware.plan import PhasePlan, TrainingPlan, decide_plan, model_size
from lorapipe.hardware.probe import HardwareProbe, machine_fingerprint, probe
from materializers import ReportMaterializer
from steps.caching import library_cache_policy

logger = get_logger(__name__)


# The machine is an input of the plan: its fingerprint is in the cache key, so the same config on another machine
# (other GPUs, RAM, packages) is planned again, and on this one the plan is served from the cache.
@step(output_materializers={"preflight_report": ReportMaterializer, "training_plan": ReportMaterializer,
                            "evaluation_plan": ReportMaterializer, "merge_plan": ReportMaterializer},
      cache_policy=library_cache_policy(__file__, cache_func=machine_fingerprint))
def preflight(
    validation_report: ValidationReport, model: dict, train: dict, evaluate: dict, merge: dict,
) -> Tuple[
    Annotated[HardwareProbe, "preflight_report"],
    Annotated[TrainingPlan, "training_plan"],
    Annotated[PhasePlan, "evaluation_plan"],
    Annotated[PhasePlan, "merge_plan"],
]:
    """Probe CPU/RAM/disk, CUDA and Apple/MLX and the installed packages; decide every phase's plan in one function.

    Each phase's plan is its own artifact, so a change that affects only evaluation leaves the training plan's
    content, and so the cached training, as it was.

    Args:
        validation_report: the data's token statistics (checked against the sequence length).
        model: the config's `model` section (its config is read for the model's size; no weights load).
        train: the config's `train` section.
        evaluate: the config's `evaluate` section (the evaluation batch).
        merge: the config's `merge` section (the merged weights' precision).

    Returns:
        The hardware probe and the training, evaluation and merge plans.
    """
    m, t = ModelSection(**model), TrainSection(**train)
    hw = probe(t.output_root)
    plan = decide_plan(t, hw, model_size(m.name_or_path, m.revision, m.trust_remote_code),
                       EvaluateSection(**evaluate), MergeSection(**merge))
    stats = validation_report.token_stats
    if stats and stats.truncated_rows:
        plan.train.warnings.append(f"{stats.truncated_rows} row(s) are longer than "
                                   f"max_seq_length={plan.train.max_seq_length}")
    if plan.train.device != "cuda" and hw.ram_available_gb < plan.train.memory.total_gb:
        # said here, not in the plan: the plan must not change with what happens to be free this second
        logger.warning("plan: warning: about %.1f GB of memory is free now and training needs about %.1f GB: close "
                       "other programs, or expect swapping", hw.ram_available_gb, plan.train.memory.total_gb)
    for r in plan.train.reasons + [f"warning: {w}" for w in plan.train.warnings]:
        logger.info("plan: %s", r)
    for phase in (plan.evaluate, plan.merge):
        logger.info("plan: %s on %s in %s, batch %d: %s", phase.phase, phase.device, phase.dtype, phase.batch_size,
                    phase.reason)
    return hw, plan.train, plan.evaluate, plan.merge
