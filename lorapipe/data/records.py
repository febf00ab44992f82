"""The data layer's plain types: a `Problem` found in the input, a `RawRow` as read, a normalised `Record`,
and the fingerprint of a list of records.

Every other module under lorapipe/data/ builds on these; this one imports nothing from lorapipe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Problem:
    """One thing wrong with the input, located precisely enough to fix it."""

    source: str
    line: int
    field: str
    message: str
    fix: str
    code: str
    severity: str = "error"  # "error" rejects the row; "warning" keeps it
    column: Optional[int] = None
    other_line: Optional[int] = None


@dataclass
class RawRow:
    """One row as read from a file: its text, the parsed object (None when unreadable) and its own problems."""

    source: str
    line: int
    raw: str
    obj: Any = None
    problems: list[Problem] = field(default_factory=list)


@dataclass(slots=True)
class Record:
    """A row in lorapipe's internal form: a conversation (or a plain text) plus where it came from."""

    source: str
    line: int
    raw: str
    format: str
    messages: list[dict] = field(default_factory=list)
    text: Optional[str] = None
    tools: Optional[str] = None
    group: Optional[str] = None  # split.group_key's value: rows of one group stay in one split
    label: Optional[str] = None  # split.stratify_key's value; task: classification: the class label's name
    text_pair: Optional[str] = None  # task: classification: the second text of a pair (data.text_pair_key)
    # task: preference: `messages` is the prompt (the conversation before the answer); `chosen` and `rejected` are the
    # two answers of a pair (assistant messages), or `chosen` the one answer of unpaired feedback with `desirable`
    chosen: Optional[list[dict]] = None
    rejected: Optional[list[dict]] = None
    desirable: Optional[bool] = None

    def content_key(self) -> str:
        """Whitespace-normalised content, for duplicate detection and content-hash splitting."""
        if self.text is not None:
            body = " ".join(self.text.split())
            if self.text_pair is not None:  # a pair is one row: the same first text with another pair is not a copy
                body += "\x1d" + " ".join(self.text_pair.split())
        else:
            body = _messages_key(self.messages)
        if self.chosen is not None:  # the pair (or one answer) is the row: the prompt with other answers is no copy
            body += "\x1dchosen\x1d" + _messages_key(self.chosen)
        if self.rejected is not None:
            body += "\x1drejected\x1d" + _messages_key(self.rejected)
        if self.desirable is not None:
            body += f"\x1ddesirable\x1d{self.desirable}"
        return hashlib.sha256(body.encode("utf-8")).hexdigest()

    def prompt_key(self) -> str:
        """The prompt alone, whitespace-normalised (task: preference: pairs of one prompt are compared)."""
        return hashlib.sha256(_messages_key(self.messages).encode("utf-8")).hexdigest()

    def side(self, name: str) -> "Record":
        """task: preference: the prompt with its `chosen` or `rejected` answer, as an SFT row (rendered, masked and
        scored as SFT's rows are)."""
        answer = getattr(self, name)
        return Record(self.source, self.line, "", self.format, messages=[*self.messages, *(answer or [])],
                      tools=self.tools)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"source": self.source, "line": self.line, "format": self.format}
        if self.text is not None:
            out["text"] = self.text
        else:
            out["messages"] = self.messages
        if self.text_pair is not None:
            out["text_pair"] = self.text_pair
        for key in ("tools", "group", "label"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        for key in ("chosen", "rejected", "desirable"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, d: dict, raw: str = "") -> "Record":
        return cls(
            source=d["source"],
            line=d["line"],
            raw=raw,
            format=d["format"],
            messages=d.get("messages", []),
            text=d.get("text"),
            tools=d.get("tools"),
            group=d.get("group"),
            label=d.get("label"),
            text_pair=d.get("text_pair"),
            chosen=d.get("chosen"),
            rejected=d.get("rejected"),
            desirable=d.get("desirable"),
        )


def _messages_key(messages: list[dict]) -> str:
    # a turn's reasoning trace is part of it (the key of a turn without one is what it was before traces were read)
    return "\x1e".join(f"{m['role']}\x1f{' '.join(str(m.get('content') or '').split())}"
                        + (f"\x1freasoning\x1f{' '.join(m['reasoning_content'].split())}"
                           if m.get("reasoning_content") else "") for m in messages)


def fingerprint_part(rec: Record, content_key: str) -> bytes:
    """What a row adds to a dataset fingerprint: its content, and the group/label the split reads."""
    return f"{content_key}\x1f{rec.group or ''}\x1f{rec.label or ''}".encode()


def dataset_fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(fingerprint_part(r, r.content_key()))
    return h.hexdigest()
