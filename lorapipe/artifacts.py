"""Artifact types that are folders on disk: a PEFT adapter and a merged model.

They carry only a path and the metadata the folder already holds; the materializers in `materializers/`
copy the files as they are, so an artifact in a local store is a folder `PeftModel.from_pretrained`
or `AutoModelForCausalLM.from_pretrained` can open directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FolderArtifact:
    path: str
    metadata: dict = field(default_factory=dict)
    # a scratch folder (e.g. the merged model) is removed once the materializer has copied it into the store
    temporary: bool = False

    METADATA_FILE = ""

    @classmethod
    def from_folder(cls, path: str | Path, temporary: bool = False) -> "FolderArtifact":
        meta_path = Path(path) / cls.METADATA_FILE
        meta = json.loads(meta_path.read_text()) if cls.METADATA_FILE and meta_path.exists() else {}
        return cls(path=str(path), metadata=meta, temporary=temporary)


# the plots the training monitor draws beside an adapter (shown in the dashboard)
ADAPTER_PLOTS = ("loss.png", "learning_rate.png", "memory.png")


@dataclass
class AdapterFolder(FolderArtifact):
    METADATA_FILE = "lorapipe_adapter.json"


@dataclass
class ModelFolder(FolderArtifact):
    METADATA_FILE = "lorapipe_merge.json"
