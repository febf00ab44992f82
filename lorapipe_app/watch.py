"""Follow a training from the files it writes (metrics.jsonl, progress.json, checkpoint folders), without touching
the run: the live monitor of the seed "safe train" scripts, for any backend, locally or on a shared volume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from lorapipe.training.adapter import ADAPTER_METADATA
from lorapipe.training.checkpoints import checkpoint_step
from lorapipe.training.monitoring import (
    METRICS_JSONL,
    PROGRESS_JSON,
    format_progress,
    read_metrics,
)


class NothingToWatch(ValueError):
    pass


def find_training(target: Optional[str], output_root: str = "runs") -> Path:
    """The adapter folder (where metrics.jsonl is written) of `target`: a training folder, an adapter folder, a
    metrics file, or, when None, the training under `output_root` that wrote last."""
    if target is None:
        found = sorted(Path(output_root).glob(f"*/adapter/{METRICS_JSONL}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise NothingToWatch(f"no training has written metrics under {output_root}/ yet: start one with "
                                 "`lorapipe run -c CONFIG`, or give its folder (train.output_root/<key>)")
        return found[-1].parent
    path = Path(target)
    for candidate in (path.parent if path.name == METRICS_JSONL else path, path / "adapter"):
        if (candidate / METRICS_JSONL).is_file() or (candidate / PROGRESS_JSON).is_file():
            return candidate
    raise NothingToWatch(f"{target}: no {METRICS_JSONL} here or in {target}/adapter; give a training folder "
                         f"(under train.output_root, e.g. runs/<key>) or a pipeline run's name")


def last_checkpoint(adapter_dir: Path) -> Optional[int]:
    folder = adapter_dir.parent / "checkpoints"
    steps = [checkpoint_step(p) for p in folder.iterdir()] if folder.is_dir() else []
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def read_progress(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / PROGRESS_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _gone(progress: dict[str, Any]) -> bool:
    """The training process recorded in progress.json is on this machine and no longer exists."""
    import socket

    import psutil

    pid = progress.get("pid")
    return bool(pid) and progress.get("host") == socket.gethostname() and not psutil.pid_exists(pid)


def state_of(adapter_dir: Path) -> str:
    progress = read_progress(adapter_dir)
    if progress.get("state"):
        if progress["state"] == "running" and _gone(progress):
            return "stopped"  # killed (SIGKILL, out of memory) before it could say so
        return progress["state"]
    return "finished" if (adapter_dir / ADAPTER_METADATA).is_file() else "running"


def eta_seconds(row: dict[str, Any], progress: dict[str, Any]) -> Optional[float]:
    max_steps, start = progress.get("max_steps") or 0, progress.get("start_step", 0)
    done = row["step"] - start
    if not max_steps or done <= 0 or row.get("elapsed_s") is None:
        return None
    return row["elapsed_s"] / done * max(max_steps - row["step"], 0)


def watch(adapter_dir: Path, follow: bool = True, interval: float = 2.0, stream: Optional[TextIO] = None) -> str:
    """Print each metrics row as it lands and each new checkpoint; return the final state ("finished", "failed",
    "stopped" when the process vanished without a word, or "running" when not following)."""
    out = stream or sys.stdout
    shown, checkpoint = 0, None
    print(f"watching {adapter_dir}", file=out, flush=True)
    while True:
        state = state_of(adapter_dir)  # before the rows: a row written just before the end is then read too
        progress = read_progress(adapter_dir)
        rows = read_metrics(adapter_dir)
        if len(rows) < shown:  # resumed: the files were rewritten from the checkpoint's step
            shown = len(rows)
        for row in rows[shown:]:
            print(format_progress(row, progress.get("max_steps") or 0, eta_seconds(row, progress)), file=out,
                  flush=True)
        shown = len(rows)
        latest = last_checkpoint(adapter_dir)
        if latest is not None and latest != checkpoint:
            print(f"last checkpoint: step {latest} ({adapter_dir.parent / 'checkpoints'})", file=out, flush=True)
            checkpoint = latest
        if state != "running" or not follow:
            print(f"training {state}" + (f" after {rows[-1]['step']} steps" if rows else ""), file=out, flush=True)
            return state
        time.sleep(interval)
