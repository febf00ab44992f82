"""Reading what people really feed fine-tuning tools: the shared reference files and a corpus of broken ones."""

import gzip
import json

import pytest

from lorapipe.data.formats import read_records
from lorapipe.data.validation import validate_dataset
from tests.conftest import SHARED, requires_shared, write_lines


@requires_shared
@pytest.mark.parametrize("name, fmt, rows", [
    ("alpaca_en_demo.json", "alpaca", 999),
    ("alpaca_zh_demo.json", "alpaca", 1000),
    ("glaive_toolcall_en_demo.json", "sharegpt", 300),
    ("wikisql/train.jsonl", "text", 1000),
    ("wwdc25/train.jsonl", "prompt_completion", 1800),
])
def test_shared_reference_files_are_accepted(name, fmt, rows):
    outcome = validate_dataset([str(SHARED / name)], run_expectations=False)
    report = outcome.report
    assert report.files[str(SHARED / name)] == fmt
    assert report.rows_read == rows
    assert report.errors == 0, report.summary_lines()
    assert report.rows_accepted == rows
    assert report.passed


@requires_shared
def test_identity_placeholders_are_flagged_with_line_and_field():
    outcome = validate_dataset([str(SHARED / "identity.json")], run_expectations=False)
    report = outcome.report
    assert not report.passed
    placeholders = [p for p in report.problems if p.code == "placeholder"]
    assert placeholders and all(p.source.endswith("identity.json") for p in placeholders)
    first = placeholders[0]
    text = (SHARED / "identity.json").read_text().splitlines()
    # the reported line is where that row's object starts in the JSON array
    assert text[first.line - 1].strip().startswith("{")
    assert "{{name}}" in first.message or "{{author}}" in first.message
    assert first.field in ("output", "instruction/input")  # the user's own field, not an internal index
    # nothing lost: every rejected row is kept with its original text
    assert len(outcome.rejected) == report.rows_rejected > 0
    assert all("{{" in r.raw for r in outcome.rejected)


@requires_shared
def test_sharegpt_tool_roles_are_normalised():
    recs = read_records([str(SHARED / "glaive_toolcall_en_demo.json")]).records
    roles = {m["role"] for r in recs for m in r.messages}
    assert roles <= {"system", "user", "assistant", "tool"} and "tool" in roles
    assert all(r.tools for r in recs[:5])


def test_messages_format_with_system_tool_calls(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                      {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]},
    ]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(r) + "\n" for r in rows])
    result = read_records([str(path)])
    assert not result.problems
    assert [m["role"] for m in result.records[0].messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_alpaca_history_and_system(tmp_path):
    row = {"instruction": "Now?", "input": "ctx", "output": "yes", "system": "sys", "history": [["q1", "a1"]]}
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(row) + "\n"])
    rec = read_records([str(path)]).records[0]
    assert [m["role"] for m in rec.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert rec.messages[3]["content"] == "Now?\n\nctx"


def test_custom_prompt_completion_keys(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", ['{"question": "q", "answer": "a"}\n'])
    result = read_records([str(path)], prompt_key="question", completion_key="answer")
    assert result.formats[str(path)] == "prompt_completion"
    assert result.records[0].messages[1]["content"] == "a"


def test_bom_crlf_blank_lines_and_gzip(tmp_path):
    body = '{"prompt": "p1", "completion": "c1"}\r\n\r\n   \r\n{"prompt": "p2", "completion": "c2"}\r\n'
    plain = tmp_path / "bom.jsonl"
    plain.write_bytes(b"\xef\xbb\xbf" + body.encode())
    gz = tmp_path / "data.jsonl.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(body.encode())
    for path in (plain, gz):
        result = read_records([str(path)])
        assert not result.problems, result.problems
        assert [r.line for r in result.records] == [1, 4]


def test_json_array_inside_a_jsonl_file(tmp_path):
    path = write_lines(tmp_path / "arr.jsonl", ['[\n', '  {"text": "a"},\n', '  {"text": "b"}\n', ']\n'])
    result = read_records([str(path)])
    assert [r.line for r in result.records] == [2, 3] and not result.problems


def test_broken_lines_are_reported_with_file_line_column_and_kept(tmp_path):
    lines = [
        b'{"prompt": "ok", "completion": "fine"}\n',          # 1 good
        b'{"prompt": "cut", "completion": "trunc\n',           # 2 truncated JSON
        b'{"prompt": "bad \xff\xfe utf8", "completion": "x"}\n',  # 3 invalid UTF-8
        b']\n',                                                # 4 stray bracket
        b'["a", "list"]\n',                                    # 5 not an object
        b'{"prompt": "p", "completion": 5}\n',                 # 6 wrong type
        b'{"prompt": "p"}\n',                                  # 7 other format (missing completion)
        b'{"prompt": "again", "completion": "   "}\n',         # 8 empty response
    ]
    path = write_lines(tmp_path / "broken.jsonl", lines)
    outcome = validate_dataset([str(path)], run_expectations=False)
    by_line = {}
    for p in outcome.report.problems:
        by_line.setdefault(p.line, []).append(p)
    assert {p.code for p in by_line[2]} == {"invalid_json"} and by_line[2][0].column is not None
    assert {p.code for p in by_line[3]} == {"invalid_utf8"}
    assert "stray" in by_line[4][0].fix
    assert by_line[5][0].code == "not_object"
    assert by_line[6][0].code == "wrong_type" and by_line[6][0].field == "completion"
    assert by_line[7][0].code in ("mixed_format", "missing_field")
    assert by_line[8][0].code == "empty_response" and by_line[8][0].field == "completion"
    assert all(p.source == str(path) for p in outcome.report.problems)
    # every problem collected, nothing lost: 7 rejected rows kept with their raw text
    assert outcome.report.rows_accepted == 1
    assert [r.line for r in outcome.rejected] == [2, 3, 4, 5, 6, 7, 8]
    assert outcome.rejected[0].raw.startswith('{"prompt": "cut"')
    assert "\\xff" in outcome.rejected[1].raw
    assert not outcome.report.passed


def test_mixed_formats_name_the_first_differing_row(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", ['{"text": "a"}\n', '{"text": "b"}\n',
                                                   '{"prompt": "p", "completion": "c"}\n'])
    result = read_records([str(path)])
    [problem] = result.problems
    assert problem.line == 3 and problem.code == "mixed_format" and "line 1" in problem.message


def test_unclosed_json_array_is_reported(tmp_path):
    path = write_lines(tmp_path / "arr.json", ['[\n', '{"text": "a"},\n', '{"text": "b"\n'])
    result = read_records([str(path)])
    assert result.problems and result.problems[0].code == "invalid_json"
    assert [r.line for r in result.records] == [2]
    assert [(r.line, r.raw.strip()) for r in result.rejected] == [(3, '{"text": "b"')]
