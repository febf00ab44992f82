"""Classification scores on hand-made predictions whose expected values are worked out by hand in the comments
(scikit-learn's conventions, zero_division=0), the calibration error on a tiny case, the majority baseline, input
errors, and the text tables, PNG and HTML page that show a report."""

import pytest

from lorapipe.evaluation.classification import (
    ClassificationReport,
    classification_report,
    comparison_table,
    confusion_matrix_png,
    expected_calibration_error,
    majority_baseline,
    report_html,
    report_table,
)

LABELS = ["cat", "dog", "bird"]
# 10 rows: 4 cat, 3 dog, 3 bird
TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
# confusion matrix (row = true, column = predicted):
#   cat:  2 cat, 1 dog, 1 bird   -> [2, 1, 1]
#   dog:  1 cat, 2 dog, 0 bird   -> [1, 2, 0]
#   bird: 0 cat, 1 dog, 2 bird   -> [0, 1, 2]
# predicted totals (column sums): cat 3, dog 4, bird 3; correct = 2 + 2 + 2 = 6 -> accuracy 0.6
# cat:  P = 2/3, R = 2/4,  F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 1 + 2) = 4/7
# dog:  P = 2/4, R = 2/3,  F1 = 4 / (4 + 2 + 1) = 4/7
# bird: P = 2/3, R = 2/3,  F1 = 4 / (4 + 1 + 1) = 2/3
# macro P = (2/3 + 1/2 + 2/3) / 3 = 11/18; macro R = (1/2 + 2/3 + 2/3) / 3 = 11/18
# macro F1 = (4/7 + 4/7 + 2/3) / 3 = 38/63
# weighted (supports 4, 3, 3): P = (4*2/3 + 3*1/2 + 3*2/3) / 10 = 37/60; R = (2 + 2 + 2) / 10 = 0.6
#                              F1 = (4*4/7 + 3*4/7 + 3*2/3) / 10 = (4 + 2) / 10 = 0.6


@pytest.fixture(scope="module")
def report() -> ClassificationReport:
    return classification_report(TRUE, PRED, LABELS)


def test_scores_on_three_labels(report):
    assert report.rows == 10
    assert report.labels == LABELS
    assert report.confusion_matrix == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert report.accuracy == pytest.approx(0.6)
    expected = {"cat": (2 / 3, 1 / 2, 4 / 7, 4), "dog": (1 / 2, 2 / 3, 4 / 7, 3), "bird": (2 / 3, 2 / 3, 2 / 3, 3)}
    for name, (precision, recall, f1, support) in expected.items():
        scores = report.per_class[name]
        assert (scores.precision, scores.recall, scores.f1) == pytest.approx((precision, recall, f1)), name
        assert scores.support == support
    assert report.macro_precision == pytest.approx(11 / 18)
    assert report.macro_recall == pytest.approx(11 / 18)
    assert report.macro_f1 == pytest.approx(38 / 63)
    assert report.weighted_precision == pytest.approx(37 / 60)
    assert report.weighted_recall == pytest.approx(0.6)
    assert report.weighted_f1 == pytest.approx(0.6)
    assert report.ece is None and report.mean_confidence is None
    assert report.metrics() == pytest.approx({"accuracy": 0.6, "macro_f1": 38 / 63, "weighted_f1": 0.6,
                                              "macro_precision": 11 / 18, "macro_recall": 11 / 18})


def test_a_class_never_predicted_and_a_class_never_seen():
    # labels a, b, c, d; c has one true row and is never predicted; d has no true row but is predicted once
    true = [0, 0, 1, 1, 2]
    pred = [0, 3, 1, 1, 1]
    # matrix: a [1, 0, 0, 1]; b [0, 2, 0, 0]; c [0, 1, 0, 0]; d [0, 0, 0, 0]; predicted totals a 1, b 3, c 0, d 1
    # a: P = 1/1, R = 1/2, F1 = 2 / (2 + 0 + 1) = 2/3
    # b: P = 2/3, R = 2/2, F1 = 4 / (4 + 1 + 0) = 4/5
    # c: never predicted -> P = 0 (zero division), R = 0/1, F1 = 0
    # d: no support -> P = 0/1, R = 0 (zero division), F1 = 0; still counts in the macro average
    # accuracy 3/5; macro P = (1 + 2/3) / 4 = 5/12; macro R = (1/2 + 1) / 4 = 3/8; macro F1 = (2/3 + 4/5) / 4 = 11/30
    # weighted F1 (supports 2, 2, 1, 0) = (2*2/3 + 2*4/5) / 5 = 44/75
    r = classification_report(true, pred, ["a", "b", "c", "d"])
    assert r.confusion_matrix == [[1, 0, 0, 1], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert r.accuracy == pytest.approx(0.6)
    assert (r.per_class["c"].precision, r.per_class["c"].recall, r.per_class["c"].f1) == (0.0, 0.0, 0.0)
    assert r.per_class["c"].support == 1
    assert (r.per_class["d"].precision, r.per_class["d"].recall, r.per_class["d"].f1) == (0.0, 0.0, 0.0)
    assert r.per_class["d"].support == 0
    assert r.per_class["a"].f1 == pytest.approx(2 / 3)
    assert r.per_class["b"].f1 == pytest.approx(4 / 5)
    assert r.macro_precision == pytest.approx(5 / 12)
    assert r.macro_recall == pytest.approx(3 / 8)
    assert r.macro_f1 == pytest.approx(11 / 30)
    assert r.weighted_f1 == pytest.approx(44 / 75)


# 4 rows, 2 labels: (probabilities, true id)
#   [0.90, 0.10] true 0: confidence 0.90, bin (0.8, 0.9], correct
#   [0.75, 0.25] true 0: confidence 0.75, bin (0.7, 0.8], correct
#   [0.30, 0.70] true 1: confidence 0.70, bin (0.6, 0.7] (right edge belongs to the bin), correct
#   [0.25, 0.75] true 0: confidence 0.75, bin (0.7, 0.8], wrong (argmax 1)
# (0.8, 0.9]: 1 row, |1 - 0.9|    = 0.1  x 1/4 = 0.025
# (0.7, 0.8]: 2 rows, |1/2 - 0.75| = 0.25 x 2/4 = 0.125
# (0.6, 0.7]: 1 row, |1 - 0.7|    = 0.3  x 1/4 = 0.075
# ECE = 0.225 (0.7 put in (0.7, 0.8] instead would give 0.025 + |2/3 - 2.2/3| x 3/4 = 0.075)
# mean confidence = (0.9 + 0.75 + 0.7 + 0.75) / 4 = 0.775
PROBS = [[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.25, 0.75]]
PROBS_TRUE = [0, 0, 1, 0]


def test_expected_calibration_error_by_hand():
    assert expected_calibration_error(PROBS_TRUE, PROBS) == pytest.approx(0.225)
    # one bin: |accuracy - mean confidence| = |3/4 - 0.775| = 0.025
    assert expected_calibration_error(PROBS_TRUE, PROBS, bins=1) == pytest.approx(0.025)
    r = classification_report(PROBS_TRUE, [0, 0, 1, 1], ["no", "yes"], PROBS)
    assert r.ece == pytest.approx(0.225)
    assert r.mean_confidence == pytest.approx(0.775)
    assert r.metrics()["ece"] == pytest.approx(0.225)


def test_majority_baseline_predicts_the_training_majority():
    # training: dog is the majority (12 of 20); test rows: cat, dog, bird, dog -> dog is 2 of 4
    r = majority_baseline({"cat": 5, "dog": 12, "bird": 3}, [0, 1, 2, 1], LABELS)
    assert r.confusion_matrix == [[0, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert r.accuracy == pytest.approx(2 / 4)  # the test share of dog
    assert r.per_class["cat"].precision == 0.0 and r.per_class["dog"].recall == 1.0
    # probabilities are the training frequencies [0.25, 0.6, 0.15]: every row has confidence 0.6 in (0.5, 0.6],
    # accuracy 0.5 -> ECE = |0.5 - 0.6| = 0.1
    assert r.ece == pytest.approx(0.1)
    assert r.mean_confidence == pytest.approx(0.6)


def test_majority_baseline_tie_goes_to_the_earlier_label():
    # dog and cat tie at 4 (dog listed first in the counts); cat comes first in the label order
    r = majority_baseline({"dog": 4, "cat": 4, "bird": 1}, [1, 1, 2], LABELS)
    assert [row[0] for row in r.confusion_matrix] == [0, 2, 1]  # every row predicted as cat (column 0)
    assert r.accuracy == 0.0


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 rows but predicted has 2"):
        classification_report([0, 1, 2], [0, 1], LABELS)
    # every problem at once: an id out of range in true and a probability row of the wrong width
    with pytest.raises(ValueError) as caught:
        classification_report([0, 3], [0, 1], LABELS, [[1.0, 0.0, 0.0], [0.5, 0.5]])
    message = str(caught.value)
    assert "true" in message and "row 1: 3" in message and "0..2" in message
    assert "one value per label (3)" in message
    with pytest.raises(ValueError, match="sum to 1"):
        classification_report([0, 1], [0, 1], LABELS, [[0.5, 0.2, 0.1], [0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="softmax"):  # logits passed for probabilities
        classification_report([0, 1], [0, 1], LABELS, [[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="predicted.*1.5"):
        classification_report([0, 1], [0, 1.5], LABELS)
    with pytest.raises(ValueError, match="no rows"):
        classification_report([], [], LABELS)
    with pytest.raises(ValueError, match="not in labels.*fish"):
        majority_baseline({"fish": 3}, [0], LABELS)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(PROBS_TRUE, PROBS, bins=0)


def test_report_table_shows_labels_numbers_and_matrix(report):
    text = "\n".join(report_table(report))
    for name in LABELS:
        assert name in text
    assert "0.6667" in text and "0.5714" in text and "0.6032" in text  # bird P, cat F1, macro F1
    assert "macro avg" in text and "weighted avg" in text and "accuracy" in text
    lines = report_table(report)
    corner = next(i for i, line in enumerate(lines) if line.startswith("true \\ predicted"))
    assert lines[corner + 1].split() == ["cat", "2", "1", "1"]
    assert lines[corner + 3].split() == ["bird", "0", "1", "2"]
    long = classification_report([0, 1], [0, 1], ["a label far longer than twenty characters", "short"])
    assert all("a label far longer than twenty" not in line for line in report_table(long))
    assert any("a label far longer " in line for line in report_table(long))  # its first 19 characters and "…"


def test_comparison_table_has_a_row_per_model(report):
    baseline = majority_baseline({"cat": 5, "dog": 12, "bird": 3}, TRUE, LABELS)
    lines = comparison_table({"majority": baseline, "tuned": report})
    assert lines[0].split() == ["model", "accuracy", "macro", "F1", "weighted", "F1", "ECE"]
    assert lines[2].split() == ["tuned", "0.6000", "0.6032", "0.6000", "-"]  # no probabilities: no ECE
    assert lines[1].split()[0] == "majority" and lines[1].split()[1] == "0.3000"  # dog is 3 of the 10 test rows


def test_confusion_matrix_png_is_a_valid_image(tmp_path, report):
    from PIL import Image

    path = confusion_matrix_png(report, tmp_path / "plots" / "cm.png", title="tuned")
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 0
    # beyond 30 labels the cells go unannotated but the file is still written
    many = [f"label {k}" for k in range(35)]
    big = classification_report(list(range(35)), [(k + 1) % 35 for k in range(35)], many)
    with Image.open(confusion_matrix_png(big, tmp_path / "big.png")) as image:
        assert image.format == "PNG"


def test_report_html_is_self_contained_and_escapes_labels():
    labels = ["<b>", "plain"]
    tuned = classification_report([0, 1, 1], [0, 1, 0], labels, [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    baseline = majority_baseline({"<b>": 1, "plain": 2}, [0, 1, 1], labels)
    page = report_html({"majority": baseline, "tuned": tuned})
    assert "<img" in page and "data:image/png;base64," in page
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "http://" not in page and "https://" not in page
    assert "majority" in page and "true \\ predicted" in page
    with pytest.raises(ValueError, match="not among"):
        report_html({"majority": baseline})
