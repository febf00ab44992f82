"""Experiment tracking through the ZenML stack: a W&B experiment tracker on the active stack, run offline
(no W&B server is reachable here; offline mode is W&B's own, not a mock)."""

import os

import pytest

pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[tracking]')")
pytest.importorskip("weave", reason="ZenML's wandb flavor needs weave (pip install -e '.[tracking]')")

from lorapipe_app.cli import main
from tests.conftest import QUICKSTART_DATA
from tests.test_pipeline import _config, _last_run
from tests.wandb_offline import read_offline_run

pytestmark = pytest.mark.slow


@pytest.fixture
def wandb_stack(tmp_path, monkeypatch):
    from zenml.client import Client
    from zenml.enums import StackComponentType

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_root").mkdir()
    client = Client()
    client.create_stack_component(name="wandb_offline", flavor="wandb",
                                  component_type=StackComponentType.EXPERIMENT_TRACKER,
                                  configuration={"api_key": "offline-no-key", "project_name": "lorapipe-test",
                                                 "settings": {"mode": "offline"}})
    client.create_stack(name="tracked", components={StackComponentType.ORCHESTRATOR: "default",
                                                    StackComponentType.ARTIFACT_STORE: "default",
                                                    StackComponentType.EXPERIMENT_TRACKER: "wandb_offline"})
    client.activate_stack("tracked")
    yield tmp_path / "wandb_root"
    client.activate_stack("default")


def test_training_logs_to_the_stacks_wandb_tracker(wandb_stack, tiny_model_dir, tmp_path):
    import json
    from pathlib import Path

    cfg = _config(tmp_path, tiny_model_dir, QUICKSTART_DATA, model_name="lorapipe-tracked")
    assert main(["run", "-c", str(cfg), "--no-cache", "--set", "train.resume=false",
                 "--set", "train.logging_steps=2", "--set", "train.max_steps=6"]) == 0
    step = _last_run().steps["train_adapter"]
    assert step.config.experiment_tracker == "wandb_offline"
    run_id = step.run_metadata["wandb_run_id"]
    [run_dir] = [d for d in (wandb_stack / "wandb").glob("offline-run-*") if d.name.endswith(run_id)]
    history, summary, config = read_offline_run(run_dir)
    logged = [row["train/loss"] for row in history if "train/loss" in row]
    adapter = Path(step.outputs["adapter"][0].load().path)
    trained = [json.loads(line)["loss"] for line in (adapter / "training_log.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)]
    assert len(logged) == len(trained) == 3
    assert logged == pytest.approx(trained)
    assert config["zenml_step_name"] == "train_adapter"
    assert os.environ["WANDB_MODE"] == "offline"
