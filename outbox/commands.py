"""Command bodies behind the CLI: build clients, open the store, run a stage, print.

Each function returns the process exit code; errors derive from OutboxError and are
mapped to exit codes by the CLI.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from outbox.config import Config
from outbox.errors import OutboxError
from outbox.logsetup import log_scope, print_error
from outbox.redact import redact
from outbox.store import Store
from outbox.timeutil import to_ts
from outbox.wiring import gridpulse_client, gridpulse_sink

if TYPE_CHECKING:
    from outbox.pipeline import Window

# outbox.pipeline (and with it httpx, the EIA and GridPulse clients) is imported by the
# commands that run a stage: `outbox status` and the other reading commands start faster.

log = logging.getLogger(__name__)
DOCTOR_TIMEOUT_SECONDS = 20.0
# Piped output is not wrapped: rich would break lines at 80 columns, mid-phrase.
PIPE_WIDTH = 100_000


def _http(timeout: float, connect: float, verify: bool):
    from outbox.cli import http_client

    return http_client(timeout, connect, verify)


def observed(stage: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a stage command: its log lines carry ``stage`` (and the run id the pipeline
    binds), and ``metrics_path`` and ``report_path`` are refreshed after it, whether it
    succeeded or not."""

    def wrap(command: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(command)
        def run(config: Config, *args: Any, **kwargs: Any) -> int:
            with log_scope(stage=stage):
                try:
                    return command(config, *args, **kwargs)
                finally:
                    from outbox.report import write_run_report
                    from outbox.status import write_run_metrics

                    write_run_metrics(config)
                    write_run_report(config)
                    if config.alerts.urls:
                        from outbox.alerts import after_run

                        after_run(config)

        return run

    return wrap


def console() -> Any:
    """The rich console for stdout: the terminal's width on a terminal (or ``$COLUMNS``),
    lines as long as they are when piped, so that ``grep`` and logs see whole lines."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def eia_client(config: Config, http: Any) -> Any:
    """The EIA client for a live fetch (needs the key)."""
    from outbox.eia import EIAClient
    from outbox.retry import retry_policy

    e = config.eia
    return EIAClient(
        http,
        e.base_url,
        config.require_eia_key(),
        page_length=e.page_length,
        retry=retry_policy(e.retry),
        max_per_second=e.max_requests_per_second,
        max_per_hour=e.max_requests_per_hour,
    )


@observed("fetch")
def fetch(
    config: Config,
    *,
    replay: Path | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    bas: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    fill_gaps: bool = False,
    lookback: int | None = None,
) -> int:
    """``outbox fetch``: replay, backfill, incremental (``--lookback``) or ``--fill-gaps``."""
    from outbox.housekeeping import guard_size
    from outbox.pipeline import run_fetch, skipped_text

    _check_fetch_mode(
        start=start, bas=bas, datasets=datasets, fill_gaps=fill_gaps, lookback=lookback
    )
    if lookback is not None:
        config = with_lookback(config, lookback)
    if fill_gaps:
        return fill_gaps_fetch(config)
    with Store.open(config.database) as store:
        guard_size(config, store)
        if replay is not None:
            result = run_fetch(config, store, replay=replay)
        else:
            e = config.eia
            with _http(e.timeout_seconds, e.connect_timeout_seconds, e.verify_tls) as http:
                client = eia_client(config, http)
                initial = None
                if (
                    start is None
                    and not store.staging.watermarks()
                    and not store.staging.stream_progress()
                ):
                    initial = gridpulse_starts(config, store)  # a new outbox
                with _progress(start is not None) as progress:
                    result = run_fetch(
                        config,
                        store,
                        client=client,
                        start=start,
                        end=end,
                        bas=bas,
                        datasets=datasets,
                        initial=initial,
                        progress=progress,
                    )
    if result.skipped:
        typer.echo(f"a fetch is already running (pid {result.holder}); nothing to do")
        return 0
    invalid = result.counts()["invalid"]
    skipped = f"; {skipped_text(config, result)}" if result.unconfigured else ""
    typer.echo(
        f"fetch run {result.run_id}: {result.requests} requests, {result.pages} pages, "
        f"{result.rows} rows, {result.written} written, {invalid} invalid, "
        f"{result.duplicates} duplicates{skipped}"
    )
    if result.quality is not None:
        q = result.quality
        typer.echo(
            f"quality: {q.opened} findings opened, {q.resolved} resolved, "
            f"{q.quarantined} rows quarantined"
        )
    return 0


def _check_fetch_mode(
    *,
    start: datetime | None,
    bas: Sequence[str] | None,
    datasets: Sequence[str] | None,
    fill_gaps: bool,
    lookback: int | None,
) -> None:
    from outbox.errors import UsageError

    if fill_gaps and (start is not None or bas or datasets or lookback is not None):
        raise UsageError(
            "--fill-gaps re-requests every listed gap: no --start/--ba/--dataset/--lookback"
        )
    if lookback is not None and start is not None:
        raise UsageError("--lookback is for incremental fetches; a backfill has --start/--end")


def with_lookback(config: Config, hours: int) -> Config:
    """``config`` with every dataset's look-back at least ``hours`` (``fetch --lookback``).

    The look-back must stay shorter than the retention, or prune and re-check would fight
    over the same rows.
    """
    from outbox.errors import UsageError

    kept = config.housekeeping.retention_days * 24
    if hours >= kept:
        raise UsageError(
            f"--lookback {hours}: must be shorter than housekeeping.retention_days "
            f"({config.housekeeping.retention_days:g} days = {kept:g} h)"
        )
    datasets = {
        name: ds.model_copy(update={"lookback_hours": max(ds.lookback_hours, hours)})
        for name, ds in config.datasets.items()
    }
    return config.model_copy(update={"datasets": datasets})


def fill_gaps_fetch(config: Config) -> int:
    """``outbox fetch --fill-gaps``: ask EIA for exactly the missing hours, record the rest."""
    from outbox.gaps import run_fill_gaps
    from outbox.housekeeping import guard_size

    e = config.eia
    with (
        Store.open(config.database) as store,
        _http(e.timeout_seconds, e.connect_timeout_seconds, e.verify_tls) as http,
    ):
        guard_size(config, store)
        result = run_fill_gaps(config, store, eia_client(config, http))
    if result.fetch.skipped:
        typer.echo(f"a fetch is already running (pid {result.fetch.holder}); nothing to do")
        return 0
    typer.echo(
        f"fill-gaps run {result.fetch.run_id}: {result.gap_hours} missing hours, "
        f"{result.windows} requests, {result.filled} filled, "
        f"{result.checked} not at EIA (recorded as checked)"
    )
    return 0


def gaps(config: Config, *, since: datetime | None, as_json: bool) -> int:
    """``outbox gaps``: missing hours per series, as ranges."""
    from outbox import gaps as gaps_mod
    from outbox import status as status_mod

    with status_mod.open_store(config) as store:  # reads only: creates and migrates nothing
        found = gaps_mod.find_gaps(config, store, since=since)
    if as_json:
        data = {"gaps": [g.to_dict() for g in found], "hours": sum(g.hours for g in found)}
        typer.echo(json.dumps(data, indent=2))
    else:
        typer.echo(gaps_mod.render(found))
    return 0


def report(config: Config, path: Path | None, *, days: int) -> int:
    """``outbox report [PATH]``: write the HTML report and print where."""
    from outbox.errors import UsageError
    from outbox.report import write_report

    target = Path(path or config.report_path or "report.html")
    if target.is_dir():
        raise UsageError(f"report path {target} is a directory; name a file")
    if not target.parent.is_dir():
        raise UsageError(f"report path {target}: directory {target.parent} does not exist")
    from outbox.files import REPORT_HEAD, check_target

    check_target(target, REPORT_HEAD, "report")  # before the outbox is even opened
    written = write_report(config, target, days=days)
    typer.echo(f"report written: {written} ({written.stat().st_size:,} bytes)")
    return 0


def plot(config: Config, pattern: str, *, days: int, width: int, height: int) -> int:
    """``outbox plot GLOB``: the matching series of the last ``days`` staged, in the terminal."""
    from datetime import timedelta

    from outbox import status as status_mod
    from outbox.errors import UsageError
    from outbox.plot import MAX_SERIES, render
    from outbox.timeutil import parse_ts

    with status_mod.open_store(config) as store:
        _, newest = store.reads.ts_range()
        if newest is None:
            raise UsageError("the outbox holds no rows yet: nothing to plot")
        since = to_ts(parse_ts(newest) - timedelta(days=days))
        rows = store.reads.values_between(since, newest, pattern)
    names = sorted({r[0] for r in rows})
    if not names:
        raise UsageError(f"no series matches {pattern!r} (series ids look like EIA.PJM.demand)")
    if len(names) > MAX_SERIES:
        raise UsageError(
            f"{pattern!r} matches {len(names)} series; at most {MAX_SERIES} fit one chart "
            f"(e.g. {names[0]}, {names[1]}, ...): narrow the glob"
        )
    typer.echo(f"{pattern}: {since[:13]}h .. {newest[:13]}h UTC, hour-ending; gaps break the line")
    typer.echo(render(rows, title="", width=width, height=height))
    return 0


def prune(config: Config) -> int:
    """``outbox prune``: retention, every orphaned page, and the file handed back."""
    from outbox import housekeeping

    with Store.open(config.database, create=False) as store:
        result = housekeeping.prune(config, store, full=True)
    typer.echo(result.summary())
    return 0


def _housekeep(config: Config, store: Store) -> None:
    """The cheap prune at the end of a send; its failure never fails the send."""
    from sqlalchemy.exc import SQLAlchemyError

    from outbox import housekeeping

    try:
        housekeeping.prune(config, store)
    except (OutboxError, SQLAlchemyError) as exc:
        log.warning("prune after send failed error=%s", redact(str(exc)))


def timers_print(
    *, prefix: Path | None, config_path: Path | None, user: str | None, out: Path | None
) -> int:
    """``outbox timers print``: the systemd units and crontab for this installation."""
    from outbox import timers

    files = timers.render_all(timers.settings(prefix=prefix, config=config_path, user=user))
    if out is None:
        typer.echo(timers.concatenate(files), nl=False)
        return 0
    for path in timers.write(files, out):
        typer.echo(str(path))
    return 0


def gridpulse_starts(config: Config, store: Store) -> dict[str, datetime] | None:
    """For a new outbox: start each stream at GridPulse's latest instead of history start.

    Returns None (history start applies) when GridPulse is not configured or unreachable.
    """
    if config.gridpulse.api_key is None:
        return None
    from outbox.pipeline import plan_streams
    from outbox.timeutil import parse_ts

    g = config.gridpulse
    try:
        with _http(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http:
            listing = gridpulse_client(config, http).list_series()
    except OutboxError as exc:
        log.info("gridpulse latest unavailable, starting at history_start error=%s", exc)
        return None
    latest: dict[str, datetime] = {}
    for stream in plan_streams(config):
        prefix = _series_prefix(config, stream.dataset, stream.respondent)
        found = [
            parse_ts(s["latest_ts"])
            for s in listing
            if s.get("latest_ts") and str(s.get("series_id", "")).startswith(prefix)
        ]
        if found:
            latest[stream.key] = min(found)
    return latest or None


def _series_prefix(config: Config, dataset: str, respondent: str) -> str:
    from outbox import datasets

    return datasets.series_prefix(dataset, config.eia_to_gridpulse.get(respondent, respondent))


class _NullProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(backfill: bool):
    """A rich progress bar on a TTY; periodic log lines otherwise."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        if not backfill:
            yield None
            return
        if sys.stderr.isatty():
            from rich.progress import Progress

            with Progress(transient=False) as prog:
                task = prog.add_task("backfill", total=None)

                def tick(done: int, total: int, window: Window) -> None:
                    prog.update(task, completed=done, total=total, description=_label(window))

                yield tick
            return

        def line(done: int, total: int, window: Window) -> None:
            log.info("backfill progress done=%d total=%d window=%s", done, total, _label(window))

        yield line

    return bar()


def _label(window: Window) -> str:
    return f"{window.route.rsplit('/', 1)[-1]} {to_ts(window.start)[:13]}..{to_ts(window.end)[:13]}"


@observed("send")
def send(
    config: Config,
    *,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    dry_run: bool = False,
) -> int:
    """``outbox send``; before the first fetch has created the outbox, nothing to do."""
    from outbox.stages import send as send_stage

    if not dry_run:
        config.require_gridpulse_key()  # a config error (exit 2) even before the first fetch
    if not Path(config.database).exists():
        # A send timer may fire before the first fetch: say so, create nothing, exit 0.
        typer.echo(
            f"nothing to send: no outbox at {config.database} yet (the first `outbox fetch` "
            "creates it)"
        )
        return 0
    g = config.gridpulse
    with (
        Store.open(config.database, create=False) as store,
        _http(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http,
    ):
        sink = None if dry_run else gridpulse_sink(config, http)
        try:
            result = send_stage.run_send(
                config,
                store,
                sink,
                max_batches=max_batches,
                max_seconds=max_seconds,
                dry_run=dry_run,
            )
        except send_stage.SendFailed as exc:
            print_error(f"{exc}; rows stay pending")
            return 1
        if not (result.skipped or dry_run):
            _housekeep(config, store)
    if result.skipped:
        typer.echo(f"a send is already running (pid {result.holder}); exiting")
        return 0
    if dry_run:
        batches = math.ceil(result.due / g.batch_size) if result.due else 0
        later = f" until {result.waiting_until}" if result.waiting else ""
        typer.echo(
            f"dry run: {result.due} due now, {result.waiting} deferred{later}; "
            f"{batches} batches to {redact(g.base_url)}"
        )
        return 0
    typer.echo(
        f"send run {result.run_id}: {result.sent} rows in {result.batches} batches, "
        f"{result.acked} acked, {result.rejected} dead, {result.bytes} bytes"
    )
    return 0


def status(config: Config, *, as_json: bool, metrics: Path | None, remote: bool) -> int:
    """``outbox status``: table, ``--json``, ``--metrics PATH`` and/or ``--remote``.

    ``--metrics`` alone prints nothing (for cron and node_exporter); ``--remote`` exits 1
    when GridPulse cannot be asked.
    """
    from outbox import status as status_mod
    from outbox.errors import SinkError

    model = status_mod.read(config)
    if metrics is not None:
        status_mod.write_metrics(model, metrics)
    if remote:
        g = config.gridpulse
        with _http(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http:
            client = gridpulse_client(config, http)
            try:
                model.remote = status_mod.compare_remote(model, client, g.base_url)
            except SinkError as exc:
                print_error(f"cannot compare with GridPulse at {redact(g.base_url)}: {exc}")
                return 1
    if as_json:
        typer.echo(json.dumps(model.to_dict(), indent=2))
    elif metrics is None or remote:
        console().print(status_mod.render_table(model))
    return 0


def status_check(config_path: Path | None) -> int:
    """``outbox status --check``: never raises; UNKNOWN when the status cannot be read."""
    from outbox import status as status_mod
    from outbox.config import load_config

    try:
        config = load_config(config_path)
        model = status_mod.read(config, for_check=True)
        code, line = status_mod.evaluate(config, model)
    except Exception as exc:  # a probe reports, it does not crash
        code, line = status_mod.UNKNOWN, f"UNKNOWN - {redact(str(exc))}"
    typer.echo(line)
    return code


def doctor(config_path: Path | None, *, reset: bool) -> int:
    """``outbox doctor [--reset]``: one line per check; exit 1 when any check FAILs."""
    from outbox import doctor as doctor_mod

    def http(verify: bool) -> Any:
        return _http(DOCTOR_TIMEOUT_SECONDS, DOCTOR_TIMEOUT_SECONDS / 2, verify)

    findings = doctor_mod.run(config_path, reset=reset, http=http)
    for finding in findings:
        typer.echo(finding.line())
    return doctor_mod.exit_code(findings)


def show(config: Config, series_id: str, ts: str) -> int:
    """``outbox show SERIES TS``: the row, its states and its raw EIA row."""
    import orjson

    from outbox import status as status_mod

    with status_mod.open_store(config) as store:  # reads only: creates and migrates nothing
        row = store.reads.row(series_id, ts)
        if row is None:
            typer.echo(f"no observation {series_id} at {ts}", err=True)
            return 1
        source = None
        page_info: dict[str, Any] | None = None
        if row.get("page_id") is not None:
            found = store.reads.page_body(row["page_id"])
            if found is not None:
                page_info, body = found
                data = (orjson.loads(body).get("response") or {}).get("data") or []
                index = row.get("page_row")
                if index is not None and 0 <= index < len(data):
                    source = data[index]
        from outbox.quality.ledger import history

        revised = history(store, series_id, ts)
        around = _around(store, series_id, row["ts"])
    out = {"observation": row, "eia_row": source, "around": around}
    if page_info is not None:
        out["page"] = {k: page_info[k] for k in ("id", "route", "url", "fetched_at", "run_id")}
    out["revisions"] = revised
    typer.echo(json.dumps(out, indent=2, default=str))
    return 0


SPARK_HOURS = 12


def _around(store: Store, series_id: str, ts: str) -> dict[str, Any]:
    """The series 12 hours either side of ``ts`` as a sparkline (the row's hour bracketed)."""
    from datetime import timedelta

    from outbox.plot import literal_glob, sparkline
    from outbox.timeutil import parse_ts

    at = parse_ts(ts)
    hours = [at + timedelta(hours=h) for h in range(-SPARK_HOURS, SPARK_HOURS + 1)]
    found = {
        t: v
        for _, t, v in store.reads.values_between(
            to_ts(hours[0]), to_ts(hours[-1]), literal_glob(series_id)
        )
    }
    values = [found.get(to_ts(h)) for h in hours]
    line = sparkline(values)
    marked = f"{line[:SPARK_HOURS]}[{line[SPARK_HOURS]}]{line[SPARK_HOURS + 1 :]}"
    present = [v for v in values if v is not None]
    return {
        "from": to_ts(hours[0]),
        "to": to_ts(hours[-1]),
        "sparkline": marked,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }


def runs(config: Config, *, limit: int, stage: str | None, failed: bool, as_json: bool) -> None:
    """``outbox runs``: newest first, with durations, counts and (redacted) errors."""
    from outbox import status as status_mod

    with status_mod.open_store(config) as store:
        records = store.runs.recent_runs(limit=limit, stage=stage, failed=failed)
    if as_json:
        typer.echo(json.dumps([status_mod.run_dict(r) for r in records], indent=2))
        return
    console().print(status_mod.render_runs(records))


def demo(keep: Path, *, show_sample_dir: bool = False) -> int:
    """``outbox demo``: fetch the sample, send it to a local receiver, show status, and
    say where its files are kept; ``--sample-dir``: print where the sample lives."""
    import shlex

    from outbox import status as status_mod
    from outbox.demo import run_demo
    from outbox.testing import sample_dir

    if show_sample_dir:
        typer.echo(str(sample_dir()))
        return 0
    result = run_demo(keep, say=typer.echo)
    typer.echo(f"status as of {result.status.generated_at} (the hours after the sample day):")
    console().print(status_mod.render_table(result.status))
    typer.echo(
        f"ok: the receiver holds all {result.received} observations; "
        f"{result.acked} acknowledged in the outbox, 0 pending"
    )
    db = shlex.quote(str(result.workdir / "outbox.db"))
    cfg = shlex.quote(str(result.workdir / "config.yaml"))
    typer.echo(
        f"kept in {result.workdir}/ (outbox.db, receiver.db, config.yaml, report.html); "
        "`outbox demo` again starts afresh there"
    )
    typer.echo(f"report: {result.workdir / 'report.html'} (open it in a browser)")
    typer.echo("look inside:")
    typer.echo(f"  sqlite3 {db} 'select count(*) from observations'")
    typer.echo(f"  sqlite3 -header -column {db} 'select * from series_status limit 10'")
    typer.echo(
        f"  outbox -c {cfg} status      # as of today: the 2025 sample day shows as stale (CRIT)"
    )
    typer.echo(f"  outbox -c {cfg} show EIA.PJM.demand 2025-08-21T14:00:00Z")
    return 0
