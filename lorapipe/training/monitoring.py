"""One training monitor for every backend: metrics files, progress lines, plots and the experiment tracker.

`TrainingMonitor(out_dir, memory_gib)` is plain Python (no torch, transformers or mlx import). A backend calls
`begin(step, max_steps)` when its loop starts (or resumes), `log(step, loss=..., ...)` at every logging step and
`end()` when training ends; the TRL backends do so through `lorapipe.backends.trainer.MonitorCallback`, the mlx
backend from its own loop. For each `log` the monitor

- appends one row (columns `METRIC_COLUMNS`) to `metrics.jsonl` and `metrics.csv` in `out_dir`;
- logs one compact progress line, e.g. `step 20/96 loss 6.71 lr 2.1e-03 1.8k tok/s mem 0.7 GiB eta 0:00:12`;
- sends the row to the stack's experiment tracker (W&B, when the ZenML step opened a run) as `train/<column>`;

and at `end()` draws `loss.png`, `learning_rate.png` and `memory.png` beside the files. On a resumed run the rows
after the checkpoint's step are dropped, so the files continue where the checkpoint left off. Only the main
process of a data-parallel run writes, logs or sends; when the train step launched the ranks as processes of their
own, the tracker's run is open in the step's process, not theirs, and the launcher sends the rows to it once they
are done (`replay_to_tracker`).

`tokens_per_second` is the rate since the previous log of the tokens the backend reports (all data-parallel ranks'
tokens for the TRL backends); `memory_gib` is what the backend's memory reader says (process RSS on CPU, the peak
allocated CUDA memory, mlx's peak on Apple); `elapsed_s` is seconds since this process began (or resumed) training.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from lorapipe.artifacts import ADAPTER_PLOTS
from lorapipe.units import format_count, format_gib

log = logging.getLogger(__name__)

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
# where a watcher (`lorapipe watch`) learns the step count, the resume point and whether training ended
PROGRESS_JSON = "progress.json"
PLOTS = ADAPTER_PLOTS
METRIC_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss", "tokens_per_second",
                  "memory_gib", "elapsed_s"]


def process_memory_gib() -> float:
    """The resident set size of this process (GiB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def memory_gib(device: str) -> float:
    """Peak allocated CUDA memory on cuda; the resident set size of this process elsewhere (GiB)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return process_memory_gib()


_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak_memory(device: str) -> None:
    """Start a phase's peak afresh: CUDA's peak counter; on Linux the process's resident high-water mark (writing 5
    to /proc/self/clear_refs resets VmHWM), so a CPU phase's peak is its own, not an earlier step's."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
    except OSError:  # not Linux, or not allowed: the lifetime high-water mark stands in
        pass


def peak_memory_gib(device: str) -> float:
    """The peak since `reset_peak_memory` (GiB): torch's allocated CUDA peak; the process's resident high-water mark
    elsewhere (VmHWM on Linux, the lifetime maximum on other systems)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    import resource
    import sys as _sys

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**30 if _sys.platform == "darwin" else maxrss * 1024 / 2**30


class PhaseMemory:
    """The peak memory of one phase (evaluate, merge): the peak counter (CUDA) or the resident high-water mark
    (Linux) is reset on entry, so the figure is the phase's own peak, resident process included."""

    def __init__(self, device: str):
        self.device, self.peak_gib, self.start_gib = device, 0.0, 0.0

    def __enter__(self) -> "PhaseMemory":
        self.start_gib = round(memory_gib(self.device), 3)
        reset_peak_memory(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_gib = round(peak_memory_gib(self.device), 3)
        free_memory(self.device)


def free_memory(device: str) -> None:
    """Collect garbage and give cached CUDA blocks back (call after dropping the last reference to a model)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _finite(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_progress(row: dict[str, Any], max_steps: int, eta_s: Optional[float],
                    eval_metrics: Sequence[str] = ()) -> str:
    """The one-line progress report for a metrics row; `eval_metrics`: the task's figures beside eval_loss."""
    parts = [f"step {row['step']}/{max_steps}" if max_steps and max_steps > 0 else f"step {row['step']}"]
    if row.get("loss") is not None or row.get("_loss_raw") is not None:
        loss = row.get("loss")
        parts.append(f"loss {loss:.2f}" if loss is not None else f"loss {row.get('_loss_raw')}")
    if row.get("eval_loss") is not None:
        parts.append(f"eval_loss {row['eval_loss']:.4f}")
    for key in eval_metrics:
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.3f}")
    if row.get("learning_rate") is not None:
        parts.append(f"lr {row['learning_rate']:.1e}")
    if row.get("tokens_per_second") is not None:
        parts.append(f"{format_count(row['tokens_per_second'])} tok/s")
    if row.get("memory_gib") is not None:
        parts.append(f"mem {format_gib(row['memory_gib'])}")
    if eta_s is not None:
        parts.append(f"eta {datetime.timedelta(seconds=int(round(eta_s)))}")
    return " ".join(parts)


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows written so far; a last line still being appended (a reader racing the writer) is left for later."""
    path = Path(out_dir) / METRICS_JSONL
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _write_csv(path: Path, rows: Iterable[dict[str, Any]], mode: str) -> None:
    with open(path, mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})


def write_plots(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """loss.png (train and eval loss), learning_rate.png and memory.png against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    specs = [
        ("loss.png", "loss", [("loss", "train loss", "-"), ("eval_loss", "eval loss", "o--")]),
        ("learning_rate.png", "learning rate", [("learning_rate", "learning rate", "-")]),
        ("memory.png", "memory (GiB)", [("memory_gib", "memory", "-")]),
    ]
    written = []
    for name, ylabel, lines in specs:
        fig = Figure(figsize=(6, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        drawn = False
        for key, label, style in lines:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, style, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
        elif len(lines) > 1:
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        written.append(out / name)
    return written


class Tracker(Protocol):
    """Where metrics rows go besides the files: the stack's experiment tracker."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_row(self, row: dict[str, Any], step: int) -> None: ...


class WandbTracker:
    """The W&B run a ZenML wandb experiment tracker opened for this step (offline works the same)."""

    def __init__(self, run: Any):
        self.run = run

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_row(self, row: dict[str, Any], step: int) -> None:
        # train/loss, train/learning_rate, ... and eval/loss, as the Trainer's own W&B integration names them
        payload = {("eval/loss" if k == "eval_loss" else f"train/{k}"): v for k, v in row.items()
                   if k != "step" and v is not None}
        self.run.log(payload, step=step)


def active_tracker() -> Optional[Tracker]:
    """The experiment tracker the ZenML stack opened for this step, if any: a W&B run; None otherwise (lorapipe
    never starts a tracker run of its own). The stack's tracker imports wandb to open its run, so where wandb is not
    imported there is none (and importing it only to look would cost a second per training)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    return WandbTracker(run) if run is not None else None


def mark_failed(out_dir: str | Path) -> None:
    """Training raised: tell a watcher (the exception itself goes on up to the step)."""
    path = Path(out_dir) / PROGRESS_JSON
    if path.is_file():
        progress = json.loads(path.read_text())
        progress["state"] = "failed"
        path.write_text(json.dumps(progress))


def replay_to_tracker(out_dir: str | Path, tracker: Tracker, run_config: dict[str, Any]) -> int:
    """Send a finished run's config and metrics rows (from `out_dir`'s metrics.jsonl) to the tracker, as the monitor
    would have while training. Returns the rows sent."""
    tracker.log_config(run_config)
    rows = read_metrics(out_dir)
    for row in rows:
        tracker.log_row(row, step=row["step"])
    return len(rows)


class TrainingMonitor:
    """Metrics files, progress lines and tracker rows while training, plots when it ends (see the module docstring).

    Args:
        out_dir: where metrics.jsonl/.csv and the plots go (the adapter folder).
        memory_gib: the backend's memory reader (GiB).
        run_config: sent once to the tracker (training config and plan).
        tracker: where rows go besides the files; "auto": the stack's tracker, if it opened one for this step.
        plots: draw the plots at `end()`.
        is_main: False on the other ranks of a data-parallel run: they measure, and neither write nor log.
    """

    def __init__(self, out_dir: str | Path, memory_gib: Callable[[], float], run_config: Optional[dict] = None,
                 tracker: Optional[Tracker] | str = "auto", plots: bool = True,
                 is_main: bool = True, eval_metrics: Sequence[str] = ()):
        self.out_dir = Path(out_dir)
        self.memory_gib = memory_gib
        self.run_config = run_config or {}
        self.tracker = active_tracker() if tracker == "auto" else tracker
        self.plots = plots
        self.plots_after_training = False
        self.is_main = is_main
        self.eval_metrics = tuple(eval_metrics)  # the task's evaluation figures kept beside eval_loss (TaskSpec)
        self.rows: list[dict[str, Any]] = []
        self.max_steps = 0
        self._t0 = self._last_time = 0.0
        self._start_step = 0
        self._last_tokens: Optional[float] = None

    def begin(self, step: int, max_steps: int) -> None:
        """Training starts at `step` (> 0: resumed from a checkpoint at that step) of `max_steps`."""
        self._t0 = self._last_time = time.perf_counter()
        self._start_step, self.max_steps = step, max_steps
        self._last_tokens = None
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Resumed: keep the rows up to the checkpoint's step, drop those of the interrupted run after it.
        self.rows = [r for r in read_metrics(self.out_dir) if r.get("step", 0) <= step] if step > 0 else []
        with open(self.out_dir / METRICS_JSONL, "w") as fh:
            for r in self.rows:
                fh.write(json.dumps(r) + "\n")
        _write_csv(self.out_dir / METRICS_CSV, self.rows, "w")
        self._write_progress("running")
        if self.tracker is not None and self.run_config:
            self.tracker.log_config(self.run_config)

    def log(self, step: int, *, loss: Any = None, learning_rate: Any = None, grad_norm: Any = None,
            eval_loss: Any = None, epoch: Any = None, tokens_seen: Optional[float] = None,
            eval_metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Record one logging step. `tokens_seen`: tokens trained since this process began training (or None);
        `eval_metrics`: more evaluation figures (a classifier's eval_accuracy, eval_macro_f1)."""
        now = time.perf_counter()
        row: dict[str, Any] = {
            "step": int(step), "epoch": _finite(epoch), "loss": _finite(loss), "learning_rate": _finite(learning_rate),
            "grad_norm": _finite(grad_norm), "eval_loss": _finite(eval_loss), "tokens_per_second": None,
            "memory_gib": round(self.memory_gib(), 4), "elapsed_s": round(now - self._t0, 3),
        }
        for key, value in (eval_metrics or {}).items():
            row[key] = _finite(value)
        if loss is not None:
            if tokens_seen is not None:
                base = self._last_tokens if self._last_tokens is not None else 0.0
                dt = now - self._last_time
                if tokens_seen >= base and dt > 0:
                    row["tokens_per_second"] = round((tokens_seen - base) / dt, 2)
                self._last_tokens = float(tokens_seen)
            self._last_time = now
        if not self.is_main:
            return row
        self.rows.append(row)
        with open(self.out_dir / METRICS_JSONL, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        _write_csv(self.out_dir / METRICS_CSV, [row], "a")
        if self.tracker is not None:
            self.tracker.log_row(row, step=row["step"])
        done = step - self._start_step
        remaining = max(self.max_steps - step, 0)
        eta = (now - self._t0) / done * remaining if done > 0 and self.max_steps else None
        shown = dict(row)
        if row["loss"] is None and loss is not None:
            shown["_loss_raw"] = loss  # nan/inf: say so rather than hide it
        log.info("%s", format_progress(shown, self.max_steps, eta, self.eval_metrics))
        return row

    def checkpoint_saved(self, step: int) -> None:
        if self.is_main:
            log.info("checkpoint saved: step %d", step)

    def _write_progress(self, state: str) -> None:
        import os
        import socket

        # pid and host: a watcher on this machine can tell a training that was killed from one still running
        progress = {"state": state, "max_steps": self.max_steps, "start_step": self._start_step,
                    "pid": os.getpid(), "host": socket.gethostname(),
                    "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = self.out_dir / (PROGRESS_JSON + ".tmp")
        tmp.write_text(json.dumps(progress))
        tmp.replace(self.out_dir / PROGRESS_JSON)  # a watcher never reads half a file

    def end(self) -> None:
        if self.is_main:
            self._write_progress("finished")
        if not self.plots_after_training:
            self.draw_plots()

    def draw_plots(self) -> None:
        """The loss, learning-rate and memory plots (rank 0). A backend that times its training loop sets
        `plots_after_training` and draws them once the clock has stopped: drawing is not training."""
        if self.is_main and self.plots:
            write_plots(self.rows, self.out_dir)
