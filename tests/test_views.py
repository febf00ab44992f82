"""The dashboard views on hand-made reports: what a reader must find in them, and nothing that needs the network."""

import json
import re

from lorapipe.data.validation import validate_dataset
from lorapipe.evaluation.metrics import EvalMetrics, ModelScores
from materializers.reports import PROBLEMS_SHOWN_PER_KIND, eval_html, validation_html


def _no_external_urls(page: str) -> bool:
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.I)
    return "<script" not in page.lower() and not [u for u in links if u.lower().startswith(("http", "//"))]


def test_the_validation_view_lists_problems_and_says_how_many_it_left_out(tmp_path):
    rows = [{"prompt": f"question {i % 3}", "completion": f"answer {i % 3}"} for i in range(40)]
    rows[5]["completion"] = 7  # one error among 37 duplicate warnings
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_dataset([str(data)], run_expectations=False).report
    duplicates = report.problem_counts["duplicate"]
    assert duplicates > PROBLEMS_SHOWN_PER_KIND
    page = validation_html(report)
    assert f"and {duplicates - PROBLEMS_SHOWN_PER_KIND} more" in page
    assert page.count(">duplicate<") == PROBLEMS_SHOWN_PER_KIND + 1  # the listed ones + the count table's row
    assert "rows.jsonl:6" in page and "wrong_type" in page and "FAILED" in page
    assert _no_external_urls(page)


def test_the_evaluation_view_puts_base_and_tuned_side_by_side():
    scores = dict(loss=2.0, perplexity=7.39, rouge_l=0.1, exact_match=0.0, stop_rate=0.5)
    metrics = EvalMetrics(
        test_rows=3, scored_rows=2, generated_rows=1, scored_tokens=40, base=ModelScores(**scores),
        tuned=ModelScores(**{**scores, "loss": 1.0, "perplexity": 2.72, "stop_rate": 1.0}), perplexity_gain=0.63,
        tuned_beats_base=True, row_losses={"base": [2.1, 1.9], "tuned": [1.2, 0.8]},
        samples=[{"source": "data/x.jsonl:4", "prompt": "Who won?", "reference": "The Eagles <b>", "base": "uh uh uh",
                  "base_stopped": False, "tuned": "The Eagles.", "tuned_stopped": True}])
    page = eval_html(metrics)
    assert "Generations side by side" in page and "x.jsonl:4" in page
    assert "The Eagles &lt;b&gt;" in page  # escaped, never markup
    assert "uh uh uh  [did not stop]" in page and "The Eagles.  [did not stop]" not in page
    assert "-63.2%" in page  # perplexity 7.39 -> 2.72
    assert 'src="data:image/png;base64,' in page and _no_external_urls(page)


def test_the_version_report_compares_with_the_stage_holder_when_there_is_one():
    from lorapipe.registry import VersionReport, metric_rows, render_html, render_text

    mine = {"base_perplexity": 9.0, "tuned_perplexity": 4.0, "base_loss": 2.2, "tuned_loss": 1.4}
    holder = {"base_perplexity": 9.1, "tuned_perplexity": 5.5, "base_loss": 2.2, "tuned_loss": 1.7}
    report = VersionReport(
        model="m", version="v2", stage="none", decision="register.stage_if_better is 'none'",
        metrics=metric_rows(mine, holder), production_version="v1",
        data={"files_sha256": "f" * 64, "validated_sha256": "a" * 64}, base_model={"name_or_path": "org/base"},
        merge_check={"passed": True, "max_abs_logit_diff": 0.01, "tolerance": 0.1, "dtype": "bfloat16"},
        code={"commit": "c" * 40, "dirty": False}, run={"id": "r1", "name": "run-1"},
        artifacts={"adapter": "id-a", "merged_model": "id-m"})
    assert [(r["metric"], r["tuned"], r["production"]) for r in report.metrics] == [
        ("perplexity", 4.0, 5.5), ("loss", 1.4, 1.7)]
    text = render_text(report, current_stage="production")
    assert text[0] == "model m version v2 (stage: production (at registration: none))"
    assert "  perplexity             base 9 -> tuned 4, stage holder 5.5" in text
    assert "  stage holder           version v1 (at registration)" in text
    page = render_html(report)
    assert "stage holder" in page and ">5.5<" in page and "id-m" in page and _no_external_urls(page)
    alone = report.model_copy(update={"metrics": metric_rows(mine, None), "production_version": None})
    assert all(r["production"] is None for r in alone.metrics) and "stage holder  " not in "\n".join(
        render_text(alone))
