"""A training process to kill: `python -m tests.faults.child MODEL_DIR WORK [--slow S] [--pause-in-write-at N]`.

Trains the fault suite's shared run (`tests.faults.training_inputs`) into WORK with the hf backend, as the train step
does, and prints what the backend prints (`checkpoint saved: step N`, ...). Test-only knobs, kept out of lorapipe:

- `--slow S`: sleep S seconds at every optimizer step end, so a signal lands between two known lines;
- `--pause-in-write-at N`: in the middle of writing checkpoint-N (adapter, optimizer and scheduler written; RNG state
  and trainer_state.json not yet), print `paused inside the write of checkpoint-N` and sleep, so the test can kill
  the process there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tests.faults import train_here

PAUSED = "paused inside the write of checkpoint-"


def slow(seconds: float):
    from transformers import TrainerCallback

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(seconds)

    return Slow()


def pause_inside_checkpoint_write(step: int) -> None:
    from trl import SFTTrainer

    from lorapipe.backends.trainer import trainer_class

    cls = trainer_class(SFTTrainer)  # the class the backend builds sft's trainers from (cached per base class)
    save_rng = cls._save_rng_state

    def paused(self, output_dir):
        if self.state.global_step == step:
            print(f"{PAUSED}{step}", flush=True)
            time.sleep(120)
        return save_rng(self, output_dir)

    cls._save_rng_state = paused


def main() -> None:
    from lorapipe.logs import show_on_console
    from lorapipe.quiet import quiet_env, quiet_loggers

    quiet_env()
    quiet_loggers()
    show_on_console()  # what the backend logs, on stdout, where the test reads it
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("work")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--pause-in-write-at", type=int, default=None)
    args = p.parse_args()
    if args.pause_in_write_at is not None:
        pause_inside_checkpoint_write(args.pause_in_write_at)
    info = train_here(args.model_dir, Path(args.work), callbacks=[slow(args.slow)] if args.slow else None)
    print(f"trained {info.steps} steps; resumed from {info.resumed_from}", flush=True)


if __name__ == "__main__":
    from lorapipe import short_lived

    short_lived.begin()
    main()
    short_lived.end(0)
