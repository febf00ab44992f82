"""Score the version that holds the target stage on this run's test rows, so promotion compares like with like.
Never cached: which version holds the stage changes between runs."""

from typing import Annotated

from zenml import get_step_context, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger

from lorapipe.artifacts import ModelFolder
from lorapipe.catalog import task_spec
from lorapipe.config import EvaluateSection, ModelSection, RegisterSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan
from lorapipe.registry import StageHolderScores
from lorapipe.training.adapter import task_of
from materializers import ReportMaterializer

logger = get_logger(__name__)


@step(enable_cache=False, output_materializers=ReportMaterializer)
def score_stage_holder(
    merged_model: ModelFolder, test_split: ConversationDataset, evaluation_plan: PhasePlan, evaluate: EvaluateSection,
    register: RegisterSection, model: ModelSection, seed: int,
) -> Annotated[StageHolderScores, "stage_holder_scores"]:
    """Score the stage holder's merged model and this run's, by the same code on the same rows.

    Args:
        merged_model: this run's merged model.
        test_split: this run's test rows.
        evaluation_plan: device, dtype, batch size and sequence length of evaluation.
        evaluate: the config's `evaluate` section (rows scored, generation budget, metrics).
        register: the config's `register` section (the model name and the stage to compare with).
        model: the config's `model` section (its chat template override).
        seed: the run's seed (generation is seeded).

    Returns:
        The holder's version and scores, or a note saying why there is none to compare with.
    """
    from lorapipe.phases.evaluate import score_model_folder

    r = register
    if r.stage_if_better == "none":
        return StageHolderScores(stage="none", note="register.stage_if_better is 'none': no stage to compare with")
    this_version = str(get_step_context().model.version)
    try:
        holder = Client().get_model_version(r.model_name, ModelStages(r.stage_if_better))
    except KeyError:
        return StageHolderScores(stage=r.stage_if_better, note=f"no version held {r.stage_if_better} before")
    if holder.name == this_version:
        return StageHolderScores(stage=r.stage_if_better, version=holder.name,
                                 note=f"this version already holds {r.stage_if_better}")
    try:
        merged = holder.get_model_artifact("merged_model")
    except (KeyError, RuntimeError):
        merged = None
    if merged is None:
        return StageHolderScores(stage=r.stage_if_better, version=holder.name,
                                 note=f"version {holder.name} holds {r.stage_if_better} but has no merged model to "
                                      "score")
    held = merged.load()
    task = task_of(merged_model.metadata.get("adapter_metadata", {}))
    held_task = task_of(held.metadata.get("adapter_metadata", {}))
    if held_task != task:  # one model name, two tasks: neither can be scored as the other
        return StageHolderScores(
            stage=r.stage_if_better, version=holder.name, comparable=False,
            note=f"version {holder.name} holds {r.stage_if_better} of register.model_name {r.model_name} and is a "
                 f"{held_task} model, this one a {task} model: they cannot be compared; give this task its own "
                 "register.model_name")
    logger.info("scoring version %s, which holds %s, and this run's merged model on this run's test rows",
                holder.name, r.stage_if_better)
    try:
        scores, _ = score_model_folder(held.path, task, test_split, evaluation_plan, evaluate, seed,
                                       model.chat_template)
    except ValueError as exc:  # a classifier of other labels: not comparable, it keeps the stage
        if task_spec(task).model_kind != "sequence_classifier":
            raise
        return StageHolderScores(stage=r.stage_if_better, version=holder.name, comparable=False,
                                 note=f"version {holder.name}, which holds {r.stage_if_better}, classifies other "
                                      f"labels ({str(exc).splitlines()[0]}): not comparable; it keeps the stage "
                                      "(give the new label set its own register.model_name)")
    candidate, _ = score_model_folder(merged_model.path, task, test_split, evaluation_plan, evaluate, seed,
                                      model.chat_template)
    rows = "every test row" if not task_spec(task).generates else "this run's test rows"
    return StageHolderScores(stage=r.stage_if_better, version=holder.name, scores=scores.model_dump(),
                             candidate=candidate.model_dump(),
                             note=f"version {holder.name} and this version's merged model scored on {rows}")
