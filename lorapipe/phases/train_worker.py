"""One rank of a data-parallel training the train step launched: `python -m lorapipe.phases.train_worker INPUTS.json`.

The launcher (`lorapipe.phases.launch`) writes what the train step received into one folder as plain files
(`write_inputs`): the model and train sections, the plan and the seed in `inputs.json`, and the two splits as
dataset folders (`rows.jsonl` + `meta.json`, as the dataset artifact is stored). Each rank, started by torchrun,
reads them back and calls the same backend `train` the step calls in one process. Every rank leaves
`status/rank<N>.json` (finished, or the traceback it failed with); rank 0 also writes `result.json`, the
`AdapterInfo` the launcher returns to the step. No ZenML here: the ranks import the plain library only.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import TrainingPlan

INPUTS = "inputs.json"
RESULT = "result.json"
STATUS_DIR = "status"


@dataclass
class TrainInputs:
    """What the train step hands a backend's `train`."""

    model: ModelSection
    train_cfg: TrainSection
    seed: int
    plan: TrainingPlan
    train: ConversationDataset
    eval: ConversationDataset
    work_dir: Path
    adapter_dir: Path


def write_inputs(folder: Path, inputs: TrainInputs) -> Path:
    """Write the inputs into `folder`; returns the path of `inputs.json`, the worker's one argument."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs.train.write(folder / "train_split")
    inputs.eval.write(folder / "eval_split")
    doc = {"model": inputs.model.model_dump(mode="json"), "train": inputs.train_cfg.model_dump(mode="json"),
           "seed": inputs.seed, "plan": inputs.plan.model_dump(mode="json"), "train_split": "train_split",
           "eval_split": "eval_split", "work_dir": str(inputs.work_dir), "adapter_dir": str(inputs.adapter_dir)}
    path = folder / INPUTS
    path.write_text(json.dumps(doc, indent=2))
    return path


def read_inputs(path: Path) -> TrainInputs:
    doc = json.loads(path.read_text())
    return TrainInputs(
        model=ModelSection(**doc["model"]), train_cfg=TrainSection(**doc["train"]), seed=doc["seed"],
        plan=TrainingPlan.model_validate(doc["plan"]), train=ConversationDataset.read(path.parent / doc["train_split"]),
        eval=ConversationDataset.read(path.parent / doc["eval_split"]), work_dir=Path(doc["work_dir"]),
        adapter_dir=Path(doc["adapter_dir"]))


def status_path(folder: Path, rank: int) -> Path:
    return folder / STATUS_DIR / f"rank{rank}.json"


def read_statuses(folder: Path) -> dict[int, dict[str, Any]]:
    """{rank: status} of the ranks that got as far as writing one (a rank killed by a signal writes none)."""
    found = {}
    for path in sorted((folder / STATUS_DIR).glob("rank*.json")):
        status = json.loads(path.read_text())
        found[status["rank"]] = status
    return found


def _write_status(folder: Path, rank: int, status: dict[str, Any]) -> None:
    path = status_path(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "pid": os.getpid(),
              "time": datetime.datetime.now().isoformat(), **status}
    path.write_text(json.dumps(status, indent=2))


def main(inputs_path: Path) -> None:
    from lorapipe.logs import show_on_console
    from lorapipe.quiet import quiet_env, quiet_loggers

    quiet_env()
    quiet_loggers()
    show_on_console()  # a rank's lines, which the launcher passes on (rank 0's) and keeps in its log
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    folder = inputs_path.parent
    try:
        inputs = read_inputs(inputs_path)
        if world_size != inputs.plan.world_size:
            raise RuntimeError(f"launched with {world_size} processes but the plan trains with "
                               f"{inputs.plan.world_size}: launch through lorapipe.phases.launch")
        from lorapipe.phases.train_in_process import train_in_process

        info = train_in_process(inputs.model, inputs.train_cfg, inputs.seed, inputs.plan, inputs.train, inputs.eval,
                                inputs.work_dir, inputs.adapter_dir)
    except BaseException as exc:
        _write_status(folder, rank, {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
        raise
    if rank == 0:
        (folder / RESULT).write_text(info.model_dump_json(indent=2))
    _write_status(folder, rank, {"ok": True, "steps": info.steps})
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from lorapipe import short_lived

    short_lived.begin()
    main(Path(sys.argv[1]))
    short_lived.end(0)
