"""Train the LoRA adapter with the backend the plan chose: in this process, or over the plan's data-parallel processes,
which the step launches itself (ZenML's `run_with_accelerate` wraps only steps whose arguments are plain scalars)."""

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step
from zenml.enums import ArtifactType
from zenml.logger import get_logger
from zenml.steps.step_context import StepContext

from lorapipe.artifacts import AdapterFolder
from lorapipe.backends import get_backend
from lorapipe.backends.base import training_code_version, training_key, work_dir_for
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.phases.launch import needs_launch, train_data_parallel
from lorapipe.training.monitoring import mark_failed
from materializers import AdapterFolderMaterializer
from steps.caching import library_cache_policy

logger = get_logger(__name__)


@step(output_materializers=AdapterFolderMaterializer, cache_policy=library_cache_policy(__file__))
def train_adapter(
    train_split: ConversationDataset, eval_split: ConversationDataset, training_plan: TrainingPlan,
    model: dict, train: dict, seed: int,
) -> Annotated[AdapterFolder, ArtifactConfig(name="adapter", artifact_type=ArtifactType.MODEL)]:
    """Train and save a PEFT adapter folder with lorapipe's metadata beside the weights.

    Args:
        train_split: rows to train on.
        eval_split: rows to evaluate on during training.
        training_plan: backend, device, dtype, quantization, batch geometry and data-parallel processes from
            preflight.
        model: the config's `model` section.
        train: the config's `train` section.
        seed: the run's seed.

    Returns:
        The adapter folder.
    """
    m, t = ModelSection(**model), TrainSection(**train)
    # Checkpoints live outside the artifact store, keyed by the training inputs and the code: a re-run of the same
    # code after a crash resumes; checkpoints of older code are set aside (train.resume_from resumes one on purpose).
    work_dir = work_dir_for(t.output_root, training_key(m, t, seed, training_plan, train_split, eval_split),
                            training_code_version(training_plan.backend), t.resume_from)
    adapter_dir = work_dir / "adapter"
    if StepContext.get() is not None:  # in a pipeline run (tests also call the function directly)
        # where `lorapipe watch RUN` finds the metrics while this step trains
        log_metadata({"training_folder": str(work_dir)})
    logger.info("training with backend %s on %s over %d process(es); checkpoints in %s", training_plan.backend,
                training_plan.device, training_plan.world_size, work_dir)
    try:
        if needs_launch(training_plan):
            info = train_data_parallel(m, t, seed, training_plan, train_split, eval_split, work_dir, adapter_dir)
        else:
            info = get_backend(training_plan.backend).train(m, t, seed, training_plan, train_split, eval_split,
                                                            work_dir, adapter_dir)
    except BaseException:
        mark_failed(adapter_dir)
        raise
    logger.info("trained %d steps, loss %.4f, %.0f tokens/s over %d process(es)", info.steps,
                info.train_loss or float("nan"), info.tokens_per_second, info.world_size)
    return AdapterFolder.from_folder(adapter_dir)
