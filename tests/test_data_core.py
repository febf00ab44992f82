"""The data layer's structure: no import circle, the row types in records.py, and each row carrying its own problems."""

import ast
import json
from pathlib import Path

import lorapipe.data
from lorapipe.data import formats, records
from lorapipe.data.validation import validate_dataset
from tests.conftest import write_lines

DATA_DIR = Path(lorapipe.data.__file__).parent


def _data_imports(path: Path) -> set[str]:
    """The lorapipe.data modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:  # relative to the lorapipe.data package
                base = "lorapipe.data" + (f".{base}" if base else "")
            # `from lorapipe.data import formats` imports a module; `from lorapipe.data.formats import X` a name
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n.split(".")[2] for n in names if n.startswith("lorapipe.data.")}
    return found & {p.stem for p in DATA_DIR.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in the graph as [a, b, ..., a], or [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module], path[len(path):] = "open", [module]
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_no_import_cycle_under_lorapipe_data():
    graph = {p.stem: _data_imports(p) - {p.stem} for p in DATA_DIR.glob("*.py")}
    assert "render" in graph["token_audit"]  # imported inside a function: the parser sees those too
    assert "validation" not in graph["dataset"]
    assert "validation" not in graph["expectations"]
    assert _cycle(graph) == [], f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _defined_classes(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}


def test_row_types_are_defined_in_records_not_formats():
    assert {"Problem", "RawRow", "Record"} <= _defined_classes(DATA_DIR / "records.py")
    assert not {"Problem", "RawRow", "Record"} & _defined_classes(DATA_DIR / "formats.py")
    assert formats.Record is records.Record and formats.Problem is records.Problem  # old imports still work


def _reasons(outcome) -> dict[tuple[str, int], list[str]]:
    return {(Path(r.source).name, r.line): r.reasons for r in outcome.rejected}


def test_rows_bad_in_different_ways_list_only_their_own_reasons(tmp_path):
    ok = json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    path = write_lines(tmp_path / "a.jsonl", [
        ok,
        '{"prompt": "q2", "completion": \n',                                  # 2: invalid JSON
        json.dumps({"prompt": "q3", "completion": "a3"}) + "\n",
        json.dumps({"prompt": 4, "completion": "a4"}) + "\n",                 # 4: prompt not a string
    ])
    outcome = validate_dataset([str(path)], run_expectations=False)
    assert _reasons(outcome) == {("a.jsonl", 2): ["invalid_json"], ("a.jsonl", 4): ["wrong_type"]}


def test_same_line_in_two_files_keeps_each_files_reasons(tmp_path):
    first = write_lines(tmp_path / "first.jsonl", [json.dumps({"text": "a"}) + "\n", json.dumps({"text": "b"}) + "\n",
                                                   "[1, 2]\n"])                       # 3: not an object
    second = write_lines(tmp_path / "second.jsonl", [json.dumps({"text": "c"}) + "\n", json.dumps({"text": "d"}) + "\n",
                                                     json.dumps({"text": 3}) + "\n"])  # 3: text not a string
    outcome = validate_dataset([str(first), str(second)], run_expectations=False)
    assert _reasons(outcome) == {("first.jsonl", 3): ["not_object"], ("second.jsonl", 3): ["wrong_type"]}


def test_a_file_problem_is_not_a_reason_of_the_next_files_row(tmp_path):
    # the array's trailing text is a problem of the file, at line 1, reported just before the next file's line 1
    # row: matching problems to rows by line number gave that row both codes
    array = write_lines(tmp_path / "array.json", [json.dumps([{"text": "a"}]) + " trailing\n"])
    rows = write_lines(tmp_path / "rows.jsonl", [json.dumps({"text": 1}) + "\n", json.dumps({"text": "b"}) + "\n"])
    outcome = validate_dataset([str(array), str(rows)], run_expectations=False)
    assert _reasons(outcome) == {("rows.jsonl", 1): ["wrong_type"]}
    assert [(Path(p.source).name, p.line, p.code) for p in outcome.report.problems] == [
        ("array.json", 1, "invalid_json"), ("rows.jsonl", 1, "wrong_type")]


def test_an_array_element_broken_below_its_first_line_names_its_reason(tmp_path):
    # the element starts on line 3 and breaks on line 4: the row keeps its problem although the lines differ
    path = write_lines(tmp_path / "array.json", ["[\n", json.dumps({"text": "a"}) + ",\n", '{"text": "b",\n',
                                                 ' "oops"}\n', "]\n"])
    outcome = validate_dataset([str(path)], run_expectations=False)
    assert _reasons(outcome) == {("array.json", 3): ["invalid_json"]}
    assert [(p.line, p.code) for p in outcome.report.problems] == [(4, "invalid_json")]
