"""Where a run's data comes from, decided when the run starts: files, glob patterns (the newest drop of a folder),
or the rows of a ZenML artifact version (which the pipeline's data source reads from the store, `steps/data_source.py`,
and hands to `rows_file`). A scheduled run resolves its source each time it fires, so it reads what landed since; the
sha256 of the resolved bytes is what caching and lineage key on (content, not mtime).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from lorapipe.config import DataSection
from lorapipe.data.formats import file_fingerprint, file_fingerprints

GLOB_CHARS = set("*?[")


class DataSourceError(ValueError):
    """The configured data cannot be found; every problem names the key and what to do."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class ResolvedSource(BaseModel):
    """One source's files as the run found them (data.paths and data.artifact are a mixture of one source)."""

    name: str
    files: list[str]
    sha256: str


class ResolvedData(BaseModel):
    """The files a run reads and the sha256 of their bytes, with where they came from."""

    files: list[str]
    sha256: str
    source: str  # what the config asked for, e.g. "data/drops/*.jsonl" or "artifact support-chats version 7"
    # for an artifact source: its version, so a step in another container writes the same rows again (local_files)
    artifact_version_id: Optional[str] = None
    # each source of data.sources in the config's order (one for data.paths or data.artifact)
    sources: list[ResolvedSource] = []
    file_sha256: dict[str, str] = {}  # each file's own fingerprint: lineage finds a version by one file of many

    def source_files(self) -> list[list[str]]:
        """The files of each source, in order (all files as one source for a result stored before mixtures)."""
        return [s.files for s in self.sources] if self.sources else [self.files]


def resolve_sources(data: DataSection, artifact_rows: Optional[Any] = None) -> ResolvedData:
    """data.paths, or every data.sources entry (paths and globs here; an artifact through `artifact_rows(name) ->
    (file, description, version id)`, which the ZenML side supplies): the files to read now and their sha256, every
    missing file or empty pattern collected."""
    problems: list[str] = []
    resolved: list[tuple[str, list[str]]] = []
    descriptions: list[str] = []
    version_ids: list[str] = []
    entries = data.sources or []
    if not entries:
        files, problems = expand_paths(data.paths)
        resolved.append((", ".join(data.paths), files))
        descriptions.append(", ".join(data.paths))
    for i, entry in enumerate(entries):
        if entry.path:
            files, found = expand_paths([entry.path])
            problems += [p.replace("data.paths:", f"data.sources[{i}].path:") for p in found]
            descriptions.append(entry.label())
        else:
            if artifact_rows is None:
                raise ValueError("an artifact source needs the ZenML side's reader (steps.data_source.resolve_data)")
            try:
                path, description, version_id = artifact_rows(entry.artifact)
            except DataSourceError as exc:
                problems += [p.replace("data.artifact:", f"data.sources[{i}].artifact:") for p in exc.problems]
                continue
            files = [path]
            descriptions.append(f"{entry.label()} ({description})")
            version_ids.append(version_id)
        resolved.append((entry.label(), files))
    if problems:
        raise DataSourceError(problems)
    every = list(dict.fromkeys(f for _, files in resolved for f in files))
    whole, each = file_fingerprints(every)
    return ResolvedData(
        files=every, sha256=whole, source="; ".join(descriptions),
        sources=[ResolvedSource(name=name, files=files, sha256=file_fingerprint(files) if len(files) != 1 else
                                each[files[0]]) for name, files in resolved],
        file_sha256=each, artifact_version_id=",".join(version_ids) or None)


def is_pattern(path: str) -> bool:
    return bool(GLOB_CHARS & set(path))


def expand_paths(paths: list[str], patterns_may_be_empty: bool = False) -> tuple[list[str], list[str]]:
    """(files, problems). Patterns expand sorted by name, so the order, and the fingerprint, do not depend on the
    file system; a file named twice is read once. `patterns_may_be_empty`: a schedule may wait for its first drop,
    but a fixed path must exist."""
    files, problems = [], []
    for entry in paths:
        if is_pattern(entry):
            matched = sorted(p for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not matched and not patterns_may_be_empty:
                problems.append(f"data.paths: the pattern {entry} matches no file; check the folder, or wait for "
                                "the first drop before scheduling")
            files.extend(matched)
        elif not Path(entry).is_file():
            problems.append(f"data.paths: {entry} not found; fix the path in the config (relative paths are "
                            "read from the folder you run lorapipe in)")
        else:
            files.append(entry)
    return list(dict.fromkeys(files)), problems


def _is_existing_file(value: object) -> bool:
    """A Path, or a short one-line string naming a file (JSONL text is not a file name, and may be too long for
    the OS to even ask)."""
    if isinstance(value, Path) or (isinstance(value, str) and "\n" not in value and len(value) < 4096):
        try:
            return Path(value).is_file()
        except (OSError, ValueError):
            return False
    return False


def rows_file(value: object, name: str, version: str, out_dir: Path) -> tuple[str, str]:
    """(JSONL file, description) of an artifact version's rows (`value`, loaded by the caller: lorapipe's library does
    not read the ZenML store): a path to a file is read where it is; rows (a list of dicts) or JSONL text are written
    once per version to `out_dir/<name>-v<version>.jsonl`, so validation can name a file and line like any other
    source."""
    description = f"artifact {name} version {version}"
    if _is_existing_file(value):
        return str(Path(value).resolve()), f"{description} ({value})"  # type: ignore[arg-type]
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(row, dict) for row in value):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in value)
    else:
        raise DataSourceError([f"data.artifact: {name} version {version} holds a {type(value).__name__}; lorapipe "
                               "reads a list of row dicts, JSONL text or the path of a JSONL file"])
    target = out_dir / f"{name}-v{version}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    return str(target), description


def resolve_files(data: DataSection) -> ResolvedData:
    """The files of `data.paths` (or of data.sources' paths) to read now (globs expanded) and their sha256."""
    return resolve_sources(data)
