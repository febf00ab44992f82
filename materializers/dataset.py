"""The dataset artifact as `rows.jsonl` + `meta.json`; its content hash is the data fingerprint."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from lorapipe.data.dataset import ConversationDataset

PREVIEW_ROWS = 20


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
        """The first rows as an HTML table: the users' text is escaped, never rendered as markup or links."""
        from lorapipe import html_report as h

        rows = []
        for r in data.records[:PREVIEW_ROWS]:
            first = r.text if r.text is not None else (r.messages[0].get("content") or "")
            answer = "" if r.text is not None else (r.messages[-1].get("content") or "")
            rows.append((f"{os.path.basename(r.source)}:{r.line}", first[:300], answer[:300]))
        page = h.page(f"{data.name}: {len(data)} rows", h.paragraph(f"fingerprint {data.fingerprint}", "muted"),
                      h.table(["where", "first turn", "answer"], rows, keep_columns=(0,)),
                      h.paragraph(f"the first {len(rows)} of {len(data)} rows", "muted"))
        path = os.path.join(self.uri, "preview.html")
        with fileio.open(path, "w") as fh:
            fh.write(page)
        return {path: VisualizationType.HTML}
