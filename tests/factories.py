"""Plain-function factories: rows, series and pages for store and pipeline tests, and the
observation as it goes over the wire to GridPulse."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from outbox.normalize import revision_of
from outbox.receiver.db import parse_series_id
from outbox.store import PageRecord, Store, WatermarkUpdate

T0 = datetime(2025, 8, 22, 0, tzinfo=UTC)
REGION = "electricity/rto/region-data"


def ts(hour: int) -> str:
    """RFC 3339 text of hour ``hour`` after T0."""
    return (T0 + timedelta(hours=hour)).strftime("%Y-%m-%dT%H:%M:%SZ")


def obs(series_id: str, hour: int, value: float | None = 100.0, row: int = 0) -> tuple[Any, ...]:
    """One staged row tuple in ROW_COLUMNS order."""
    quality = "good" if value is not None else "missing"
    return (series_id, ts(hour), value, "MW", quality, revision_of(value, quality, "MW"), row)


def series_row(series_id: str) -> tuple[Any, ...]:
    """A series tuple in SERIES_COLUMNS order for ``EIA.{BA}.{type}[.{sub}]``."""
    parts = series_id.split(".")
    sub = parts[3] if len(parts) > 3 else None
    return (series_id, parts[1], parts[2], sub, "MW", REGION, "{}")


def page(n: int = 0, rows: int = 1) -> PageRecord:
    """A small page record (body is a tiny EIA-shaped JSON)."""
    body = b'{"response": {"total": "%d", "data": []}}' % rows
    return PageRecord(REGION, {"offset": 0}, "https://x/?api_key=***", n, 0, rows, rows, body)


def mark(stream: str, hour: int) -> WatermarkUpdate:
    """A watermark update of ``dataset:respondent`` to hour ``hour``."""
    dataset, respondent = stream.split(":")
    return WatermarkUpdate(stream, dataset, respondent, REGION, ts(hour))


def ack(store: Store, keys: Iterable[Sequence[str]], now: str | None = None) -> int:
    """Acknowledge sent rows as a send does: record the batch's acks, then apply them;
    returns the rows acknowledged (a row revised since it was sent stays pending)."""
    store.delivery.record_outcome(keys, now=now)
    return store.delivery.apply_acks()


def reject(store: Store, items: Iterable[tuple[Sequence[str], str, str]]) -> int:
    """Dead-letter rows as a send does, each item ``(key, code, message)``; returns how many."""
    return store.delivery.record_outcome((), items)


def delivered_through(store: Store) -> dict[str, str | None]:
    """series_id -> delivered-through ts (None when nothing is delivered yet)."""
    return {s.series_id: s.delivered_through for s in store.reads.series_states()}


def total_changes(conn: Connection) -> int:
    """SQLite's total_changes() of ``conn`` (rows written through it so far)."""
    return int(conn.exec_driver_sql("SELECT total_changes()").scalar() or 0)


def wire_observation(
    i: int = 0, series_id: str = "EIA.PJM.demand", **overrides: Any
) -> dict[str, Any]:
    """A valid wire observation of ``series_id`` at hour ``i`` after T0 (value ``1000 + i``,
    revision ``r{i}``); ``overrides`` replace or add fields."""
    spec = parse_series_id(series_id)
    row = {
        "series_id": series_id,
        "ba": spec.ba,
        "type": spec.type,
        "subtype": spec.subtype,
        "units": "MW",
        "ts": ts(i),
        "value": 1000.0 + i,
        "quality_flag": "good",
        "revision": f"r{i}",
    }
    row.update(overrides)
    return row
