"""Deterministic train/eval/test split by content hash.

A row's split depends only on its (whitespace-normalised) content and the salt, so it is stable when rows
are reordered or other rows change, and exact duplicates always land in the same split (no leakage).
"""

from __future__ import annotations

import hashlib

from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.formats import Record


def bucket(record: Record, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{record.content_key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: list[Record], eval_fraction: float, test_fraction: float,
                  salt: str = "lorapipe") -> tuple[ConversationDataset, ConversationDataset, ConversationDataset]:
    train, evals, test = [], [], []
    for r in records:
        b = bucket(r, salt)
        if b < test_fraction:
            test.append(r)
        elif b < test_fraction + eval_fraction:
            evals.append(r)
        else:
            train.append(r)
    if not train:
        raise ValueError("the split left no training rows: lower split.eval_fraction/split.test_fraction or add data")
    return (ConversationDataset(train, "train"), ConversationDataset(evals, "eval"), ConversationDataset(test, "test"))
