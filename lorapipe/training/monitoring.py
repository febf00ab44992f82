"""Training monitoring as a plain `transformers.TrainerCallback` (no ZenML): metrics files, progress lines, plots.

`TrainingMonitor(out_dir, device)` writes one row per log event to `metrics.jsonl` and `metrics.csv` in `out_dir`
(columns `METRIC_COLUMNS`), prints a compact progress line per log to stdout, e.g.

    step 20/96 loss 6.71 lr 2.1e-03 1.8k tok/s mem 0.7 GB eta 0:00:12

and, when training ends, draws `loss.png`, `learning_rate.png` and `memory.png` (matplotlib, Agg canvas) beside
them. Only the world's main process writes or prints. On a resumed run the rows after the checkpoint's step are
dropped, so the files continue where the checkpoint left off.

Memory is the process RSS on CPU (psutil) and `torch.cuda.max_memory_allocated` on CUDA (the caller resets the
peak counter before training). `tokens_per_second` counts the tokens of all data-parallel ranks (TRL's gathered
`num_tokens`) since the previous log; `elapsed_s` is seconds since this process began (or resumed) training.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

from transformers import TrainerCallback

from lorapipe.artifacts import ADAPTER_PLOTS

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
PLOTS = ADAPTER_PLOTS
METRIC_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss", "tokens_per_second",
                  "memory_gb", "elapsed_s"]


def memory_gb(device: str) -> float:
    """Peak allocated CUDA memory on cuda; the resident set size of this process elsewhere (GiB)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class PhaseMemory:
    """Memory of one phase (evaluate, merge): CUDA's peak counter is reset on entry, so the figure is the
    phase's own peak; elsewhere the process's resident set at the end of the phase (no resettable counter)."""

    def __init__(self, device: str):
        self.device, self.gb = device, 0.0

    def __enter__(self) -> "PhaseMemory":
        import torch

        if self.device == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gb = round(memory_gb(self.device), 3)
        free_memory(self.device)


def free_memory(device: str) -> None:
    """Collect garbage and give cached CUDA blocks back (call after dropping the last reference to a model)."""
    gc.collect()
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _finite(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def human_count(n: float) -> str:
    """1800 -> '1.8k', 2_500_000 -> '2.5M', 950 -> '950'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def format_progress(row: dict[str, Any], max_steps: int, eta_s: Optional[float]) -> str:
    """The one-line progress report for a metrics row."""
    parts = [f"step {row['step']}/{max_steps}" if max_steps and max_steps > 0 else f"step {row['step']}"]
    if row.get("loss") is not None or row.get("_loss_raw") is not None:
        loss = row.get("loss")
        parts.append(f"loss {loss:.2f}" if loss is not None else f"loss {row.get('_loss_raw')}")
    if row.get("eval_loss") is not None:
        parts.append(f"eval_loss {row['eval_loss']:.4f}")
    if row.get("learning_rate") is not None:
        parts.append(f"lr {row['learning_rate']:.1e}")
    if row.get("tokens_per_second") is not None:
        parts.append(f"{human_count(row['tokens_per_second'])} tok/s")
    if row.get("memory_gb") is not None:
        parts.append(f"mem {row['memory_gb']:.1f} GB")
    if eta_s is not None:
        parts.append(f"eta {datetime.timedelta(seconds=int(round(eta_s)))}")
    return " ".join(parts)


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        ("memory.png", "memory (GB)", [("memory_gb", "memory", "-")]),
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


class TrainingMonitor(TrainerCallback):
    """Metrics files + progress lines while training, plots when it ends (see the module docstring)."""

    def __init__(self, out_dir: str | Path, device: str = "cpu", stream: Optional[TextIO] = None,
                 plots: bool = True):
        self.out_dir = Path(out_dir)
        self.device = device
        self.stream = stream
        self.plots = plots
        self.rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_tokens: Optional[float] = None

    # -- helpers -----------------------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def _tokens(self, logs: dict[str, Any], state: Any) -> Optional[float]:
        """Tokens seen so far: TRL's `num_tokens` log (counted since this process started) or the trainer state's."""
        if logs.get("num_tokens") is not None:
            return float(logs["num_tokens"])
        seen = getattr(state, "num_input_tokens_seen", 0) or 0
        return float(seen) if seen else None

    # -- events ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._t0 = self._last_time = time.perf_counter()
        self._start_step = state.global_step
        self._last_tokens = None
        if not state.is_world_process_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Resumed: keep the rows up to the checkpoint's step, drop those of the interrupted run after it.
        self.rows = [r for r in read_metrics(self.out_dir) if r.get("step", 0) <= state.global_step] \
            if state.global_step > 0 else []
        with open(self.out_dir / METRICS_JSONL, "w") as fh:
            for r in self.rows:
                fh.write(json.dumps(r) + "\n")
        _write_csv(self.out_dir / METRICS_CSV, self.rows, "w")

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        logs = logs or {}
        if "train_runtime" in logs:  # the end-of-training summary, not a step
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return
        now = time.perf_counter()
        row: dict[str, Any] = {
            "step": int(state.global_step),
            "epoch": _finite(logs.get("epoch", state.epoch)),
            "loss": _finite(logs.get("loss")),
            "learning_rate": _finite(logs.get("learning_rate")),
            "grad_norm": _finite(logs.get("grad_norm")),
            "eval_loss": _finite(logs.get("eval_loss")),
            "tokens_per_second": None,
            "memory_gb": round(memory_gb(self.device), 4),
            "elapsed_s": round(now - self._t0, 3),
        }
        if "loss" in logs:
            tokens = self._tokens(logs, state)
            if tokens is not None:
                base = self._last_tokens if self._last_tokens is not None else 0.0
                dt = now - self._last_time
                if tokens >= base and dt > 0:
                    row["tokens_per_second"] = round((tokens - base) / dt, 2)
                self._last_tokens = tokens
            self._last_time = now
        if not state.is_world_process_zero:
            return
        self.rows.append(row)
        with open(self.out_dir / METRICS_JSONL, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        _write_csv(self.out_dir / METRICS_CSV, [row], "a")
        done = state.global_step - self._start_step
        remaining = max(state.max_steps - state.global_step, 0)
        eta = (now - self._t0) / done * remaining if done > 0 and state.max_steps else None
        shown = dict(row)
        if row["loss"] is None and "loss" in logs:
            shown["_loss_raw"] = logs["loss"]  # nan/inf: say so rather than hide it
        self._print(format_progress(shown, state.max_steps, eta))

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and self.plots:
            write_plots(self.rows, self.out_dir)


class CheckpointAnnouncer(TrainerCallback):
    """Prints `checkpoint saved: step N` on each save (once, from the main process)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            print(f"checkpoint saved: step {state.global_step}", flush=True)


def report_to() -> str:
    """"wandb" when an experiment tracker already started a W&B run for this step (ZenML's wandb flavor),
    so the Trainer logs into that run; "none" otherwise (never a stray run of its own)."""
    try:
        import wandb
    except ImportError:
        return "none"
    return "wandb" if wandb.run is not None else "none"
