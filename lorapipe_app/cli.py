"""lorapipe: validated, trained, evaluated, merged and registered LoRA fine-tunes, from one config.

Every command has --help with an example. A user's mistake (bad config, data, model path, a plan that cannot run)
ends with one paragraph that says what to fix and exit code 1 (2 for usage errors), never a traceback;
`lorapipe --debug COMMAND` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click

from lorapipe.quiet import quiet_env, quiet_loggers

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings:
    debug = False


def fail(message: str) -> None:
    """A user's mistake: the message, exit code 1."""
    raise click.ClickException(message)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show the traceback of any error (for bug reports).")
@click.option("--verbose", is_flag=True, help="Keep the libraries' own import-time log lines.")
def cli(debug: bool, verbose: bool) -> None:
    """lorapipe: validate JSONL -> preflight -> split -> train LoRA -> evaluate -> merge -> register, on ZenML.

    \b
    Start here:
      lorapipe run -c configs/quickstart.yaml
      lorapipe runs
      lorapipe lineage lorapipe-quickstart:latest
    """
    Settings.debug = debug
    if not verbose:
        quiet_loggers()


# ---------------------------------------------------------------------------------------------------------- run

def _config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config key, e.g. --set train.epochs=2 (repeatable).")(fn)
    fn = click.option("-c", "--config", required=True, type=click.Path(dir_okay=False),
                      help="YAML config, e.g. configs/quickstart.yaml.")(fn)
    return fn


@cli.command()
@_config_options
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


# ----------------------------------------------------------------------------------------------------- validate

@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", help="Model folder or hub id: enables the token checks and the learns-to-stop audit.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text",
                                 "classification"]))
@click.option("--prompt-key", default="prompt", show_default=True)
@click.option("--completion-key", default="completion", show_default=True)
@click.option("--text-key", default="text", show_default=True, help="--format classification: the text field.")
@click.option("--text-pair-key", default=None, help="--format classification: a second text field (pairs).")
@click.option("--label-key", default="label", show_default=True, help="--format classification: the label field.")
@click.option("--labels", default=None, help="--format classification: the label set, comma-separated "
                                              "(default: inferred from the rows).")
@click.option("--max-seq-length", type=int, default=None)
@click.option("--overlength", default="fail", show_default=True, type=click.Choice(["drop", "truncate", "fail"]))
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
        _echo_json(outcome.report.model_dump(mode="json"))
    else:
        click.echo("\n".join(outcome.report.summary_lines()))
    return 0 if outcome.report.errors == 0 and outcome.report.passed else 1


# ---------------------------------------------------------------------------------------- preflight and memory

def _label_count(cfg: Any) -> int:
    """A classifier's head size before a run: the labels the config froze, else those of the data files as they are
    now (read without a tokenizer), else 2."""
    if cfg.task != "classification":
        return 2
    if cfg.data.label_names():
        return len(cfg.data.label_names())
    from lorapipe.data.formats import LabelFields
    from lorapipe.data.sources import expand_paths
    from lorapipe.data.validation import validate_dataset

    files, _ = expand_paths(cfg.data.paths, patterns_may_be_empty=True)
    if not files:
        return 2
    d = cfg.data
    with contextlib.redirect_stdout(sys.stderr):
        found = validate_dataset(files, "classification", label_fields=LabelFields.from_config(
            d.text_key, d.text_pair_key, d.label_key, d.labels), run_expectations=False, keep_records=False)
    return max(2, len(found.report.classification.labels)) if found.report.classification else 2


def _preflight(config: str, overrides: tuple, probe_now: bool = False,
               allow_probe: bool = True) -> tuple[Any, Any, Any]:
    """(preflight report, run plan or None, config) for a config on this machine, without ZenML. The probe's real
    steps run with `probe_now` or the config's `preflight.probe`, unless `allow_probe` is false."""
    from lorapipe_app.api import prepare
    from lorapipe.hardware.memory import ModelFactsError
    from lorapipe.hardware.plan import PlanError, decide_plan, model_size, user_set_keys
    from lorapipe.phases.measure import probe_checks
    from lorapipe.hardware.preflight import build_report
    from lorapipe.hardware.probe import probe

    prepared = prepare(config, list(overrides), need_data_now=False)
    cfg = prepared.config
    hw = probe(cfg.train.output_root if Path(cfg.train.output_root).exists() else ".")
    facts, model_error, plan, problems = None, None, None, []
    num_labels = _label_count(cfg)
    try:
        facts = model_size(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code, task=cfg.task,
                           num_labels=num_labels)
    except ModelFactsError as exc:
        model_error = str(exc)
    if facts is not None:
        try:
            plan = decide_plan(cfg.train, hw, facts, cfg.evaluate, cfg.merge,
                               attn_implementation=cfg.model.attn_implementation,
                               user_set=user_set_keys(cfg.train, cfg.evaluate), task=cfg.task, num_labels=num_labels)
        except PlanError as exc:
            problems = exc.problems
    store = _local_artifact_store()
    report = build_report(hw, facts, model_error, plan, problems, cfg.data.paths, cfg.train.output_root, store,
                          plan.train.backend if plan else None)
    if plan is not None and allow_probe and (probe_now or cfg.preflight.probe):
        import tempfile

        Path(cfg.train.output_root).mkdir(parents=True, exist_ok=True)
        click.echo("probe: 3 training steps and one evaluation batch at the planned sizes ...")
        with tempfile.TemporaryDirectory(prefix="probe-", dir=cfg.train.output_root) as work:
            checks, measured = probe_checks(cfg.model, cfg.train, plan, cfg.evaluate, work)
        report.checks += checks
        report.probe_measurements = measured
    return report, plan, cfg


def _local_artifact_store() -> Optional[str]:
    """The active stack's artifact store when it is a local folder (where the merged model is written)."""
    try:
        from zenml.client import Client

        from lorapipe_app.api import ensure_store

        ensure_store()
        path = Client().active_stack.artifact_store.path
    except Exception:  # noqa: BLE001 - no store configured yet: nothing to check
        return None
    return None if "://" in path else path


@cli.command()
@_config_options
@click.option("--json", "as_json", is_flag=True, help="Print the report and the recommended config as JSON.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write preflight_report.json and recommended_config.json into this folder.")
@click.option("--probe", "probe_now", is_flag=True,
              help="Also run 3 training steps and one evaluation batch and measure their peaks (preflight.probe).")
def preflight(config: str, overrides: tuple, as_json: bool, out_dir: Optional[str], probe_now: bool) -> int:
    """Check this machine for a config and plan the run: packages, hardware, disk, model, data, memory per phase.

    Exits 1 listing every failed check (missing dependency, disk too small, plan over budget, data missing), each
    with the key or command that fixes it.

    \b
    Examples:
      lorapipe preflight -c configs/quickstart.yaml
      lorapipe preflight -c configs/quickstart.yaml --out runs/preflight --probe
      lorapipe preflight -c configs/deepseek-coder-6.7b-qlora-24gb-balanced.yaml --set train.profile=conservative
    """
    from lorapipe.hardware.preflight import recommended_config

    report, plan, _cfg = _preflight(config, overrides, probe_now)
    recommended = recommended_config(plan) if plan else None
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "preflight_report.json").write_text(report.model_dump_json(indent=2))
        if recommended is not None:
            (out / "recommended_config.json").write_text(json.dumps(recommended, indent=2))
    if as_json:
        _echo_json({"report": report.model_dump(mode="json"), "recommended_config": recommended,
                    "passed": report.passed})
        return 0 if report.passed else 1
    mark = {"pass": "ok  ", "warn": "warn", "fail": "FAIL"}
    section = None
    for c in report.checks:
        if c.section != section:
            section = c.section
            click.echo(f"{section}:")
        click.echo(f"  {mark[c.status]} {c.name}: {c.measured}" + (f"  (needs {c.requirement})"
                                                                   if c.status != "pass" else "")
                   + (f"\n         {c.detail}" if c.detail and c.status != "pass" else ""))
    if plan is not None:
        t = plan.train
        click.echo(f"train:    {t.backend} on {t.device} in {t.dtype}"
                   + (f", {t.quantization} quantization" if t.quantization != "none" else "")
                   + f"; micro batch {t.micro_batch_size} x {t.gradient_accumulation_steps} accumulation x "
                   f"{t.world_size} process(es) = {t.effective_batch_size}; optimizer {t.optimizer}")
        for reason in t.reasons:
            click.echo(f"          - {reason}")
        for phase in (plan.evaluate, plan.merge):
            click.echo(f"{phase.phase + ':':<9} {phase.device} in {phase.dtype}, batch {phase.batch_size}: "
                       f"{phase.reason}")
        _print_memory(plan)
    if out_dir:
        click.echo(f"written: {Path(out_dir) / 'preflight_report.json'}"
                   + (f", {Path(out_dir) / 'recommended_config.json'}" if recommended is not None else ""))
    if not report.passed:
        fail(f"{config}: {report.summary()}:\n" + "\n".join(
            f"  - {c.name}: {c.measured}" + (f" ({c.detail})" if c.detail else "") for c in report.failed))
    click.echo(f"preflight: {report.summary()}")
    return 0


def _size(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1024:.0f} MB"


def _print_memory(plan: Any) -> None:
    memory = plan.train.memory
    click.echo(f"memory:   training {_size(memory.total_gb)}, evaluation {_size(plan.evaluate.predicted_peak_gb)}, "
               f"merge {_size(plan.merge.predicted_peak_gb)} (budget {_size(memory.budget_gb)}); training = weights "
               f"{_size(memory.weights_gb)} + LoRA and optimizer {_size(memory.lora_and_optimizer_gb)} + activations "
               f"and logits {_size(memory.activations_gb)} + overhead")
    for phase in (plan.evaluate, plan.merge):
        for warning in phase.warnings:
            click.echo(f"          warning: {warning}")


def _all_phases(plan: Any) -> Any:
    """The plan's memory of every phase in one estimate (the training plan carries only training's)."""
    memory = plan.train.memory
    return memory.model_copy(update={"terms": memory.terms + plan.evaluate.memory_terms + plan.merge.memory_terms,
                                     "eval_peak_gb": plan.evaluate.predicted_peak_gb,
                                     "merge_peak_gb": plan.merge.predicted_peak_gb})


def _print_terms(estimate: Any) -> None:
    from lorapipe.hardware.memory import gib

    for phase, title in (("train", "training"), ("eval", "evaluation"), ("merge", "merge")):
        terms = [t for t in estimate.terms if t.phase == phase]
        click.echo(f"{title} peak: {gib(sum(t.bytes for t in terms))}")
        width = max(len(t.name) for t in terms)
        for t in terms:
            click.echo(f"  {t.name:<{width}}  {gib(t.bytes):>10}   {t.formula}")


@cli.command("estimate-memory")
@click.argument("model", required=False)
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="Estimate a config's plan on this machine instead.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="With -c: override a config key.")
@click.option("--method", type=click.Choice(["lora", "qlora", "full"]), default="lora", show_default=True,
              help="qlora: NF4 double-quantised base; full: every weight trained (--task classification).")
@click.option("--task", type=click.Choice(["sft", "classification"]), default="sft", show_default=True,
              help="classification: the model as a sequence classifier (a head of --num-labels, no generation).")
@click.option("--num-labels", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--guide", is_flag=True, help="Which method fits which memory size (8-80 GB), from the memory model, "
                                            "for MODEL and every --guide-model.")
@click.option("--guide-model", "guide_models", multiple=True, help="With --guide: another model to compare.")
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lora-rank", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lora-targets", type=click.Choice(["all-linear", "attention"]), default="all-linear",
              show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                                                "sgd"]), default="adamw_torch", show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu", "mps"]), default="cuda", show_default=True,
              help="Where training runs: decides the overheads (CUDA context; the process on CPU).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Compute dtype (default: bfloat16 on cuda/mps, float32 on cpu).")
@click.option("--backend", type=click.Choice(["hf", "unsloth", "mlx"]), default="hf", show_default=True)
@click.option("--attn-implementation", type=click.Choice(["sdpa", "eager", "flash_attention_2"]), default="sdpa",
              show_default=True)
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--load-test", is_flag=True, help="Also build the model on the meta device and check the count.")
@click.option("--json", "as_json", is_flag=True, help="Peaks in bytes and the per-term breakdown as JSON.")
def estimate_memory(model: Optional[str], config: Optional[str], overrides: tuple, method: str, seq_len: int,
                    micro_batch_size: int, lora_rank: int, lora_targets: str, gradient_checkpointing: bool,
                    optimizer: str, device: str, dtype: Optional[str], backend: str, attn_implementation: str,
                    eval_batch_size: int, max_new_tokens: int, load_test: bool, as_json: bool, task: str = "sft",
                    num_labels: int = 2, guide: bool = False, guide_models: tuple = ()) -> int:
    """Estimate the peak memory of LoRA/QLoRA training, evaluation and merge from the model's config alone.

    MODEL is a local folder or a hub id (its config.json is read from the cache or the hub; no weights). Every term
    is printed with its formula (docs/MEMORY.md explains them).

    \b
    Examples:
      lorapipe estimate-memory meta-llama/Llama-3.1-8B --method qlora --seq-len 2048 --micro-batch-size 2
      lorapipe estimate-memory models/tiny-llama --device cpu --seq-len 512 --json
      lorapipe estimate-memory -c configs/deepseek-coder-6.7b-qlora-24gb-balanced.yaml
      lorapipe estimate-memory bert-base-uncased --task classification --method full --seq-len 128 --micro-batch-size 32
      lorapipe estimate-memory bert-base-uncased --task classification --guide --guide-model bert-large-uncased \
          --seq-len 128 --micro-batch-size 32
    """
    from lorapipe.hardware.memory import MemoryInputs, ModelFactsError, estimate, load_test as meta_count, model_facts

    if config:
        report, plan, _cfg = _preflight(config, overrides, allow_probe=False)
        if plan is None:
            fail(f"{config}: no memory estimate, the plan refuses this config:\n"
                 + "\n".join(f"  - {c.name}: {c.measured} ({c.detail})" for c in report.failed))
        if as_json:
            _echo_json(_all_phases(plan).as_json())
            return 0
        _print_terms(_all_phases(plan))
        return 0 if plan.train.memory.total_gb <= plan.train.memory.budget_gb else 1
    if not model:
        raise click.UsageError("give a MODEL (local folder or hub id) or -c CONFIG")
    if method == "full" and task != "classification":
        raise click.UsageError("--method full is for --task classification (task: sft trains LoRA)")
    if guide:
        return _size_guide([model, *guide_models], task, num_labels, seq_len, micro_batch_size, device, dtype,
                           optimizer, lora_rank, lora_targets, as_json)
    try:
        facts = model_facts(model, task=task, num_labels=num_labels)
        if load_test:
            by_formula, on_meta = meta_count(model, task=task, num_labels=num_labels)
            if by_formula.total_parameters != on_meta.total_parameters:
                fail(f"{model}: the formula counts {by_formula.total_parameters:,} parameters and the meta-device "
                     f"model {on_meta.total_parameters:,}: trust the meta count ({on_meta.parameter_counts})")
            click.echo(f"load test: {on_meta.total_parameters:,} parameters on the meta device, as counted", err=True)
    except ModelFactsError as exc:
        fail(str(exc))
    inputs = MemoryInputs(
        device=device, backend=backend, dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
        quantization="nf4" if method == "qlora" else "none", micro_batch_size=micro_batch_size, seq_len=seq_len,
        lora_r=lora_rank, lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer, attn_implementation=attn_implementation, eval_batch_size=eval_batch_size,
        max_new_tokens=max_new_tokens, task=task, num_labels=num_labels, full_finetune=method == "full")
    result = estimate(facts, inputs)
    if as_json:
        _echo_json({"model": model, "parameters": facts.total_parameters,
                    "parameter_counts": facts.parameter_counts, "inputs": inputs.model_dump(mode="json"),
                    **result.as_json()})
        return 0
    click.echo(f"{model}: {facts.model_type}, {facts.total_parameters / 1e9:.2f} B parameters "
               f"({', '.join(f'{k} {v / 1e6:,.1f} M' for k, v in facts.parameter_counts.items())}); "
               + (f"every weight trained: {result.trainable_parameters / 1e6:,.2f} M" if method == "full" else
                  f"LoRA r={lora_rank} on {lora_targets}: {result.trainable_parameters / 1e6:,.2f} M trainable"))
    _print_terms(result)
    return 0


def _size_guide(models: list[str], task: str, num_labels: int, seq_len: int, micro_batch_size: int, device: str,
                dtype: Optional[str], optimizer: str, lora_rank: int, lora_targets: str, as_json: bool) -> int:
    """estimate-memory --guide: which method fits which memory size, from the memory model (not a static table)."""
    from lorapipe.hardware.memory import ModelFactsError, model_facts
    from lorapipe.hardware.plan import format_size_guide, size_guide

    facts, problems = {}, []
    for name in models:
        try:
            facts[name] = model_facts(name, task=task, num_labels=num_labels)
        except ModelFactsError as exc:
            problems.append(str(exc))
    if problems:
        fail("\n".join(problems))
    rows = size_guide(facts, task=task, seq_len=seq_len, micro_batch_size=micro_batch_size, device=device,
                      dtype=dtype, optimizer=optimizer, lora_r=lora_rank, lora_targets=lora_targets)
    if as_json:
        _echo_json(rows)
        return 0
    click.echo("\n".join(format_size_guide(rows)))
    return 0


# ------------------------------------------------------------------------------------------------------ predict

def _model_folder(ref: str, adapter: bool) -> str:
    """A local folder as given, or a registered version's merged model (its adapter with --adapter)."""
    if Path(ref).is_dir():
        return ref
    from lorapipe_app.lineage import find_model_version

    mv = find_model_version(ref)
    name = "adapter" if adapter else "merged_model"
    versions = mv.model_artifacts.get(name) or mv.data_artifacts.get(name)
    if not versions:
        fail(f"{ref}: version {mv.name} holds no {name.replace('_', ' ')}"
             + ("" if adapter else "; --adapter loads its base and adapter instead"))
    latest = versions[max(versions, key=lambda v: int(v) if str(v).isdigit() else 0)]
    return latest.load().path


@cli.command()
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("-p", "--prompt", "prompts", multiple=True, help="A user message (repeatable).")
@click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False),
              help="JSONL of prompts: {\"prompt\": ...} or {\"messages\": [...]} per line (or plain lines).")
@click.option("--system", help="A system message before each prompt.")
@click.option("--adapter", "use_adapter", is_flag=True,
              help="Load the version's base model and adapter instead of its merged model.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--stream", is_flag=True, help="Print each answer as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per answer (prompt, completion, stopped).")
@click.option("--pair", "text_pair", help="A classifier of text pairs: the second text of each pair.")
@click.option("--text-key", default="text", show_default=True, help="A classifier's --file: the text field.")
@click.option("--text-pair-key", default="text_pair", show_default=True,
              help="A classifier's --file: the second text's field.")
def predict(model: str, prompt: Optional[str], prompts: tuple, prompt_file: Optional[str], system: Optional[str],
            use_adapter: bool, max_new_tokens: int, stream: bool, as_json: bool, text_pair: Optional[str],
            text_key: str = "text", text_pair_key: str = "text_pair") -> int:
    """Answer prompts with a fine-tuned model: MODEL[:VERSION|STAGE] from the registry, or a model/adapter folder.

    Greedy decoding with the model's saved chat template, stopping on every end token (EOS and the template's
    turn end); says when an answer hit --max-new-tokens without stopping. No prompt given: stdin lines.
    A classifier (task: classification) prints each text's label and every label's probability instead; --file
    then reads rows with a "text" (and "text_pair") field, JSONL or CSV.

    \b
    Examples:
      lorapipe predict lorapipe-quickstart:staging "What is new in SwiftUI?"
      lorapipe predict lorapipe-quickstart:production --file prompts.jsonl --json > answers.jsonl
      lorapipe predict lorapipe-quickstart --adapter --stream -p "Hello"
      lorapipe predict runs/<key>/adapter --max-new-tokens 64 < prompts.txt
      lorapipe predict lorapipe-router:staging "How many points did the Eagles score?"
    """
    from lorapipe.phases.predict import generate, is_classifier, read_prompts

    asked: list = ([prompt] if prompt else []) + list(prompts)
    folder = _model_folder(model, use_adapter)
    if is_classifier(folder):
        return _classify(folder, asked, prompt_file, text_pair, as_json, text_key, text_pair_key)
    if prompt_file:
        try:
            asked += read_prompts(prompt_file)
        except ValueError as exc:
            fail(str(exc))
    if not asked:
        asked = [line.strip() for line in sys.stdin if line.strip()]
    if not asked:
        raise click.UsageError("give a PROMPT, --prompt TEXT (repeatable), --file prompts.jsonl, or lines on stdin")
    loaded, tokenizer = _load_for_predict(folder, as_json)
    for question in asked:
        if stream and not as_json:
            shown = question if isinstance(question, str) else question[-1].get("content", "")
            click.echo(f"> {shown}")
        answer = generate(loaded, tokenizer, question, max_new_tokens, system,
                          stream=sys.stdout if stream and not as_json else None)
        if as_json:
            click.echo(json.dumps(answer, ensure_ascii=False))
            continue
        if not stream:
            click.echo(f"> {answer['prompt']}\n{answer['completion']}")
        click.echo(("" if answer["stopped"] else f"[did not stop within {max_new_tokens} new tokens]\n"))
    return 0


def _load_for_predict(folder: str, as_json: bool) -> tuple[Any, Any]:
    """The model and tokenizer `predict` answers with, on this machine's inference device; said on stderr."""
    from lorapipe.phases.predict import inference_device, load_for_inference

    device, dtype = inference_device()
    try:
        loaded, tokenizer, described = load_for_inference(folder, device, dtype)
    except FileNotFoundError as exc:
        fail(str(exc))
    if not as_json:
        click.echo(f"{described} on {device} in {dtype}", err=True)
    return loaded, tokenizer


def _classify(folder: str, texts: list, rows_file: Optional[str], text_pair: Optional[str], as_json: bool,
              text_key: str = "text", text_pair_key: str = "text_pair") -> int:
    """`predict` with a classifier: each text's label and the probability of every label."""
    from lorapipe.phases.predict import classifier_settings, classify, read_rows

    rows = [(t, text_pair) for t in texts]
    if rows_file:
        try:
            rows += read_rows(rows_file, text_key, text_pair_key)
        except ValueError as exc:
            fail(str(exc))
    if not rows:
        rows = [(line.strip(), text_pair) for line in sys.stdin if line.strip()]
    if not rows:
        raise click.UsageError("give a TEXT, --prompt TEXT (repeatable), --file rows.jsonl, or lines on stdin")
    settings = classifier_settings(folder)
    if settings["text_pair"] and any(pair is None for _, pair in rows):
        raise click.UsageError("this classifier was trained on text pairs: give --pair TEXT, or a --file whose rows "
                               f"have '{text_pair_key}'")
    loaded, tokenizer = _load_for_predict(folder, as_json)
    for text, pair in rows:
        answer = classify(loaded, tokenizer, text, pair, settings["max_length"])
        if as_json:
            click.echo(json.dumps(answer, ensure_ascii=False))
            continue
        ranked = sorted(answer["probabilities"].items(), key=lambda kv: -kv[1])
        click.echo(f"> {text}" + (f" || {pair}" if pair else ""))
        click.echo(f"{answer['label']}  ({', '.join(f'{name} {p:.3f}' for name, p in ranked)})")
    return 0


# ----------------------------------------------------------------------------------------------------- schedule

@cli.group(invoke_without_command=True)
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config of the run to repeat.")
@click.option("--cron", help="Five-field cron expression, e.g. \"0 3 * * *\" (03:00 every day).")
@click.option("--name", help="Schedule name (default: <register.model_name>-retrain).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--run-config", type=click.Path(dir_okay=False),
              help="ZenML run configuration (step resources, GPU node, image), e.g. configs/stacks/kubernetes-gpu.run.yaml.")
@click.pass_context
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
        _echo_json(rows)
    elif not rows:
        click.echo("no schedule: `lorapipe schedule -c CONFIG --cron EXPR` on a stack that can schedule")
    for r in rows if not as_json else []:
        click.echo(f"{r['name']:<32} cron \"{r['cron']}\"  {'active' if r['active'] else 'paused'}  created "
                   f"{r['created']}")
    return 0


@schedule.command("delete")
@click.argument("name")
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


# ------------------------------------------------------------------------------------------------ lineage, runs

@cli.command()
@click.argument("model", required=False)
@click.option("--version", default=None, help="A version name or a stage (production, staging, latest).")
@click.option("--dataset", metavar="SHA256|FILE",
              help="The other direction: every model version trained on this data (a data file, or the sha256 of "
                   "the data files, the validated rows or the train split).")
@click.option("--json", "as_json", is_flag=True, help="The lineage as JSON, for scripts.")
def lineage(model: Optional[str], version: Optional[str], dataset: Optional[str], as_json: bool) -> int:
    """Show what made a model version, or (--dataset) which model versions a dataset trained.

    MODEL is NAME, NAME:VERSION or NAME:STAGE (production, staging, latest).

    \b
    Examples:
      lorapipe lineage lorapipe-quickstart:production
      lorapipe lineage lorapipe-quickstart --version 0a1b2c3d4e5f6a7b --json
      lorapipe lineage --dataset data/quickstart/wwdc25_train_slice.jsonl
    """
    from lorapipe_app.lineage import find_model_version, lineage_tree, render_tree, versions_trained_on

    if dataset:
        if model or version:
            raise click.UsageError("lineage takes a MODEL (model version -> data) or --dataset (data -> model "
                                   "versions), not both")
        import re

        if not Path(dataset).is_file() and not re.fullmatch(r"[0-9a-fA-F]{64}", dataset):
            raise click.UsageError(f"--dataset {dataset}: neither a data file nor a sha256 (64 hex characters)")
        wanted, found = versions_trained_on(dataset)
        if as_json:
            _echo_json({"dataset": dataset, "sha256": sorted(wanted), "model_versions": found})
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
        _echo_json(tree)
    else:
        click.echo("\n".join(render_tree(tree)))
    return 0


@cli.command()
@click.option("-n", "--limit", type=int, default=10, show_default=True, help="How many recent runs.")
@click.option("--json", "as_json", is_flag=True)
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
        _echo_json(rows)
    else:
        click.echo("\n".join(format_runs(rows)))
    return 0


@cli.command()
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
    from lorapipe_app.watch import NothingToWatch, find_training, watch as follow

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


# --------------------------------------------------------------------------------------------------------- misc

@cli.command("build-tiny-model")
@click.option("--out", default="models/tiny-llama", show_default=True, type=click.Path(file_okay=False))
@click.option("--corpus", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL files to train the tokenizer on (default: the quickstart data).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.Choice(["tiny", "25m", "56m-v32k"]), default="tiny", show_default=True,
              help="Model shape: tiny (0.2 M parameters: quickstart, tests), 25m (~25 M: benchmarks) or 56m-v32k (~56 M, 32k vocabulary: memory benchmarks).")
@click.option("--encoder", is_flag=True,
              help="A tiny random BERT-style encoder with a WordPiece tokenizer instead (task: classification); its "
                   "tokenizer is trained on the texts of --corpus (default: the classification example's data).")
def build_tiny_model(out: str, corpus: tuple, seed: int, size: str, encoder: bool) -> int:
    """Build the deterministic tiny Llama the quickstart and tests train (no download).

    \b
    Examples:
      lorapipe build-tiny-model --out models/tiny-llama
      lorapipe build-tiny-model --size 25m --out models/llama-25m   # a model where arithmetic matters
      lorapipe build-tiny-model --encoder --out models/tiny-encoder  # for configs/classification-quickstart.yaml
    """
    from lorapipe.models.tiny import build_tiny_encoder, build_tiny_model as build

    if encoder:
        from lorapipe.data.formats import read_records

        files = [str(p) for p in corpus] or [str(REPO_ROOT / "data" / "classification" / "source_routing.jsonl")]
        records = read_records(files).records
        texts = [r.text for r in records if r.text] + [m["content"] for r in records for m in r.messages
                                                       if m.get("content")]
        click.echo(f"tiny encoder written to {build_tiny_encoder(out, texts, seed=seed)}")
        return 0
    texts = [Path(p) for p in corpus] or [REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"]
    click.echo(f"{size} model written to {build(out, texts, seed=seed, size=size)}")
    return 0


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def backends(as_json: bool) -> int:
    """List the training backends, what each supports and what is installed here.

    \b
    Example:
      lorapipe backends --json
    """
    from lorapipe.catalog import BACKENDS, OPTIONAL_FEATURES
    from lorapipe.hardware.probe import package_version

    rows = []
    for spec in BACKENDS.values():
        missing = [m for m in spec.modules if not package_version(m)]
        rows.append({"backend": spec.name, "installed": not missing, "missing": missing, "summary": spec.summary,
                     "devices": list(spec.devices), "quantization": list(spec.quantization),
                     "optimizers": list(spec.optimizers), "features": list(spec.features),
                     "adapter_format": spec.adapter_format, "install": spec.install, "tasks": list(spec.tasks),
                     "methods": list(spec.methods), "limits": spec.limits_note})
    if as_json:
        _echo_json(rows)
        return 0
    for r in rows:
        state = "installed" if r["installed"] else f"not installed (missing {', '.join(r['missing'])})"
        click.echo(f"{r['backend']}: {r['summary']}")
        click.echo(f"  {state}; install: {r['install']}")
        click.echo(f"  devices {', '.join(r['devices'])}; quantization {', '.join(r['quantization'])}; "
                   f"adapter {r['adapter_format']}")
        click.echo(f"  optimizers {', '.join(r['optimizers'])}")
        click.echo(f"  tasks {', '.join(r['tasks'])}; train.method {', '.join(r['methods'])}"
                   + (f" ({r['limits']})" if r["limits"] else ""))
        lacks = [f for f in OPTIONAL_FEATURES if f not in r["features"]]
        click.echo(f"  train options it lacks (refused at preflight): {', '.join(lacks) if lacks else 'none'}")
    return 0


# --------------------------------------------------------------------------------------------------------- main

# commands that never open the ZenML store (they need none on a fresh machine)
STORE_FREE_COMMANDS = {None, "validate", "estimate-memory", "build-tiny-model", "backends", "watch"}


def main(argv: Optional[list[str]] = None) -> int:
    """The `lorapipe` entry point; returns the exit code (tests call it in-process)."""
    quiet_env()
    from lorapipe_app.api import user_error_types

    try:
        args = sys.argv[1:] if argv is None else argv
        command = next((a for a in args if not a.startswith("-")), None)
        if command not in STORE_FREE_COMMANDS and not any(a in ("-h", "--help") for a in args):
            from lorapipe_app.api import ensure_store

            ensure_store()  # two commands on a new machine must not race to create the store
        result = cli.main(args=argv, prog_name="lorapipe", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.UsageError as exc:
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:  # fail(): a user's mistake found by the command itself
        if Settings.debug:
            traceback.print_exc()
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except user_error_types() as exc:  # a user's mistake: its message says what to fix
        if Settings.debug:
            traceback.print_exc()
        click.echo(f"\nerror: {exc}", err=True)
        return 1
    finally:
        Settings.debug = False
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
