"""Merge the adapter into a 16-bit base, save safetensors + tokenizer, and check the logits."""

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, step
from zenml.enums import ArtifactType
from zenml.logger import get_logger

from lorapipe.artifacts import AdapterFolder, ModelFolder
from lorapipe.config import MergeSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan
from lorapipe.merge import MergeCheckFailed, merge_adapter
from materializers import ModelFolderMaterializer
from steps.caching import library_cache_policy

logger = get_logger(__name__)


@step(output_materializers=ModelFolderMaterializer, cache_policy=library_cache_policy(__file__))
def merge_model(
    adapter: AdapterFolder, test_split: ConversationDataset, merge_plan: PhasePlan, merge: dict,
) -> Annotated[ModelFolder, ArtifactConfig(name="merged_model", artifact_type=ArtifactType.MODEL)]:
    """Merge, reload and compare logits with base+adapter within a recorded tolerance.

    Args:
        adapter: the adapter folder (it names its base model).
        test_split: rows the logits are compared on.
        merge_plan: the device and the merged weights' dtype.
        merge: the config's `merge` section (check rows and tolerance).

    Returns:
        The merged model folder, with the check written beside the weights.
    """
    mg = MergeSection(**merge)
    out = Path(tempfile.mkdtemp(prefix="lorapipe-merged-"))
    check = merge_adapter(adapter.path, str(out), test_split, merge_plan, mg.check_samples, mg.logits_atol)
    logger.info("merge check: max |logit diff| %.2e (tolerance %.1e, %s)", check.max_abs_logit_diff, check.tolerance,
                check.dtype)
    if not check.passed:
        raise MergeCheckFailed(
            f"the merged model's logits differ from base+adapter by {check.max_abs_logit_diff:.3g}, above the "
            f"tolerance {check.tolerance:.3g} for {check.dtype}; try merge.dtype: float32")
    return ModelFolder.from_folder(out, temporary=True)
