"""`lorapipe lineage`, `lorapipe runs` and `lorapipe watch`: what made a model, what ran, what is training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from lorapipe_app.cli.common import echo_json, fail, opens_store


@click.command()
@click.argument("model", required=False)
@click.option("--version", default=None, help="A version name or a stage (production, staging, latest).")
@click.option("--dataset", metavar="SHA256|FILE",
              help="The other direction: every model version trained on this data (a data file, or the sha256 of "
                   "the data files, the validated rows or the train split).")
@click.option("--json", "as_json", is_flag=True, help="The lineage as JSON, for scripts.")
@opens_store
def lineage(model: Optional[str], version: Optional[str], dataset: Optional[str], as_json: bool) -> int:
    """Show what made a model version, or (--dataset) which model versions a dataset trained.

    MODEL is NAME, NAME:VERSION or NAME:STAGE (production, staging, latest).

    \b
    Examples:
      lorapipe lineage lorapipe-quickstart:production
      lorapipe lineage lorapipe-quickstart --version 0a1b2c3d4e5f6a7b --json
      lorapipe lineage --dataset data/quickstart/wwdc25_train_slice.jsonl
    """
    from lorapipe_app.lineage import (
        find_model_version,
        lineage_tree,
        render_tree,
        versions_trained_on,
    )

    if dataset:
        if model or version:
            raise click.UsageError("lineage takes a MODEL (model version -> data) or --dataset (data -> model "
                                   "versions), not both")
        import re

        if not Path(dataset).is_file() and not re.fullmatch(r"[0-9a-fA-F]{64}", dataset):
            raise click.UsageError(f"--dataset {dataset}: neither a data file nor a sha256 (64 hex characters)")
        wanted, found = versions_trained_on(dataset)
        if as_json:
            echo_json({"dataset": dataset, "sha256": sorted(wanted), "model_versions": found})
            return 0 if found else 1
        if not found:
            fail(f"no model version was trained on {dataset} (sha256 {', '.join(sorted(wanted))})")
        click.echo(f"model versions trained on {dataset}:")
        for r in found:
            click.echo(f"  {r['model']} version {r['version']}  stage {r['stage']}  (matched: "
                       f"{', '.join(r['matched'])}; registered {r['registered']})")
        return 0
    if not model:
        raise click.UsageError("lineage needs a MODEL, or --dataset SHA256|FILE for the other direction")
    tree = lineage_tree(find_model_version(model, version))
    if as_json:
        echo_json(tree)
    else:
        click.echo("\n".join(render_tree(tree)))
    return 0


@click.command()
@click.option("-n", "--limit", type=int, default=10, show_default=True, help="How many recent runs.")
@click.option("--json", "as_json", is_flag=True)
@opens_store
def runs(limit: int, as_json: bool) -> int:
    """Recent runs: status, duration, steps served from the cache, model version and its stage.

    \b
    Examples:
      lorapipe runs
      lorapipe runs -n 50 --json | jq '.[] | select(.trained)'
    """
    from lorapipe_app.runs import format_runs, recent_runs

    rows = recent_runs(limit)
    if as_json:
        echo_json(rows)
    else:
        click.echo("\n".join(format_runs(rows)))
    return 0


@click.command()
@click.argument("target", required=False)
@click.option("--output-root", default="runs", show_default=True, help="train.output_root of the runs to look in.")
@click.option("--no-follow", is_flag=True, help="Print what is there and exit.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between looks.")
def watch(target: Optional[str], output_root: str, no_follow: bool, interval: float) -> int:
    """Follow a training from its metrics file: loss, lr, tokens/s, memory, ETA, last checkpoint.

    TARGET: a training folder (train.output_root/<key>), an adapter folder, or a pipeline run name or id;
    none: the training that wrote last. Reads files only; the run is never touched.

    \b
    Examples:
      lorapipe watch
      lorapipe watch runs/0ee741229b8ae97e-08034ff29fdda76b --no-follow
    """
    from lorapipe_app.watch import NothingToWatch, find_training
    from lorapipe_app.watch import watch as follow

    if target is not None and not Path(target).exists():
        target = _training_folder_of_run(target)
    try:
        folder = find_training(target, output_root)
    except NothingToWatch as exc:
        fail(str(exc))
    try:
        state = follow(folder, follow=not no_follow, interval=interval)
    except KeyboardInterrupt:
        return 0
    return 1 if state in ("failed", "stopped") else 0


def _training_folder_of_run(run: str) -> str:
    """The training folder a pipeline run's train step wrote (its step metadata)."""
    from zenml.client import Client

    from lorapipe_app.api import ensure_store

    ensure_store()
    try:
        found = Client().get_pipeline_run(run)
    except KeyError:
        fail(f"{run}: neither a folder nor a pipeline run in this store; `lorapipe runs` lists the runs")
    step = found.steps.get("train_adapter")
    folder = step.run_metadata.get("training_folder") if step else None
    if not folder:
        fail(f"run {found.name} has no training folder recorded (its train step has not started, or was cached: "
             "give the folder)")
    return folder


