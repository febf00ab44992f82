"""Answer a prompt with the model version that holds a stage now: the step of the inference pipeline that ZenML's
deployer serves (`lorapipe deploy`)."""

from typing import Annotated, Any, Tuple

from zenml import step
from zenml.client import Client
from zenml.logger import get_logger

logger = get_logger(__name__)
# the loaded merged model of each version served by this process: a new stage holder is loaded on its first request
# (the deployment keeps running and its URL stays), the previous one is dropped
_LOADED: dict[str, Any] = {}


def _merged_folder(model_name: str, stage: str) -> tuple[str, str]:
    """(the merged model's folder, "model:version") of the version holding `stage` now."""
    mv = Client().get_model_version(model_name, stage)
    merged = mv.get_artifact("merged_model")  # its latest, as find_stage_holder and MODEL:STAGE starts read it
    if merged is None:
        raise ValueError(f"{model_name}:{stage} is version {mv.name}, which holds no merged model")
    return merged.load().path, f"{model_name}:{mv.name}"


def served_stage() -> tuple[str, str, int]:
    """(model name, stage, default answer length) the deployment serves: fixed when it was deployed, in the
    pipeline's `extra` (a request carries the prompt, and may carry its own max_new_tokens)."""
    from zenml import get_step_context

    extra = get_step_context().pipeline_run.config.extra or {}
    if not extra.get("model_name") or not extra.get("stage"):
        raise ValueError("this inference pipeline was deployed without a model and stage: deploy it with `lorapipe "
                         "deploy STAGE --model NAME`")
    return extra["model_name"], extra["stage"], int(extra.get("max_new_tokens") or 256)


@step(enable_cache=False)
def answer_prompt(prompt: str, max_new_tokens: int = 0) -> Tuple[
    Annotated[str, "answer"],
    Annotated[str, "model_version"],
    Annotated[bool, "stopped"],
]:
    """Answer `prompt` greedily with the merged model of the version holding the deployment's stage when the request
    arrives (the model and stage are the deployment's: `served_stage`).

    Args:
        prompt: the user's message.
        max_new_tokens: the answer's length at most (0: the deployment's).

    Returns:
        The answer, the version that gave it ("model:version"), and whether it stopped on its own.
    """
    from lorapipe.phases.predict import generate, inference_device, load_for_inference

    model_name, stage, default_tokens = served_stage()
    folder, version = _merged_folder(model_name, stage)
    if version not in _LOADED:
        _LOADED.clear()  # one model in memory: the stage's holder now
        device, dtype = inference_device()
        model, tokenizer, described = load_for_inference(folder, device, dtype)
        _LOADED[version] = (model, tokenizer)
        logger.info("serving %s: %s on %s", version, described, device)
    model, tokenizer = _LOADED[version]
    result = generate(model, tokenizer, prompt, max_new_tokens or default_tokens)
    return result["completion"], version, result["stopped"]
