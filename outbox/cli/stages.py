"""``outbox fetch`` and ``outbox send``: the stages.

Each command checks its options, builds its parts through :mod:`outbox.wiring`, runs its
stage and prints the run's line. The stages (and with them httpx and the clients) are
imported by the command that runs one, so that ``outbox status`` and the other reading
commands start faster.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from outbox.cli.app import (
    app,
    configured,
    mapped_errors,
)
from outbox.cli.options import (
    check_datasets,
    check_directory,
    check_fetch_mode,
    check_replay_files,
    parse_bounds,
)
from outbox.config import Config
from outbox.errors import UsageError
from outbox.logsetup import print_error
from outbox.store import Store
from outbox.timeutil import to_ts
from outbox.wiring import observed

if TYPE_CHECKING:
    from outbox.stages.fetcher import FetchResult
    from outbox.stages.plan import Window

log = logging.getLogger(__name__)


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
    with mapped_errors():
        config = configured()
        bounds = parse_bounds(start, end)
        if replay is not None and (
            bounds[0] or bounds[1] or fill_gaps or lookback or ba or dataset
        ):
            # a replay stages what the files hold for the configured BAs and datasets
            raise UsageError(
                "--replay cannot be combined with --start/--end, --ba, --dataset, --fill-gaps"
                " or --lookback"
            )
        if dataset:
            check_datasets(dataset)
        if replay is not None:
            check_directory("--replay", replay, must_exist=True)
            check_replay_files(replay)
        check_fetch_mode(
            start=bounds[0], bas=ba, datasets=dataset, fill_gaps=fill_gaps, lookback=lookback
        )
        code = run_fetch_command(
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
    with mapped_errors():
        config = configured()
        code = run_send_command(
            config, max_batches=max_batches, max_seconds=max_seconds, dry_run=dry_run
        )
    raise typer.Exit(code)


@observed("fetch")
def run_fetch_command(
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
    from outbox.stages.fetch import run_fetch
    from outbox.stages.housekeeping import guard_size
    from outbox.stages.plan import with_lookback
    from outbox.wiring import fetch_source

    if lookback is not None:
        config = with_lookback(config, lookback)
    with Store.open(config.database) as store, fetch_source(config, replay) as source:
        guard_size(config, store)
        if fill_gaps:
            result = run_fetch(config, store, source, fill_gaps=True)
        else:
            initial = None
            if not source.saved and start is None and _is_new(store):
                initial = gridpulse_starts(config)
            with _progress(start is not None) as progress:
                result = run_fetch(
                    config,
                    store,
                    source,
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
    return _print_fill(result) if fill_gaps else _print_fetch(config, result)


def _is_new(store: Store) -> bool:
    """Whether the outbox has fetched nothing yet (no watermark, no stream answered)."""
    return not store.staging.watermarks() and not store.staging.stream_progress()


def _print_fetch(config: Config, result: FetchResult) -> int:
    from outbox.stages.fetch import skipped_text

    invalid = result.counts()["invalid"]
    skipped = f"; {skipped_text(config, result)}" if result.unconfigured else ""
    typer.echo(
        f"fetch run {result.run_id}: {result.requests} requests, {result.pages} pages, "
        f"{result.rows} rows, {result.written} written, {invalid} invalid, "
        f"{result.duplicates} duplicates{skipped}"
    )
    _print_quality(result)
    return 0


def _print_quality(result: FetchResult) -> None:
    if result.quality is not None:
        q = result.quality
        typer.echo(
            f"quality: {q.opened} findings opened, {q.resolved} resolved, "
            f"{q.quarantined} rows quarantined"
        )


def _print_fill(result: FetchResult) -> int:
    """``outbox fetch --fill-gaps``'s lines: gap hours asked for, filled, not at EIA; what
    the quality checks found in the filled hours."""
    assert result.fill is not None
    typer.echo(
        f"fill-gaps run {result.run_id}: {result.fill.gap_hours} missing hours, "
        f"{result.fill.windows} requests, {result.fill.filled} filled, "
        f"{result.fill.checked} not at EIA (recorded as checked)"
    )
    _print_quality(result)
    return 0


def gridpulse_starts(config: Config) -> dict[str, datetime] | None:
    """For a new outbox: start each stream at GridPulse's latest instead of history start.

    Returns None (history start applies) when GridPulse is not configured or unreachable.
    """
    from outbox.stages.plan import first_starts
    from outbox.wiring import gridpulse_series

    listing = gridpulse_series(config)
    return None if listing is None else first_starts(config, listing)


ProgressTick = Callable[[int, int, "Window"], None]


@contextmanager
def _progress(backfill: bool) -> Iterator[ProgressTick | None]:
    """A backfill's progress: a rich progress bar on a TTY, periodic log lines otherwise;
    nothing for an incremental fetch."""
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


def _label(window: Window) -> str:
    return f"{window.route.rsplit('/', 1)[-1]} {to_ts(window.start)[:13]}..{to_ts(window.end)[:13]}"


@observed("send")
def run_send_command(
    config: Config,
    *,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    dry_run: bool = False,
) -> int:
    """``outbox send``; before the first fetch has created the outbox, nothing to do."""
    from outbox.stages import housekeeping
    from outbox.stages import send as send_stage
    from outbox.wiring import configured_sink, require_sink, sink_where

    if not dry_run:
        require_sink(config)  # a config error (exit 2) even before the first fetch
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
        nullcontext(None) if dry_run else configured_sink(config) as sink,
    ):
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
            f"{batches} batches to {sink_where(config)}"
        )
        return 0
    typer.echo(
        f"send run {result.run_id}: {result.sent} rows in {result.batches} batches, "
        f"{result.acked} acked, {result.rejected} dead, {result.bytes} bytes"
    )
    return 0
