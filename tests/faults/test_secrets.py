"""Secrets: with HF_TOKEN, HUGGING_FACE_HUB_TOKEN and WANDB_API_KEY set to fresh random strings in the environment of
whole `lorapipe run`s (preempted, killed, run to the end: `pipeline_runs`), none of them appears in any byte of any
file of the ZenML home (artifact store: artifacts, model card, step logs; the SQL store), of `train.output_root`
(checkpoints, adapter, metrics), in the runs' stdout/stderr, or in any metadata field of the run, its steps, its
artifacts and its model version."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_secret_in_any_file_of_the_store_or_the_output_root(pipeline_runs):
    planted = [v.encode() for v in pipeline_runs.secrets.values()]
    files = _files(pipeline_runs.zen) + _files(pipeline_runs.output_root)
    names = {p.name for p in files}
    # what is searched holds what the issue names: the SQL store, step logs, the model card, checkpoints, adapter
    assert "zenml.db" in names and any(p.suffix == ".log" for p in files)
    assert any(p.name == "README.md" and "merged_model" in p.parts for p in files)  # the merged model's card
    assert "optimizer.pt" in names and "adapter_model.safetensors" in names and "model.safetensors" in names
    leaks = [(str(p), s.decode()[:12]) for p in files for s in planted if s in p.read_bytes()]
    assert not leaks, leaks


def test_no_secret_in_the_output_or_any_metadata(pipeline_runs):
    store = pipeline_runs.store
    assert store["env_has_secrets"], "the planted secrets did not reach the processes"
    texts = {f"run {i} output": r.output for i, r in enumerate(pipeline_runs.runs)}
    texts["store probe output"] = pipeline_runs.probe_output
    texts["run metadata"] = store["run_metadata"]
    texts.update({f"step {n} metadata": m for n, m in store["step_metadata"].items()})
    texts.update({f"artifact {a['step']}/{a['name']} metadata": a["run_metadata"]
                  for a in store["artifacts"] + store["model_version"]["artifacts"]})
    texts["model version metadata"] = store["model_version"]["run_metadata"]
    assert len(texts["model version metadata"]) > 100 and len(texts["step train_adapter metadata"]) > 10
    leaks = [(where, name) for where, text in texts.items() for name, value in pipeline_runs.secrets.items()
             if value in text]
    assert not leaks, leaks
