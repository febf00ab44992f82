from steps.evaluate import evaluate_model
from steps.merge import merge_model
from steps.preflight import preflight
from steps.register import register_model
from steps.resolve_data import resolve_data_source
from steps.score_holder import score_stage_holder
from steps.split import split_data
from steps.train import train_adapter
from steps.validate import validate_data

__all__ = ["resolve_data_source", "validate_data", "preflight", "split_data", "train_adapter", "evaluate_model", "merge_model",
           "register_model", "score_stage_holder"]
