"""Graceful preemption: a SIGTERM during training (what a spot machine or Kubernetes sends before it kills the pod)
saves a checkpoint at the end of the current optimizer step and stops with `PreemptedError`, which says where the
checkpoint is; running the same command again resumes from it.

    with Preemption() as preemption:
        trainer.add_callback(preemption.callback())   # after the monitor's, so "checkpoint saved" prints first
        trainer.train(...)

While training, the signal only sets a flag (a handler that printed or saved could run in the middle of a write):
the callback reads it at the next step end and asks the Trainer to save and stop; once that checkpoint is written,
the callback raises. A second SIGTERM goes to the handler that was there before (ZenML's stops the step; Python's
default ends the process). The previous handler is restored when training ends. A handler can only be installed
from the main thread; elsewhere the signal keeps its old behaviour (then the last complete checkpoint resumes).

One process only: data-parallel ranks would see the signal at different steps and disagree on the collective that
saves; `Preemption(enabled=False)` leaves their signal handling alone.

Plain library: no ZenML import; transformers only inside `callback`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM,)


class PreemptedError(RuntimeError):
    """Training stopped on a preemption signal after saving a checkpoint; the same command resumes from it."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"preempted at step {step}: checkpoint saved to {checkpoint}; run the same command again "
                         "to resume")


class Preemption:
    """Context manager turning SIGTERM into "save at the next step end, then stop" for one Trainer run."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signal: Optional[int] = None  # the signal received, once one was
        self.stopping = False  # the callback asked the Trainer to save and stop
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "Preemption":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is None:
            self.signal = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action, now that it is restored: the process ends

    def callback(self) -> Any:
        """A `TrainerCallback`: at the first step end after the signal, save and stop; once saved, raise."""
        from transformers import TrainerCallback

        preemption = self

        class PreemptionCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if preemption.requested and not preemption.stopping:
                    preemption.stopping = True
                    if state.is_world_process_zero:
                        log.info("%s received: saving a checkpoint at step %d and stopping",
                                 signal.Signals(preemption.signal).name, state.global_step)
                    control.should_save = True
                    control.should_training_stop = True
                return control

            def on_save(self, args, state, control, **kwargs):
                if preemption.stopping:
                    raise PreemptedError(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")
                return control

        return PreemptionCallback()
