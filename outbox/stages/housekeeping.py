"""Housekeeping: retention of acknowledged rows, the raw pages behind them, a bounded file.

:func:`prune` removes, in this order:

1. acknowledged rows whose ``ts`` is older than ``housekeeping.retention_days`` (pending
   and dead rows are never removed: nothing staged is evicted);
2. checked gap hours and finished runs older than the same cutoff;
3. raw pages no remaining row points to. The cheap sweep (after every ``send``) runs at
   most every :data:`PAGE_SWEEP_INTERVAL` and reads only pages fetched before the cutoff
   minus :func:`page_margin`, checked against rows older than the cutoff: a page's rows
   are never newer than its fetch time plus the forecast horizon, so no newer row can
   point to such a page. ``outbox prune`` checks every page against every row (one scan).

Then the file gives space back. New outboxes are created with
``auto_vacuum=INCREMENTAL``: freed pages are handed back with ``incremental_vacuum``
(cheap prune: once they exceed :data:`RECLAIM_FRACTION` of the file; ``outbox prune``:
always). A file created before that has no incremental mode: new rows reuse its free
pages, and ``outbox prune`` rebuilds it with ``VACUUM`` when nothing is pending (which
also switches it to incremental).

:func:`guard_size` arms ``housekeeping.max_rows`` / ``max_bytes`` and the free-space floor
``housekeeping.min_free_bytes`` for a fetch: the store then refuses, with
:class:`~outbox.errors.OutboxFullError` (exit 4), a page that would pass either ceiling or
leave less free space on the disk than the floor, before anything of it is committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from outbox.config import Config
from outbox.errors import OutboxError
from outbox.redact import redact
from outbox.store import FileStats, SizeLimit, Store
from outbox.timeutil import floor_hour, parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

PAGE_SWEEP_INTERVAL = timedelta(hours=6)
PAGE_SWEEP_KEY = "housekeeping:pages_swept_at"
RECLAIM_FRACTION = 0.25
CLOCK_SLACK = timedelta(hours=24)
INCREMENTAL = "incremental vacuum"
VACUUM = "VACUUM"
RECLAIMED = (INCREMENTAL, VACUUM)


@dataclass(frozen=True)
class PruneResult:
    """What one prune removed, and the file size before and after (WAL excluded)."""

    cutoff: str
    rows: int
    pages: int
    checked: int
    runs: int
    bytes_before: int
    bytes_after: int
    reclaim: str

    def summary(self) -> str:
        """Two lines for ``outbox prune``."""
        return (
            f"pruned {self.rows} acknowledged rows older than {self.cutoff}, "
            f"{self.pages} pages, {self.checked} checked gap hours, {self.runs} runs\n"
            f"file {self.bytes_before:,} -> {self.bytes_after:,} bytes ({self.reclaim})"
        )


def retention_cutoff(config: Config, now: datetime) -> datetime:
    """Acknowledged rows with ``ts`` before this are pruned."""
    return floor_hour(now - timedelta(days=config.housekeeping.retention_days))


def page_margin(config: Config) -> timedelta:
    """How much newer than its fetch time a page's rows can be (forecasts, clock slack)."""
    return timedelta(hours=config.eia.forecast_horizon_hours) + CLOCK_SLACK


def prune(
    config: Config, store: Store, *, full: bool = False, now: datetime | None = None
) -> PruneResult:
    """Apply retention and keep the file bounded; ``full`` is ``outbox prune``'s thorough pass.

    The cheap pass (``full=False``, after every send) reads only old rows by primary-key
    ranges and sweeps pages at most every :data:`PAGE_SWEEP_INTERVAL`.
    """
    now = now or utcnow()
    cutoff = to_ts(retention_cutoff(config, now))
    rows, checked, runs = store.upkeep.prune_before(cutoff)
    pages = _sweep(config, store, now, cutoff, full=full)
    stats = store.upkeep.file_stats()  # deleting frees pages but does not shrink the file
    reclaim = _reclaim(store, stats, full=full)
    after = store.upkeep.file_stats().bytes if reclaim in RECLAIMED else stats.bytes
    result = PruneResult(cutoff, rows, pages, checked, runs, stats.bytes, after, reclaim)
    log.info(
        "prune done rows=%d pages=%d checked=%d runs=%d bytes_before=%d bytes_after=%d",
        rows,
        pages,
        checked,
        runs,
        result.bytes_before,
        result.bytes_after,
    )
    return result


def prune_outbox(config: Config) -> PruneResult:
    """``outbox prune``: retention, every orphaned page, and the file handed back."""
    with Store.open(config.database, create=False) as store:
        return prune(config, store, full=True)


def prune_after_send(config: Config, store: Store) -> None:
    """The cheap prune at the end of a send; its failure never fails the send."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        prune(config, store)
    except (OutboxError, SQLAlchemyError) as exc:
        log.warning("prune after send failed error=%s", redact(str(exc)))


def _sweep(config: Config, store: Store, now: datetime, cutoff: str, *, full: bool) -> int:
    if full:
        swept = store.upkeep.sweep_pages()
    else:
        last = store.meta_get(PAGE_SWEEP_KEY)
        if last is not None and now - parse_ts(last) < PAGE_SWEEP_INTERVAL:
            return 0
        fetched_before = to_ts(parse_ts(cutoff) - page_margin(config))
        swept = store.upkeep.sweep_pages(fetched_before, cutoff)
    store.meta_set(PAGE_SWEEP_KEY, to_ts(now))
    return swept


def _reclaim(store: Store, stats: FileStats, *, full: bool) -> str:
    if stats.auto_vacuum == "incremental":
        crowded = stats.freelist_count > RECLAIM_FRACTION * stats.page_count
        if stats.freelist_count and (full or crowded):
            store.upkeep.incremental_vacuum()
            store.upkeep.checkpoint("TRUNCATE" if full else "PASSIVE")
            return INCREMENTAL
        return "nothing to hand back" if not stats.freelist_count else "free pages kept for reuse"
    if not full:
        return "free pages kept for reuse"
    pending = store.reads.counts()["pending"]
    if pending:
        return f"no VACUUM while {pending} rows are pending; free pages are reused"
    store.upkeep.vacuum()
    store.upkeep.checkpoint("TRUNCATE")
    return VACUUM


def guard_size(config: Config, store: Store) -> SizeLimit | None:
    """Arm the configured outbox ceiling and free-space floor on ``store`` (counts the
    rows once if needed)."""
    hk = config.housekeeping
    return store.staging.limit_size(hk.max_rows, hk.max_bytes, hk.min_free_bytes or None)
