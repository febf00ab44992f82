"""The end of every training run, whichever backend and task: the adapter folder that describes itself (weights in
the backend's own format, the tokenizer, `training_log.jsonl` and `lorapipe_adapter.json`), which evaluation, merge
and registration read and need nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.units import ReadsGbNames

ADAPTER_METADATA = "lorapipe_adapter.json"
TRAINING_LOG = "training_log.jsonl"


class AdapterInfo(ReadsGbNames):
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
    peak_memory_gib: float  # GiB, of the main process (one GPU, or one CPU process)
    resumed_from: Optional[str]
    versions: dict[str, Optional[str]]
    resident_at_start_gib: Optional[float] = None  # CPU: the process before training loaded anything
    world_size: int = 1  # data-parallel processes that trained


@dataclass
class TrainingRun:
    """What a backend's training loop reports; `finish_training` turns it into the adapter folder."""

    backend: str
    steps: int
    train_loss: Optional[float]
    train_tokens: int
    train_seconds: float
    peak_memory_gib: float
    resumed_from: Optional[str]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    resident_at_start_gib: Optional[float] = None


def run_config(model_cfg: ModelSection, t: TrainSection, plan: TrainingPlan, seed: int) -> dict[str, Any]:
    """What the tracker records about a run, the same for every backend."""
    return {"model": model_cfg.model_dump(mode="json"), "train": t.model_dump(mode="json"), "seed": seed,
            "plan": plan.model_dump(mode="json", exclude={"reasons", "warnings"})}


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
        train_seconds=run.train_seconds, peak_memory_gib=run.peak_memory_gib, resumed_from=run.resumed_from,
        versions=package_versions(), world_size=run.world_size, resident_at_start_gib=run.resident_at_start_gib,
    )
    if is_main:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        save_weights(adapter_dir)
        from lorapipe.models.loading import save_tokenizer

        save_tokenizer(tokenizer, adapter_dir)
        with open(adapter_dir / TRAINING_LOG, "w") as fh:
            for entry in run.log_history:
                fh.write(json.dumps(entry) + "\n")
        # the vocabulary the adapter was trained with: a built-in chat template's added tokens grow the base's
        # embeddings to it wherever the base is loaded again (evaluation, merge)
        vocab = {"tokenizer_size": len(tokenizer),
                 "added_tokens": list(getattr(tokenizer, "lorapipe_added_tokens", None) or [])}
        write_adapter_metadata(adapter_dir, model, train_cfg, seed, plan, info, extra={**vocab, **(extra or {})})
    return info


def write_adapter_metadata(adapter_dir: Path, model: ModelSection, train_cfg: TrainSection, seed: int,
                           plan: TrainingPlan, info: AdapterInfo, extra: Optional[dict[str, Any]] = None) -> None:
    """Every adapter folder describes itself: merge and register need nothing else."""
    meta = {
        "base_model": model.name_or_path,
        "base_revision": model.revision,
        "base_registered_version": model.registered_version,  # MODEL:VERSION (STAGE) the base was resolved from
        "trust_remote_code": model.trust_remote_code,
        "data_fingerprint": info.data_fingerprint,
        "seed": seed,
        "task": plan.task,
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


def update_adapter_metadata(adapter_dir: str | Path, **fields: Any) -> None:
    """Add fields to an adapter's metadata after training (e.g. a baseline trained beside it)."""
    path = Path(adapter_dir) / ADAPTER_METADATA
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=2))


def backend_of(adapter_dir: str | Path) -> str:
    """The backend that trained an adapter, from the metadata written beside its weights."""
    return read_adapter_metadata(adapter_dir)["plan"]["backend"]


def task_of(meta: dict) -> str:
    """The task an adapter was trained for (metadata written before tasks existed: sft)."""
    return meta.get("task") or meta.get("plan", {}).get("task", "sft")
