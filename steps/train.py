"""Train the adapter of the plan's task with the backend the plan chose: in this process, or over the plan's
data-parallel processes, which the train phase launches itself (ZenML's `run_with_accelerate` wraps only steps whose
arguments are plain scalars)."""

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step
from zenml.enums import ArtifactType
from zenml.logger import get_logger
from zenml.steps.step_context import StepContext

from lorapipe.artifacts import AdapterFolder
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.phases.train import train_adapter as train_phase
from lorapipe.phases.train import training_folder
from lorapipe.training.monitoring import mark_failed
from materializers import AdapterFolderMaterializer
from steps.caching import library_cache_policy

logger = get_logger(__name__)


@step(output_materializers=AdapterFolderMaterializer, cache_policy=library_cache_policy(__file__))
def train_adapter(
    train_split: ConversationDataset, eval_split: ConversationDataset, training_plan: TrainingPlan,
    model: ModelSection, train: TrainSection, seed: int,
) -> Annotated[AdapterFolder, ArtifactConfig(name="adapter", artifact_type=ArtifactType.MODEL)]:
    """Train and save the adapter folder (the backend's format, with lorapipe's metadata beside the weights).

    Args:
        train_split: rows to train on.
        eval_split: rows to evaluate on during training.
        training_plan: task, backend, device, dtype, quantization, batch geometry and data-parallel processes from
            preflight.
        model: the config's `model` section.
        train: the config's `train` section.
        seed: the run's seed.

    Returns:
        The adapter folder.
    """
    # Checkpoints live outside the artifact store, keyed by the training inputs and the code: a re-run of the same
    # code after a crash resumes; checkpoints of older code are set aside (train.resume_from resumes one on purpose).
    work_dir = training_folder(model, train, seed, training_plan, train_split, eval_split)
    adapter_dir = work_dir / "adapter"
    if StepContext.get() is not None:  # in a pipeline run (tests also call the function directly)
        # where `lorapipe watch RUN` finds the metrics while this step trains
        log_metadata({"training_folder": str(work_dir)})
    logger.info("training %s with backend %s on %s over %d process(es); checkpoints in %s", training_plan.task,
                training_plan.backend, training_plan.device, training_plan.world_size, work_dir)
    try:
        info = train_phase(model, train, seed, training_plan, train_split, eval_split, work_dir, adapter_dir)
    except BaseException:
        mark_failed(adapter_dir)
        raise
    logger.info("trained %d steps, loss %.4f, %.0f tokens/s over %d process(es)", info.steps,
                info.train_loss or float("nan"), info.tokens_per_second, info.world_size)
    return AdapterFolder.from_folder(adapter_dir)
