"""`lorapipe validate`: check data files without ZenML."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import click

from lorapipe.config import DataSection, ValidationSection
from lorapipe_app.cli.common import choice, echo_json


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", help="Model folder or hub id: enables the token checks and the learns-to-stop audit.")
@click.option("--format", "fmt", default="auto", show_default=True, type=choice(DataSection, "format"))
@click.option("--prompt-key", default="prompt", show_default=True)
@click.option("--completion-key", default="completion", show_default=True)
@click.option("--text-key", default="text", show_default=True, help="--format classification: the text field.")
@click.option("--text-pair-key", default=None, help="--format classification: a second text field (pairs).")
@click.option("--label-key", default="label", show_default=True, help="--format classification: the label field.")
@click.option("--labels", default=None, help="--format classification: the label set, comma-separated "
                                              "(default: inferred from the rows).")
@click.option("--max-seq-length", type=int, default=None)
@click.option("--overlength", default="fail", show_default=True, type=choice(ValidationSection, "overlength"))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON (every problem).")
def validate(paths: tuple, model: Optional[str], fmt: str, prompt_key: str, completion_key: str, text_key: str,
             text_pair_key: Optional[str], label_key: str, labels: Optional[str], max_seq_length: Optional[int],
             overlength: str, as_json: bool) -> int:
    """Validate data files without ZenML: every problem with its file and line.

    Exit code 0 when the data passes, 1 when it does not.

    \b
    Examples:
      lorapipe validate data/quickstart/wwdc25_train_slice.jsonl
      lorapipe validate data/*.jsonl --model models/tiny-llama --max-seq-length 512 --json > report.json
      lorapipe validate tickets.csv --format classification --text-key body --label-key queue
    """
    from lorapipe.data.formats import LabelFields
    from lorapipe.data.validation import validate_dataset

    tokenizer = None
    for p in paths:
        if not Path(p).exists():
            raise click.UsageError(f"{p}: file not found")
    if model:
        from lorapipe.models.loading import load_tokenizer
        from lorapipe.models.locate import model_problem

        problem = model_problem(model, key="--model")
        if problem:
            raise click.UsageError(problem)
        try:
            tokenizer = load_tokenizer(model)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is a usage error
            raise click.UsageError(f"--model {model}: cannot load its tokenizer: {exc}") from None
    # libraries log to stdout; keep stdout for the report alone (pipe-able JSON)
    with contextlib.redirect_stdout(sys.stderr):
        label_fields = LabelFields.from_config(text_key, text_pair_key, label_key,
                                               [x.strip() for x in labels.split(",")] if labels else None)
        outcome = validate_dataset(list(paths), fmt, prompt_key, completion_key, tokenizer=tokenizer,
                                   max_seq_length=max_seq_length, overlength=overlength, on_bad_rows="fail",
                                   min_rows=1, progress=not as_json, label_fields=label_fields)
    if as_json:
        echo_json(outcome.report.model_dump(mode="json"))
    else:
        click.echo("\n".join(outcome.report.summary_lines()))
    return 0 if outcome.report.errors == 0 and outcome.report.passed else 1


