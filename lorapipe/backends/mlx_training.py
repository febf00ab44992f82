"""The mlx backend's training loop, piece by piece: the LR schedule (transformers' formulas), the data order and the
micro-batches (functions of the seed, the epoch and the cursor), the objective (how rows become micro-batches and
what their loss is: SFT's masked cross-entropy here, the preference losses in `lorapipe.backends.mlx_preference`), the
optimizer step, checkpoints that hold the optimizer state and the data order, and the training state
`trainer_state.json` records, so an interrupted run resumes to the adapter it would have reached uninterrupted.
`lorapipe.backends.mlx` runs them.

mlx imports stay inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from lorapipe.catalog import BACKENDS
from lorapipe.config import TrainSection
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.training.checkpoints import (
    complete_checkpoints,
    latest_complete_checkpoint,
    resume_checkpoint,
)

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's names, read by mlx_lm.load(..., adapter_path=)
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"
CLEAR_CACHE_EVERY = 10


# ------------------------------------------------------------------------------------ schedule and batches


def learning_rate_at(step: int, t: TrainSection, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based), the same formulas as transformers' schedulers."""
    warmup = t.warmup_steps
    if t.lr_scheduler == "constant":
        return t.learning_rate
    if step < warmup:
        return t.learning_rate * step / max(1, warmup)
    if t.lr_scheduler == "constant_with_warmup":
        return t.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    if t.lr_scheduler == "cosine":
        return t.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return t.learning_rate * max(0.0, 1.0 - progress)  # linear


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a pure function of (seed, epoch), so resume needs only the cursor."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(rows)]


def micro_batch_rows(cursor: int, rows: int, micro: int, seed: int) -> tuple[int, list[int]]:
    """(epoch, row indices) of the `cursor`-th micro-batch of the run; the last one of an epoch may be short."""
    per_epoch = math.ceil(rows / micro)
    epoch, k = divmod(cursor, per_epoch)
    return epoch, epoch_order(rows, seed, epoch)[k * micro:(k + 1) * micro]


def total_optimizer_steps(t: TrainSection, rows: int, micro: int, accum: int) -> int:
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.epochs * math.ceil(rows / micro) / accum))


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any, int, int]:
    """(inputs, targets, loss mask, trained tokens, real tokens) of one right-padded micro-batch.

    Causal shift: position i predicts token i+1, which is trained where its assistant mask is 1. Padding sits
    after the real tokens, so the causal attention of real positions never sees it; its loss mask is 0.
    """
    import mlx.core as mx
    import numpy as np

    width = max(max(len(ids) - 1 for ids, _ in encoded), 1)
    inputs = np.full((len(encoded), width), pad_id, dtype=np.int32)
    targets = np.full((len(encoded), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(encoded), width), dtype=np.float32)
    real = 0
    for row, (ids, amask) in enumerate(encoded):
        n = len(ids) - 1
        real += len(ids)
        if n <= 0:
            continue
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        mask[row, :n] = amask[1:]
    return mx.array(inputs), mx.array(targets), mx.array(mask), int(mask.sum()), real


def masked_loss(model: Any, inputs: Any, targets: Any, mask: Any, denominator: Any) -> Any:
    """Summed cross-entropy over trained tokens / the trained tokens of the whole optimizer step."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (ce * mask).sum() / denominator


# ------------------------------------------------------------------------------------------------ objectives


@dataclass
class MicroBatch:
    """One micro-batch as an objective's loss takes it."""

    arrays: tuple[Any, ...]  # the mlx arrays the loss reads
    units: int  # what the step's loss is a mean over: trained tokens (sft), pairs (preference)
    tokens: int  # real tokens through the model (throughput)


class Objective(Protocol):
    """What an optimizer step minimises: how rows become micro-batches, and the loss of one. `loss` returns the
    micro-batch's share of the step's mean (its sum over units / `denominator`, the step's units) and metric sums over
    its units, which the step divides by the same denominator."""

    rows: int
    metadata: dict[str, Any]  # what the adapter's lorapipe metadata records about the objective

    def batch(self, indices: list[int]) -> MicroBatch: ...

    def loss(self, model: Any, arrays: tuple[Any, ...], denominator: Any) -> tuple[Any, dict[str, Any]]: ...


class SFTObjective:
    """task sft: the cross-entropy of the assistant tokens (`lorapipe.data.render.encode`'s mask), a mean over the
    step's trained tokens."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], pad_id: int) -> None:
        self.encoded, self.pad_id, self.rows = encoded, pad_id, len(encoded)
        self.metadata: dict[str, Any] = {}

    def batch(self, indices: list[int]) -> MicroBatch:
        inputs, targets, mask, trained, real = collate([self.encoded[i] for i in indices], self.pad_id)
        return MicroBatch((inputs, targets, mask), trained, real)

    def loss(self, model: Any, arrays: tuple[Any, ...], denominator: Any) -> tuple[Any, dict[str, Any]]:
        return masked_loss(model, *arrays, denominator), {}


# -------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (`step-N/` holding trainer_state.json), oldest first."""
    return [p for p in complete_checkpoints(folder) if p.name.startswith(CHECKPOINT_PREFIX)]


def save_checkpoint(folder: Path, step: int, model: Any, optimizer: Any, state: dict, keep: int) -> Path:
    """Write step-N/ (adapter weights, optimizer state, trainer/RNG/data-order state) and prune the oldest.

    Written to a temporary folder and renamed, so a crash mid-save never leaves a checkpoint that looks whole.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / OPTIMIZER_STATE), dict(tree_flatten(optimizer.state)))
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> dict:
    """Restore adapter weights and optimizer state in place; return the trainer state."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(list(mx.load(str(path / ADAPTER_WEIGHTS)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_STATE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / TRAINER_STATE).read_text())


def make_optimizer(plan: TrainingPlan, t: TrainSection) -> Any:
    """The catalog's mlx optimizers; preflight refuses the others, so nothing is swapped here."""
    import mlx.optimizers as optim

    if plan.optimizer == "sgd":
        return optim.SGD(learning_rate=t.learning_rate, weight_decay=t.weight_decay)
    if plan.optimizer == "adamw_torch":  # bias_correction=True is torch's AdamW
        return optim.AdamW(learning_rate=t.learning_rate, weight_decay=t.weight_decay, bias_correction=True)
    raise ValueError(f"train.optimizer={plan.optimizer} is not available on the mlx backend "
                     f"(allowed: {', '.join(BACKENDS['mlx'].optimizers)}); preflight refuses it")


def _grad_norm(grads: Any) -> Any:
    """The global L2 norm of the step's gradient, as the Trainer logs it (an mlx scalar, read once at log time)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**32


class StepRunner:
    """One optimizer step: the accumulated micro-batches of the step's rows (a function of the cursor), the objective's
    loss as a mean over the step's units (trained tokens, or pairs), the update. Returns (loss, real tokens, seconds,
    grad norm, the objective's metrics as means over the step's units)."""

    def __init__(self, model: Any, optimizer: Any, plan: TrainingPlan, seed: int, objective: Objective) -> None:
        import mlx.nn as nn

        self.model, self.optimizer, self.seed, self.objective = model, optimizer, seed, objective
        self.micro, self.accum = plan.micro_batch_size, plan.gradient_accumulation_steps
        self.loss_and_grad = nn.value_and_grad(model, objective.loss)

    def __call__(self, state: "MLXTrainingState", lr: float) -> tuple[float, int, float, Any, dict[str, float]]:
        import mlx.core as mx
        from mlx.utils import tree_map

        start = time.perf_counter()
        self.optimizer.learning_rate = lr
        mx.random.seed(_step_seed(self.seed, state.step))  # dropout noise: a function of the step, so resume is exact
        batches = []
        for i in range(self.accum):
            _, idx = micro_batch_rows(state.micro_batches_consumed + i, self.objective.rows, self.micro, self.seed)
            batches.append(self.objective.batch(idx))
        denominator = mx.array(float(max(1, sum(b.units for b in batches))))
        grads, loss, tokens, sums = None, mx.array(0.0), 0, {}
        for batch in batches:
            (value, metrics), g = self.loss_and_grad(self.model, batch.arrays, denominator)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            loss = loss + value
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
            tokens += batch.tokens
            mx.eval(loss, grads, sums)
        grad_norm = _grad_norm(grads)  # lazy: evaluated with the update below
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, grad_norm)
        means = {k: (v / denominator).item() for k, v in sums.items()}
        return loss.item(), tokens, time.perf_counter() - start, grad_norm, means


@dataclass
class MLXTrainingState:
    """Where an mlx training is, as `trainer_state.json` in each checkpoint holds it: the optimizer step, the data
    cursor (micro-batches consumed), running totals, the log, and (written with a checkpoint) what resume checks and
    restores: the seed, the row count, the RNG rule and the data order."""

    step: int = 0
    micro_batches_consumed: int = 0
    loss_sum: float = 0.0
    train_tokens: int = 0
    train_seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    log_window: list[list[float]] = field(default_factory=list)  # [loss, tokens, seconds] since the last log line
    metric_window: list[dict[str, float]] = field(default_factory=list)  # the objective's metrics, the same steps
    seed: Optional[int] = None
    rows: Optional[int] = None
    total_steps: Optional[int] = None
    rng: dict[str, Any] = field(default_factory=dict)
    data_order: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "MLXTrainingState":
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    def epoch(self, batches_per_epoch: int) -> float:
        return round(self.micro_batches_consumed / batches_per_epoch, 4)

    def check_resumes(self, path: Path, seed: int, rows: int) -> None:
        """The checkpoint was written for this data and seed (the data order it saved is the one this run draws)."""
        saved = self.data_order
        if self.seed != seed or self.rows != rows or saved.get("epoch_order") != epoch_order(rows, seed,
                                                                                             saved.get("epoch", 0)):
            raise ValueError(f"{path} was written for other data or another seed (seed {self.seed}, {self.rows} "
                             "rows); set train.resume=false to start over")

    def mark_checkpoint(self, seed: int, rows: int, total_steps: int, batches_per_epoch: int, micro: int) -> None:
        """Record what a resume needs: both rules are functions of (seed, step), so the cursor restores them."""
        cursor = self.micro_batches_consumed
        epoch = cursor // batches_per_epoch
        self.seed, self.rows, self.total_steps = seed, rows, total_steps
        self.rng = {"mlx_seed_of_next_step": _step_seed(seed, self.step),
                    "rule": "mx.random.seed((seed * 1000003 + step) % 2**32) before each optimizer step"}
        self.data_order = {"epoch": epoch, "position_in_epoch": (cursor % batches_per_epoch) * micro,
                           "epoch_order": epoch_order(rows, seed, epoch),
                           "rule": "numpy.random.default_rng([seed, epoch]).permutation(rows)"}


def resume(t: TrainSection, ckpt_dir: Path, model: Any, optimizer: Any, seed: int, rows: int
            ) -> tuple[MLXTrainingState, Optional[Path]]:
    """The state to start from: the newest checkpoint whose files all read back (a newer one cut short is named and
    set aside), `train.resume_from`, or a fresh state (train.resume: false removes an earlier run's checkpoints)."""
    own = latest_complete_checkpoint(ckpt_dir, (ADAPTER_WEIGHTS, OPTIMIZER_STATE, TRAINER_STATE),
                                     CHECKPOINT_PREFIX) if t.resume else None
    resume_from = resume_checkpoint(own, t)
    if not t.resume and ckpt_dir.exists():
        log.info("train.resume=false: removing the checkpoints of an earlier run in %s", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    if resume_from is None:
        return MLXTrainingState(), None
    state = MLXTrainingState.from_json(load_checkpoint(resume_from, model, optimizer))
    state.check_resumes(resume_from, seed, rows)
    return state, resume_from
