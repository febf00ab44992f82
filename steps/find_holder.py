"""Look up which version holds the target stage once this run's merged model exists: never cached, since promotions
change it between runs. What it finds (the version and its merged model) keys `score_stage_holder`'s cache."""

from typing import Annotated

from zenml import get_step_context, step
from zenml.client import Client
from zenml.enums import ModelStages

from lorapipe.config import RegisterSection
from lorapipe.registry import StageHolder
from lorapipe.training.adapter import task_of


@step(enable_cache=False)
def find_stage_holder(register: RegisterSection, task: str) -> Annotated[StageHolder, "stage_holder"]:
    """The version holding `register.stage_if_better` of `register.model_name`, if it can be compared with this run's.

    Args:
        register: the config's `register` section (the model name and the stage to compare with).
        task: the config's task (a holder of another task cannot be compared).

    Returns:
        The holder and its merged model, or a note saying why there is none to score.
    """
    r = register
    if r.stage_if_better == "none":
        return StageHolder(stage="none", note="register.stage_if_better is 'none': no stage to compare with")
    this_version = str(get_step_context().model.version)
    try:
        holder = Client().get_model_version(r.model_name, ModelStages(r.stage_if_better))
    except KeyError:
        return StageHolder(stage=r.stage_if_better, note=f"no version held {r.stage_if_better} before")
    if holder.name == this_version:
        return StageHolder(stage=r.stage_if_better, version=holder.name,
                           note=f"this version already holds {r.stage_if_better}")
    try:
        merged = holder.get_model_artifact("merged_model")
    except (KeyError, RuntimeError):
        merged = None
    if merged is None:
        return StageHolder(stage=r.stage_if_better, version=holder.name,
                           note=f"version {holder.name} holds {r.stage_if_better} but has no merged model to score")
    # the task its materializer recorded (no download of the model); an older artifact without it is loaded
    held_task = merged.run_metadata.get("task") or task_of(merged.load().metadata.get("adapter_metadata", {}))
    if held_task != task:  # one model name, two tasks: neither can be scored as the other
        return StageHolder(
            stage=r.stage_if_better, version=holder.name, comparable=False,
            note=f"version {holder.name} holds {r.stage_if_better} of register.model_name {r.model_name} and is a "
                 f"{held_task} model, this one a {task} model: they cannot be compared; give this task its own "
                 "register.model_name")
    return StageHolder(stage=r.stage_if_better, version=holder.name, merged_model_id=str(merged.id))
