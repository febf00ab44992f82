"""Merge the adapter into a 16-bit base, written once, straight into the artifact store; check the logits."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

from zenml import ArtifactConfig, get_step_context, step
from zenml.enums import ArtifactType
from zenml.logger import get_logger

from lorapipe.artifacts import AdapterFolder, ModelFolder
from lorapipe.config import MergeSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan
from lorapipe.phases.merge import merge_adapter
from materializers import ModelFolderMaterializer
from materializers.folders import stored_folder
from steps.caching import library_cache_policy

logger = get_logger(__name__)
OUTPUT = "merged_model"


def _store_folder() -> Optional[Path]:
    """The folder the materializer stores the output in, when it is on this machine's disk (a local artifact
    store: ZenML has created the output's URI before the step runs); None for a remote store or outside a run."""
    try:
        uri = get_step_context().get_output_artifact_uri()  # the step's one output
    except RuntimeError:  # called outside a pipeline run (the entrypoint in a test)
        return None
    return Path(stored_folder(uri)) if os.path.isdir(uri) else None


@step(output_materializers=ModelFolderMaterializer, cache_policy=library_cache_policy(__file__))
def merge_model(
    adapter: AdapterFolder, test_split: ConversationDataset, merge_plan: PhasePlan, merge: MergeSection,
) -> Annotated[ModelFolder, ArtifactConfig(name=OUTPUT, artifact_type=ArtifactType.MODEL)]:
    """Merge, reload and compare logits with base+adapter within a recorded tolerance.

    On a local artifact store the merged shards are written once, into the folder the materializer stores: no
    scratch copy, no second copy. On a remote store they are written to a local scratch folder, uploaded by the
    materializer and the scratch folder is removed when the step ends.

    Args:
        adapter: the adapter folder (it names its base model).
        test_split: rows the logits are compared on.
        merge_plan: the device, the merged weights' dtype and the tokens per compared row.
        merge: the config's `merge` section (dtype, check rows, tolerance, shard size).

    Returns:
        The merged model folder: weights, tokenizer, generation config, model card, Modelfile and the check.

    Raises:
        MergeCheckFailed: the merged model's logits differ from base+adapter beyond the tolerance.
    """
    mg = merge
    in_store = _store_folder()
    out = in_store or Path(tempfile.mkdtemp(prefix="lorapipe-merged-"))
    logger.info("merging into %s (%s)", out, "the artifact store's folder" if in_store else
                "a scratch folder, uploaded to the artifact store afterwards")
    try:
        check = merge_adapter(adapter.path, str(out), test_split, merge_plan, mg.check_samples, mg.logits_atol,
                              max_shard_size=mg.max_shard_size, parity_samples=mg.parity_samples,
                              parity_max_new_tokens=mg.parity_max_new_tokens)
        check.require_passed()
    except BaseException:
        if in_store is None:  # ZenML removes the output's own folder of a failed step; the scratch one is ours
            shutil.rmtree(out, ignore_errors=True)
        raise
    return ModelFolder.from_folder(out, temporary=in_store is None)
