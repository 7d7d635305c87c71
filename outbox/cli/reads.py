"""The commands that read the outbox: status, show, revisions, quality, runs, gaps,
report, plot (and requeue, which puts dead rows back)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from outbox.cli.app import (
    STATE,
    app,
    configured,
    console,
    echo_json,
    mapped_errors,
)
from outbox.cli.options import check_metrics_target, check_report_target, since_bound, since_ts
from outbox.config import Config, load_config
from outbox.errors import SinkError, UsageError
from outbox.logsetup import print_error
from outbox.redact import redact
from outbox.timeutil import parse_ts, to_ts
from outbox.wiring import open_store

if TYPE_CHECKING:
    from outbox.status import Status


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
    from outbox import status as status_mod

    if check:
        raise typer.Exit(_status_check())
    with mapped_errors():
        if metrics is not None:
            check_metrics_target(metrics)
        config = configured()
        model = status_mod.read(config)
        if metrics is not None:
            status_mod.write_metrics(model, metrics)
        if remote and not _compare_remote(config, model):
            raise typer.Exit(1)
        if as_json:
            echo_json(model.to_dict())
        elif metrics is None or remote:
            console().print(status_mod.render_table(model))


def _status_check() -> int:
    """``outbox status --check``: never raises; UNKNOWN when the status cannot be read."""
    from outbox import status as status_mod

    try:
        config = load_config(STATE.config_path)
        model = status_mod.read(config, for_check=True)
        code, line = status_mod.evaluate(config, model)
    except Exception as exc:  # a probe reports, it does not crash
        code, line = status_mod.UNKNOWN, f"UNKNOWN - {redact(str(exc))}"
    typer.echo(line)
    return code


def _compare_remote(config: Config, model: Status) -> bool:
    """``status --remote``: GridPulse's latest into ``model``; False (said) when unreachable."""
    from outbox import status as status_mod
    from outbox.wiring import remote_latest, sink_where

    where = sink_where(config)
    try:
        with remote_latest(config) as client:
            model.remote = status_mod.compare_remote(model, client, where)
    except SinkError as exc:
        print_error(f"cannot compare with GridPulse at {where}: {exc}")
        return False
    return True


@app.command()
def show(
    series_id: Annotated[str, typer.Argument(help="e.g. EIA.PJM.demand")],
    ts: Annotated[str, typer.Argument(help="e.g. 2025-08-22T14:00:00Z")],
) -> None:
    """Print one observation, its delivery state and the raw EIA row it came from."""
    from outbox.show import observation

    with mapped_errors():
        try:
            when = to_ts(parse_ts(ts))
        except ValueError:
            raise UsageError(f"{ts!r} is not an RFC 3339 time") from None
        found = observation(configured(), series_id, when)
        if found is None:
            typer.echo(f"no observation {series_id} at {when}", err=True)
            raise typer.Exit(1)
        echo_json(found, default=str)


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

    with mapped_errors():
        lo = since_ts(since)
        report.revisions(
            configured(), since=lo, series=series, min_change=min_change, as_json=as_json
        )


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

    with mapped_errors():
        lo = since_ts(since)
        if rule is not None and rule not in QUALITY_RULES:
            raise UsageError(f"--rule {rule}: unknown; known: {', '.join(QUALITY_RULES)}")
        report.findings(
            configured(), since=lo, rule=rule, ba=ba, open_only=open_only, as_json=as_json
        )


@app.command()
def requeue(
    series: Annotated[
        str | None, typer.Option(help="Only series matching this glob (EIA.PJM.*).")
    ] = None,
    code: Annotated[str | None, typer.Option(help="Only rows dead with this code.")] = None,
    since: Annotated[str | None, typer.Option(help="Only rows at or after this ts.")] = None,
) -> None:
    """Put dead-lettered rows back to pending (after the cause was fixed)."""
    with mapped_errors():
        bound = since_bound(since)
        config = configured()
        lo = to_ts(bound) if bound else None
        with open_store(config, create=False) as store:
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
    from outbox import status as status_mod

    with mapped_errors():
        if stage not in (None, "fetch", "send"):
            raise UsageError(f"--stage {stage}: use fetch or send")
        with status_mod.open_store(configured()) as store:
            records = store.runs.recent_runs(limit=limit, stage=stage, failed=failed)
        if as_json:
            echo_json([status_mod.run_dict(r) for r in records])
        else:
            console().print(status_mod.render_runs(records))


@app.command()
def gaps(
    since: Annotated[
        str | None, typer.Option(help="Only hours at or after this date or RFC 3339 time.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """List hours missing inside each series (fill them with fetch --fill-gaps)."""
    from outbox.gaps import report as gaps_report

    with mapped_errors():
        typer.echo(gaps_report(configured(), since=since_bound(since), as_json=as_json))


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
    from outbox.report import write_report

    with mapped_errors():
        config = configured()
        target = Path(path or config.report_path or "report.html")
        check_report_target(target)  # before the outbox is even opened
        written = write_report(config, target, days=days)
        typer.echo(f"report written: {written} ({written.stat().st_size:,} bytes)")


@app.command()
def plot(
    series: Annotated[
        str, typer.Argument(metavar="SERIES_GLOB", help="Series ids to overlay, e.g. 'EIA.PJM.*'.")
    ],
    days: Annotated[int, typer.Option(min=1, max=366, help="Days of values to plot.")] = 7,
) -> None:
    """Draw series as a line chart in the terminal (gaps break the line)."""
    import shutil

    from outbox.plot import plot_series

    size = shutil.get_terminal_size((100, 30))
    with mapped_errors():
        if not series.strip():
            raise UsageError("SERIES_GLOB is empty: give a pattern such as 'EIA.PJM.*'")
        height = max(12, size.lines - 6)
        typer.echo(plot_series(configured(), series, days=days, width=size.columns, height=height))
