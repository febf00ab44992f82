"""Data-parallel training from the train step: launch the plan's `world_size` processes with torchrun, wait for them.

ZenML's `run_with_accelerate` wraps only steps whose arguments are plain scalars, and lorapipe's train step takes
artifacts (the splits, the plan), so the step launches the ranks itself. `train_data_parallel` writes the step's
inputs to `<work_dir>/launch/` as plain files (`worker.write_inputs`) and runs, with this Python,

    python -m torch.distributed.run --standalone --nproc_per_node N --tee 3 ... \
        -m lorapipe.phases.train_worker inputs.json

Each rank calls the same backend `train` the step calls in one process (`lorapipe.phases.train_worker`). While they
train, rank 0's output is passed on (the progress lines read as in one process); each rank's output is kept in
`launch/logs/rank<N>.log`, and everything, torchrun's own lines included, in `launch/launch.log`. A failed rank
raises `DataParallelLaunchError` naming the rank, its exit code, its last lines and its log. On success the
`AdapterInfo` rank 0 wrote is returned, and the metrics rows are sent to the step's experiment tracker, which is
open in this process, not in the ranks'.

Plain library: no ZenML import.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from lorapipe.code_version import SOURCE_ROOT
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.phases import train_worker as worker
from lorapipe.training.adapter import AdapterInfo, run_config
from lorapipe.training.monitoring import active_tracker, replay_to_tracker

log = logging.getLogger(__name__)

LAUNCH_DIR = "launch"
LAST_LINES = 30
# torchrun --tee prefixes every line of a worker with its role and local rank: "[default1]:..."
RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")
RANK_PREFIX = re.compile(r"(?=\[default\d+\]:)")
# torchrun's failure summary names the first rank that failed and its exit code
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


class DataParallelLaunchError(RuntimeError):
    """A rank of a data-parallel training failed (or the launch itself did); the message says which and where its
    log is."""


def inside_launch() -> bool:
    """True in a process torchrun or accelerate launch started (they set WORLD_SIZE and LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def needs_launch(plan: TrainingPlan) -> bool:
    """The plan trains over several processes and this process is not one of them yet."""
    return plan.world_size > 1 and not inside_launch()


def launch_command(inputs_path: Path, world_size: int, torchrun_logs: Path) -> list[str]:
    """torchrun with this Python: a standalone rendezvous on a free port, every rank's output teed (prefixed)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
            "--tee", "3", "--log-dir", str(torchrun_logs), "-m", worker.__name__, str(inputs_path)]


def train_data_parallel(model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
                        train: ConversationDataset, eval_split: ConversationDataset, work_dir: Path,
                        adapter_dir: Path) -> AdapterInfo:
    """Train over `plan.world_size` processes and return what the backend's `train` returned on rank 0; rank 0's
    lines are logged here as they come (the same lines one process would log)."""
    launch_dir = Path(work_dir) / LAUNCH_DIR
    shutil.rmtree(launch_dir, ignore_errors=True)  # no status or result of an earlier launch may be read back
    inputs = worker.write_inputs(launch_dir, worker.TrainInputs(
        model=model, train_cfg=train_cfg, seed=seed, plan=plan, train=train, eval=eval_split, work_dir=Path(work_dir),
        adapter_dir=Path(adapter_dir)))
    cmd = launch_command(inputs, plan.world_size, launch_dir / "torchrun")
    env = dict(os.environ)
    # the ranks import lorapipe from this checkout, whether or not it is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH")) if p)
    # progress bars redraw with carriage returns, which the line-by-line relay of rank 0's output would garble
    env["TQDM_DISABLE"] = "1"
    # the machine's cores shared out over the ranks (torchrun would give each one thread)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.world_size)))
    log.info("launching %d data-parallel processes (%s); logs in %s", plan.world_size, plan.device, launch_dir / "logs")
    returncode = _run_streaming(cmd, env, launch_dir, plan.world_size)
    if returncode != 0:
        raise _failure(returncode, launch_dir, plan.world_size)
    result = launch_dir / worker.RESULT
    if not result.exists():
        raise DataParallelLaunchError(f"the data-parallel training exited cleanly but rank 0 wrote no {result}; "
                                      f"see {launch_dir / 'launch.log'}")
    info = AdapterInfo.model_validate_json(result.read_text())
    tracker = active_tracker()
    if tracker is not None:
        replay_to_tracker(adapter_dir, tracker, run_config(model, train_cfg, plan, seed))
    return info


def _run_streaming(cmd: list[str], env: dict[str, str], launch_dir: Path, world_size: int) -> int:
    """Run torchrun; log rank 0's lines as they come, keep each rank's lines in logs/rank<N>.log and every line in
    launch.log. Returns torchrun's exit code."""
    logs = launch_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # every rank has its log, also one with nothing to say (a quiet rank is the normal case)
    rank_logs: dict[int, TextIO] = {rank: open(logs / f"rank{rank}.log", "w", encoding="utf-8")
                                    for rank in range(world_size)}
    with open(launch_dir / "launch.log", "w", encoding="utf-8") as everything:
        everything.write(shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                everything.write(line)
                # a rank's stdout and stderr are teed through one pipe and can meet mid-line ("...eta 0:00:00
                # [default0]:"): each prefix starts a line of its own
                for piece in RANK_PREFIX.split(line.rstrip("\n")):
                    match = RANK_LINE.match(piece)
                    if match is None:
                        continue  # torchrun's own lines: in launch.log
                    rank, text = int(match.group(1)), match.group(2)
                    if not text.strip():
                        continue
                    if rank not in rank_logs:
                        rank_logs[rank] = open(logs / f"rank{rank}.log", "w", encoding="utf-8")
                    rank_logs[rank].write(text + "\n")
                    rank_logs[rank].flush()
                    if rank == 0:
                        log.info("%s", text)
        except BaseException:
            # the step was interrupted (or the output could not be read): no rank is left running without a parent
            proc.terminate()
            proc.wait()
            raise
        finally:
            for fh in rank_logs.values():
                fh.close()
        return proc.wait()


def _failure(returncode: int, launch_dir: Path, world_size: int) -> DataParallelLaunchError:
    """The error for a failed launch: the first rank that failed (torchrun's root cause, else the ranks' own
    status files), its exit code, its last lines and where its whole log is."""
    launch_log = launch_dir / "launch.log"
    everything = launch_log.read_text(encoding="utf-8", errors="replace") if launch_log.exists() else ""
    statuses = worker.read_statuses(launch_dir)
    root = ROOT_CAUSE.search(everything)
    failed = sorted((s for s in statuses.values() if not s["ok"]), key=lambda s: s["time"])
    if root:
        rank, code = int(root.group(1)), root.group(2)
    elif failed:
        rank, code = failed[0]["rank"], "1"
    else:
        unfinished = [r for r in range(world_size) if r not in statuses]
        rank, code = (unfinished[0] if unfinished else None), "unknown"
    if rank is None:
        tail = everything.splitlines()[-LAST_LINES:]
        return DataParallelLaunchError(
            f"the data-parallel launch failed (torchrun exit code {returncode}) before any rank reported; its last "
            f"lines:\n" + "\n".join(f"  | {x}" for x in tail) + f"\nfull log: {launch_log}")
    rank_log = launch_dir / "logs" / f"rank{rank}.log"
    lines = rank_log.read_text(encoding="utf-8", errors="replace").splitlines() if rank_log.exists() else []
    if not lines and rank in statuses and statuses[rank].get("traceback"):
        lines = statuses[rank]["traceback"].splitlines()
    tail = "\n".join(f"  | {x}" for x in lines[-LAST_LINES:]) or "  (it printed nothing)"
    error = statuses.get(rank, {}).get("error")
    said = f": {error[:300]}" if error else ""
    return DataParallelLaunchError(
        f"data-parallel training failed: rank {rank} of {world_size} exited with code {code} (torchrun exit code "
        f"{returncode}){said}\nits last lines:\n{tail}\nrank {rank}'s log: {rank_log}; every rank and torchrun: "
        f"{launch_log}")
