"""Operations: prune, timers, alerts, db, config, doctor, the receiver and the demo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from outbox.cli.app import (
    STATE,
    alerts_app,
    app,
    configured,
    console,
    db_app,
    echo_json,
    fail,
    mapped_errors,
    timers_app,
)
from outbox.cli.options import check_directory, check_unit_user
from outbox.errors import ConfigError, TerminalError, UsageError
from outbox.store import Store
from outbox.wiring import open_store


@app.command()
def prune() -> None:
    """Remove acknowledged rows past retention and unused raw pages; shrink the file."""
    from outbox.stages.housekeeping import prune_outbox

    with mapped_errors():
        typer.echo(prune_outbox(configured()).summary())


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
    from outbox import timers

    with mapped_errors():
        if out is not None:
            check_directory("--out", out)
        if user is not None:
            check_unit_user(user)
        # the units run with the config this command was given (-c), unless --config says
        config = config or STATE.config_path
        text = timers.print_or_write(prefix=prefix, config=config, user=user, out=out)
        typer.echo(text, nl=False)


@alerts_app.command("test")
def alerts_test() -> None:
    """Send one test notification to every URL in alerts.urls and report each result."""
    from outbox import alerts

    with mapped_errors():
        raise typer.Exit(alerts.test_all(configured(), typer.echo))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the outbox or bring its schema to the newest version."""
    with mapped_errors():
        config = configured()
        with open_store(config, create=True) as store:
            typer.echo(f"{store.path}: schema at {store.schema_version()}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema version of the outbox (without changing it)."""
    from outbox.store.migrate import head_revision

    with mapped_errors():
        config = configured()
        with Store.open_readonly(config.database) as store:
            current = store.schema_version()
        head = head_revision()
        typer.echo(f"{current or 'none'} (head {head}{', up to date' if current == head else ''})")


@app.command("config")
def show_config() -> None:
    """Print the effective configuration (secrets as ***)."""
    with mapped_errors():
        echo_json(configured().redacted(), default=str)


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
    from outbox import doctor as doctor_mod
    from outbox.wiring import doctor_http

    with mapped_errors():
        findings = doctor_mod.run(STATE.config_path, reset=reset, http=doctor_http)
        for finding in findings:
            typer.echo(finding.line())
        raise typer.Exit(doctor_mod.exit_code(findings))


@app.command()
def receiver(
    db: Annotated[
        str, typer.Option(help="SQLite path or postgresql://user@host/dbname.")
    ] = "receiver.db",
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

    from outbox.receiver.server import serve

    key = api_key or os.environ.get("GRIDPULSE_API_KEY")
    if not key:
        fail(ConfigError("receiver: --api-key or GRIDPULSE_API_KEY is required"))
    if catalog not in ("auto", "fixed"):
        fail(UsageError(f"--catalog {catalog}: use auto or fixed"))
    if not 0 <= port <= 65535:
        fail(UsageError(f"--port {port}: not a TCP port (0-65535; 0 picks a free one)"))
    from outbox.receiver.faults import Faults

    try:
        Faults.parse(fault or ())
    except ValueError as exc:
        fail(UsageError(str(exc)))
    if "://" not in db:  # a path, not a SQLAlchemy URL
        target = Path(db)
        if target.is_dir():
            fail(UsageError(f"--db {db}: is a directory; name a database file"))
        if not target.absolute().parent.is_dir():
            fail(UsageError(f"--db {db}: directory {target.absolute().parent} does not exist"))
    from outbox.receiver.pg import ReceiverDatabaseError
    from outbox.receiver.server import ReceiverStartError

    with mapped_errors():
        try:
            serve(db, host=host, port=port, api_key=key, catalog=catalog, faults=fault or ())
        except ReceiverDatabaseError as exc:  # a missing driver, a bad or unreachable URL
            raise ConfigError(f"receiver: {exc}") from None
        except ReceiverStartError as exc:  # the port is taken, the address not this host's
            raise TerminalError(f"receiver: {exc}") from None


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
    with mapped_errors():
        check_directory("--keep", keep)
        if sample_dir:
            from outbox.sample import sample_dir as bundled

            typer.echo(str(bundled()))
            return
        from outbox import demo as demo_mod
        from outbox.status import render_table

        result = demo_mod.run_demo(keep, say=typer.echo)
        typer.echo(demo_mod.status_heading(result))
        console().print(render_table(result.status))
        for line in demo_mod.closing_lines(result):
            typer.echo(line)
