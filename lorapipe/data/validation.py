"""Validate a fine-tuning dataset: row checks, the learns-to-stop audit, token statistics and a GE suite.

`validate_dataset` is what both the pipeline's validate step and `lorapipe validate` call, so they report
the same findings on the same file. It never raises for bad data: it returns every problem, the accepted
records and the raw text of every rejected row; the caller decides to fail (policy `on_bad_rows`).
The Great Expectations suite and its report live in `expectations.py`; the row types in `records.py`.
"""

from __future__ import annotations

import hashlib
import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, Field

from lorapipe.data.expectations import ExpectationsReport, run_suite
from lorapipe.data.formats import CONTROL_RE, PLACEHOLDER_RE, LabelFields, iter_records
from lorapipe.data.records import Problem, RawRow, Record, fingerprint_part


# Without a tokenizer a row's token count is unknown; a row this long (~25k tokens of English) is said, not passed
# silently: it is far over any usual sequence limit, and often two rows fused by a lost newline.
LONG_ROW_CHARS = 100_000


class TokenStats(BaseModel):
    rows: int
    p50: float
    p95: float
    max: int
    total_tokens: int
    trainable_tokens: int
    truncated_rows: int = 0
    micro_batch_size: int = 1
    padding_waste_in_order: float = Field(description="Fraction of padded slots, batches in file order")
    padding_waste_length_grouped: float = Field(description="Same, batches grouped by length")
    histogram: list[list[float]] = Field(default_factory=list, description="[bin start, rows] pairs of token lengths")


class AuditReport(BaseModel):
    """Will the model learn to stop? Fractions over accepted rows."""

    rows: int
    trainable_rows_fraction: float
    stop_token_trained_fraction: float
    roundtrip_fraction: float  # over rows not truncated: decode(tokens) == rendered text
    eos_token: Optional[str]
    pad_token: Optional[str]
    pad_is_eos: bool
    chat_template_source: str
    passed: bool
    explanation: str


class ClassificationData(BaseModel):
    """task: classification: the label set frozen for training (ids 0..n-1 in this order) and the rows per label."""

    labels: list[str]
    label_source: str = Field(description="'config' (data.labels) or 'inferred' from the rows, sorted")
    counts: dict[str, int] = Field(description="accepted rows per label")
    imbalance_ratio: float = Field(description="rows of the largest class / rows of the smallest (with rows)")
    text_pair: bool = False

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def summary(self) -> str:
        counts = ", ".join(f"{name} {self.counts.get(name, 0)}" for name in self.labels[:12])
        more = f", ... {len(self.labels) - 12} more" if len(self.labels) > 12 else ""
        return (f"labels ({len(self.labels)}, {self.label_source}): {counts}{more}; largest/smallest class "
                f"{self.imbalance_ratio:.1f}x")


def label_order(names: list[str]) -> list[str]:
    """Inferred labels in a stable order: numerically when every label is an integer (0, 1, ..., 10), else sorted."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


class ValidationReport(BaseModel):
    files: dict[str, str] = Field(description="file -> detected format")
    data_fingerprint: str = Field(description="sha256 of the accepted rows' normalised content")
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    errors: int
    warnings: int
    problem_counts: dict[str, int]
    problems: list[Problem]
    token_stats: Optional[TokenStats] = None
    audit: Optional[AuditReport] = None
    expectations: Optional[ExpectationsReport] = None
    classification: Optional[ClassificationData] = None
    passed: bool
    verdict: str

    def summary_lines(self, max_rows_per_kind: int = 3) -> list[str]:
        lines = [
            f"rows read {self.rows_read}, accepted {self.rows_accepted}, rejected {self.rows_rejected}; "
            f"{self.errors} error(s), {self.warnings} warning(s)",
        ]
        if self.problem_counts:
            width = max(len(k) for k in self.problem_counts)
            lines.append(f"{'problem'.ljust(width)}  count  severity")
            sev = {p.code: p.severity for p in self.problems}
            kinds = sorted(self.problem_counts.items(), key=lambda kv: -kv[1])
            for code, n in kinds:
                lines.append(f"{code.ljust(width)}  {n:5d}  {sev.get(code, '')}")
            by_kind: dict[str, list[Problem]] = {}
            for p in self.problems:
                by_kind.setdefault(p.code, []).append(p)
            for code, n in kinds:  # the first few of each kind, then how many were left out: nothing silently
                for p in by_kind.get(code, [])[:max_rows_per_kind]:
                    col = f":{p.column}" if p.column else ""
                    other = f" (first seen at line {p.other_line})" if p.other_line else ""
                    where = f"{p.source}:{p.line}{col}" if p.line else p.source  # line 0: the file itself
                    lines.append(f"  {where}: [{p.code}] {p.field}: {p.message}{other} -> {p.fix}")
                if n > max_rows_per_kind:
                    lines.append(f"  ... and {n - max_rows_per_kind} more [{code}] (--json, or the report artifact, "
                                 "lists every one)")
        if self.token_stats:
            t = self.token_stats
            lines.append(f"tokens per row: p50 {t.p50:.0f}, p95 {t.p95:.0f}, max {t.max}; total {t.total_tokens}, "
                         f"trained {t.trainable_tokens}; padding waste {t.padding_waste_in_order:.1%} in order, "
                         f"{t.padding_waste_length_grouped:.1%} length-grouped (micro-batch {t.micro_batch_size})")
        if self.classification:
            lines.append(self.classification.summary())
        if self.audit:
            a = self.audit
            lines.append(f"learns-to-stop audit: {a.stop_token_trained_fraction:.1%} rows train the stop token "
                         f"{a.eos_token!r}; {a.trainable_rows_fraction:.1%} rows have trained tokens; "
                         f"round-trip {a.roundtrip_fraction:.1%}; {a.explanation}")
        if self.expectations:
            e = self.expectations
            lines.append(f"expectation suite '{e.suite_name}': {'passed' if e.success else 'FAILED'} "
                         f"({e.evaluated} expectations{'; failed: ' + ', '.join(e.failed) if e.failed else ''})")
        lines.append(self.verdict)
        return lines


class RejectedRow(BaseModel):
    source: str
    line: int
    raw: str
    reasons: list[str]


@dataclass
class ValidationOutcome:
    records: list[Record]
    rejected: list[RejectedRow]
    report: ValidationReport
    row_facts: dict[str, "array"] = field(default_factory=dict)  # column -> per-row values (GE suite input)


class DataValidationError(ValueError):
    """Raised by callers that must stop on bad data; carries the full report."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__("dataset validation failed:\n" + "\n".join(report.summary_lines(max_rows_per_kind=5)))


def source_field(rec: Record, i: int, prompt_key: str = "prompt", completion_key: str = "completion") -> str:
    """The field of the user's own row that message i came from, so a problem points at what to edit."""
    n = len(rec.messages)
    if rec.format == "prompt_completion":
        return prompt_key if i == 0 else completion_key
    if rec.format == "alpaca":
        offset = 1 if rec.messages and rec.messages[0]["role"] == "system" else 0
        if i < offset:
            return "system"
        if i >= n - 2:
            return "instruction/input" if i == n - 2 else "output"
        return f"history[{(i - offset) // 2}][{(i - offset) % 2}]"
    if rec.format == "sharegpt":
        return f"conversations[{i}].value"
    return f"messages[{i}].content"


def check_record(rec: Record, problems: list[Problem], prompt_key: str = "prompt",
                 completion_key: str = "completion") -> None:
    """Content checks on one normalised record (fields are known to be well-typed here)."""
    src, line = rec.source, rec.line
    if rec.format == "classification":
        contents = [("text", rec.text or "")] + ([("text_pair", rec.text_pair)] if rec.text_pair is not None else [])
        for fld, text in contents:
            if not text.strip():
                problems.append(Problem(src, line, fld, "empty or whitespace-only text", "write the text, or remove "
                                        "the row", "empty_text"))
    elif rec.text is not None:
        if not rec.text.strip():
            problems.append(Problem(src, line, "text", "empty or whitespace-only", "remove the row or fill it", "empty_response"))
        contents = [("text", rec.text)]
    else:
        fields = [source_field(rec, i, prompt_key, completion_key) for i in range(len(rec.messages))]
        contents = [(fields[i], m.get("content") or "") for i, m in enumerate(rec.messages)]
        roles = [m["role"] for m in rec.messages]
        for i, m in enumerate(rec.messages):
            if m["role"] == "assistant" and not (m.get("content") or "").strip():
                problems.append(Problem(src, line, fields[i], "empty or whitespace-only response",
                                        "write the answer, or remove the row", "empty_response"))
            if m["role"] == "user" and not (m.get("content") or "").strip():
                problems.append(Problem(src, line, fields[i], "empty or whitespace-only prompt",
                                        "write the prompt, or remove the row", "empty_prompt"))
        _check_roles(rec, roles, problems)
    for fld, text in contents:
        m = PLACEHOLDER_RE.search(text) if "{{" in text else None
        if m:
            problems.append(Problem(src, line, fld, f"unfilled template placeholder {m.group(0)}",
                                    "fill the placeholder in (e.g. replace {{name}} by the assistant's name)", "placeholder"))
        c = CONTROL_RE.search(text)
        if c:
            problems.append(Problem(src, line, fld, f"control character U+{ord(c.group(0)):04X} at offset {c.start()}",
                                    "remove it (often a sign of a bad export or encoding)", "control_char", severity="warning"))


def _check_roles(rec: Record, roles: list[str], problems: list[Problem]) -> None:
    src, line = rec.source, rec.line
    for i, r in enumerate(roles):
        if r == "system" and i != 0:
            problems.append(Problem(src, line, f"messages[{i}].role", "a system message after the first turn",
                                    "move the system message first", "role_order"))
            return
    turns = [r for r in roles if r != "system"]
    if not turns:
        problems.append(Problem(src, line, "messages", "no user or assistant turn", "add a user and an assistant turn", "role_order"))
        return
    if turns[0] != "user":
        problems.append(Problem(src, line, "messages", f"the conversation starts with {turns[0]!r}, not 'user'",
                                "start with a user turn (after an optional system)", "role_order"))
        return
    prev = "user"
    offset = len(roles) - len(turns)
    for i, r in enumerate(turns[1:], start=1):
        ok = (prev == "user" and r == "assistant") or (prev == "assistant" and r in ("user", "tool")) or \
             (prev == "tool" and r in ("assistant", "tool"))
        if not ok:
            problems.append(Problem(src, line, f"messages[{i + offset}].role", f"{r!r} follows {prev!r}",
                                    "alternate user and assistant (tool results follow an assistant call)", "role_order"))
            return
        prev = r
    if turns[-1] != "assistant":
        problems.append(Problem(src, line, "messages", f"ends with {turns[-1]!r}, not a trainable assistant turn",
                                "end with the assistant's answer", "role_order"))


def _percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return 0.0
    k = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo))


def padding_waste(lengths: list[int], micro_batch_size: int) -> float:
    """Fraction of a padded batch's slots that are padding, batching `lengths` in the given order."""
    slots = real = 0
    for i in range(0, len(lengths), micro_batch_size):
        batch = lengths[i:i + micro_batch_size]
        slots += max(batch) * len(batch)
        real += sum(batch)
    return 0.0 if slots == 0 else 1 - real / slots


PROGRESS_MIN_BYTES = 8 << 20  # below this a file validates in about a second: no bar


def _progress_bar(paths: list[str]) -> Any:
    """A tqdm bar over the files' bytes (characters read, so a UTF-8 file may finish just short of 100%)."""
    import os

    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    if total < PROGRESS_MIN_BYTES:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="validating", leave=False, mininterval=0.5)


def validate_dataset(
    paths: list[str],
    fmt: str = "auto",
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    tokenizer: Any = None,
    chat_template_source: str = "tokenizer",
    max_seq_length: Optional[int] = None,
    overlength: str = "fail",
    on_bad_rows: str = "fail",
    max_bad_fraction: float = 0.0,
    min_rows: int = 1,
    micro_batch_size: int = 1,
    run_expectations: bool = True,
    keep_records: bool = True,
    group_key: Optional[str] = None,
    stratify_key: Optional[str] = None,
    progress: bool = False,
    label_fields: Optional[LabelFields] = None,
    max_class_imbalance: float = 10.0,
) -> ValidationOutcome:
    """One streaming pass: read, normalise, check, de-duplicate and (with a tokenizer) audit every row.

    Memory is bounded by what is kept: the accepted records (`keep_records=False` keeps none, as
    `lorapipe validate` does), the problems, the rejected rows and one 16-byte digest per distinct row.
    `progress`: a progress bar on stderr (by bytes read) when the files are large enough to wait for.
    """
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    rejected: dict[tuple[str, int], RejectedRow] = {}
    sources: dict[str, int] = {}  # file -> index, for the packed first-seen positions
    source_names: list[str] = []
    first_seen: dict[bytes, int] = {}  # content digest -> (file index << 32 | line)
    kept: list[Record] = []
    fingerprint = hashlib.sha256()
    classifying = fmt == "classification"
    first_label: dict[bytes, Optional[str]] = {}  # classification: the label a text was first seen with
    audit_cls = _ClassificationTokenAudit if classifying else _TokenAudit
    audit = audit_cls(tokenizer, max_seq_length, overlength) if tokenizer is not None else None
    chat_template_source = getattr(tokenizer, "lorapipe_chat_template_source", chat_template_source)
    facts: dict[str, array] = {}  # columnar: a million rows of facts cost megabytes, not a dict per row
    rows_read = n_kept = 0
    label_counts: Counter = Counter()

    def reject(row: RawRow | Record, reasons: list[str]) -> None:
        key = (row.source, row.line)
        if key not in rejected:
            rejected[key] = RejectedRow(source=row.source, line=row.line, raw=row.raw, reasons=[])
        rejected[key].reasons.extend(reasons)

    bar = _progress_bar(paths) if progress else None
    for row, rec in iter_records(paths, fmt, prompt_key, completion_key, problems, formats, group_key,
                                 None if classifying else stratify_key, label_fields):
        rows_read += 1
        if bar is not None:
            bar.update(len(row.raw) + 1)
        if rec is None:
            reject(row, [p.code for p in row.problems])
            continue
        found: list[Problem] = []  # this row's problems from the checks below
        check_record(rec, found, prompt_key, completion_key)
        key = rec.content_key()
        digest = bytes.fromhex(key[:32])
        if row.source not in sources:
            sources[row.source] = len(source_names)
            source_names.append(row.source)
        if digest in first_seen:
            packed = first_seen[digest]
            f_src, f_line = source_names[packed >> 32], packed & 0xFFFFFFFF
            where = f"line {f_line}" if f_src == rec.source else f"{f_src}:{f_line}"
            if classifying and first_label.get(digest) != rec.label:
                found.append(Problem(rec.source, rec.line, label_fields.label_key if label_fields else "label",
                                     f"the same text as {where} with another label: {rec.label!r} here, "
                                     f"{first_label.get(digest)!r} there",
                                     "keep one label per text: fix the wrong one, or remove a copy", "conflicting_label",
                                     other_line=f_line))
            else:
                found.append(Problem(rec.source, rec.line, "(row)",
                                     f"exact duplicate of {where} (after whitespace normalisation)",
                                     "remove one copy; both always land in the same split", "duplicate",
                                     severity="warning", other_line=f_line))
        else:
            first_seen[digest] = (sources[row.source] << 32) | rec.line
            if classifying:
                first_label[digest] = rec.label
        if audit is None and len(row.raw) > LONG_ROW_CHARS:
            found.append(Problem(rec.source, rec.line, "(row)", f"{len(row.raw):,} characters",
                                 "check it is meant to be one row; give --model (or train with it) to count its tokens "
                                 "against the sequence limit", "long_row", severity="warning"))
        errors = [p.code for p in found if p.severity == "error"]
        if not errors and audit is not None:
            errors = audit.add(rec, found)
        problems.extend(found)
        if errors:
            reject(rec, errors)
            continue
        rec.raw = ""  # accepted rows live on in normalised form; raw text is kept only for rejected rows
        n_kept += 1
        if classifying:
            label_counts[rec.label] += 1
        fingerprint.update(fingerprint_part(rec, key))
        for name, value in (audit.last_facts if audit is not None else _facts(rec)).items():
            facts.setdefault(name, array("q")).append(value)
        if keep_records:
            kept.append(rec)

    if bar is not None:
        bar.close()
    token_stats = audit_report = None
    if audit is not None:
        token_stats, audit_report = audit.finish(micro_batch_size, chat_template_source)

    classification = None
    if classifying:
        classification = _classification_data(label_counts, label_fields, max_class_imbalance, min_rows, problems)
        for name, value in (("label_id", [classification.label2id[r.label] for r in kept]),) if keep_records else ():
            facts[name] = array("q", value)

    n_rejected = len(rejected)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    bad_fraction = n_rejected / rows_read if rows_read else 1.0
    verdicts = []
    passed = True
    if any(p.line == 0 for p in errors):
        passed = False
        verdicts.append("a data file is missing, empty or unreadable")
    if any(p.line != 0 for p in errors) and on_bad_rows == "fail":
        passed = False
        verdicts.append(f"{n_rejected} row(s) rejected and validation.on_bad_rows is 'fail' "
                        "(set it to 'quarantine' to train on the rest; rejected rows are kept as an artifact)")
    elif bad_fraction > max_bad_fraction and on_bad_rows == "quarantine":
        passed = False
        verdicts.append(f"{bad_fraction:.1%} of rows rejected, above validation.max_bad_fraction={max_bad_fraction}")
    if n_kept < min_rows:
        passed = False
        verdicts.append(f"only {n_kept} usable row(s); validation.min_rows is {min_rows}")
    if audit_report is not None and not audit_report.passed:
        passed = False
        verdicts.append(audit_report.explanation)
    if classification is not None and n_kept and len([c for c in classification.counts.values() if c]) < 2:
        passed = False
        verdicts.append(f"every accepted row has the label {next(iter(label_counts))!r}: a classifier needs at least "
                        "two labels with rows")

    expectations = None
    if run_expectations and facts:
        expectations = run_suite(facts, max_seq_length if tokenizer is not None else None, min_rows)
        if not expectations.success:
            passed = False
            verdicts.append(f"expectation suite failed: {', '.join(expectations.failed)}")

    report = ValidationReport(
        files=formats,
        data_fingerprint=fingerprint.hexdigest(),
        rows_read=rows_read,
        rows_accepted=n_kept,
        rows_rejected=n_rejected,
        errors=len(errors),
        warnings=len(warnings),
        problem_counts=dict(Counter(p.code for p in problems)),
        problems=problems,
        token_stats=token_stats,
        audit=audit_report,
        expectations=expectations,
        classification=classification,
        passed=passed,
        verdict="PASSED" if passed else "FAILED: " + "; ".join(verdicts),
    )
    return ValidationOutcome(kept, sorted(rejected.values(), key=lambda r: (r.source, r.line)), report, facts)


DATASET = "(dataset)"  # where a problem of the whole dataset (not one row) is said to be


def _classification_data(counts: Counter, fields: Optional[LabelFields], max_imbalance: float, min_rows: int,
                         problems: list[Problem]) -> ClassificationData:
    """The frozen label set and its counts; warns about labels without rows, tiny classes and imbalance."""
    fields = fields or LabelFields()
    if fields.labels is not None:
        labels, source = list(dict.fromkeys(fields.labels.values())), "config"
    else:
        labels, source = label_order([str(k) for k in counts]), "inferred"
    for name in labels:
        n = counts.get(name, 0)
        if n == 0 and source == "config":
            problems.append(Problem(DATASET, 0, fields.label_key, f"label {name!r} of data.labels has no row",
                                    "add rows of it, or remove it from data.labels (the model would never predict it)",
                                    "empty_class", severity="warning"))
        elif 0 < n < 3:
            problems.append(Problem(DATASET, 0, fields.label_key, f"label {name!r} has {n} row(s)",
                                    "add rows: the stratified split needs one per split (train, eval, test) at least",
                                    "small_class", severity="warning"))
    present = [counts[n] for n in labels if counts.get(n)]
    ratio = max(present) / min(present) if present else 0.0
    if ratio > max_imbalance:
        big = max(labels, key=lambda n: counts.get(n, 0))
        small = min((n for n in labels if counts.get(n)), key=lambda n: counts[n])
        problems.append(Problem(DATASET, 0, fields.label_key,
                                f"imbalanced labels: {big!r} has {counts[big]} rows, {small!r} {counts[small]} "
                                f"({ratio:.1f}x, above validation.max_class_imbalance={max_imbalance:g})",
                                f"set train.class_weights: balanced, or add rows of {small!r}; judge the model by "
                                "macro F1 (the default promotion metric), not accuracy", "class_imbalance",
                                severity="warning"))
    return ClassificationData(labels=labels, label_source=source, counts={n: counts.get(n, 0) for n in labels},
                              imbalance_ratio=round(ratio, 3), text_pair=fields.text_pair_key is not None)


def _facts(rec: Record) -> dict:
    if rec.text is not None:
        return {"n_messages": 1, "prompt_chars": 0, "response_chars": len(rec.text.strip())}
    prompt = sum(len(m.get("content") or "") for m in rec.messages if m["role"] != "assistant")
    resp = min((len((m.get("content") or "").strip()) for m in rec.messages if m["role"] == "assistant"), default=0)
    return {"n_messages": len(rec.messages), "prompt_chars": prompt, "response_chars": resp}


HISTOGRAM_BINS = 20


class _TokenAudit:
    """Per-row tokenizing pass: over-length policy, trainable tokens, the stop token, round-trip, lengths."""

    def __init__(self, tokenizer: Any, max_len: Optional[int], overlength: str):
        self.tok, self.max_len, self.overlength = tokenizer, max_len, overlength
        self.eos_id = tokenizer.eos_token_id
        self.lengths: list[int] = []
        self.rows = self.stop_rows = self.roundtrip = self.roundtrip_checked = self.truncated = self.trained = 0
        self.last_facts: dict = {}

    def add(self, rec: Record, problems: list[Problem]) -> list[str]:
        """Audit one record; return the error codes that reject it (empty when accepted)."""
        from lorapipe.data.render import RenderError, decode, encode

        self.rows += 1
        try:
            enc = encode(self.tok, rec, self.max_len if self.overlength == "truncate" else None)
        except RenderError as exc:
            problems.append(Problem(rec.source, rec.line, "(template)", str(exc), "set model.chat_template", "template_error"))
            return ["template_error"]
        rejected = self.length_policy(rec, enc.full_length, problems, "tokens after the chat template,",
                                      "raise train.max_seq_length, shorten the row, or set validation.overlength to "
                                      "'truncate' or 'drop'")
        if rejected:
            return [rejected]
        n_trained = sum(enc.assistant_mask)
        if n_trained == 0:
            problems.append(Problem(rec.source, rec.line, "(row)", "no trainable token after masking (and truncation)",
                                    "shorten the prompt or raise train.max_seq_length", "no_trainable_tokens"))
            return ["no_trainable_tokens"]
        if _turns_end_with(enc.input_ids, enc.assistant_mask, self.eos_id):
            self.stop_rows += 1
        if not enc.truncated:  # a truncated row cannot round-trip by construction: not counted either way
            self.roundtrip_checked += 1
            self.roundtrip += decode(self.tok, enc.input_ids) == enc.rendered
        n = len(enc.input_ids)
        self.lengths.append(n)
        self.trained += n_trained
        self.last_facts = {**_facts(rec), "n_tokens": n, "n_trainable_tokens": n_trained}
        return []

    def length_policy(self, rec: Record, length: int, problems: list[Problem], counted: str, fix: str) -> Optional[str]:
        """validation.overlength for a row of `length` tokens over the limit: the code that rejects it (fail, drop),
        or None (within the limit, or truncated: said as a warning and counted)."""
        if self.max_len is None or length <= self.max_len:
            return None
        if self.overlength in ("fail", "drop"):
            code = "overlength" if self.overlength == "fail" else "overlength_dropped"
            problems.append(Problem(rec.source, rec.line, "(row)",
                                    f"{length} {counted} above train.max_seq_length={self.max_len}", fix, code,
                                    severity="error" if self.overlength == "fail" else "dropped"))
            return code
        self.truncated += 1
        problems.append(Problem(rec.source, rec.line, "(row)", f"{length} tokens truncated to {self.max_len}",
                                "none needed, or raise train.max_seq_length", "overlength_truncated", severity="warning"))
        return None

    def finish(self, micro_batch: int, template_source: str) -> tuple[TokenStats, AuditReport]:
        n = len(self.lengths)
        s = sorted(self.lengths)
        hist: list[list[float]] = []
        if s:
            lo, hi = s[0], s[-1]
            width = max(1, math.ceil((hi - lo + 1) / HISTOGRAM_BINS))
            counts = Counter((x - lo) // width for x in s)
            hist = [[lo + b * width, counts.get(b, 0)] for b in range(HISTOGRAM_BINS) if lo + b * width <= hi]
        stats = TokenStats(rows=n, p50=_percentile(s, 0.5), p95=_percentile(s, 0.95), max=s[-1] if s else 0,
                           total_tokens=sum(self.lengths), trainable_tokens=self.trained, truncated_rows=self.truncated,
                           micro_batch_size=micro_batch, padding_waste_in_order=padding_waste(self.lengths, micro_batch),
                           padding_waste_length_grouped=padding_waste(s, micro_batch), histogram=hist)
        stop_frac = self.stop_rows / n if n else 0.0
        pad_is_eos = self.tok.pad_token_id is not None and self.tok.pad_token_id == self.eos_id
        if n == 0:
            ok, why = False, "no row has a trained token: every label is masked, nothing would be learned"
        elif self.stop_rows == 0:
            ok, why = False, (f"no row trains the stop token {self.tok.eos_token!r} at the end of an assistant turn: "
                              "the model would never learn to stop; use a chat template that closes assistant turns "
                              "with the EOS/turn-end token (model.chat_template)")
        elif stop_frac < 1.0:
            ok, why = True, f"{n - self.stop_rows} row(s) do not train the stop token (truncated rows lose it)"
        else:
            ok, why = True, "every row trains the stop token"
        if pad_is_eos:
            why += "; PAD is EOS, but padding is masked by position, so EOS stays trained"
        audit = AuditReport(rows=n, trainable_rows_fraction=n / self.rows if self.rows else 0.0,
                            stop_token_trained_fraction=stop_frac,
                            roundtrip_fraction=self.roundtrip / self.roundtrip_checked if self.roundtrip_checked else 1.0,
                            eos_token=self.tok.eos_token, pad_token=self.tok.pad_token, pad_is_eos=pad_is_eos,
                            chat_template_source=template_source, passed=ok, explanation=why)
        return stats, audit


def _turns_end_with(ids: list[int], mask: list[int], eos_id: Optional[int], window: int = 3) -> bool:
    """True when every contiguous trained run has the EOS id among its last `window` tokens."""
    if eos_id is None:
        return False
    runs = [m.span() for m in _TRAINED_RUN.finditer(bytes(mask))]  # the runs of 1s, found in C
    return bool(runs) and all(eos_id in ids[max(s, e - window):e] for s, e in runs)


_TRAINED_RUN = re.compile(b"\x01+")


class _ClassificationTokenAudit(_TokenAudit):
    """A classifier reads the text (and pair) the tokenizer encodes with its special tokens, and every token feeds the
    label: token counts and the over-length policy, no stop-token audit (nothing is generated)."""

    def add(self, rec: Record, problems: list[Problem]) -> list[str]:
        self.rows += 1
        enc = self.tok(rec.text, rec.text_pair, truncation=False)
        n = len(enc["input_ids"])
        rejected = self.length_policy(rec, n, problems, "tokens,",
                                      "raise train.max_seq_length, shorten the text, or set validation.overlength: "
                                      "truncate (the usual choice for classification) or drop")
        if rejected:
            return [rejected]
        n = min(n, self.max_len) if self.max_len is not None else n
        self.lengths.append(n)
        self.trained += n
        self.last_facts = {**_facts(rec), "n_tokens": n, "n_trainable_tokens": n}
        return []

    def finish(self, micro_batch: int, template_source: str) -> tuple[TokenStats, None]:  # type: ignore[override]
        stats, _ = super().finish(micro_batch, template_source)
        return stats, None


class RejectedRows(BaseModel):
    """Every row the user gave that was not accepted, as its original text, with file, line and reasons."""

    rows: list[RejectedRow]
