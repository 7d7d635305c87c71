"""The ``outbox`` command line: parse, call one library function, print, map errors to exits.

Exit codes: 0 ok; 1 the run failed (EIA or GridPulse unreachable, rows deferred);
2 usage or configuration error; 4 the outbox is full (fetch refuses to grow it);
143 stopped by SIGTERM (130: SIGINT), the run recorded as failed.
``status --check`` uses the monitoring convention instead: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from outbox import USER_AGENT, __version__
from outbox.config import Config, load_config
from outbox.errors import ConfigError, OutboxError, UsageError
from outbox.logsetup import print_error, setup_logging
from outbox.stages.runs import interrupt_on_signals
from outbox.store import Store
from outbox.timeutil import parse_bound, parse_ts, to_ts

if TYPE_CHECKING:
    import httpx  # imported by the commands that talk HTTP, not by `status` or `db`

log = logging.getLogger("outbox.cli")


class _PlainHelp:
    """Help that shows what to type: a flag or a counter without a type (``--dry-run``,
    ``-v``), a repeatable option by its value (``--ba BA``), an argument in capitals
    (``SERIES_ID``) rather than Typer's ``<bool>``, ``<list[str]>`` and ``{series_id}``."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
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
        _fail(UsageError(f"--log-format: {log_format!r} is not logfmt or json"))
    setup_logging(verbose, log_format or "logfmt")


def _fail(exc: OutboxError) -> None:
    print_error(str(exc))
    raise typer.Exit(exc.exit_code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except OutboxError as exc:
        log.debug("command failed", exc_info=True)
        _fail(exc)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        typer.echo(f"{exc or 'interrupted'}: stopped; every row keeps its last state", err=True)
        raise typer.Exit(128 + signum) from None


def _config() -> Config:
    config = load_config(STATE.config_path)
    if STATE.log_format is None and config.log_format != "logfmt":
        setup_logging(STATE.verbose, config.log_format)
    return config


def _open(config: Config, *, create: bool) -> Store:
    """The configured outbox; without ``create`` a missing one is an error (exit 2)."""
    return Store.open(config.database, create=create)


def http_client(timeout: float, connect: float, verify: bool) -> httpx.Client:
    """One pooled HTTP client for a run."""
    import httpx

    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=connect),
        headers={"User-Agent": USER_AGENT},
        verify=verify,
        follow_redirects=False,
    )


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


# ---------------------------------------------------------------------------------
# fetch / send
# ---------------------------------------------------------------------------------


@app.command()
def fetch(
    replay: Annotated[
        Path | None,
        typer.Option(help="Stage saved EIA v2 response bodies (*.json) from DIR; no network."),
    ] = None,
    start: Annotated[
        str | None, typer.Option(help="Backfill from this date or RFC 3339 time (UTC).")
    ] = None,
    end: Annotated[
        str | None, typer.Option(help="Backfill through this date or time (inclusive, UTC).")
    ] = None,
    ba: Annotated[
        list[str] | None,
        typer.Option("--ba", metavar="BA", help="Only this balancing authority (repeat)."),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", metavar="DATASET", help="Only this dataset (repeat)."),
    ] = None,
    fill_gaps: Annotated[
        bool, typer.Option("--fill-gaps", help="Re-request exactly the missing hours.")
    ] = False,
    lookback: Annotated[
        int | None,
        typer.Option(
            min=1, metavar="HOURS", help="Re-check at least this many hours back (deep re-check)."
        ),
    ] = None,
) -> None:
    """Pull new and revised hourly observations from EIA into the outbox."""
    from outbox import commands

    with _errors():
        config = _config()
        bounds = _bounds(start, end)
        if replay is not None and (bounds[0] or fill_gaps or lookback):
            raise UsageError(
                "--replay cannot be combined with --start/--end, --fill-gaps or --lookback"
            )
        if dataset:
            _check_datasets(dataset)
        if replay is not None:
            _check_directory("--replay", replay, must_exist=True)
        code = commands.fetch(
            config,
            replay=replay,
            start=bounds[0],
            end=bounds[1],
            bas=ba,
            datasets=dataset,
            fill_gaps=fill_gaps,
            lookback=lookback,
        )
    raise typer.Exit(code)


def _bounds(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    try:
        lo = parse_bound(start) if start else None
        hi = parse_bound(end) if end else None
    except ValueError as exc:
        raise UsageError(f"--start/--end: not a date or RFC 3339 time: {exc}") from None
    if hi is not None and lo is None:
        raise UsageError("--end needs --start")
    if lo is not None and hi is not None and hi < lo:
        raise UsageError(f"--end {to_ts(hi)} is before --start {to_ts(lo)}")
    return lo, hi


def _check_directory(option: str, path: Path, *, must_exist: bool = False) -> None:
    """Refuse (exit 2) a directory option naming a file, or a missing one where it must exist."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: not a directory")
    if must_exist and not path.exists():
        raise UsageError(f"{option} {path}: no such directory")


def _check_metrics_target(path: Path) -> None:
    """``--metrics PATH`` must name a file in an existing directory (checked before reading)."""
    if path.is_dir():
        raise UsageError(
            f"--metrics {path}: is a directory; give a file such as {path}/outbox.prom"
        )
    if not path.parent.is_dir():
        raise UsageError(f"--metrics {path}: directory {path.parent} does not exist")
    from outbox.files import METRICS_HEAD, check_target

    check_target(path, METRICS_HEAD, "metrics file")


def _since(since: str | None) -> datetime | None:
    try:
        return parse_bound(since) if since else None
    except ValueError:
        raise UsageError(f"--since {since!r}: not a date or RFC 3339 time") from None


def _check_datasets(names: list[str]) -> None:
    from outbox import datasets

    for name in names:
        if name not in datasets.names():
            known = ", ".join(datasets.names())
            raise UsageError(f"--dataset {name}: unknown; known: {known}")


@app.command()
def send(
    max_batches: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many batches.")
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option(min=0, help="Stop starting new batches after this long.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be sent; send nothing.")
    ] = False,
) -> None:
    """Deliver pending rows to GridPulse in batches and record each acknowledgement."""
    from outbox import commands

    with _errors():
        config = _config()
        code = commands.send(
            config, max_batches=max_batches, max_seconds=max_seconds, dry_run=dry_run
        )
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------
# status and inspection
# ---------------------------------------------------------------------------------


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable status.")] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Monitoring probe: exit 0 OK, 1 WARN, 2 CRIT, 3 UNKNOWN."),
    ] = False,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            metavar="PATH",
            help="Write Prometheus text metrics to PATH atomically (prints nothing else "
            "unless --json or --remote).",
        ),
    ] = None,
    remote: Annotated[
        bool,
        typer.Option(
            "--remote", help="Compare each series with GridPulse's latest; exit 1 if unreachable."
        ),
    ] = False,
) -> None:
    """Backlog, freshness, watermarks, dead letters and recent runs at a glance."""
    from outbox import commands

    if check:
        raise typer.Exit(commands.status_check(STATE.config_path))
    with _errors():
        if metrics is not None:
            _check_metrics_target(metrics)
        config = _config()
        code = commands.status(config, as_json=as_json, metrics=metrics, remote=remote)
    raise typer.Exit(code)


@app.command()
def show(
    series_id: Annotated[str, typer.Argument(help="e.g. EIA.PJM.demand")],
    ts: Annotated[str, typer.Argument(help="e.g. 2025-08-22T14:00:00Z")],
) -> None:
    """Print one observation, its delivery state and the raw EIA row it came from."""
    from outbox import commands

    with _errors():
        try:
            when = to_ts(parse_ts(ts))
        except ValueError:
            raise UsageError(f"{ts!r} is not an RFC 3339 time") from None
        raise typer.Exit(commands.show(_config(), series_id, when))


def _since_ts(since: str | None) -> str | None:
    """``--since`` as outbox ts text (None when not given)."""
    bound = _since(since)
    return to_ts(bound) if bound else None


@app.command()
def revisions(
    since: Annotated[
        str | None, typer.Option(help="Only revisions seen at or after this date or time.")
    ] = None,
    series: Annotated[
        str | None, typer.Option(help="Only series matching this glob (EIA.PJM.*).")
    ] = None,
    min_change: Annotated[
        float | None,
        typer.Option("--min-change", min=0, metavar="PCT", help="Only changes of PCT % or more."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """List what EIA revised: old and new value of every revised row, when, which run."""
    from outbox.quality import report

    with _errors():
        lo = _since_ts(since)
        report.revisions(_config(), since=lo, series=series, min_change=min_change, as_json=as_json)


@app.command()
def quality(
    since: Annotated[
        str | None, typer.Option(help="Only findings reaching this date or time or later.")
    ] = None,
    rule: Annotated[str | None, typer.Option(help="Only this rule (e.g. spike).")] = None,
    ba: Annotated[str | None, typer.Option(help="Only this BA (GridPulse code).")] = None,
    open_only: Annotated[bool, typer.Option("--open", help="Only unresolved findings.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """List data-quality findings about EIA's numbers (never edits; docs/quality.md)."""
    from outbox.config import QUALITY_RULES
    from outbox.quality import report

    with _errors():
        lo = _since_ts(since)
        if rule is not None and rule not in QUALITY_RULES:
            raise UsageError(f"--rule {rule}: unknown; known: {', '.join(QUALITY_RULES)}")
        report.findings(_config(), since=lo, rule=rule, ba=ba, open_only=open_only, as_json=as_json)


@app.command()
def requeue(
    series: Annotated[
        str | None, typer.Option(help="Only series matching this glob (EIA.PJM.*).")
    ] = None,
    code: Annotated[str | None, typer.Option(help="Only rows dead with this code.")] = None,
    since: Annotated[str | None, typer.Option(help="Only rows at or after this ts.")] = None,
) -> None:
    """Put dead-lettered rows back to pending (after the cause was fixed)."""
    with _errors():
        bound = _since(since)
        config = _config()
        lo = to_ts(bound) if bound else None
        with _open(config, create=False) as store:
            n = store.delivery.requeue_dead(series, code, lo)
        typer.echo(f"requeued {n} dead rows")


@app.command()
def runs(
    limit: Annotated[int, typer.Option(min=1, help="How many runs.")] = 20,
    stage: Annotated[str | None, typer.Option(help="fetch or send.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only failed runs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Show recent fetch and send runs: durations, counts, errors."""
    from outbox import commands

    with _errors():
        if stage not in (None, "fetch", "send"):
            raise UsageError(f"--stage {stage}: use fetch or send")
        commands.runs(_config(), limit=limit, stage=stage, failed=failed, as_json=as_json)


# ---------------------------------------------------------------------------------
# gaps / prune / timers
# ---------------------------------------------------------------------------------


@app.command()
def gaps(
    since: Annotated[
        str | None, typer.Option(help="Only hours at or after this date or RFC 3339 time.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """List hours missing inside each series (fill them with fetch --fill-gaps)."""
    from outbox import commands

    with _errors():
        raise typer.Exit(commands.gaps(_config(), since=_since(since), as_json=as_json))


@app.command()
def report(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="Where to write the HTML file (default: report_path, else report.html)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=366, help="Days of values to plot.")] = 7,
) -> None:
    """Write one self-contained HTML report: verdict, charts, runs, freshness."""
    from outbox import commands

    with _errors():
        raise typer.Exit(commands.report(_config(), path, days=days))


@app.command()
def plot(
    series: Annotated[
        str, typer.Argument(metavar="SERIES_GLOB", help="Series ids to overlay, e.g. 'EIA.PJM.*'.")
    ],
    days: Annotated[int, typer.Option(min=1, max=366, help="Days of values to plot.")] = 7,
) -> None:
    """Draw series as a line chart in the terminal (gaps break the line)."""
    import shutil

    from outbox import commands

    size = shutil.get_terminal_size((100, 30))
    with _errors():
        if not series.strip():
            raise UsageError("SERIES_GLOB is empty: give a pattern such as 'EIA.PJM.*'")
        raise typer.Exit(
            commands.plot(
                _config(), series, days=days, width=size.columns, height=max(12, size.lines - 6)
            )
        )


@app.command()
def prune() -> None:
    """Remove acknowledged rows past retention and unused raw pages; shrink the file."""
    from outbox import commands

    with _errors():
        raise typer.Exit(commands.prune(_config()))


@timers_app.command("print")
def timers_print(
    prefix: Annotated[
        Path | None,
        typer.Option(help="Install prefix of outbox (PREFIX/bin/outbox); default: this one."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Config file the units use (default /etc/gridpulse-outbox/...)."
        ),
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="Run as this existing user instead of DynamicUser=yes.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the files into DIR instead of printing them.")
    ] = None,
) -> None:
    """Render the systemd units, timers and crontab for this installation."""
    from outbox import commands

    with _errors():
        if out is not None:
            _check_directory("--out", out)
        code = commands.timers_print(prefix=prefix, config_path=config, user=user, out=out)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------
# db / config / receiver
# ---------------------------------------------------------------------------------


@alerts_app.command("test")
def alerts_test() -> None:
    """Send one test notification to every URL in alerts.urls and report each result."""
    from outbox import alerts

    with _errors():
        raise typer.Exit(alerts.test_all(_config(), typer.echo))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the outbox or bring its schema to the newest version."""
    with _errors():
        config = _config()
        with _open(config, create=True) as store:
            typer.echo(f"{store.path}: schema at {store.schema_version()}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema version of the outbox (without changing it)."""
    from outbox.store.migrate import head_revision

    with _errors():
        config = _config()
        with Store.open_readonly(config.database) as store:
            current = store.schema_version()
        head = head_revision()
        typer.echo(f"{current or 'none'} (head {head}{', up to date' if current == head else ''})")


@app.command("config")
def show_config() -> None:
    """Print the effective configuration (secrets as ***)."""
    with _errors():
        _echo_json(_config().redacted())


@app.command()
def doctor(
    reset: Annotated[
        bool,
        typer.Option(
            "--reset",
            help="Set an unreadable database aside (renamed, never deleted) and start fresh.",
        ),
    ] = False,
) -> None:
    """Check config, database, schema, locks, GridPulse, clock and EIA: OK / FAIL / SKIP."""
    from outbox import commands

    with _errors():
        raise typer.Exit(commands.doctor(STATE.config_path, reset=reset))


@app.command()
def receiver(
    db: Annotated[str, typer.Option(help="SQLite path or SQLAlchemy URL.")] = "receiver.db",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8700,
    api_key: Annotated[
        str | None,
        typer.Option(help="Bearer key clients must send (default $GRIDPULSE_API_KEY)."),
    ] = None,
    catalog: Annotated[str, typer.Option(help="auto or fixed.")] = "auto",
    fault: Annotated[
        list[str] | None,
        typer.Option(metavar="SPEC", help="Fault to inject (repeat); see docs."),
    ] = None,
) -> None:
    """Run the reference GridPulse receiver (a test peer and the executable contract)."""
    import os

    from outbox.receiver.server import serve

    key = api_key or os.environ.get("GRIDPULSE_API_KEY")
    if not key:
        _fail(ConfigError("receiver: --api-key or GRIDPULSE_API_KEY is required"))
    if catalog not in ("auto", "fixed"):
        _fail(UsageError(f"--catalog {catalog}: use auto or fixed"))
    if not 0 <= port <= 65535:
        _fail(UsageError(f"--port {port}: not a TCP port (0-65535; 0 picks a free one)"))
    from outbox.receiver.faults import Faults

    try:
        Faults.parse(fault or ())
    except ValueError as exc:
        _fail(UsageError(str(exc)))
    if "://" not in db:  # a path, not a SQLAlchemy URL
        target = Path(db)
        if target.is_dir():
            _fail(UsageError(f"--db {db}: is a directory; name a database file"))
        if not target.absolute().parent.is_dir():
            _fail(UsageError(f"--db {db}: directory {target.absolute().parent} does not exist"))
    with _errors():
        serve(db, host=host, port=port, api_key=key, catalog=catalog, faults=fault or ())


@app.command()
def demo(
    keep: Annotated[
        Path,
        typer.Option(
            metavar="DIR",
            help="Where to keep the demo's outbox, receiver database and config.yaml "
            "(a new run starts afresh there).",
        ),
    ] = Path("outbox-demo"),
    sample_dir: Annotated[
        bool,
        typer.Option(
            "--sample-dir", help="Print where the bundled EIA sample lives (for fetch --replay)."
        ),
    ] = False,
) -> None:
    """Run the whole job offline: bundled sample -> outbox -> reference receiver -> status."""
    from outbox import commands

    with _errors():
        _check_directory("--keep", keep)
        raise typer.Exit(commands.demo(keep, show_sample_dir=sample_dir))


def main() -> None:
    """Console-script entry point."""
    # systemd stops a service with SIGTERM, a terminal with SIGINT (Ctrl-C): turn each into
    # an exception naming it, so the stage rolls back its open transaction, records the run
    # as failed and the last line says why (exit 143 / 130).
    with interrupt_on_signals():
        _main()


def _main() -> None:
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort

    try:
        code = app(standalone_mode=False)
    except BrokenPipeError:  # `outbox status | head`
        sys.stderr.close()
        return
    except ClickException as exc:
        # Click's usage errors are a box of lines: one line here, as for every failure.
        if exc.format_message().strip():  # (none when no_args_is_help printed the help)
            print_error(_usage_line(exc))
        sys.exit(exc.exit_code)
    except Abort:
        print_error("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_line(exc: Any) -> str:
    """A Click usage error as one line: what was wrong, and where the help is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see `{ctx.command_path} --help`)"
