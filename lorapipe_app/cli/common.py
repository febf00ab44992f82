"""What every command group shares: the config options, the option choices read from the config's types and the
catalog (so adding a value or a backend changes one place), a user's mistake as one line, JSON output, and the
commands that open the ZenML store say so (`opens_store`)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

import click
from pydantic import BaseModel

REPO_ROOT = Path(__file__).resolve().parents[2]


def fail(message: str) -> None:
    """A user's mistake: the message, exit code 1."""
    raise click.ClickException(message)


_json_stdout: Optional[TextIO] = None  # while a --json command runs: where its JSON goes (stdout as it was)


@contextlib.contextmanager
def stdout_for_json_only() -> Iterator[None]:
    """While a --json command runs, stdout carries its JSON alone: anything else written there (ZenML's lines on the
    first use of a new store, a library's notice, a log handler bound to stdout) goes to stderr, so `json.load` of
    the output works whatever was printed on the way."""
    global _json_stdout
    real = sys.stdout
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    # handlers bound to stdout, ZenML's console handler among them (its stream writes to the original stdout)
    swapped = [(handler, handler.setStream(sys.stderr)) for lg in loggers for handler in lg.handlers
               if isinstance(handler, logging.StreamHandler)
               and (handler.stream in (real, sys.__stdout__) or type(handler.stream).__name__ == "_ZenMLStdoutStream")]
    _json_stdout = real
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stdout = None
        for handler, stream in swapped:
            handler.setStream(stream)


def json_stdout() -> TextIO:
    """Where JSON output goes: stdout as it was before `stdout_for_json_only` sent everything else to stderr."""
    return _json_stdout or sys.stdout


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str), file=json_stdout())


def choice(model: type[BaseModel], field: str, exclude: tuple[str, ...] = ()) -> click.Choice:
    """The values a config field allows (its Literal, within Optional), as a click choice."""
    values: list[str] = []
    pending = [model.model_fields[field].annotation]
    while pending:
        annotation = pending.pop()
        if typing.get_origin(annotation) is typing.Literal:
            values += [v for v in typing.get_args(annotation) if isinstance(v, str)]
        else:
            pending += list(typing.get_args(annotation))
    return click.Choice([v for v in values if v not in exclude])


def config_options(fn: Callable) -> Callable:
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config key, e.g. --set train.epochs=2 (repeatable).")(fn)
    return click.option("-c", "--config", required=True, type=click.Path(dir_okay=False),
                        help="YAML config, e.g. configs/quickstart.yaml.")(fn)


def opens_store(fn: Callable) -> Callable:
    """A command that reads or writes the ZenML store: the store is created first, under a file lock, so two
    commands on a new machine do not race to create it (the others need no store at all)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lorapipe_app.api import ensure_store

        ensure_store()
        return fn(*args, **kwargs)

    return wrapper
