"""Is the model a run names there? Checked before the pipeline starts, in well under a second, without weights.

A local folder must hold a config.json; otherwise the value must be a valid hub id that is either in the local hub
cache or answers on the hub. Every failure is one paragraph naming the config key and the fix, instead of the
traceback transformers raises minutes later from inside a step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

TINY_MODEL_HINT = ("build the quickstart's tiny model with `make tiny-model` (or `lorapipe build-tiny-model --out "
                   "{path}`)")


def _looks_local(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def model_problem(name_or_path: str, revision: Optional[str] = None, key: str = "model.name_or_path",
                  base_dir: Optional[Path] = None) -> Optional[str]:
    """None when the model can be loaded from here, else why not and what to do."""
    base = base_dir or Path.cwd()
    local = Path(name_or_path).expanduser()
    local = local if local.is_absolute() else base / local
    if local.is_dir():
        if (local / "config.json").is_file():
            return None
        return (f"{key}: {local} is a folder without a config.json, so not a saved model; give the folder that "
                "save_pretrained wrote, or a hub id")
    tiny = TINY_MODEL_HINT.format(path=name_or_path)
    if _looks_local(name_or_path):
        return f"{key}: {name_or_path} is not a folder here (looked in {local}); {tiny}, or give a hub id"

    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError as exc:
        return (f"{key}: {name_or_path!r} is neither a folder here nor a valid hub id ({exc}); a hub id looks like "
                "owner/name, e.g. meta-llama/Llama-3.2-1B-Instruct (in YAML, put a space before a # comment)")
    if isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str):
        return None  # in the local hub cache: loads offline too
    neither = f"{key}: {name_or_path} is not a folder here ({local}) and not in the local hub cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"{neither}, and HF_HUB_OFFLINE is set; download it first (unset HF_HUB_OFFLINE) or give a local "
                f"folder" + (f"; or {tiny}" if name_or_path.startswith("models/") else ""))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().model_info(name_or_path, revision=revision, timeout=10)
    except GatedRepoError:
        return (f"{key}: {name_or_path} is gated on the hub: accept its licence on its hub page and log in "
                "(`hf auth login`, or set HF_TOKEN)")
    except RevisionNotFoundError:
        return f"model.revision: {revision} does not exist for {name_or_path} on the hub"
    except RepositoryNotFoundError:
        return (f"{neither}, and the hub has no such model (or it is private: log in with `hf auth login`); "
                f"check the spelling" + (f", or {tiny}" if name_or_path.startswith("models/") else ""))
    except Exception as exc:  # noqa: BLE001 - no network, proxy, DNS: say so rather than fail later in a step
        return (f"{neither}, and the hub cannot be reached ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "connect, give a local folder, or put the model in the hub cache and set HF_HUB_OFFLINE=1"
                + (f"; or {tiny}" if name_or_path.startswith("models/") else ""))
    return None


def folder_fingerprint(name_or_path: str) -> Optional[str]:
    """A local model folder's files (relative path, size, modification time in ns) digested, or None for a hub id.
    Stat-based, not the bytes: cheap on a multi-GB checkpoint, and a re-merged or re-downloaded folder at the same
    path changes it."""
    import hashlib

    folder = Path(name_or_path)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
