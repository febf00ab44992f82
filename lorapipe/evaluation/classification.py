"""Classification scores for `task: classification`, computed by hand with scikit-learn's conventions (scikit-learn
is not a dependency), and the tables, confusion-matrix PNG and HTML page that show them.

Definitions (label ids are positions in `labels`, 0..n-1; every label counts, seen in the test rows or not):

- **precision / recall / f1** per class with `zero_division=0`: a class never predicted has precision 0, a class
  with no test rows has recall 0, and f1 is 0 whenever precision + recall is 0.
- **macro** averages: the unweighted mean over *all* labels, so a label with no test rows pulls the macro average
  down with its recall and f1 of 0 (scikit-learn's `classification_report(..., labels=range(n))`).
- **weighted** averages: weighted by each class's support (its number of test rows); weighted recall = accuracy.
- **confusion_matrix[t][p]**: rows whose true id is t and predicted id is p.
- **ece** (expected calibration error, top-label): rows binned by confidence (their highest probability) into
  `bins` equal-width bins (0, 1/bins], (1/bins, 2/bins], ... (confidence 0 in the first); the sum over bins of
  |accuracy - mean confidence| weighted by the bin's share of rows. A row is correct when the argmax of its
  probabilities (lowest id on ties) is its true id. None when no probabilities were given.
- **mean_confidence**: the mean of each row's highest probability.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel

CORNER = "true \\ predicted"  # the confusion matrix's top-left cell: what its rows and columns are
LABEL_WIDTH = 20  # text tables and PNG ticks cut longer label names to this many characters
ANNOTATE_UP_TO = 30  # the PNG writes counts in the cells up to this many labels; beyond, the cells are unreadable
# rows must sum to 1 within this: loose enough for half-precision softmax, tight enough to catch logits or scores
PROBABILITY_SUM_TOLERANCE = 1e-2


class ClassScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int  # test rows whose true label is this class


class ClassificationReport(BaseModel):
    labels: list[str]  # in id order: labels[i] is the name of id i
    rows: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]  # [true id][predicted id]
    ece: Optional[float] = None  # None without probabilities
    mean_confidence: Optional[float] = None

    def metrics(self) -> dict[str, float]:
        """The headline scores, flat, for promotion and the model registry."""
        out = {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "weighted_f1": self.weighted_f1,
               "macro_precision": self.macro_precision, "macro_recall": self.macro_recall}
        if self.ece is not None:
            out["ece"] = self.ece
        return out


# --- scores -----------------------------------------------------------------------------------------------------

def _as_id(value: Any) -> Optional[int]:
    """An integer id (Python, numpy or torch integer), or None for anything else (a float, a string)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _id_problems(name: str, values: Sequence[Any], n_labels: int) -> list[str]:
    bad = [(i, v) for i, v in enumerate(values) if (k := _as_id(v)) is None or not 0 <= k < n_labels]
    if not bad:
        return []
    shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
    return [f"{name}: {len(bad)} id(s) not an integer in 0..{n_labels - 1} ({n_labels} labels): {shown}"]


def _probability_problems(probabilities: Sequence[Sequence[float]], rows: int, n_labels: int) -> list[str]:
    if len(probabilities) != rows:
        return [f"probabilities: {len(probabilities)} rows but {rows} true ids"]
    wrong_width, bad_values, bad_sums = [], [], []
    for i, row in enumerate(probabilities):
        if len(row) != n_labels:
            wrong_width.append(f"row {i}: {len(row)}")
            continue
        values = [float(p) for p in row]
        # written as "not (0 <= p <= 1)" so that NaN is caught too
        if any(not (-1e-6 <= p <= 1 + 1e-6) for p in values):
            bad_values.append(f"row {i}")
        elif abs(sum(values) - 1.0) > PROBABILITY_SUM_TOLERANCE:
            bad_sums.append(f"row {i}: {sum(values):.4g}")
    problems = []
    for what, found in ((f"probabilities: rows must have one value per label ({n_labels})", wrong_width),
                        ("probabilities: values must lie in 0..1 (logits? apply softmax first)", bad_values),
                        (f"probabilities: rows must sum to 1 (within {PROBABILITY_SUM_TOLERANCE})", bad_sums)):
        if found:
            problems.append(f"{what}; {len(found)} row(s) do not: " + ", ".join(found[:5])
                            + (" ..." if len(found) > 5 else ""))
    return problems


def _top_label(probabilities: Sequence[Sequence[float]]) -> tuple[list[int], list[float]]:
    """Each row's argmax (lowest id on ties, as numpy's argmax) and its probability."""
    ids, confidences = [], []
    for row in probabilities:
        values = [float(p) for p in row]
        best = max(range(len(values)), key=lambda k: (values[k], -k))
        ids.append(best)
        confidences.append(values[best])
    return ids, confidences


def _ece(true: list[int], top_ids: list[int], confidences: list[float], bins: int) -> float:
    # upper edges k/bins computed exactly this way, so 0.7 meets the edge 7/10 (the same float) and lands in
    # (0.6, 0.7] rather than wherever ceil(0.7 * 10) rounding would put it
    uppers = [(k + 1) / bins for k in range(bins)]
    counts, correct, confidence = [0] * bins, [0] * bins, [0.0] * bins
    for t, p, c in zip(true, top_ids, confidences):
        b = min(bisect_left(uppers, c), bins - 1)  # number of upper edges below c; a hair over 1 stays in the last
        counts[b] += 1
        correct[b] += t == p
        confidence[b] += c
    n = len(true)
    return sum(abs(correct[b] / counts[b] - confidence[b] / counts[b]) * counts[b] / n
               for b in range(bins) if counts[b])


def expected_calibration_error(true: Sequence[int], probabilities: Sequence[Sequence[float]], bins: int = 10) -> float:
    """Top-label expected calibration error of `probabilities` (one row per true id, one column per label; see the
    module docstring for the binning)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not len(true):
        raise ValueError("expected_calibration_error: no rows")
    if len(probabilities) != len(true):
        raise ValueError(f"expected_calibration_error: {len(probabilities)} probability rows but {len(true)} true ids")
    width = len(probabilities[0])
    problems = _id_problems("true", true, width) + _probability_problems(probabilities, len(true), width)
    if problems:
        raise ValueError("expected_calibration_error: " + "; ".join(problems))
    top_ids, confidences = _top_label(probabilities)
    return _ece([operator.index(t) for t in true], top_ids, confidences, bins)


def classification_report(true: Sequence[int], predicted: Sequence[int], labels: list[str],
                          probabilities: Optional[Sequence[Sequence[float]]] = None) -> ClassificationReport:
    """Accuracy, per-class and averaged precision/recall/f1, the confusion matrix and (given probabilities) the
    calibration of label ids `predicted` against `true`, with scikit-learn's conventions (module docstring).

    Args:
        true: the true label id of each row.
        predicted: the predicted label id of each row, same length.
        labels: the label names in id order; every one is scored, seen in the rows or not.
        probabilities: optional, one row per true id and one column per label, each row summing to 1; gives
            `ece` and `mean_confidence`.

    Raises:
        ValueError: naming every problem found (lengths, ids out of range, probability rows), all at once.
    """
    n = len(labels)
    problems = []
    if not n:
        problems.append("labels: empty; need at least one label name")
    elif len(set(labels)) != n:
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        problems.append(f"labels: duplicate names {dupes}; each id needs its own name")
    if len(true) != len(predicted):
        problems.append(f"true has {len(true)} rows but predicted has {len(predicted)}")
    elif not len(true):
        problems.append("no rows to score: true and predicted are empty")
    if n:
        problems += _id_problems("true", true, n) + _id_problems("predicted", predicted, n)
        if probabilities is not None:
            problems += _probability_problems(probabilities, len(true), n)
    if problems:
        raise ValueError("classification_report: " + "; ".join(problems))

    true_ids = [operator.index(t) for t in true]
    predicted_ids = [operator.index(p) for p in predicted]
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(true_ids, predicted_ids):
        matrix[t][p] += 1
    rows = len(true_ids)
    per_class = {}
    for k, name in enumerate(labels):
        tp = matrix[k][k]
        support = sum(matrix[k])
        predicted_k = sum(matrix[t][k] for t in range(n))
        precision = tp / predicted_k if predicted_k else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = ClassScores(precision=precision, recall=recall, f1=f1, support=support)
    scores = list(per_class.values())

    def macro(field: str) -> float:
        return sum(getattr(s, field) for s in scores) / n

    def weighted(field: str) -> float:
        return sum(getattr(s, field) * s.support for s in scores) / rows

    ece = mean_confidence = None
    if probabilities is not None:
        top_ids, confidences = _top_label(probabilities)
        ece = _ece(true_ids, top_ids, confidences, 10)
        mean_confidence = sum(confidences) / rows
    return ClassificationReport(
        labels=list(labels), rows=rows, accuracy=sum(matrix[k][k] for k in range(n)) / rows,
        macro_precision=macro("precision"), macro_recall=macro("recall"), macro_f1=macro("f1"),
        weighted_precision=weighted("precision"), weighted_recall=weighted("recall"), weighted_f1=weighted("f1"),
        per_class=per_class, confusion_matrix=matrix, ece=ece, mean_confidence=mean_confidence)


def majority_baseline(train_counts: dict[str, int], true: Sequence[int], labels: list[str]) -> ClassificationReport:
    """The report of a model that always answers the most frequent training label (the earliest in `labels` on a
    tie) with the training label frequencies as its probabilities, so its ECE is defined too: the floor a tuned
    classifier has to clear.

    Args:
        train_counts: training rows per label name; a label missing here counts 0.
        true: the true label id of each test row.
        labels: the label names in id order.
    """
    unknown = sorted(set(train_counts) - set(labels))
    negative = sorted(k for k, v in train_counts.items() if v < 0)
    total = sum(max(0, train_counts.get(name, 0)) for name in labels)
    problems = []
    if unknown:
        problems.append(f"train_counts names labels not in labels: {unknown}")
    if negative:
        problems.append(f"train_counts has negative counts for {negative}")
    if not total:
        problems.append("train_counts: no training rows, so there is no majority label")
    if problems:
        raise ValueError("majority_baseline: " + "; ".join(problems))
    counts = [train_counts.get(name, 0) for name in labels]
    majority = counts.index(max(counts))  # index() finds the first, so a tie goes to the earlier label
    frequencies = [c / total for c in counts]
    return classification_report(true, [majority] * len(true), labels, [frequencies] * len(true))


# --- text tables ------------------------------------------------------------------------------------------------

def _short(label: str) -> str:
    return label if len(label) <= LABEL_WIDTH else label[:LABEL_WIDTH - 1] + "…"


def report_table(report: ClassificationReport, digits: int = 4) -> list[str]:
    """Lines in the layout of scikit-learn's `classification_report` (per class, accuracy, macro and weighted
    averages; ECE and mean confidence when known), then the confusion matrix with true labels as rows."""
    names = [_short(x) for x in report.labels]
    first = max([len(x) for x in names] + [len("weighted avg"), len(CORNER)])
    width = max(digits + 2, len("f1-score"))

    def line(name: str, *cells: str) -> str:
        return (f"{name:>{first}} " + " ".join(f"{c:>{width}}" for c in cells)).rstrip()

    def num(x: float) -> str:
        return f"{x:.{digits}f}"

    lines = [line("", "precision", "recall", "f1-score", "support"), ""]
    for name, scores in zip(names, report.per_class.values()):
        lines.append(line(name, num(scores.precision), num(scores.recall), num(scores.f1), str(scores.support)))
    lines += ["",
              line("accuracy", "", "", num(report.accuracy), str(report.rows)),
              line("macro avg", num(report.macro_precision), num(report.macro_recall), num(report.macro_f1),
                   str(report.rows)),
              line("weighted avg", num(report.weighted_precision), num(report.weighted_recall),
                   num(report.weighted_f1), str(report.rows))]
    if report.ece is not None:
        lines.append(line("ece", "", "", num(report.ece), ""))
    if report.mean_confidence is not None:
        lines.append(line("mean confidence", "", "", num(report.mean_confidence), ""))

    # each column as wide as its own name or largest count, so short labels keep the matrix narrow
    cells = [max([len(name)] + [len(str(row[p])) for row in report.confusion_matrix]) for p, name in enumerate(names)]
    lines += ["", f"{CORNER:<{first}} " + " ".join(f"{x:>{w}}" for x, w in zip(names, cells))]
    for name, row in zip(names, report.confusion_matrix):
        lines.append(f"{name:<{first}} " + " ".join(f"{c:>{w}}" for c, w in zip(row, cells)))
    return lines


def comparison_table(reports: dict[str, ClassificationReport], digits: int = 4) -> list[str]:
    """One line per model (e.g. majority, head only, tuned): accuracy, macro F1, weighted F1 and ECE."""
    headers = ["model", "accuracy", "macro F1", "weighted F1", "ECE"]
    rows = [[name, *(f"{x:.{digits}f}" if x is not None else "-"
                     for x in (r.accuracy, r.macro_f1, r.weighted_f1, r.ece))] for name, r in reports.items()]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    return [" ".join(f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}" for i, c in enumerate(row))
            for row in [headers, *rows]]


# --- figure and page --------------------------------------------------------------------------------------------

def _row_shares(matrix: list[list[int]]) -> list[list[float]]:
    """Each row divided by its total (a label with no test rows stays all 0): colour by recall, not by count, so
    a small class's mistakes show as plainly as a large one's."""
    return [[c / sum(row) if sum(row) else 0.0 for c in row] for row in matrix]


def confusion_matrix_png(report: ClassificationReport, path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG at `path` (folders created): true labels down, predicted across, colour = share
    of the true row, counts written in the cells up to `ANNOTATE_UP_TO` labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(report.labels)
    names = [_short(x) for x in report.labels]
    shares = _row_shares(report.confusion_matrix)
    side = min(3.0 + 0.45 * n, 24.0)  # inches; the cap keeps 100+ labels under ~3000 px at 120 dpi
    fig = Figure(figsize=(side + 1.2, side), dpi=120)  # the extra width is the colour bar's
    FigureCanvasAgg(fig)  # Agg through the object API: no pyplot state, safe in a step's thread
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's rows")
    if n <= ANNOTATE_UP_TO:
        font = 9 if n <= 12 else 7
        for t, row in enumerate(report.confusion_matrix):
            for p, count in enumerate(row):
                ax.text(p, t, str(count), ha="center", va="center", fontsize=font,
                        color="white" if shares[t][p] > 0.5 else "black")
    tick_font = 9 if n <= 30 else max(4, int(9 - (n - 30) / 10))
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    long_names = max(len(x) for x in names) > 3 or n > 12
    ax.set_xticklabels(names, fontsize=tick_font, rotation=45 if long_names else 0, ha="right" if long_names else
                       "center", rotation_mode="anchor")
    ax.set_yticklabels(names, fontsize=tick_font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _per_class_rows(report: ClassificationReport) -> list[list[Any]]:
    rows: list[list[Any]] = [[name, s.precision, s.recall, s.f1, s.support] for name, s in report.per_class.items()]
    rows += [["accuracy", None, None, report.accuracy, report.rows],
             ["macro avg", report.macro_precision, report.macro_recall, report.macro_f1, report.rows],
             ["weighted avg", report.weighted_precision, report.weighted_recall, report.weighted_f1, report.rows]]
    return rows


def _matrix_html(report: ClassificationReport) -> str:
    """The confusion matrix as a table whose cells are shaded by their share of the true row, like the PNG."""
    from lorapipe.html_report import esc

    head = f"<tr><th>{esc(CORNER)}</th>" + "".join(f"<th>{esc(x)}</th>" for x in report.labels) + "</tr>"
    body = []
    for name, row, shares in zip(report.labels, report.confusion_matrix, _row_shares(report.confusion_matrix)):
        cells = "".join(f'<td class="num" style="background:rgba(9,105,218,{s * 0.6:.3f})">{c:,}</td>'
                        for c, s in zip(row, shares))
        body.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return f'<div class="box"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def report_html(reports: dict[str, ClassificationReport], tuned: str = "tuned") -> str:
    """A self-contained page (inline CSS, the PNG as a data URI): every model's headline scores side by side, then
    the `tuned` model's per-class scores and confusion matrix.

    Args:
        reports: model name -> its report on the same test rows (e.g. majority, head only, tuned).
        tuned: the name in `reports` whose details the page shows.
    """
    import tempfile

    from lorapipe.html_report import image, page, paragraph, section, table

    if tuned not in reports:
        raise ValueError(f"report_html: tuned={tuned!r} is not among the reports {list(reports)}")
    report = reports[tuned]
    comparison = table(["model", "accuracy", "macro F1", "weighted F1", "ECE", "mean confidence", "rows"],
                       [[name, r.accuracy, r.macro_f1, r.weighted_f1, r.ece, r.mean_confidence, r.rows]
                        for name, r in reports.items()])
    with tempfile.TemporaryDirectory(prefix="lorapipe-confusion-") as tmp:
        png = confusion_matrix_png(report, Path(tmp) / "confusion_matrix.png", title=f"{tuned}: confusion matrix")
        png_bytes = png.read_bytes()
    return page(
        "Classification report",
        section("Models compared", comparison,
                paragraph("Same test rows for every model. ECE: expected calibration error over 10 confidence bins "
                          "(lower is better); — where the model gave no probabilities.", "muted")),
        section(f"{tuned}: per class", table(["label", "precision", "recall", "f1", "support"],
                                             _per_class_rows(report))),
        section(f"{tuned}: confusion matrix (rows: true label, columns: predicted)", _matrix_html(report),
                image(png_bytes, f"{tuned} confusion matrix")))
