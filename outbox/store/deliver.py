"""Delivery: what the send side claims, and how it records each batch's outcome.

A sender claims due rows oldest first (a range of the ``queue`` table, which is ordered
as a claim reads it), records a batch's acknowledgements as one ``ack_log`` row
(:meth:`Delivery.record_outcome`) and applies them while the next POST is in flight
(:meth:`Delivery.apply_acks`): an applied ack deletes the row's queue entry. Rejected rows
go dead, deferred ones stay pending until their retry time; each touches only an entry
whose revision is the one that was sent (a revision staged meanwhile re-queued it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from outbox.crash import crashpoint
from outbox.redact import redact
from outbox.store.engine import cursor, executemany, has_table
from outbox.timeutil import now_ts

if TYPE_CHECKING:
    from outbox.store.handle import Store

# The due pending rows, as a claim reads them; each claim below orders and bounds them.
# A claim takes each row's ba/type/subtype from the series map the Delivery keeps (series
# rows are only ever inserted, never changed), not from a join per row (a quarter of the
# claim's CPU); the newest-due probe and a claim meeting a series the map lacks join.
# CROSS JOIN keeps the queue the outer loop: its order is the claim's.
_DUE_COLUMNS = """
SELECT q.series_id, q.ts, o.value, o.units, o.quality_flag, q.revision, q.attempts,
       o.page_id, o.page_row{series}
FROM queue q CROSS JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts
"""
_DUE_WHERE = """WHERE q.state = 'pending' AND (q.next_attempt_at IS NULL OR q.next_attempt_at <= ?)
"""
_DUE = _DUE_COLUMNS.format(series="") + _DUE_WHERE
_DUE_JOINED = (
    _DUE_COLUMNS.format(series=", s.ba, s.type, s.subtype")
    + "JOIN series s ON s.series_id = o.series_id\n"
    + _DUE_WHERE
)
_FIRST = """ORDER BY q.ts, q.series_id
LIMIT ?
"""
# Behind a (ts, series_id) key: a sender with a batch in flight claims the next one from
# where that batch ends (a range seek on the queue, not a re-scan).
_AFTER = """  AND (q.ts, q.series_id) > (?, ?)
ORDER BY q.ts, q.series_id
LIMIT ?
"""
_CLAIM, _CLAIM_JOINED = _DUE + _FIRST, _DUE_JOINED + _FIRST
_CLAIM_AFTER, _CLAIM_AFTER_JOINED = _DUE + _AFTER, _DUE_JOINED + _AFTER
# The newest due row: the circuit breaker's probe when the refused batch holds no other row.
_NEWEST_DUE = (
    _DUE_JOINED
    + """ORDER BY q.ts DESC, q.series_id DESC
LIMIT 1
"""
)
_SERIES = "SELECT series_id, ba, type, subtype FROM series"
# Acknowledges the rows of one recorded batch (an ack_log row, see encode_acks) in one
# statement: deletes each key's pending entry if it is for that revision. It reads the
# batch's span of the queue (its keys are one range of hours) and keeps the entries whose
# joined key is among the batch's: no JSON parsed per key, no seek per key.
_ACK_RANGE = """
DELETE FROM queue
WHERE ts >= json_extract(?1, '$.from') AND ts <= json_extract(?1, '$.to') AND state = 'pending'
  AND ts || char(31) || series_id || char(31) || revision
      IN (SELECT value FROM json_each(?1, '$.keys'))
"""
# Counts ?2 rows acknowledged at ?1 in its minute, with the newest hour of the batch ?3.
_ACK_MINUTE = """
INSERT INTO ack_minutes (minute, rows, newest_ts)
VALUES (substr(?1, 1, 16), ?2, json_extract(?3, '$.to'))
ON CONFLICT (minute) DO UPDATE SET
    rows = ack_minutes.rows + excluded.rows,
    newest_ts = max(ack_minutes.newest_ts, excluded.newest_ts)
"""
# Rows recorded and not applied: a batch is an object since migration 0009, an array of
# [series_id, ts, revision] before (status reads an outbox as it is, without upgrading).
_UNAPPLIED = """
SELECT coalesce(sum(json_array_length(
    keys, CASE json_type(keys) WHEN 'object' THEN '$.keys' ELSE '$' END)), 0)
FROM ack_log
"""
_ACK_LOG_INSERT = "INSERT INTO ack_log (acked_at, keys) VALUES (?, ?)"
_REJECT = """
UPDATE queue SET state = 'dead', last_error_code = ?, last_error = ?,
       attempts = attempts + 1, next_attempt_at = NULL
WHERE series_id = ? AND ts = ? AND revision = ? AND state = 'pending'
"""
_DEFER = """
UPDATE queue SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
       last_error_code = ?
WHERE series_id = ? AND ts = ? AND revision = ? AND state = 'pending'
"""


class Claimed(NamedTuple):
    """A pending row as the sender needs it (row + its series' identity)."""

    series_id: str
    ts: str
    value: float | None
    units: str
    quality_flag: str
    revision: str
    attempts: int
    page_id: int | None
    page_row: int | None
    # The series' identity last: a claim appends it to the row SQLite returns (see _DUE).
    ba: str
    type: str
    subtype: str | None


class Key(NamedTuple):
    """The identity of one sent row: (series_id, ts) at one revision."""

    series_id: str
    ts: str
    revision: str


class Delivery:
    """The send side of the outbox (``store.delivery``): claim due rows, record outcomes,
    defer and requeue."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # series_id -> (ba, type, subtype): what a claim adds to each row (see _DUE).
        self._series: dict[str, tuple[Any, ...]] = {}

    def claim(
        self, limit: int, now: str | None = None, after: tuple[str, str] | None = None
    ) -> list[Claimed]:
        """Up to ``limit`` pending rows due at ``now``, oldest ts first, then series_id.

        With ``after`` (a ``(ts, series_id)`` key), only rows ordered after that key.
        """
        now = now or now_ts()
        params: tuple[Any, ...]
        if after is None:
            sql, joined, params = _CLAIM, _CLAIM_JOINED, (now, limit)
        else:
            sql, joined, params = _CLAIM_AFTER, _CLAIM_AFTER_JOINED, (now, *after, limit)
        with self._store.read() as conn:
            cur = cursor(conn)
            rows = cur.execute(sql, params).fetchall()
            claimed = self._with_series(cur, rows)
            if claimed is None:  # a row of a series the map has not seen even reloaded
                claimed = [Claimed._make(r) for r in cur.execute(joined, params).fetchall()]
            cur.close()
        return claimed

    def _with_series(
        self, cur: sqlite3.Cursor, rows: list[tuple[Any, ...]]
    ) -> list[Claimed] | None:
        """``rows`` (of :data:`_DUE`) with their series' ba/type/subtype from the map,
        reloaded once when a row's series is not in it; None if one is missing still."""
        series = self._series
        # tuple.__new__ on the row plus its series: a Claimed at half the cost of _make
        # (the map holds (ba, type, subtype) triples, so every row has all its fields).
        new = tuple.__new__
        try:
            return [new(Claimed, r + series[r[0]]) for r in rows]
        except KeyError:
            self._series = series = {r[0]: tuple(r[1:]) for r in cur.execute(_SERIES)}
        if any(r[0] not in series for r in rows):
            return None
        return [new(Claimed, r + series[r[0]]) for r in rows]

    def newest_due(self, now: str | None = None) -> Claimed | None:
        """The pending row due at ``now`` ordered last (newest ts, then series_id), if any."""
        with self._store.read() as conn:
            cur = cursor(conn)
            row = cur.execute(_NEWEST_DUE, (now or now_ts(),)).fetchone()
            cur.close()
        return Claimed._make(row) if row is not None else None

    def record_outcome(
        self,
        acked: Sequence[Sequence[str]],
        rejected: Iterable[tuple[Sequence[str], str, str]] = (),
        now: str | None = None,
    ) -> int:
        """Record one batch outcome in one small transaction; returns the dead rows.

        Rejected rows are dead-lettered at once. The acknowledged keys are recorded in
        ``ack_log`` (one row per batch) and reach their rows with :meth:`apply_acks`:
        committing this costs about what one row does, where marking 5,000 rows acked
        costs tens of milliseconds. Once this commits, the batch is never sent again:
        every claim of a new pass comes after :meth:`apply_acks`.
        """
        now = now or now_ts()
        with self._store.write() as conn:
            cur = cursor(conn)
            dead = _dead_letter(cur, rejected)
            if acked:
                cur.execute(_ACK_LOG_INSERT, (now, encode_acks(acked)))
            cur.close()
            crashpoint("settle.before_commit")
        return dead

    def apply_acks(self) -> int:
        """Apply every recorded batch acknowledgement (the rows' queue entries go); returns
        how many rows it acknowledged (a row revised since it was sent stays pending). Safe
        to call at any time, from one thread at a time."""
        with self._store.read() as conn:  # the usual case: nothing recorded, no write lock taken
            if conn.exec_driver_sql("SELECT 1 FROM ack_log LIMIT 1").first() is None:
                return 0
        with self._store.write() as conn:
            cur = cursor(conn)
            logged = cur.execute("SELECT id, acked_at, keys FROM ack_log ORDER BY id").fetchall()
            acked = 0
            for _id, acked_at, keys in logged:
                if keys.startswith("["):  # written by a send from before 0009, still running
                    keys = encode_acks(decode_acks(keys))  # across the upgrade
                done = max(cur.execute(_ACK_RANGE, (keys,)).rowcount, 0)
                if done:
                    cur.execute(_ACK_MINUTE, (acked_at, done, keys))
                acked += done
            if logged:
                cur.execute("DELETE FROM ack_log WHERE id <= ?", (logged[-1][0],))
                crashpoint("acks.before_commit")
            cur.close()
        return acked

    def unapplied_acks(self) -> int:
        """Rows whose acknowledgement is recorded but not yet applied (0 on a schema from
        before ``ack_log``, which status may read before an upgrade)."""
        with self._store.read() as conn:
            if not has_table(conn, "ack_log"):
                return 0
            return int(conn.exec_driver_sql(_UNAPPLIED).scalar() or 0)

    def defer(
        self,
        keys: Iterable[Sequence[str]],
        next_attempt_at: str,
        error: str,
        code: str | None = None,
    ) -> int:
        """Leave rows pending but not due before ``next_attempt_at``; record the error."""
        error = redact(error)
        with self._store.write() as conn:
            return executemany(
                conn, _DEFER, ((next_attempt_at, error, code, k[0], k[1], k[2]) for k in keys)
            )

    def has_deferred(self, code: str) -> bool:
        """Whether any pending row waits on a deferral recorded with ``code``.

        The deferred entries are found in their partial index alone (it covers the test),
        not one per pending row.
        """
        with self._store.read() as conn:
            return (
                conn.exec_driver_sql(
                    "SELECT 1 FROM queue WHERE next_attempt_at IS NOT NULL"
                    " AND state = 'pending' AND last_error_code = ? LIMIT 1",
                    (code,),
                ).first()
                is not None
            )

    def clear_deferred(self, code: str) -> int:
        """Make rows deferred with ``code`` due now (the cause went away)."""
        with self._store.write() as conn:
            return conn.exec_driver_sql(
                "UPDATE queue SET next_attempt_at = NULL WHERE next_attempt_at IS NOT NULL"
                " AND state = 'pending' AND last_error_code = ?",
                (code,),
            ).rowcount

    def count_due(self, now: str | None = None) -> int:
        """How many pending rows are due at ``now``."""
        with self._store.read() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM queue WHERE state = 'pending'"
                    " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
                    (now or now_ts(),),
                ).scalar()
                or 0
            )

    def count_deferred(self, now: str | None = None) -> tuple[int, str | None]:
        """Pending rows not due before a later time than ``now``, and the earliest such time."""
        with self._store.read() as conn:
            found = conn.exec_driver_sql(
                "SELECT count(*), min(next_attempt_at) FROM queue"
                " WHERE next_attempt_at > ? AND state = 'pending'",
                (now or now_ts(),),
            ).one()
        return int(found[0] or 0), found[1]

    def requeue_dead(
        self, series_glob: str | None = None, code: str | None = None, since: str | None = None
    ) -> int:
        """Put dead rows back to pending (attempts reset); returns how many."""
        clauses = ["state = 'dead'"]
        params: list[Any] = []
        if series_glob:
            clauses.append("series_id GLOB ?")
            params.append(series_glob)
        if code:
            clauses.append("last_error_code = ?")
            params.append(code)
        if since:
            clauses.append("ts >= ?")
            params.append(since)
        sql = (
            "UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = NULL"
            f" WHERE {' AND '.join(clauses)}"
        )
        with self._store.write() as conn:
            return conn.exec_driver_sql(sql, tuple(params)).rowcount

    def count_pending(self) -> int:
        """How many rows are pending (a count of the queue: no sort)."""
        with self._store.read() as conn:
            return int(
                conn.exec_driver_sql("SELECT count(*) FROM queue WHERE state = 'pending'").scalar()
                or 0
            )


def encode_acks(keys: Sequence[Sequence[str]]) -> str:
    """The ``ack_log.keys`` of a batch's acknowledged ``(series_id, ts, revision)`` keys:
    ``{"from": ts, "to": ts, "keys": ["ts\\x1fseries_id\\x1frevision", ...]}`` (``from`` and
    ``to`` null for no keys, which acknowledges nothing). No field of a key holds the unit
    separator (``batch_id_of`` relies on it too).
    """
    hours = list(map(itemgetter(1), keys))  # the span; the keys' order is not relied on
    joined = [f"{ts}\x1f{series_id}\x1f{revision}" for series_id, ts, revision in keys]
    span = (min(hours), max(hours)) if hours else (None, None)
    return orjson.dumps({"from": span[0], "to": span[1], "keys": joined}).decode()


def decode_acks(text: str) -> list[Key]:
    """The keys of one ``ack_log.keys`` value, in their recorded order (either format:
    see :func:`encode_acks`; before migration 0009, ``[[series_id, ts, revision], ...]``)."""
    doc = orjson.loads(text)
    if isinstance(doc, list):
        return [Key(*k) for k in doc]
    return [
        Key(series_id, ts, revision)
        for ts, series_id, revision in (j.split("\x1f") for j in doc["keys"])
    ]


def _dead_letter(cur: sqlite3.Cursor, items: Iterable[tuple[Sequence[str], str, str]]) -> int:
    """Mark rows dead, each item ``(key, code, message)``; the message is redacted."""
    cur.executemany(_REJECT, ((code, redact(msg), k[0], k[1], k[2]) for k, code, msg in items))
    return max(cur.rowcount, 0)
