"""lorapipe: validated, trained, evaluated, merged and registered LoRA fine-tunes, from one config.

One module per command group (run.py: run and schedule; data.py: validate; plan.py: preflight, estimate-memory and
backends; models.py: predict and build-tiny-model; inspect.py: lineage, runs and watch); a new command goes into its
group's module and is added to the group below. Every command has --help with an example. A user's mistake (bad
config, data, model path, a plan that cannot run) ends with one paragraph that says what to fix and exit code 1 (2 for
usage errors), never a traceback; `lorapipe --debug COMMAND` shows the traceback.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from typing import Any, NoReturn, Optional

import click

from lorapipe import short_lived
from lorapipe.logs import show_on_console
from lorapipe.quiet import quiet_env, quiet_loggers
from lorapipe_app.cli import data, inspect, models, plan, run
from lorapipe_app.cli.common import stdout_for_json_only


class InputMistake(click.ClickException):
    """A mistake in the input, raised under a command (lorapipe_app.api.user_error_types): said as one paragraph, its
    message naming what to fix."""


class LorapipeGroup(click.Group):
    """The `lorapipe` group: a user's mistake raised anywhere under a command (here or inside a pipeline step) is
    said in one paragraph; with --debug its traceback is shown first."""

    def invoke(self, ctx: click.Context) -> Any:
        from lorapipe_app.api import user_error_types

        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except (click.ClickException, *user_error_types()) as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            if isinstance(exc, click.ClickException):
                raise
            raise InputMistake(str(exc)) from exc


@click.group(cls=LorapipeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show the traceback of any error (for bug reports).")
@click.option("--verbose", is_flag=True, help="Keep the libraries' own import-time log lines.")
def cli(debug: bool, verbose: bool) -> None:
    """lorapipe: validate JSONL -> preflight -> split -> train LoRA -> evaluate -> merge -> register, on ZenML.

    \b
    Start here:
      lorapipe run -c configs/quickstart.yaml
      lorapipe runs
      lorapipe lineage lorapipe-quickstart:latest
    """
    if not verbose:
        quiet_loggers()


for command in (run.run, run.schedule, data.validate, plan.preflight, plan.estimate_memory, plan.backends,
                models.predict, models.serve, models.deploy, models.build_tiny_model, inspect.lineage, inspect.runs,
                inspect.watch):
    cli.add_command(command)


def main(argv: Optional[list[str]] = None) -> int:
    """The `lorapipe` entry point; returns the exit code (tests call it in-process)."""
    quiet_env()
    show_on_console()  # lorapipe's own progress lines; the libraries' stay quiet (quiet_loggers)
    args = sys.argv[1:] if argv is None else argv
    try:
        with stdout_for_json_only() if "--json" in args else contextlib.nullcontext():
            result = cli.main(args=args, prog_name="lorapipe", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.UsageError as exc:
        exc.show()
        return exc.exit_code
    except InputMistake as exc:
        click.echo(f"\nerror: {exc.message}", err=True)
        return exc.exit_code
    except click.ClickException as exc:  # fail(): a mistake the command itself found
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    return result if isinstance(result, int) else 0


def entry() -> NoReturn:
    """The `lorapipe` command: one command in a short-lived process (lorapipe.short_lived: the training libraries'
    objects frozen out of the collector's way, no teardown after the command)."""
    short_lived.begin()
    short_lived.end(main())


__all__ = ["cli", "main", "entry"]
