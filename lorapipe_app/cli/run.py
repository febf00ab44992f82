"""`lorapipe run` and `lorapipe schedule`: the pipeline now, or on a cron schedule."""

from __future__ import annotations

from typing import Any, Optional

import click

from lorapipe_app.cli.common import config_options, echo_json, fail, opens_store


@click.command()
@config_options
@opens_store
@click.option("--no-cache", is_flag=True, help="Re-run every step (training still resumes from its checkpoints).")
@click.option("--run-config", type=click.Path(dir_okay=False),
              help="ZenML run configuration for a remote stack: step resources, GPU node, Docker image "
                   "(e.g. configs/stacks/kubernetes-gpu.run.yaml).")
def run(config: str, overrides: tuple, no_cache: bool, run_config: Optional[str]) -> int:
    """Run the fine-tuning pipeline on the active ZenML stack.

    A re-run on data whose bytes did not change is served from the cache and trains nothing; changed data
    trains and registers a new model version.

    \b
    Examples:
      lorapipe run -c configs/quickstart.yaml
      lorapipe run -c configs/quickstart.yaml --set train.max_steps=50 --set train.learning_rate=1e-4
      lorapipe run -c configs/llama-3.1-8b-unsloth-cuda.yaml --run-config configs/stacks/kubernetes-gpu.run.yaml
    """
    from lorapipe_app.api import run_finetune

    result = run_finetune(config, list(overrides), enable_cache=not no_cache, run_config=run_config)
    print_summary(result)
    return 0


def print_summary(result: Any) -> None:
    metrics = result.metrics
    click.echo("\n" + "=" * 72)
    click.echo(f"lorapipe run {result.run.name}: {result.run.status} in {result.seconds:.1f}s "
               f"({len(result.cached_steps)} of {result.steps} steps from cache"
               + ("; nothing was trained: the data and config are unchanged" if not result.trained else "") + ")")
    click.echo(f"model        {result.model_name} version {result.model_version}, stage: {result.stage}")
    if result.decision:
        click.echo(f"decision     {result.decision}")
    if metrics.classification is not None:  # a classifier: its report against the baselines, not perplexity
        c = metrics.classification
        click.echo(f"classifier   {len(c.labels)} labels, {metrics.test_rows} test rows (accuracy / macro F1):")
        for name in (*c.baselines, "tuned"):
            r = c.reports[name]
            click.echo(f"  {name:<10} {r['accuracy']:.3f} / {r['macro_f1']:.3f}")
    elif metrics.tuned.preference_accuracy is not None:  # preference: the starting (SFT) model against the tuned
        b, t = metrics.base, metrics.tuned
        click.echo(f"preference   accuracy {b.preference_accuracy:.3f} -> {t.preference_accuracy:.3f} on "
                   f"{metrics.scored_rows} held-out pairs (chosen ranked above rejected; starting model -> tuned)")
        click.echo(f"reward       margin {t.reward_margin:+.4f}, accuracy {t.reward_accuracy:.3f} (tuned against the "
                   f"starting model); chosen loss {b.chosen_loss:.3f} -> {t.chosen_loss:.3f}")
    else:
        click.echo(f"perplexity   base {metrics.base.perplexity:.2f} -> tuned {metrics.tuned.perplexity:.2f} "
                   f"({metrics.perplexity_gain:+.1%}) on {metrics.scored_rows} test rows")
    shown = [(label, field, spec) for label, field, spec in
             (("ROUGE-L", "rouge_l", ".3f"), ("BLEU", "bleu", ".1f"), ("chrF", "chrf", ".1f"),
              ("learned to stop", "stop_rate", ".0%")) if getattr(metrics.tuned, field, None) is not None]
    if shown:
        click.echo("generation   " + "; ".join(
            f"{label} {format(getattr(metrics.base, field), spec)} -> {format(getattr(metrics.tuned, field), spec)}"
            for label, field, spec in shown))
    click.echo(f"adapter      {result.adapter_uri}/folder")
    click.echo(f"merged model {result.merged_uri}/folder")
    click.echo(f"store        {result.store_url}")
    click.echo("look further:")
    click.echo(f"  lorapipe lineage {result.model_name}:{result.model_version}")
    click.echo(f"  lorapipe predict {result.model_name}:{result.model_version} "
               + ("\"a text to classify\"" if metrics.classification is not None else "--prompt \"...\""))
    click.echo("  lorapipe runs")
    click.echo("  make dashboard        # local ZenML dashboard: runs, artifacts, model versions")
    click.echo("=" * 72)



@click.group(invoke_without_command=True)
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config of the run to repeat.")
@click.option("--cron", help="Five-field cron expression, e.g. \"0 3 * * *\" (03:00 every day).")
@click.option("--name", help="Schedule name (default: <register.model_name>-retrain).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--run-config", type=click.Path(dir_okay=False),
              help="ZenML run configuration (step resources, GPU node, image), e.g. "
                   "configs/stacks/kubernetes-gpu.run.yaml.")
@click.pass_context
@opens_store
def schedule(ctx: click.Context, config: Optional[str], cron: Optional[str], name: Optional[str], overrides: tuple,
             run_config: Optional[str]) -> int:
    """Retrain on a schedule on a stack whose orchestrator supports schedules (e.g. Kubernetes: a CronJob).

    Each firing reads the newest data (data.paths globs, or the latest version of data.artifact); unchanged data
    is served from the cache and takes no stage. Promotion stays gated by the evaluation rules.

    \b
    Examples:
      lorapipe schedule -c configs/llama-3.1-8b-unsloth-cuda.yaml --cron "0 3 * * *" \\
          --run-config configs/stacks/kubernetes-gpu.run.yaml
      lorapipe schedule list
      lorapipe schedule delete lorapipe-model-retrain
    """
    if ctx.invoked_subcommand is not None:
        return 0
    if not config or not cron:
        raise click.UsageError("schedule needs -c CONFIG and --cron EXPR (or a subcommand: list, delete)")
    from lorapipe_app.api import schedule_finetune

    made = schedule_finetune(config, cron, name=name, overrides=list(overrides), run_config=run_config)
    click.echo(f"schedule {made.name} ({made.id}) registered: cron \"{made.cron_expression}\" on the active stack's "
               f"orchestrator; `lorapipe schedule list` shows it, `lorapipe schedule delete {made.name}` removes it")
    return 0


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True)
@opens_store
def schedule_list(as_json: bool) -> int:
    """List this store's schedules of the lorapipe pipeline.

    \b
    Example:
      lorapipe schedule list --json
    """
    from zenml.client import Client
    from zenml.utils.pagination_utils import depaginate_stream

    rows = []
    for s in depaginate_stream(Client().list_schedules, size=100):
        rows.append({"name": s.name, "id": str(s.id), "cron": s.cron_expression, "active": s.active,
                     "orchestrator_id": str(s.orchestrator_id) if s.orchestrator_id else None,
                     "created": s.created.isoformat(timespec="seconds")})
    if as_json:
        echo_json(rows)
    elif not rows:
        click.echo("no schedule: `lorapipe schedule -c CONFIG --cron EXPR` on a stack that can schedule")
    for r in rows if not as_json else []:
        click.echo(f"{r['name']:<32} cron \"{r['cron']}\"  {'active' if r['active'] else 'paused'}  created "
                   f"{r['created']}")
    return 0


@schedule.command("delete")
@click.argument("name")
@opens_store
def schedule_delete(name: str) -> int:
    """Delete a schedule: its CronJob (or the orchestrator's equivalent) and ZenML's record of it.

    \b
    Example:
      lorapipe schedule delete lorapipe-model-retrain
    """
    from zenml.client import Client

    client = Client()
    try:
        client.get_schedule(name, allow_name_prefix_match=False)
    except KeyError:
        fail(f"no schedule named {name}; `lorapipe schedule list` shows the names")
    client.delete_schedule(name)
    click.echo(f"schedule {name} deleted")
    return 0


