"""The dataset artifact: normalised records plus their fingerprint, stored as plain JSONL."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorapipe.data.records import Record, dataset_fingerprint


@dataclass
class ConversationDataset:
    records: list[Record]
    name: str = "dataset"
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = dataset_fingerprint(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "rows.jsonl", "w", encoding="utf-8") as fh:
            for r in self.records:
                fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        (folder / "meta.json").write_text(json.dumps({"name": self.name, "rows": len(self.records),
                                                     "fingerprint": self.fingerprint}, indent=2))

    @classmethod
    def read(cls, folder: str | Path) -> "ConversationDataset":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        with open(folder / "rows.jsonl", encoding="utf-8") as fh:
            records = [Record.from_json(json.loads(line)) for line in fh if line.strip()]
        return cls(records=records, name=meta["name"], fingerprint=meta["fingerprint"])
