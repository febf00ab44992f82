"""A real Great Expectations (1.x) suite over per-row facts, run in an ephemeral context (no project folder).

ZenML's GE integration pins GE < 1.0, so lorapipe calls GE directly. The facts are the numbers a reviewer
would check by hand: message counts, response lengths, token counts against the sequence limit, and that
every row has trained tokens. `ExpectationsReport` is what `run_suite` returns and what the validation report
embeds; great_expectations and pandas are imported only when the suite runs.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from pydantic import BaseModel, Field

SUITE_NAME = "lorapipe_row_facts"


class ExpectationsReport(BaseModel):
    """What the suite found, expectation by expectation."""

    suite_name: str
    suite: dict[str, Any] = Field(default_factory=dict, description="The GE expectation suite itself, as GE's JSON")
    success: bool
    evaluated: int
    failed: list[str]
    results: list[dict[str, Any]]
    # GE's own HTML data docs page for this validation; shown in the dashboard, not stored in the JSON
    data_docs_html: Optional[str] = Field(None, exclude=True)


def build_suite(columns: list[str], max_seq_length: Optional[int], min_rows: int) -> Any:
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=SUITE_NAME)
    expect = gx.expectations
    suite.add_expectation(expect.ExpectTableRowCountToBeBetween(min_value=min_rows))
    suite.add_expectation(expect.ExpectColumnValuesToBeBetween(column="n_messages", min_value=1))
    suite.add_expectation(expect.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1))
    if "n_tokens" in columns:
        suite.add_expectation(expect.ExpectColumnValuesToNotBeNull(column="n_tokens"))
        suite.add_expectation(expect.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1,
                                                                   max_value=max_seq_length))
        suite.add_expectation(expect.ExpectColumnValuesToBeBetween(column="n_trainable_tokens", min_value=1))
    if "label_id" in columns:  # task: classification: a classifier needs two labels with rows at least
        suite.add_expectation(expect.ExpectColumnUniqueValueCountToBeBetween(column="label_id", min_value=2))
    return suite


def run_suite(row_facts: dict, max_seq_length: Optional[int], min_rows: int) -> ExpectationsReport:
    """Validate the per-row facts (column name -> values) with a GE checkpoint that also renders data docs."""
    import glob
    import shutil
    from pathlib import Path

    import great_expectations as gx
    import pandas as pd

    # GE logs set-up chatter at INFO; ZenML may have given every existing logger its own level, so quiet each
    gx_loggers = [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]
    for name in [*gx_loggers, "great_expectations"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    df = pd.DataFrame({name: list(values) for name, values in row_facts.items()})
    context = gx.get_context(mode="ephemeral")
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("lorapipe")
    asset = source.add_dataframe_asset(name="row_facts")
    batch_def = asset.add_batch_definition_whole_dataframe("all_rows")
    suite = context.suites.add(build_suite(list(df.columns), max_seq_length, min_rows))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="row_facts", data=batch_def, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="lorapipe", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
    run = checkpoint.run(batch_parameters={"dataframe": df})
    result = next(iter(run.run_results.values()))
    html = None
    sites = context.get_docs_sites_urls()
    if sites:
        site_root = Path(sites[0]["site_url"].replace("file://", "")).parent
        pages = sorted(glob.glob(str(site_root / "validations" / "**" / "*.html"), recursive=True))
        html = Path(pages[-1]).read_text(encoding="utf-8") if pages else None
        shutil.rmtree(site_root, ignore_errors=True)  # the ephemeral site's temp folder
    results, failed = [], []
    for r in result.results:
        cfg = r.expectation_config
        name = cfg.type + (f"({cfg.kwargs.get('column')})" if cfg.kwargs.get("column") else "")
        observed = r.result.get("observed_value", r.result.get("unexpected_count"))
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        results.append({"expectation": name, "success": bool(r.success), "kwargs": kwargs,
                        "observed": observed if isinstance(observed, (int, float, str, type(None))) else str(observed),
                        "unexpected_percent": r.result.get("unexpected_percent")})
        if not r.success:
            failed.append(name)
    return ExpectationsReport(suite_name=SUITE_NAME, suite=json.loads(json.dumps(suite.to_json_dict(), default=str)),
                              success=bool(result.success), evaluated=len(results),
                              failed=failed, results=results, data_docs_html=html)
