"""Resolve the data source when the run starts: the files (globs expanded, or a named artifact's latest rows) and
the sha256 of their bytes. Never cached: a scheduled run must look again each time; what follows is cached on the
resolved content, so unchanged data trains nothing."""

from pathlib import Path
from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from lorapipe.config import DataSection
from lorapipe.data.sources import ResolvedData
from materializers import ReportMaterializer
from steps.data_source import resolve_data

logger = get_logger(__name__)


@step(enable_cache=False, output_materializers=ReportMaterializer)
def resolve_data_source(data: DataSection, output_root: str) -> Annotated[ResolvedData, "resolved_data"]:
    """Find the files to read now.

    Args:
        data: the config's `data` section (paths or globs, or an artifact name).
        output_root: train.output_root; an artifact's rows are written under it as JSONL.

    Returns:
        The files, their sha256 and the source they came from.
    """
    resolved = resolve_data(data, Path(output_root))
    logger.info("data: %d file(s) from %s, sha256 %s", len(resolved.files), resolved.source, resolved.sha256[:12])
    return resolved
