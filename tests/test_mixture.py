"""data.sources: a weighted mixture of sources, each read with its own format, counted apart and sampled by the seed;
stable draws (the same seed, the same rows; rows appended to one source leave the others' rows alone); sizes that
cannot be drawn are said with the largest that can."""

import json
from pathlib import Path

import pytest

from lorapipe.config import DataSection, LorapipeConfig
from lorapipe.data.mixture import SourceInput, SourcePlan, mixture_counts
from lorapipe.data.sources import resolve_sources
from lorapipe.data.validation import validate_dataset
from tests.conftest import SHARED, requires_shared, write_lines


def _prompt_rows(path: Path, prefix: str, n: int, start: int = 0) -> Path:
    return write_lines(path, [json.dumps({"prompt": f"{prefix} question {i}?", "completion": f"{prefix} answer {i}."})
                              + "\n" for i in range(start, start + n)])


def _validate(data: DataSection, seed: int = 7):
    from steps.data_source import source_inputs

    resolved = resolve_sources(data)
    return validate_dataset(resolved.files, data.format, sources=source_inputs(resolved, data),
                            mixture_rows=data.mixture_rows, seed=seed, run_expectations=False), resolved


def _mixture(tmp_path: Path, a_rows: int = 60, b_rows: int = 40, **extra) -> DataSection:
    a = _prompt_rows(tmp_path / "a.jsonl", "alpha", a_rows)
    b = _prompt_rows(tmp_path / "b.jsonl", "beta", b_rows)
    return DataSection(sources=[{"path": str(a), "name": "a", "weight": 3}, {"path": str(b), "name": "b", "weight": 1}],
                       **extra)


def _sampled(outcome, name: str) -> list[str]:
    return [r.messages[0]["content"] for r in outcome.records if Path(r.source).stem == name]


def test_a_weighted_mixture_draws_each_sources_share_and_reports_it(tmp_path):
    outcome, resolved = _validate(_mixture(tmp_path))
    report = outcome.report
    # 3:1 of a 60-row and a 40-row source: a runs out first, at 80 rows (60 + 20), and no row is taken twice
    by_name = {s.name: s for s in report.sources}
    assert (by_name["a"].rows_sampled, by_name["b"].rows_sampled) == (60, 20) and report.rows_sampled == 80
    assert by_name["a"].share == pytest.approx(0.75) and by_name["b"].rows_accepted == 40
    assert len(outcome.records) == 80 and len(_sampled(outcome, "b")) == 20
    assert [s.sha256 for s in report.sources] == [s.sha256 for s in resolved.sources]
    assert resolved.file_sha256[resolved.sources[1].files[0]] == by_name["b"].sha256
    assert any(line.startswith("source") for line in report.summary_lines())
    # the data fingerprint is that of the rows that train, not of every accepted row
    whole = validate_dataset(resolved.files, "auto", run_expectations=False)
    assert whole.report.rows_sampled is None and whole.report.data_fingerprint != report.data_fingerprint


def test_the_same_seed_draws_the_same_rows_and_another_seed_others(tmp_path):
    data = _mixture(tmp_path)
    first, again, other = (_validate(data, seed)[0] for seed in (7, 7, 8))
    assert _sampled(first, "b") == _sampled(again, "b") and first.report.data_fingerprint == \
        again.report.data_fingerprint
    assert _sampled(first, "b") != _sampled(other, "b")


def test_rows_appended_to_one_source_leave_the_other_sources_rows_alone(tmp_path):
    data = _mixture(tmp_path, mixture_rows=40)
    before = _validate(data)[0]
    _prompt_rows(tmp_path / "a.jsonl", "alpha", 200)  # a grows from 60 to 200 rows, with the same 60 first
    after = _validate(data)[0]
    assert _sampled(before, "b") == _sampled(after, "b") and len(_sampled(after, "b")) == 10
    assert len(_sampled(after, "a")) == 30
    # without data.mixture_rows the mixture grows with the bottleneck source: b's earlier rows are all still drawn
    (tmp_path / "open").mkdir()
    open_ended = _mixture(tmp_path / "open")
    small = _validate(open_ended)[0]
    _prompt_rows(Path(open_ended.sources[0].path), "alpha", 120)
    grown = _validate(open_ended)[0]
    assert set(_sampled(small, "b")) <= set(_sampled(grown, "b")) and len(_sampled(grown, "b")) == 40


def test_a_mixture_larger_than_a_source_allows_fails_with_the_largest_that_fits(tmp_path):
    outcome, _ = _validate(_mixture(tmp_path, mixture_rows=100))
    problem = next(p for p in outcome.report.problems if p.code == "mixture_too_large")
    assert not outcome.report.passed and "a (75 rows for its share 75.0%; 60 accepted)" in problem.message
    assert "at most 80" in problem.fix


def test_max_rows_caps_a_source_without_weights():
    counts = mixture_counts([SourcePlan("a"), SourcePlan("b", max_rows=5)], [50, 30])
    assert counts == [50, 5]


def test_sources_are_checked_in_the_config_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="give every source a weight .* or none"):
        DataSection(sources=[{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl"}])
    with pytest.raises(ValueError, match="exactly one source"):
        DataSection(paths=["a.jsonl"], sources=[{"path": "b.jsonl"}])
    with pytest.raises(ValueError, match="exactly one of path .* and artifact"):
        DataSection(sources=[{"path": "a.jsonl", "artifact": "rows"}])
    with pytest.raises(ValueError, match="data.sources\\[0\\].format=classification needs task: classification"):
        LorapipeConfig(model={"name_or_path": "m"}, data={"sources": [{"path": "a.jsonl", "format": "classification"}]})
    from lorapipe.data.sources import DataSourceError

    with pytest.raises(DataSourceError, match=r"data.sources\[1\].path: .*missing.jsonl not found"):
        resolve_sources(DataSection(sources=[{"path": str(_prompt_rows(tmp_path / "a.jsonl", "a", 3))},
                                             {"path": str(tmp_path / "missing.jsonl")}]))


@requires_shared
def test_the_readme_mixture_of_alpaca_tool_calls_and_wikisql_reads_each_in_its_own_format():
    """The README's example: LLaMA-Factory's Alpaca and ShareGPT tool-call demo sets and mlx-lm's WikiSQL, each in its
    own format, mixed 2:1:1."""
    data = DataSection(sources=[
        {"path": str(SHARED / "alpaca_en_demo.json"), "name": "alpaca", "weight": 2, "format": "alpaca"},
        {"path": str(SHARED / "glaive_toolcall_en_demo.json"), "name": "tool-calls", "weight": 1,
         "format": "sharegpt"},
        {"path": str(SHARED / "wikisql" / "train.jsonl"), "name": "wikisql", "weight": 1, "format": "text"}],
        mixture_rows=400)
    outcome, _ = _validate(data)
    by_name = {s.name: s for s in outcome.report.sources}
    assert [by_name[n].rows_sampled for n in ("alpaca", "tool-calls", "wikisql")] == [200, 100, 100]
    assert by_name["tool-calls"].rows_read == 300 and by_name["wikisql"].rows_read == 1000
    formats = {Path(f).name: fmt for f, fmt in outcome.report.files.items()}
    assert formats["alpaca_en_demo.json"] == "alpaca" and formats["train.jsonl"] == "text"
    assert {r.format for r in outcome.records} == {"alpaca", "sharegpt", "text"} and len(outcome.records) == 400


def test_plain_paths_are_a_mixture_of_one_that_samples_nothing(tmp_path):
    path = _prompt_rows(tmp_path / "a.jsonl", "alpha", 12)
    outcome, resolved = _validate(DataSection(paths=[str(path)]))
    assert resolved.sources[0].files == [str(path)] and outcome.report.rows_sampled is None
    assert outcome.report.sources[0].rows_sampled == 12 and len(outcome.records) == 12
    assert SourceInput(SourcePlan("x"), []).mixes is False
