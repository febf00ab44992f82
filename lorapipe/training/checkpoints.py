"""Where a training's checkpoints live and which one a run resumes from, the same for every backend.

A training's folder is keyed by its inputs and the code that trains (`work_dir_for`), so re-running the same command
after a crash resumes, and checkpoints of other code are set aside rather than resumed silently. A checkpoint is
resumed only when every file it holds reads back (`latest_complete_checkpoint`); a newer one cut short by a crash or
a full disk is named and moved to `set-aside/`, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Optional, Sequence

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan

log = logging.getLogger(__name__)

SET_ASIDE = "set-aside"  # beside the checkpoints folder: checkpoints found incomplete, kept for the user to look at


def training_key(model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
                 train: ConversationDataset, eval_split: ConversationDataset) -> str:
    """Fingerprint of the inputs that shape training (data, config, plan, seed); with the code version it names the
    checkpoint folder, so a re-run of the same inputs and code resumes."""
    blob = json.dumps({
        "train": train.fingerprint, "eval": eval_split.fingerprint,
        "plan": plan.model_dump(mode="json", exclude={"memory", "reasons", "warnings"}),
        "train_config": train_cfg.model_dump(mode="json", exclude={"resume", "resume_from", "output_root"}),
        "model": model.model_dump(mode="json"), "seed": seed,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def training_code_version(backend: str, task: str) -> str:
    """The version of the code that trains this task on this backend: every file the backend's module and the task's
    module can run (the backend's loop does not import the task: `get_task` picks it by name at run time)."""
    from lorapipe.code_version import code_version

    return code_version(f"lorapipe.backends.{backend}", f"lorapipe.tasks.{task}")


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
                log.info("set aside: %s holds checkpoints of this training written by other code (code %s, now %s); "
                         "starting over. To resume one on purpose: --set train.resume_from=%s", folder,
                         folder.name.rsplit("-", 1)[-1], code, ckpts[-1])
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
    except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
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
        where = f"; set aside as {_set_aside(ckpt, problem)}" if set_aside else ""
        log.info("%s is incomplete (%s): %s%s", ckpt.name, problem, then, where)
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


def resume_checkpoint(own_last: Optional[Path], train_cfg: TrainSection) -> Optional[Path]:
    """The checkpoint a run resumes from, said in the log: this training's own last one first (so a run resumed on
    purpose that crashes again continues its own progress), else `train.resume_from`, else none."""
    if train_cfg.resume and own_last is not None:
        chosen, how = own_last, "(set train.resume=false to start over)"
    elif train_cfg.resume_from is not None:
        chosen, how = Path(train_cfg.resume_from), "(train.resume_from)"
    else:
        return None
    log.info("resuming from %s %s", chosen, how)
    return chosen
