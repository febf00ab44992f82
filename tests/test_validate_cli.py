"""`lorapipe validate` says everything it found: how many problems of a kind it did not list, an empty file as
empty, a huge row even without a tokenizer."""

import json

from lorapipe_app.cli import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_summary_says_how_many_problems_it_left_out(tmp_path, capsys):
    rows = [{"prompt": "same question", "completion": "same answer"} for _ in range(7)]  # 6 duplicates
    rows += [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    data = _write(tmp_path / "dups.jsonl", rows)
    assert main(["validate", str(data)]) == 0  # duplicates are warnings
    out = capsys.readouterr().out
    assert out.count("[duplicate] (row): exact duplicate of line 1") == 3
    assert "... and 3 more [duplicate] (--json, or the report artifact, lists every one)" in out
    assert main(["validate", str(data), "--json"]) == 0
    assert len([p for p in json.loads(capsys.readouterr().out)["problems"] if p["code"] == "duplicate"]) == 6


def test_an_empty_file_is_called_empty(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n   \n\t\n")
    assert main(["validate", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"{data}: [empty_file] (file): the file is empty (or holds only whitespace)" in out
    assert "a data file is missing, empty or unreadable" in out and "rejected and validation.on_bad_rows" not in out


def test_a_huge_row_is_reported_without_a_tokenizer(tmp_path, capsys):
    rows = [{"prompt": "q", "completion": "x" * 2_000_000}] + [{"prompt": f"q{i}", "completion": "a"} for i in range(3)]
    data = _write(tmp_path / "huge.jsonl", rows)
    assert main(["validate", str(data)]) == 0  # a warning: the row may be meant
    out = capsys.readouterr().out
    assert f"{data}:1: [long_row] (row): 2,000,033 characters" in out and "give --model" in out
