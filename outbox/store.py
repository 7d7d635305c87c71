"""The SQLite outbox: tables, and every SQL statement the worker runs.

Semantics (the contract every stage relies on):

* ``observations`` is keyed by ``(series_id, ts)``. :meth:`Store.stage` upserts rows;
  a row whose revision equals the stored one is not written at all (no timestamp
  moves, ``total_changes()`` does not move). A new revision goes back to ``pending``
  with ``attempts = 0`` - even one equal to ``acked_revision`` (EIA flipped a value and
  flipped it back): the revision in between may have reached GridPulse without its ack
  being recorded (a crash after the 2xx), so only sending again makes GridPulse's copy
  certain.
* Watermarks advance in the same transaction as the rows they cover, and never move
  backwards, so a kill at any instant leaves rows and watermarks consistent.
* ``stream_progress`` records how far EIA has been asked for a stream and answered
  completely; it advances in the transaction of a request's last page and never moves
  backwards either.
* A ``meta`` key ``history:<stream>`` records that a stream's history before that hour
  is still to be fetched (its first rows reached back to the start of the window asked);
  it is written with those rows and cleared with the last page of that history.
* :meth:`Store.ack`, :meth:`Store.reject` and :meth:`Store.defer` only touch a row whose
  current revision is the one that was sent; a revision staged meanwhile stays pending.
* Delivered-through of a series is the newest ``ts`` such that every staged row at or
  before it is ``acked`` or ``dead``.

Write transactions start with ``BEGIN IMMEDIATE`` so that a writer waits on the busy
timeout instead of failing a lock upgrade ("database is locked"). The hot paths
(stage, claim, ack) run ``executemany`` on the DB-API cursor of the SQLAlchemy
connection, inside the transaction SQLAlchemy began.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, overload

import orjson
from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool

from outbox.crash import crashpoint
from outbox.errors import DiskFullError, NoOutboxError, OutboxFullError, StoreError
from outbox.redact import redact
from outbox.timeutil import now_ts, parse_ts

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 60_000
SQLITE_FULL = 13  # "database or disk is full": no space for the file, or max_page_count
# WAL pages between checkpoints (SQLite's default is 1,000, 4 MB). Consecutive batches of
# acks, and of staged pages, rewrite mostly the same B-tree leaves (a few hours of every
# series); a checkpoint copies each page once however often it was rewritten since the
# last one, so a longer interval copies far less: acking 400k rows 13.5 -> 9.7 us a row.
WAL_AUTOCHECKPOINT_PAGES = 10_000
# datetimes, dataclasses and the like must not reach SQLite as orjson spells them.
_JSON_STRICT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
# Readers never wait on writers in WAL mode; this only covers WAL recovery by another process.
READ_BUSY_TIMEOUT_MS = 5_000
READ_MMAP_BYTES = 1 << 32  # address space, not memory: only pages read are resident
PAGE_ENCODING = "zlib"
PAGE_LEVEL = 1  # zlib level of stored pages (see docs/performance.md)
STATES = ("pending", "acked", "dead")
# The error of a run whose process died without recording its end (see Store.start_run).
PROCESS_GONE = "process gone"
QUALITY_FLAGS = ("good", "estimated", "missing")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

pages = Table(
    "pages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("run_id", Integer, nullable=True),
    Column("route", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("page_no", Integer, nullable=False),
    Column("page_offset", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("row_count", Integer, nullable=False),
    Column("fetched_at", Text, nullable=False),
    Column("encoding", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("series_id", Text, primary_key=True),
    Column("ba", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("subtype", Text, nullable=True),
    Column("units", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("facets", Text, nullable=False),
    Column("first_seen", Text, nullable=False),
)

observations = Table(
    "observations",
    metadata,
    Column("series_id", Text, primary_key=True),
    Column("ts", Text, primary_key=True),
    Column("value", Float, nullable=True),
    Column("units", Text, nullable=False),
    Column("quality_flag", Text, nullable=False),
    Column("revision", Text, nullable=False),
    Column(
        "page_id",
        Integer,
        ForeignKey("pages.id", deferrable=True, initially="DEFERRED"),
        nullable=True,
    ),
    Column("page_row", Integer, nullable=True),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Text, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_error_code", Text, nullable=True),
    Column("fetched_at", Text, nullable=False),
    Column("acked_at", Text, nullable=True),
    Column("acked_revision", Text, nullable=True),
    CheckConstraint("state IN ('pending', 'acked', 'dead')", name="state"),
    CheckConstraint("quality_flag IN ('good', 'estimated', 'missing')", name="quality_flag"),
    CheckConstraint("value IS NOT NULL OR quality_flag = 'missing'", name="value_or_missing"),
    sqlite_with_rowid=False,
)
# `state` is the last column of both partial indexes although each holds one state: SQLite
# does not count a partial index as covering a query that names `state` otherwise, and
# reads the table row of every entry (migration 0002).
Index(
    "ix_observations_pending_due",
    observations.c.ts,
    observations.c.series_id,
    observations.c.next_attempt_at,
    observations.c.state,
    sqlite_where=text("state = 'pending'"),
)
Index(
    "ix_observations_dead",
    observations.c.series_id,
    observations.c.ts,
    observations.c.state,
    sqlite_where=text("state = 'dead'"),
)

# The CHECK constraints of observations that _pass_checks mirrors in Python. When the rows
# of a page pass them there, SQLite is told to skip them (PRAGMA ignore_check_constraints)
# for the page's upsert: evaluating them costs SQLite about a fifth of a staged row. A
# CHECK added to the table but not mirrored here turns that off.
_MIRRORED_CHECKS = frozenset(
    {
        "state IN ('pending', 'acked', 'dead')",
        "quality_flag IN ('good', 'estimated', 'missing')",
        "value IS NOT NULL OR quality_flag = 'missing'",
    }
)
_CHECKS_MIRRORED = {
    str(c.sqltext) for c in observations.constraints if isinstance(c, CheckConstraint)
} == set(_MIRRORED_CHECKS)
_QUALITY_FLAG_SET = frozenset(QUALITY_FLAGS)

watermarks = Table(
    "watermarks",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("respondent", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("last_ts", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)

# Per stream, the newest hour EIA has been asked for and answered completely (the last
# page of the request staged, never past now - the dataset's publication lag). A stream
# EIA has no rows for has no watermark; this is where its next incremental run starts.
stream_progress = Table(
    "stream_progress",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("respondent", Text, nullable=False),
    Column("asked_through", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stage", Text, nullable=False),
    Column("started_at", Text, nullable=False),
    Column("finished_at", Text, nullable=True),
    Column("status", Text, nullable=False),
    Column("counts", Text, nullable=False, server_default=text("'{}'")),
    Column("error", Text, nullable=True),
    Column("pid", Integer, nullable=True),
    CheckConstraint("status IN ('running', 'ok', 'failed')", name="status"),
)
Index("ix_runs_stage_started_at", runs.c.stage, runs.c.started_at)

checked_gaps = Table(
    "checked_gaps",
    metadata,
    Column("series_id", Text, primary_key=True),
    Column("ts", Text, primary_key=True),
    Column("checked_at", Text, nullable=False),
    sqlite_with_rowid=False,
)

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

# Batch acknowledgements recorded but not yet applied to their rows (see Store.record_outcome):
# a send records a batch's acks in one small row before its next POST, and applies them to
# observations while that POST is in flight. Empty whenever no send is running, unless a
# send was killed; the next send applies what it finds first.
ack_log = Table(
    "ack_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("acked_at", Text, nullable=False),
    Column("keys", Text, nullable=False),  # JSON [[series_id, ts, revision], ...]
)

# The revision ledger: one row per revision that replaced a staged row's value, quality
# flag or units, written by the trigger tr_observations_revised (migration 0006) in the
# upsert's own statement; a new row fires nothing.
revisions = Table(
    "revisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_id", Text, nullable=False),
    Column("ts", Text, nullable=False),
    Column("old_value", Float, nullable=True),
    Column("new_value", Float, nullable=True),
    Column("old_revision", Text, nullable=False),
    Column("new_revision", Text, nullable=False),
    Column("old_quality_flag", Text, nullable=False),
    Column("new_quality_flag", Text, nullable=False),
    Column("old_units", Text, nullable=False),
    Column("new_units", Text, nullable=False),
    Column("seen_at", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)
Index("ix_revisions_series_id_ts", revisions.c.series_id, revisions.c.ts)
Index("ix_revisions_seen_at", revisions.c.seen_at)

# What the data-quality rules found (outbox/quality). ``key`` is rule|ba|series|start, the
# identity a re-check updates (last_seen) instead of adding a row.
findings = Table(
    "findings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, unique=True),
    Column("rule", Text, nullable=False),
    Column("ba", Text, nullable=False),
    Column("series_id", Text, nullable=True),
    Column("start", Text, nullable=False),
    Column("end", Text, nullable=False),
    Column("severity", Text, nullable=False),
    Column("measured", Float, nullable=True),
    Column("expected", Float, nullable=True),
    Column("detail", Text, nullable=False),
    Column("first_seen", Text, nullable=False),
    Column("last_seen", Text, nullable=False),
    Column("resolved_at", Text, nullable=True),
    CheckConstraint("severity IN ('info', 'warn', 'crit')", name="severity"),
)
Index("ix_findings_rule_ba_start", findings.c.rule, findings.c.ba, findings.c.start)
Index("ix_findings_end", findings.c.end)

# meta key prefix of a stream's history marker (Store.history_markers).
HISTORY_PREFIX = "history:"

_ROW_CONFLICT = """
ON CONFLICT (series_id, ts) DO UPDATE SET
    value = excluded.value, units = excluded.units, quality_flag = excluded.quality_flag,
    revision = excluded.revision, page_row = excluded.page_row, page_id = excluded.page_id,
    fetched_at = excluded.fetched_at, state = 'pending',
    attempts = 0, next_attempt_at = NULL, last_error = NULL, last_error_code = NULL
WHERE observations.revision <> excluded.revision
"""
_UPSERT = f"""
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, page_row,
                          page_id, fetched_at, state, attempts)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0)
{_ROW_CONFLICT}"""
_SERIES_INSERT = """
INSERT OR IGNORE INTO series (series_id, ba, type, subtype, units, route, facets, first_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
_WATERMARK_UPSERT = """
INSERT INTO watermarks (stream, dataset, respondent, route, last_ts, updated_at, run_id)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (stream) DO UPDATE SET
    last_ts = excluded.last_ts, updated_at = excluded.updated_at, run_id = excluded.run_id
WHERE excluded.last_ts > watermarks.last_ts
"""
_PROGRESS_UPSERT = """
INSERT INTO stream_progress (stream, dataset, respondent, asked_through, updated_at, run_id)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (stream) DO UPDATE SET
    asked_through = excluded.asked_through, updated_at = excluded.updated_at,
    run_id = excluded.run_id
WHERE excluded.asked_through > stream_progress.asked_through
"""
# Bulk forms of the three statements above, used by Store.stage: one statement over a JSON
# array of row arrays (json_each) instead of an executemany. SQLite then does a page in one
# step, without a Python round trip per row, and the GIL stays released for the whole page
# (the fetch pipeline normalizes the next page meanwhile). Same statements, same order of
# rows, so the same outcome row by row. Units and quality flag that are the same on every
# row come as ?4/?5 (NULL otherwise), and ?6 says "page_row is the row's position".
_UPSERT_JSON = f"""
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, page_row,
                          page_id, fetched_at, state, attempts)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       coalesce(?4, json_extract(value, '$[3]')), coalesce(?5, json_extract(value, '$[4]')),
       json_extract(value, '$[5]'), CASE WHEN ?6 THEN key ELSE json_extract(value, '$[6]') END,
       ?1, ?2, 'pending', 0
FROM json_each(?3) WHERE true
{_ROW_CONFLICT}"""
_UPSERT_JSON_RETURNING = _UPSERT_JSON + "RETURNING series_id, ts"
# Whether an upsert of these rows would write anything: a key not staged yet, or staged
# with another revision (exactly the rows _ROW_CONFLICT does not skip).
_ANY_CHANGE_JSON = """
SELECT 1 FROM json_each(?) AS j
WHERE NOT EXISTS (SELECT 1 FROM observations AS o
                  WHERE o.series_id = json_extract(j.value, '$[0]')
                    AND o.ts = json_extract(j.value, '$[1]')
                    AND o.revision = json_extract(j.value, '$[5]'))
LIMIT 1
"""
_SERIES_INSERT_JSON = """
INSERT OR IGNORE INTO series (series_id, ba, type, subtype, units, route, facets, first_seen)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]'), ?1
FROM json_each(?2)
"""
_WATERMARK_UPSERT_JSON = """
INSERT INTO watermarks (stream, dataset, respondent, route, last_ts, updated_at, run_id)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), ?1, ?2
FROM json_each(?3) WHERE true
ON CONFLICT (stream) DO UPDATE SET
    last_ts = excluded.last_ts, updated_at = excluded.updated_at, run_id = excluded.run_id
WHERE excluded.last_ts > watermarks.last_ts
"""
_INSERT_PAGE = """
INSERT INTO pages (id, run_id, route, params, url, page_no, page_offset, total, row_count,
                   fetched_at, encoding, body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_CLAIM = """
SELECT o.series_id, o.ts, o.value, o.units, o.quality_flag, o.revision, o.attempts,
       s.ba, s.type, s.subtype, o.page_id, o.page_row
FROM observations o INDEXED BY ix_observations_pending_due
JOIN series s ON s.series_id = o.series_id
WHERE o.state = 'pending' AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)
ORDER BY o.ts, o.series_id
LIMIT ?
"""
# The same, behind a (ts, series_id) key: a sender with a batch in flight claims the next
# one from where that batch ends (a range seek on the pending index, not a re-scan).
_CLAIM_AFTER = """
SELECT o.series_id, o.ts, o.value, o.units, o.quality_flag, o.revision, o.attempts,
       s.ba, s.type, s.subtype, o.page_id, o.page_row
FROM observations o INDEXED BY ix_observations_pending_due
JOIN series s ON s.series_id = o.series_id
WHERE o.state = 'pending' AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)
  AND (o.ts, o.series_id) > (?, ?)
ORDER BY o.ts, o.series_id
LIMIT ?
"""
# The newest due row: the circuit breaker's probe when the refused batch holds no other row.
_NEWEST_DUE = """
SELECT o.series_id, o.ts, o.value, o.units, o.quality_flag, o.revision, o.attempts,
       s.ba, s.type, s.subtype, o.page_id, o.page_row
FROM observations o INDEXED BY ix_observations_pending_due
JOIN series s ON s.series_id = o.series_id
WHERE o.state = 'pending' AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)
ORDER BY o.ts DESC, o.series_id DESC
LIMIT 1
"""
_ACK = """
UPDATE observations SET state = 'acked', acked_revision = revision, acked_at = ?,
       last_error = NULL, last_error_code = NULL, next_attempt_at = NULL
WHERE series_id = ? AND ts = ? AND revision = ? AND state = 'pending'
"""
# _ACK over a JSON array of [series_id, ts, revision] keys, in one statement (see
# _UPSERT_JSON): each key updates its row at most once, as one _ACK per key would.
_ACK_JSON = """
UPDATE observations SET state = 'acked', acked_revision = revision, acked_at = ?1,
       last_error = NULL, last_error_code = NULL, next_attempt_at = NULL
FROM (SELECT json_extract(value, '$[0]') AS key_series, json_extract(value, '$[1]') AS key_ts,
             json_extract(value, '$[2]') AS key_revision
      FROM json_each(?2)) AS k
WHERE observations.series_id = k.key_series AND observations.ts = k.key_ts
  AND observations.revision = k.key_revision AND observations.state = 'pending'
"""
_ACK_LOG_INSERT = "INSERT INTO ack_log (acked_at, keys) VALUES (?, ?)"
_AFTER_EVERY_TS = "~"  # sorts after every RFC 3339 timestamp: `ts < ?` bounds nothing
_REJECT = """
UPDATE observations SET state = 'dead', last_error_code = ?, last_error = ?,
       attempts = attempts + 1, next_attempt_at = NULL
WHERE series_id = ? AND ts = ? AND revision = ? AND state = 'pending'
"""
_DEFER = """
UPDATE observations SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
       last_error_code = ?
WHERE series_id = ? AND ts = ? AND revision = ? AND state = 'pending'
"""

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
_MARK_CHECKED = """
INSERT OR IGNORE INTO checked_gaps (series_id, ts, checked_at)
SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM observations WHERE series_id = ?1 AND ts = ?2)
"""
_COUNT_NEW_KEYS = """
SELECT count(*) FROM json_each(?) AS k
WHERE NOT EXISTS (SELECT 1 FROM observations o
                  WHERE o.series_id = json_extract(k.value, '$[0]')
                    AND o.ts = json_extract(k.value, '$[1]'))
"""
_PRUNE_ACKED = "DELETE FROM observations WHERE series_id = ? AND ts < ? AND state = 'acked'"
_PRUNE_REVISIONS = """
DELETE FROM revisions WHERE ts < ? AND NOT EXISTS
    (SELECT 1 FROM observations o WHERE o.series_id = revisions.series_id AND o.ts = revisions.ts)
"""
AUTO_VACUUM_MODES = {0: "none", 1: "full", 2: "incremental"}
# The key of ``runs.counts`` that holds a run's measured duration in seconds.
RUN_SECONDS = "seconds"

ROW_COLUMNS = ("series_id", "ts", "value", "units", "quality_flag", "revision", "page_row")
SERIES_COLUMNS = ("series_id", "ba", "type", "subtype", "units", "route", "facets")


@dataclass(frozen=True)
class PageRecord:
    """One raw source response, secrets already removed from ``body``/``params``/``url``."""

    route: str
    params: Mapping[str, Any]
    url: str
    page_no: int
    offset: int
    total: int
    row_count: int
    body: bytes
    compressed: bytes | None = field(default=None, repr=False, compare=False)
    """``body`` as stored (zlib), when :meth:`precompress` made it ahead of the stage."""

    def precompress(self) -> PageRecord:
        """This record with its stored form computed now (zlib releases the GIL), so that
        :meth:`Store.stage` does not compress inside its transaction."""
        return replace(self, compressed=zlib.compress(self.body, PAGE_LEVEL))

    def detached(self) -> PageRecord:
        """This record without ``body`` once it is compressed (all a stage stores), so
        that it crosses a process boundary small."""
        return self if self.compressed is None else replace(self, body=b"")


@dataclass(frozen=True)
class RowBatch:
    """Observation rows made ready for :meth:`Store.stage` ahead of its transaction.

    :meth:`of` does the per-row Python work of a stage (the JSON array SQLite reads the
    rows from, the checks that let SQLite skip the CHECK constraints), so that a caller
    can do it on another thread while the previous page is being staged. Staging a
    RowBatch has exactly the outcome of staging its ``rows``.
    """

    rows: list[Sequence[Any]]
    json: bytes | None
    """The rows as one JSON array; None when a row does not travel as JSON exactly."""
    units: str | None
    """The units of every row when they all have the same, else None."""
    quality_flag: str | None
    """The quality flag of every row when they all have the same, else None."""
    row_is_position: bool
    """Whether every row's ``page_row`` is its position in ``rows``."""
    checked: bool
    """Whether every row passes the CHECK constraints of ``observations`` (checked here)."""

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]]) -> RowBatch:
        """Encode ``rows`` (tuples in :data:`ROW_COLUMNS` order)."""
        rows = rows if isinstance(rows, list) else list(rows)
        encoded = _json_rows(rows, value_at=2)
        return cls(
            rows=rows,
            json=encoded,
            units=_same(rows, 3),
            quality_flag=_same(rows, 4),
            row_is_position=list(map(itemgetter(6), rows)) == list(range(len(rows))),
            checked=encoded is not None and _pass_checks(rows),
        )

    def detached(self) -> RowBatch:
        """This batch without its row tuples when ``json`` carries them, so that it
        crosses a process boundary small; reading :attr:`rows` then decodes ``json``."""
        if self.json is None or isinstance(self.rows, EncodedRows):
            return self
        return replace(self, rows=EncodedRows(self.json, len(self.rows)))


class EncodedRows(Sequence[Sequence[Any]]):
    """The rows of a :class:`RowBatch` kept only as its JSON, decoded on first read
    (a stage reads them only near ``housekeeping.max_rows``)."""

    __slots__ = ("_decoded", "json", "n")

    def __init__(self, encoded: bytes, n: int) -> None:
        self.json = encoded
        self.n = n
        self._decoded: list[Any] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if self._decoded is None:
            self._decoded = orjson.loads(self.json)
        return self._decoded[index]

    def __reduce__(self) -> tuple[type[EncodedRows], tuple[bytes, int]]:
        return (EncodedRows, (self.json, self.n))


@dataclass(frozen=True)
class WatermarkUpdate:
    """Advance ``stream`` (``dataset:respondent``) to ``last_ts`` if that is newer."""

    stream: str
    dataset: str
    respondent: str
    route: str
    last_ts: str


@dataclass(frozen=True)
class ProgressUpdate:
    """Record that EIA answered ``stream`` completely through ``asked_through``, if newer."""

    stream: str
    dataset: str
    respondent: str
    asked_through: str


@dataclass(frozen=True)
class StageResult:
    """What one :meth:`Store.stage` call wrote."""

    written: int
    page_id: int | None
    offered: int


class Claimed(NamedTuple):
    """A pending row as the sender needs it (row + its series' identity)."""

    series_id: str
    ts: str
    value: float | None
    units: str
    quality_flag: str
    revision: str
    attempts: int
    ba: str
    type: str
    subtype: str | None
    page_id: int | None
    page_row: int | None


class Key(NamedTuple):
    """The identity of one sent row: (series_id, ts) at one revision."""

    series_id: str
    ts: str
    revision: str


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


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``."""

    id: int
    stage: str
    started_at: str
    finished_at: str | None
    status: str
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = None

    @property
    def gone(self) -> bool:
        """Whether the run's process died without recording its end (SIGKILL, OOM, power)."""
        return self.status == "failed" and (self.error or "").startswith(PROCESS_GONE)

    def as_gone(self) -> RunRecord:
        """This run as failed because its process is gone (its end stays unknown)."""
        return replace(self, status="failed", error=gone_error(self.pid))


def gone_error(pid: int | None) -> str:
    """``process gone (pid 4711)``: the error of a run whose process died."""
    return f"{PROCESS_GONE} (pid {pid})" if pid else PROCESS_GONE


@dataclass(frozen=True)
class RunSummary:
    """The recent history of one stage, for status: read newest first, stops at an ok run."""

    last: RunRecord | None
    last_finished: RunRecord | None
    last_ok: RunRecord | None
    consecutive_failures: int


@dataclass
class SizeLimit:
    """The ceiling :meth:`Store.stage` enforces (``housekeeping.max_rows``/``max_bytes``).

    ``rows`` is counted once when the limit is set and then grows by what each stage
    call writes (a revised row counts as growth: an upper bound, so the limit errs on
    the side of refusing). A page that would pass a limit is rolled back whole.
    """

    max_rows: int | None = None
    max_bytes: int | None = None
    rows: int = 0
    min_free_bytes: int | None = None
    """Free bytes a page must leave on the file system of the outbox (the floor)."""


@dataclass(frozen=True)
class FileStats:
    """Size of the outbox file in SQLite pages (the WAL file is not included)."""

    page_size: int
    page_count: int
    freelist_count: int
    auto_vacuum: str

    @property
    def bytes(self) -> int:
        """The main database file's size."""
        return self.page_size * self.page_count

    @property
    def free_bytes(self) -> int:
        """Bytes in free pages: reused by new rows, or handed back by a vacuum."""
        return self.page_size * self.freelist_count


class WriteGroup:
    """One write transaction shared by several :meth:`Store.write` blocks of a thread.

    Committing a page of rows costs SQLite a WAL append of every B-tree page it touched;
    consecutive pages of one request touch mostly the same leaves, so committing several
    at once writes them once (see docs/performance.md).
    """

    def __init__(self, engine: Engine, path: Path | None = None) -> None:
        self.engine = engine
        self.path = path
        self.thread = threading.get_ident()
        self._conn: Connection | None = None
        self._open = False
        self._broken = False
        self._on_commit: list[Callable[[], None]] = []
        self.before_commit: Callable[[Connection], None] | None = None

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the blocks written so far are committed; never if they
        roll back (so a count of staged rows counts only rows that stayed)."""
        self._on_commit.append(action)

    @contextmanager
    def savepoint(self) -> Iterator[Connection]:
        """One write block: a savepoint of the group's transaction."""
        if self._broken:
            raise StoreError("an earlier write of this group failed and rolled it back")
        if self._conn is None:
            self._conn = self.engine.connect()
            self._conn.execution_options(outbox_write=True)
        conn = self._conn
        if not self._open:
            conn.begin()
            self._open = True
        conn.exec_driver_sql("SAVEPOINT outbox_write")
        try:
            yield conn
        except BaseException:
            self._undo(conn)
            raise
        conn.exec_driver_sql("RELEASE outbox_write")

    def _undo(self, conn: Connection) -> None:
        try:
            conn.exec_driver_sql("ROLLBACK TO outbox_write")
            conn.exec_driver_sql("RELEASE outbox_write")
        except (DatabaseError, sqlite3.Error):
            # SQLite rolled the whole transaction back itself (disk full, I/O error):
            # the blocks before this one are gone with it, watermarks included.
            self._broken = True
            self._rollback()

    def commit(self) -> None:
        """Commit every write block so far (nothing to do when there is none).

        ``before_commit`` runs first, in the same transaction; if it fails the whole
        group rolls back (the quality checks of its rows go with them, or neither).
        """
        actions, self._on_commit = self._on_commit, []
        if self._open and self._conn is not None:
            if self.before_commit is not None:
                try:
                    self.before_commit(self._conn)
                except BaseException:
                    self._broken = True
                    self._rollback()
                    raise
            self._open = False
            with disk_full_as_error(self.path or "the outbox"):
                self._conn.commit()
        for action in actions:
            action()

    def _rollback(self) -> None:
        self._on_commit = []
        if self._open and self._conn is not None:
            self._open = False
            with suppress(DatabaseError, sqlite3.Error):
                self._conn.rollback()

    def close(self) -> None:
        """Commit what completed (unless the transaction broke) and release the connection."""
        try:
            if self._broken:
                self._rollback()
            else:
                self.commit()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def disk_free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free (to this user) on the file system that holds the file ``path``, or
    None when its directory cannot be asked (it does not exist)."""
    try:
        return shutil.disk_usage(Path(path).absolute().parent).free
    except OSError:
        return None


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """SQLAlchemy URL of an outbox file."""
    return f"sqlite:///{Path(path)}"


def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # Takes effect on a new file (before the first table) and at the next VACUUM of an old
    # one; housekeeping then hands freed pages back with incremental_vacuum.
    # Setting it takes the write lock: only when it is not set yet, so that a connection
    # opened while another one writes (a write group, another process) does not wait.
    if cursor.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        cursor.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode and str(mode[0]).lower() != "wal":
        raise StoreError(f"cannot switch the outbox to WAL mode (got {mode[0]!r})")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA cache_size = -65536")
    cursor.execute("PRAGMA temp_store = MEMORY")
    cursor.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


def _on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("outbox_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(path: str | os.PathLike[str]) -> Engine:
    """An engine for the outbox file with our pragmas and explicit BEGIN handling."""
    engine = create_engine(sqlite_url(path), connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return engine


def _on_connect_readonly(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # No journal_mode/synchronous pragmas: they are settings a writer owns.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {READ_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA query_only = ON")
    cursor.execute("PRAGMA cache_size = -65536")
    # Status seeks a few table pages per series: mapped pages save a read() per page
    # (status.read on a 10M-row outbox in a fresh process: ~0.18 s mapped, ~0.23 s not).
    cursor.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")
    cursor.execute("PRAGMA temp_store = MEMORY")
    cursor.close()


def make_readonly_engine(path: str | os.PathLike[str]) -> Engine:
    """An engine that opens the file with ``mode=ro``: it can never write the database.

    A read-write connection that closes last checkpoints the WAL into the main file;
    a ``mode=ro`` one does not, so ``status`` leaves ``outbox.db`` byte-for-byte as it was.
    """
    uri = Path(path).resolve().as_uri() + "?mode=ro"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(
            uri, uri=True, timeout=READ_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    event.listen(engine, "connect", _on_connect_readonly)
    event.listen(engine, "begin", _on_begin)
    return engine


@contextmanager
def file_lock(path: str | os.PathLike[str], *, blocking: bool) -> Iterator[bool]:
    """An ``flock`` on ``path``: yields False when another process holds it (non-blocking).

    The kernel drops the lock when the process dies, so SIGKILL leaves no stale lock.
    """
    with disk_full_as_error(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        with disk_full_as_error(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def lock_file(database: str | os.PathLike[str], name: str) -> Path:
    """The lock file of one stage (``send``, ``fetch``) beside the database file."""
    path = Path(database)
    return path.with_name(f"{path.name}.{name}.lock")


def lock_held(path: str | os.PathLike[str]) -> bool:
    """Whether a process holds the lock file ``path`` now.

    Reads only: a missing file is a free lock and is not created, and the file is not
    written (a shared ``flock`` probe, released at once). A lock file this user cannot
    read counts as held: nobody is declared gone on a guess.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid holding the lock file ``path``, or None when nobody holds it or its pid
    cannot be read (reads only): to tell the two apart, ask :func:`lock_held`."""
    if not lock_held(path):
        return None
    return lock_pid(path)


def lock_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid written in the lock file ``path``, or None when it cannot be read (a file
    of mode 0600 owned by another user, none written yet). Says nothing of whether the
    lock is held: see :func:`lock_held`."""
    try:
        return int(Path(path).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


# Files a writing command opens for writing beside the database (SQLite's and the stages').
WRITTEN_COMPANIONS = ("-wal", "-shm", ".fetch.lock", ".send.lock", ".migrate.lock")


@dataclass(frozen=True)
class WriteProblem:
    """Why the outbox cannot be written by this process, and what would fix it."""

    cause: str
    hint: str

    def __str__(self) -> str:
        return f"{self.cause}: {self.hint}"


def write_problem(database: str | os.PathLike[str]) -> WriteProblem | None:
    """Why this process cannot write the outbox at ``database``, or None when it can.

    Checks the file, each companion that exists (``-wal``, ``-shm``, the lock files) and
    the directory (SQLite creates ``-wal``/``-shm`` there): ``PATH: not writable by USER
    (owned by OWNER, mode 0644)``, or ``on a read-only file system``. A missing file is
    no problem unless its directory cannot be written.
    """
    path = Path(database)
    directory = path.parent
    if _read_only_fs(directory):
        hint = "remount it read-write, or set `database` to a path on a writable one"
        return WriteProblem(f"{path}: read-only: on a read-only file system", hint)
    candidates = [path, *(Path(f"{path}{suffix}") for suffix in WRITTEN_COMPANIONS)]
    for candidate in candidates:
        if candidate.exists() and not _writable(candidate):
            return _not_writable(candidate)
    if directory.is_dir() and not _writable(directory):
        return _not_writable(directory, what="directory ")
    return None


def readonly_reason(database: str | os.PathLike[str], exc: BaseException) -> WriteProblem | None:
    """The cause of SQLite's "attempt to write a readonly database" (or of a denied
    open) as :func:`write_problem` names it; None when ``exc`` is another error."""
    text = _short(exc)
    if "readonly database" not in text.lower() and "permission denied" not in text.lower():
        return None
    found = write_problem(database)
    if found is not None:
        return found
    hint = "check the ownership and mode of it, its -wal/-shm and its directory"
    return WriteProblem(f"{database}: read-only ({text})", hint)


def _writable(path: Path) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK, effective_ids=effective)


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _not_writable(path: Path, what: str = "") -> WriteProblem:
    user = _user_name(os.geteuid())
    try:
        info = path.stat()
    except OSError:
        return WriteProblem(f"{what}{path}: not writable by {user}", "run as its owner")
    owner = _user_name(info.st_uid)
    cause = (
        f"{what}{path}: not writable by {user} (owned by {owner}, mode {info.st_mode & 0o777:04o})"
    )
    return WriteProblem(cause, f"run as {owner}, or `chown {user} {path}`")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class StageChecker(Protocol):
    """What :meth:`Store.stage` calls, inside its transaction, after writing rows
    (the data-quality engine, outbox.quality.engine.Checker)."""

    def check(
        self,
        cur: sqlite3.Cursor,
        keys: list[tuple[str, str]],
        revised_after: int,
        run_id: int | None,
        now: str,
    ) -> None:
        """Judge the rows ``keys`` just written (ledger rows after id ``revised_after``)."""

    def defer(
        self, keys: list[tuple[str, str]], revised_after: int, run_id: int | None, now: str
    ) -> None:
        """Remember rows a stage in a write group wrote, to judge at :meth:`flush`."""

    def deferred(self) -> bool:
        """Whether rows wait for :meth:`flush`."""
        ...

    def flush(self, cur: sqlite3.Cursor) -> None:
        """Judge every deferred row (the write group is about to commit)."""


class Store:
    """The outbox database. Open it with :meth:`Store.open`; close it with :meth:`close`."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self.engine = engine
        self.size_limit: SizeLimit | None = None
        self.checker: StageChecker | None = None
        self._group: WriteGroup | None = None
        # Monotonic start of each run this process started and is timing (see start_run).
        self._run_clocks: dict[int, float] = {}

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, migrate: bool = True, create: bool = True
    ) -> Store:
        """Open (and, with ``migrate``, upgrade) the outbox at ``path``.

        With ``create`` a missing outbox is created (fetch, ``db upgrade``); without it a
        missing one raises :class:`NoOutboxError` and nothing is created, not even a lock
        or ``-wal`` file (every command that only reads or works on existing rows).
        """
        path = Path(path)
        if not create and not path.exists():
            raise NoOutboxError(path)
        if path.parent and not path.parent.exists():
            raise StoreError(f"{path}: directory {path.parent} does not exist")
        problem = write_problem(path)
        if problem is not None:
            raise StoreError(f"{problem}; nothing changed")
        engine = make_engine(path)
        store = cls(path, engine)
        try:
            with disk_full_as_error(path):
                if migrate:
                    from outbox.migrate import ensure_schema

                    ensure_schema(store)
                else:
                    store.schema_version()
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            engine.dispose()
            raise StoreError(f"{path}: not a usable outbox database: {_short(exc)}") from None
        except BaseException:
            engine.dispose()
            raise
        return store

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing outbox for reading only: no migration, no write, no checkpoint.

        Raises NoOutboxError when nothing is at ``path``, StoreError when it is not a
        SQLite database.
        """
        path = Path(path)
        if not path.exists():
            raise NoOutboxError(path)
        if not path.is_file():
            raise StoreError(f"{path}: not a usable outbox database: not a file")
        store = cls(path, make_readonly_engine(path))
        try:
            store.schema_version()
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            store.close()
            # Reading a WAL database needs its -shm, which SQLite may have to create.
            denied = readonly_reason(path, exc)
            if denied is not None:
                reading = "and reading a WAL outbox needs write access"
                raise StoreError(f"{denied.cause}, {reading}: {denied.hint}") from None
            raise StoreError(f"{path}: not a usable outbox database: {_short(exc)}") from None
        return store

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success.

        Inside :meth:`write_group`, in the thread that opened it, this is a savepoint of
        the group's transaction instead: released on success, rolled back on error, and
        committed with the group.
        """
        with disk_full_as_error(self.path):
            group = self._group
            if group is not None and group.thread == threading.get_ident():
                with group.savepoint() as conn:
                    yield conn
                return
            with self.engine.connect() as conn:
                conn.execution_options(outbox_write=True)
                with conn.begin():
                    yield conn

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once what this thread wrote is committed: at once outside a
        :meth:`write_group` (every :meth:`write` commits), else when the group commits,
        and never for blocks that roll back."""
        group = self._group
        if group is not None and group.thread == threading.get_ident():
            group.on_commit(action)
        else:
            action()

    @contextmanager
    def write_group(self) -> Iterator[WriteGroup]:
        """Let the writes of this thread share one transaction until ``group.commit()``.

        Each :meth:`write` block is a savepoint in it, all or nothing as before; the
        group commits what completed when it ends, on an error too (a failed block has
        already been undone), so an error leaves exactly what separate transactions
        would have left. A kill loses the uncommitted blocks together, which is safe for
        blocks that carry their own watermark advances (:meth:`stage`).
        """
        if self._group is not None:
            raise StoreError("write groups do not nest")
        group = WriteGroup(self.engine, self.path)
        group.before_commit = self._flush_checks
        self._group = group
        try:
            yield group
        finally:
            self._group = None
            with disk_full_as_error(self.path):
                group.close()

    def _flush_checks(self, conn: Connection) -> None:
        """Run the quality checks deferred by the stages of a write group (before it commits)."""
        checker = self.checker
        if checker is not None and checker.deferred():
            cur = self.cursor(conn)
            checker.flush(cur)
            cur.close()
            crashpoint("stage.checked")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot; never blocks writers (WAL)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn
            conn.rollback()

    @staticmethod
    def cursor(conn: Connection) -> sqlite3.Cursor:
        """The DB-API cursor of ``conn`` (for executemany on hot paths)."""
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def lock_path(self, name: str) -> Path:
        """The lock file of one stage (``send``, ``fetch``) beside the database."""
        return lock_file(self.path, name)

    def schema_version(self) -> str | None:
        """The Alembic revision stamped in the file, or None when unstamped."""
        with self.read() as conn:
            try:
                row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
            except OperationalError:
                return None
        return row[0] if row else None

    # -- fetch side ----------------------------------------------------------------

    def stage(
        self,
        rows: Iterable[Sequence[Any]] | RowBatch,
        *,
        series_rows: Iterable[Sequence[Any]] = (),
        page: PageRecord | None = None,
        watermark_updates: Iterable[WatermarkUpdate] = (),
        progress_updates: Iterable[ProgressUpdate] = (),
        history_updates: Mapping[str, str | None] | None = None,
        run_id: int | None = None,
        now: str | None = None,
    ) -> StageResult:
        """Upsert observation rows, the page they came from, watermarks, stream
        progress and history markers (stream -> hour, None to clear; see
        :meth:`history_markers`) atomically.

        ``rows`` are tuples in :data:`ROW_COLUMNS` order (or a :class:`RowBatch` of
        them); ``series_rows`` in :data:`SERIES_COLUMNS` order. The page is stored only
        when at least one row was written (an unchanged re-fetch writes nothing at all).
        Under a :meth:`limit_size` ceiling, a page that would pass it raises
        OutboxFullError and nothing of it is written.
        """
        now = now or now_ts()
        limit = self.size_limit
        prepared = rows if isinstance(rows, RowBatch) else RowBatch.of(rows)
        rows, batch = prepared.rows, prepared.json
        with self.write() as conn:
            cur = self.cursor(conn)
            growth = self._check_rows(cur, limit, rows) if limit is not None else None
            pages_before = (
                _one(cur, "PRAGMA page_count")
                if limit and (limit.max_bytes or limit.min_free_bytes)
                else 0
            )
            page_id = None
            if page is not None:
                page_id = cur.execute("SELECT coalesce(max(id), 0) + 1 FROM pages").fetchone()[0]
            _insert_series(cur, [tuple(s) for s in series_rows], now)
            checker = self.checker
            keys: list[tuple[str, str]] = []
            if batch is None:
                # The page goes in first here too: the revision ledger's trigger reads the
                # run of a revised row from its page.
                if page is not None:
                    _insert_page(cur, page_id, run_id, page, now)
                revised_after = _last_revision_id(cur) if checker is not None else 0
                written = self._upsert_rows(cur, rows, page_id, now)
                if page is not None and not written:
                    cur.execute("DELETE FROM pages WHERE id = ?", (page_id,))
                if written and checker is not None:
                    keys = [(r[0], r[1]) for r in rows]
                crashpoint("stage.rows_written")
            elif page is None or cur.execute(_ANY_CHANGE_JSON, (batch,)).fetchone():
                # The page goes in before its rows: inserted after them, SQLite would scan
                # all of observations (no index on page_id) to settle the deferred key.
                if page is not None:
                    _insert_page(cur, page_id, run_id, page, now)
                revised_after = _last_revision_id(cur) if checker is not None else 0
                if checker is None:
                    written = _upsert_json(cur, prepared, page_id, now)
                else:
                    keys = _upsert_json(cur, prepared, page_id, now, returning=True)
                    written = len(keys)
                if page is not None and not written:  # cannot happen: the check saw a change
                    cur.execute("DELETE FROM pages WHERE id = ?", (page_id,))
                crashpoint("stage.rows_written")
            else:
                written = 0  # every row is staged with this revision: nothing to write
                crashpoint("stage.rows_written")
            grouped = self._group is not None and self._group.thread == threading.get_ident()
            if written and checker is not None and not grouped:
                # Same transaction: a row a rule dead-letters is never claimed before.
                checker.check(cur, keys, revised_after, run_id, now)
                crashpoint("stage.checked")
            _upsert_watermarks(cur, [_mark_row(w) for w in watermark_updates], now, run_id)
            _upsert_progress(cur, progress_updates, now, run_id)
            for stream, before in (history_updates or {}).items():
                _set_meta(cur, HISTORY_PREFIX + stream, before)
            if limit is not None and written:
                self._check_bytes(cur, limit, pages_before)
            cur.close()
            crashpoint("stage.before_commit")
        if written and checker is not None and grouped:
            # In a write group the checks run once, on every page's rows, before it commits.
            checker.defer(keys, revised_after, run_id, now)
        if limit is not None:
            limit.rows += written if growth is None else growth
        return StageResult(written=written, page_id=page_id if written else None, offered=len(rows))

    @staticmethod
    def _upsert_rows(
        cur: sqlite3.Cursor, rows: Sequence[Sequence[Any]], page_id: int | None, now: str
    ) -> int:
        """The row-by-row upsert, for rows that do not encode as JSON."""
        cur.executemany(_UPSERT, ((*row, page_id, now) for row in rows))
        return max(cur.rowcount, 0)

    def watermarks(self) -> dict[str, str]:
        """stream -> last fully staged ts."""
        with self.read() as conn:
            rows = conn.exec_driver_sql("SELECT stream, last_ts FROM watermarks").all()
        return {r[0]: r[1] for r in rows}

    def stream_progress(self) -> dict[str, str]:
        """stream -> newest hour EIA has been asked for and answered completely."""
        with self.read() as conn:
            rows = conn.exec_driver_sql("SELECT stream, asked_through FROM stream_progress")
            return {r[0]: r[1] for r in rows.all()}

    def history_markers(self) -> dict[str, str]:
        """stream -> the hour before which its history is still to be fetched.

        Recorded when a stream's first rows reach back to the start of the window that
        was asked (EIA may hold older hours too), in the transaction of those rows;
        cleared with the last page of the windows that fetch the older hours.
        """
        with self.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                (len(HISTORY_PREFIX), HISTORY_PREFIX),
            ).all()
        return {r[0].removeprefix(HISTORY_PREFIX): r[1] for r in rows}

    def progress_rows(self) -> list[dict[str, Any]]:
        """Every stream_progress row as a dict (for status; none on a schema from before
        the table, which status may read before an upgrade)."""
        with self.read() as conn:
            if not _has_table(conn, "stream_progress"):
                return []
            table = stream_progress
            result = conn.execute(table.select().order_by(table.c.stream))
            return [dict(r._mapping) for r in result]

    def watermark_rows(self) -> list[dict[str, Any]]:
        """Every watermark row as a dict (for status)."""
        with self.read() as conn:
            result = conn.execute(watermarks.select().order_by(watermarks.c.stream))
            return [dict(r._mapping) for r in result]

    # -- send side -----------------------------------------------------------------

    def claim(
        self, limit: int, now: str | None = None, after: tuple[str, str] | None = None
    ) -> list[Claimed]:
        """Up to ``limit`` pending rows due at ``now``, oldest ts first, then series_id.

        With ``after`` (a ``(ts, series_id)`` key), only rows ordered after that key.
        """
        now = now or now_ts()
        with self.read() as conn:
            cur = self.cursor(conn)
            if after is None:
                rows = cur.execute(_CLAIM, (now, limit)).fetchall()
            else:
                rows = cur.execute(_CLAIM_AFTER, (now, after[0], after[1], limit)).fetchall()
            cur.close()
        return [Claimed._make(r) for r in rows]

    def newest_due(self, now: str | None = None) -> Claimed | None:
        """The pending row due at ``now`` ordered last (newest ts, then series_id), if any."""
        with self.read() as conn:
            cur = self.cursor(conn)
            row = cur.execute(_NEWEST_DUE, (now or now_ts(),)).fetchone()
            cur.close()
        return Claimed._make(row) if row is not None else None

    def ack(self, keys: Iterable[Sequence[str]], now: str | None = None) -> int:
        """Mark sent rows ``acked``; rows whose revision changed meanwhile stay pending."""
        now = now or now_ts()
        with self.write() as conn:
            return _ack(self.cursor(conn), keys, now)

    def reject(
        self, items: Iterable[tuple[Sequence[str], str, str]], now: str | None = None
    ) -> int:
        """Dead-letter rows: each item is (key, code, message)."""
        with self.write() as conn:
            return _dead_letter(self.cursor(conn), items)

    def record_outcome(
        self,
        acked: Iterable[Sequence[str]],
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
        keys = [(k[0], k[1], k[2]) for k in acked]
        with self.write() as conn:
            cur = self.cursor(conn)
            dead = _dead_letter(cur, rejected)
            if keys:
                cur.execute(_ACK_LOG_INSERT, (now, orjson.dumps(keys).decode()))
            cur.close()
            crashpoint("settle.before_commit")
        return dead

    def apply_acks(self) -> int:
        """Mark the rows of every recorded batch acknowledgement ``acked``; returns how
        many rows changed (a row revised since it was sent stays pending, as with
        :meth:`ack`). Safe to call at any time, from one thread at a time."""
        with self.read() as conn:  # the usual case: nothing recorded, no write lock taken
            if conn.exec_driver_sql("SELECT 1 FROM ack_log LIMIT 1").first() is None:
                return 0
        with self.write() as conn:
            cur = self.cursor(conn)
            logged = cur.execute("SELECT id, acked_at, keys FROM ack_log ORDER BY id").fetchall()
            acked = 0
            for _id, acked_at, keys in logged:
                acked += max(cur.execute(_ACK_JSON, (acked_at, keys)).rowcount, 0)
            if logged:
                cur.execute("DELETE FROM ack_log WHERE id <= ?", (logged[-1][0],))
                crashpoint("acks.before_commit")
            cur.close()
        return acked

    def unapplied_acks(self) -> int:
        """Rows whose acknowledgement is recorded but not yet applied (0 on a schema from
        before ``ack_log``, which status may read before an upgrade)."""
        with self.read() as conn:
            if not _has_table(conn, "ack_log"):
                return 0
            return int(
                conn.exec_driver_sql(
                    "SELECT coalesce(sum(json_array_length(keys)), 0) FROM ack_log"
                ).scalar()
                or 0
            )

    def defer(
        self,
        keys: Iterable[Sequence[str]],
        next_attempt_at: str,
        error: str,
        code: str | None = None,
    ) -> int:
        """Leave rows pending but not due before ``next_attempt_at``; record the error."""
        error = redact(error)
        with self.write() as conn:
            return self._executemany(
                conn, _DEFER, ((next_attempt_at, error, code, k[0], k[1], k[2]) for k in keys)
            )

    def has_deferred(self, code: str) -> bool:
        """Whether any pending row waits on a deferral recorded with ``code``.

        The deferred rows are found in the pending index alone (it covers the test); only
        their table rows are read for ``last_error_code``, not one per pending row.
        """
        with self.read() as conn:
            return (
                conn.exec_driver_sql(
                    "SELECT 1 FROM observations AS d INDEXED BY ix_observations_pending_due"
                    " JOIN observations AS o ON o.series_id = d.series_id AND o.ts = d.ts"
                    " WHERE d.state = 'pending' AND d.next_attempt_at IS NOT NULL"
                    " AND o.last_error_code = ? LIMIT 1",
                    (code,),
                ).first()
                is not None
            )

    def clear_deferred(self, code: str) -> int:
        """Make rows deferred with ``code`` due now (the cause went away)."""
        with self.write() as conn:
            return conn.exec_driver_sql(
                "UPDATE observations SET next_attempt_at = NULL"
                " WHERE (series_id, ts) IN (SELECT series_id, ts FROM observations"
                "   INDEXED BY ix_observations_pending_due"
                "   WHERE state = 'pending' AND next_attempt_at IS NOT NULL)"
                " AND state = 'pending' AND next_attempt_at IS NOT NULL"
                " AND last_error_code = ?",
                (code,),
            ).rowcount

    def next_retry_at(self) -> str | None:
        """The earliest next_attempt_at of a deferred pending row."""
        with self.read() as conn:
            return conn.exec_driver_sql(
                "SELECT min(next_attempt_at) FROM observations"
                " INDEXED BY ix_observations_pending_due"
                " WHERE state = 'pending' AND next_attempt_at IS NOT NULL"
            ).scalar()

    def count_due(self, now: str | None = None) -> int:
        """How many pending rows are due at ``now``."""
        with self.read() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM observations INDEXED BY ix_observations_pending_due"
                    " WHERE state = 'pending'"
                    " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
                    (now or now_ts(),),
                ).scalar()
                or 0
            )

    def count_deferred(self, now: str | None = None) -> tuple[int, str | None]:
        """Pending rows not due before a later time than ``now``, and the earliest such time."""
        with self.read() as conn:
            found = conn.exec_driver_sql(
                "SELECT count(*), min(next_attempt_at) FROM observations"
                " INDEXED BY ix_observations_pending_due"
                " WHERE state = 'pending' AND next_attempt_at > ?",
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
            "UPDATE observations SET state = 'pending', attempts = 0, next_attempt_at = NULL"
            f" WHERE {' AND '.join(clauses)}"
        )
        with self.write() as conn:
            return conn.exec_driver_sql(sql, tuple(params)).rowcount

    @staticmethod
    def _executemany(conn: Connection, sql: str, params: Iterable[Sequence[Any]]) -> int:
        cur = Store.cursor(conn)
        cur.executemany(sql, params)
        count = max(cur.rowcount, 0)
        cur.close()
        return count

    # -- reading -------------------------------------------------------------------

    def series_states(self, pending: bool = True) -> list[SeriesState]:
        """Per-series pending/dead counts, newest staged/acked and delivered-through.

        The pending index is scanned once (counts, oldest ts and earliest retry time
        together); everything else is a primary-key seek per series: one when the newest
        row of the series is acknowledged and none is pending (the steady state).

        With ``pending=False`` only the dead counts and the newest staged row are read:
        the pending fields are 0 or None, and newest acked and delivered-through are None.
        That costs no more with millions of rows pending (the per-series pending counts
        sort the pending index: seconds at 10M pending); the monitoring probe needs no
        more.
        """
        with self.read() as conn:
            cur = self.cursor(conn)
            pend = (
                {
                    r[0]: (r[1], r[2], r[3])
                    for r in cur.execute(
                        "SELECT series_id, count(*), min(ts), min(next_attempt_at)"
                        " FROM observations INDEXED BY ix_observations_pending_due"
                        " WHERE state = 'pending' GROUP BY series_id"
                    )
                }
                if pending
                else {}
            )
            dead = dict(
                cur.execute(
                    "SELECT series_id, count(*) FROM observations WHERE state = 'dead'"
                    " GROUP BY series_id"
                ).fetchall()
            )
            out = []
            for sid, ba, typ, sub in cur.execute(
                "SELECT series_id, ba, type, subtype FROM series ORDER BY series_id"
            ).fetchall():
                n_pending, oldest, retry = pend.get(sid, (0, None, None))
                newest, newest_state = cur.execute(
                    "SELECT ts, state FROM observations WHERE series_id = ?"
                    " ORDER BY ts DESC LIMIT 1",
                    (sid,),
                ).fetchone() or (None, None)
                acked = delivered = None  # not read for the probe (pending=False)
                if pending:
                    acked = newest
                    if newest_state not in ("acked", None):
                        acked = self._newest_acked(cur, sid, n_pending, oldest, newest)
                    delivered = (
                        newest if oldest is None else self._delivered_through(cur, sid, oldest)
                    )
                out.append(
                    SeriesState(
                        series_id=sid,
                        ba=ba,
                        type=typ,
                        subtype=sub,
                        pending=n_pending,
                        dead=dead.get(sid, 0),
                        newest_staged=newest,
                        newest_acked=acked,
                        delivered_through=delivered,
                        oldest_pending=oldest,
                        next_attempt_at=retry,
                    )
                )
            cur.close()
        return out

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
        return _one(
            cur,
            "SELECT ts FROM observations WHERE series_id = ?"
            " AND state = 'acked' AND ts < ? ORDER BY ts DESC LIMIT 1",
            (sid, oldest if filled else _AFTER_EVERY_TS),
        )

    @staticmethod
    def _delivered_through(cur: sqlite3.Cursor, sid: str, oldest_pending: str) -> str | None:
        return _one(
            cur,
            "SELECT ts FROM observations WHERE series_id = ? AND ts < ? ORDER BY ts DESC LIMIT 1",
            (sid, oldest_pending),
        )

    def delivered_through(self) -> dict[str, str | None]:
        """series_id -> delivered-through ts (None when nothing is delivered yet)."""
        return {s.series_id: s.delivered_through for s in self.series_states()}

    def counts(self) -> dict[str, int]:
        """Rows per state (pending and dead from their indexes; acked by difference)."""
        with self.read() as conn:
            cur = self.cursor(conn)
            pending = _one(
                cur,
                "SELECT count(*) FROM observations INDEXED BY ix_observations_pending_due"
                " WHERE state = 'pending'",
            )
            dead = _one(
                cur,
                "SELECT count(*) FROM observations INDEXED BY ix_observations_dead"
                " WHERE state = 'dead'",
            )
            cur.close()
        return {"pending": int(pending or 0), "dead": int(dead or 0)}

    def count_state(self, state: str) -> int:
        """Rows in ``state`` (a full count: for tests, the demo and small outboxes)."""
        with self.read() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM observations WHERE state = ?", (state,)
                ).scalar()
                or 0
            )

    def row(self, series_id: str, ts: str) -> dict[str, Any] | None:
        """One observation with its states, or None."""
        with self.read() as conn:
            found = conn.execute(
                observations.select().where(
                    observations.c.series_id == series_id, observations.c.ts == ts
                )
            ).first()
        return dict(found._mapping) if found else None

    def page_body(self, page_id: int) -> tuple[dict[str, Any], bytes] | None:
        """A stored page's metadata and its decompressed body."""
        with self.read() as conn:
            found = conn.execute(pages.select().where(pages.c.id == page_id)).first()
        if not found:
            return None
        info = dict(found._mapping)
        body = info.pop("body")
        return info, zlib.decompress(body) if info["encoding"] == "zlib" else body

    def total_changes(self, conn: Connection) -> int:
        """SQLite's total_changes() of ``conn`` (for tests of no-write re-stage)."""
        return int(conn.exec_driver_sql("SELECT total_changes()").scalar() or 0)

    # -- meta ----------------------------------------------------------------------

    def meta_get(self, key: str) -> str | None:
        """A value from the ``meta`` key/value table (progress markers and the like)."""
        with self.read() as conn:
            return conn.exec_driver_sql("SELECT value FROM meta WHERE key = ?", (key,)).scalar()

    def meta_set(self, key: str, value: str | None) -> None:
        """Set (or, with None, delete) a ``meta`` value."""
        with self.write() as conn:
            if value is None:
                conn.exec_driver_sql("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.exec_driver_sql(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    # -- runs ----------------------------------------------------------------------

    def start_run(self, stage: str, now: str | None = None) -> int:
        """Record the start of a run; returns its id.

        Without ``now`` the run is timed on the monotonic clock from here to
        :meth:`finish_run`, which stores the measured duration as ``counts.seconds``:
        ``started_at``/``finished_at`` keep whole seconds (the format every reader knows).

        Call it holding the stage's lock (:meth:`lock_path`). A run of the stage still
        ``running`` then belongs to a process that is gone (SIGKILL, out of memory, power
        loss): a live one would hold the lock. Each such run is recorded as failed,
        ``process gone (pid N)``, with the time it was found as its ``finished_at``.
        """
        timed = now is None
        now = now or now_ts()
        with self.write() as conn:
            cur = self.cursor(conn)
            gone = cur.execute(
                "SELECT id, pid FROM runs WHERE stage = ? AND status = 'running'", (stage,)
            ).fetchall()
            cur.executemany(
                "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                [(now, gone_error(pid), run_id) for run_id, pid in gone],
            )
            cur.execute(
                "INSERT INTO runs (stage, started_at, status, counts, pid)"
                " VALUES (?, ?, 'running', '{}', ?)",
                (stage, now, os.getpid()),
            )
            run_id = int(cur.lastrowid or 0)
            cur.close()
        if timed:
            self._run_clocks[run_id] = time.monotonic()
        for gone_id, pid in gone:
            log.warning(
                "earlier run recorded as failed: process gone gone_run=%d pid=%s",
                gone_id,
                pid,
            )
        return run_id

    def finish_run(
        self,
        run_id: int,
        status: str,
        counts: Mapping[str, Any],
        error: str | None = None,
        now: str | None = None,
    ) -> None:
        """Record a run's outcome (error text is redacted).

        A run :meth:`start_run` timed gets its measured duration as ``counts.seconds``
        (unless ``now`` is given: then the timestamps alone say how long it took).
        """
        counts = dict(counts)
        started = self._run_clocks.pop(run_id, None)
        if started is not None and now is None:
            counts[RUN_SECONDS] = round(time.monotonic() - started, 3)
        with self.write() as conn:
            conn.exec_driver_sql(
                "UPDATE runs SET finished_at = ?, status = ?, counts = ?, error = ? WHERE id = ?",
                (
                    now or now_ts(),
                    status,
                    json.dumps(counts, sort_keys=True, default=str),
                    redact(error) if error else None,
                    run_id,
                ),
            )

    def recent_runs(
        self, limit: int = 20, stage: str | None = None, failed: bool = False
    ) -> list[RunRecord]:
        """Newest runs first, each ``running`` one whose process is gone shown as failed.

        ``failed`` selects failed runs, the gone ones included (see :meth:`as_found`).
        """
        clauses, params = [], []
        if stage:
            clauses.append("stage = ?")
            params.append(stage)
        if failed:
            clauses.append("status IN ('failed', 'running')")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        records: list[RunRecord] = []
        with self.read() as conn:
            cur = self.cursor(conn)
            cur.execute(
                "SELECT id, stage, started_at, finished_at, status, counts, error, pid"
                f" FROM runs{where} ORDER BY id DESC" + ("" if failed else " LIMIT ?"),
                tuple(params) if failed else (*params, limit),
            )
            # With `failed`, read on to the limit-th failed run: every running one read
            # before it may turn out gone and come first.
            seen_failed = 0
            for r in cur:
                records.append(_run_record(r))
                seen_failed += records[-1].status == "failed"
                if failed and seen_failed >= limit:
                    break
            cur.close()
        records = self.as_found(records)
        if failed:
            records = [r for r in records if r.status == "failed"][:limit]
        return records

    def as_found(self, records: Sequence[RunRecord]) -> list[RunRecord]:
        """``records`` with each ``running`` run whose process is gone shown as failed.

        Writes nothing (status and ``runs`` read a read-only outbox); the next run of the
        stage records it (:meth:`start_run`). A run read as ``running`` is gone when its
        stage's lock is free and the run still shows ``running`` in a read after that:
        a live run holds the lock from before it is recorded until after it records its
        end, so a run that merely finished meanwhile is not mistaken for a dead one.
        """
        running = [r for r in records if r.status == "running"]
        if not running:
            return list(records)
        free = {r.stage for r in running if not lock_held(self.lock_path(r.stage))}
        suspects = [r.id for r in running if r.stage in free]
        if not suspects:
            return list(records)
        marks = ", ".join("?" * len(suspects))
        with self.read() as conn:
            still = {
                row[0]
                for row in conn.exec_driver_sql(
                    f"SELECT id FROM runs WHERE status = 'running' AND id IN ({marks})",
                    tuple(suspects),
                )
            }
        return [r.as_gone() if r.id in still else r for r in records]

    # -- status and doctor ---------------------------------------------------------

    def run_summary(self, stage: str) -> RunSummary:
        """Newest run, newest finished run, newest ok run, and failed runs since that one.

        Walks ``runs`` newest first (by rowid, ``+stage`` keeps the planner off the
        stage index) and stops at the first ok run, so it reads a handful of rows. A
        ``running`` run whose process is gone counts as failed (:meth:`as_found`).
        """
        records: list[RunRecord] = []
        with self.read() as conn:
            cur = self.cursor(conn)
            cur.execute(
                "SELECT id, stage, started_at, finished_at, status, counts, error, pid"
                " FROM runs WHERE +stage = ? ORDER BY id DESC",
                (stage,),
            )
            for r in cur:
                records.append(_run_record(r))
                if records[-1].status == "ok":
                    break
            cur.close()
        records = self.as_found(records)
        return RunSummary(
            last=records[0] if records else None,
            last_finished=next((r for r in records if r.status != "running"), None),
            last_ok=next((r for r in records if r.status == "ok"), None),
            consecutive_failures=sum(r.status == "failed" for r in records),
        )

    def count_pending(self) -> int:
        """How many rows are pending (a count of the pending index: no sort)."""
        with self.read() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM observations INDEXED BY ix_observations_pending_due"
                    " WHERE state = 'pending'"
                ).scalar()
                or 0
            )

    def queue_head(self) -> tuple[str, str, str] | None:
        """``(series_id, ts, fetched_at)`` of the oldest pending row (the send queue's head)."""
        with self.read() as conn:
            row = conn.exec_driver_sql(
                "SELECT series_id, ts, fetched_at FROM observations"
                " INDEXED BY ix_observations_pending_due WHERE state = 'pending'"
                " ORDER BY ts, series_id LIMIT 1"
            ).first()
        return (row[0], row[1], row[2]) if row else None

    def newest_before(self, series_ids: Iterable[str], before: str) -> str | None:
        """The newest ts earlier than ``before`` in any of ``series_ids`` (primary-key seeks)."""
        newest = None
        with self.read() as conn:
            cur = self.cursor(conn)
            for sid in series_ids:
                found = _one(
                    cur,
                    "SELECT ts FROM observations WHERE series_id = ? AND ts < ?"
                    " ORDER BY ts DESC LIMIT 1",
                    (sid, before),
                )
                if found is not None and (newest is None or found > newest):
                    newest = found
            cur.close()
        return newest

    def quick_check(self) -> list[str]:
        """``PRAGMA quick_check`` lines (``["ok"]`` for a sound file); StoreError if unreadable."""
        try:
            with self.read() as conn:
                return [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            raise StoreError(f"{self.path}: not a usable outbox database: {_short(exc)}") from None

    # -- size limit (housekeeping.max_rows / max_bytes) ----------------------------

    def limit_size(
        self, max_rows: int | None, max_bytes: int | None, min_free_bytes: int | None = None
    ) -> SizeLimit | None:
        """Make :meth:`stage` refuse, with OutboxFullError, a page that would pass a ceiling
        or leave less than ``min_free_bytes`` free on the outbox's file system.

        Rows are counted once here (only when ``max_rows`` is set); no limit clears it.
        """
        if max_rows is None and max_bytes is None and not min_free_bytes:
            self.size_limit = None
        else:
            rows = self.count_rows() if max_rows is not None else 0
            self.size_limit = SizeLimit(max_rows, max_bytes, rows, min_free_bytes or None)
        return self.size_limit

    def count_rows(self) -> int:
        """Every observation row (one pass over the primary key)."""
        with self.read() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM observations").scalar() or 0)

    @staticmethod
    def _check_rows(
        cur: sqlite3.Cursor, limit: SizeLimit, rows: Sequence[Sequence[Any]]
    ) -> int | None:
        """The rows a page adds when it could pass ``max_rows`` (None: it cannot)."""
        if limit.max_rows is None or limit.rows + len(rows) <= limit.max_rows:
            return None
        keys = json.dumps([[r[0], r[1]] for r in rows])
        new = int(_one(cur, _COUNT_NEW_KEYS, (keys,)) or 0)
        if limit.rows + new > limit.max_rows:
            raise OutboxFullError(
                f"outbox full: {limit.rows} rows staged and this page would add {new} "
                f"(housekeeping.max_rows = {limit.max_rows}); nothing was staged and nothing "
                "evicted: let `outbox send` deliver, `outbox prune` remove acknowledged rows, "
                "or raise the limit"
            )
        return new

    def _check_bytes(self, cur: sqlite3.Cursor, limit: SizeLimit, pages_before: int) -> None:
        """Refuse a page that grew the file past ``max_bytes``, or that leaves less than
        ``min_free_bytes`` free on the disk (its transaction rolls back)."""
        if limit.max_bytes is None and limit.min_free_bytes is None:
            return
        pages = int(_one(cur, "PRAGMA page_count") or 0)
        page_size = int(_one(cur, "PRAGMA page_size") or 0)
        self._check_free(limit, max(0, pages - pages_before) * page_size)
        size = pages * page_size
        if limit.max_bytes is None:
            return
        if pages > pages_before and size > limit.max_bytes:
            raise OutboxFullError(
                f"outbox full: staging this page would grow {self.path.name} to {size} bytes "
                f"(housekeeping.max_bytes = {limit.max_bytes}); nothing was staged and nothing "
                "evicted: let `outbox send` deliver, `outbox prune` remove acknowledged rows, "
                "or raise the limit"
            )

    def _check_free(self, limit: SizeLimit, growth: int) -> None:
        """Refuse a page that writes rows while the disk has (or would have, after the
        file grows by ``growth`` bytes) less than ``min_free_bytes`` free."""
        floor = limit.min_free_bytes
        free = disk_free_bytes(self.path) if floor else None
        if floor is None or free is None or free - growth >= floor:
            return
        raise OutboxFullError(
            f"disk space low: {free} bytes free on the file system of {self.path} and this "
            f"page needs about {growth} more (housekeeping.min_free_bytes = {floor}); nothing "
            "was staged and nothing evicted: free space on that disk, let `outbox send` "
            "deliver and `outbox prune` remove acknowledged rows, or lower the floor"
        )

    # -- gaps ----------------------------------------------------------------------

    def missing_hours(self, since: str = "", until: str = "9999") -> list[tuple[str, str]]:
        """``(series_id, ts)`` of every unchecked hour absent between two staged hours.

        Only hours in ``[since, until]`` are returned, ordered by series and ts.
        """
        with self.read() as conn:
            cur = self.cursor(conn)
            found = cur.execute(_MISSING_HOURS, {"lo": since, "hi": until}).fetchall()
            cur.close()
        return [(r[0], r[1]) for r in found]

    def series_sources(self) -> dict[str, tuple[str, dict[str, str]]]:
        """series_id -> (EIA route, EIA facets of the series) for every known series."""
        with self.read() as conn:
            found = conn.exec_driver_sql("SELECT series_id, route, facets FROM series").all()
        return {r[0]: (r[1], json.loads(r[2] or "{}")) for r in found}

    def mark_checked(self, hours: Iterable[tuple[str, str]], now: str | None = None) -> int:
        """Record the requested hours that are still absent as checked; returns how many."""
        now = now or now_ts()
        with self.write() as conn:
            return self._executemany(conn, _MARK_CHECKED, ((s, t, now) for s, t in hours))

    # -- report --------------------------------------------------------------------

    def ts_range(self) -> tuple[str | None, str | None]:
        """The oldest and newest staged hour of any series (bounds of the report's window)."""
        with self.read() as conn:
            row = conn.exec_driver_sql("SELECT min(ts), max(ts) FROM observations").one()
        return row[0], row[1]

    def values_between(
        self, since: str, until: str, glob: str = "*"
    ) -> list[tuple[str, str, float | None]]:
        """``(series_id, ts, value)`` of the rows with ``since <= ts <= until``, by series.

        ``glob`` filters series ids (SQLite GLOB: ``*``, ``?``, ``[...]``, case-sensitive).
        """
        with self.read() as conn:
            cur = self.cursor(conn)
            rows = cur.execute(
                "SELECT series_id, ts, value FROM observations"
                " WHERE ts >= ? AND ts <= ? AND series_id GLOB ? ORDER BY series_id, ts",
                (since, until, glob),
            ).fetchall()
            cur.close()
        return rows

    def flow_by_minute(self) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
        """Rows staged per minute (``fetched_at``) and acknowledged per minute (``acked_at``,
        with the newest hour acknowledged in that minute), of the rows still in the outbox.

        Cumulated, they give the backlog and the newest delivered hour over wall time.
        """
        with self.read() as conn:
            cur = self.cursor(conn)
            staged = cur.execute(
                "SELECT substr(fetched_at, 1, 16), count(*) FROM observations"
                " WHERE state != 'dead' GROUP BY 1 ORDER BY 1"
            ).fetchall()
            acked = cur.execute(
                "SELECT substr(acked_at, 1, 16), count(*), max(ts) FROM observations"
                " WHERE acked_at IS NOT NULL AND state != 'dead' GROUP BY 1 ORDER BY 1"
            ).fetchall()
            cur.close()
        return staged, acked

    # -- housekeeping --------------------------------------------------------------

    def prune_before(self, before: str, batch: int = 256) -> tuple[int, int, int]:
        """Delete acknowledged rows, checked gap hours and finished runs older than ``before``.

        Rows are matched on ``ts`` (pending and dead rows stay), one primary-key range per
        series, so only old rows are read; runs on ``started_at``. Returns (rows, checked
        gap hours, runs). Each transaction covers ``batch`` series, which keeps the WAL
        small when a first prune removes a lot.
        """
        with self.write() as conn:
            cur = self.cursor(conn)
            sids = [r[0] for r in cur.execute("SELECT series_id FROM series")]
            checked = cur.execute("DELETE FROM checked_gaps WHERE ts < ?", (before,)).rowcount
            runs = cur.execute(
                "DELETE FROM runs WHERE started_at < ? AND status <> 'running'", (before,)
            ).rowcount
            cur.close()
            rows = self._executemany(conn, _PRUNE_ACKED, ((sid, before) for sid in sids[:batch]))
        for i in range(batch, len(sids), batch):
            with self.write() as conn:
                rows += self._executemany(
                    conn, _PRUNE_ACKED, ((sid, before) for sid in sids[i : i + batch])
                )
        with self.write() as conn:
            # The ledger goes with its rows; findings about hours past retention go too.
            conn.exec_driver_sql(_PRUNE_REVISIONS, (before,))
            conn.exec_driver_sql('DELETE FROM findings WHERE "end" < ?', (before,))
        return rows, max(checked, 0), max(runs, 0)

    def sweep_pages(self, fetched_before: str | None = None, rows_before: str | None = None) -> int:
        """Delete raw pages that no observation points to; returns how many.

        Without bounds every page is checked against every row (one full scan). With
        both, only pages fetched before ``fetched_before`` are candidates and only rows
        with ts before ``rows_before`` are read (primary-key ranges): the caller picks
        bounds such that no newer row can come from an older page. Foreign-key checks are
        off for this one transaction: without an index on ``observations.page_id`` each
        deleted page would cost SQLite a full scan to verify it, and the references were
        just read under the same write lock.
        """
        with self._write_unchecked() as conn:
            cur = self.cursor(conn)
            if fetched_before is None or rows_before is None:
                cur.execute(
                    "DELETE FROM pages WHERE id NOT IN"
                    " (SELECT page_id FROM observations WHERE page_id IS NOT NULL)"
                )
                deleted = max(cur.rowcount, 0)
            else:
                deleted = self._sweep_old_pages(cur, fetched_before, rows_before)
            cur.close()
        return deleted

    @staticmethod
    def _sweep_old_pages(cur: sqlite3.Cursor, fetched_before: str, rows_before: str) -> int:
        found = cur.execute("SELECT id FROM pages WHERE fetched_at < ?", (fetched_before,))
        candidates = [r[0] for r in found]
        if not candidates:
            return 0
        referenced = {
            r[0]
            for r in cur.execute(
                "SELECT DISTINCT o.page_id FROM series s JOIN observations o"
                " ON o.series_id = s.series_id AND o.ts < ? WHERE o.page_id IS NOT NULL",
                (rows_before,),
            )
        }
        cur.executemany(
            "DELETE FROM pages WHERE id = ?", ((i,) for i in candidates if i not in referenced)
        )
        return max(cur.rowcount, 0)

    @contextmanager
    def _write_unchecked(self) -> Iterator[Connection]:
        """A write transaction with foreign-key enforcement off (restored afterwards)."""
        with disk_full_as_error(self.path), self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
            try:
                conn.execution_options(outbox_write=True)
                with conn.begin():
                    yield conn
            finally:
                raw.execute("PRAGMA foreign_keys = ON")  # type: ignore[union-attr]

    def file_stats(self) -> FileStats:
        """Page size, page count, free pages and auto_vacuum mode of the main file."""
        with self.read() as conn:
            cur = self.cursor(conn)
            size, count, free, mode = (
                int(_one(cur, f"PRAGMA {name}") or 0)
                for name in ("page_size", "page_count", "freelist_count", "auto_vacuum")
            )
            cur.close()
        return FileStats(size, count, free, AUTO_VACUUM_MODES.get(mode, str(mode)))

    def incremental_vacuum(self, pages: int = 0) -> None:
        """Hand up to ``pages`` free pages (0: all) back to the filesystem.

        Works when auto_vacuum is incremental; a no-op otherwise (see :meth:`vacuum`).
        """
        # Run to completion by sqlite3_exec (executescript, its own transaction): a
        # cursor's execute steps the pragma once, and each step frees a single page.
        with disk_full_as_error(self.path), self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.executescript(f"PRAGMA incremental_vacuum({int(pages)});")  # type: ignore[union-attr]

    def vacuum(self) -> None:
        """Rebuild the file (VACUUM): it shrinks, and an old file becomes auto_vacuum=incremental.

        Holds the write lock for the whole rebuild and needs free disk space about the
        size of the file.
        """
        with disk_full_as_error(self.path), self.engine.connect() as conn:
            conn.connection.driver_connection.execute("VACUUM")  # type: ignore[union-attr]

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy the WAL into the main file (``TRUNCATE`` also empties the -wal file)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        with disk_full_as_error(self.path), self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()  # type: ignore[union-attr]


def _json_rows(rows: Sequence[Sequence[Any]], value_at: int | None = None) -> bytes | None:
    """``rows`` as one JSON array for the ``json_each`` statements, or None when a row
    holds something JSON would not carry exactly as the DB-API binds it (the caller then
    falls back to executemany): a non-finite float at ``value_at`` (JSON has no inf/NaN),
    or a type orjson refuses.
    """
    if value_at is not None:
        try:
            if not math.isfinite(sum(v for r in rows if (v := r[value_at]) is not None)):
                return None
        except (TypeError, OverflowError):
            return None
    try:
        return orjson.dumps(rows, option=_JSON_STRICT)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None


def _same(rows: Sequence[Sequence[Any]], at: int) -> Any:
    """The value every row holds at ``at`` if they all hold the same string, else None."""
    values = set(map(itemgetter(at), rows))
    if len(values) == 1:
        value = values.pop()
        return value if type(value) is str else None
    return None


@overload
def _upsert_json(cur: sqlite3.Cursor, batch: RowBatch, page_id: int | None, now: str) -> int: ...
@overload
def _upsert_json(
    cur: sqlite3.Cursor, batch: RowBatch, page_id: int | None, now: str, *, returning: Literal[True]
) -> list[tuple[str, str]]: ...
def _upsert_json(
    cur: sqlite3.Cursor, batch: RowBatch, page_id: int | None, now: str, *, returning: bool = False
) -> int | list[tuple[str, str]]:
    """The bulk upsert; with ``returning``, the keys it wrote (for the quality checks)."""
    params = (page_id, now, batch.json, batch.units, batch.quality_flag, batch.row_is_position)
    if batch.checked:  # compiles the upsert without its CHECK code; OFF again right after
        cur.execute("PRAGMA ignore_check_constraints = ON")
    try:
        if returning:
            return cur.execute(_UPSERT_JSON_RETURNING, params).fetchall()
        return max(cur.execute(_UPSERT_JSON, params).rowcount, 0)
    finally:
        if batch.checked:
            cur.execute("PRAGMA ignore_check_constraints = OFF")


def _pass_checks(rows: Sequence[Sequence[Any]]) -> bool:
    """Whether every row passes the CHECK constraints of ``observations`` (checked here).

    ``state`` always does: the upsert writes 'pending' or 'acked'. Rows that fail are left
    to SQLite, which raises its IntegrityError as it always did.
    """
    if not _CHECKS_MIRRORED or not set(map(itemgetter(4), rows)) <= _QUALITY_FLAG_SET:
        return False
    return all(r[4] == "missing" for r in rows if r[2] is None)


def _dead_letter(cur: sqlite3.Cursor, items: Iterable[tuple[Sequence[str], str, str]]) -> int:
    """Mark rows dead, each item ``(key, code, message)``; the message is redacted."""
    cur.executemany(_REJECT, ((code, redact(msg), k[0], k[1], k[2]) for k, code, msg in items))
    return max(cur.rowcount, 0)


def _ack(cur: sqlite3.Cursor, keys: Iterable[Sequence[str]], now: str) -> int:
    keys = [(k[0], k[1], k[2]) for k in keys]
    batch = _json_rows(keys) if keys else None
    if batch is None:
        cur.executemany(_ACK, [(now, *k) for k in keys])
    else:
        cur.execute(_ACK_JSON, (now, batch))
    count = max(cur.rowcount, 0)
    cur.close()
    return count


def _mark_row(w: WatermarkUpdate) -> tuple[str, str, str, str, str]:
    return (w.stream, w.dataset, w.respondent, w.route, w.last_ts)


def _insert_series(cur: sqlite3.Cursor, rows: list[tuple[Any, ...]], now: str) -> None:
    if not rows:
        return
    batch = _json_rows(rows)
    if batch is None:
        cur.executemany(_SERIES_INSERT, [(*r, now) for r in rows])
    else:
        cur.execute(_SERIES_INSERT_JSON, (now, batch))


def _upsert_watermarks(
    cur: sqlite3.Cursor, rows: list[tuple[str, ...]], now: str, run_id: int | None
) -> None:
    if not rows:
        return
    batch = _json_rows(rows)
    if batch is None:
        cur.executemany(_WATERMARK_UPSERT, [(*r, now, run_id) for r in rows])
    else:
        cur.execute(_WATERMARK_UPSERT_JSON, (now, run_id, batch))


def _upsert_progress(
    cur: sqlite3.Cursor, updates: Iterable[ProgressUpdate], now: str, run_id: int | None
) -> None:
    rows = [(u.stream, u.dataset, u.respondent, u.asked_through, now, run_id) for u in updates]
    if rows:
        cur.executemany(_PROGRESS_UPSERT, rows)


def _set_meta(cur: sqlite3.Cursor, key: str, value: str | None) -> None:
    if value is None:
        cur.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        cur.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _insert_page(
    cur: sqlite3.Cursor, page_id: int | None, run_id: int | None, page: PageRecord, now: str
) -> None:
    stored = page.compressed
    if stored is None:
        stored = zlib.compress(page.body, PAGE_LEVEL)
    cur.execute(
        _INSERT_PAGE,
        (
            page_id,
            run_id,
            page.route,
            json.dumps(page.params, sort_keys=True, default=str),
            redact(page.url),
            page.page_no,
            page.offset,
            page.total,
            page.row_count,
            now,
            PAGE_ENCODING,
            stored,
        ),
    )


def _run_record(r: Sequence[Any]) -> RunRecord:
    return RunRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6], r[7])


def _last_revision_id(cur: sqlite3.Cursor) -> int:
    """The id of the newest ledger row: the ledger rows a stage adds come after it."""
    return int(_one(cur, "SELECT coalesce(max(id), 0) FROM revisions") or 0)


def _one(cur: sqlite3.Cursor, sql: str, params: Sequence[Any] = ()) -> Any:
    row = cur.execute(sql, params).fetchone()
    return row[0] if row else None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (sqlite3's, SQLAlchemy's wrapper of it, or an OSError) says the
    file system has no room: SQLITE_FULL ("database or disk is full") or ENOSPC."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, OSError):
        return orig.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return code == SQLITE_FULL or "database or disk is full" in str(orig)
    return False


@contextmanager
def disk_full_as_error(path: object) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into :class:`DiskFullError`."""
    try:
        yield
    except (DatabaseError, sqlite3.Error, OSError) as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]


def _has_table(conn: Connection, name: str) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return conn.exec_driver_sql(sql, (name,)).first() is not None


def _hours(older: str, newer: str) -> int:
    """Whole hours from ``older`` to ``newer`` (RFC 3339 ``...Z`` timestamps)."""
    return int((parse_ts(newer) - parse_ts(older)).total_seconds() // 3600)
