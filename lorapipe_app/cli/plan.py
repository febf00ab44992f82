"""`lorapipe preflight`, `lorapipe estimate-memory` and `lorapipe backends`: what a config needs on this machine, what
a model needs in memory, and what each backend can do."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from lorapipe.config import LorapipeConfig, ModelSection, TrainSection
from lorapipe.hardware.memory import MemoryInputs
from lorapipe.hardware.size_guide import GUIDE_METHODS
from lorapipe.units import format_bytes, format_gib
from lorapipe_app.cli.common import choice, config_options, echo_json, fail, opens_store


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
    from lorapipe.hardware.facts import ModelFactsError
    from lorapipe.hardware.plan import PlanError, decide_plan, model_size, user_set_keys
    from lorapipe.hardware.preflight import build_report
    from lorapipe.hardware.probe import probe
    from lorapipe.phases.measure import probe_checks
    from lorapipe_app.api import prepare

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


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the report and the recommended config as JSON.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write preflight_report.json and recommended_config.json into this folder.")
@click.option("--probe", "probe_now", is_flag=True,
              help="Also run 3 training steps and one evaluation batch and measure their peaks (preflight.probe).")
@opens_store
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
        echo_json({"report": report.model_dump(mode="json"), "recommended_config": recommended,
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


def _print_memory(plan: Any) -> None:
    memory = plan.train.memory
    click.echo(f"memory:   training {format_gib(memory.total_gib)}, evaluation "
               f"{format_gib(plan.evaluate.predicted_peak_gib)}, merge {format_gib(plan.merge.predicted_peak_gib)} "
               f"(budget {format_gib(memory.budget_gib)}); training = weights {format_gib(memory.weights_gib)} + LoRA "
               f"and optimizer {format_gib(memory.lora_and_optimizer_gib)} + activations and logits "
               f"{format_gib(memory.activations_gib)} + overhead")
    for phase in (plan.evaluate, plan.merge):
        for warning in phase.warnings:
            click.echo(f"          warning: {warning}")


def _all_phases(plan: Any) -> Any:
    """The plan's memory of every phase in one estimate (the training plan carries only training's)."""
    memory = plan.train.memory
    return memory.model_copy(update={"terms": memory.terms + plan.evaluate.memory_terms + plan.merge.memory_terms,
                                     "eval_peak_gib": plan.evaluate.predicted_peak_gib,
                                     "merge_peak_gib": plan.merge.predicted_peak_gib})


def _print_terms(estimate: Any) -> None:
    for phase, title in (("train", "training"), ("eval", "evaluation"), ("merge", "merge")):
        terms = [t for t in estimate.terms if t.phase == phase]
        click.echo(f"{title} peak: {format_bytes(sum(t.bytes for t in terms))}")
        width = max(len(t.name) for t in terms)
        for t in terms:
            click.echo(f"  {t.name:<{width}}  {format_bytes(t.bytes):>10}   {t.formula}")


@click.command("estimate-memory")
@click.argument("model", required=False)
@click.option("-c", "--config", type=click.Path(dir_okay=False),
              help="Estimate a config's plan on this machine instead.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="With -c: override a config key.")
@click.option("--method", type=click.Choice(list(GUIDE_METHODS)), default="lora", show_default=True,
              help="qlora: NF4 double-quantised base; full: every weight trained (--task classification).")
@click.option("--task", type=choice(LorapipeConfig, "task"), default="sft", show_default=True,
              help="classification: the model as a sequence classifier (a head of --num-labels, no generation).")
@click.option("--num-labels", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--guide", is_flag=True, help="Which method fits which memory size (8-80 GiB), from the memory model, "
                                            "for MODEL and every --guide-model.")
@click.option("--guide-model", "guide_models", multiple=True, help="With --guide: another model to compare.")
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lora-rank", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lora-targets", default="all-linear", show_default=True, metavar="all-linear|attention|NAME,NAME",
              help="The modules LoRA wraps: all-linear, attention, or a comma list (q_proj,v_proj).")
@click.option("--quantization", type=choice(MemoryInputs, "quantization"), default=None,
              help="The base's quantization (default: nf4 for --method qlora, else none).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="NF4 with its scales quantised again (train.double_quant).")
@click.option("--loss-chunks", type=click.IntRange(min=1), default=1, show_default=True,
              help="The fp32 loss over the full logits in N chunks (torchtune's chunked cross-entropy).")
@click.option("--sft-loss", type=choice(MemoryInputs, "sft_loss"), default="backend", show_default=True,
              help="full_logits: the loss over every position's logits (a plain Trainer, LLaMA-Factory) instead of "
                   "the backend's (hf: TRL's chunked_nll).")
@click.option("--merge-dtype", type=choice(MemoryInputs, "merge_dtype"), default="bfloat16", show_default=True)
@click.option("--eval-dtype", type=choice(MemoryInputs, "eval_dtype"), default=None,
              help="Evaluation's dtype (default: float32 on the CPU, else the compute dtype).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True)
@click.option("--optimizer", type=choice(TrainSection, "optimizer"), default="adamw_torch", show_default=True)
@click.option("--device", type=choice(TrainSection, "device", exclude=("auto",)), default="cuda", show_default=True,
              help="Where training runs: decides the overheads (CUDA context; the process on CPU).")
@click.option("--dtype", type=choice(TrainSection, "dtype", exclude=("auto",)), default=None,
              help="Compute dtype (default: bfloat16 on cuda/mps, float32 on cpu).")
@click.option("--backend", type=choice(TrainSection, "backend", exclude=("auto",)), default="hf", show_default=True)
@click.option("--attn-implementation", type=choice(ModelSection, "attn_implementation"), default="sdpa",
              show_default=True)
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--load-test", is_flag=True, help="Also build the model on the meta device and check the count.")
@click.option("--json", "as_json", is_flag=True, help="Peaks in bytes and the per-term breakdown as JSON.")
def estimate_memory(model: Optional[str], config: Optional[str], overrides: tuple, method: str, seq_len: int,
                    micro_batch_size: int, lora_rank: int, lora_targets: str, gradient_checkpointing: bool,
                    optimizer: str, device: str, dtype: Optional[str], backend: str, attn_implementation: str,
                    eval_batch_size: int, max_new_tokens: int, load_test: bool, as_json: bool, task: str = "sft",
                    num_labels: int = 2, guide: bool = False, guide_models: tuple = (),
                    quantization: Optional[str] = None, double_quant: bool = True, loss_chunks: int = 1,
                    merge_dtype: str = "bfloat16", eval_dtype: Optional[str] = None, sft_loss: str = "backend") -> int:
    """Estimate the peak memory of LoRA/QLoRA training, evaluation and merge from the model's config alone.

    MODEL is a local folder or a hub id (its config.json is read from the cache or the hub; no weights). Every term
    is printed with its formula (docs/MEMORY.md explains them).

    \b
    Examples:
      lorapipe estimate-memory meta-llama/Llama-3.1-8B --method qlora --seq-len 2048 --micro-batch-size 2
      lorapipe estimate-memory models/tiny-llama --device cpu --seq-len 512 --json
      lorapipe estimate-memory meta-llama/Llama-2-7b-hf --method qlora --lora-targets q_proj,v_proj --loss-chunks 8
      lorapipe estimate-memory -c configs/deepseek-coder-6.7b-qlora-24gb-balanced.yaml
      lorapipe estimate-memory bert-base-uncased --task classification --method full --seq-len 128 --micro-batch-size 32
      lorapipe estimate-memory bert-base-uncased --task classification --guide --guide-model bert-large-uncased \
          --seq-len 128 --micro-batch-size 32
    """
    from lorapipe.hardware.facts import ModelFactsError, model_facts
    from lorapipe.hardware.facts import load_test as meta_count
    from lorapipe.hardware.memory import MemoryInputs, estimate

    if config:
        report, plan, _cfg = _preflight(config, overrides, allow_probe=False)
        if plan is None:
            fail(f"{config}: no memory estimate, the plan refuses this config:\n"
                 + "\n".join(f"  - {c.name}: {c.measured} ({c.detail})" for c in report.failed))
        if as_json:
            echo_json(_all_phases(plan).as_json())
            return 0
        _print_terms(_all_phases(plan))
        return 0 if plan.train.memory.total_gib <= plan.train.memory.budget_gib else 1
    if not model:
        raise click.UsageError("give a MODEL (local folder or hub id) or -c CONFIG")
    if method == "full" and task != "classification":
        raise click.UsageError("--method full is for --task classification (task: sft trains LoRA)")
    targets: str | list[str] = lora_targets
    if lora_targets not in ("all-linear", "attention"):
        targets = [name.strip() for name in lora_targets.split(",") if name.strip()]
        if not targets:
            raise click.UsageError("--lora-targets: all-linear, attention, or module names separated by commas")
    if guide:
        return _size_guide([model, *guide_models], task, num_labels, seq_len, micro_batch_size, device, dtype,
                           optimizer, lora_rank, targets, as_json)
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
    if isinstance(targets, list):
        from lorapipe.hardware.memory import target_shapes

        unknown = [n for n in targets if not target_shapes(facts, [n])]
        if unknown:
            fail(f"--lora-targets {','.join(unknown)}: no linear layer of {model} is named so; its layers have "
                 f"{', '.join(s.name for s in facts.linears)}")
    inputs = MemoryInputs(
        device=device, backend=backend, dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
        quantization=quantization or ("nf4" if method == "qlora" else "none"), double_quant=double_quant,
        micro_batch_size=micro_batch_size, seq_len=seq_len, lora_r=lora_rank, lora_targets=targets,
        gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, attn_implementation=attn_implementation,
        eval_batch_size=eval_batch_size, max_new_tokens=max_new_tokens, task=task, num_labels=num_labels,
        full_finetune=method == "full", loss_chunks=loss_chunks, merge_dtype=merge_dtype, eval_dtype=eval_dtype,
        sft_loss=sft_loss)
    result = estimate(facts, inputs)
    if as_json:
        echo_json({"model": model, "parameters": facts.total_parameters,
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
                dtype: Optional[str], optimizer: str, lora_rank: int, lora_targets: str | list[str],
                as_json: bool) -> int:
    """estimate-memory --guide: which method fits which memory size, from the memory model (not a static table)."""
    from lorapipe.hardware.facts import ModelFactsError, model_facts
    from lorapipe.hardware.size_guide import format_size_guide, size_guide

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
        echo_json(rows)
        return 0
    click.echo("\n".join(format_size_guide(rows)))
    return 0


@click.command()
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
        echo_json(rows)
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


