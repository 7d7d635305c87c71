"""The fetch and send command bodies behind ``outbox fetch`` and ``outbox send`` (the
stages take them over; every other command calls its module from :mod:`outbox.cli`).

Each function returns the process exit code; errors derive from OutboxError and are
mapped to exit codes by the CLI.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from outbox.config import Config
from outbox.errors import OutboxError
from outbox.logsetup import print_error
from outbox.redact import redact
from outbox.store import Store
from outbox.timeutil import to_ts
from outbox.wiring import eia_client, gridpulse_client, gridpulse_sink, observed

if TYPE_CHECKING:
    from outbox.pipeline import Window

# outbox.pipeline (and with it httpx, the EIA and GridPulse clients) is imported by the
# commands that run a stage: `outbox status` and the other reading commands start faster.

log = logging.getLogger(__name__)


def _http(timeout: float, connect: float, verify: bool):
    from outbox.wiring import http_client

    return http_client(timeout, connect, verify)


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
    from outbox.pipeline import run_fetch, skipped_text
    from outbox.stages.housekeeping import guard_size

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
    from outbox.stages.housekeeping import guard_size

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
    from outbox.stages import housekeeping
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
            housekeeping.prune_after_send(config, store)
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
