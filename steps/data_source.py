"""The data source on the ZenML side: `data.paths` through the library, `data.artifact` read from the store (the
library never opens it). The resolve and validate steps and `lorapipe run` call these."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lorapipe.config import DataSection
from lorapipe.data.formats import file_fingerprint
from lorapipe.data.mixture import SourceInput, SourcePlan
from lorapipe.data.sources import (
    DataSourceError,
    ResolvedData,
    ResolvedSource,
    resolve_sources,
    rows_file,
)


def _artifact_rows(name: str, out_dir: Path, version_id: Optional[str] = None) -> tuple[str, str, str]:
    """(JSONL file, description, version id) of the latest version of artifact `name` (or the given version)."""
    from zenml.client import Client

    try:
        version = Client().get_artifact_version(version_id or name)
    except KeyError:
        raise DataSourceError([f"data.artifact: no artifact named {name} in the ZenML store; save one with "
                               f"zenml.save_artifact(rows, name={name!r}) or use data.paths"]) from None
    path, description = rows_file(version.load(), name, str(version.version), out_dir)
    return path, description, str(version.id)


def resolve_data(data: DataSection, artifact_dir: Optional[Path] = None) -> ResolvedData:
    """The files to read now. `artifact_dir`: where an artifact's rows are written (the run's output root)."""
    out_dir = Path(artifact_dir or "runs") / "data"
    if data.artifact:
        path, source, version_id = _artifact_rows(data.artifact, out_dir)
        sha = file_fingerprint([path])
        return ResolvedData(files=[path], sha256=sha, source=source, artifact_version_id=version_id,
                            sources=[ResolvedSource(name=f"artifact {data.artifact}", files=[path], sha256=sha)],
                            file_sha256={path: sha})
    return resolve_sources(data, lambda name: _artifact_rows(name, out_dir))


def local_files(resolved: ResolvedData, data: DataSection, artifact_dir: Optional[Path] = None) -> list[str]:
    """The resolved files, readable here: on a stack whose steps run in separate containers, an artifact's rows are
    written again from the same artifact version (the files of data.paths must be on storage every step sees)."""
    if resolved.artifact_version_id and data.artifact and not all(Path(f).is_file() for f in resolved.files):
        path, _, _ = _artifact_rows(data.artifact or "data", Path(artifact_dir or "runs") / "data",
                                    resolved.artifact_version_id)
        if file_fingerprint([path]) != resolved.sha256:
            raise DataSourceError([f"data.artifact: version {resolved.artifact_version_id} no longer holds the "
                                   "rows this run resolved"])
        return [path]
    return resolved.files


def source_inputs(resolved: ResolvedData, data: DataSection) -> Optional[list[SourceInput]]:
    """data.sources as validation reads them: each entry's resolved files, sha256, share and format keys (None for
    data.paths or data.artifact: one source of every file)."""
    if not data.sources:
        return None
    return [SourceInput(SourcePlan(entry.label(), entry.weight, entry.max_rows), found.files, found.sha256,
                        entry.format, entry.prompt_key, entry.completion_key)
            for entry, found in zip(data.sources, resolved.sources)]
