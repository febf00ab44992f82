"""Graceful preemption: SIGTERM (what a spot machine or Kubernetes sends before killing) during training saves a
checkpoint at the current step within 30 s and exits non-zero with a message saying where and what to do; the same
command resumes from that checkpoint and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from lorapipe.backends.trainer import checkpoint_files
from lorapipe.training.checkpoints import checkpoint_problem
from lorapipe.training.preemption import PreemptedError, Preemption
from tests.faults import adapter_sha256, read_until, run_child, start_child

pytestmark = pytest.mark.slow


def test_sigterm_saves_at_the_current_step_and_the_same_command_resumes_bit_identically(tiny_model_dir, reference,
                                                                                       tmp_path):
    proc = start_child(tiny_model_dir, tmp_path, slow=0.5)
    seen: list[str] = []
    try:
        assert read_until(proc, "step 3/8", seen), "".join(seen)[-3000:]  # between checkpoint-2 and checkpoint-4
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL), out[-3000:]  # it stopped, was not killed
    assert took < 30, f"{took:.1f}s from SIGTERM to exit"
    found = re.search(r"PreemptedError: preempted at step (\d+): checkpoint saved to (\S+); run the same command "
                      r"again to resume", out)
    assert found, out[-3000:]
    step, folder = int(found.group(1)), found.group(2)
    # "step 3/8" is printed after step 3's end: the signal is seen at the next step end (4), 5 at most on a busy box
    assert 4 <= step <= 5 and folder == str(tmp_path / "checkpoints" / f"checkpoint-{step}")
    assert f"SIGTERM received: saving a checkpoint at step {step} and stopping" in out
    assert f"checkpoint saved: step {step}" in out
    assert checkpoint_problem(tmp_path / "checkpoints" / f"checkpoint-{step}", checkpoint_files()) is None
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    code, out = run_child(tiny_model_dir, tmp_path)
    assert code == 0, out[-3000:]
    assert f"resuming from {folder}" in out and "trained 8 steps" in out
    assert adapter_sha256(tmp_path / "adapter") == reference.sha


def test_the_handler_is_restored_and_a_second_sigterm_goes_to_it():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGTERM)
            assert preemption.requested and calls == []  # the first one only asks training to save and stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == [signal.SIGTERM]  # the second goes to whoever handled it before (ZenML stops the step)
        with Preemption(enabled=False) as off:  # data-parallel ranks: left alone
            os.kill(os.getpid(), signal.SIGTERM)
            assert not off.requested and calls == [signal.SIGTERM] * 2
        with Preemption():
            pass
        assert signal.getsignal(signal.SIGTERM) is not None
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM] * 3  # restored after training
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_preempted_error_says_where_and_what_to_do(tmp_path):
    err = PreemptedError(5, tmp_path / "checkpoint-5")
    assert str(err) == (f"preempted at step 5: checkpoint saved to {tmp_path / 'checkpoint-5'}; run the same command "
                        "again to resume")
    with pytest.raises(RuntimeError):
        raise err


@pytest.mark.slow
def test_a_preempted_lorapipe_run_fails_with_the_message_and_the_same_command_resumes(pipeline_runs):
    from tests.faults.conftest import plain

    preempted, resumed = pipeline_runs.runs[:2]
    assert preempted.sent and preempted.code == 1, preempted.output[-3000:]
    out = plain(preempted.output)
    found = re.search(r"preempted at step (\d+): checkpoint saved to (\S+/checkpoint-\d+); run the same command "
                      r"again to resume", out)
    assert found, out[-3000:]
    assert "Step train_adapter failed" in out and "register_model has started" not in out
    assert f"resuming from {found.group(2)} " in resumed.output
