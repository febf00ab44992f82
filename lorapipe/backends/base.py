"""The interface every training backend implements, where its checkpoints live, and the end of every training run:
the adapter folder that describes itself (weights in the backend's format, tokenizer, training log, metadata)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence

from pydantic import BaseModel

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan, TrainingPlan

ADAPTER_METADATA = "lorapipe_adapter.json"
TRAINING_LOG = "training_log.jsonl"


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says why and what to install."""


class AdapterInfo(BaseModel):
    path: str
    backend: str
    device: str
    base_model: str
    base_revision: Optional[str]
    data_fingerprint: str
    train_rows: int
    steps: int
    train_loss: Optional[float]
    train_tokens: int  # of all data-parallel processes together
    tokens_per_second: float  # train_tokens over the main process's wall clock: the whole run's throughput
    train_seconds: float
    peak_memory_gb: float  # of the main process (one GPU, or one CPU process)
    resumed_from: Optional[str]
    versions: dict[str, Optional[str]]
    resident_at_start_gb: Optional[float] = None  # CPU: the process before training loaded anything
    world_size: int = 1  # data-parallel processes that trained


class TrainingBackend(Protocol):
    """What evaluate and merge need from a backend, besides training: all of it keyed by the adapter folder,
    which names its backend, so the steps after training never choose one themselves."""

    name: str

    def train(self, model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval: ConversationDataset, work_dir: Path, adapter_dir: Path) -> AdapterInfo:
        """Train (resuming from the last checkpoint in `work_dir` if allowed) and save the adapter."""
        ...

    def eval_models(self, adapter_dir: str, phase: PhasePlan) -> dict[str, Callable[[], ContextManager[Any]]]:
        """{"base": ..., "tuned": ...}: context managers yielding transformers models to score side by side, on the
        evaluate phase's device and dtype."""
        ...

    def merge(self, adapter_dir: str, out_dir: str, phase: PhasePlan) -> None:
        """Write base+adapter folded into one `save_pretrained` folder (safetensors + tokenizer) in the merge
        phase's dtype."""
        ...

    def reference_logits(self, adapter_dir: str, phase: PhasePlan) -> Callable[[Any], Any]:
        """ids -> float32 logits of base+adapter, unmerged, in the adapter's own ecosystem (the merge check)."""
        ...


def backend_of(adapter_dir: str | Path) -> str:
    """The backend that trained an adapter, from the metadata written beside its weights."""
    return read_adapter_metadata(adapter_dir)["plan"]["backend"]


def training_key(model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
                 train: ConversationDataset, eval: ConversationDataset) -> str:
    """Fingerprint of the inputs that shape training (data, config, plan, seed); with the code version it names the
    checkpoint folder, so a re-run of the same inputs and code resumes."""
    blob = json.dumps({
        "train": train.fingerprint, "eval": eval.fingerprint, "plan": plan.model_dump(mode="json", exclude={"memory", "reasons", "warnings"}),
        "train_config": train_cfg.model_dump(mode="json", exclude={"resume", "resume_from", "output_root"}),
        "model": model.model_dump(mode="json"), "seed": seed,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def training_code_version(backend: str) -> str:
    """The version of the code a backend trains with: every file its module can run."""
    from lorapipe.code_version import code_version

    return code_version(f"lorapipe.backends.{backend}")


def work_dir_for(output_root: str | Path, inputs_key: str, code: str, resume_from: Optional[str] = None) -> Path:
    """The folder of one training's checkpoints and adapter: `<inputs>-<code>` under `train.output_root`.

    Checkpoints of the same inputs written by other code are never resumed silently: they are set aside (left where
    they are) and named in the log, with the setting that resumes one on purpose (`resume_from`, when given, is
    that purpose: nothing is said then)."""
    root = Path(output_root)
    work_dir = root / f"{inputs_key}-{code}"
    if resume_from is None and not complete_checkpoints(work_dir / "checkpoints"):
        for folder in sorted(p for p in root.glob(f"{inputs_key}-*") if p != work_dir):
            ckpts = complete_checkpoints(folder / "checkpoints")
            if ckpts:
                print(f"set aside: {folder} holds checkpoints of this training written by other code (code "
                      f"{folder.name.rsplit('-', 1)[-1]}, now {code}); starting over. To resume one on purpose: "
                      f"--set train.resume_from={ckpts[-1]}", flush=True)
    return work_dir


def checkpoint_step(path: Path) -> Optional[int]:
    """The optimizer step a checkpoint folder was saved at (hf's checkpoint-N, mlx's step-N), or None."""
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder` that were written to the end (hf's checkpoint-N and mlx's step-N both end with
    trainer_state.json; a save cut short leaves a hidden or tmp- folder, or none), oldest step first. A cheap look by
    name; what a run resumes from is `latest_complete_checkpoint`, which also reads every file."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "tmp"))
             and checkpoint_step(p) is not None and (p / "trainer_state.json").is_file()]
    return sorted(found, key=checkpoint_step)


SET_ASIDE = "set-aside"  # beside the checkpoints folder: checkpoints found incomplete, kept for the user to look at


def checkpoint_problem(path: Path, required: Sequence[str]) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from, or None when it can.

    A required file that is missing, or any weights/state file that cannot be read back: a safetensors header that
    does not cover the file, a torch file (a zip archive) that is cut short or fails its CRC check, JSON that does not
    parse. Cheap next to training: no tensor is materialised (torch files are read once, by the CRC check)."""
    if not path.is_dir():
        return "not a folder"
    for name in required:
        if not (path / name).is_file():
            return f"{name} is missing"
    for file in sorted(path.iterdir(), key=lambda f: (f.name not in required, f.name)):
        why = _unreadable(file)
        if why:
            return f"{file.name} cannot be read: {why}"
    return None


def _unreadable(file: Path) -> Optional[str]:
    """Why one checkpoint file cannot be loaded, or None (files of other kinds are not looked at)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="numpy"):  # parses the header; checks it covers the whole file
                pass
        elif file.suffix in (".pt", ".pth"):  # torch.save writes a zip archive (optimizer, scheduler, RNG state)
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"{bad} fails its CRC check"
        elif file.suffix == ".json":
            json.loads(file.read_bytes())
    except Exception as exc:  # noqa: BLE001 -- any failure to read is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}"
    return None


def latest_complete_checkpoint(folder: Path, required: Sequence[str], prefix: str,
                               set_aside: bool = True) -> Optional[Path]:
    """The newest checkpoint in `folder` (`<prefix><step>` folders) that can be resumed from, or None.

    The Trainer resumes from the highest-numbered checkpoint without looking inside it: one cut short by a crash or a
    full disk silently drops the optimizer and scheduler (or the dropout RNG). Newer ones that fail
    `checkpoint_problem` are said in one line each and, when `set_aside` (the one process that may move files),
    moved to `<folder>/../set-aside/<name>.incomplete-<reason>`: kept, never deleted, and out of the Trainer's way
    (its rotation would delete them, its next save would write into them)."""
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix)
             and checkpoint_step(p) is not None]
    bad: list[tuple[Path, str]] = []
    chosen = None
    for ckpt in sorted(found, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(ckpt, required)
        if problem is None:
            chosen = ckpt
            break
        bad.append((ckpt, problem))
    for ckpt, problem in bad:
        then = f"resuming from {chosen.name}" if chosen else "no earlier complete checkpoint"
        where = ""
        if set_aside:
            where = f"; set aside as {_set_aside(ckpt, problem)}"
        print(f"{ckpt.name} is incomplete ({problem}): {then}{where}", flush=True)
    return chosen


def _set_aside(ckpt: Path, problem: str) -> Path:
    """Move an incomplete checkpoint to `set-aside/<name>.incomplete-<file>-<missing|unreadable>[-n]`."""
    file, _, what = problem.partition(" ")
    reason = "missing" if what.startswith("is missing") else "unreadable"
    dest_dir = ckpt.parent.parent / SET_ASIDE
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{ckpt.name}.incomplete-{file}-{reason}"
    n = 2
    while dest.exists():
        dest = dest_dir / f"{ckpt.name}.incomplete-{file}-{reason}-{n}"
        n += 1
    os.replace(ckpt, dest)
    return dest


def run_config(model_cfg: ModelSection, t: TrainSection, plan: TrainingPlan, seed: int) -> dict[str, Any]:
    """What the tracker records about a run, the same for every backend."""
    return {"model": model_cfg.model_dump(mode="json"), "train": t.model_dump(mode="json"), "seed": seed,
            "plan": plan.model_dump(mode="json", exclude={"reasons", "warnings"})}


def resume_checkpoint(own_last: Optional[Path], train_cfg: TrainSection) -> Optional[Path]:
    """The checkpoint a run resumes from, said in the log: this training's own last one first (so a run resumed on
    purpose that crashes again continues its own progress), else `train.resume_from`, else none."""
    if train_cfg.resume and own_last is not None:
        chosen, how = own_last, "(set train.resume=false to start over)"
    elif train_cfg.resume_from is not None:
        chosen, how = Path(train_cfg.resume_from), "(train.resume_from)"
    else:
        return None
    print(f"resuming from {chosen} {how}", flush=True)
    return chosen


@dataclass
class TrainingRun:
    """What a backend's training loop reports; `finish_training` turns it into the adapter folder."""

    backend: str
    steps: int
    train_loss: Optional[float]
    train_tokens: int
    train_seconds: float
    peak_memory_gb: float
    resumed_from: Optional[str]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    resident_at_start_gb: Optional[float] = None


def finish_training(run: TrainingRun, adapter_dir: Path, model: ModelSection, train_cfg: TrainSection, seed: int,
                    plan: TrainingPlan, train: ConversationDataset, tokenizer: Any,
                    save_weights: Callable[[Path], None], extra: Optional[dict[str, Any]] = None,
                    is_main: bool = True) -> AdapterInfo:
    """The end of training on every backend: the adapter weights (in the backend's own format, by `save_weights`),
    the tokenizer, `training_log.jsonl` and `lorapipe_adapter.json`. Only the main process writes."""
    from lorapipe.hardware.probe import package_versions

    info = AdapterInfo(
        path=str(adapter_dir), backend=run.backend, device=plan.device, base_model=model.name_or_path,
        base_revision=model.revision, data_fingerprint=train.fingerprint, train_rows=len(train), steps=run.steps,
        train_loss=run.train_loss, train_tokens=run.train_tokens,
        tokens_per_second=run.train_tokens / run.train_seconds if run.train_seconds > 0 else 0.0,
        train_seconds=run.train_seconds, peak_memory_gb=run.peak_memory_gb, resumed_from=run.resumed_from,
        versions=package_versions(), world_size=run.world_size, resident_at_start_gb=run.resident_at_start_gb,
    )
    if is_main:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        save_weights(adapter_dir)
        tokenizer.save_pretrained(str(adapter_dir))
        with open(adapter_dir / TRAINING_LOG, "w") as fh:
            for entry in run.log_history:
                fh.write(json.dumps(entry) + "\n")
        write_adapter_metadata(adapter_dir, model, train_cfg, seed, plan, info, extra=extra)
    return info


def write_adapter_metadata(adapter_dir: Path, model: ModelSection, train_cfg: TrainSection, seed: int,
                           plan: TrainingPlan, info: AdapterInfo, extra: Optional[dict[str, Any]] = None) -> None:
    """Every adapter folder describes itself: merge and register need nothing else."""
    meta = {
        "base_model": model.name_or_path,
        "base_revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "data_fingerprint": info.data_fingerprint,
        "seed": seed,
        "plan": plan.model_dump(mode="json"),
        "training_config": train_cfg.model_dump(mode="json"),
        "chat_template_override": model.chat_template,
        "result": info.model_dump(mode="json", exclude={"path"}),
        **(extra or {}),
    }
    (adapter_dir / ADAPTER_METADATA).write_text(json.dumps(meta, indent=2))


def read_adapter_metadata(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_METADATA
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} carries no {ADAPTER_METADATA}: not an adapter lorapipe trained")
    return json.loads(path.read_text())
