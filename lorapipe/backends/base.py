"""The interface every training backend implements, and the metadata written beside every adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

from pydantic import BaseModel

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan

ADAPTER_METADATA = "lorapipe_adapter.json"


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
    train_tokens: int
    tokens_per_second: float
    train_seconds: float
    peak_memory_gb: float
    resumed_from: Optional[str]
    versions: dict[str, Optional[str]]


class TrainingBackend(Protocol):
    """What evaluate and merge need from a backend, besides training: all of it keyed by the adapter folder,
    which names its backend, so the steps after training never choose one themselves."""

    name: str

    def train(self, model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval: ConversationDataset, work_dir: Path, adapter_dir: Path) -> AdapterInfo:
        """Train (resuming from the last checkpoint in `work_dir` if allowed) and save the adapter."""
        ...

    def eval_models(self, adapter_dir: str, dtype: str, device: str) -> dict[str, Callable[[], ContextManager[Any]]]:
        """{"base": ..., "tuned": ...}: context managers yielding transformers models to score side by side."""
        ...

    def merge(self, adapter_dir: str, out_dir: str, dtype: str) -> None:
        """Write base+adapter folded into one `save_pretrained` folder (safetensors + tokenizer) in `dtype`."""
        ...

    def reference_logits(self, adapter_dir: str) -> Callable[[Any], Any]:
        """ids -> float32 logits of base+adapter, unmerged, in the adapter's own ecosystem (the merge check)."""
        ...


def backend_of(adapter_dir: str | Path) -> str:
    """The backend that trained an adapter, from the metadata written beside its weights."""
    return read_adapter_metadata(adapter_dir)["plan"]["backend"]


def training_key(model: ModelSection, train_cfg: TrainSection, seed: int, plan: TrainingPlan,
                 train: ConversationDataset, eval: ConversationDataset) -> str:
    """Fingerprint of everything that shapes training: the checkpoint folder's name, so a re-run resumes."""
    blob = json.dumps({
        "train": train.fingerprint, "eval": eval.fingerprint, "plan": plan.model_dump(mode="json", exclude={"memory", "reasons", "warnings"}),
        "train_config": train_cfg.model_dump(mode="json", exclude={"resume", "output_root"}),
        "model": model.model_dump(mode="json"), "seed": seed,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
