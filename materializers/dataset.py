"""The dataset artifact as `rows.jsonl` + `meta.json`; its content hash is the data fingerprint."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from lorapipe.data.dataset import ConversationDataset


class ConversationDatasetMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (ConversationDataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def load(self, data_type: Type[Any]) -> ConversationDataset:
        if os.path.isdir(self.uri):
            return ConversationDataset.read(self.uri)
        with self.get_temporary_directory(delete_at_exit=True) as tmp:
            for name in ("rows.jsonl", "meta.json"):
                fileio.copy(os.path.join(self.uri, name), os.path.join(tmp, name))
            return ConversationDataset.read(tmp)

    def save(self, data: ConversationDataset) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as tmp:
            data.write(tmp)
            for name in ("rows.jsonl", "meta.json"):
                fileio.copy(os.path.join(tmp, name), os.path.join(self.uri, name), overwrite=True)

    def extract_metadata(self, data: ConversationDataset) -> Dict[str, Any]:
        return {"rows": len(data), "fingerprint": data.fingerprint, "name": data.name}

    def compute_content_hash(self, data: ConversationDataset) -> Optional[str]:
        return data.fingerprint

    def save_visualizations(self, data: ConversationDataset) -> Dict[str, VisualizationType]:
        lines = [f"# {data.name}: {len(data)} rows", f"fingerprint `{data.fingerprint}`", "",
                 "| where | first turn | answer |", "|---|---|---|"]
        for r in data.records[:20]:
            first = (r.text if r.text is not None else r.messages[0].get("content") or "")[:80].replace("|", "\\|").replace("\n", " ")
            answer = "" if r.text is not None else (r.messages[-1].get("content") or "")[:80].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {os.path.basename(r.source)}:{r.line} | {first} | {answer} |")
        path = os.path.join(self.uri, "preview.md")
        with fileio.open(path, "w") as fh:
            fh.write("\n".join(lines))
        return {path: VisualizationType.MARKDOWN}
