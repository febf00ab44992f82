"""The fault suite (issue 11): what happens to a training and to the store when things go wrong, checked by outcome.

One short training shared by the files here (and by the child processes some of them start, `tests/faults/child.py`):
the tiny Llama, 32 rows, micro-batch 4 x accumulation 2 = 4 steps an epoch, 8 steps, a checkpoint every 2 (the
newest 3 kept), LoRA dropout 0.1 so that a resume must restore the dropout RNG too. On the CPU with the same seed a
resumed run must end with the same adapter bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# not imported from tests.conftest: the child processes import this package, and conftest makes a ZenML home
REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_DATA = REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"

SEED = 7
STEPS = 8
SAVE_STEPS = 2
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}


def training_inputs(model_dir: str | Path, seed: int = SEED):
    """(model section, train section, plan, train split, eval split, seed) of the shared short training."""
    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.formats import read_records
    from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan

    records = read_records([str(QUICKSTART_DATA)]).records
    memory = MemoryEstimate(weights_gib=0, lora_and_optimizer_gib=0, activations_gib=0, total_gib=0, budget_gib=1)
    plan = TrainingPlan(backend="hf", device="cpu", dtype="float32", quantization="none", micro_batch_size=4,
                        gradient_accumulation_steps=2, effective_batch_size=8, max_seq_length=128,
                        gradient_checkpointing=False, optimizer="adamw_torch", memory=memory, reasons=[], warnings=[])
    t = TrainSection(backend="hf", device="cpu", max_steps=STEPS, save_steps=SAVE_STEPS, save_total_limit=3,
                     learning_rate=5e-3, warmup_steps=2, logging_steps=1, lora=LORA)
    return (ModelSection(name_or_path=str(model_dir)), t, plan, ConversationDataset(records[:32], name="train"),
            ConversationDataset(records[32:40], name="eval"), seed)


def train_here(model_dir: str | Path, work: Path, callbacks=None, seed: int = SEED):
    """Train the shared run in this process into `work` (checkpoints in work/checkpoints, adapter in work/adapter),
    the way the train phase runs one process's training."""
    from lorapipe.phases.train_in_process import train_in_process

    m, t, plan, train, evals, seed = training_inputs(model_dir, seed)
    return train_in_process(m, t, seed, plan, train, evals, work, work / "adapter", extra_callbacks=callbacks)


def adapter_sha256(adapter_dir: str | Path) -> str:
    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **extra}


def start_child(model_dir: Path, work: Path, *, slow: float = 0.0, pause_in_write_at: int | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m tests.faults.child` training the shared run into `work`; stdout and stderr merged, line by line."""
    cmd = [sys.executable, "-m", "tests.faults.child", str(model_dir), str(work), "--slow", str(slow)]
    if pause_in_write_at is not None:
        cmd += ["--pause-in-write-at", str(pause_in_write_at)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def read_until(proc: subprocess.Popen, marker: str, seen: list[str]) -> bool:
    """Read the child's lines into `seen` until one contains `marker` (True) or the child's output ends (False)."""
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return True
    return False


def run_child(model_dir: Path, work: Path, timeout: float = 300) -> tuple[int, str]:
    """Run the child to its end; (exit code, output)."""
    proc = start_child(model_dir, work)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out
