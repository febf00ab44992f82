"""kill -9: a training process killed between two checkpoints, or in the middle of writing one, is run again with the
same command and ends with the adapter an uninterrupted run writes (same bytes); a whole `lorapipe run` killed during
merge and during register is run again to the end, and every artifact of the store loads."""

from __future__ import annotations

import os
import signal

import pytest

from lorapipe.backends.trainer import checkpoint_files
from lorapipe.training.checkpoints import SET_ASIDE, checkpoint_problem
from tests.faults import adapter_sha256, read_until, run_child, start_child
from tests.faults.child import PAUSED
from tests.faults.conftest import plain
from tests.faults.paused_run import PAUSED as PAUSED_IN_MERGE_WRITE

pytestmark = pytest.mark.slow


def kill_at(proc, marker: str) -> str:
    seen: list[str] = []
    try:
        assert read_until(proc, marker, seen), "".join(seen)[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def rerun(tiny_model_dir, work) -> str:
    code, out = run_child(tiny_model_dir, work)
    assert code == 0, out[-3000:]
    return out


def test_killed_between_two_checkpoints_the_same_command_resumes_to_the_same_adapter(tiny_model_dir, reference,
                                                                                    tmp_path):
    ckpts = tmp_path / "checkpoints"
    # a pause at each step end: the kill lands after checkpoint-2 is announced, well before checkpoint-4 is begun
    kill_at(start_child(tiny_model_dir, tmp_path, slow=0.5), "checkpoint saved: step 2")
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]
    assert checkpoint_problem(ckpts / "checkpoint-2", checkpoint_files()) is None
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    out = rerun(tiny_model_dir, tmp_path)
    assert f"resuming from {ckpts / 'checkpoint-2'}" in out and "is incomplete" not in out
    assert "trained 8 steps" in out
    assert adapter_sha256(tmp_path / "adapter") == reference.sha


def test_killed_while_writing_a_checkpoint_the_same_command_resumes_from_the_one_before(tiny_model_dir, reference,
                                                                                      tmp_path):
    ckpts = tmp_path / "checkpoints"
    kill_at(start_child(tiny_model_dir, tmp_path, pause_in_write_at=4), f"{PAUSED}4")
    half = ckpts / "checkpoint-4"
    written = {p.name for p in half.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= written
    assert not {"rng_state.pth", "trainer_state.json"} & written  # cut off in the middle of the write

    out = rerun(tiny_model_dir, tmp_path)
    assert "checkpoint-4 is incomplete (rng_state.pth is missing): resuming from checkpoint-2; set aside as " in out
    assert f"resuming from {ckpts / 'checkpoint-2'}" in out
    assert {p.name for p in (tmp_path / SET_ASIDE / "checkpoint-4.incomplete-rng_state.pth-missing").iterdir()} == \
        written
    assert adapter_sha256(tmp_path / "adapter") == reference.sha


def weights_sha256(store: dict, artifact: str) -> str:
    """sha256 over the safetensors files of the newest run's `artifact`, by their path inside it."""
    import hashlib
    from pathlib import Path

    uri = Path(next(a["uri"] for a in store["artifacts"] if a["name"] == artifact))
    files = sorted(uri.rglob("*.safetensors"))
    assert files, uri
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(uri)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_killed_during_merge_and_register_the_rerun_ends_with_the_uninterrupted_runs_model(pipeline_runs):
    _, killed_in_merge, killed_in_register, final = pipeline_runs.runs
    assert killed_in_merge.sent and killed_in_merge.code == -signal.SIGKILL
    assert "merging into" in killed_in_merge.output and "merge check:" not in killed_in_merge.output
    assert PAUSED_IN_MERGE_WRITE in killed_in_merge.output  # inside the write: weights saved, folder incomplete
    assert killed_in_register.sent and killed_in_register.code == -signal.SIGKILL
    assert "merge_model has finished" in plain(killed_in_register.output)
    assert final.code == 0, final.output[-3000:]
    store = pipeline_runs.store
    newest, in_register, in_merge = store["runs"][:3]
    assert newest["status"] == "completed" and set(newest["steps"].values()) <= {"completed", "cached"}
    # the killed runs never finished (a SIGKILL leaves no one to mark them failed): what they reached is all
    assert in_merge["steps"]["merge_model"] == "running" and "register_model" not in in_merge["steps"]
    assert in_register["steps"]["merge_model"] == "completed" and in_register["steps"]["register_model"] == "running"
    assert newest["steps"]["train_adapter"] == "cached" and newest["steps"]["merge_model"] == "cached"
    # every artifact of the final run and of its model version loads through its materializer, with whole files
    assert store["artifacts"] and store["model_version"]["artifacts"]
    for art in store["artifacts"] + store["model_version"]["artifacts"]:
        assert "load_error" not in art, art
        assert not art["unreadable_files"], art
    # what the killed steps wrote into their output folders stays there, but no artifact version points to it:
    # nothing loads it, nothing lists it (ZenML removes a failed step's output folder; a SIGKILL leaves no one to do
    # so). The merge's folder is always there (killed inside its write); the register step's are there when the kill
    # lands after ZenML prepared its output folders (it prepares them before the step's code runs): a race, both ways
    killed = ("/merge_model/merged_model/", "/register_model/")
    orphans = store["orphan_folders"]
    assert any("/merge_model/merged_model/" in folder for folder in orphans), orphans
    assert all(any(step in folder for step in killed) for folder in orphans), orphans
    # and the model the faulted runs registered is the one an uninterrupted run registers, byte for byte (CPU, same
    # seed): the preempted training resumed to the same adapter, and the merge redone after the kill wrote the same
    # weights
    for name in ("adapter", "merged_model"):
        assert weights_sha256(store, name) == weights_sha256(pipeline_runs.reference_store, name), name
