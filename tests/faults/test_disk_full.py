"""Disk full while writing a checkpoint or the merged model (issue 11, item 4): the run stops with one error that
names the folder, the space the write needs and the space free there, and the fix; the checkpoint cut short is
removed (it cannot be resumed from, and holds part of the space), earlier checkpoints keep their bytes, and once there
is room the same command resumes from the last complete checkpoint and ends with the uninterrupted run's adapter.

Two ways to fill the disk: a failure injected into the write (half the file written, then ENOSPC), which runs
everywhere; and a real tmpfs too small for the next checkpoint or the merged model, mounted in a user+mount namespace
(`unshare`), where torch.save and safetensors fail the way they do on a real full disk (torch.save with no errno at
all). The last test runs a whole `lorapipe run` into a full disk: the user sees one `error:` line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import (
    QUICKSTART_DATA,
    REPO_ROOT,
    adapter_sha256,
    child_env,
    train_here,
)

pytestmark = pytest.mark.slow  # trains (the shared reference run), merges, runs the pipeline


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def hashes_at_save(ckpts: Path):
    """A TrainerCallback recording every checkpoint's file hashes as it is announced saved; (callback, records)."""
    from transformers import TrainerCallback

    saved: dict[str, dict[str, str]] = {}

    class Hash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            saved[name] = file_hashes(ckpts / name)

    return Hash(), saved


def merge_inputs(dtype: str = "bfloat16"):
    """(check rows, merge plan) of a CPU merge in `dtype`."""
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.formats import read_records
    from lorapipe.hardware.plan import PhasePlan

    rows = ConversationDataset(read_records([str(QUICKSTART_DATA)]).records[40:44], name="test")
    return rows, PhasePlan(phase="merge", device="cpu", dtype=dtype, batch_size=1, max_seq_length=256, reason="test")


def fail_torch_save(monkeypatch, step: int, name: str) -> None:
    """torch.save of checkpoint-`step`/`name` writes half the file, then raises ENOSPC, as a full disk does."""
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.name == name and path.parent.name == f"checkpoint-{step}":
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_while_writing_a_checkpoint_says_where_and_how_much_and_the_same_command_resumes(
        tiny_model_dir, reference, tmp_path, monkeypatch, capsys):
    from lorapipe.training.disk import DiskFullError, folder_bytes

    ckpts = tmp_path / "checkpoints"
    fail_torch_save(monkeypatch, 4, "optimizer.pt")
    hasher, saved = hashes_at_save(ckpts)
    with pytest.raises(DiskFullError) as caught:
        train_here(tiny_model_dir, tmp_path, callbacks=[hasher])
    err = caught.value
    needed = folder_bytes(ckpts / "checkpoint-2")  # the previous complete checkpoint: what the next one needs
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert err.folder == ckpts and err.needed_bytes == needed and err.free_bytes > 0
    msg = str(err)
    assert msg.startswith(f"disk full while writing checkpoint checkpoint-4 to {ckpts}: it needs about "), msg
    assert f"({needed} bytes)" in msg and f"({err.free_bytes} bytes) free there" in msg
    # the cut folder was found incomplete (cut in optimizer.pt: what follows it is missing), said and removed; the
    # fix names both ways out
    assert "the cut checkpoint-4 (scheduler.pt is missing; " in msg and ") was removed. Fix: " in msg
    assert "free space there and run the same command again (it resumes from checkpoint-2)" in msg
    assert f"set train.output_root to a disk with room (move {tmp_path} there too" in msg
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]
    assert file_hashes(ckpts / "checkpoint-2") == saved["checkpoint-2"]  # the earlier checkpoint: the same bytes
    assert "checkpoint saved: step 4" not in capsys.readouterr().out

    monkeypatch.undo()  # room again
    hasher, saved = hashes_at_save(ckpts)
    info = train_here(tiny_model_dir, tmp_path, callbacks=[hasher])
    out = capsys.readouterr().out
    assert f"resuming from {ckpts / 'checkpoint-2'}" in out and "is incomplete" not in out
    assert info.steps == 8 and info.resumed_from == str(ckpts / "checkpoint-2")
    assert adapter_sha256(info.path) == reference.sha, "the resumed adapter differs from the uninterrupted one"


def test_an_error_that_is_not_a_full_disk_passes_through_and_leaves_the_folder(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    import torch

    from lorapipe.training.disk import DiskFullError

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-2/optimizer.pt"):
            raise PermissionError(errno.EACCES, "Permission denied", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(PermissionError) as caught:
        train_here(tiny_model_dir, tmp_path)
    assert not isinstance(caught.value, DiskFullError)
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()  # nothing removed


def test_a_full_disk_while_writing_the_merged_model_says_where_and_its_16_bit_size_and_a_rerun_merges(
        tiny_model_dir, reference, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    from lorapipe.hardware.facts import model_facts
    from lorapipe.phases.merge import MERGE_METADATA, merge_adapter
    from lorapipe.training.disk import DiskFullError

    rows, phase = merge_inputs("bfloat16")
    out = tmp_path / "merged"
    real = mu.safe_save_file

    def full(tensors, filename, metadata=None):  # what safetensors raises on a full disk, after a partial shard
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(DiskFullError) as caught:
        merge_adapter(str(reference.info.path), str(out), rows, phase)
    err = caught.value
    needed = model_facts(str(tiny_model_dir)).total_parameters * 2  # the merged weights in bfloat16
    msg = str(err)
    assert msg.startswith(f"disk full while writing the merged model to {out}: it needs about "), msg
    assert err.needed_bytes == needed and f"({needed} bytes)" in msg and f"({err.free_bytes} bytes) free there" in msg
    assert "the shards written so far were removed" in msg and "artifact store" in msg
    assert not list(out.glob("model*.safetensors")) and not (out / MERGE_METADATA).exists()
    assert not list(tmp_path.glob(".lorapipe-merge-check-*"))  # the check's scratch logits, gone too

    monkeypatch.setattr(mu, "safe_save_file", real)  # room again
    check = merge_adapter(str(reference.info.path), str(out), rows, phase)
    assert check.passed and (out / MERGE_METADATA).is_file()


# -- a real full disk: a small tmpfs in a user+mount namespace -----------------------------------------------------

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _can_mount_tmpfs() -> str | None:
    """None when a tmpfs can be mounted in a user+mount namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    try:
        probe = subprocess.run([*UNSHARE, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if probe.returncode == 0 else f"unshare/mount tmpfs refused: {probe.stderr.strip()[:200]}"


def _mount(folder: Path, size: int, remount: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], check=True)


def tmpfs_scenario(model_dir: str, work: str, adapter_dir: str, tmpfs_bytes: int) -> None:
    """Run inside the namespace (root there): train with `work/checkpoints` on a tmpfs of `tmpfs_bytes`, then give it
    room and train again; merge into a tmpfs half the merged model's size, then give it room
    and merge again. Prints one JSON line of what happened."""
    from lorapipe.backends.trainer import checkpoint_files
    from lorapipe.phases.merge import MERGE_METADATA, merge_adapter
    from lorapipe.training.checkpoints import checkpoint_problem
    from lorapipe.training.disk import DiskFullError, merged_model_bytes

    work_dir = Path(work)
    ckpts = work_dir / "checkpoints"
    _mount(ckpts, tmpfs_bytes)
    hasher, saved = hashes_at_save(ckpts)
    result: dict = {}
    try:
        train_here(model_dir, work_dir, callbacks=[hasher])
        result["train_error"] = None
    except DiskFullError as exc:
        result["train_error"] = {"message": str(exc), "needed": exc.needed_bytes, "free": exc.free_bytes,
                                 "folder": str(exc.folder), "cause": repr(exc.__cause__)[:300]}
    result["saved"] = saved
    result["left"] = {p.name: file_hashes(p) for p in sorted(ckpts.glob("checkpoint-*"))}
    result["left_problems"] = {p.name: checkpoint_problem(p, checkpoint_files()) for p in ckpts.glob("checkpoint-*")}
    _mount(ckpts, 8 * tmpfs_bytes, remount=True)  # space freed
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        info = train_here(model_dir, work_dir)
    result["resumed"] = {"steps": info.steps, "resumed_from": info.resumed_from, "sha": adapter_sha256(info.path),
                         "output": out.getvalue()}

    rows, phase = merge_inputs("bfloat16")
    meta = json.loads((Path(adapter_dir) / "lorapipe_adapter.json").read_text())
    size = merged_model_bytes(meta, "bfloat16")
    disk = work_dir / "merge-disk"
    _mount(disk, size // 2)
    try:
        merge_adapter(adapter_dir, str(disk / "merged"), rows, phase)
        result["merge_error"] = None
    except DiskFullError as exc:
        result["merge_error"] = {"message": str(exc), "needed": exc.needed_bytes, "free": exc.free_bytes,
                                 "cause": repr(exc.__cause__)[:300]}
    result["merge_left"] = sorted(p.name for p in (disk / "merged").glob("*")) if (disk / "merged").exists() else []
    _mount(disk, 4 * size, remount=True)
    check = merge_adapter(adapter_dir, str(disk / "merged"), rows, phase)
    result["merged_again"] = {"passed": check.passed, "record": (disk / "merged" / MERGE_METADATA).is_file()}
    print("RESULT " + json.dumps(result), flush=True)


def test_on_a_real_full_tmpfs_the_checkpoint_and_the_merge_fail_clearly_and_succeed_once_there_is_room(
        tiny_model_dir, reference, tmp_path):
    from lorapipe.training.disk import folder_bytes

    problem = _can_mount_tmpfs()
    if problem:
        pytest.skip(f"a tmpfs cannot be mounted here ({problem}); the injected-failure tests above still run")

    checkpoint_bytes = folder_bytes(reference.checkpoints / "checkpoint-4")
    # room for checkpoint-2 and for checkpoint-4 up to half its optimizer.pt (tmpfs counts whole pages): the write that
    # fails is torch.save's, whose error carries no errno
    page = os.sysconf("SC_PAGE_SIZE")
    sizes = {f.name: -(-f.stat().st_size // page) * page for f in (reference.checkpoints / "checkpoint-4").iterdir()}
    before_optimizer = sum(v for k, v in sizes.items()
                           if k not in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"))
    tmpfs_bytes = sum(sizes.values()) + before_optimizer + sizes["optimizer.pt"] // 2
    code = ("import sys; from tests.faults.test_disk_full import tmpfs_scenario; "
            "tmpfs_scenario(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))")
    proc = subprocess.run([*UNSHARE, sys.executable, "-c", code, str(tiny_model_dir), str(tmp_path / "work"),
                           str(reference.info.path), str(tmpfs_bytes)],
                          cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])

    ckpts = tmp_path / "work" / "checkpoints"
    err = r["train_error"]
    assert err is not None, "checkpoint-4 fitted the tmpfs"
    assert err["message"].startswith(f"disk full while writing checkpoint checkpoint-4 to {ckpts}: "), err
    assert f"({err['needed']} bytes)" in err["message"] and f"({err['free']} bytes) free there" in err["message"]
    assert err["free"] < err["needed"] and abs(err["needed"] - checkpoint_bytes) < checkpoint_bytes // 10
    assert "the cut checkpoint-4 (" in err["message"] and "resumes from checkpoint-2" in err["message"]
    assert "inline_container" in err["cause"], err["cause"]  # torch.save's "unexpected pos", known by the free space
    # only checkpoint-2 is left, complete and with the bytes it had when it was announced saved
    assert list(r["left"]) == ["checkpoint-2"] and r["left_problems"] == {"checkpoint-2": None}
    assert r["left"]["checkpoint-2"] == r["saved"]["checkpoint-2"]
    resumed = r["resumed"]
    assert resumed["resumed_from"] == str(ckpts / "checkpoint-2") and resumed["steps"] == 8
    assert "is incomplete" not in resumed["output"]
    assert resumed["sha"] == reference.sha, "the resumed adapter differs from the uninterrupted one"

    merr = r["merge_error"]
    assert merr is not None, "the merged model fitted the tmpfs"
    merged = tmp_path / "work" / "merge-disk" / "merged"
    assert merr["message"].startswith(f"disk full while writing the merged model to {merged}: "), merr
    assert f"({merr['needed']} bytes)" in merr["message"] and merr["free"] < merr["needed"]
    assert not [n for n in r["merge_left"] if n.startswith("model") and n.endswith(".safetensors")]
    assert r["merged_again"] == {"passed": True, "record": True}


# -- a whole `lorapipe run` ---------------------------------------------------------------------------------------

FULL_DISK_RUN = """
import sys
import pytest
from tests.faults.test_disk_full import fail_torch_save
fail_torch_save(pytest.MonkeyPatch(), 4, "optimizer.pt")
from lorapipe_app.cli import main
sys.exit(main(["run", "-c", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_lorapipe_run_that_fills_the_disk_ends_with_one_error_line(tiny_model_dir, tmp_path):
    """`lorapipe run` in a child process on this session's store, checkpoint-4's optimizer.pt hitting a full disk."""
    import yaml

    from tests.faults.conftest import plain
    from tests.test_pipeline import _config

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(QUICKSTART_DATA.read_text().splitlines(keepends=True)[:80]))
    cfg = _config(tmp_path, tiny_model_dir, data, model_name="lorapipe-disk-full")
    doc = yaml.safe_load(cfg.read_text())
    doc["train"].update(max_steps=4, save_steps=2)
    cfg.write_text(yaml.safe_dump(doc))

    proc = subprocess.run([sys.executable, "-c", FULL_DISK_RUN, str(cfg)], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    out = plain(proc.stdout + proc.stderr)
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.rstrip().endswith(errors[0]), out[-3000:]  # the one line, and the last
    assert errors[0].startswith("error: step train_adapter failed: disk full while writing checkpoint checkpoint-4 "
                                f"to {tmp_path / 'runs'}"), errors[0]
    assert "bytes) free there" in errors[0] and "resumes from checkpoint-2" in errors[0]
    # lorapipe's own ending is that line, not "RuntimeError: Pipeline run has failed" and its traceback (what an
    # unexplained step failure ends with); ZenML's step log above it still shows the step's traceback
    assert "Pipeline run has failed" not in out
