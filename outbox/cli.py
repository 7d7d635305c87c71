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
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from outbox import USER_AGENT, __version__
from outbox.config import Config, load_config
from outbox.errors import ConfigError, Interrupted, OutboxError, UsageError
from outbox.logsetup import print_error, setup_logging
from outbox.store import Store
from outbox.timeutil import parse_bound, parse_ts, to_ts

if TYPE_CHECKING:
    import httpx  # imported by the commands that talk HTTP, not by `status` or `db`

log = logging.getLogger("outbox.cli")

app = typer.Typer(
    name="outbox",
    help="Fetch EIA-930 hourly grid data into a durable SQLite outbox and send it to GridPulse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Inspect or migrate the outbox schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
timers_app = typer.Typer(
    help="systemd units and a crontab that run the stages on a schedule.", no_args_is_help=True
)
app.add_typer(timers_app, name="timers")


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
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-v debug).")
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


def _open(config: Config) -> Store:
    return Store.open(config.database)


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
        list[str] | None, typer.Option("--ba", help="Only this balancing authority (repeat).")
    ] = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="Only this dataset (repeat).")
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


def _check_datasets(names: list[str]) -> None:
    from outbox.config import DATASET_NAMES

    for name in names:
        if name not in DATASET_NAMES:
            raise UsageError(f"--dataset {name}: unknown; known: {', '.join(DATASET_NAMES)}")


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


def _since(since: str | None) -> str | None:
    try:
        return to_ts(parse_bound(since)) if since else None
    except ValueError:
        raise UsageError(f"--since {since!r}: not a date or RFC 3339 time") from None


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
        lo = _since(since)
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
        lo = _since(since)
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
        config = _config()
        lo = to_ts(parse_bound(since)) if since else None
        with _open(config) as store:
            n = store.requeue_dead(series, code, lo)
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
        try:
            lo = parse_bound(since) if since else None
        except ValueError:
            raise UsageError(f"--since {since!r}: not a date or RFC 3339 time") from None
        raise typer.Exit(commands.gaps(_config(), since=lo, as_json=as_json))


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
        code = commands.timers_print(prefix=prefix, config_path=config, user=user, out=out)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------
# db / config / receiver
# ---------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the outbox or bring its schema to the newest version."""
    with _errors():
        config = _config()
        with _open(config) as store:
            typer.echo(f"{store.path}: schema at {store.schema_version()}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema version of the outbox (without changing it)."""
    from outbox.migrate import head_revision

    with _errors():
        config = _config()
        if not Path(config.database).exists():
            raise UsageError(f"{config.database}: no outbox there yet")
        with Store.open(config.database, migrate=False) as store:
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
        list[str] | None, typer.Option(help="Fault to inject (repeat); see docs.")
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
    with _errors():
        serve(db, host=host, port=port, api_key=key, catalog=catalog, faults=fault or ())


@app.command()
def demo(
    keep: Annotated[
        Path | None, typer.Option(help="Keep the demo's files in DIR (default: a temp dir).")
    ] = None,
) -> None:
    """Run the whole job offline: bundled sample -> outbox -> reference receiver -> status."""
    from outbox import commands

    with _errors():
        raise typer.Exit(commands.demo(keep))


def _on_sigterm(signum: int, _frame: object) -> None:
    # Only the first SIGTERM interrupts: the run must be able to record itself as failed.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point."""
    # systemd stops a service with SIGTERM: turn it into an exception, so the stage
    # rolls back its open transaction and records the run as failed (exit 143).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except BrokenPipeError:  # `outbox status | head`
        sys.stderr.close()
