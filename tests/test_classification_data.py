"""task: classification's data contract: CSV and JSONL rows with a text (or pair) and a label; every bad row named with
its file, line and field; conflicting duplicates; the frozen label set, class counts and imbalance; the split
stratified by label; the config keys that belong to the task."""

import json
from collections import Counter

import pytest

from lorapipe.config import ConfigError, validate_config
from lorapipe.data.formats import LabelFields
from lorapipe.data.split import split_records
from lorapipe.data.validation import validate_dataset
from tests.conftest import CLASSIFICATION_DATA


def _validate(paths, fields=None, **kw):
    kw.setdefault("run_expectations", False)
    return validate_dataset([str(p) for p in paths], "classification", label_fields=fields or LabelFields(), **kw)


def _where(report, code):
    return [(p.source.rsplit("/", 1)[-1], p.line, p.field) for p in report.problems if p.code == code]


def test_csv_rows_keep_their_line_and_bad_rows_are_named(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text('body,queue\n"refund, please",billing\n"login fails\nafter reset",tech\n'
                    'too,many,fields\n,billing\nplain question,\n', encoding="utf-8")
    out = _validate([path], LabelFields(text_key="body", label_key="queue"))
    rows = {(r.line, r.text, r.label) for r in out.records}
    # a quoted comma and a quoted line break stay inside their field; the record after starts on line 5
    assert rows == {(2, "refund, please", "billing"), (3, "login fails\nafter reset", "tech")}
    assert _where(out.report, "invalid_csv") == [("tickets.csv", 5, "(row)")]
    assert _where(out.report, "empty_text") == [("tickets.csv", 6, "text")]
    assert _where(out.report, "missing_label") == [("tickets.csv", 7, "queue")]
    # nothing the user gave is lost: each rejected row's own text is kept
    assert {r.line: r.raw for r in out.rejected} == {5: "too,many,fields", 6: ",billing", 7: "plain question,"}
    assert not out.report.passed and "3 row(s) rejected" in out.report.verdict


def test_labels_are_strings_or_integers_and_a_frozen_set_names_the_unknown_ones(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"review": "great", "stars": 1}, {"review": "awful", "stars": 0}, {"review": "meh", "stars": 2},
            {"review": "odd", "stars": True}, {"review": "fine", "stars": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = LabelFields.from_config("review", None, "stars", {"0": "negative", "1": "positive"})
    out = _validate([path], fields)
    assert [(r.text, r.label) for r in out.records] == [("great", "positive"), ("awful", "negative")]
    unknown = [p for p in out.report.problems if p.code == "unknown_label"]
    assert [(p.line, p.field) for p in unknown] == [(3, "stars")]
    assert "'2' is not in data.labels (0, 1)" in unknown[0].message
    wrong = sorted((p.line, p.code) for p in out.report.problems if p.code == "wrong_type")
    assert wrong == [(4, "wrong_type"), (5, "wrong_type")]
    assert out.report.classification.labels == ["negative", "positive"]
    assert out.report.classification.label_source == "config"


def test_a_text_seen_again_with_another_label_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "reset my password", "label": "account"}, {"text": "where is my parcel", "label": "shipping"},
            {"text": "reset  my password ", "label": "billing"}, {"text": "where is my parcel", "label": "shipping"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _validate([path])
    conflict = [p for p in out.report.problems if p.code == "conflicting_label"]
    assert [(p.line, p.other_line, p.severity) for p in conflict] == [(3, 1, "error")]
    assert "'billing' here, 'account' there" in conflict[0].message
    # the same text with the same label is the usual duplicate warning, kept
    assert [(p.line, p.severity) for p in out.report.problems if p.code == "duplicate"] == [(4, "warning")]


def test_class_counts_imbalance_and_a_single_label(tmp_path):
    path = tmp_path / "skewed.jsonl"
    rows = [{"text": f"common {i}", "label": "common"} for i in range(40)] + [{"text": "rare one", "label": "rare"},
                                                                             {"text": "rare two", "label": "rare"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _validate([path], max_class_imbalance=10)
    c = out.report.classification
    assert c.counts == {"common": 40, "rare": 2} and c.imbalance_ratio == 20.0 and c.label_source == "inferred"
    codes = {p.code: p for p in out.report.problems}
    assert "20.0x" in codes["class_imbalance"].message and "class_weights: balanced" in codes["class_imbalance"].fix
    assert codes["small_class"].severity == "warning"
    assert out.report.passed  # warnings only
    assert any("labels (2, inferred): common 40, rare 2" in line for line in out.report.summary_lines())

    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"t{i}", "label": "only"}) + "\n" for i in range(12)))
    failed = _validate([one], run_expectations=True)
    assert not failed.report.passed and "a classifier needs at least two labels" in failed.report.verdict
    # the Great Expectations suite says it too (unique label ids >= 2)
    assert any("label_id" in name for name in failed.report.expectations.failed)


def test_integer_labels_are_ordered_numerically():
    from lorapipe.data.validation import label_order

    assert label_order(["10", "2", "1", "0"]) == ["0", "1", "2", "10"]
    assert label_order(["b", "a", "10"]) == ["10", "a", "b"]


def test_pairs_and_token_counts_with_an_encoder(tmp_path, tiny_encoder_dir):
    from lorapipe.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_encoder_dir))
    path = tmp_path / "nli.jsonl"
    rows = [{"premise": "the sql query counts rows", "hypothesis": "it counts", "label": "entailment"},
            {"premise": "who won the game", "hypothesis": "nobody played", "label": "contradiction"},
            {"premise": "who won the game " * 40, "hypothesis": "long", "label": "neutral"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = LabelFields.from_config("premise", "hypothesis", "label", None)
    out = _validate([path], fields, tokenizer=tok, max_seq_length=64, overlength="fail")
    assert [r.text_pair for r in out.records] == ["it counts", "nobody played"]
    over = [p for p in out.report.problems if p.code == "overlength"]
    assert [p.line for p in over] == [3] and "above train.max_seq_length=64" in over[0].message
    # [CLS] premise [SEP] hypothesis [SEP]: the pair's tokens are counted with the special tokens
    lengths = [len(tok(r["premise"], r["hypothesis"])["input_ids"]) for r in rows[:2]]
    assert out.report.token_stats.max == max(lengths) and out.report.token_stats.total_tokens == sum(lengths)
    assert out.report.audit is None  # nothing is generated: no learns-to-stop audit
    truncated = _validate([path], fields, tokenizer=tok, max_seq_length=64, overlength="truncate")
    assert truncated.report.rows_accepted == 3 and truncated.report.token_stats.truncated_rows == 1


def test_the_split_keeps_each_labels_share():
    out = _validate([CLASSIFICATION_DATA])
    assert out.report.passed and out.report.classification.counts == {"general": 200, "sports": 100, "sql": 150}
    train, evals, test = split_records(out.records, 0.1, 0.2)
    for part, share in ((train, 0.7), (evals, 0.1), (test, 0.2)):
        counts = Counter(r.label for r in part.records)
        assert counts == {"general": round(200 * share), "sports": round(100 * share),
                          "sql": round(150 * share)}, part.name


def test_config_keys_that_belong_to_the_task():
    base = {"model": {"name_or_path": "bert-base-uncased"}, "data": {"paths": ["d.csv"]}}
    cfg = validate_config({**base, "task": "classification"})
    # the task's defaults where the config is silent
    assert (cfg.data.format, cfg.register.primary_metric, cfg.train.lora.target_modules,
            cfg.train.metric_for_best_model) == ("classification", "macro_f1", "all-linear", "macro_f1")
    with pytest.raises(ConfigError) as err:
        validate_config({**base, "task": "classification", "data": {"paths": ["d"], "format": "alpaca"},
                         "register": {"primary_metric": "rouge_l"},
                         "train": {"method": "full", "quantization": "nf4", "packing": True}})
    problems = err.value.problems
    assert len(problems) == 4  # every problem at once, each on its own line
    assert any(p.startswith("data.format=alpaca") for p in problems)
    assert any("register.primary_metric=rouge_l" in p for p in problems)
    assert any("train.method: full" in p and "train.quantization: none" in p for p in problems)
    assert any("train.packing" in p for p in problems)
    with pytest.raises(ConfigError) as err:
        validate_config({**base, "train": {"method": "full", "class_weights": "balanced"},
                         "register": {"primary_metric": "macro_f1"}})
    assert len(err.value.problems) == 3 and all("task: classification" in p for p in err.value.problems)
    with pytest.raises(ConfigError, match="data.labels names a label twice"):
        validate_config({**base, "task": "classification", "data": {"paths": ["d"], "labels": ["a", "b", "a"]}})


def test_csv_a_bad_line_or_an_unclosed_quote_is_named_and_the_rest_still_read(tmp_path):
    bad = tmp_path / "bytes.csv"
    bad.write_bytes(b'text,label\nok,a\nbad \xff byte,b\nfine,a\n"two\nlines",b\n')
    out = _validate([bad])
    assert [(r.line, r.text) for r in out.records] == [(2, "ok"), (4, "fine"), (5, "two\nlines")]
    assert _where(out.report, "invalid_utf8") == [("bytes.csv", 3, "(line)")]
    unclosed = tmp_path / "quote.csv"
    unclosed.write_text('text,label\nok one,a\n"never closed,b\nmore,a\nlast,b\n')
    out = _validate([unclosed])
    problem = next(p for p in out.report.problems if p.code == "invalid_csv")
    assert (problem.line, problem.fix) == (3, "close the quote") and "lines 3-5 read as one row" in problem.message
    pandas_index = tmp_path / "index.csv"
    pandas_index.write_text(",text,label\n0,hi,a\n")
    out = _validate([pandas_index])
    assert "index=False" in next(p.fix for p in out.report.problems if p.code == "invalid_csv")


def test_yaml_booleans_as_labels_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="quote the labels"):
        validate_config({"task": "classification", "model": {"name_or_path": "m"},
                         "data": {"paths": ["d"], "labels": [True, False]}})


def test_an_unclosed_quote_in_the_last_column_is_named_not_read_as_a_label(tmp_path):
    path = tmp_path / "last.csv"
    path.write_text('text,label\nfine,neg\nhello,"pos\nworld,neg\nagain,pos\n')
    out = _validate([path])
    assert [(r.line, r.label) for r in out.records] == [(2, "neg")]
    problem = next(p for p in out.report.problems if p.code == "invalid_csv")
    assert problem.line == 3 and "lines 3-5 read as one row" in problem.message
