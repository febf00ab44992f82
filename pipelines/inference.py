"""The inference pipeline `lorapipe deploy` hands to the stack's deployer: prompt -> answer, by the model version that
holds a stage when each request arrives. The model and the stage are the deployment's (its configuration's `extra`,
set by `lorapipe deploy`); a request gives the prompt."""

from zenml import pipeline

from steps.answer import answer_prompt


@pipeline(enable_cache=False)
def answer(prompt: str = "Hello", max_new_tokens: int = 0):
    """One step: the stage holder's merged model answers `prompt` (its chat template and stop tokens), in at most
    `max_new_tokens` (0: the deployment's `lorapipe deploy --max-new-tokens`)."""
    text, model_version, stopped = answer_prompt(prompt=prompt, max_new_tokens=max_new_tokens)
    return text, model_version, stopped
