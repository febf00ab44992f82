"""Trigger a fine-tune, or schedule one, from Python: what `lorapipe run` and `lorapipe schedule` call.

    from lorapipe_app import run_finetune
    result = run_finetune("configs/quickstart.yaml", overrides=["train.max_steps=20"])
    print(result.model_version, result.stage, result.metrics.tuned.perplexity, result.cached_steps)

A run on data whose bytes did not change is served from ZenML's cache and trains nothing: the model version is
named by the sha256 of the data and of the config, so the re-run reuses its version. Changed data trains again and
registers a new version. ZenML is imported inside the functions: `import lorapipe` stays light.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

from lorapipe.config import ConfigError, LorapipeConfig, ModelSection, load_config

log = logging.getLogger("lorapipe")
REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINE_NAME = "finetune"
# ZenML 0.98 orchestrators whose config accepts `Schedule(cron_expression=...)` (checked in their flavors);
# local, local_docker, ssh, modal, lightning, tekton and skypilot refuse schedules.
SCHEDULING_FLAVORS = ("kubernetes", "kubeflow", "vertex", "sagemaker", "azureml", "airflow", "databricks", "hyperai")
STACK_FILE = "configs/stacks/kubernetes-gpu.stack.yaml"


class UserMistake(Exception):
    """Something the user can fix: the message is one paragraph that names the key or file and the fix."""


class RunFailed(UserMistake):
    """A step failed on a user's mistake (bad data, a plan that cannot run, a failed merge check)."""

    def __init__(self, message: str, run_id: Optional[str] = None):
        self.run_id = run_id
        super().__init__(message)


class SchedulingUnsupported(UserMistake):
    pass


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input is wrong", wherever they are raised (here, or inside a step)."""
    from lorapipe.backends.base import BackendUnavailable
    from lorapipe.data.sources import DataSourceError
    from lorapipe.data.validation import DataValidationError
    from lorapipe.evaluation.merge_check import MergeCheckFailed
    from lorapipe.evaluation.metrics import EvaluationError
    from lorapipe.hardware.plan import PlanError
    from lorapipe.training.preemption import PreemptedError

    return (UserMistake, ConfigError, DataSourceError, DataValidationError, PlanError, BackendUnavailable,
            MergeCheckFailed, EvaluationError, PreemptedError)


def ensure_store() -> None:
    """Create (and migrate) the local ZenML store under a file lock the first time it is used: ZenML 0.98 creates a
    fresh SQLite store's tables without one, so two commands started together on a new machine would race (one
    fails with "table project already exists"). Once the store exists this costs one stat."""
    import os

    from zenml.utils.io_utils import get_global_config_directory

    home = Path(get_global_config_directory())
    if os.environ.get("ZENML_STORE_URL") or (home / "local_stores" / "default_zen_store" / "zenml.db").exists():
        return  # a remote or configured store, or a local one that exists: nothing to create
    try:
        import fcntl
    except ImportError:  # not a Unix system: no lock (the race needs two first uses at once)
        return
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lorapipe-store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second command waits here while the first creates the store
        try:
            from zenml.client import Client

            Client().zen_store  # noqa: B018 - creating the store is the point
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def use_repo_as_source_root() -> None:
    """ZenML imports steps by module path from its source root: make that this repository."""
    from zenml.utils import source_utils

    source_utils.set_custom_source_root(str(REPO_ROOT))


def model_version_name(data_sha: str, config_sha: str) -> str:
    """Named by data + config, so a cached re-run reuses its version instead of leaving an empty one."""
    return hashlib.sha256(f"{data_sha}:{config_sha}".encode()).hexdigest()[:16]


@dataclass
class PreparedRun:
    """A config checked before ZenML starts: paths absolute, data found, model loadable, identity computed."""

    config: LorapipeConfig  # paths resolved
    source: str  # the config file, or "config" for one given as an object
    data_sha256: Optional[str]  # None for an artifact source (read when the run starts)
    config_sha256: str
    user_set: list[str] = field(default_factory=list)  # dotted keys the config set (train.profile chooses the rest)


def load(config: Union[str, Path, LorapipeConfig, dict],
         overrides: Optional[list[str]] = None) -> tuple[LorapipeConfig, str]:
    from lorapipe.config import apply_overrides, validate_config

    if isinstance(config, (str, Path)):
        return load_config(config, overrides or []), str(config)
    if isinstance(config, LorapipeConfig):
        # only what was set: the keys a config sets are what train.profile leaves alone (lorapipe.hardware.plan)
        data = config.model_dump(mode="json", exclude_unset=True)
    else:
        data = dict(config)
    return validate_config(apply_overrides(data, overrides or [])), "config"


def prepare(config: Union[str, Path, LorapipeConfig, dict], overrides: Optional[list[str]] = None,
            base_dir: Optional[Path] = None, need_data_now: bool = True) -> PreparedRun:
    """Everything that can be checked in seconds, before the pipeline starts: config keys, data source, model."""
    use_repo_as_source_root()  # before anything imports the steps (the data source is read the way they read it)
    from lorapipe.data.sources import DataSourceError, expand_paths
    from lorapipe.models.locate import model_problem

    cfg, source = load(config, overrides)
    base = Path(base_dir or Path.cwd())
    resolved = cfg.resolve_paths(base)
    problems: list[str] = []
    data_sha = None
    if need_data_now:  # the data as the run's first step will find it: its sha256 names the model version
        from steps.data_source import resolve_data

        try:
            data_sha = resolve_data(resolved.data, Path(resolved.train.output_root)).sha256
        except DataSourceError as exc:
            problems += exc.problems
    else:  # a schedule may wait for its first drop (patterns may match nothing yet)
        patterns = resolved.data.paths + [s.path for s in resolved.data.sources if s.path]
        problems += expand_paths(patterns, patterns_may_be_empty=True)[1] if patterns else []
    if names_registered_version(cfg.model.name_or_path, base):
        resolved.model, problem = resolve_registered_version(resolved.model)
        cfg.model.registered_version = resolved.model.registered_version  # a new SFT version is a new config
    else:
        problem = model_problem(cfg.model.name_or_path, cfg.model.revision, base_dir=base)
    if problem:
        problems.append(problem)
    else:  # the steps that read the model take it as a parameter: a changed local folder is a new cache key
        from lorapipe.models.locate import folder_fingerprint

        resolved.model.folder_fingerprint = folder_fingerprint(resolved.model.name_or_path)
    if problems:
        raise UserMistake(f"{source}: " + "\n".join(problems) if len(problems) == 1 else
                          f"{source}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems))
    identity = cfg.model_copy(deep=True)
    identity.data.paths = [Path(p).name for p in cfg.data.paths]
    for source in identity.data.sources:  # the name as written; a machine's folders are not what was asked
        source.path = Path(source.path).name if source.path else None
    # where checkpoints live and which one a run resumes from do not change what the config asks for
    identity.train.output_root, identity.train.resume, identity.train.resume_from = "", True, None
    from lorapipe.hardware.plan import user_set_keys

    user_set = sorted(user_set_keys(cfg.train, cfg.evaluate))
    config_sha = identity.fingerprint()
    if cfg.train.profile:  # with a profile, which knobs were set changes the plan: it is part of what was asked
        config_sha = hashlib.sha256(f"{config_sha}:{','.join(user_set)}".encode()).hexdigest()
    return PreparedRun(config=resolved, source=source, data_sha256=data_sha, config_sha256=config_sha,
                       user_set=user_set)


REGISTERED_VERSION = re.compile(r"[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+")


def names_registered_version(name_or_path: str, base_dir: Path) -> bool:
    """MODEL:STAGE or MODEL:VERSION (no hub id holds a colon), unless a folder of that name exists here."""
    return bool(REGISTERED_VERSION.fullmatch(name_or_path)) and not (base_dir / name_or_path).exists()


def resolve_registered_version(model: ModelSection) -> tuple[ModelSection, Optional[str]]:
    """model.name_or_path MODEL:STAGE (staging, production, latest) or MODEL:VERSION resolved to that version's
    merged model folder in the artifact store; (model, why not) when it cannot be."""
    from zenml.client import Client

    name, _, version = model.name_or_path.partition(":")
    key = "model.name_or_path"
    try:
        mv = Client().get_model_version(name, version)
    except (KeyError, ValueError, RuntimeError) as exc:
        return model, (f"{key}: {model.name_or_path} names no registered model version ({str(exc).splitlines()[0]}); "
                       f"`lorapipe lineage {name}` lists its versions and stages, or give a model folder or hub id")
    try:
        folder = mv.get_artifact("merged_model")
        path = folder.load().path if folder is not None else None
    except Exception as exc:  # noqa: BLE001 - an artifact that cannot be read is said, with the version
        return model, f"{key}: version {mv.name} of {name} has a merged model that cannot be read: {exc}"
    if path is None:
        return model, f"{key}: version {mv.name} of {name} has no merged model (was it registered by lorapipe?)"
    # the version itself, not its stage (which moves later): the same version resolved again is the same config
    label = f"{name}:{mv.name}" + (f" (asked as {model.name_or_path})" if version != mv.name else "")
    return model.model_copy(update={"name_or_path": str(path), "registered_version": label}), None


@dataclass
class FinetuneResult:
    """What a triggered run produced."""

    run: Any  # zenml PipelineRunResponse
    model_name: str
    model_version: str
    stage: str
    metrics: Any  # lorapipe.evaluation.metrics.EvalMetrics
    cached_steps: list[str]
    steps: int
    seconds: float
    adapter_uri: str
    merged_uri: str
    store_url: str = ""
    decision: str = ""  # why the version holds its stage, or why it was not promoted

    @property
    def trained(self) -> bool:
        return "train_adapter" not in self.cached_steps


# Failures raised inside steps whose message already says what to do: shown as one paragraph, like user mistakes
EXPLAINED_FAILURES = ("DataParallelLaunchError", "PreemptedError", "OutOfMemoryError", "DiskFullError")


def failed_step_message(since: Optional[Any] = None) -> Optional[str]:
    """The message of the failed step of this process's latest `finetune` run (started at or after `since`) when it
    failed on a user's mistake or an explained failure, else None."""
    from zenml.client import Client

    runs = Client().list_pipeline_runs(pipeline_name=PIPELINE_NAME, sort_by="desc:created", size=1).items
    if not runs or (since is not None and runs[0].created.replace(tzinfo=None) < since):
        return None
    names = {e.__name__ for e in user_error_types()} | set(EXPLAINED_FAILURES)
    for name, step in runs[0].steps.items():
        info = step.exception_info
        if info is not None and (info.source or "").rsplit(".", 1)[-1] in names:
            return f"step {name} failed: {info.message}"
    return None


def _pipeline(prepared: PreparedRun, version: Optional[str], enable_cache: bool, run_config: Optional[str],
              schedule: Any = None):
    from zenml import Model

    use_repo_as_source_root()
    from pipelines.finetune import finetune

    cfg = prepared.config
    options: dict[str, Any] = {
        "model": Model(name=cfg.register.model_name, version=version,
                       description=f"LoRA fine-tune of {cfg.model.name_or_path}", tags=["lorapipe"]),
        "enable_cache": enable_cache,
    }
    if run_config:
        if not Path(run_config).is_file():
            raise UserMistake(f"--run-config {run_config}: file not found (a ZenML run configuration, e.g. "
                              "configs/stacks/kubernetes-gpu.run.yaml)")
        options["config_path"] = str(run_config)
    if schedule is not None:
        options["schedule"] = schedule
    return finetune.with_options(**options)


def run_finetune(config: Union[str, Path, LorapipeConfig, dict], overrides: Optional[list[str]] = None, *,
                 enable_cache: bool = True, run_config: Optional[str] = None,
                 base_dir: Optional[Path] = None) -> FinetuneResult:
    """Run the pipeline on the active ZenML stack and return the run, its model version, stage and metrics.

    Args:
        config: a YAML path, a `LorapipeConfig` or a dict of sections.
        overrides: `dotted.key=value` strings, as `--set` takes them.
        enable_cache: False re-runs every step (training still resumes from its checkpoints).
        run_config: a ZenML run configuration file (step settings, resources, Docker) for a remote stack.
        base_dir: relative paths in the config are read from here (default: the working folder).

    Raises:
        UserMistake (or another of `user_error_types()`): the input is wrong; the message says how.
    """
    from zenml.client import Client

    ensure_store()
    prepared = prepare(config, overrides, base_dir)
    cfg = prepared.config
    version = model_version_name(prepared.data_sha256 or "", prepared.config_sha256)
    pipe = _pipeline(prepared, version, enable_cache, run_config)
    from datetime import datetime, timezone

    started = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=5)  # the store's clock is UTC
    start = time.perf_counter()
    try:
        run = pipe(config=cfg, config_sha256=prepared.config_sha256, user_set=prepared.user_set)
    except user_error_types():
        raise
    except RuntimeError:
        # ZenML reports a failed step as "Pipeline run has failed ..."; the step's own exception is in the store
        failure = failed_step_message(started)
        if failure is None:
            raise
        raise RunFailed(failure) from None
    seconds = time.perf_counter() - start
    client = Client()
    run = client.get_pipeline_run(run.id)
    steps = run.steps
    mv = client.get_model_version(cfg.register.model_name, version)
    return FinetuneResult(
        run=run, model_name=cfg.register.model_name, model_version=version, stage=str(mv.stage or "none"),
        metrics=steps["evaluate_model"].outputs["eval_metrics"][0].load(),
        cached_steps=sorted(n for n, s in steps.items() if str(s.status).endswith("cached")), steps=len(steps),
        seconds=seconds, adapter_uri=steps["train_adapter"].outputs["adapter"][0].uri,
        merged_uri=steps["merge_model"].outputs["merged_model"][0].uri, store_url=client.zen_store.url,
        decision=str(mv.run_metadata.get("stage_decision", "")))


def schedule_finetune(config: Union[str, Path, LorapipeConfig, dict], cron: str, *, name: Optional[str] = None,
                      overrides: Optional[list[str]] = None, run_config: Optional[str] = None,
                      base_dir: Optional[Path] = None) -> Any:
    """Register the pipeline on the active stack's orchestrator with a cron schedule; returns ZenML's schedule.

    Each firing resolves the data again (globs, the newest artifact version); unchanged data is served from the
    cache, and the register step gives a version with the same data and config as an earlier one no stage.
    """
    from zenml.client import Client
    from zenml.config.schedule import Schedule

    check_cron(cron)
    stack = Client().active_stack
    orchestrator = stack.orchestrator
    if not orchestrator.config.is_schedulable:
        raise SchedulingUnsupported(cannot_schedule_message(stack.name, orchestrator.flavor, config, cron,
                                                            overrides, run_config))
    prepared = prepare(config, overrides, base_dir, need_data_now=False)
    cfg = prepared.config
    name = name or f"{cfg.register.model_name}-retrain"
    client = Client()
    if client.list_schedules(name=name, size=1).items:
        raise UserMistake(f"a schedule named {name} exists already: pick another --name, or "
                          f"`lorapipe schedule delete {name}` first")
    # version=None: ZenML numbers the versions; the register step names any that repeats earlier inputs
    pipe = _pipeline(prepared, None, True, run_config, Schedule(name=name, cron_expression=cron))
    pipe(config=cfg, config_sha256=prepared.config_sha256, user_set=prepared.user_set)
    return client.get_schedule(name, allow_name_prefix_match=False)


def check_cron(cron: str) -> None:
    """Five fields, as Kubernetes CronJobs and crontab take them; ZenML passes the text on unchecked."""
    fields = cron.split()
    if len(fields) != 5 or not all(set(f) <= set("0123456789*/,-") for f in fields):
        raise UserMistake(f"--cron {cron!r}: a cron expression has five fields (minute hour day month weekday) "
                          "of digits, '*', '/', ',' and '-', e.g. \"0 3 * * *\" for 03:00 every day")


def cannot_schedule_message(stack: str, flavor: str, config: Any, cron: str, overrides: Optional[list[str]] = None,
                            run_config: Optional[str] = None) -> str:
    import shlex
    import shutil

    config_arg = shlex.quote(str(config)) if isinstance(config, (str, Path)) else "CONFIG"
    extra = "".join(f" --set {shlex.quote(o)}" for o in overrides or [])
    extra += f" --run-config {shlex.quote(str(run_config))}" if run_config else ""
    # the lorapipe this process runs (a venv's, or one on PATH), so cron finds the same installation
    here = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "lorapipe" else None
    command = str(here or shutil.which("lorapipe") or REPO_ROOT / ".venv/bin/lorapipe")
    return (f"the active stack '{stack}' runs on the {flavor} orchestrator, which cannot run schedules. "
            f"Orchestrators that can: {', '.join(SCHEDULING_FLAVORS)}. A Kubernetes stack ready to fill in is "
            f"{STACK_FILE} (see configs/stacks/README.md), then `zenml stack set` it and schedule again. "
            f"On a single machine, cron does the job: add this line with `crontab -e` (a run on unchanged data "
            f"is a no-op served from the cache):\n"
            f"  {cron} cd {shlex.quote(str(Path.cwd()))} && {command} run -c {config_arg}{extra} "
            f">> runs/cron.log 2>&1")


def deploy_stage(stage: str, model_name: str, deployment_name: Optional[str] = None,
                 max_new_tokens: int = 256, run_config: Optional[str] = None) -> Any:
    """Deploy the inference pipeline (prompt -> answer by the version holding `stage`) with the active stack's
    deployer; deploying again under the same name updates it in place. `run_config`: a ZenML run configuration
    (the deployer's settings, e.g. configs/stacks/kubernetes-deployer.deploy.yaml). Returns ZenML's deployment."""
    use_repo_as_source_root()
    from zenml.client import Client

    client = Client()
    stack = client.active_stack
    if stack.deployer is None:
        raise UserMistake(f"the active stack {stack.name!r} has no deployer: add the local one with `zenml deployer "
                          f"register local --flavor local && zenml stack update {stack.name} -d local` (a cluster: "
                          "the kubernetes flavor, settings in configs/deployer-kubernetes.yaml)")
    try:
        holder = client.get_model_version(model_name, stage)
    except KeyError:
        raise UserMistake(f"no version of {model_name} holds the stage {stage}: train and promote one first (lorapipe "
                          f"run), or name another stage") from None
    from pipelines.inference import answer

    name = deployment_name or f"{model_name}-{stage}"
    log.info("deploying %s: %s:%s answers (the %s holder when each request arrives) with the %s deployer", name,
             model_name, holder.name, stage, stack.deployer.flavor)
    options: dict[str, Any] = {"config_path": run_config} if run_config else {}
    return answer.with_options(extra={"model_name": model_name, "stage": stage, "max_new_tokens": max_new_tokens},
                               **options).deploy(deployment_name=name, prompt="Hello")


def delete_deployment(name: str) -> None:
    """Stop the deployment and remove it from the store."""
    from zenml.client import Client

    client = Client()
    try:
        client.get_deployment(name)
    except KeyError:
        raise UserMistake(f"no deployment named {name}: `zenml deployment list` lists them") from None
    client.deprovision_deployment(name)
    client.delete_deployment(name)
