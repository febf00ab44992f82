"""Deterministic train/eval/test split by content hash."""

from typing import Annotated, Tuple

from zenml import step

from lorapipe.config import SplitSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.split import split_records
from lorapipe.hardware.plan import TrainingPlan
from materializers import ConversationDatasetMaterializer
from steps.caching import library_cache_policy


# A dict, not one class for all: with a single class ZenML orders the outputs by set iteration, which changes
# the cache key from one process to the next (the step would never be served from cache).
@step(output_materializers={"train_split": ConversationDatasetMaterializer,
                            "eval_split": ConversationDatasetMaterializer,
                            "test_split": ConversationDatasetMaterializer},
      cache_policy=library_cache_policy(__file__))
def split_data(
    validated_dataset: ConversationDataset, training_plan: TrainingPlan, split: SplitSection,
) -> Tuple[
    Annotated[ConversationDataset, "train_split"],
    Annotated[ConversationDataset, "eval_split"],
    Annotated[ConversationDataset, "test_split"],
]:
    """Split by the hash of each row's content, so duplicates never straddle splits.

    Args:
        validated_dataset: the accepted rows.
        training_plan: the plan (the split runs only once preflight accepted it).
        split: the config's `split` section.

    Returns:
        The train, eval and test splits, each with its fingerprint.
    """
    train, evals, test = split_records(validated_dataset.records, split.eval_fraction, split.test_fraction, split.salt)
    return train, evals, test  # a tuple literal: ZenML reads it to see three outputs
