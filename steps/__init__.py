"""The pipeline's steps, one per file, each thin: read its typed inputs, call the library, return named outputs.

lorapipe's library logs and never prints; what a person sees of it in a step's output (and in the step's stored
logs, on any orchestrator) is decided here, once, for every step.
"""

from lorapipe.logs import show_on_console
from steps.evaluate import evaluate_model
from steps.evaluate_base import evaluate_base_model
from steps.find_holder import find_stage_holder
from steps.merge import merge_model
from steps.preflight import preflight
from steps.register import register_model
from steps.resolve_data import resolve_data_source
from steps.score_holder import score_stage_holder
from steps.split import split_data
from steps.train import train_adapter
from steps.validate import validate_data

show_on_console()

__all__ = ["evaluate_base_model", "evaluate_model", "find_stage_holder", "merge_model", "preflight", "register_model",
           "resolve_data_source", "score_stage_holder", "split_data", "train_adapter", "validate_data"]
