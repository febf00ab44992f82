"""Read the files people really feed fine-tuning tools and normalise every row to one conversation form.

Formats: Alpaca, chat `messages` (OpenAI roles), ShareGPT `conversations`, `prompt`/`completion`
(mlx-lm's convention, keys configurable), plain `text`, and `classification` (a text, an optional text pair and a
label; keys configurable). JSONL (optionally gzipped) is streamed a line at a time; a JSON array (also inside a
`.jsonl` file) is decoded element by element so every row keeps the line it starts on; CSV/TSV files (a header
row, then one row per record; a quoted field may span lines) are streamed with the line each record starts on.
Reading never raises for bad data: each problem becomes a `Problem` with file and line,
carried by the row it belongs to, and the row's original text is kept so nothing the user gave is lost.
The types themselves (`Problem`, `RawRow`, `Record`) live in `lorapipe.data.records`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lorapipe.data.records import Problem, RawRow, Record

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text", "classification")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------------------------- reading


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _with_problem(row: RawRow, problem: Problem, problems: list[Problem]) -> RawRow:
    """Put `problem` on the row it belongs to and, in reading order, into the caller's list; return the row."""
    row.problems.append(problem)
    problems.append(problem)
    return row


def _first_char(path: Path) -> str:
    with _open_bytes(path) as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("ascii", "replace")


def iter_raw_rows(path: str | Path, problems: list[Problem]) -> Iterator[RawRow]:
    """Yield each row's parsed object with its file and line.

    A row's reading problem is on `row.problems`; every problem, including those of the file itself (not found,
    an unclosed array), is also appended to `problems` in reading order.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        problems.append(Problem(source, 0, "(file)", "file not found", "check data.paths in the config", "not_found"))
        return
    table = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if table.lower() in CSV_SUFFIXES:
        yield from _iter_csv(path, CSV_SUFFIXES[table.lower()], problems)
        return
    if _first_char(path) == "[":
        yield from _iter_json_array(path, problems)
        return
    rows = 0
    with _open_bytes(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            rows += bool(raw.strip())
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = Problem(source, lineno, "(line)", f"invalid UTF-8 at byte {exc.start}",
                                  "re-save the file as UTF-8",
                                  "invalid_utf8", column=exc.start + 1)
                row = RawRow(source, lineno, raw.decode("utf-8", "backslashreplace").rstrip("\r\n"))
                yield _with_problem(row, problem, problems)
                continue
            stripped = text.strip()
            if not stripped:
                continue  # blank lines (and trailing CRLF) are not rows
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as exc:
                hint = ("a stray ']' or '[': JSONL has one object per line, no array brackets"
                        if stripped in ("]", "[", "],") else "make the line one complete JSON object")
                problem = Problem(source, lineno, "(line)", f"invalid JSON: {exc.msg}", hint, "invalid_json",
                                  column=exc.colno)
                yield _with_problem(RawRow(source, lineno, stripped), problem, problems)
                continue
            if not isinstance(obj, dict):
                problem = Problem(source, lineno, "(line)", f"a JSON {type(obj).__name__}, not an object",
                                  "each row must be a JSON object like {\"prompt\": ..., \"completion\": ...}",
                                  "not_object")
                yield _with_problem(RawRow(source, lineno, stripped), problem, problems)
                continue
            yield RawRow(source, lineno, stripped, obj)
    if rows == 0:
        problems.append(Problem(source, 0, "(file)", "the file is empty (or holds only whitespace)",
                                "add rows to it, or remove it from data.paths", "empty_file"))


def _iter_csv(path: Path, delimiter: str, problems: list[Problem]) -> Iterator[RawRow]:
    """A header row names the fields; each record becomes {field: text}, with the line it starts on and its own
    text (a quoted field may span lines). Every value is a string, as the file holds it. Lines are decoded one at a
    time, so a line that is not UTF-8 is a problem of that line and the rows after it are still read."""
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)  # a long text is a row, not the end of the file
    source = str(path)
    consumed: list[str] = []  # the physical lines of the record being read: its raw text
    bad_lines: list[tuple[int, RawRow]] = []  # lines that are not UTF-8, said in reading order
    lineno = first_line = 0  # the last line read; the first line of the record being read

    def lines() -> Iterator[str]:
        nonlocal lineno, first_line
        with _open_bytes(path) as fh:
            for raw in fh:
                lineno += 1
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    row = RawRow(source, lineno, raw.decode("utf-8", "backslashreplace").rstrip("\r\n"))
                    bad_lines.append((lineno, _with_problem(row, Problem(
                        source, lineno, "(line)", f"invalid UTF-8 at byte {exc.start}", "re-save the file as UTF-8",
                        "invalid_utf8", column=exc.start + 1), problems)))
                    continue
                if not consumed:
                    first_line = lineno
                consumed.append(text)
                yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    header: Optional[list[str]] = None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(Problem(source, first_line, "(file)", f"not readable as CSV from line {first_line}: {exc}",
                                    "fix the quoting from that line on", "invalid_csv"))
            return
        end, record_start = lineno, first_line
        raw = "".join(consumed).rstrip("\r\n")
        consumed.clear()
        for _, bad in bad_lines:
            yield bad
        bad_lines.clear()
        if not any(f.strip() for f in fields):
            continue  # blank lines are not rows
        if header is None:
            header = [f.strip() for f in fields]
            dupes = sorted({f for f in header if header.count(f) > 1})
            if dupes or not all(header):
                problems.append(Problem(source, record_start, "(header)",
                                        f"the header names {', '.join(dupes)} twice" if dupes else
                                        "the header has an empty column name",
                                        "give every column one distinct name in the first row (pandas writes an "
                                        "unnamed index column: to_csv(..., index=False))", "invalid_csv"))
                return
            continue
        # a record over several lines with an odd number of quotes: a quote left open swallowed the lines after it
        # (a real multi-line field closes its quote; a quote inside one is doubled), whatever the field count
        unclosed = end > record_start and raw.count('"') % 2 == 1
        if unclosed or len(fields) != len(header):
            message = (f"a quoted field opened on line {record_start} is not closed: lines {record_start}-{end} read "
                       "as one row" if unclosed else f"{len(fields)} fields, the header has {len(header)}")
            fix = "close the quote" if unclosed else f"quote fields that hold '{delimiter}' or a line break"
            yield _with_problem(RawRow(source, record_start, raw), Problem(source, record_start, "(row)", message, fix,
                                                                          "invalid_csv"), problems)
            continue
        yield RawRow(source, record_start, raw, dict(zip(header, fields)))
    for _, bad in bad_lines:
        yield bad
    if header is None:
        problems.append(Problem(source, 0, "(file)", "the file is empty (or holds only whitespace)",
                                "add a header row and rows to it, or remove it from data.paths", "empty_file"))


def _iter_json_array(path: Path, problems: list[Problem]) -> Iterator[RawRow]:
    # JSON arrays are read whole (they are the small Alpaca/ShareGPT demo files in practice); each element
    # keeps the line it starts on. Use JSONL for large data: it streams.
    source = str(path)
    with _open_bytes(path) as fh:
        data = fh.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.append(Problem(source, line, "(file)", f"invalid UTF-8 at byte {exc.start}",
                                "re-save the file as UTF-8",
                                "invalid_utf8"))
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    line_at = _LineCounter(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            problems.append(Problem(source, line_at(n), "(file)", "the JSON array is not closed with ']'",
                                    "add the closing ']' (the file may be truncated)", "invalid_json"))
            return
        if text[pos] == "]":
            rest = text[pos + 1:].strip()
            if rest:
                problems.append(Problem(source, line_at(pos + 1 + text[pos + 1:].index(rest[0])), "(file)",
                                        "text after the closing ']'", "remove it", "invalid_json"))
            return
        start = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # the problem is at the error's line, the row at the line its element starts on: they can differ
            problem = Problem(source, exc.lineno, "(row)", f"invalid JSON: {exc.msg}",
                              "fix the element; the rest of the array cannot be read past it", "invalid_json",
                              column=exc.colno)
            yield _with_problem(RawRow(source, line_at(start), text[start:]), problem, problems)  # keep all not read
            return
        line = line_at(start)
        if not isinstance(obj, dict):
            problem = Problem(source, line, "(row)", f"a JSON {type(obj).__name__}, not an object",
                              "each element must be a JSON object", "not_object")
            yield _with_problem(RawRow(source, line, text[start:pos]), problem, problems)
            continue
        yield RawRow(source, line, text[start:pos], obj)


class _LineCounter:
    """Offset -> 1-based line, incrementally (offsets only grow)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, offset: int) -> int:
        if offset < self.pos:
            return self.text.count("\n", 0, offset) + 1
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line


# --------------------------------------------------------------------------------------------- formats


def detect_format(obj: dict, prompt_key: str = "prompt", completion_key: str = "completion") -> Optional[str]:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    if prompt_key in obj and completion_key in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _expect_str(obj: dict, key: str, row: RawRow, problems: list[Problem], required: bool = True,
                label: str = "") -> Optional[str]:
    name = label or key
    if key not in obj or obj[key] is None:
        if required:
            problems.append(Problem(row.source, row.line, name, "missing", f"add a string '{key}' field",
                                    "missing_field"))
        return None
    value = obj[key]
    if not isinstance(value, str):
        problems.append(Problem(row.source, row.line, name, f"expected a string, got {type(value).__name__}",
                                f"make '{key}' a string", "wrong_type"))
        return None
    return value


@dataclass(frozen=True)
class LabelFields:
    """task: classification: the fields holding a row's text, text pair and label, and the label set when the config
    froze it (`labels`: the value in the rows, as a string, -> the label's name)."""

    text_key: str = "text"
    text_pair_key: Optional[str] = None
    label_key: str = "label"
    labels: Optional[dict[str, str]] = None

    @classmethod
    def from_config(cls, text_key: str, text_pair_key: Optional[str], label_key: str,
                    labels: Optional[list[str] | dict[str, str]]) -> "LabelFields":
        mapping = {n: n for n in labels} if isinstance(labels, list) else labels
        return cls(text_key, text_pair_key, label_key, mapping)


def _label(obj: dict, row: RawRow, fields: LabelFields, found: list[Problem]) -> Optional[str]:
    """The row's label name: a string or an integer (compared as its string), one of the frozen set if there is one."""
    key = fields.label_key
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        found.append(Problem(row.source, row.line, key, "missing label", f"give every row a '{key}', or remove the row",
                             "missing_label"))
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        found.append(Problem(row.source, row.line, key,
                             f"a label is a string or an integer, got {type(value).__name__} "
                             f"{value!r}", f"write '{key}' as a string (or an integer id)", "wrong_type"))
        return None
    raw = value.strip() if isinstance(value, str) else str(value)
    if fields.labels is None:
        return raw
    if raw not in fields.labels:
        allowed = ", ".join(fields.labels)
        found.append(Problem(row.source, row.line, key, f"label {raw!r} is not in data.labels ({allowed})",
                             "fix the label, or add it to data.labels", "unknown_label"))
        return None
    return fields.labels[raw]


def normalise(row: RawRow, fmt: str, problems: list[Problem], prompt_key: str = "prompt",
              completion_key: str = "completion", label_fields: Optional[LabelFields] = None) -> Optional[Record]:
    """Turn one parsed row into a Record, or None when it cannot be built; its field problems go on `row.problems`
    and into `problems`."""
    obj = row.obj
    found: list[Problem] = []
    rec = Record(row.source, row.line, row.raw, fmt)
    if fmt == "classification":
        fields = label_fields or LabelFields()
        rec.text = _expect_str(obj, fields.text_key, row, found)
        if fields.text_pair_key:
            rec.text_pair = _expect_str(obj, fields.text_pair_key, row, found)
        rec.label = _label(obj, row, fields, found)
    elif fmt == "text":
        rec.text = _expect_str(obj, "text", row, found)
    elif fmt == "prompt_completion":
        prompt = _expect_str(obj, prompt_key, row, found)
        completion = _expect_str(obj, completion_key, row, found)
        rec.messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "alpaca":
        instruction = _expect_str(obj, "instruction", row, found)
        extra = _expect_str(obj, "input", row, found, required=False)
        output = _expect_str(obj, "output", row, found)
        system = _expect_str(obj, "system", row, found, required=False)
        if system:
            rec.messages.append({"role": "system", "content": system})
        history = obj.get("history") or []
        pairs = isinstance(history, list) and all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history)
        if not pairs:
            found.append(Problem(row.source, row.line, "history", "expected a list of [question, answer] string pairs",
                                 "fix or remove 'history'", "wrong_type"))
            history = []
        for q, a in history:
            rec.messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        user = instruction if not extra else f"{instruction}\n\n{extra}" if instruction is not None else None
        rec.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "messages":
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            found.append(Problem(row.source, row.line, "messages", "expected a non-empty list of {role, content}",
                                 "give 'messages' as [{\"role\": \"user\", \"content\": ...}, ...]", "wrong_type"))
        else:
            rec.messages += _chat_messages(msgs, "messages", row, found)
    elif fmt == "sharegpt":
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            found.append(Problem(row.source, row.line, "conversations", "expected a non-empty list of {from, value}",
                                 "give 'conversations' as [{\"from\": \"human\", \"value\": ...}, ...]", "wrong_type"))
        else:
            if isinstance(obj.get("system"), str) and obj["system"]:
                rec.messages.append({"role": "system", "content": obj["system"]})
            rec.messages += _sharegpt_messages(turns, "conversations", row, found)
    elif fmt in PREFERENCE_FORMATS:
        _preference(obj, fmt, rec, row, found, prompt_key, completion_key)
    if fmt in ("messages", "sharegpt") and obj.get("tools") is not None:
        rec.tools = obj["tools"] if isinstance(obj["tools"], str) else json.dumps(obj["tools"], ensure_ascii=False)
    for turns in (rec.messages, rec.chosen, rec.rejected):
        for msg in turns or ():
            split_reasoning(msg)
    row.problems.extend(found)
    problems.extend(found)
    if any(p.severity == "error" for p in found):
        return None
    return rec


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(msg: dict) -> None:
    """An assistant turn's reasoning trace as `reasoning_content` (the field Qwen3's and DeepSeek's templates read),
    apart from its answer: given so, or written inside the content as `<think>...</think>` before the answer (split
    as Qwen3's template splits it). An empty trace is no trace."""
    if msg.get("role") != "assistant" or not isinstance(msg.get("content"), str):
        return
    content = msg["content"]
    if "reasoning_content" not in msg and THINK_CLOSE in content:
        head, _, tail = content.partition(THINK_CLOSE)
        msg["reasoning_content"] = head.split(THINK_OPEN)[-1].strip("\n")
        msg["content"] = tail.lstrip("\n")
    if "reasoning_content" in msg and not msg["reasoning_content"].strip():
        del msg["reasoning_content"]


def _chat_messages(msgs: list, fld_name: str, row: RawRow, found: list[Problem]) -> list[dict]:
    """A list of {role, content} (tool calls kept), each bad one a problem naming its index."""
    out: list[dict] = []
    for i, m in enumerate(msgs):
        fld = f"{fld_name}[{i}]"
        if not isinstance(m, dict):
            found.append(Problem(row.source, row.line, fld, "expected an object", "use {role, content}",
                                 "wrong_type"))
            continue
        role = m.get("role")
        if role not in CHAT_ROLES:
            found.append(Problem(row.source, row.line, f"{fld}.role", f"unknown role {role!r}",
                                 f"use one of {', '.join(CHAT_ROLES)}", "bad_role"))
            continue
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            found.append(Problem(row.source, row.line, f"{fld}.content",
                                 f"expected a string, got {type(content).__name__}", "make content a string",
                                 "wrong_type"))
            continue
        msg = {"role": role, "content": content}
        if isinstance(m.get("reasoning_content"), str):  # DeepSeek's / vLLM's / Qwen3's field for the trace
            msg["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
            if content is None:
                msg["content"] = json.dumps(m["tool_calls"], ensure_ascii=False)
        elif content is None:
            found.append(Problem(row.source, row.line, f"{fld}.content", "missing",
                                 "add a string 'content' (or 'tool_calls' for an assistant call)",
                                 "missing_field"))
            continue
        out.append(msg)
    return out


def _sharegpt_messages(turns: list, fld_name: str, row: RawRow, found: list[Problem]) -> list[dict]:
    """A list of ShareGPT {from, value} turns as {role, content}, each bad one a problem naming its index."""
    out: list[dict] = []
    for i, t in enumerate(turns):
        fld = f"{fld_name}[{i}]"
        if not isinstance(t, dict):
            found.append(Problem(row.source, row.line, fld, "expected an object", "use {from, value}",
                                 "wrong_type"))
            continue
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            found.append(Problem(row.source, row.line, f"{fld}.from", f"unknown speaker {t.get('from')!r}",
                                 f"use one of {', '.join(SHAREGPT_ROLES)}", "bad_role"))
            continue
        value = t.get("value")
        if not isinstance(value, str):
            found.append(Problem(row.source, row.line, f"{fld}.value", "expected a string",
                                 "make 'value' a string", "wrong_type"))
            continue
        out.append({"role": role, "content": value})
    return out


# task: preference's formats (lorapipe.catalog: the preference task's data_formats); auto_preference detects one
PREFERENCE_FORMATS = ("auto_preference", "preference", "sharegpt_preference", "alpaca_preference", "unpaired")


def detect_preference_format(obj: dict, prompt_key: str = "prompt",
                             completion_key: str = "completion") -> Optional[str]:
    """task: preference: pairs (chosen + rejected) in TRL's, ShareGPT's or Alpaca's keys, or unpaired feedback
    (a boolean label with a completion or a conversation)."""
    if "chosen" in obj and "rejected" in obj:
        if "conversations" in obj:
            return "sharegpt_preference"
        if "instruction" in obj:
            return "alpaca_preference"
        return "preference"
    if "label" in obj and ("messages" in obj or completion_key in obj):
        return "unpaired"
    return None


def _answer(value: Any, fld: str, row: RawRow, found: list[Problem], sharegpt: bool) -> Optional[list[dict]]:
    """One side of a pair: a string (the assistant's answer), a message object, or a list of messages; ShareGPT's
    are {from, value}."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        found.append(Problem(row.source, row.line, fld, "expected a string, a message or a list of messages",
                             f"give '{fld}' as the answer's text or [{{\"role\": \"assistant\", ...}}]", "wrong_type"))
        return None
    msgs = _sharegpt_messages(value, fld, row, found) if sharegpt else _chat_messages(value, fld, row, found)
    if len(msgs) == len(value) and msgs[0]["role"] != "assistant":
        found.append(Problem(row.source, row.line, f"{fld}[0].role", f"an answer starts with the assistant, not "
                             f"{msgs[0]['role']!r}", "put the shared turns in the prompt and only the answer in "
                             f"'{fld}'", "role_order"))
    return msgs


def _prompt(value: Any, fld: str, row: RawRow, found: list[Problem]) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        return _chat_messages(value, fld, row, found)
    found.append(Problem(row.source, row.line, fld, "expected a string or a non-empty list of messages",
                         f"give '{fld}' as the prompt's text or [{{\"role\": \"user\", ...}}]", "wrong_type"))
    return []


def _split_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: chosen and rejected are whole conversations; their shared leading messages are the
    prompt, up to the first answer where they part."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant" and (n == len(chosen) or n == len(rejected)):
        n -= 1  # two identical whole conversations: keep the last answer on each side (the pair check says so)
    while n > 0 and n < len(chosen) and chosen[n]["role"] != "assistant":
        n -= 1  # the sides part inside a user turn: the prompt ends before it
    return chosen[:n], chosen[n:], rejected[n:]


def _preference(obj: dict, fmt: str, rec: Record, row: RawRow, found: list[Problem], prompt_key: str,
                completion_key: str) -> None:
    """Fill a preference record: the prompt in `messages`, the answers in `chosen`/`rejected` (pairs) or `chosen`
    with `desirable` (unpaired)."""
    if fmt == "alpaca_preference":
        instruction = _expect_str(obj, "instruction", row, found)
        extra = _expect_str(obj, "input", row, found, required=False)
        system = _expect_str(obj, "system", row, found, required=False)
        if system:
            rec.messages.append({"role": "system", "content": system})
        rec.messages.append({"role": "user", "content": instruction if not extra else f"{instruction}\n\n{extra}"})
        for side in ("chosen", "rejected"):
            text = _expect_str(obj, side, row, found)
            setattr(rec, side, [{"role": "assistant", "content": text}] if text is not None else None)
    elif fmt == "sharegpt_preference":
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            found.append(Problem(row.source, row.line, "conversations", "expected a non-empty list of {from, value}",
                                 "give 'conversations' as the prompt's turns [{\"from\": \"human\", ...}]",
                                 "wrong_type"))
        else:
            if isinstance(obj.get("system"), str) and obj["system"]:
                rec.messages.append({"role": "system", "content": obj["system"]})
            rec.messages += _sharegpt_messages(turns, "conversations", row, found)
        rec.chosen = _answer(obj.get("chosen"), "chosen", row, found, sharegpt=True)
        rec.rejected = _answer(obj.get("rejected"), "rejected", row, found, sharegpt=True)
    elif fmt == "preference":
        if prompt_key in obj:
            rec.messages = _prompt(obj[prompt_key], prompt_key, row, found)
            rec.chosen = _answer(obj.get("chosen"), "chosen", row, found, sharegpt=False)
            rec.rejected = _answer(obj.get("rejected"), "rejected", row, found, sharegpt=False)
        elif isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
            chosen = _chat_messages(obj["chosen"], "chosen", row, found)
            rejected = _chat_messages(obj["rejected"], "rejected", row, found)
            rec.messages, rec.chosen, rec.rejected = _split_implicit_prompt(chosen, rejected)
            if not rec.messages:
                found.append(Problem(row.source, row.line, "chosen", "no prompt: the conversations share no turn "
                                     "before the answers", f"add a '{prompt_key}', or start both conversations with "
                                     "the same user turn", "missing_field"))
        else:
            found.append(Problem(row.source, row.line, prompt_key, "missing, and chosen/rejected are not whole "
                                 "conversations (an implicit prompt)", f"add a '{prompt_key}' (text or messages)",
                                 "missing_field"))
    elif fmt == "unpaired":
        label = obj.get("label")
        if not isinstance(label, bool):
            found.append(Problem(row.source, row.line, "label", f"expected true (desirable) or false (undesirable), "
                                 f"got {label!r}", "write label as a JSON boolean", "wrong_type"))
        rec.desirable = label if isinstance(label, bool) else None
        if "messages" in obj and completion_key not in obj:
            msgs = _chat_messages(obj["messages"], "messages", row, found) if isinstance(obj["messages"], list) \
                else []
            if not msgs or msgs[-1]["role"] != "assistant":
                found.append(Problem(row.source, row.line, "messages", "unpaired feedback's conversation ends with "
                                     "the answer being judged (an assistant message)", "end 'messages' with the "
                                     "assistant's answer", "role_order"))
            else:
                rec.messages, rec.chosen = msgs[:-1], msgs[-1:]
        else:
            rec.messages = _prompt(obj.get(prompt_key), prompt_key, row, found)
            rec.chosen = _answer(obj.get(completion_key), completion_key, row, found, sharegpt=False)


@dataclass
class ReadResult:
    records: list[Record]
    problems: list[Problem]
    rejected: list[RawRow]
    formats: dict[str, str]  # file -> detected format


def iter_records(paths: list[str], fmt: str, prompt_key: str, completion_key: str, problems: list[Problem],
                 formats: dict[str, str], group_key: Optional[str] = None,
                 label_key: Optional[str] = None,
                 label_fields: Optional[LabelFields] = None) -> Iterator[tuple[RawRow, Optional[Record]]]:
    """Stream (raw row, record or None when rejected) over every file.

    A rejected row carries its reasons in `row.problems`; every problem is also appended to `problems` as found.
    `fmt="classification"` reads `label_fields` (the label is then the record's `label`, which the split stratifies
    by; `label_key` is not read).
    """
    if fmt == "classification":
        for path in paths:
            for row in iter_raw_rows(path, problems):
                if row.obj is None:
                    yield row, None
                    continue
                formats[str(path)] = fmt
                rec = normalise(row, fmt, problems, prompt_key, completion_key, label_fields)
                if rec is not None and group_key:
                    if row.obj.get(group_key) in (None, ""):
                        _with_problem(row, Problem(row.source, row.line, group_key, "missing",
                                                   f"add '{group_key}' to every row, or unset split.group_key",
                                                   "missing_field"), problems)
                        rec = None
                    else:
                        rec.group = str(row.obj[group_key])
                yield row, rec
        return
    preference = fmt in PREFERENCE_FORMATS
    detect, known = ((detect_preference_format, PREFERENCE_FORMATS[1:]) if preference else (detect_format, FORMATS))
    auto = fmt in ("auto", "auto_preference")
    for path in paths:
        file_fmt: Optional[str] = None if auto else fmt
        first_line = 0
        for row in iter_raw_rows(path, problems):
            if row.obj is None:  # unreadable: the problem is recorded, the raw text is kept
                yield row, None
                continue
            row_fmt = detect(row.obj, prompt_key, completion_key)
            if file_fmt is None:
                if row_fmt is None:
                    problem = Problem(row.source, row.line, "(row)", f"no known format in keys {sorted(row.obj)[:8]}",
                                      f"use one of: {', '.join(known)} (prompt/completion keys: data.prompt_key, "
                                      "data.completion_key)",
                                      "unknown_format")
                    yield _with_problem(row, problem, problems), None
                    continue
                file_fmt, first_line = row_fmt, row.line
                formats[str(path)] = file_fmt
            elif row_fmt != file_fmt and not (not auto and row_fmt is None):
                problem = Problem(row.source, row.line, "(row)",
                                  f"format {row_fmt or 'unknown'} differs from {file_fmt} (detected at line "
                                  f"{first_line or 1})",
                                  "keep one format per file, or split the file", "mixed_format")
                yield _with_problem(row, problem, problems), None
                continue
            rec = normalise(row, file_fmt, problems, prompt_key, completion_key)
            if rec is not None:
                for key, attr in ((group_key, "group"), (label_key, "label")):
                    if key:
                        value = row.obj.get(key)
                        if value is None:
                            _with_problem(row, Problem(row.source, row.line, key, "missing",
                                                       f"add '{key}' to every row, or unset split.{attr}_key",
                                                       "missing_field"), problems)
                            rec = None
                            break
                        setattr(rec, attr, str(value))
            yield row, rec
        if file_fmt and not auto:  # an explicit format is recorded even for a file of unreadable rows
            formats[str(path)] = file_fmt


def read_records(paths: list[str], fmt: str = "auto", prompt_key: str = "prompt",
                 completion_key: str = "completion") -> ReadResult:
    """Read and normalise every file into memory; collect every problem; keep every rejected row's raw text."""
    records: list[Record] = []
    problems: list[Problem] = []
    rejected: list[RawRow] = []
    formats: dict[str, str] = {}
    for row, rec in iter_records(paths, fmt, prompt_key, completion_key, problems, formats):
        if rec is None:
            rejected.append(row)
        else:
            records.append(rec)
    return ReadResult(records, problems, rejected, formats)


def file_fingerprint(paths: list[str]) -> str:
    """sha256 over the bytes of every data file, in order: the data part of the cache key and lineage."""
    return file_fingerprints(paths)[0]


def file_fingerprints(paths: list[str]) -> tuple[str, dict[str, str]]:
    """(`file_fingerprint(paths)`, each file's own `file_fingerprint([file])`), reading every file once: lineage
    finds a file among a run's several files, or among a mixture's sources, by its own."""
    whole = hashlib.sha256()
    each: dict[str, str] = {}
    for p in paths:
        single = hashlib.sha256(b"\x00file\x00")
        whole.update(b"\x00file\x00")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                whole.update(chunk)
                single.update(chunk)
        each[p] = single.hexdigest()
    return whole.hexdigest(), each


PLACEHOLDER_RE = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
