"""The fetch stage: pages from a :class:`~outbox.ports.Source` into the outbox.

One :func:`run_fetch` for every mode: incremental, backfill (``--start/--end``),
fill-gaps and replay (a source of saved pages). Requests come from
:mod:`outbox.stages.plan`; the :class:`~outbox.stages.fetcher.Fetcher` stages each page
with its watermark advances, under one rule for live and replayed pages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from outbox.config import Config
from outbox.crash import crashpoint
from outbox.errors import SourceFatalError
from outbox.logsetup import scoped
from outbox.normalize import SKIP_REASONS
from outbox.ports import Source
from outbox.redact import redact
from outbox.stages.fetcher import Fetcher, FetchResult, FillCounts, invalid_count
from outbox.stages.plan import (
    Window,
    plan_backfill,
    plan_fill,
    plan_history,
    plan_incremental,
    plan_streams,
)
from outbox.stages.runs import Run, recorded_run, stage_lock
from outbox.stages.runs import describe as runs_describe
from outbox.store import Store
from outbox.timeutil import floor_hour, parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

Progress = Callable[[int, int, Window], None]


@scoped
def run_fetch(
    config: Config,
    store: Store,
    source: Source,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    bas: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    fill_gaps: bool = False,
    initial: dict[str, datetime] | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> FetchResult:
    """One fetch run under the fetch lock, recorded in ``runs``.

    The mode follows from the arguments: a saved source (``source.saved``) is replayed;
    ``fill_gaps`` asks for exactly the missing hours (:func:`~outbox.gaps.find_gaps`)
    and moves no watermark; ``start`` (and ``end``, default now) backfills a range; else
    an incremental fetch from each stream's watermark, or from GridPulse's latest
    (``initial``) for a new outbox. ``bas``/``datasets`` narrow a live fetch's streams.
    """
    result = FetchResult(fill=FillCounts() if fill_gaps else None)
    with _fetch_run(config, store, result, now) as fetcher:
        if fetcher is None:
            return result
        if result.fill is not None:
            _fill(config, store, fetcher, source, result.fill, now)
        elif source.saved:
            fetcher.stage_replay(source)
            check_replay_staged(config, result)
        else:
            streams = plan_streams(config, bas, datasets)
            now = now or utcnow()
            if start is not None:
                hi = end or floor_hour(now)
                windows = plan_backfill(config, streams, start, hi)
                _backfill(store, fetcher, source, windows, (start, hi), progress)
            else:
                windows = plan_incremental(
                    config, streams, fetcher.marks, now, initial, fetcher.progress
                )
                # Then the older history of streams whose first rows came with some.
                windows += plan_history(config, streams, fetcher.history, initial)
                tick = None if progress is None else _ticker(progress, windows)
                fetcher.stage_windows(source, windows, backfill=False, done=tick)
    return result


@contextmanager
def _fetch_run(
    config: Config, store: Store, result: FetchResult, now: datetime | None
) -> Iterator[Fetcher | None]:
    """The run's bookkeeping (:mod:`outbox.stages.runs`): the fetch lock (None when
    another run holds it), the run record, the quality checker, the end-of-run log line.

    A fill-gaps run judges what it stages like any other (a rule quarantining holds a
    filled row back as well), and keeps its recorded error without the exception's type
    and its own ``fill-gaps done`` line.
    """
    fill = result.fill is not None
    with stage_lock(store, "fetch") as lock:
        if not lock.held:
            result.skipped, result.holder = True, lock.holder
            yield None
            return
        describe = _describe_fill if fill else runs_describe
        with recorded_run(store, "fetch", result.counts, describe=describe) as run:
            result.run_id = run.id
            fetcher = Fetcher(config, store, run.id, result, now=None if fill else now)
            if config.quality.enabled:
                from outbox.quality.engine import Checker

                store.staging.checker = result.quality = Checker(config)
            try:
                yield fetcher
                if result.quality is not None and result.quality.deferring:
                    # Every page is committed with its hours marked: judge them all now.
                    crashpoint("quality.pending")
                    result.quality.finish(store)
            finally:
                store.staging.checker = None
    if fill:
        _log_filled(result)
    else:
        _log_done(result, run)


def _log_done(result: FetchResult, run: Run) -> None:
    counts = result.counts()
    run.log_done(
        requests=result.requests,
        pages=result.pages,
        rows=result.rows,
        written=result.written,
        invalid=invalid_count(result.invalid),
        duplicates=result.duplicates,
        skipped=counts["skipped"],
        **dict(sorted(counts["skipped_by_reason"].items())),
    )
    if result.unconfigured:
        log.warning(
            "replay skipped balancing authorities not configured rows=%d respondents=%s",
            sum(result.unconfigured.values()),
            ",".join(sorted(result.unconfigured)),
        )


def _log_filled(result: FetchResult) -> None:
    assert result.fill is not None
    log.info(
        "fill-gaps done run=%d gap_hours=%d requests=%d filled=%d checked=%d",
        result.run_id,
        result.fill.gap_hours,
        result.requests,
        result.fill.filled,
        result.fill.checked,
    )


def _fill(
    config: Config,
    store: Store,
    fetcher: Fetcher,
    source: Source,
    fill: FillCounts,
    now: datetime | None,
) -> None:
    """Ask for every gap hour; record the hours EIA did not return as checked."""
    from outbox.gaps import find_gaps

    gaps = find_gaps(config, store, now=now)
    plan = plan_fill(gaps, store.reads.series_sources(), max_hours=config.eia.backfill_chunk_hours)
    fill.gap_hours = sum(g.hours for g in gaps)
    fill.windows = len(plan)

    def filled(i: int) -> None:
        fill.checked += store.staging.mark_checked(plan[i].hours)

    windows = [request.window for request in plan]
    fetcher.stage_windows(source, windows, backfill=True, advance=False, done=filled)


def check_replay_staged(config: Config, result: FetchResult) -> None:
    """A replay that read rows but could stage none of them fails, saying why."""
    read = result.rows + result.duplicates + sum(result.invalid.values())
    if result.rows or not read:
        return
    invalid = invalid_count(result.invalid)
    why = [skipped_text(config, result)] if result.counts()["skipped"] else []
    if invalid:
        reasons = ", ".join(
            f"{k} {v:,}" for k, v in sorted(result.invalid.items()) if k not in SKIP_REASONS
        )
        why.append(f"{invalid:,} invalid ({reasons})")
    raise SourceFatalError(f"replay staged nothing: {'; '.join(why)}")


def skipped_text(config: Config, result: FetchResult) -> str:
    """``12,000 rows skipped (unconfigured_ba 12,000: AVA, BPAT); configured: CISO, PJM``."""
    skipped = result.counts()["skipped_by_reason"]
    parts = []
    for reason, n in sorted(skipped.items()):
        text = f"{reason} {n:,}"
        if reason == "unconfigured_ba" and result.unconfigured:
            names = sorted(result.unconfigured)
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            text += f": {', '.join(names[:10])}{more}"
        parts.append(text)
    line = f"{sum(skipped.values()):,} rows skipped ({'; '.join(parts)})"
    if result.unconfigured:
        line += f"; configured: {', '.join(sorted(config.balancing_authorities.values()))}"
    return line


def _backfill(
    store: Store,
    fetcher: Fetcher,
    source: Source,
    windows: list[Window],
    bounds: tuple[datetime, datetime],
    progress: Progress | None,
) -> None:
    """Walk backfill chunks; a rerun of the same backfill resumes after the last done chunk.

    The chunks still to do are fetched with requests in flight together; each is marked
    done once its last page is staged."""
    todo: list[Window] = []
    tick = None if progress is None else _ticker(progress, windows)
    for window in windows:
        done = store.meta_get(_backfill_key(window, bounds))
        if done is None or parse_ts(done) < window.end:
            todo.append(window)
        else:
            log.info("backfill chunk already done route=%s end=%s", window.route, done)
            if tick:
                tick(window)

    def chunk_done(i: int) -> None:
        store.meta_set(_backfill_key(todo[i], bounds), to_ts(todo[i].end))
        if tick:
            tick(todo[i])

    fetcher.stage_windows(source, todo, backfill=True, done=chunk_done)


def _ticker(progress: Progress, windows: Sequence[Window]) -> Callable[..., None]:
    """``progress(done, total, window)`` once per finished window (an index or the window)."""
    count = 0

    def tick(which: int | Window) -> None:
        nonlocal count
        count += 1
        window = windows[which] if isinstance(which, int) else which
        progress(count, len(windows), window)

    return tick


def _backfill_key(window: Window, bounds: tuple[datetime, datetime]) -> str:
    streams = ",".join(sorted(s.key for s in window.streams))
    return f"backfill:{window.route}:{to_ts(bounds[0])}:{to_ts(bounds[1])}:{streams}"


def _describe_fill(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return redact(str(exc) or type(exc).__name__)
