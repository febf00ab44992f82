"""Validate a fine-tuning dataset: row checks, duplicates, the learns-to-stop audit, token statistics and a GE suite.

`validate_dataset` is what both the pipeline's validate step and `lorapipe validate` call, so they report the same
findings on the same file. It never raises for bad data: it returns every problem, the accepted records and the raw
text of every rejected row; the caller decides to fail (policy `on_bad_rows`). One streaming pass reads, normalises,
checks, de-duplicates (`DuplicateIndex`) and, with a tokenizer, audits every row (`lorapipe.data.token_audit`); the
verdict weighs what was found against the policies (`_verdict`). The report's types are in `report.py`, the Great
Expectations suite in `expectations.py`, the row types in `records.py`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from typing import Any, Iterator, Optional, Sequence

from lorapipe.data.expectations import run_suite
from lorapipe.data.formats import CONTROL_RE, PLACEHOLDER_RE, PREFERENCE_FORMATS, LabelFields, iter_records
from lorapipe.data.mixture import MixtureError, SourceInput, SourcePlan, draw, mixture_counts
from lorapipe.data.records import Problem, RawRow, Record, fingerprint_part
from lorapipe.data.report import (
    AuditReport,
    ClassificationData,
    DataValidationError,
    PreferenceData,
    ReasoningData,
    RejectedRow,
    RejectedRows,
    SourceCounts,
    TemplateInfo,
    ValidationOutcome,
    ValidationReport,
    label_order,
)
from lorapipe.data.token_audit import ClassificationTokenAudit, PreferenceTokenAudit, TokenAudit, row_facts

# Without a tokenizer a row's token count is unknown; a row this long (~25k tokens of English) is said, not passed
# silently: it is far over any usual sequence limit, and often two rows fused by a lost newline.
LONG_ROW_CHARS = 100_000
# the micro-batch sizes padding waste is reported at when the caller names none (train.max_micro_batch_size's default)
DEFAULT_MICRO_BATCH_SIZES = (1, 2, 4, 8)
__all__ = ["DataValidationError", "RejectedRows", "ValidationOutcome", "ValidationReport", "validate_dataset"]


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
    elif rec.chosen is not None:  # task: preference: the prompt, and the answer(s)
        contents = _check_preference(rec, problems)
    elif rec.text is not None:
        if not rec.text.strip():
            problems.append(Problem(src, line, "text", "empty or whitespace-only", "remove the row or fill it",
                                    "empty_response"))
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
                                    "fill the placeholder in (e.g. replace {{name}} by the assistant's name)",
                                    "placeholder"))
        c = CONTROL_RE.search(text)
        if c:
            problems.append(Problem(src, line, fld, f"control character U+{ord(c.group(0)):04X} at offset {c.start()}",
                                    "remove it (often a sign of a bad export or encoding)", "control_char",
                                    severity="warning"))


def _check_preference(rec: Record, problems: list[Problem]) -> list[tuple[str, str]]:
    """A preference row's own checks: the prompt, each side's answer, and a pair whose sides are the same answer.
    Returns the (field, text) of everything in it, for the checks every row gets."""
    src, line = rec.source, rec.line
    prompt_field = "conversations" if rec.format == "sharegpt_preference" else \
        "instruction/input" if rec.format == "alpaca_preference" else "prompt"
    contents = [(f"{prompt_field}[{i}]", m.get("content") or "") for i, m in enumerate(rec.messages)]
    no_prompt = not any(m["role"] == "user" and (m.get("content") or "").strip() for m in rec.messages)
    if no_prompt:
        problems.append(Problem(src, line, prompt_field, "no prompt: no user turn with text before the answers",
                                "write the prompt, or remove the row", "empty_prompt"))
    sides = [("chosen" if rec.desirable is None else "completion", rec.chosen)]
    if rec.rejected is not None:
        sides.append(("rejected", rec.rejected))
    for name, answer in sides:
        contents += [(f"{name}[{i}]" if len(answer) > 1 else name, m.get("content") or "")
                     for i, m in enumerate(answer)]
        if not "".join(m.get("content") or "" for m in answer if m["role"] == "assistant").strip():
            problems.append(Problem(src, line, name, "empty side: the answer is empty or whitespace-only",
                                    f"write the {name} answer, or remove the row", "empty_side"))
    if rec.rejected is not None and _answer_text(rec.chosen) == _answer_text(rec.rejected):
        problems.append(Problem(src, line, "chosen/rejected", "chosen and rejected are the same answer: the pair "
                                "teaches nothing", "fix one side, or remove the row", "identical_pair"))
    if not no_prompt:  # the conversation the chosen side trains: roles in order, ending with the answer
        chosen = rec.side("chosen")
        _check_roles(chosen, [m["role"] for m in chosen.messages], problems)
    return contents


def _answer_text(answer: Optional[list[dict]]) -> str:
    return "\x1e".join(" ".join(str(m.get("content") or "").split()) for m in answer or [])


class PairIndex:
    """task: preference: each prompt's pairs seen so far (digests of the two answers) and where: the same prompt with
    chosen and rejected swapped is a contradiction, rejected with the line it contradicts."""

    def __init__(self) -> None:
        self.seen: dict[tuple[bytes, bytes, bytes], tuple[str, int]] = {}  # 16-byte digests: bounded memory
        self.prompts: set[bytes] = set()

    def check(self, rec: Record) -> Optional[Problem]:
        prompt = bytes.fromhex(rec.prompt_key()[:32])
        self.prompts.add(prompt)
        if rec.rejected is None:
            return None
        chosen, rejected = (hashlib.sha256(_answer_text(a).encode()).digest()[:16] for a in (rec.chosen, rec.rejected))
        other = self.seen.get((prompt, rejected, chosen))
        if other is not None:
            where = f"line {other[1]}" if other[0] == rec.source else f"{other[0]}:{other[1]}"
            return Problem(rec.source, rec.line, "chosen/rejected", f"contradicts {where}: the same prompt with these "
                           "two answers the other way round", "keep the pair that is right and remove the other",
                           "contradictory_pair", other_line=other[1])
        self.seen.setdefault((prompt, chosen, rejected), (rec.source, rec.line))
        return None


def _check_roles(rec: Record, roles: list[str], problems: list[Problem]) -> None:
    src, line = rec.source, rec.line
    for i, r in enumerate(roles):
        if r == "system" and i != 0:
            problems.append(Problem(src, line, f"messages[{i}].role", "a system message after the first turn",
                                    "move the system message first", "role_order"))
            return
    turns = [r for r in roles if r != "system"]
    if not turns:
        problems.append(Problem(src, line, "messages", "no user or assistant turn", "add a user and an assistant turn",
                                "role_order"))
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
                                    "alternate user and assistant (tool results follow an assistant call)",
                                    "role_order"))
            return
        prev = r
    if turns[-1] != "assistant":
        problems.append(Problem(src, line, "messages", f"ends with {turns[-1]!r}, not a trainable assistant turn",
                                "end with the assistant's answer", "role_order"))


PROGRESS_MIN_BYTES = 8 << 20  # below this a file validates in about a second: no bar


def _progress_bar(paths: list[str]) -> Any:
    """A tqdm bar over the files' bytes (characters read, so a UTF-8 file may finish just short of 100%)."""
    import os

    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    if total < PROGRESS_MIN_BYTES:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="validating", leave=False, mininterval=0.5)


class DuplicateIndex:
    """Rows seen so far, by a 16-byte digest of their normalised content and where each was first seen (file and
    line packed in one integer): a million rows cost megabytes. A classifier's text seen again with another label is a
    conflict, not a duplicate."""

    def __init__(self, classifying: bool, label_key: str) -> None:
        self.classifying, self.label_key = classifying, label_key
        self.first_seen: dict[bytes, int] = {}  # digest -> (file index << 32 | line)
        self.first_label: dict[bytes, Optional[str]] = {}
        self.files: dict[str, int] = {}
        self.names: list[str] = []

    def check(self, rec: Record, digest: bytes) -> Optional[Problem]:
        """The problem of `rec` when its content was seen before, else None (and it is remembered)."""
        if rec.source not in self.files:
            self.files[rec.source] = len(self.names)
            self.names.append(rec.source)
        packed = self.first_seen.get(digest)
        if packed is None:
            self.first_seen[digest] = (self.files[rec.source] << 32) | rec.line
            if self.classifying:
                self.first_label[digest] = rec.label
            return None
        f_src, f_line = self.names[packed >> 32], packed & 0xFFFFFFFF
        where = f"line {f_line}" if f_src == rec.source else f"{f_src}:{f_line}"
        if self.classifying and self.first_label.get(digest) != rec.label:
            return Problem(rec.source, rec.line, self.label_key,
                           f"the same text as {where} with another label: {rec.label!r} here, "
                           f"{self.first_label.get(digest)!r} there",
                           "keep one label per text: fix the wrong one, or remove a copy", "conflicting_label",
                           other_line=f_line)
        return Problem(rec.source, rec.line, "(row)", f"exact duplicate of {where} (after whitespace normalisation)",
                       "remove one copy; both always land in the same split", "duplicate", severity="warning",
                       other_line=f_line)


# rows the tokenizer encodes at once (in its own threads): enough to keep every core busy, a few MB of rows held
AUDIT_BATCH = 512


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
    micro_batch_sizes: Sequence[int] = DEFAULT_MICRO_BATCH_SIZES,
    run_expectations: bool = True,
    keep_records: bool = True,
    group_key: Optional[str] = None,
    stratify_key: Optional[str] = None,
    progress: bool = False,
    label_fields: Optional[LabelFields] = None,
    max_class_imbalance: float = 10.0,
    kto_weights: tuple[float, float] = (1.0, 1.0),
    sources: Optional[list[SourceInput]] = None,
    mixture_rows: Optional[int] = None,
    seed: int = 0,
    reasoning: str = "keep",
) -> ValidationOutcome:
    """One streaming pass: read, normalise, check, de-duplicate and (with a tokenizer) audit every row.

    Memory is bounded by what is kept: the accepted records (`keep_records=False` keeps none, as
    `lorapipe validate` does), the problems, the rejected rows and one 16-byte digest per distinct row.
    `micro_batch_sizes`: the batch sizes padding waste is reported at (those the plan may choose).
    `progress`: a progress bar on stderr (by bytes read) when the files are large enough to wait for.
    `kto_weights`: train.preference (desirable_weight, undesirable_weight): KTO's balance is judged weighted.
    `sources`: a mixture (data.sources), each source read with its own format keys, counted apart, and (with a
    weight or max_rows) sampled by `seed` after validation (`lorapipe.data.mixture`; `mixture_rows` sizes it); None:
    `paths` read as one source.
    `reasoning`: data.reasoning: "drop" removes assistant turns' reasoning traces before anything else sees the row;
    either way the traces are counted and, with a tokenizer, checked in the labels as the template renders them.
    """
    traces = ReasoningData(setting=reasoning)
    if sources is None:
        sources = [SourceInput(SourcePlan(", ".join(paths)), list(paths))]
    paths = [f for src in sources for f in src.files]
    source_of = {f: i for i, src in enumerate(sources) for f in src.files}
    read_by, accepted_by, rejected_by = [0] * len(sources), [0] * len(sources), [0] * len(sources)
    kept_keys: list[str] = []  # each kept row's content key: a mixture's draw ranks rows by it
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    rejected: dict[tuple[str, int], RejectedRow] = {}
    kept: list[Record] = []
    fingerprint = hashlib.sha256()
    classifying = fmt == "classification"
    duplicates = DuplicateIndex(classifying, label_fields.label_key if label_fields else "label")
    preference = fmt in PREFERENCE_FORMATS
    pairs = PairIndex() if preference else None
    preference_counts: Counter = Counter()
    audit_cls = ClassificationTokenAudit if classifying else PreferenceTokenAudit if preference else TokenAudit
    audit = audit_cls(tokenizer, max_seq_length, overlength) if tokenizer is not None else None
    chat_template_source = getattr(tokenizer, "lorapipe_chat_template_source", chat_template_source)
    facts: dict[str, array] = {}  # columnar: a million rows of facts cost megabytes, not a dict per row
    rows_read = n_kept = 0
    label_counts: Counter = Counter()

    def reject(row: RawRow | Record, reasons: list[str]) -> None:
        key = (row.source, row.line)
        if key not in rejected:
            rejected[key] = RejectedRow(source=row.source, line=row.line, raw=row.raw, reasons=[])
            rejected_by[source_of.get(row.source, 0)] += 1
        rejected[key].reasons.extend(reasons)

    def accept(rec: Record, key: str, row_facts_: dict) -> None:
        nonlocal n_kept
        rec.raw = ""  # accepted rows live on in normalised form; raw text is kept only for rejected rows
        n_kept += 1
        accepted_by[source_of.get(rec.source, 0)] += 1
        if classifying:
            label_counts[rec.label] += 1
        if preference:
            preference_counts["pairs" if rec.rejected is not None else
                              "desirable" if rec.desirable else "undesirable"] += 1
        fingerprint.update(fingerprint_part(rec, key))
        for name, value in row_facts_.items():
            facts.setdefault(name, array("q")).append(value)
        if keep_records:
            kept.append(rec)
            kept_keys.append(key)

    # Rows wait here, in file order, until AUDIT_BATCH of them need the tokenizer: it encodes a batch in its own
    # threads. Each entry: the problems reading it found, the raw row, and (record, key, its checks' problems,
    # their errors) when it was read; everything is then said and decided in file order, as one by one.
    pending: list[tuple[list[Problem], RawRow, Optional[tuple[Record, str, list[Problem], list[str]]]]] = []
    read_problems: list[Problem] = []

    def flush() -> None:
        audited = [p for _, _, p in pending if p is not None and not p[3]]
        results = iter(audit.add_batch([a[0] for a in audited], [a[2] for a in audited])) if audit else iter(())
        for before, row, parsed in pending:
            problems.extend(before)
            if parsed is None:
                reject(row, [p.code for p in row.problems])
                continue
            rec, key, found, errors = parsed
            row_facts_ = row_facts(rec)
            if not errors and audit is not None:
                errors, row_facts_ = next(results)
            problems.extend(found)
            if errors:
                reject(rec, errors)
            else:
                accept(rec, key, row_facts_)
        pending.clear()

    bar = _progress_bar(paths) if progress else None
    for index, row, rec, row_prompt_key, row_completion_key in _source_rows(
            sources, fmt, prompt_key, completion_key, read_problems, formats, group_key,
            None if classifying else stratify_key, label_fields):
        rows_read += 1
        read_by[index] += 1
        before, read_problems[:] = list(read_problems), []
        if bar is not None:
            bar.update(len(row.raw) + 1)
        if rec is None:
            pending.append((before, row, None))
        else:
            found: list[Problem] = []  # this row's problems from the checks below
            _reasoning(rec, reasoning, tokenizer, traces)
            check_record(rec, found, row_prompt_key, row_completion_key)
            key = rec.content_key()
            seen = duplicates.check(rec, bytes.fromhex(key[:32]))
            if seen is not None:
                found.append(seen)
            contradiction = pairs.check(rec) if pairs is not None and not seen else None
            if contradiction is not None:
                found.append(contradiction)
            if audit is None and len(row.raw) > LONG_ROW_CHARS:
                found.append(Problem(rec.source, rec.line, "(row)", f"{len(row.raw):,} characters",
                                     "check it is meant to be one row; give --model (or train with it) to count its "
                                     "tokens against the sequence limit", "long_row", severity="warning"))
            pending.append((before, row, (rec, key, found, [p.code for p in found if p.severity == "error"])))
        if len(pending) >= AUDIT_BATCH:
            flush()
    flush()
    problems.extend(read_problems)  # what reading found after the last row (a file's own problems)
    if bar is not None:
        bar.close()

    reasoning_data = _reasoning_verdict(traces, tokenizer, problems)
    rows_sampled, sampled_by = None, list(accepted_by)
    if any(src.mixes for src in sources):
        try:
            sampled_by = mixture_counts([src.plan for src in sources], accepted_by, mixture_rows)
        except MixtureError as exc:
            problems.append(Problem(DATASET, 0, "data.sources", exc.message, exc.fix, "mixture_too_large"))
        else:
            rows_sampled = sum(sampled_by)
            if keep_records:
                kept, kept_keys, facts, fingerprint = _draw(kept, kept_keys, facts, source_of, sampled_by, seed)
    total_sampled = sum(sampled_by) or 1
    source_counts = [SourceCounts(name=src.plan.name, files=src.files, sha256=src.sha256, weight=src.plan.weight,
                                  max_rows=src.plan.max_rows, rows_read=read_by[i], rows_accepted=accepted_by[i],
                                  rows_rejected=rejected_by[i], rows_sampled=sampled_by[i],
                                  share=round(sampled_by[i] / total_sampled, 6))
                     for i, src in enumerate(sources)]

    token_stats = audit_report = None
    if audit is not None:
        token_stats, audit_report = audit.finish(micro_batch_sizes, chat_template_source)
    classification = None
    if classifying:
        classification = _classification_data(label_counts, label_fields, max_class_imbalance, min_rows, problems)
        if keep_records:
            facts["label_id"] = array("q", [classification.label2id[r.label] for r in kept])
    preference_data = None
    if preference:
        preference_data = _preference_data(preference_counts, pairs, audit, problems, kto_weights)
    expectations = None
    if run_expectations and facts:
        expectations = run_suite(facts, max_seq_length if tokenizer is not None else None, min_rows)
    verdicts = _verdict(problems, len(rejected), rows_read, n_kept, on_bad_rows, max_bad_fraction, min_rows,
                        audit_report, classification, label_counts)
    if expectations is not None and not expectations.success:
        verdicts.append(f"expectation suite failed: {', '.join(expectations.failed)}")

    report = ValidationReport(
        files=formats,
        data_fingerprint=fingerprint.hexdigest(),
        rows_read=rows_read,
        rows_accepted=n_kept,
        rows_rejected=len(rejected),
        errors=sum(p.severity == "error" for p in problems),
        warnings=sum(p.severity != "error" for p in problems),
        problem_counts=dict(Counter(p.code for p in problems)),
        problems=problems,
        token_stats=token_stats,
        audit=audit_report,
        expectations=expectations,
        classification=classification,
        preference=preference_data,
        sources=source_counts,
        reasoning=reasoning_data,
        template=_template_info(tokenizer),
        rows_sampled=rows_sampled,
        passed=not verdicts,
        verdict="PASSED" if not verdicts else "FAILED: " + "; ".join(verdicts),
    )
    return ValidationOutcome(kept, sorted(rejected.values(), key=lambda r: (r.source, r.line)), report, facts)


def _template_info(tokenizer: Any) -> Optional[TemplateInfo]:
    if tokenizer is None or not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    from lorapipe.data.render import template_record

    record = template_record(tokenizer)
    return TemplateInfo(source=record["chat_template_source"], sha256=record["chat_template_sha256"],
                        kwargs=record["chat_template_kwargs"], added_tokens=record["added_tokens"],
                        tokenizer_size=len(tokenizer))


def _reasoning(rec: Record, setting: str, tokenizer: Any, found: ReasoningData) -> None:
    """Count a row's reasoning traces; drop them (data.reasoning: drop); with a tokenizer, check each against the
    labels as the template renders the row (kept: inside its turn's trained text; dropped: nowhere)."""
    turns = [m for part in (rec.messages, rec.chosen, rec.rejected) for m in part or () if m.get("reasoning_content")]
    if not turns:
        return
    found.rows += 1
    found.traces += len(turns)
    dropped = [m.pop("reasoning_content") for m in turns] if setting == "drop" else []
    if tokenizer is None or rec.text is not None:
        return
    from lorapipe.data.render import RenderError, reasoning_coverage, template_reads_reasoning, trained_turns

    found.template_reads_field = template_reads_reasoning(tokenizer)
    sides = [rec] if rec.chosen is None else [rec.side("chosen")] + ([rec.side("rejected")] if rec.rejected else [])
    try:
        for side in sides:
            if dropped:
                labels = "\n".join(trained_turns(tokenizer, side))
                found.leaked += sum(1 for trace in dropped if trace.strip() in labels)
            else:
                n, trained = reasoning_coverage(tokenizer, side)
                found.trained += trained
                found.lost += n - trained
    except RenderError:  # the row's own problem, said by the token audit
        return


def _reasoning_verdict(found: ReasoningData, tokenizer: Any, problems: list[Problem]) -> Optional[ReasoningData]:
    """The data's reasoning, and its problems: a template that trains none or only some of the kept traces, or a
    dropped trace still inside the labels."""
    if not found.traces:
        return None
    if tokenizer is None:
        return found
    if found.setting == "keep" and found.lost and not found.trained:
        problems.append(Problem(
            DATASET, 0, "reasoning", f"the chat template trains none of the {found.lost} reasoning trace(s) "
            "data.reasoning: keep asks for (it renders no reasoning: DeepSeek-R1's template strips every "
            "<think> block)", "set model.chat_template to a template that renders reasoning_content (e.g. "
            "Qwen3's), or data.reasoning: drop to train the answers alone", "reasoning_not_trained"))
    elif found.setting == "keep" and found.lost:
        problems.append(Problem(
            DATASET, 0, "reasoning", f"the chat template leaves {found.lost} of {found.lost + found.trained} "
            "reasoning trace(s) out of the labels: it strips the reasoning of turns before the last question (as "
            "Qwen3's template does, the way it serves them)", "to train every trace, give each traced turn as the "
            "last turn of a row of its own, or set model.chat_template to a template that renders every turn's "
            "reasoning_content; data.reasoning: drop trains the answers alone", "reasoning_lost_in_history",
            severity="warning"))
    if found.leaked:
        problems.append(Problem(
            DATASET, 0, "reasoning", f"{found.leaked} dropped reasoning trace(s) are inside the labels anyway (the "
            "answer's text repeats them, or the template writes them)", "remove the traces from the answers, or "
            "set data.reasoning: keep", "reasoning_leaked"))
    return found


def _source_rows(sources: list[SourceInput], fmt: str, prompt_key: str, completion_key: str,
                 problems: list[Problem], formats: dict[str, str], group_key: Optional[str],
                 label_key: Optional[str], label_fields: Optional[LabelFields]) -> Iterator[tuple]:
    """(source index, raw row, record or None, its prompt key, its completion key) over every source's files, each
    read with its own format keys (unset: the data section's)."""
    for index, src in enumerate(sources):
        keys = (src.prompt_key or prompt_key, src.completion_key or completion_key)
        for row, rec in iter_records(src.files, src.fmt or fmt, *keys, problems, formats, group_key, label_key,
                                     label_fields):
            yield index, row, rec, *keys


def _draw(kept: list[Record], keys: list[str], facts: dict[str, array], source_of: dict[str, int],
          counts: list[int], seed: int) -> tuple[list[Record], list[str], dict[str, array], Any]:
    """The mixture's rows (each source's `counts[i]` rows of lowest seeded rank, in file order), their keys and facts,
    and the fingerprint of what trains."""
    by_source: dict[int, list[int]] = {}
    for i, rec in enumerate(kept):
        by_source.setdefault(source_of.get(rec.source, 0), []).append(i)
    chosen = sorted(members[j] for s, members in by_source.items()
                    for j in draw([keys[m] for m in members], counts[s], seed))
    fingerprint = hashlib.sha256()
    for i in chosen:
        fingerprint.update(fingerprint_part(kept[i], keys[i]))
    return ([kept[i] for i in chosen], [keys[i] for i in chosen],
            {name: array(values.typecode, (values[i] for i in chosen)) for name, values in facts.items()}, fingerprint)


def _verdict(problems: list[Problem], n_rejected: int, rows_read: int, n_kept: int, on_bad_rows: str,
             max_bad_fraction: float, min_rows: int, audit: Optional[AuditReport],
             classification: Optional[ClassificationData], label_counts: Counter) -> list[str]:
    """Why the data fails, one reason each (empty: it passes), against validation's policies."""
    errors = [p for p in problems if p.severity == "error"]
    bad_fraction = n_rejected / rows_read if rows_read else 1.0
    verdicts = []
    if any(p.line == 0 and p.source != DATASET for p in errors):
        verdicts.append("a data file is missing, empty or unreadable")
    verdicts += [f"the data as a whole: {p.message} ({p.fix})" for p in errors if p.source == DATASET]
    if any(p.line != 0 for p in errors) and on_bad_rows == "fail":
        verdicts.append(f"{n_rejected} row(s) rejected and validation.on_bad_rows is 'fail' "
                        "(set it to 'quarantine' to train on the rest; rejected rows are kept as an artifact)")
    elif bad_fraction > max_bad_fraction and on_bad_rows == "quarantine":
        verdicts.append(f"{bad_fraction:.1%} of rows rejected, above validation.max_bad_fraction={max_bad_fraction}")
    if n_kept < min_rows:
        verdicts.append(f"only {n_kept} usable row(s); validation.min_rows is {min_rows}")
    if audit is not None and not audit.passed:
        verdicts.append(audit.explanation)
    if classification is not None and n_kept and len([c for c in classification.counts.values() if c]) < 2:
        verdicts.append(f"every accepted row has the label {next(iter(label_counts))!r}: a classifier needs at least "
                        "two labels with rows")
    return verdicts


DATASET = "(dataset)"  # where a problem of the whole dataset (not one row) is said to be
# KTO's desirable/undesirable balance: TRL advises desirable_weight x desirable / (undesirable_weight x undesirable)
# between 1 and 4/3; outside this wider band the data is said to be unbalanced
KTO_BALANCE = (0.5, 2.0)


def _preference_data(counts: Counter, pairs: "PairIndex", audit: Any, problems: list[Problem],
                     kto_weights: tuple[float, float] = (1.0, 1.0)) -> PreferenceData:
    """task: preference: the counts the report carries, and the data's own problems (unpaired feedback of one kind
    only; a KTO set unbalanced once train.preference's desirable and undesirable weights are applied)."""
    data = PreferenceData(pairs=counts["pairs"], desirable=counts["desirable"], undesirable=counts["undesirable"],
                          prompts=len(pairs.prompts),
                          contradictions=sum(p.code == "contradictory_pair" for p in problems),
                          identical_after_truncation=getattr(audit, "identical_after_cut", 0),
                          length_keeping_them=getattr(audit, "length_keeping_them", None))
    good, bad = data.desirable, data.undesirable
    if good + bad and data.pairs:
        problems.append(Problem(DATASET, 0, "(dataset)", f"{data.pairs} pairs and {good + bad} unpaired answers in one "
                                "data set", "train pairs (DPO, ORPO) or unpaired feedback (KTO), one kind per run",
                                "mixed_preference_kinds"))
    elif good + bad and (not good or not bad):
        kind = "desirable" if good else "undesirable"
        problems.append(Problem(DATASET, 0, "label", f"every unpaired answer is {kind}: KTO needs both kinds",
                                f"add answers labelled {'false' if good else 'true'}", "one_sided_feedback"))
    elif good + bad and not KTO_BALANCE[0] <= (kto_weights[0] * good) / (kto_weights[1] * bad) <= KTO_BALANCE[1]:
        desirable_weight, undesirable_weight = kto_weights
        weighted = (desirable_weight * good) / (undesirable_weight * bad)
        fix = undesirable_weight * bad / good  # the desirable weight that makes the weighted ratio 1
        problems.append(Problem(
            DATASET, 0, "label", f"{good} desirable and {bad} undesirable answers, {weighted:.2f}:1 with "
            f"desirable_weight {desirable_weight:g} and undesirable_weight {undesirable_weight:g}",
            f"set train.preference.desirable_weight: {fix:.2f} (TRL advises desirable weight x desirable / "
            "(undesirable weight x undesirable) between 1 and 4/3), or rebalance the data", "unbalanced_feedback",
            severity="warning"))
    return data




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
