"""Corrupted or truncated checkpoints: the Trainer itself resumes from the highest-numbered checkpoint-N without
looking inside (a missing optimizer.pt or scheduler.pt silently drops both, a missing rng_state.pth changes dropout).
lorapipe resumes from the newest checkpoint that can be read, says in one line which one was bad and why, and sets the
bad one aside (kept, out of the Trainer's way); the resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lorapipe.backends.trainer import CHECKPOINT_PREFIX, checkpoint_files, resume_point
from lorapipe.config import TrainSection
from lorapipe.training.checkpoints import SET_ASIDE, latest_complete_checkpoint
from tests.faults import adapter_sha256
from tests.faults.conftest import train_captured

pytestmark = pytest.mark.slow

FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors", "trainer_state.json")


def corrupt(ckpt: Path, name: str, how: str) -> None:
    path = ckpt / name
    if how == "deleted":
        path.unlink()
    else:  # cut: what a crash or a full disk leaves of a file being written
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def crashed_copy(reference, dest: Path, keep=(4, 6)) -> Path:
    """The reference run's checkpoints as a run that crashed after writing checkpoint-6 (no checkpoint-8)."""
    for step in keep:
        shutil.copytree(reference.checkpoints / f"checkpoint-{step}", dest / "checkpoints" / f"checkpoint-{step}")
    return dest / "checkpoints"


@pytest.mark.parametrize("how", ["deleted", "cut"])
@pytest.mark.parametrize("name", FILES)
def test_an_incomplete_latest_checkpoint_is_named_set_aside_and_skipped(reference, tmp_path, capsys, name, how):
    ckpts = crashed_copy(reference, tmp_path)
    corrupt(ckpts / "checkpoint-6", name, how)
    left = sorted(p.name for p in (ckpts / "checkpoint-6").iterdir())

    chosen = latest_complete_checkpoint(ckpts, checkpoint_files(), CHECKPOINT_PREFIX)

    assert chosen == ckpts / "checkpoint-4"
    out = capsys.readouterr().out
    what = "is missing" if how == "deleted" else "cannot be read: "
    line = re.escape(f"checkpoint-6 is incomplete ({name} {what}")
    assert re.search(line + r".*\): resuming from checkpoint-4; set aside as ", out), out
    # set aside out of the checkpoints folder (the Trainer's rotation would delete it there), nothing deleted
    reason = "missing" if how == "deleted" else "unreadable"
    aside = tmp_path / SET_ASIDE / f"checkpoint-6.incomplete-{name}-{reason}"
    assert str(aside) in out and not (ckpts / "checkpoint-6").exists()
    assert sorted(p.name for p in aside.iterdir()) == left
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4"]


def test_a_complete_checkpoint_is_chosen_silently_and_none_left_is_said(reference, tmp_path, capsys):
    ckpts = crashed_copy(reference, tmp_path)
    assert latest_complete_checkpoint(ckpts, checkpoint_files(), CHECKPOINT_PREFIX) == ckpts / "checkpoint-6"
    assert capsys.readouterr().out == ""
    corrupt(ckpts / "checkpoint-6", "optimizer.pt", "cut")
    corrupt(ckpts / "checkpoint-4", "trainer_state.json", "deleted")
    assert latest_complete_checkpoint(ckpts, checkpoint_files(), CHECKPOINT_PREFIX) is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("no earlier complete checkpoint" in line for line in out)
    assert out[0].startswith("checkpoint-6 is incomplete (optimizer.pt") and out[1].startswith("checkpoint-4")
    # a data-parallel rank other than 0 skips a bad checkpoint but leaves the moving to rank 0
    ckpts2 = crashed_copy(reference, tmp_path / "rank1")
    corrupt(ckpts2 / "checkpoint-6", "rng_state.pth", "cut")
    assert latest_complete_checkpoint(ckpts2, checkpoint_files(), CHECKPOINT_PREFIX, set_aside=False) == \
        ckpts2 / "checkpoint-4"
    assert (ckpts2 / "checkpoint-6").is_dir() and "set aside" not in capsys.readouterr().out


def test_a_checkpoint_resumed_on_purpose_must_be_complete(reference, tmp_path):
    ckpts = crashed_copy(reference, tmp_path, keep=(6,))
    corrupt(ckpts / "checkpoint-6", "scheduler.pt", "cut")
    t = TrainSection(resume_from=str(ckpts / "checkpoint-6"))
    with pytest.raises(ValueError, match=r"train.resume_from: .*checkpoint-6 cannot be resumed from "
                                         r"\(scheduler.pt cannot be read: .*\); name a complete checkpoint"):
        resume_point(t, tmp_path / "own" / "checkpoints")
    assert (ckpts / "checkpoint-6").is_dir()  # the user's own folder: named, never moved


@pytest.mark.parametrize("name,how", [("optimizer.pt", "cut"), ("rng_state.pth", "deleted"),
                                      ("adapter_model.safetensors", "cut"), ("trainer_state.json", "deleted")])
def test_training_resumes_from_the_previous_complete_checkpoint_bit_identically(tiny_model_dir, reference, tmp_path,
                                                                                name, how):
    ckpts = crashed_copy(reference, tmp_path)
    corrupt(ckpts / "checkpoint-6", name, how)

    info, out = train_captured(tiny_model_dir, tmp_path)

    assert f"checkpoint-6 is incomplete ({name} " in out and "resuming from checkpoint-4; set aside as" in out
    assert f"resuming from {ckpts / 'checkpoint-4'}" in out and info.resumed_from == str(ckpts / "checkpoint-4")
    assert "checkpoint saved: step 6" in out and "checkpoint saved: step 8" in out and info.steps == 8
    assert adapter_sha256(info.path) == reference.sha, "the resumed adapter differs from the uninterrupted one"
    assert (tmp_path / SET_ASIDE).is_dir()  # still there after the Trainer rotated its checkpoints
