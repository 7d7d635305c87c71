"""Reads of the revision ledger and of the findings (``outbox revisions``, ``outbox
quality``, ``outbox show`` and status). An outbox whose schema predates them (0006)
reads as empty."""

from __future__ import annotations

import fnmatch
from datetime import datetime, timedelta
from typing import Any

from outbox.store import Store
from outbox.timeutil import to_ts

SEVERITY_ORDER = {"info": 0, "warn": 1, "crit": 2}
_REVISION_COLUMNS = (
    "series_id, ts, old_value, new_value, old_quality_flag, new_quality_flag, old_units,"
    " new_units, old_revision, new_revision, seen_at, run_id"
)
_FINDING_COLUMNS = (
    'id, rule, ba, series_id, start, "end", severity, measured, expected, detail,'
    " first_seen, last_seen, resolved_at"
)


def _has(store: Store, table: str) -> bool:
    with store.read() as conn:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return conn.exec_driver_sql(sql, (table,)).first() is not None


def _rows(store: Store, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with store.read() as conn:
        result = conn.exec_driver_sql(sql, params)
        return [dict(r._mapping) for r in result]


def change_pct(old: float | None, new: float | None) -> float | None:
    """The change of a revision in percent of the old value (None: from or to missing, or 0)."""
    if old is None or new is None or old == 0:
        return None
    return round((new - old) / abs(old) * 100, 2)


def revisions(
    store: Store,
    *,
    since: str | None = None,
    series: str | None = None,
    min_change_pct: float | None = None,
) -> list[dict[str, Any]]:
    """Ledger rows seen at or after ``since``, of series matching the glob ``series``,
    changing the value by at least ``min_change_pct`` percent (a change from or to a
    missing value always qualifies), oldest first."""
    if not _has(store, "revisions"):
        return []
    sql = f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE seen_at >= ? ORDER BY id"
    out = []
    for row in _rows(store, sql, (since or "",)):
        if series is not None and not fnmatch.fnmatchcase(row["series_id"], series):
            continue
        pct = change_pct(row["old_value"], row["new_value"])
        row["change_pct"] = pct
        if min_change_pct is not None and pct is not None and abs(pct) < min_change_pct:
            continue
        if min_change_pct is not None and pct is None and row["old_value"] == row["new_value"]:
            continue
        out.append(row)
    return out


def history(store: Store, series_id: str, ts: str) -> list[dict[str, Any]]:
    """Every recorded revision of one row, oldest first."""
    if not _has(store, "revisions"):
        return []
    sql = f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE series_id = ? AND ts = ? ORDER BY id"
    return _rows(store, sql, (series_id, ts))


def findings(
    store: Store,
    *,
    since: str | None = None,
    rule: str | None = None,
    ba: str | None = None,
    open_only: bool = False,
) -> list[dict[str, Any]]:
    """Findings whose hours reach ``since`` or later, newest hours first."""
    if not _has(store, "findings"):
        return []
    where, params = ['"end" >= ?'], [since or ""]
    for column, value in (("rule", rule), ("ba", ba)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if open_only:
        where.append("resolved_at IS NULL")
    sql = (
        f"SELECT {_FINDING_COLUMNS} FROM findings WHERE {' AND '.join(where)}"
        " ORDER BY start DESC, rule, ba, series_id"
    )
    return _rows(store, sql, tuple(params))


def summary(store: Store, now: datetime) -> dict[str, Any]:
    """The ``quality`` object of status: open findings, and revisions of the last 24 h."""
    out: dict[str, Any] = {
        "open": 0,
        "open_by_severity": {"crit": 0, "warn": 0, "info": 0},
        "worst_rule": None,
        "open_by_rule": [],
        "revised_last_24h": 0,
        "revisions_total": 0,
    }
    if not _has(store, "findings"):
        return out
    grouped = _rows(
        store,
        "SELECT rule, ba, severity, count(*) AS n FROM findings WHERE resolved_at IS NULL"
        " GROUP BY rule, ba, severity ORDER BY rule, ba, severity",
    )
    out["open_by_rule"] = grouped
    worst: tuple[int, int, str] | None = None
    per_rule: dict[str, int] = {}
    for g in grouped:
        out["open"] += g["n"]
        out["open_by_severity"][g["severity"]] += g["n"]
        per_rule[g["rule"]] = per_rule.get(g["rule"], 0) + g["n"]
    for g in grouped:
        key = (SEVERITY_ORDER[g["severity"]], per_rule[g["rule"]], g["rule"])
        if worst is None or key[:2] > worst[:2]:
            worst = key
    out["worst_rule"] = worst[2] if worst else None
    since = to_ts(now - timedelta(hours=24))
    with store.read() as conn:
        out["revised_last_24h"] = conn.exec_driver_sql(
            "SELECT count(*) FROM (SELECT DISTINCT series_id, ts FROM revisions"
            " WHERE seen_at >= ?)",
            (since,),
        ).scalar()
        out["revisions_total"] = conn.exec_driver_sql(
            "SELECT coalesce(max(id), 0) FROM revisions"
        ).scalar()
    return out
