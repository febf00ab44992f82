"""What validation found, as the validate step stores it and `lorapipe validate --json` prints it: the report (row
counts, every problem with file and line, token statistics, the learns-to-stop audit, the Great Expectations suite,
a classifier's label set, the verdict), the rejected rows as the user wrote them, and the error that stops a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, Field

from lorapipe.data.expectations import ExpectationsReport
from lorapipe.data.records import Problem, Record

if TYPE_CHECKING:
    from array import array


class TokenStats(BaseModel):
    rows: int
    p50: float
    p95: float
    max: int
    total_tokens: int
    trainable_tokens: int
    truncated_rows: int = 0
    padding_waste: list["PaddingWaste"] = Field(
        default_factory=list, description="Fraction of padded slots at each micro-batch size the plan may choose")
    histogram: list[list[float]] = Field(default_factory=list, description="[bin start, rows] pairs of token lengths")


    def padding_at(self, micro_batch_size: int) -> Optional["PaddingWaste"]:
        return next((p for p in self.padding_waste if p.micro_batch_size == micro_batch_size), None)


class PaddingWaste(BaseModel):
    """The share of a padded batch's slots that would be padding, batching the rows `micro_batch_size` at a time."""

    micro_batch_size: int
    in_order: float = Field(description="batches in file order")
    length_grouped: float = Field(description="batches grouped by length (train.group_by_length)")

    def summary(self) -> str:
        return (f"{self.in_order:.1%} in order, {self.length_grouped:.1%} length-grouped (micro-batch "
                f"{self.micro_batch_size})")


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


class PreferenceData(BaseModel):
    """task: preference: what the accepted rows hold: pairs, or unpaired feedback by label, and what the pair checks
    found across rows."""

    pairs: int = Field(0, description="accepted chosen/rejected pairs")
    desirable: int = Field(0, description="accepted unpaired answers labelled desirable (KTO)")
    undesirable: int = Field(0, description="accepted unpaired answers labelled undesirable (KTO)")
    prompts: int = Field(0, description="distinct prompts among the rows read")
    contradictions: int = Field(0, description="pairs whose reverse (the same prompt, chosen and rejected swapped) "
                                               "came earlier: rejected")
    identical_after_truncation: int = Field(0, description="pairs whose two sides are the same tokens once cut to "
                                                           "train.max_seq_length: rejected")
    length_keeping_them: Optional[int] = Field(None, description="the train.max_seq_length at which every such pair "
                                                                 "keeps a difference")

    def summary(self) -> str:
        kinds = (f"{self.pairs} pairs" if self.pairs or not (self.desirable or self.undesirable) else
                 f"{self.desirable} desirable and {self.undesirable} undesirable answers (unpaired, KTO)")
        cut = (f"; {self.identical_after_truncation} pair(s) identical once cut (max_seq_length "
               f"{self.length_keeping_them} keeps them)" if self.identical_after_truncation else "")
        return (f"preference data: {kinds} over {self.prompts} prompts; {self.contradictions} contradictory "
                f"pair(s){cut}")


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


class ReasoningData(BaseModel):
    """Reasoning traces in the data (`reasoning_content`, or `<think>...</think>` before an answer) and what training
    does with them, checked with the model's own template."""

    setting: str = Field(description="data.reasoning: keep or drop")
    rows: int = Field(0, description="rows with at least one trace")
    traces: int = Field(0, description="assistant turns with a trace")
    trained: int = Field(0, description="keep: traces inside the labels as the template renders the rows")
    lost: int = Field(0, description="keep: traces the template leaves out (history turns, or every turn)")
    leaked: int = Field(0, description="drop: traces found inside the labels anyway (must be 0)")
    template_reads_field: bool = Field(False, description="the template renders reasoning_content itself; otherwise "
                                                          "traces go back into the content as <think>...</think>")

    def summary(self) -> str:
        if self.setting == "drop":
            return (f"reasoning: {self.traces} trace(s) in {self.rows} row(s), dropped (data.reasoning: drop); "
                    f"{self.leaked} found in the labels")
        return (f"reasoning: {self.traces} trace(s) in {self.rows} row(s), kept; {self.trained} trained, "
                f"{self.lost} left out by the chat template")


class TemplateInfo(BaseModel):
    """The chat template every render of the run uses (training, evaluation, predict, serving files)."""

    source: str = Field(description="builtin:<name>, config (a Jinja file or string), tokenizer or fallback")
    sha256: str = Field("", description="sha256 of the template text")
    kwargs: dict = Field(default_factory=dict, description="model.chat_template_kwargs")
    added_tokens: list[str] = Field(default_factory=list, description="special tokens a built-in template added to "
                                                                      "the vocabulary (their embeddings train)")
    tokenizer_size: int = 0


class SourceCounts(BaseModel):
    """One source of the data (a mixture's entry, or data.paths as one): what was read from it and what trains."""

    name: str
    files: list[str]
    sha256: str = Field("", description="file_fingerprint of its files' bytes")
    weight: Optional[float] = None
    max_rows: Optional[int] = None
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rows_sampled: int = Field(0, description="the accepted rows the run trains on (all of them unless the source "
                                             "has a weight or max_rows)")
    share: float = Field(0.0, description="its rows' share of the rows sampled")


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
    preference: Optional[PreferenceData] = None
    sources: list[SourceCounts] = []
    reasoning: Optional[ReasoningData] = None
    template: Optional[TemplateInfo] = None
    rows_sampled: Optional[int] = Field(None, description="a mixture: the rows drawn from the accepted ones (seeded); "
                                                          "the data fingerprint is theirs")
    passed: bool
    verdict: str

    def source_lines(self) -> list[str]:
        """The mixture: per source, rows read, accepted, rejected and sampled, and its share."""
        width = max(len(s.name) for s in self.sources)
        lines = [f"{'source'.ljust(width)}  weight  read  accepted  rejected  sampled  share"]
        for s in self.sources:
            weight = f"{s.weight:g}" if s.weight is not None else f"<={s.max_rows}" if s.max_rows else "all"
            lines.append(f"{s.name.ljust(width)}  {weight:>6}  {s.rows_read:4d}  {s.rows_accepted:8d}  "
                         f"{s.rows_rejected:8d}  {s.rows_sampled:7d}  {s.share:5.1%}")
        return lines

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
        if self.rows_sampled is not None or len(self.sources) > 1:
            lines += self.source_lines()
        if self.token_stats:
            t = self.token_stats
            waste = ", ".join(f"{p.micro_batch_size}: {p.in_order:.1%} / {p.length_grouped:.1%}"
                              for p in t.padding_waste)
            lines.append(f"tokens per row: p50 {t.p50:.0f}, p95 {t.p95:.0f}, max {t.max}; total {t.total_tokens}, "
                         f"trained {t.trainable_tokens}; padding waste in order / length-grouped by micro-batch "
                         f"{waste}")
        if self.classification:
            lines.append(self.classification.summary())
        if self.preference:
            lines.append(self.preference.summary())
        if self.reasoning:
            lines.append(self.reasoning.summary())
        if self.template and (self.template.added_tokens or self.template.source.startswith("builtin")):
            lines.append(f"chat template {self.template.source} (sha256 {self.template.sha256[:12]})"
                         + (f"; added tokens {', '.join(self.template.added_tokens)}, trained"
                            if self.template.added_tokens else ""))
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


class RejectedRows(BaseModel):
    """Every row the user gave that was not accepted, as its original text, with file, line and reasons."""

    rows: list[RejectedRow]


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
