"""Validate a fine-tuning dataset: row checks, the learns-to-stop audit, token statistics and a GE suite.

`validate_dataset` is what both the pipeline's validate step and `lorapipe validate` call, so they report
the same findings on the same file. It never raises for bad data: it returns every problem, the accepted
records and the raw text of every rejected row; the caller decides to fail (policy `on_bad_rows`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, Field

from lorapipe.data.formats import (
    CONTROL_RE,
    PLACEHOLDER_RE,
    Problem,
    RawRow,
    Record,
    ReadResult,
    read_records,
)


class ProblemRecord(BaseModel):
    source: str
    line: int
    field: str
    message: str
    fix: str
    code: str
    severity: str = "error"
    column: Optional[int] = None
    other_line: Optional[int] = None


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


class AuditReport(BaseModel):
    """Will the model learn to stop? Fractions over accepted rows."""

    rows: int
    trainable_rows_fraction: float
    stop_token_trained_fraction: float
    roundtrip_fraction: float
    eos_token: Optional[str]
    pad_token: Optional[str]
    pad_is_eos: bool
    chat_template_source: str
    passed: bool
    explanation: str


class ExpectationsReport(BaseModel):
    suite_name: str
    success: bool
    evaluated: int
    failed: list[str]
    results: list[dict[str, Any]]


class ValidationReport(BaseModel):
    files: dict[str, str] = Field(description="file -> detected format")
    data_fingerprint: str = Field(description="sha256 of the accepted rows' normalised content")
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    errors: int
    warnings: int
    problem_counts: dict[str, int]
    problems: list[ProblemRecord]
    token_stats: Optional[TokenStats] = None
    audit: Optional[AuditReport] = None
    expectations: Optional[ExpectationsReport] = None
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
            for code, n in sorted(self.problem_counts.items(), key=lambda kv: -kv[1]):
                lines.append(f"{code.ljust(width)}  {n:5d}  {sev.get(code, '')}")
            shown: Counter = Counter()
            for p in self.problems:
                if shown[p.code] < max_rows_per_kind:
                    shown[p.code] += 1
                    col = f":{p.column}" if p.column else ""
                    other = f" (first seen at line {p.other_line})" if p.other_line else ""
                    lines.append(f"  {p.source}:{p.line}{col}: [{p.code}] {p.field}: {p.message}{other} -> {p.fix}")
        if self.token_stats:
            t = self.token_stats
            lines.append(f"tokens per row: p50 {t.p50:.0f}, p95 {t.p95:.0f}, max {t.max}; total {t.total_tokens}, "
                         f"trained {t.trainable_tokens}; padding waste {t.padding_waste_in_order:.1%} in order, "
                         f"{t.padding_waste_length_grouped:.1%} length-grouped (micro-batch {t.micro_batch_size})")
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
    row_facts: list[dict] = field(default_factory=list)


class DataValidationError(ValueError):
    """Raised by callers that must stop on bad data; carries the full report."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__("dataset validation failed:\n" + "\n".join(report.summary_lines(max_rows_per_kind=5)))


def _problem(p: Problem) -> ProblemRecord:
    return ProblemRecord(**p.to_dict())


def check_record(rec: Record, problems: list[Problem]) -> None:
    """Content checks on one normalised record (fields are known to be well-typed here)."""
    src, line = rec.source, rec.line
    if rec.text is not None:
        if not rec.text.strip():
            problems.append(Problem(src, line, "text", "empty or whitespace-only", "remove the row or fill it", "empty_response"))
        contents = [("text", rec.text)]
    else:
        contents = [(f"messages[{i}].content", m.get("content") or "") for i, m in enumerate(rec.messages)]
        roles = [m["role"] for m in rec.messages]
        for i, m in enumerate(rec.messages):
            if m["role"] == "assistant" and not (m.get("content") or "").strip():
                problems.append(Problem(src, line, f"messages[{i}].content", "empty or whitespace-only response",
                                        "write the answer, or remove the row", "empty_response"))
            if m["role"] == "user" and not (m.get("content") or "").strip():
                problems.append(Problem(src, line, f"messages[{i}].content", "empty or whitespace-only prompt",
                                        "write the prompt, or remove the row", "empty_prompt"))
        _check_roles(rec, roles, problems)
    for fld, text in contents:
        m = PLACEHOLDER_RE.search(text)
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


def dataset_fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.content_key().encode())
    return h.hexdigest()


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
) -> ValidationOutcome:
    read: ReadResult = read_records(paths, fmt, prompt_key, completion_key)
    problems = list(read.problems)
    rejected: dict[tuple[str, int], RejectedRow] = {}

    def reject(raw: RawRow | Record, reason: str) -> None:
        key = (raw.source, raw.line)
        if key not in rejected:
            rejected[key] = RejectedRow(source=raw.source, line=raw.line, raw=raw.raw, reasons=[])
        rejected[key].reasons.append(reason)

    for row in read.rejected:
        for p in problems:
            if p.source == row.source and p.line == row.line:
                reject(row, p.code)
        if (row.source, row.line) not in rejected:
            reject(row, "unreadable")

    seen: dict[str, Record] = {}
    kept: list[Record] = []
    for rec in read.records:
        before = len(problems)
        check_record(rec, problems)
        key = rec.content_key()
        if key in seen:
            first = seen[key]
            where = f"line {first.line}" if first.source == rec.source else f"{first.source}:{first.line}"
            problems.append(Problem(rec.source, rec.line, "(row)", f"exact duplicate of {where} (after whitespace normalisation)",
                                    "remove one copy; both always land in the same split", "duplicate",
                                    severity="warning", other_line=first.line))
        else:
            seen[key] = rec
        errors = [p for p in problems[before:] if p.severity == "error"]
        if errors:
            for p in errors:
                reject(rec, p.code)
        else:
            kept.append(rec)

    row_facts: list[dict] = []
    token_stats = audit = None
    if tokenizer is not None:
        kept, token_stats, audit, row_facts = _tokenize_pass(
            kept, tokenizer, chat_template_source, max_seq_length, overlength, micro_batch_size, problems, reject)
    else:
        row_facts = [_facts(r) for r in kept]

    rows_read = len(read.records) + len(read.rejected)
    n_rejected = len(rejected)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    bad_fraction = n_rejected / rows_read if rows_read else 1.0
    verdicts = []
    passed = True
    file_level = [p for p in errors if p.line == 0]
    if file_level:
        passed = False
        verdicts.append("a data file could not be read")
    if errors and on_bad_rows == "fail":
        passed = False
        verdicts.append(f"{n_rejected} row(s) rejected and validation.on_bad_rows is 'fail' "
                        "(set it to 'quarantine' to train on the rest; rejected rows are kept as an artifact)")
    elif bad_fraction > max_bad_fraction and on_bad_rows == "quarantine":
        passed = False
        verdicts.append(f"{bad_fraction:.1%} of rows rejected, above validation.max_bad_fraction={max_bad_fraction}")
    if len(kept) < min_rows:
        passed = False
        verdicts.append(f"only {len(kept)} usable row(s); validation.min_rows is {min_rows}")
    if audit is not None and not audit.passed:
        passed = False
        verdicts.append(audit.explanation)

    expectations = None
    if run_expectations and row_facts:
        from lorapipe.data.expectations import run_suite

        expectations = run_suite(row_facts, max_seq_length if overlength != "fail" or tokenizer else None, min_rows)
        if not expectations.success:
            passed = False
            verdicts.append(f"expectation suite failed: {', '.join(expectations.failed)}")

    report = ValidationReport(
        files=read.formats,
        data_fingerprint=dataset_fingerprint(kept),
        rows_read=rows_read,
        rows_accepted=len(kept),
        rows_rejected=n_rejected,
        errors=len(errors),
        warnings=len(warnings),
        problem_counts=dict(Counter(p.code for p in problems)),
        problems=[_problem(p) for p in problems],
        token_stats=token_stats,
        audit=audit,
        expectations=expectations,
        passed=passed,
        verdict="PASSED" if passed else "FAILED: " + "; ".join(verdicts),
    )
    return ValidationOutcome(kept, sorted(rejected.values(), key=lambda r: (r.source, r.line)), report, row_facts)


def _facts(rec: Record) -> dict:
    if rec.text is not None:
        return {"n_messages": 1, "prompt_chars": 0, "response_chars": len(rec.text.strip())}
    prompt = sum(len(m.get("content") or "") for m in rec.messages if m["role"] != "assistant")
    resp = min((len((m.get("content") or "").strip()) for m in rec.messages if m["role"] == "assistant"), default=0)
    return {"n_messages": len(rec.messages), "prompt_chars": prompt, "response_chars": resp}


def _tokenize_pass(records, tokenizer, template_source, max_len, overlength, micro_batch, problems, reject):
    from lorapipe.data.render import RenderError, encode

    eos_id = tokenizer.eos_token_id
    kept, lengths, facts = [], [], []
    trainable_rows = stop_rows = roundtrip = truncated = total = trained = 0
    for rec in records:
        try:
            enc = encode(tokenizer, rec, max_len if overlength == "truncate" else None)
        except RenderError as exc:
            problems.append(Problem(rec.source, rec.line, "(template)", str(exc), "set model.chat_template", "template_error"))
            reject(rec, "template_error")
            continue
        if max_len is not None and enc.full_length > max_len:
            if overlength == "fail" or overlength == "drop":
                sev = "error" if overlength == "fail" else "dropped"  # drop: rejected and kept, not fatal
                problems.append(Problem(rec.source, rec.line, "(row)",
                                        f"{enc.full_length} tokens after the chat template, above train.max_seq_length={max_len}",
                                        "raise train.max_seq_length, shorten the row, or set validation.overlength to "
                                        "'truncate' or 'drop'", "overlength" if overlength == "fail" else "overlength_dropped",
                                        severity=sev))
                reject(rec, "overlength")
                continue
            truncated += 1
            problems.append(Problem(rec.source, rec.line, "(row)",
                                    f"{enc.full_length} tokens truncated to {max_len}", "none needed, or raise train.max_seq_length",
                                    "overlength_truncated", severity="warning"))
        n_trained = sum(enc.assistant_mask)
        if n_trained == 0:
            problems.append(Problem(rec.source, rec.line, "(row)", "no trainable token after masking (and truncation)",
                                    "shorten the prompt or raise train.max_seq_length", "no_trainable_tokens"))
            reject(rec, "no_trainable_tokens")
            continue
        trainable_rows += 1
        if _turns_end_with(enc.input_ids, enc.assistant_mask, eos_id):
            stop_rows += 1
        if not enc.truncated and tokenizer.decode(enc.input_ids, skip_special_tokens=False) == enc.rendered:
            roundtrip += 1
        kept.append(rec)
        lengths.append(len(enc.input_ids))
        total += len(enc.input_ids)
        trained += n_trained
        f = _facts(rec)
        f.update(n_tokens=len(enc.input_ids), n_trainable_tokens=n_trained)
        facts.append(f)
    n = len(kept)
    s = sorted(lengths)
    stats = TokenStats(rows=n, p50=_percentile(s, 0.5), p95=_percentile(s, 0.95), max=s[-1] if s else 0,
                       total_tokens=total, trainable_tokens=trained, truncated_rows=truncated,
                       micro_batch_size=micro_batch, padding_waste_in_order=padding_waste(lengths, micro_batch),
                       padding_waste_length_grouped=padding_waste(s, micro_batch))
    stop_frac = stop_rows / n if n else 0.0
    pad_is_eos = tokenizer.pad_token_id is not None and tokenizer.pad_token_id == eos_id
    if n == 0:
        ok, why = False, "no row has a trained token: every label is masked, nothing would be learned"
    elif stop_rows == 0:
        ok, why = False, (f"no row trains the stop token {tokenizer.eos_token!r} at the end of an assistant turn: "
                          "the model would never learn to stop; use a chat template that closes assistant turns with "
                          "the EOS/turn-end token (model.chat_template)")
    elif stop_frac < 1.0:
        ok, why = True, f"{n - stop_rows} row(s) do not train the stop token (truncated rows lose it)"
    else:
        ok, why = True, "every row trains the stop token"
    if pad_is_eos:
        why += "; PAD is EOS, but padding is masked by position, so EOS stays trained"
    audit = AuditReport(rows=n, trainable_rows_fraction=trainable_rows / len(records) if records else 0.0,
                        stop_token_trained_fraction=stop_frac, roundtrip_fraction=roundtrip / n if n else 0.0,
                        eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, pad_is_eos=pad_is_eos,
                        chat_template_source=template_source, passed=ok, explanation=why)
    return kept, stats, audit, facts


def _turns_end_with(ids: list[int], mask: list[int], eos_id: Optional[int], window: int = 3) -> bool:
    """True when every contiguous trained run has the EOS id among its last `window` tokens."""
    if eos_id is None:
        return False
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return bool(runs) and all(eos_id in ids[max(s, e - window):e] for s, e in runs)


class RejectedRows(BaseModel):
    """Every row the user gave that was not accepted, as its original text, with file, line and reasons."""

    rows: list[RejectedRow]
