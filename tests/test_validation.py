"""Row checks, the learns-to-stop audit, token statistics and the Great Expectations suite."""

import json

from lorapipe.data.records import Record
from lorapipe.data.render import encode
from lorapipe.data.token_audit import padding_waste
from lorapipe.data.validation import validate_dataset
from tests.conftest import QUICKSTART_DATA, write_lines


def _chat(path, rows):
    return write_lines(path, [json.dumps({"messages": m}) + "\n" for m in rows])


def test_role_order_placeholders_control_chars_and_duplicates(tmp_path):
    u, a, s = "user", "assistant", "system"
    rows = [
        [{"role": u, "content": "hi"}, {"role": a, "content": "hello"}],                      # 1 ok
        [{"role": u, "content": "hi"}, {"role": s, "content": "late"}, {"role": a, "content": "x"}],  # 2 system late
        [{"role": a, "content": "first"}],                                                    # 3 starts with assistant
        [{"role": u, "content": "q"}, {"role": u, "content": "q2"}, {"role": a, "content": "a"}],  # 4 user twice
        [{"role": u, "content": "q"}],                                                        # 5 ends with user
        [{"role": u, "content": "I am {{name}}"}, {"role": a, "content": "ok"}],              # 6 placeholder
        [{"role": u, "content": "bell\x07"}, {"role": a, "content": "ring"}],                 # 7 control char (warning)
        [{"role": u, "content": " hi "}, {"role": a, "content": "hello\n"}],                  # 8 duplicate of 1
    ]
    outcome = validate_dataset([str(_chat(tmp_path / "c.jsonl", rows))], run_expectations=False)
    codes = {(p.line, p.code) for p in outcome.report.problems}
    assert {(2, "role_order"), (3, "role_order"), (4, "role_order"), (5, "role_order"), (6, "placeholder"),
            (7, "control_char"), (8, "duplicate")} <= codes
    dup = next(p for p in outcome.report.problems if p.code == "duplicate")
    assert dup.other_line == 1 and "line 1" in dup.message
    # warnings keep the row, errors reject it
    assert sorted(r.line for r in outcome.rejected) == [2, 3, 4, 5, 6]
    assert outcome.report.rows_accepted == 3
    assert all(p.fix for p in outcome.report.problems)


def test_quarantine_trains_on_the_rest_within_the_bad_fraction(tmp_path):
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(9)]
    rows.append([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}])
    path = _chat(tmp_path / "c.jsonl", rows)
    ok = validate_dataset([str(path)], on_bad_rows="quarantine", max_bad_fraction=0.2, run_expectations=False)
    assert ok.report.passed and ok.report.rows_accepted == 9 and len(ok.rejected) == 1
    strict = validate_dataset([str(path)], on_bad_rows="quarantine", max_bad_fraction=0.05, run_expectations=False)
    assert not strict.report.passed and "max_bad_fraction" in strict.report.verdict
    failing = validate_dataset([str(path)], on_bad_rows="fail", run_expectations=False)
    assert not failing.report.passed and "quarantine" in failing.report.verdict


def test_mask_trains_assistant_turns_and_their_stop_token(tiny_tokenizer):
    rec = Record("f", 1, "", "messages", messages=[
        {"role": "system", "content": "S"}, {"role": "user", "content": "question one"},
        {"role": "assistant", "content": "answer one"}, {"role": "user", "content": "question two"},
        {"role": "assistant", "content": "answer two"}])
    enc = encode(tiny_tokenizer, rec)
    trained = tiny_tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if m])
    masked = tiny_tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if not m])
    assert "answer one" in trained and "answer two" in trained
    assert "question" not in trained and "S" not in trained.replace("answer", "")
    assert trained.count("<|im_end|>") == 2  # each assistant turn ends with the trained stop token
    assert "question one" in masked and "answer" not in masked


def test_audit_passes_with_a_stop_token_and_reports_token_stats(tiny_tokenizer):
    outcome = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tiny_tokenizer, max_seq_length=4096,
                               micro_batch_sizes=[4, 1, 2], run_expectations=False)
    audit, stats = outcome.report.audit, outcome.report.token_stats
    assert audit.passed and audit.stop_token_trained_fraction == 1.0 and audit.trainable_rows_fraction == 1.0
    assert audit.roundtrip_fraction == 1.0 and not audit.pad_is_eos
    assert stats.p50 <= stats.p95 <= stats.max and stats.trainable_tokens < stats.total_tokens
    # the waste at every micro-batch the plan may choose, smallest first: none at 1, and less when grouped by length
    assert [w.micro_batch_size for w in stats.padding_waste] == [1, 2, 4]
    assert stats.padding_at(1).in_order == stats.padding_at(1).length_grouped == 0.0
    assert all(w.length_grouped < w.in_order for w in stats.padding_waste[1:])
    assert stats.padding_at(4).in_order > stats.padding_at(2).in_order and stats.padding_at(8) is None


def test_audit_fails_when_the_template_never_trains_the_stop_token(tiny_model_dir, quickstart_records):
    from lorapipe.models.loading import load_tokenizer

    no_eos = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = load_tokenizer(str(tiny_model_dir), chat_template=no_eos)
    outcome = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tok, run_expectations=False)
    assert not outcome.report.audit.passed
    assert outcome.report.audit.stop_token_trained_fraction == 0.0
    assert "never learn to stop" in outcome.report.verdict


def test_overlength_policies(tiny_tokenizer):
    common = dict(tokenizer=tiny_tokenizer, max_seq_length=64, run_expectations=False, on_bad_rows="fail")
    fail = validate_dataset([str(QUICKSTART_DATA)], overlength="fail", **common)
    drop = validate_dataset([str(QUICKSTART_DATA)], overlength="drop", **common)
    trunc = validate_dataset([str(QUICKSTART_DATA)], overlength="truncate", **common)
    n_long = fail.report.problem_counts["overlength"]
    assert n_long > 0 and not fail.report.passed
    assert drop.report.passed and drop.report.problem_counts["overlength_dropped"] == n_long
    assert drop.report.rows_accepted == 240 - n_long and len(drop.rejected) == n_long
    assert trunc.report.passed and trunc.report.token_stats.truncated_rows == n_long
    assert trunc.report.token_stats.max == 64
    assert trunc.report.audit.roundtrip_fraction == 1.0  # truncated rows are not counted as failing round-trip


def test_great_expectations_suite_runs_and_can_fail(tiny_tokenizer):
    ok = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tiny_tokenizer, max_seq_length=1024, min_rows=10)
    assert ok.report.expectations.success and ok.report.expectations.evaluated >= 5
    suite = ok.report.expectations.suite  # the suite itself travels with its result
    assert suite["name"] == "lorapipe_row_facts"
    assert len(suite["expectations"]) == ok.report.expectations.evaluated
    too_few = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tiny_tokenizer, max_seq_length=1024, min_rows=10_000)
    assert not too_few.report.passed
    failed = too_few.report.expectations.failed
    assert any("ExpectTableRowCount" in name or "row_count" in name.lower() for name in failed)


def test_padding_waste_arithmetic():
    assert padding_waste([4, 4, 2, 2], 2) == 0.0
    assert padding_waste([4, 2], 2) == 0.25


def test_span_mask_sweep_equals_the_plain_definition():
    """The one-sweep mask (hot path) against the obvious O(tokens x spans) definition, on random layouts."""
    import random

    from lorapipe.data.render import span_mask

    def reference(offsets, spans):
        out = []
        for a, b in offsets:
            hit = any(a < e and b > s for s, e in spans) if b > a else any(s < a <= e for s, e in spans)
            out.append(1 if hit else 0)
        return out

    rng = random.Random(0)
    for _ in range(3000):
        pos, offsets = 0, []
        for _ in range(rng.randint(0, 40)):
            width = rng.choice([0, 1, 2, 3])
            offsets.append((pos, pos + width))
            pos += width
        points = sorted(rng.sample(range(pos + 2), min(pos + 2, 2 * rng.randint(0, 3))))
        spans = [(points[i], points[i + 1]) for i in range(0, len(points) - 1, 2) if points[i] < points[i + 1]]
        assert span_mask(offsets, spans) == reference(offsets, spans), (offsets, spans)


def test_stop_token_check_equals_the_plain_definition():
    """Each trained run must end (within 3 tokens) with EOS: the regex over the mask (hot path) against a loop."""
    import random

    from lorapipe.data.token_audit import _turns_end_with

    def reference(ids, mask, eos):
        runs, start = [], None
        for i, m in enumerate(mask + [0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                runs.append((start, i))
                start = None
        return bool(runs) and all(eos in ids[max(s, e - 3):e] for s, e in runs)

    rng = random.Random(1)
    for _ in range(5000):
        n = rng.randint(0, 30)
        ids, mask = [rng.randint(0, 5) for _ in range(n)], [rng.randint(0, 1) for _ in range(n)]
        assert _turns_end_with(ids, mask, {3}) == reference(ids, mask, 3), (ids, mask)


def test_expectation_results_come_with_ge_data_docs(tiny_tokenizer):
    ok = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tiny_tokenizer, max_seq_length=1024, min_rows=10)
    html = ok.report.expectations.data_docs_html
    assert html and "Great Expectations" in html and "n_tokens" in html
    assert "data_docs_html" not in ok.report.model_dump()  # shown in the dashboard, not stored in the JSON
    histogram = ok.report.token_stats.histogram
    assert histogram and sum(b[1] for b in histogram) == ok.report.rows_accepted


def test_a_tokenizer_without_a_template_gets_the_fallback_and_the_audit_says_so(tiny_model_dir, tmp_path):
    import shutil

    from lorapipe.models.loading import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(bare))
    outcome = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tok, max_seq_length=4096, run_expectations=False)
    audit = outcome.report.audit
    assert audit.chat_template_source == "fallback"
    assert audit.passed and audit.stop_token_trained_fraction == 1.0  # the fallback appends EOS to every answer


def test_the_batched_tokenizing_pass_decides_and_reports_exactly_as_one_row_at_a_time(tiny_tokenizer, tmp_path,
                                                                                          monkeypatch):
    """Rows wait in a batch for the tokenizer (its own threads): every problem, in file order, every rejection, the
    token statistics and the audit must be what one row at a time gives, across batch boundaries, with broken JSON,
    a duplicate, an over-length row and a row the template cannot render among them."""
    import copy

    import lorapipe.data.validation as validation
    from lorapipe.data.render import RenderError, encode_batch

    tokenizer = copy.deepcopy(tiny_tokenizer)
    # renders a conversation whose last answer holds the marker differently from its prefixes: that row only
    tokenizer.chat_template = "{% if 'UNRENDERABLE' in messages[-1]['content'] %}!{% endif %}" + \
        tokenizer.chat_template
    lines = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:40]]
    text = [json.dumps(r) + "\n" for r in lines]
    text[3] = '{"prompt": "broken", \n'
    text[9] = text[8]  # a duplicate
    text[15] = json.dumps({"prompt": "long " * 1500, "completion": "x"}) + "\n"
    text[22] = json.dumps({"prompt": "q", "completion": "UNRENDERABLE"}) + "\n"
    path = write_lines(tmp_path / "mixed.jsonl", text)

    def run(batch):
        monkeypatch.setattr(validation, "AUDIT_BATCH", batch)
        out = validate_dataset([str(path)], tokenizer=tokenizer, max_seq_length=1024, overlength="drop",
                               on_bad_rows="quarantine", max_bad_fraction=1.0, run_expectations=False)
        return out.report.model_dump(), [(r.line, r.reasons) for r in out.rejected], out.row_facts

    one, batched = run(1), run(7)
    assert batched == one
    report, rejected, _ = batched
    assert {(4, ("invalid_json",)), (16, ("overlength_dropped",)), (23, ("template_error",))} == \
        {(line, tuple(reasons)) for line, reasons in rejected}
    assert (10, "duplicate") in {(p["line"], p["code"]) for p in report["problems"]}
    assert [p["line"] for p in report["problems"]] == sorted(p["line"] for p in report["problems"])
    # the batch encoder is the one-row encoder: the same ids, mask and truncation, row by row
    from lorapipe.data.formats import read_records
    from lorapipe.data.render import encode

    records = read_records([str(QUICKSTART_DATA)]).records[:30]
    for rec, enc in zip(records, encode_batch(tiny_tokenizer, records, 64)):
        assert not isinstance(enc, RenderError) and enc == encode(tiny_tokenizer, rec, 64)
