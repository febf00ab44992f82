"""`lorapipe` command line: run the pipeline, validate data, build the tiny model, show lineage.

User mistakes (bad config, bad data, a plan that cannot run) end with a clear message and exit code 1
(2 for usage errors), never a bare traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


def use_repo_as_source_root() -> None:
    """ZenML imports steps by module path from its source root: make that this repository."""
    from zenml.utils import source_utils

    source_utils.set_custom_source_root(str(REPO_ROOT))


def _quiet_env() -> None:
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # weave (wandb flavor) reports errors to its own service


# Libraries that log at import what users read as failures: torchao's optional CUDA kernels, torch's pytree
# deprecation notes, bitsandbytes' optional CPU kernel, Great Expectations registering its API. lorapipe says what
# matters in its own lines; these stay available with --verbose.
NOISY_LOGGERS = {"torchao": logging.ERROR, "torch.utils._pytree": logging.ERROR,
                 "bitsandbytes.backends.cpu.ops": logging.ERROR, "great_expectations": logging.WARNING}


def _quiet_loggers() -> None:
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def _user_errors() -> tuple:
    from lorapipe.backends.base import BackendUnavailable
    from lorapipe.data.validation import DataValidationError
    from lorapipe.hardware.plan import PlanError
    from steps.merge import MergeCheckFailed

    return (DataValidationError, PlanError, BackendUnavailable, MergeCheckFailed)


def failed_step_message(user_errors: tuple) -> Optional[str]:
    """The message of the latest run's failed step when it failed on a user's mistake, else None."""
    from zenml.client import Client

    runs = Client().list_pipeline_runs(sort_by="desc:created", size=1).items
    if not runs:
        return None
    names = {e.__name__ for e in user_errors}
    for name, step in runs[0].steps.items():
        info = step.exception_info
        if info is not None and (info.source or "").rsplit(".", 1)[-1] in names:
            return f"step {name} failed: {info.message}"
    return None


def model_version_name(data_sha: str, config_sha: str) -> str:
    """Named by data + config, so a cached re-run reuses its version instead of leaving an empty one."""
    return hashlib.sha256(f"{data_sha}:{config_sha}".encode()).hexdigest()[:16]


def cmd_run(args: argparse.Namespace) -> int:
    from lorapipe.config import ConfigError, load_config
    from lorapipe.data.formats import file_fingerprint

    try:
        cfg = load_config(args.config, args.set or [])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = Path.cwd()
    resolved = cfg.resolve_paths(base)
    missing = [p for p in resolved.data.paths if not Path(p).exists()]
    if missing:
        print(f"error: {args.config}: data.paths: not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    from lorapipe.models.locate import model_problem

    problem = model_problem(cfg.model.name_or_path, cfg.model.revision, base_dir=base)
    if problem:  # before ZenML and torch load: seconds, not a traceback from inside a step minutes later
        print(f"error: {args.config}: {problem}", file=sys.stderr)
        return 1
    data_sha = file_fingerprint(resolved.data.paths)
    identity = cfg.model_copy(deep=True)
    identity.data.paths = [Path(p).name for p in cfg.data.paths]
    # where checkpoints live and which one a run resumes from do not change what the config asks for
    identity.train.output_root, identity.train.resume, identity.train.resume_from = "", True, None
    config_sha = identity.fingerprint()
    version = model_version_name(data_sha, config_sha)

    from zenml import Model

    use_repo_as_source_root()
    from pipelines.finetune import finetune

    USER_ERRORS = _user_errors()

    pipe = finetune.with_options(
        model=Model(name=cfg.register.model_name, version=version,
                    description=f"LoRA fine-tune of {cfg.model.name_or_path}",
                    tags=["lorapipe"]),
        enable_cache=not args.no_cache,
    )
    start = time.perf_counter()
    try:
        run = pipe(config=resolved.model_dump(mode="json"), data_files_sha256=data_sha, config_sha256=config_sha)
    except USER_ERRORS as exc:  # a user's mistake: its message says what to fix; no traceback
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError:
        # ZenML reports a failed step as "Pipeline run has failed ..."; the step's own exception is in the store
        failure = failed_step_message(USER_ERRORS)
        if failure is None:
            raise
        print(f"\nerror: {failure}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print_summary(run, cfg.register.model_name, version, seconds)
    return 0


def print_summary(run, model_name: str, version: str, seconds: float) -> None:
    from zenml.client import Client

    client = Client()
    run = client.get_pipeline_run(run.id)
    steps = run.steps
    cached = sorted(n for n, s in steps.items() if str(s.status).endswith("cached"))
    mv = client.get_model_version(model_name, version)
    metrics = steps["evaluate_model"].outputs["eval_metrics"][0].load()
    adapter_uri = steps["train_adapter"].outputs["adapter"][0].uri
    merged_uri = steps["merge_model"].outputs["merged_model"][0].uri
    print("\n" + "=" * 72)
    print(f"lorapipe run {run.name}: {run.status} in {seconds:.1f}s ({len(cached)} of {len(steps)} steps from cache)")
    print(f"model        {model_name} version {version}, stage: {mv.stage or 'none'}")
    print(f"perplexity   base {metrics.base.perplexity:.2f} -> tuned {metrics.tuned.perplexity:.2f} "
          f"({metrics.perplexity_gain:+.1%}) on {metrics.scored_rows} test rows")
    if metrics.tuned.rouge_l is not None:
        print(f"generation   ROUGE-L base {metrics.base.rouge_l:.3f} -> tuned {metrics.tuned.rouge_l:.3f}; "
              f"stop rate tuned {metrics.tuned.stop_rate:.0%}")
    print(f"adapter      {adapter_uri}/folder")
    print(f"merged model {merged_uri}/folder")
    print(f"store        {client.zen_store.url}")
    print("look further:")
    print(f"  lorapipe lineage {model_name} --version {version}")
    print("  make dashboard        # local ZenML dashboard: runs, artifacts, model versions")
    print("=" * 72)


def cmd_validate(args: argparse.Namespace) -> int:
    from lorapipe.data.validation import validate_dataset

    tokenizer = None
    if args.model:
        from lorapipe.models.loading import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.model)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is a usage error
            print(f"error: --model {args.model}: cannot load its tokenizer: {exc}", file=sys.stderr)
            return 2
    for p in args.paths:
        if not Path(p).exists():
            print(f"error: {p}: file not found", file=sys.stderr)
            return 2
    # libraries log to stdout; keep stdout for the report alone (pipe-able JSON)
    with contextlib.redirect_stdout(sys.stderr):
        outcome = validate_dataset(args.paths, args.format, args.prompt_key, args.completion_key,
                                   tokenizer=tokenizer, max_seq_length=args.max_seq_length,
                                   overlength=args.overlength, on_bad_rows="fail", min_rows=1)
    if args.json:
        print(json.dumps(outcome.report.model_dump(mode="json"), indent=2))
    else:
        print("\n".join(outcome.report.summary_lines()))
    return 0 if outcome.report.errors == 0 and outcome.report.passed else 1


def cmd_build_tiny_model(args: argparse.Namespace) -> int:
    from lorapipe.models.tiny import build_tiny_model

    corpus = [Path(p) for p in args.corpus] if args.corpus else [REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"]
    out = build_tiny_model(args.out, corpus, seed=args.seed)
    print(f"tiny model written to {out}")
    return 0


def cmd_lineage_of_dataset(args: argparse.Namespace) -> int:
    """Every model version trained on a dataset: given its sha256 (of the data files, the validated rows or the
    train split, as versions record them) or a data file, whose bytes are hashed as the pipeline does."""
    from zenml.client import Client
    from zenml.utils.pagination_utils import depaginate_stream

    from lorapipe.data.formats import file_fingerprint

    given = args.dataset
    wanted = {given.lower()} if not Path(given).exists() else {file_fingerprint([given])}
    client = Client()
    found = []
    for model in depaginate_stream(client.list_models, size=100):
        for mv in depaginate_stream(client.list_model_versions, model=model.id, hydrate=True, size=100):
            data = mv.run_metadata.get("data") or {}
            keys = {name: data.get(key) for name, key in (("data files", "files_sha256"),
                                                          ("validated rows", "validated_sha256"),
                                                          ("train split", "train_split_sha256"))}
            matched = [name for name, value in keys.items() if value and value.lower() in wanted]
            if matched:
                found.append((model.name, mv.name, mv.stage or "none", ", ".join(matched), str(mv.created)[:19]))
    if not found:
        print(f"no model version was trained on {given} (sha256 {', '.join(sorted(wanted))})", file=sys.stderr)
        return 1
    print(f"model versions trained on {given}:")
    for name, version, stage, matched, created in sorted(found, key=lambda r: r[4]):
        print(f"  {name} version {version}  stage {stage}  (matched: {matched}; registered {created})")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from zenml.client import Client

    if args.dataset:
        if args.model or args.version:
            print("error: lineage takes a MODEL (model version -> data) or --dataset (data -> model versions), "
                  "not both", file=sys.stderr)
            return 2
        return cmd_lineage_of_dataset(args)
    if not args.model:
        print("error: lineage needs a MODEL, or --dataset SHA256|FILE for the other direction", file=sys.stderr)
        return 2
    client = Client()
    try:
        if args.version:
            mv = client.get_model_version(args.model, args.version)
        else:
            page = client.list_model_versions(model=args.model, sort_by="desc:created", size=1)
            if not page.items:
                raise KeyError(f"model {args.model} has no version yet")
            mv = client.get_model_version(args.model, page.items[0].name)
    except KeyError as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    meta = {k: v for k, v in mv.run_metadata.items()}
    if "report" in meta:  # what the register step wrote: the same content as its dashboard report
        from lorapipe.registry import VersionReport, render_text

        print("\n".join(render_text(VersionReport(**meta["report"]), current_stage=mv.stage or "none")))
        return 0
    print(f"model {args.model} version {mv.name} (stage: {mv.stage or 'none'})")
    data = meta.get("data", {})
    print(f"  data files sha256      {data.get('files_sha256', '?')}")
    print(f"  validated rows sha256  {data.get('validated_sha256', '?')}  ({data.get('rows_accepted', '?')} rows accepted, "
          f"{data.get('rows_rejected', '?')} rejected)")
    print(f"  base model             {meta.get('base_model', {})}")
    print(f"  code                   {meta.get('code', {})}")
    print(f"  metrics                {meta.get('metrics', {})}")
    print("  artifacts (latest version of each):")
    for name, versions in sorted({**mv.data_artifacts, **mv.model_artifacts}.items()):
        latest = max(versions, key=lambda v: int(v) if str(v).isdigit() else 0)
        print(f"    {name} v{latest}: {versions[latest].uri}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    """The backend catalog, with what is installed here (no torch import)."""
    from lorapipe.backends.catalog import BACKENDS, OPTIONAL_FEATURES
    from lorapipe.hardware.probe import package_version

    rows = []
    for spec in BACKENDS.values():
        missing = [m for m in spec.modules if not package_version(m)]
        rows.append({"backend": spec.name, "installed": not missing, "missing": missing, "summary": spec.summary,
                     "devices": list(spec.devices), "quantization": list(spec.quantization),
                     "optimizers": list(spec.optimizers), "features": list(spec.features),
                     "adapter_format": spec.adapter_format, "install": spec.install})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "installed" if r["installed"] else f"not installed (missing {', '.join(r['missing'])})"
        print(f"{r['backend']}: {r['summary']}")
        print(f"  {state}; install: {r['install']}")
        print(f"  devices {', '.join(r['devices'])}; quantization {', '.join(r['quantization'])}; "
              f"adapter {r['adapter_format']}")
        print(f"  optimizers {', '.join(r['optimizers'])}")
        lacks = [f for f in OPTIONAL_FEATURES if f not in r["features"]]
        print(f"  train options it lacks (refused at preflight): {', '.join(lacks) if lacks else 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapipe", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' own import-time log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the fine-tuning pipeline")
    run.add_argument("-c", "--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    run.add_argument("--no-cache", action="store_true", help="re-run every step (checkpoints still resume)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.epochs=2")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="validate data files without ZenML")
    val.add_argument("paths", nargs="+")
    val.add_argument("--model", help="model folder or hub id: enables the token checks and learns-to-stop audit")
    val.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"])
    val.add_argument("--prompt-key", default="prompt")
    val.add_argument("--completion-key", default="completion")
    val.add_argument("--max-seq-length", type=int, default=None)
    val.add_argument("--overlength", default="fail", choices=["drop", "truncate", "fail"])
    val.add_argument("--json", action="store_true", help="print the full report as JSON")
    val.set_defaults(func=cmd_validate)

    tiny = sub.add_parser("build-tiny-model", help="build the deterministic tiny Llama used by the quickstart and tests")
    tiny.add_argument("--out", default="models/tiny-llama")
    tiny.add_argument("--corpus", nargs="*", help="JSONL files to train the tokenizer on (default: quickstart data)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_build_tiny_model)

    bk = sub.add_parser("backends", help="list the training backends, what each supports and what is installed")
    bk.add_argument("--json", action="store_true")
    bk.set_defaults(func=cmd_backends)

    lin = sub.add_parser("lineage", help="a model version back to its data, or (--dataset) data to every model "
                                         "version it trained")
    lin.add_argument("model", nargs="?")
    lin.add_argument("--version", default=None)
    lin.add_argument("--dataset", metavar="SHA256|FILE", help="list the model versions trained on this data: a data "
                     "file, or the sha256 of the data files, the validated rows or the train split")
    lin.set_defaults(func=cmd_lineage)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_loggers()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
