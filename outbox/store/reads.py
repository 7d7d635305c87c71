"""Read models: what status, doctor, gaps, the report and the demo read of the outbox.

Every read is one snapshot (:meth:`Store.read`) and never blocks a writer (WAL). Counts
come from the ``queue`` (pending, dead; acknowledged rows have no entry there); per-series
figures are primary-key seeks per series, so they cost the same with millions of rows
staged.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outbox.store.engine import cursor, one_value
from outbox.store.schema import pages
from outbox.timeutil import parse_ts

if TYPE_CHECKING:
    from outbox.store.handle import Store

_AFTER_EVERY_TS = "~"  # sorts after every RFC 3339 timestamp: `ts < ?` bounds nothing
# One row with its delivery state: the `row_states` view (migration 0008: observations
# left-joined to their queue entries, 'acked' where there is none) answers every read of a
# row's state; SQLite flattens it into primary-key seeks.

_TS_FMT = "'%Y-%m-%dT%H:%M:%SZ'"
# Missing hours per series, in one statement:
# * bounds: each series is read from its newest row before :lo on (a primary-key seek);
# * spans: rows per series against the hours its first..last span holds; a series whose
#   shortfall is explained by checked hours has no gap and is not read again;
# * holes: LAG over the primary-key order of the remaining series finds each hole between
#   two staged hours; the recursive CTE spells out the hours inside; checked hours drop out.
_MISSING_HOURS = f"""
WITH RECURSIVE bounds AS MATERIALIZED (
    SELECT s.series_id,
           coalesce((SELECT max(p.ts) FROM observations p
                     WHERE p.series_id = s.series_id AND p.ts < :lo), :lo) AS lo
    FROM series s
),
spans AS (
    SELECT b.series_id, b.lo, min(o.ts) AS first, max(o.ts) AS last, count(*) AS n
    FROM bounds b CROSS JOIN observations o ON o.series_id = b.series_id AND o.ts >= b.lo
    GROUP BY b.series_id
),
suspects AS (
    SELECT p.series_id, p.lo FROM spans p
    WHERE (strftime('%s', p.last) - strftime('%s', p.first)) / 3600 + 1 > p.n
          + (SELECT count(*) FROM checked_gaps c
             WHERE c.series_id = p.series_id AND c.ts > p.first AND c.ts < p.last)
),
holes AS (
    SELECT series_id, prev, ts FROM (
        SELECT o.series_id, o.ts,
               LAG(o.ts) OVER (PARTITION BY o.series_id ORDER BY o.ts) AS prev
        FROM suspects b CROSS JOIN observations o
          ON o.series_id = b.series_id AND o.ts >= b.lo
    )
    WHERE prev IS NOT NULL AND ts > strftime({_TS_FMT}, prev, '+1 hour')
),
hours (series_id, ts, last) AS (
    SELECT series_id, strftime({_TS_FMT}, prev, '+1 hour'), strftime({_TS_FMT}, ts, '-1 hour')
    FROM holes
    UNION ALL
    SELECT series_id, strftime({_TS_FMT}, ts, '+1 hour'), last FROM hours WHERE ts < last
)
SELECT h.series_id, h.ts FROM hours h
WHERE h.ts >= :lo AND h.ts <= :hi
  AND NOT EXISTS (SELECT 1 FROM checked_gaps c WHERE c.series_id = h.series_id AND c.ts = h.ts)
ORDER BY h.series_id, h.ts
"""


@dataclass(frozen=True)
class SeriesState:
    """Per-series delivery state (the ``series_status`` view, computed cheaply)."""

    series_id: str
    ba: str
    type: str
    subtype: str | None
    pending: int
    dead: int
    newest_staged: str | None
    newest_acked: str | None
    delivered_through: str | None
    oldest_pending: str | None
    next_attempt_at: str | None = None  # earliest retry time of a deferred pending row


class Reads:
    """The read models of the outbox (``store.reads``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def series_states(self, pending: bool = True) -> list[SeriesState]:
        """Per-series pending/dead counts, newest staged/acked and delivered-through.

        The queue is scanned once (counts, oldest ts and earliest retry time
        together); everything else is a primary-key seek per series: one when the newest
        row of the series is acknowledged and none is pending (the steady state).

        With ``pending=False`` only the dead counts and the newest staged row are read:
        the pending fields are 0 or None, and newest acked and delivered-through are None.
        That costs no more with millions of rows pending (the per-series pending counts
        sort the queue: seconds at 10M pending); the monitoring probe needs no
        more.
        """
        with self._store.read() as conn:
            cur = cursor(conn)
            pend = _pending_by_series(cur) if pending else {}
            dead = dict(
                cur.execute(
                    "SELECT series_id, count(*) FROM queue WHERE state = 'dead' GROUP BY series_id"
                ).fetchall()
            )
            found = cur.execute(
                "SELECT series_id, ba, type, subtype FROM series ORDER BY series_id"
            ).fetchall()
            out = [
                self._series_state(
                    cur, s, pend.get(s[0], (0, None, None)), dead.get(s[0], 0), pending
                )
                for s in found
            ]
            cur.close()
        return out

    def _series_state(
        self,
        cur: sqlite3.Cursor,
        series: Sequence[Any],
        pend: tuple[int, str | None, str | None],
        dead: int,
        pending: bool,
    ) -> SeriesState:
        sid, ba, typ, sub = series
        n_pending, oldest, retry = pend
        newest, newest_state = cur.execute(
            "SELECT ts, state FROM row_states WHERE series_id = ? ORDER BY ts DESC LIMIT 1",
            (sid,),
        ).fetchone() or (None, None)
        acked = delivered = None  # not read for the probe (pending=False)
        if pending:
            acked = newest
            if newest is not None and newest_state not in ("acked", None):
                acked = self._newest_acked(cur, sid, n_pending, oldest, newest)
            delivered = newest if oldest is None else self._delivered_through(cur, sid, oldest)
        return SeriesState(
            series_id=sid,
            ba=ba,
            type=typ,
            subtype=sub,
            pending=n_pending,
            dead=dead,
            newest_staged=newest,
            newest_acked=acked,
            delivered_through=delivered,
            oldest_pending=oldest,
            next_attempt_at=retry,
        )

    @staticmethod
    def _newest_acked(
        cur: sqlite3.Cursor, sid: str, n_pending: int, oldest: str | None, newest: str
    ) -> str | None:
        """The newest acknowledged ts of a series whose newest row is not acknowledged.

        Rows sit on the hour grid, one per hour at most: when the pending rows fill every
        hour from the oldest to the newest row, the newest acknowledged row is older than
        all of them (a backlog never sent would otherwise be walked back row by row).
        """
        filled = oldest is not None and n_pending == _hours(oldest, newest) + 1
        acked: str | None = one_value(
            cur,
            "SELECT ts FROM row_states WHERE series_id = ? AND state = 'acked' AND ts < ?"
            " ORDER BY ts DESC LIMIT 1",
            (sid, oldest if filled else _AFTER_EVERY_TS),
        )
        return acked

    @staticmethod
    def _delivered_through(cur: sqlite3.Cursor, sid: str, oldest_pending: str) -> str | None:
        delivered: str | None = one_value(
            cur,
            "SELECT ts FROM observations WHERE series_id = ? AND ts < ? ORDER BY ts DESC LIMIT 1",
            (sid, oldest_pending),
        )
        return delivered

    def counts(self) -> dict[str, int]:
        """Rows pending and dead (counts of the queue; acked rows are the others)."""
        with self._store.read() as conn:
            cur = cursor(conn)
            pending = one_value(cur, "SELECT count(*) FROM queue WHERE state = 'pending'")
            dead = one_value(cur, "SELECT count(*) FROM queue WHERE state = 'dead'")
            cur.close()
        return {"pending": int(pending or 0), "dead": int(dead or 0)}

    def count_state(self, state: str) -> int:
        """Rows in ``state`` (acked: a full count, for tests, the demo and small outboxes)."""
        table = "row_states" if state == "acked" else "queue"
        with self._store.read() as conn:
            return int(
                conn.exec_driver_sql(
                    f"SELECT count(*) FROM {table} WHERE state = ?", (state,)
                ).scalar()
                or 0
            )

    def row(self, series_id: str, ts: str) -> dict[str, Any] | None:
        """One observation with its delivery state (``pending``, ``dead`` or ``acked``,
        attempts and last error), or None."""
        with self._store.read() as conn:
            found = conn.exec_driver_sql(
                "SELECT * FROM row_states WHERE series_id = ? AND ts = ?", (series_id, ts)
            ).first()
        return dict(found._mapping) if found else None

    def page_body(self, page_id: int) -> tuple[dict[str, Any], bytes] | None:
        """A stored page's metadata and its decompressed body."""
        with self._store.read() as conn:
            found = conn.execute(pages.select().where(pages.c.id == page_id)).first()
        if not found:
            return None
        info = dict(found._mapping)
        body = info.pop("body")
        return info, zlib.decompress(body) if info["encoding"] == "zlib" else body

    def queue_head(self) -> tuple[str, str, str] | None:
        """``(series_id, ts, fetched_at)`` of the oldest pending row (the send queue's head)."""
        with self._store.read() as conn:
            row = conn.exec_driver_sql(
                "SELECT q.series_id, q.ts, o.fetched_at FROM queue q"
                " CROSS JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts"
                " WHERE q.state = 'pending' ORDER BY q.ts, q.series_id LIMIT 1"
            ).first()
        return (row[0], row[1], row[2]) if row else None

    def newest_before(self, series_ids: Iterable[str], before: str) -> str | None:
        """The newest ts earlier than ``before`` in any of ``series_ids`` (primary-key seeks)."""
        newest = None
        with self._store.read() as conn:
            cur = cursor(conn)
            for sid in series_ids:
                found = one_value(
                    cur,
                    "SELECT ts FROM observations WHERE series_id = ? AND ts < ?"
                    " ORDER BY ts DESC LIMIT 1",
                    (sid, before),
                )
                if found is not None and (newest is None or found > newest):
                    newest = found
            cur.close()
        return newest

    def missing_hours(self, since: str = "", until: str = "9999") -> list[tuple[str, str]]:
        """``(series_id, ts)`` of every unchecked hour absent between two staged hours.

        Only hours in ``[since, until]`` are returned, ordered by series and ts.
        """
        with self._store.read() as conn:
            cur = cursor(conn)
            found = cur.execute(_MISSING_HOURS, {"lo": since, "hi": until}).fetchall()
            cur.close()
        return [(r[0], r[1]) for r in found]

    def series_sources(self) -> dict[str, tuple[str, dict[str, str]]]:
        """series_id -> (EIA route, EIA facets of the series) for every known series."""
        with self._store.read() as conn:
            found = conn.exec_driver_sql("SELECT series_id, route, facets FROM series").all()
        return {r[0]: (r[1], json.loads(r[2] or "{}")) for r in found}

    def ts_range(self) -> tuple[str | None, str | None]:
        """The oldest and newest staged hour of any series (bounds of the report's window)."""
        with self._store.read() as conn:
            row = conn.exec_driver_sql("SELECT min(ts), max(ts) FROM observations").one()
        return row[0], row[1]

    def values_between(
        self, since: str, until: str, glob: str = "*"
    ) -> list[tuple[str, str, float | None]]:
        """``(series_id, ts, value)`` of the rows with ``since <= ts <= until``, by series.

        ``glob`` filters series ids (SQLite GLOB: ``*``, ``?``, ``[...]``, case-sensitive).
        """
        with self._store.read() as conn:
            cur = cursor(conn)
            rows = cur.execute(
                "SELECT series_id, ts, value FROM observations"
                " WHERE ts >= ? AND ts <= ? AND series_id GLOB ? ORDER BY series_id, ts",
                (since, until, glob),
            ).fetchall()
            cur.close()
        return rows

    def flow_by_minute(self) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
        """Rows staged per minute (``fetched_at``, of the rows still in the outbox and not
        dead) and acknowledged per minute (``ack_minutes``, with the newest hour
        acknowledged in that minute).

        Cumulated, they give the backlog and the newest delivered hour over wall time.
        """
        with self._store.read() as conn:
            cur = cursor(conn)
            staged = dict(
                cur.execute(
                    "SELECT substr(fetched_at, 1, 16), count(*) FROM observations GROUP BY 1"
                ).fetchall()
            )
            for minute, n in cur.execute(
                "SELECT substr(o.fetched_at, 1, 16), count(*) FROM queue q"
                " CROSS JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts"
                " WHERE q.state = 'dead' GROUP BY 1"
            ):
                staged[minute] -= n
            acked = cur.execute(
                "SELECT minute, rows, newest_ts FROM ack_minutes ORDER BY minute"
            ).fetchall()
            cur.close()
        return sorted((m, n) for m, n in staged.items() if n), [tuple(r) for r in acked]


def _pending_by_series(cur: sqlite3.Cursor) -> dict[str, tuple[int, str | None, str | None]]:
    """series_id -> (pending rows, oldest pending ts, earliest retry time): one pass over
    the queue."""
    return {
        r[0]: (r[1], r[2], r[3])
        for r in cur.execute(
            "SELECT series_id, count(*), min(ts), min(next_attempt_at)"
            " FROM queue WHERE state = 'pending' GROUP BY series_id"
        )
    }


def _hours(older: str, newer: str) -> int:
    """Whole hours from ``older`` to ``newer`` (RFC 3339 ``...Z`` timestamps)."""
    return int((parse_ts(newer) - parse_ts(older)).total_seconds() // 3600)
