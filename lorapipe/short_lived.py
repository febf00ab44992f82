"""A lorapipe process that runs one command and ends: the `lorapipe` command, a training rank, a measuring probe.

Such a process can skip two costs of the objects torch, transformers, peft, trl and ZenML make on import (hundreds
of thousands), each measured on the CI machine (docs/BENCHMARKS.md):
- the cyclic collector walking them in every full collection (lorapipe runs one after each model it drops):
  `freeze_training_imports` moves them to the collector's permanent generation, where they would stay until the
  process ends anyway; once a phase that trains, scores, merges or generates starts, so a cached run does not
  import what it does not use, and only at the first such phase: a later phase of the same run would also freeze
  what the earlier one left (a step's data or a model in a reference cycle), which no collection could then free;
- the interpreter's teardown, which frees them one by one after the command is done (2.5-3 s of CPU): `end` runs the
  exit handlers (ZenML's and OpenTelemetry's log flushing, temporary folders' cleanup) and then ends the process.
  Nothing lorapipe writes waits for the teardown: files are closed where they are written, the ZenML store commits
  per call.

A process that did not call `begin` (a test session, a notebook, a user's script) keeps its collector and its exit
as they are. `lorapipe/__init__.py` imports this module before anything else, so its exit handler is registered first
and runs last, after every handler a library registered.
"""

import atexit
import gc
import logging
import os
import sys
from typing import NoReturn, Optional

_began = False
_frozen = False
_exit_code: Optional[int] = None


def begin() -> None:
    """Declare this process short-lived: it runs one command, then calls `end`."""
    global _began
    _began = True


def freeze_training_imports() -> None:
    """In a process that called `begin`, the first time: import the training libraries and freeze every object alive
    after a full collection. Elsewhere, or again, nothing."""
    global _frozen
    if _began and not _frozen:
        _frozen = True
        import_and_freeze()


def import_and_freeze() -> None:
    """Import torch, transformers, peft and trl, collect, and freeze what is left (`gc.freeze`): ZenML's objects
    too, in a process that imported it (a pipeline run)."""
    import peft  # noqa: F401 - imported for their import-time objects, frozen below
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    gc.collect()
    gc.freeze()


def end(code: int) -> NoReturn:
    """Exit with `code`: the exit handlers run, then the process ends before its modules are torn down."""
    global _exit_code
    _exit_code = code
    sys.exit(code)


def _after_exit_handlers() -> None:
    if _exit_code is None:
        # the usual shutdown: frozen objects back in the collector's view, or extension modules (triton's, mlx's)
        # report them as leaked
        gc.unfreeze()
        return
    logging.shutdown()  # logging's own exit handler was registered before this one, so it would never run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`lorapipe runs | head`) or a closed stream
            pass
    os._exit(_exit_code)


atexit.register(_after_exit_handlers)
