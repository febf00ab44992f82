"""How lorapipe's log lines reach a person.

The library logs (`logging.getLogger(__name__)` in every module, under the `lorapipe` logger) and never prints; the
application decides what a person sees. `show_on_console()` is that decision for lorapipe's own lines: the CLI, the
pipeline's steps and the processes lorapipe starts itself (data-parallel ranks, the memory probe) call it once. Each
line is written as it is, to the `sys.stdout` of the moment it is logged (a ZenML step, which captures stdout into its
logs, then stores it too), with `warning: ` before a warning.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "lorapipe"


class _ToCurrentStdout(logging.StreamHandler):
    """A stream handler that writes to `sys.stdout` as it is when a line is logged, not as it was when the handler
    was made: ZenML's step logging and pytest's capture both swap sys.stdout."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def show_on_console(level: int = logging.INFO) -> None:
    """Print lorapipe's log lines at `level` and above on stdout, once (calling it again changes only the level)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, _ToCurrentStdout) for h in logger.handlers):
        handler = _ToCurrentStdout()
        handler.setFormatter(_Plain())
        logger.addHandler(handler)
    logger.propagate = False  # once here, not again through the root logger's handlers (ZenML's among them)
