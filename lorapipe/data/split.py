"""Deterministic train/eval/test split by content hash.

A row's split depends only on its (whitespace-normalised) content, its group and the salt, so it is stable when
rows are reordered or other rows change. Rows are first joined into units: exact duplicates, rows sharing a
`group_key` value, and preference rows (pairs or rated answers) sharing a prompt are one unit, and a unit never
straddles splits. With a `stratify_key`, each label's units are
divided in the requested fractions, so every split keeps the label proportions. Files named train/valid/test
(e.g. mlx-lm's `train.jsonl`, `valid.jsonl`, `test.jsonl`) are honoured as given.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Optional

from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record

FILE_SPLITS = {"train": "train", "valid": "eval", "validation": "eval", "eval": "eval", "dev": "eval", "test": "test"}


def bucket(key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def file_split(source: str) -> Optional[str]:
    """'train'/'eval'/'test' for files named like mlx-lm's train.jsonl / valid.jsonl / test.jsonl, else None."""
    name = Path(source).name.split(".")[0].lower()
    return FILE_SPLITS.get(name)


def _units(records: list[Record]) -> dict[str, list[Record]]:
    """Union-find over content keys and group values; each unit is named by its smallest key (order-free)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    keys = []
    for r in records:
        content = "1c:" + r.content_key()
        find(content)
        if r.group is not None:  # "0g:" sorts first: a group's unit is named by the group, not by a row in it
            union(content, "0g:" + r.group)
        if r.chosen is not None:  # preference: every pair or answer of one prompt on one side, or the test set
            union(content, "0p:" + r.prompt_key())  # would score prompts the model trained on
        keys.append(content)
    units: dict[str, list[Record]] = defaultdict(list)
    for r, key in zip(records, keys):
        units[find(key)].append(r)
    return units


def split_records(records: list[Record], eval_fraction: float, test_fraction: float,
                  salt: str = "lorapipe") -> tuple[ConversationDataset, ConversationDataset, ConversationDataset]:
    out: dict[str, list[Record]] = {"train": [], "eval": [], "test": []}
    named = [file_split(r.source) for r in records]
    if records and all(named) and "train" in named:
        for r, name in zip(records, named):
            out[name].append(r)
    else:
        units = _units(records)
        by_label: dict[Optional[str], list[str]] = defaultdict(list)
        for key, members in units.items():
            by_label[min((m.label for m in members), key=lambda x: (x is None, x))].append(key)
        for label, keys in by_label.items():
            if label is None:
                for key in keys:  # no stratification: each unit by its own hash
                    b = bucket(key, salt)
                    name = "test" if b < test_fraction else "eval" if b < test_fraction + eval_fraction else "train"
                    out[name].extend(units[key])
            else:  # per label, units in hash order, cut at the fractions
                ordered = sorted(keys, key=lambda k: bucket(k, salt))
                n_test = round(len(ordered) * test_fraction)
                n_eval = round(len(ordered) * eval_fraction)
                for i, key in enumerate(ordered):
                    name = "test" if i < n_test else "eval" if i < n_test + n_eval else "train"
                    out[name].extend(units[key])
        for name in out:  # file order within each split, whatever the grouping
            out[name].sort(key=lambda r: (r.source, r.line))
    if not out["train"]:
        raise ValueError("the split left no training rows: lower split.eval_fraction/split.test_fraction or add data")
    return (ConversationDataset(out["train"], "train"), ConversationDataset(out["eval"], "eval"),
            ConversationDataset(out["test"], "test"))
