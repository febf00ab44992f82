"""task: preference: every data format people have read into prompt + chosen/rejected (or one answer and a label),
and every bad-pair case reported with its file and line."""

import json

import pytest

from lorapipe.data.formats import read_records
from lorapipe.data.validation import validate_dataset
from tests.conftest import REPO_ROOT, write_lines

DPO_SLICE = REPO_ROOT / "data" / "preference" / "dpo_en_demo_slice.json"
KTO_SLICE = REPO_ROOT / "data" / "preference" / "kto_en_demo_slice.json"
USER, ANSWER_A, ANSWER_B = "What is 2+2?", "4.", "5."


def _read(tmp_path, rows, name="rows.jsonl"):
    path = write_lines(tmp_path / name, [json.dumps(r) + "\n" for r in rows])
    out = read_records([str(path)], fmt="auto_preference")
    return out, path


@pytest.mark.parametrize("row,fmt", [
    ({"prompt": USER, "chosen": ANSWER_A, "rejected": ANSWER_B}, "preference"),  # TRL, plain text
    ({"prompt": [{"role": "user", "content": USER}], "chosen": [{"role": "assistant", "content": ANSWER_A}],
      "rejected": [{"role": "assistant", "content": ANSWER_B}]}, "preference"),  # TRL, conversational
    ({"chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER_A}],
      "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER_B}]},
     "preference"),  # TRL, implicit prompt
    ({"conversations": [{"from": "human", "value": USER}], "chosen": {"from": "gpt", "value": ANSWER_A},
      "rejected": {"from": "gpt", "value": ANSWER_B}}, "sharegpt_preference"),  # LLaMA-Factory's ranking format
    ({"instruction": "What is", "input": "2+2?", "chosen": ANSWER_A, "rejected": ANSWER_B}, "alpaca_preference"),
])
def test_every_pair_format_reads_as_prompt_chosen_rejected(tmp_path, row, fmt):
    out, _ = _read(tmp_path, [row])
    assert not out.problems and set(out.formats.values()) == {fmt}
    rec = out.records[0]
    assert rec.messages[-1]["role"] == "user" and rec.messages[-1]["content"].replace("\n\n", " ") in (USER,
                                                                                                        "What is 2+2?")
    assert rec.chosen == [{"role": "assistant", "content": ANSWER_A}]
    assert rec.rejected == [{"role": "assistant", "content": ANSWER_B}]


@pytest.mark.parametrize("row", [
    {"prompt": USER, "completion": ANSWER_A, "label": False},  # TRL's unpaired preference
    {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER_A}], "label": False},
])
def test_unpaired_feedback_reads_as_one_answer_and_its_label(tmp_path, row):
    out, _ = _read(tmp_path, [row])
    assert not out.problems and set(out.formats.values()) == {"unpaired"}
    rec = out.records[0]
    assert rec.messages == [{"role": "user", "content": USER}] and rec.chosen[0]["content"] == ANSWER_A
    assert rec.rejected is None and rec.desirable is False


def test_multi_turn_prompts_of_llama_factorys_demo_sets_are_kept_whole():
    pairs = read_records([str(DPO_SLICE)], fmt="auto_preference")
    raw = json.loads(DPO_SLICE.read_text())
    assert not pairs.problems and len(pairs.records) == len(raw) == 40
    for rec, row in zip(pairs.records, raw):
        assert [m["content"] for m in rec.messages] == [t["value"] for t in row["conversations"]]
        assert rec.chosen[0]["content"] == row["chosen"]["value"]
        assert rec.rejected[0]["content"] == row["rejected"]["value"]
    assert any(len(r.messages) > 1 for r in pairs.records)
    feedback = read_records([str(KTO_SLICE)], fmt="auto_preference")
    assert not feedback.problems and sum(r.desirable for r in feedback.records) == 20 == len(feedback.records) - 20


def test_bad_pairs_are_reported_with_file_line_and_fix(tmp_path):
    rows = [
        {"prompt": USER, "chosen": ANSWER_A, "rejected": ANSWER_B},                  # 1 ok
        {"prompt": USER, "chosen": " 4. ", "rejected": "4."},                        # 2 the same answer
        {"prompt": "Name a colour.", "chosen": "", "rejected": "red"},               # 3 empty side
        {"prompt": USER, "chosen": ANSWER_B, "rejected": ANSWER_A},                  # 4 contradicts line 1
        {"prompt": "", "chosen": "x", "rejected": "y"},                              # 5 no prompt
        {"prompt": USER, "chosen": 4, "rejected": ANSWER_B},                         # 6 not a string
    ]
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r) + "\n" for r in rows])
    out = validate_dataset([str(path)], fmt="auto_preference", on_bad_rows="quarantine", max_bad_fraction=1.0,
                           run_expectations=False)
    by_line = {(p.line, p.code): p for p in out.report.problems}
    assert {(2, "identical_pair"), (3, "empty_side"), (4, "contradictory_pair"), (5, "empty_prompt"),
            (6, "wrong_type")} <= set(by_line)
    contradiction = by_line[(4, "contradictory_pair")]
    assert contradiction.other_line == 1 and "line 1" in contradiction.message
    assert by_line[(3, "empty_side")].field == "chosen"
    assert all(p.source == str(path) and p.fix for p in out.report.problems)
    assert sorted(r.line for r in out.rejected) == [2, 3, 4, 5, 6] and out.report.preference.pairs == 1
    assert out.report.preference.contradictions == 1


def test_a_pair_that_differs_only_past_the_cut_is_rejected_with_the_length_that_keeps_it(tmp_path, tiny_tokenizer):
    shared = "the same long start of an answer " * 12
    rows = [{"prompt": USER, "chosen": shared + "and a good end.", "rejected": shared + "and a bad end."},
            {"prompt": USER, "chosen": "short and good.", "rejected": "short and bad."}]
    path = write_lines(tmp_path / "cut.jsonl", [json.dumps(r) + "\n" for r in rows])
    out = validate_dataset([str(path)], fmt="auto_preference", tokenizer=tiny_tokenizer, max_seq_length=64,
                           overlength="truncate", on_bad_rows="quarantine", max_bad_fraction=1.0,
                           run_expectations=False)
    cut = [p for p in out.report.problems if p.code == "pair_identical_after_truncation"]
    assert [p.line for p in cut] == [1] and out.report.preference.identical_after_truncation == 1
    needed = out.report.preference.length_keeping_them
    assert needed > 64 and f"at least {needed}" in cut[0].fix
    again = validate_dataset([str(path)], fmt="auto_preference", tokenizer=tiny_tokenizer, max_seq_length=needed,
                             overlength="truncate", on_bad_rows="quarantine", max_bad_fraction=1.0,
                             run_expectations=False)
    assert again.report.preference.identical_after_truncation == 0 and again.report.rows_accepted == 2
    # the learns-to-stop audit looks at both sides: the cut pair's sides lose their stop token, the short one's not
    assert again.report.audit.stop_token_trained_fraction == 0.5
    whole = validate_dataset([str(path)], fmt="auto_preference", tokenizer=tiny_tokenizer, max_seq_length=512,
                             run_expectations=False)
    assert whole.report.audit.stop_token_trained_fraction == 1.0 and whole.report.passed


def test_unpaired_feedback_of_one_kind_fails_and_an_unbalanced_set_is_warned(tmp_path):
    good = [{"prompt": f"q{i}", "completion": "a", "label": True} for i in range(6)]
    bad = [{"prompt": f"r{i}", "completion": "b", "label": False} for i in range(2)]
    path = write_lines(tmp_path / "good.jsonl", [json.dumps(r) + "\n" for r in good])
    one_sided = validate_dataset([str(path)], fmt="auto_preference", run_expectations=False)
    assert not one_sided.report.passed and "KTO needs both kinds" in one_sided.report.verdict
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps(r) + "\n" for r in good + bad])
    unbalanced = validate_dataset([str(path)], fmt="auto_preference", run_expectations=False)
    warning = next(p for p in unbalanced.report.problems if p.code == "unbalanced_feedback")
    assert unbalanced.report.passed and warning.severity == "warning" and "desirable_weight: 0.33" in warning.fix
    assert "3.00:1" in warning.message
    # the weights the run will train with are what the balance is judged by: 6 x 0.33 against 2 x 1 is balanced
    weighted = validate_dataset([str(path)], fmt="auto_preference", run_expectations=False, kto_weights=(0.33, 1.0))
    assert not any(p.code == "unbalanced_feedback" for p in weighted.report.problems)
    labelled = write_lines(tmp_path / "label.jsonl", [json.dumps({"prompt": "q", "completion": "a", "label": "yes"})
                                                      + "\n"])
    wrong = validate_dataset([str(labelled)], fmt="auto_preference", run_expectations=False)
    assert [(p.line, p.field, p.code) for p in wrong.report.problems][:1] == [(1, "label", "wrong_type")]


def test_lorapipe_validate_checks_a_preference_file_alone(capsys):
    from lorapipe_app.cli import main

    assert main(["validate", str(KTO_SLICE), "--format", "auto_preference"]) == 0
    out = capsys.readouterr().out
    assert "preference data: 20 desirable and 20 undesirable answers (unpaired, KTO)" in out
    assert main(["validate", str(DPO_SLICE), "--format", "auto_preference", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preference"]["pairs"] == 40 and report["files"] == {str(DPO_SLICE): "sharegpt_preference"}
