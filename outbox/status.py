"""One status model behind the table, ``--json``, ``--check`` and metrics outputs.

:func:`collect` only reads (one snapshot per query, WAL readers never block
writers); the renderers never touch the database.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from outbox.config import DATASET_NAMES, Config
from outbox.store import SeriesState, Store
from outbox.timeutil import parse_ts, to_ts, utcnow

SCHEMA_VERSION = 1
TYPE_TO_DATASET = {
    "demand": "demand",
    "demand_forecast": "demand_forecast",
    "net_generation": "net_generation",
}


def dataset_of_series(s: SeriesState) -> str:
    """Which configured dataset a series belongs to."""
    if s.type == "generation":
        return "generation"
    if s.type == "interchange":
        return "interchange" if s.subtype is None else "ba_interchange"
    return TYPE_TO_DATASET.get(s.type, s.type)


@dataclass
class Group:
    """One dataset x BA line of the status table."""

    dataset: str
    ba: str
    series: int = 0
    pending: int = 0
    dead: int = 0
    newest_staged: str | None = None
    newest_acked: str | None = None
    delivered_through: str | None = None
    oldest_pending: str | None = None
    freshness_hours: float | None = None
    stale: str = "ok"


@dataclass
class Status:
    """Everything ``outbox status`` reports."""

    schema_version: int
    generated_at: str
    database: str
    database_bytes: int
    outbox_schema: str | None
    totals: dict[str, int]
    oldest_pending: str | None
    oldest_pending_age_hours: float | None
    next_retry_at: str | None
    groups: list[Group] = field(default_factory=list)
    watermarks: list[dict[str, Any]] = field(default_factory=list)
    last_runs: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    consecutive_failures: dict[str, int] = field(default_factory=dict)
    invalid_last_fetch: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` (stable keys, documented in docs/status.md)."""
        return asdict(self)


def _age_hours(ts: str | None, now: datetime) -> float | None:
    if not ts:
        return None
    return round((now - parse_ts(ts)).total_seconds() / 3600, 2)


def _max(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else max(a, b)


def _min(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else min(a, b)


def collect(config: Config, store: Store, now: datetime | None = None) -> Status:
    """Read the outbox and build the status model."""
    now = now or utcnow()
    states = store.series_states()
    groups: dict[tuple[str, str], Group] = {}
    for s in states:
        dataset = dataset_of_series(s)
        g = groups.setdefault((dataset, s.ba), Group(dataset, s.ba))
        g.series += 1
        g.pending += s.pending
        g.dead += s.dead
        g.newest_staged = _max(g.newest_staged, s.newest_staged)
        g.newest_acked = _max(g.newest_acked, s.newest_acked)
        g.delivered_through = (
            s.delivered_through if g.series == 1 else _min(g.delivered_through, s.delivered_through)
        )
        g.oldest_pending = _min(g.oldest_pending, s.oldest_pending)
    for g in groups.values():
        g.freshness_hours = _age_hours(g.newest_staged, now)
        if g.dataset in DATASET_NAMES and g.freshness_hours is not None:
            warn, crit = config.stale_thresholds(g.dataset)
            g.stale = (
                "critical"
                if g.freshness_hours > crit
                else "warning"
                if g.freshness_hours > warn
                else "ok"
            )
    counts = store.counts()
    oldest = min((s.oldest_pending for s in states if s.oldest_pending), default=None)
    runs = store.recent_runs(limit=50)
    last_runs: dict[str, dict[str, Any] | None] = {"fetch": None, "send": None}
    failures = {"fetch": 0, "send": 0}
    done = {"fetch": False, "send": False}
    for r in runs:
        if r.stage not in last_runs:
            continue
        if last_runs[r.stage] is None:
            last_runs[r.stage] = asdict(r)
        if not done[r.stage] and r.status == "failed":
            failures[r.stage] += 1
        elif r.status == "ok":
            done[r.stage] = True
    last_fetch = last_runs["fetch"]
    status = Status(
        schema_version=SCHEMA_VERSION,
        generated_at=to_ts(now),
        database=str(store.path),
        database_bytes=_size(store.path),
        outbox_schema=store.schema_version(),
        totals={"series": len(states), **counts},
        oldest_pending=oldest,
        oldest_pending_age_hours=_age_hours(oldest, now),
        next_retry_at=store.next_retry_at(),
        groups=sorted(groups.values(), key=lambda g: (_order(g.dataset), g.ba)),
        watermarks=store.watermark_rows(),
        last_runs=last_runs,
        consecutive_failures=failures,
        invalid_last_fetch=int((last_fetch or {}).get("counts", {}).get("invalid", 0)),
    )
    if not config.eia.verify_tls or not config.gridpulse.verify_tls:
        status.warnings.append("TLS verification is turned off in the config")
    return status


def _order(dataset: str) -> int:
    return DATASET_NAMES.index(dataset) if dataset in DATASET_NAMES else len(DATASET_NAMES)


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
    problems: list[tuple[int, str]] = []
    th = config.status
    for g in status.groups:
        if g.stale != "ok":
            level = CRITICAL if g.stale == "critical" else WARNING
            problems.append((level, f"{g.dataset} {g.ba} stale {g.freshness_hours:g}h"))
    age = status.oldest_pending_age_hours
    if age is not None and age > th.oldest_pending_warning_hours:
        level = CRITICAL if age > th.oldest_pending_critical_hours else WARNING
        problems.append((level, f"oldest pending {age:g}h"))
    dead = status.totals.get("dead", 0)
    if dead >= th.dead_rows_warning:
        level = CRITICAL if dead >= th.dead_rows_critical else WARNING
        problems.append((level, f"{dead} dead rows"))
    for stage, n in status.consecutive_failures.items():
        if n >= th.failed_runs_warning:
            level = CRITICAL if n >= th.failed_runs_critical else WARNING
            problems.append((level, f"{n} failed {stage} runs in a row"))
    for warning in status.warnings:
        problems.append((WARNING, warning))
    if not problems:
        pending = status.totals.get("pending", 0)
        return OK, f"OK - {status.totals.get('series', 0)} series, {pending} pending, 0 dead"
    code = max(level for level, _ in problems)
    problems.sort(key=lambda p: -p[0])
    return code, f"{LABELS[code]} - " + "; ".join(text for _, text in problems)


# -- table ---------------------------------------------------------------------------


def render_table(status: Status) -> Any:
    """A rich renderable of the status (tables of groups, runs and totals)."""
    from rich.console import Group as RichGroup
    from rich.table import Table

    table = Table(title="gridpulse-outbox", title_justify="left")
    for col in (
        "dataset",
        "ba",
        "newest staged",
        "newest acked",
        "delivered through",
        "pending",
        "dead",
        "age h",
    ):
        table.add_column(col, justify="right" if col in ("pending", "dead", "age h") else "left")
    for g in status.groups:
        age = "-" if g.freshness_hours is None else f"{g.freshness_hours:g}"
        if g.stale != "ok":
            age = f"[{'red' if g.stale == 'critical' else 'yellow'}]{age}[/]"
        table.add_row(
            g.dataset,
            g.ba,
            _short(g.newest_staged),
            _short(g.newest_acked),
            _short(g.delivered_through),
            str(g.pending),
            str(g.dead),
            age,
        )
    runs = Table(title="last runs", title_justify="left")
    for col in ("stage", "run", "started", "status", "counts / error"):
        runs.add_column(col)
    for stage, run in status.last_runs.items():
        if run is None:
            runs.add_row(stage, "-", "-", "never", "")
            continue
        detail = run.get("error") or " ".join(
            f"{k}={v}" for k, v in run.get("counts", {}).items() if not isinstance(v, dict)
        )
        runs.add_row(stage, str(run["id"]), run["started_at"], run["status"], detail)
    t = status.totals
    lines = [
        f"totals: {t.get('series', 0)} series, {t.get('pending', 0)} pending, "
        f"{t.get('dead', 0)} dead",
        f"oldest pending: {_short(status.oldest_pending)}"
        + (f" ({status.oldest_pending_age_hours:g} h)" if status.oldest_pending else ""),
        f"next retry: {_short(status.next_retry_at)}",
        f"database: {status.database} ({status.database_bytes / 1e6:.1f} MB, schema "
        f"{status.outbox_schema})",
    ]
    lines.extend(f"[yellow]warning: {w}[/]" for w in status.warnings)
    return RichGroup(table, runs, *lines)


def _short(ts: str | None) -> str:
    return ts if ts else "-"
