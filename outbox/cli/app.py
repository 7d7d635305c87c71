"""The Typer app: its global options, help that shows what to type, one error to one exit.

The commands register on :data:`app` in :mod:`outbox.cli.stages`, :mod:`outbox.cli.reads`
and :mod:`outbox.cli.ops`; :mod:`outbox.cli` imports them and runs it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from outbox import __version__
from outbox.config import Config, load_config
from outbox.errors import OutboxError, UsageError
from outbox.logsetup import print_error, setup_logging

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("outbox.cli")
# Piped output is not wrapped: rich would break lines at 80 columns, mid-phrase.
PIPE_WIDTH = 100_000


class _PlainHelp:
    """Help that shows what to type: a flag or a counter without a type (``--dry-run``,
    ``-v``), a repeatable option by its value (``--ba BA``), an argument in capitals
    (``SERIES_ID``) rather than Typer's ``<bool>``, ``<list[str]>`` and ``{series_id}``."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if param.metavar is not None:
                continue
            option = isinstance(param, TyperOption)
            if option and (param.is_flag or param.count):
                param.metavar = ""
            elif (option and param.multiple) or isinstance(param, TyperArgument):
                param.metavar = (param.name or "value").upper()
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)  # type: ignore[misc]
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in pieces]


class _Command(_PlainHelp, TyperCommand):
    """A command with :class:`_PlainHelp`."""


class _Group(_PlainHelp, TyperGroup):
    """A command group with :class:`_PlainHelp`."""


class _App(typer.Typer):
    """A Typer app whose commands and groups all render :class:`_PlainHelp`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    name="outbox",
    help="Fetch EIA-930 hourly grid data into a durable SQLite outbox and send it to GridPulse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = _App(help="Inspect or migrate the outbox schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
timers_app = _App(
    help="systemd units and a crontab that run the stages on a schedule.", no_args_is_help=True
)
app.add_typer(timers_app, name="timers")
alerts_app = _App(help="Push notifications (alerts.urls).", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


class State:
    """What the global options chose, shared by every command."""

    config_path: Path | None = None
    verbose: int = 0
    log_format: str | None = None


STATE = State()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gridpulse-outbox {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (default: $OUTBOX_CONFIG, else none)."),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            show_default=False,
            help="More logging, repeat for more: -v our debug lines (every HTTP request), "
            "-vv also httpx's and SQLAlchemy's.",
        ),
    ] = 0,
    log_format: Annotated[
        str | None,
        typer.Option("--log-format", help="logfmt or json (default: config log_format)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """Global options; they go before the command: ``outbox -c my.yaml fetch``."""
    STATE.config_path = config
    STATE.verbose = verbose
    STATE.log_format = log_format
    if log_format not in (None, "logfmt", "json"):
        fail(UsageError(f"--log-format: {log_format!r} is not logfmt or json"))
    setup_logging(verbose, log_format or "logfmt")


def fail(exc: OutboxError) -> NoReturn:
    """Say ``exc`` in one line and exit with its code."""
    print_error(str(exc))
    raise typer.Exit(exc.exit_code)


@contextmanager
def mapped_errors() -> Iterator[None]:
    """A command body: an OutboxError to its exit code, an interrupt to 128 + signal."""
    try:
        yield
    except OutboxError as exc:
        log.debug("command failed", exc_info=True)
        fail(exc)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        typer.echo(f"{exc or 'interrupted'}: stopped; every row keeps its last state", err=True)
        raise typer.Exit(128 + signum) from None


def configured() -> Config:
    """The config the global options name, loaded once the command needs it."""
    config = load_config(STATE.config_path)
    if STATE.log_format is None and config.log_format != "logfmt":
        setup_logging(STATE.verbose, config.log_format)
    return config


def console() -> Console:
    """The rich console for stdout: the terminal's width on a terminal (or ``$COLUMNS``),
    lines as long as they are when piped, so that ``grep`` and logs see whole lines."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def echo_json(data: Any, *, default: Any = None) -> None:
    """``data`` as indented JSON on stdout."""
    typer.echo(json.dumps(data, indent=2, sort_keys=False, default=default))
