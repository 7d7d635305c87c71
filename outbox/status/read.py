"""Reading the outbox into the status model.

:func:`read` opens an existing outbox read-only (``mode=ro``: no migration, no write, no
WAL checkpoint; as a WAL reader it never waits on a running fetch or send) and
:func:`collect` builds the :class:`~outbox.status.model.Status` from index-driven queries
only. Everything after it (the verdict, the table, metrics) never touches the database.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from outbox import datasets
from outbox.config import Config
from outbox.errors import StoreError
from outbox.normalize import stream_key
from outbox.status.check import evaluate
from outbox.status.model import (
    FRESH_CRITICAL,
    FRESH_DISABLED,
    FRESH_NO_DATA,
    FRESH_OK,
    FRESH_WARNING,
    LABELS,
    SCHEMA_VERSION,
    STAGES,
    Check,
    Group,
    SeriesStatus,
    Status,
    run_dict,
)
from outbox.store import RunRecord, RunSummary, SeriesState, Store, disk_free_bytes
from outbox.timeutil import parse_ts, to_ts, utcnow


def dataset_of_series(s: SeriesState) -> str:
    """Which configured dataset a series belongs to."""
    return datasets.of_series(s.type, s.subtype)


# The alerts' delivery state: a meta row that `outbox.alerts` writes and status reads.
ALERTS_META_KEY = "alerts"


def alert_state(text: str | None) -> dict[str, Any]:
    """The alerts' state as stored (what each URL last received, and totals); an absent
    or unreadable row is a new outbox's state."""
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        state = {}
    if not isinstance(state, dict):
        state = {}
    state.setdefault("urls", {})
    state.setdefault("failures", 0)
    state.setdefault("sent", 0)
    return state


def alert_counters(text: str | None) -> dict[str, int]:
    """``sent`` and ``failures`` counted so far (for status and metrics)."""
    state = alert_state(text)
    return {"sent": int(state["sent"]), "failures": int(state["failures"])}


def open_store(config: Config) -> Store:
    """The outbox for the reading commands (status, runs, show, gaps, plot, report),
    read-only: a missing one raises NoOutboxError (exit 2, UNKNOWN for ``--check``), a
    file without our schema a StoreError; nothing is created or migrated."""
    store = Store.open_readonly(config.database)
    try:
        if store.schema_version() is None:
            raise StoreError(f"{store.path}: not an outbox (no schema): run `outbox db upgrade`")
    except BaseException:
        store.close()
        raise
    return store


def read(config: Config, now: datetime | None = None, *, for_check: bool = False) -> Status:
    """Open the configured outbox, collect its status and close it again.

    ``for_check``: only what :func:`~outbox.status.check.evaluate` reads (see
    :func:`collect`).
    """
    from sqlalchemy.exc import DatabaseError

    with open_store(config) as store:
        try:
            return collect(config, store, now, for_check=for_check)
        except DatabaseError as exc:
            raise StoreError(f"{store.path}: cannot read the outbox: {exc.orig}") from None


def collect(
    config: Config, store: Store, now: datetime | None = None, *, for_check: bool = False
) -> Status:
    """Read the outbox and build the status model (reads only).

    ``for_check`` (the monitoring probe) reads only what ``evaluate`` needs: the
    total pending is a count of the queue, and the per-series and per-group
    pending counts, oldest pending, newest acked, delivered-through and next retry are
    left empty. With millions of rows pending the probe then answers in well under a
    second, where the full status sorts the queue by series.
    """
    now = now or utcnow()
    states = store.reads.series_states(pending=not for_check)
    runs = {stage: store.runs.run_summary(stage) for stage in STAGES}
    status = _base(config, store, states, runs, now, for_check=for_check)
    _add_queue_head(status, store, now)
    from outbox.quality.ledger import summary as quality_summary

    status.quality = quality_summary(store, now)
    status.missing = _missing(config, status.groups, runs["fetch"], status.stream_progress)
    status.warnings.extend(_never_answered(config, status))
    status.alerts = alert_counters(store.meta_get(ALERTS_META_KEY))
    if not config.eia.verify_tls or not config.gridpulse.verify_tls:
        status.warnings.append("TLS verification is turned off in the config")
    code, line = evaluate(config, status)
    status.check = Check(code, LABELS[code], line)
    return status


def _base(
    config: Config,
    store: Store,
    states: Sequence[SeriesState],
    runs: dict[str, RunSummary],
    now: datetime,
    *,
    for_check: bool,
) -> Status:
    """The status as far as the series, the runs and the store's own tables tell it."""
    from outbox.store.migrate import head_revision

    series = [SeriesStatus(s, dataset_of_series(s)) for s in states]
    return Status(
        schema_version=SCHEMA_VERSION,
        generated_at=to_ts(now),
        database=str(store.path),
        database_bytes=_size(store.path),
        disk_free_bytes=disk_free_bytes(store.path),
        outbox_schema=store.schema_version(),
        schema_head=head_revision(),
        totals={
            "series": len(series),
            "pending": store.delivery.count_pending()
            if for_check
            else sum(s.pending for s in series),
            "dead": sum(s.dead for s in series),
            "acks_unapplied": store.delivery.unapplied_acks(),
        },
        next_retry_at=min((s.next_attempt_at for s in states if s.next_attempt_at), default=None),
        groups=_groups(config, store, series, now),
        series=series,
        watermarks=store.staging.watermark_rows(),
        stream_progress=store.staging.progress_rows(),
        last_runs={stage: run_dict(runs[stage].last) for stage in STAGES},
        last_success={stage: _finished(runs[stage].last_ok) for stage in STAGES},
        consecutive_failures={stage: runs[stage].consecutive_failures for stage in STAGES},
        invalid_last_fetch=_invalid(runs["fetch"]),
    )


def _groups(
    config: Config, store: Store, series: Sequence[SeriesStatus], now: datetime
) -> list[Group]:
    members: dict[tuple[str, str], list[SeriesStatus]] = {}
    for s in series:
        members.setdefault((s.dataset, s.ba), []).append(s)
    groups = [_group(config, store, key, rows, now) for key, rows in members.items()]
    return sorted(groups, key=lambda g: (_order(g.dataset), g.ba))


def _group(
    config: Config,
    store: Store,
    key: tuple[str, str],
    rows: Sequence[SeriesStatus],
    now: datetime,
) -> Group:
    dataset, ba = key
    g = Group(dataset, ba, enabled=_enabled(config, dataset, ba), series=len(rows))
    g.pending = sum(s.pending for s in rows)
    g.dead = sum(s.dead for s in rows)
    g.newest_staged = _newest(s.newest_staged for s in rows)
    g.newest_acked = _newest(s.newest_acked for s in rows)
    g.oldest_pending = min((s.oldest_pending for s in rows if s.oldest_pending), default=None)
    # None for every series: nothing staged before any pending row, or (for --check) not read.
    if any(s.delivered_through for s in rows):
        g.delivered_through = _group_delivered(store, rows, g)
    g.freshness_seconds = _age(g.newest_staged, now)
    if dataset in config.datasets:
        warn, crit = config.stale_thresholds(dataset)
        g.stale_warning_seconds, g.stale_critical_seconds = round(warn * 3600), round(crit * 3600)
    g.freshness_state = _freshness_state(g)
    return g


def _group_delivered(store: Store, rows: Sequence[SeriesStatus], g: Group) -> str | None:
    """Newest ts such that every staged row of the group at or before it is delivered."""
    if g.oldest_pending is None:
        return g.newest_staged
    if len(rows) == 1:
        return rows[0].delivered_through
    return store.reads.newest_before([s.series_id for s in rows], g.oldest_pending)


def _freshness_state(g: Group) -> str:
    if not g.enabled:
        return FRESH_DISABLED
    if g.freshness_seconds is None:
        return FRESH_NO_DATA
    if g.stale_critical_seconds is not None and g.freshness_seconds > g.stale_critical_seconds:
        return FRESH_CRITICAL
    if g.stale_warning_seconds is not None and g.freshness_seconds > g.stale_warning_seconds:
        return FRESH_WARNING
    return FRESH_OK


def _enabled(config: Config, dataset: str, ba: str) -> bool:
    ds = config.datasets.get(dataset)
    return ds is not None and ds.enabled and ba in config.balancing_authorities


def _missing(
    config: Config,
    groups: Sequence[Group],
    fetch: RunSummary,
    progress: Sequence[dict[str, Any]],
) -> list[dict[str, str | None]]:
    """Enabled dataset x BA pairs without a single row, once a fetch has succeeded, each
    with how far EIA has answered it completely (``asked_through``: no data at EIA
    through then; None when no request for it has completed)."""
    if fetch.last_ok is None:
        return []
    have = {(g.dataset, g.ba) for g in groups}
    asked = {p["stream"]: p["asked_through"] for p in progress}
    return [
        {"dataset": dataset, "ba": ba, "asked_through": asked.get(stream_key(dataset, eia))}
        for dataset in config.enabled_datasets()
        for ba, eia in config.balancing_authorities.items()
        if (dataset, ba) not in have
    ]


def _never_answered(config: Config, status: Status) -> list[str]:
    """A configured BA that EIA has never returned a row for (no series, no watermark),
    although EIA has been asked for its streams and answered (``stream_progress``), while
    another BA has data: most likely a wrong code. The hour named is the newest
    ``asked_through`` of its streams, the one the table's "no data at EIA through" shows
    for that stream."""
    have = {g.ba for g in status.groups}
    have |= {
        config.eia_to_gridpulse.get(w["respondent"], w["respondent"]) for w in status.watermarks
    }
    silent = [ba for ba in config.balancing_authorities if ba not in have]
    others = sorted(have & set(config.balancing_authorities))
    if not silent or not others:
        return []
    asked: dict[str, tuple[str, int | None]] = {}
    for p in status.stream_progress:
        through = p["asked_through"]
        if through > asked.get(p["respondent"], ("", None))[0]:
            asked[p["respondent"]] = (through, p["run_id"])
    verb = "has" if len(others) == 1 else "have"
    warnings = []
    for ba in silent:
        code = config.balancing_authorities[ba]
        if code in asked:
            through, run_id = asked[code]
            named = ba if ba == code else f"{ba} (EIA {code})"
            run = "" if run_id is None else f" (fetch run {run_id})"
            warnings.append(
                f"{named} has never had a row: EIA returned none for it through "
                f"{through}{run} while {', '.join(others[:3])} {verb} "
                "data; check the code in balancing_authorities"
            )
    return warnings


def _add_queue_head(status: Status, store: Store, now: datetime) -> None:
    head = store.reads.queue_head()
    if head is None:
        return
    status.oldest_pending_series, status.oldest_pending, status.oldest_pending_since = head
    status.oldest_pending_age_seconds = max(0, _age(head[2], now) or 0)


def _finished(run: RunRecord | None) -> str | None:
    return run.finished_at if run else None


def _invalid(fetch: RunSummary) -> int:
    counts = fetch.last_finished.counts if fetch.last_finished else {}
    value = counts.get("invalid", 0)
    return int(value) if isinstance(value, int | float) else 0


def _newest(values: Iterable[str | None]) -> str | None:
    return max((v for v in values if v), default=None)


def _age(ts: str | None, now: datetime) -> int | None:
    if not ts:
        return None
    return round((now - parse_ts(ts)).total_seconds())


def _order(dataset: str) -> int:
    return datasets.order(dataset)


def _size(path: os.PathLike[str] | str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(f"{path}{suffix}")
    return total
