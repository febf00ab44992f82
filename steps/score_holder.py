"""Score the version that holds the target stage on this run's test rows, so promotion compares like with like.
Cached on what it scores: the holder's merged model (found anew on every run by `find_stage_holder`), this run's
merged model, the rows and the evaluation settings; a re-run against the same holder scores nothing again."""

from typing import Annotated

from zenml import step
from zenml.client import Client
from zenml.logger import get_logger

from lorapipe.artifacts import ModelFolder
from lorapipe.catalog import task_spec
from lorapipe.config import EvaluateSection, ModelSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan
from lorapipe.registry import StageHolder, StageHolderScores
from lorapipe.training.adapter import task_of
from materializers import ReportMaterializer
from steps.caching import library_cache_policy

logger = get_logger(__name__)


@step(output_materializers=ReportMaterializer, cache_policy=library_cache_policy(__file__))
def score_stage_holder(
    stage_holder: StageHolder, merged_model: ModelFolder, test_split: ConversationDataset,
    evaluation_plan: PhasePlan, evaluate: EvaluateSection, model: ModelSection, seed: int,
) -> Annotated[StageHolderScores, "stage_holder_scores"]:
    """Score the stage holder's merged model and this run's, by the same code on the same rows.

    Args:
        stage_holder: the version holding the target stage and its merged model (or why there is none).
        merged_model: this run's merged model.
        test_split: this run's test rows.
        evaluation_plan: device, dtype, batch size and sequence length of evaluation.
        evaluate: the config's `evaluate` section (rows scored, generation budget, metrics).
        model: the config's `model` section (its chat template override).
        seed: the run's seed (generation is seeded).

    Returns:
        The holder's version and scores, or a note saying why there is none to compare with.
    """
    from lorapipe.phases.evaluate import score_model_folder

    h = stage_holder
    if h.merged_model_id is None:
        return StageHolderScores(stage=h.stage, version=h.version, note=h.note, comparable=h.comparable)
    held = Client().get_artifact_version(h.merged_model_id).load()
    task = task_of(merged_model.metadata.get("adapter_metadata", {}))
    logger.info("scoring version %s, which holds %s, and this run's merged model on this run's test rows",
                h.version, h.stage)
    try:
        scores, _ = score_model_folder(held.path, task, test_split, evaluation_plan, evaluate, seed,
                                       model.chat_template)
    except ValueError as exc:  # a classifier of other labels: not comparable, it keeps the stage
        if task_spec(task).model_kind != "sequence_classifier":
            raise
        return StageHolderScores(stage=h.stage, version=h.version, comparable=False,
                                 note=f"version {h.version}, which holds {h.stage}, classifies other labels "
                                      f"({str(exc).splitlines()[0]}): not comparable; it keeps the stage (give the "
                                      "new label set its own register.model_name)")
    candidate, _ = score_model_folder(merged_model.path, task, test_split, evaluation_plan, evaluate, seed,
                                      model.chat_template)
    rows = "every test row" if not task_spec(task).generates else "this run's test rows"
    return StageHolderScores(stage=h.stage, version=h.version, scores=scores.model_dump(),
                             candidate=candidate.model_dump(),
                             note=f"version {h.version} and this version's merged model scored on {rows}")
