"""One status model behind the table, ``--json``, ``--check``, ``--metrics`` and ``--remote``.

:func:`read` opens an existing outbox read-only (``mode=ro``: no migration, no write, no
WAL checkpoint; as a WAL reader it never waits on a running fetch or send) and
:func:`collect` builds the :class:`Status` from index-driven queries only. The renderers
(:func:`render_table`, :func:`render_metrics`, :func:`evaluate`) never touch the database.

The JSON shape is documented field by field in ``docs/status.md``; bump
:data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from outbox import __version__, datasets
from outbox.config import Config
from outbox.errors import StoreError
from outbox.normalize import stream_key
from outbox.redact import redact
from outbox.store import RUN_SECONDS, RunRecord, RunSummary, SeriesState, Store, disk_free_bytes
from outbox.timeutil import parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STAGES = ("fetch", "send")
# Freshness states of a dataset x BA group.
FRESH_OK, FRESH_WARNING, FRESH_CRITICAL = "ok", "warning", "critical"
FRESH_DISABLED, FRESH_NO_DATA = "disabled", "no_data"


def dataset_of_series(s: SeriesState) -> str:
    """Which configured dataset a series belongs to."""
    return datasets.of_series(s.type, s.subtype)


@dataclass(frozen=True)
class SeriesStatus:
    """Delivery state of one series (``--json`` ``series[]``, metrics, ``--remote``)."""

    series_id: str
    dataset: str
    ba: str
    pending: int
    dead: int
    newest_staged: str | None
    newest_acked: str | None
    delivered_through: str | None
    oldest_pending: str | None


@dataclass
class Group:
    """One dataset x BA line of the status table."""

    dataset: str
    ba: str
    enabled: bool
    series: int = 0
    pending: int = 0
    dead: int = 0
    newest_staged: str | None = None
    newest_acked: str | None = None
    delivered_through: str | None = None
    oldest_pending: str | None = None
    freshness_seconds: int | None = None
    stale_warning_seconds: int | None = None
    stale_critical_seconds: int | None = None
    freshness_state: str = FRESH_OK


@dataclass(frozen=True)
class Check:
    """The ``--check`` verdict: exit code, its label and the one summary line."""

    code: int
    label: str
    summary: str


@dataclass
class Status:
    """Everything ``outbox status`` reports (see docs/status.md for each field)."""

    schema_version: int
    generated_at: str
    database: str
    database_bytes: int
    disk_free_bytes: int | None
    outbox_schema: str | None
    schema_head: str
    totals: dict[str, int]
    oldest_pending: str | None = None
    oldest_pending_series: str | None = None
    oldest_pending_since: str | None = None
    oldest_pending_age_seconds: int | None = None
    next_retry_at: str | None = None
    groups: list[Group] = field(default_factory=list)
    missing: list[dict[str, str | None]] = field(default_factory=list)
    series: list[SeriesStatus] = field(default_factory=list)
    watermarks: list[dict[str, Any]] = field(default_factory=list)
    stream_progress: list[dict[str, Any]] = field(default_factory=list)
    last_runs: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    last_success: dict[str, str | None] = field(default_factory=dict)
    consecutive_failures: dict[str, int] = field(default_factory=dict)
    invalid_last_fetch: int = 0
    warnings: list[str] = field(default_factory=list)
    check: Check | None = None
    remote: dict[str, Any] | None = None
    alerts: dict[str, int] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` (stable keys, documented in docs/status.md)."""
        return asdict(self)


# -- reading -------------------------------------------------------------------------


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

    ``for_check``: only what :func:`evaluate` reads (see :func:`collect`).
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

    ``for_check`` (the monitoring probe) reads only what :func:`evaluate` needs: the
    total pending is a count of the pending index, and the per-series and per-group
    pending counts, oldest pending, newest acked, delivered-through and next retry are
    left empty. With millions of rows pending the probe then answers in well under a
    second, where the full status sorts the pending index by series.
    """
    from outbox.migrate import head_revision

    now = now or utcnow()
    states = store.series_states(pending=not for_check)
    series = [_series_status(s) for s in states]
    runs = {stage: store.run_summary(stage) for stage in STAGES}
    status = Status(
        schema_version=SCHEMA_VERSION,
        generated_at=to_ts(now),
        database=str(store.path),
        database_bytes=_size(store.path),
        disk_free_bytes=disk_free_bytes(store.path),
        outbox_schema=store.schema_version(),
        schema_head=head_revision(),
        totals={
            "series": len(series),
            "pending": store.count_pending() if for_check else sum(s.pending for s in series),
            "dead": sum(s.dead for s in series),
            "acks_unapplied": store.unapplied_acks(),
        },
        next_retry_at=min((s.next_attempt_at for s in states if s.next_attempt_at), default=None),
        groups=_groups(config, store, series, now),
        series=series,
        watermarks=store.watermark_rows(),
        stream_progress=store.progress_rows(),
        last_runs={stage: run_dict(runs[stage].last) for stage in STAGES},
        last_success={stage: _finished(runs[stage].last_ok) for stage in STAGES},
        consecutive_failures={stage: runs[stage].consecutive_failures for stage in STAGES},
        invalid_last_fetch=_invalid(runs["fetch"]),
    )
    _add_queue_head(status, store, now)
    from outbox.quality.ledger import summary as quality_summary

    status.quality = quality_summary(store, now)
    status.missing = _missing(config, status.groups, runs["fetch"], status.stream_progress)
    status.warnings.extend(_never_answered(config, status))
    from outbox.alerts import META_KEY, counters

    status.alerts = counters(store.meta_get(META_KEY))
    if not config.eia.verify_tls or not config.gridpulse.verify_tls:
        status.warnings.append("TLS verification is turned off in the config")
    code, line = evaluate(config, status)
    status.check = Check(code, LABELS[code], line)
    return status


def _series_status(s: SeriesState) -> SeriesStatus:
    return SeriesStatus(
        series_id=s.series_id,
        dataset=dataset_of_series(s),
        ba=s.ba,
        pending=s.pending,
        dead=s.dead,
        newest_staged=s.newest_staged,
        newest_acked=s.newest_acked,
        delivered_through=s.delivered_through,
        oldest_pending=s.oldest_pending,
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
    return store.newest_before([s.series_id for s in rows], g.oldest_pending)


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
    head = store.queue_head()
    if head is None:
        return
    status.oldest_pending_series, status.oldest_pending, status.oldest_pending_since = head
    status.oldest_pending_age_seconds = max(0, _age(head[2], now) or 0)


def run_dict(run: RunRecord | None) -> dict[str, Any] | None:
    """A run as plain data: the ``runs`` row plus ``seconds``, its error redacted."""
    if run is None:
        return None
    out = asdict(run)
    out["counts"] = {k: v for k, v in run.counts.items() if k != RUN_SECONDS}
    out["seconds"] = run_seconds(run)
    out["error"] = redact(run.error) if run.error else None
    return out


def run_seconds(run: RunRecord) -> float | None:
    """How long a finished run took (None while it runs, and when its process died: a
    gone run's ``finished_at`` is when it was found, its end is not known): as measured
    by the run (``counts.seconds``), else from its whole-second timestamps."""
    if not run.finished_at or run.gone:
        return None
    measured = run.counts.get(RUN_SECONDS)
    if isinstance(measured, int | float) and not isinstance(measured, bool):
        return round(float(measured), 3)
    return round((parse_ts(run.finished_at) - parse_ts(run.started_at)).total_seconds(), 3)


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


# -- check --------------------------------------------------------------------------

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
LABELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


def evaluate(config: Config, status: Status) -> tuple[int, str]:
    """The monitoring verdict: (exit code, one summary line naming what is wrong)."""
    found = problems(config, status)
    if not found:
        t = status.totals
        return OK, (
            f"OK - {t.get('series', 0)} series, {t.get('pending', 0)} pending, "
            f"{t.get('dead', 0)} dead"
        )
    code = found[0][0]
    return code, f"{LABELS[code]} - " + "; ".join(text for _, text in found)


def problems(config: Config, status: Status) -> list[tuple[int, str]]:
    """What makes the verdict: (WARNING or CRITICAL, text) pairs, the worst first.

    Problems, each WARNING or CRITICAL by its thresholds: a stale dataset x BA (per
    dataset: ``datasets.<name>.stale_*_hours`` or publication lag + 6 h / + 24 h), the
    send queue's head waiting too long, dead rows, consecutive failed runs per stage,
    and config warnings. Disabled datasets and BAs no longer configured are never
    stale; an empty outbox is OK.
    """
    th = config.status
    found = _stale_problems(status.groups)
    age = status.oldest_pending_age_seconds
    if age is not None and age > th.oldest_pending_warning_hours * 3600:
        crit = age > th.oldest_pending_critical_hours * 3600
        limit = th.oldest_pending_critical_hours if crit else th.oldest_pending_warning_hours
        found.append(
            (
                CRITICAL if crit else WARNING,
                f"oldest pending row waiting {age_text(age)} "
                f"({'crit' if crit else 'warn'} > {_limit(limit * 3600)})",
            )
        )
    dead = status.totals.get("dead", 0)
    if dead >= th.dead_rows_warning:
        crit = dead >= th.dead_rows_critical
        limit = th.dead_rows_critical if crit else th.dead_rows_warning
        rows = "row" if dead == 1 else "rows"
        found.append((CRITICAL if crit else WARNING, f"{dead} dead {rows} ({_at(crit, limit)})"))
    for stage, n in status.consecutive_failures.items():
        if n >= th.failed_runs_warning:
            crit = n >= th.failed_runs_critical
            limit = th.failed_runs_critical if crit else th.failed_runs_warning
            found.append(
                (
                    CRITICAL if crit else WARNING,
                    f"{stage} failed {n} runs in a row ({_at(crit, limit)})",
                )
            )
    floor, free = config.housekeeping.min_free_bytes, status.disk_free_bytes
    if floor and free is not None and free < floor:
        found.append(
            (
                WARNING,
                f"disk space low: {size_text(free)} free (housekeeping.min_free_bytes "
                f"{size_text(floor)}: fetch stages nothing below it)",
            )
        )
    found.extend(_quality_problems(config, status.quality))
    found.extend((WARNING, w) for w in status.warnings)
    found.sort(key=lambda p: -p[0])
    return found


def _quality_problems(config: Config, quality: dict[str, Any]) -> list[tuple[int, str]]:
    """Open findings at or above ``quality.check_{warning,critical}_severity``."""
    order = ("info", "warn", "crit")
    by = quality.get("open_by_severity") or {}
    for level, floor in (
        (CRITICAL, config.quality.check_critical_severity),
        (WARNING, config.quality.check_warning_severity),
    ):
        if floor == "off":
            continue
        n = sum(by.get(sev, 0) for sev in order[order.index(floor) :])
        if n:
            noun = "finding" if n == 1 else "findings"
            worst = quality.get("worst_rule")
            return [(level, f"{n} open quality {noun} at {floor} or worse (worst: {worst})")]
    return []


def _at(crit: bool, limit: int) -> str:
    return f"{'crit' if crit else 'warn'} at {limit}"


def _stale_problems(groups: Sequence[Group]) -> list[tuple[int, str]]:
    by_dataset: dict[str, list[Group]] = {}
    enabled: dict[str, int] = {}
    for g in groups:
        enabled[g.dataset] = enabled.get(g.dataset, 0) + int(g.enabled)
        if g.freshness_state in (FRESH_WARNING, FRESH_CRITICAL):
            by_dataset.setdefault(g.dataset, []).append(g)
    problems = []
    for dataset, stale in by_dataset.items():
        critical = [g for g in stale if g.freshness_state == FRESH_CRITICAL]
        level = CRITICAL if critical else WARNING
        oldest = max(g.freshness_seconds or 0 for g in stale)
        if len(stale) == enabled[dataset] > 1:
            where = f"all {len(stale)} BAs"
        else:
            where = ", ".join(g.ba for g in stale)
        limit = (
            f"crit > {_limit(stale[0].stale_critical_seconds)}"
            if critical
            else f"warn > {_limit(stale[0].stale_warning_seconds)}"
        )
        problems.append((level, f"{dataset} stale {age_text(oldest)} ({where}; {limit})"))
    return problems


def _limit(seconds: float | None) -> str:
    return f"{(seconds or 0) / 3600:g}h"


def age_text(seconds: float) -> str:
    """A short age: ``45m``, ``2.5h``, ``31h``, ``12d``."""
    if abs(seconds) < 3600:
        return f"{seconds / 60:.0f}m"
    hours = seconds / 3600
    if abs(hours) < 10:
        return f"{hours:.1f}".rstrip("0").rstrip(".") + "h"
    if abs(hours) < 72:
        return f"{hours:.0f}h"
    return f"{hours / 24:.0f}d"


# -- remote -------------------------------------------------------------------------


class LatestSource(Protocol):
    """What ``--remote`` needs from GridPulse (a :class:`~outbox.gridpulse.GridPulseClient`)."""

    def latest(self, series_id: str) -> tuple[str | None, str | None] | None:
        """``(latest_ts, revision)`` or None when GridPulse does not know the series."""
        ...


def compare_remote(status: Status, client: LatestSource, base_url: str) -> dict[str, Any]:
    """Each series' acknowledged rows against GridPulse's latest ts for it.

    Verdicts: ``ok`` (GridPulse's latest equals our newest acknowledged ts, or both are
    empty), ``behind`` (GridPulse lacks rows it acknowledged: its latest is older, or it
    does not know the series), ``ahead`` (GridPulse holds newer rows than this outbox ever
    delivered: another writer, or a reset outbox that has not caught up). Raises the
    client's SinkError when GridPulse cannot be asked.
    """
    rows = []
    for s in status.series:
        answer = client.latest(s.series_id)
        latest, revision = answer if answer is not None else (None, None)
        rows.append(
            {
                "series_id": s.series_id,
                "delivered_through": s.delivered_through,
                "newest_acked": s.newest_acked,
                "gridpulse_known": answer is not None,
                "gridpulse_latest": latest,
                "gridpulse_revision": revision,
                "verdict": _verdict(s.newest_acked, latest),
            }
        )
    disagree = sum(1 for r in rows if r["verdict"] != "ok")
    return {
        "base_url": redact(base_url),
        "checked": len(rows),
        "agree": len(rows) - disagree,
        "disagree": disagree,
        "series": rows,
    }


def _verdict(acked: str | None, latest: str | None) -> str:
    if acked is not None and (latest is None or parse_ts(latest) < parse_ts(acked)):
        return "behind"
    if latest is not None and (acked is None or parse_ts(latest) > parse_ts(acked)):
        return "ahead"
    return "ok"


# -- metrics ------------------------------------------------------------------------

_METRICS: dict[str, str] = {
    "outbox_info": "Version and schema of the outbox (always 1).",
    "outbox_status_timestamp_seconds": "When this status was collected.",
    "outbox_check_status": "Verdict of `outbox status --check`: 0 OK, 1 WARNING, 2 CRITICAL.",
    "outbox_database_bytes": "Size of the outbox database file plus its WAL.",
    "outbox_disk_free_bytes": "Free bytes on the file system that holds the outbox.",
    "outbox_series": "Series in the outbox.",
    "outbox_pending_rows": "Rows waiting to be delivered.",
    "outbox_dead_rows": "Rows GridPulse rejected permanently (dead letters).",
    "outbox_acks_unapplied_rows": (
        "Rows GridPulse acknowledged whose rows a stopped send left to mark (the next does)."
    ),
    "outbox_oldest_pending_age_seconds": (
        "How long the oldest pending row has waited since it was staged (0 when none)."
    ),
    "outbox_next_retry_timestamp_seconds": "Earliest next attempt of a deferred row.",
    "outbox_last_fetch_invalid_rows": "Invalid EIA rows in the last finished fetch run.",
    "outbox_series_pending_rows": "Pending rows per series.",
    "outbox_series_dead_rows": "Dead rows per series.",
    "outbox_series_newest_staged_timestamp_seconds": "Newest hour staged per series.",
    "outbox_series_newest_acked_timestamp_seconds": "Newest hour acknowledged per series.",
    "outbox_series_delivered_through_timestamp_seconds": (
        "Per series, the newest hour such that every staged hour up to it is delivered."
    ),
    "outbox_freshness_seconds": "Age of the newest staged hour per dataset and BA.",
    "outbox_freshness_level": (
        "Freshness per enabled dataset and BA: 0 ok, 1 warning, 2 critical, 3 no data."
    ),
    "outbox_freshness_warning_seconds": "Freshness warning threshold per dataset.",
    "outbox_freshness_critical_seconds": "Freshness critical threshold per dataset.",
    "outbox_last_run_timestamp_seconds": "Start of the last finished run per stage.",
    "outbox_last_run_duration_seconds": "Duration of the last finished run per stage.",
    "outbox_last_run_success": "Whether the last finished run per stage succeeded (1) or not.",
    "outbox_last_success_timestamp_seconds": "End of the last successful run per stage.",
    "outbox_consecutive_failed_runs": "Failed runs since the last successful one, per stage.",
    "outbox_alerts_sent_total": "Notifications delivered on a change of the verdict.",
    "outbox_alert_failures_total": "Notifications that failed (each retried at the next run).",
    "outbox_quality_findings": "Open data-quality findings per rule, BA and severity.",
    "outbox_revisions_total": "Revisions of staged rows recorded in the ledger.",
}
_LEVELS = {FRESH_OK: 0, FRESH_WARNING: 1, FRESH_CRITICAL: 2, FRESH_NO_DATA: 3}

Sample = tuple[dict[str, str], float]


def render_metrics(status: Status) -> str:
    """Prometheus text exposition (format 0.0.4) of the status."""
    samples: dict[str, list[Sample]] = {name: [] for name in _METRICS}
    _add_global(samples, status)
    for s in status.series:
        labels = {"dataset": s.dataset, "ba": s.ba, "series": s.series_id}
        samples["outbox_series_pending_rows"].append((labels, s.pending))
        samples["outbox_series_dead_rows"].append((labels, s.dead))
        _add_ts(samples["outbox_series_newest_staged_timestamp_seconds"], labels, s.newest_staged)
        _add_ts(samples["outbox_series_newest_acked_timestamp_seconds"], labels, s.newest_acked)
        _add_ts(
            samples["outbox_series_delivered_through_timestamp_seconds"],
            labels,
            s.delivered_through,
        )
    _add_groups(samples, status.groups)
    _add_runs(samples, status)
    _add_quality(samples, status.quality)
    lines = []
    for name, rows in samples.items():
        if not rows:
            continue
        lines.append(f"# HELP {name} {_METRICS[name]}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in rows)
    return "\n".join(lines) + "\n"


def _add_global(samples: dict[str, list[Sample]], status: Status) -> None:
    info = {
        "version": __version__,
        "schema": status.outbox_schema or "",
        "schema_head": status.schema_head,
    }
    samples["outbox_info"].append((info, 1))
    _add_ts(samples["outbox_status_timestamp_seconds"], {}, status.generated_at)
    if status.check is not None:
        samples["outbox_check_status"].append(({}, status.check.code))
    samples["outbox_database_bytes"].append(({}, status.database_bytes))
    if status.disk_free_bytes is not None:
        samples["outbox_disk_free_bytes"].append(({}, status.disk_free_bytes))
    samples["outbox_series"].append(({}, status.totals.get("series", 0)))
    samples["outbox_pending_rows"].append(({}, status.totals.get("pending", 0)))
    samples["outbox_dead_rows"].append(({}, status.totals.get("dead", 0)))
    samples["outbox_acks_unapplied_rows"].append(({}, status.totals.get("acks_unapplied", 0)))
    samples["outbox_oldest_pending_age_seconds"].append(
        ({}, status.oldest_pending_age_seconds or 0)
    )
    _add_ts(samples["outbox_next_retry_timestamp_seconds"], {}, status.next_retry_at)
    samples["outbox_last_fetch_invalid_rows"].append(({}, status.invalid_last_fetch))
    samples["outbox_alerts_sent_total"].append(({}, status.alerts.get("sent", 0)))
    samples["outbox_alert_failures_total"].append(({}, status.alerts.get("failures", 0)))


def _add_quality(samples: dict[str, list[Sample]], quality: dict[str, Any]) -> None:
    if not quality:
        return
    for g in quality.get("open_by_rule", []):
        labels = {"rule": g["rule"], "ba": g["ba"], "severity": g["severity"]}
        samples["outbox_quality_findings"].append((labels, g["n"]))
    samples["outbox_revisions_total"].append(({}, quality.get("revisions_total", 0)))


def _add_groups(samples: dict[str, list[Sample]], groups: Sequence[Group]) -> None:
    thresholds: dict[str, Group] = {}
    for g in groups:
        labels = {"dataset": g.dataset, "ba": g.ba}
        if g.freshness_seconds is not None:
            samples["outbox_freshness_seconds"].append((labels, g.freshness_seconds))
        if g.freshness_state in _LEVELS:
            samples["outbox_freshness_level"].append((labels, _LEVELS[g.freshness_state]))
        if g.stale_warning_seconds is not None:
            thresholds.setdefault(g.dataset, g)
    for dataset, g in thresholds.items():
        labels = {"dataset": dataset}
        samples["outbox_freshness_warning_seconds"].append((labels, g.stale_warning_seconds or 0))
        samples["outbox_freshness_critical_seconds"].append((labels, g.stale_critical_seconds or 0))


def _add_runs(samples: dict[str, list[Sample]], status: Status) -> None:
    for stage in STAGES:
        labels = {"stage": stage}
        run = status.last_runs.get(stage)
        if run is not None and run.get("finished_at"):
            _add_ts(samples["outbox_last_run_timestamp_seconds"], labels, run["started_at"])
            samples["outbox_last_run_duration_seconds"].append((labels, run["seconds"] or 0))
            samples["outbox_last_run_success"].append((labels, int(run["status"] == "ok")))
        _add_ts(
            samples["outbox_last_success_timestamp_seconds"],
            labels,
            status.last_success.get(stage),
        )
        samples["outbox_consecutive_failed_runs"].append(
            (labels, status.consecutive_failures.get(stage, 0))
        )


def _add_ts(rows: list[Sample], labels: dict[str, str], ts: str | None) -> None:
    if ts:
        rows.append((labels, parse_ts(ts).timestamp()))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def write_metrics(status: Status, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_metrics` to ``path`` atomically (temp file beside it + rename).

    node_exporter's textfile collector reads only ``*.prom`` files, so the temporary
    ``.outbox-metrics-*.tmp`` file is never collected half-written.
    """
    from outbox.files import METRICS_HEAD, write_atomic

    return write_atomic(
        path,
        render_metrics(status),
        prefix=".outbox-metrics-",
        replaces=METRICS_HEAD,
        what="metrics file",
    )


def write_run_metrics(config: Config) -> None:
    """After a fetch or send run: refresh ``metrics_path`` if configured; never raises.

    Nothing is written while there is no outbox (a send before the first fetch).
    """
    if not config.metrics_path or not Path(config.database).exists():
        return
    try:
        write_metrics(read(config), config.metrics_path)
    except Exception as exc:  # metrics must never fail the run they describe
        log.warning("metrics not written path=%s error=%s", config.metrics_path, _q(str(exc)))


def _q(text: str) -> str:
    import json

    return json.dumps(redact(text))


# -- table ---------------------------------------------------------------------------

_STATE_STYLE = {FRESH_WARNING: "yellow", FRESH_CRITICAL: "bold red", FRESH_NO_DATA: "yellow"}
_STATE_WORD = {FRESH_WARNING: " warn", FRESH_CRITICAL: " CRIT", FRESH_NO_DATA: ""}


def render_table(status: Status) -> Any:
    """A rich renderable: the dataset x BA table, then runs, queue, database and remote."""
    from rich.console import Group as RichGroup
    from rich.text import Text

    now = parse_ts(status.generated_at)
    parts: list[Any] = [
        Text(f"gridpulse-outbox status at {status.generated_at}", style="bold"),
        _group_table(status, now),
    ]
    parts.extend(_summary_lines(status, now))
    if status.remote is not None:
        parts.extend(_remote_parts(status.remote, now))
    return RichGroup(*parts)


def _group_table(status: Status, now: datetime) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0),
        show_edge=False,
    )
    for name, justify in (
        ("dataset", "left"),
        ("ba", "left"),
        ("newest\nstaged", "left"),
        ("newest\nacked", "left"),
        ("delivered\nthrough", "left"),
        ("pending", "right"),
        ("dead", "right"),
        ("age", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for g in status.groups:
        table.add_row(
            g.dataset,
            g.ba,
            compact_ts(g.newest_staged, now),
            compact_ts(g.newest_acked, now),
            compact_ts(g.delivered_through, now),
            f"{g.pending:,}",
            f"{g.dead:,}",
            _freshness_cell(g),
        )
    return table


def _freshness_cell(g: Group) -> Any:
    from rich.text import Text

    if g.freshness_state == FRESH_DISABLED:
        return Text("off", style="dim")
    if g.freshness_seconds is None:
        return Text("no data", style="yellow")
    text = age_text(g.freshness_seconds) + _STATE_WORD.get(g.freshness_state, "")
    return Text(text, style=_STATE_STYLE.get(g.freshness_state, ""))


def _summary_lines(status: Status, now: datetime) -> list[Any]:
    from rich.text import Text

    t = status.totals
    # The table has a row per dataset x BA, the totals count series: say how they relate.
    lines = [
        Text(
            f"totals: {t.get('series', 0)} series in {len(status.groups)} rows, "
            f"{t.get('pending', 0):,} pending, {t.get('dead', 0):,} dead"
        )
    ]
    if t.get("acks_unapplied"):
        lines.append(
            Text(
                f"acknowledged, not yet marked: {t['acks_unapplied']:,} rows"
                " (a send was stopped; the next send marks them and never resends them)"
            )
        )
    lines.extend(_missing_lines(status.missing, now))
    lines.append(Text(_queue_line(status, now)))
    if status.quality:
        lines.append(Text(quality_line(status.quality)))
    for stage in STAGES:
        lines.append(_run_line(status, stage, now))
    schema = status.outbox_schema or "none"
    head = "" if schema == status.schema_head else f", head {status.schema_head}"
    free = "" if status.disk_free_bytes is None else f"; {size_text(status.disk_free_bytes)} free"
    lines.append(
        Text(
            f"database: {status.database} ({_megabytes(status.database_bytes)}, "
            f"schema {schema}{head}{free})"
        )
    )
    lines.extend(Text(f"warning: {w}", style="yellow") for w in status.warnings)
    if status.check is not None:
        style = {OK: "green", WARNING: "yellow", CRITICAL: "bold red"}.get(status.check.code, "")
        lines.append(Text(f"check: {status.check.summary}", style=style))
    return lines


def _missing_lines(missing: Sequence[dict[str, str | None]], now: datetime) -> list[Any]:
    """``no data yet: ...`` for streams no request has completed for, then ``no data at
    EIA through T: ...`` for the others, one line per such hour, newest first."""
    from rich.text import Text

    by_through: dict[str, list[str]] = {}
    for m in missing:
        by_through.setdefault(m.get("asked_through") or "", []).append(f"{m['dataset']} {m['ba']}")
    lines = []
    if "" in by_through:
        lines.append(Text(f"no data yet: {', '.join(by_through.pop(''))}", style="yellow"))
    for through in sorted(by_through, reverse=True):
        names = ", ".join(by_through[through])
        when = compact_ts(through, now)
        lines.append(Text(f"no data at EIA through {when}: {names}", style="yellow"))
    return lines


def quality_line(quality: dict[str, Any]) -> str:
    """``quality: 3 open findings (1 crit, 2 warn; worst repeated_day); 5 rows revised
    in the last 24 h``."""
    n = quality.get("open", 0)
    revised = quality.get("revised_last_24h", 0)
    tail = f"{revised:,} rows revised in the last 24 h"
    if not n:
        return f"quality: no open findings; {tail}"
    by = quality.get("open_by_severity") or {}
    parts = ", ".join(f"{by[sev]} {sev}" for sev in ("crit", "warn", "info") if by.get(sev))
    noun = "finding" if n == 1 else "findings"
    return f"quality: {n} open {noun} ({parts}; worst {quality.get('worst_rule')}); {tail}"


def _queue_line(status: Status, now: datetime) -> str:
    if status.oldest_pending is None:
        line = "queue: empty"
    else:
        waited = age_text(status.oldest_pending_age_seconds or 0)
        line = (
            f"queue: oldest pending {status.oldest_pending_series} "
            f"{compact_ts(status.oldest_pending, now)}, waiting {waited}"
        )
    if status.next_retry_at:
        line += f"; next retry {compact_ts(status.next_retry_at, now)}"
    return line


def _run_line(status: Status, stage: str, now: datetime) -> Any:
    from rich.text import Text

    run = status.last_runs.get(stage)
    label = f"last {stage}: ".ljust(12)
    if run is None:
        return Text(label + "never")
    took = "" if run["seconds"] is None else f", {duration_text(run['seconds'])}"
    text = f"{label}run {run['id']} {run['status']} at {compact_ts(run['started_at'], now)}{took}"
    if run.get("error"):
        text += f": {run['error']}"
    else:
        counts = counts_text(stage, run.get("counts") or {})
        text += f" ({counts})" if counts else ""
    failures = status.consecutive_failures.get(stage, 0)
    if failures > 1:
        text += f" [{failures} failed in a row]"
    style = "red" if run["status"] == "failed" else ""
    return Text(text, style=style)


def counts_text(stage: str, counts: dict[str, Any]) -> str:
    """``pages 3, rows 2,376, invalid 0``: the non-zero counts (a fetch always shows invalid)."""
    return ", ".join(
        f"{k} {v:,}"
        for k, v in counts.items()
        if isinstance(v, int) and (v or (stage == "fetch" and k == "invalid"))
    )


def duration_text(seconds: float) -> str:
    """``0.40s``, ``2.39s``, ``12.30s``, ``5m 02s``."""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def render_runs(records: Sequence[RunRecord], now: datetime | None = None) -> Any:
    """The ``outbox runs`` table: id, stage, start, duration, status, counts or error."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    now = now or utcnow()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False)
    for name in ("run", "stage", "started", "took", "status"):
        table.add_column(name, no_wrap=True, justify="right" if name in ("run", "took") else "left")
    table.add_column("counts / error", overflow="fold")
    for r in records:
        seconds = run_seconds(r)
        detail = redact(r.error) if r.error else counts_text(r.stage, r.counts)
        table.add_row(
            str(r.id),
            r.stage,
            compact_ts(r.started_at, now),
            "-" if seconds is None else duration_text(seconds),
            Text(r.status, style="red" if r.status == "failed" else ""),
            Text(detail),
        )
    return table


def _remote_parts(remote: dict[str, Any], now: datetime) -> list[Any]:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"remote: {remote['agree']} of {remote['checked']} series agree with {remote['base_url']}",
        style="green" if not remote["disagree"] else "yellow",
    )
    rows = [r for r in remote["series"] if r["verdict"] != "ok"]
    if not rows:
        return [head]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False)
    for name in ("series", "delivered\nthrough", "newest\nacked", "GridPulse\nlatest", "verdict"):
        table.add_column(name, no_wrap=name != "series")
    for r in rows:
        latest = compact_ts(r["gridpulse_latest"], now) if r["gridpulse_known"] else "unknown"
        table.add_row(
            r["series_id"],
            compact_ts(r["delivered_through"], now),
            compact_ts(r["newest_acked"], now),
            latest,
            r["verdict"],
        )
    return [head, table]


def compact_ts(ts: str | None, now: datetime | None = None) -> str:
    """``08-21 23:00`` UTC for the table, ``2024-08-21 23:00`` when not in ``now``'s year:
    always the hour, never a date alone."""
    if not ts:
        return "-"
    when = parse_ts(ts)
    if now is not None and when.year != now.year:
        return when.strftime("%Y-%m-%d %H:%M")
    return when.strftime("%m-%d %H:%M")


def size_text(size: float) -> str:
    """``84 kB``, ``412.3 MB``, ``75.3 GB`` (decimal units, as ``df -H``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.0f} kB"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"
