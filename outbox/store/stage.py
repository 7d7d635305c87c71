"""Staging: what the fetch side writes, and the watermarks and progress it reads back.

One :meth:`Staging.stage` call upserts a page's rows, the page itself, watermarks, stream
progress and history markers in one transaction (see the package docstring for the
rules). The hot path runs ``json_each`` statements (or ``executemany`` for rows that do
not travel as JSON) on the DB-API cursor, inside the transaction SQLAlchemy began.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

from sqlalchemy import Connection

from outbox.crash import crashpoint
from outbox.errors import OutboxFullError
from outbox.redact import redact
from outbox.store.engine import cursor, disk_free_bytes, executemany, has_table, one_value
from outbox.store.rows import (
    PAGE_LEVEL,
    PageRecord,
    ProgressUpdate,
    RowBatch,
    WatermarkUpdate,
    json_rows,
)
from outbox.store.schema import stream_progress, watermarks
from outbox.timeutil import now_ts

if TYPE_CHECKING:
    from outbox.store.handle import Store

PAGE_ENCODING = "zlib"
# meta key prefix of a stream's history marker (Staging.history_markers).
HISTORY_PREFIX = "history:"
# meta key prefix of a staged page's digest (Staging.known_digests): ':' is followed by ';'.
DIGEST_PREFIX = "page_digest:"
_DIGEST_END = "page_digest;"

# A row inserted, or updated to a new revision, is queued for sending by the triggers of
# migration 0008 (tr_observations_queued / _requeued) inside the same statement.
_ROW_CONFLICT = """
ON CONFLICT (series_id, ts) DO UPDATE SET
    value = excluded.value, units = excluded.units, quality_flag = excluded.quality_flag,
    revision = excluded.revision, page_row = excluded.page_row, page_id = excluded.page_id,
    fetched_at = excluded.fetched_at
WHERE observations.revision <> excluded.revision
"""
_UPSERT = f"""
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, page_row,
                          page_id, fetched_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
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
# Bulk forms of the three statements above, used by Staging.stage: one statement over a JSON
# array of row arrays (json_each) instead of an executemany. SQLite then does a page in one
# step, without a Python round trip per row, and the GIL stays released for the whole page
# (the fetch pipeline normalizes the next page meanwhile). Same statements, same order of
# rows, so the same outcome row by row. Each row is an array of JSON_COLUMNS (series_id,
# ts, value, revision, quality_flag, units, page_row), cut after the columns the batch
# binds once: units and quality flag that are the same on every row come as ?4/?5 (NULL
# otherwise), and ?6 says "page_row is the row's position" (an element left out is never
# read: coalesce and CASE stop before it).
_UPSERT_JSON = f"""
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, page_row,
                          page_id, fetched_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       coalesce(?4, json_extract(value, '$[5]')), coalesce(?5, json_extract(value, '$[4]')),
       json_extract(value, '$[3]'), CASE WHEN ?6 THEN key ELSE json_extract(value, '$[6]') END,
       ?1, ?2
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
                    AND o.revision = json_extract(j.value, '$[3]'))
LIMIT 1
"""
# Whether one row (series_id, ts, revision) is new or staged with another revision: when
# the first row of a page is, _ANY_CHANGE_JSON's answer is known without parsing the page.
_ROW_CHANGED = """
SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM observations
                           WHERE series_id = ? AND ts = ? AND revision = ?)
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
_MARK_CHECKED = """
INSERT OR IGNORE INTO checked_gaps (series_id, ts, checked_at)
SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM observations WHERE series_id = ?1 AND ts = ?2)
"""
# A page staged whole is remembered by its digest with the revision ledger's head at that
# moment: while the head has not moved (no row revised since) and no row was pruned (prune
# forgets every digest), staging the same page again would write nothing.
_REMEMBER_PAGE = """
INSERT INTO meta (key, value)
SELECT ?1, json_object('ledger', coalesce(max(id), 0), 'page', json(?2)) FROM revisions WHERE true
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
_KNOWN_DIGESTS = """
SELECT substr(key, ?1) FROM meta
WHERE key > ?2 AND key < ?3
  AND json_extract(value, '$.ledger') = (SELECT coalesce(max(id), 0) FROM revisions)
"""
_KNOWN_PAGE = """
SELECT json_extract(value, '$.page') FROM meta
WHERE key = ? AND json_extract(value, '$.ledger') = (SELECT coalesce(max(id), 0) FROM revisions)
"""
FORGET_PAGES = f"DELETE FROM meta WHERE key > '{DIGEST_PREFIX}' AND key < '{_DIGEST_END}'"
_COUNT_NEW_KEYS = """
SELECT count(*) FROM json_each(?) AS k
WHERE NOT EXISTS (SELECT 1 FROM observations o
                  WHERE o.series_id = json_extract(k.value, '$[0]')
                    AND o.ts = json_extract(k.value, '$[1]'))
"""


@dataclass(frozen=True)
class StageResult:
    """What one :meth:`Staging.stage` call wrote."""

    written: int
    page_id: int | None
    offered: int


@dataclass
class SizeLimit:
    """The ceiling :meth:`Staging.stage` enforces (``housekeeping.max_rows``/``max_bytes``).

    ``rows`` is counted once when the limit is set and then grows by what each stage
    call writes (a revised row counts as growth: an upper bound, so the limit errs on
    the side of refusing). A page that would pass a limit is rolled back whole.
    """

    max_rows: int | None = None
    max_bytes: int | None = None
    rows: int = 0
    min_free_bytes: int | None = None
    """Free bytes a page must leave on the file system of the outbox (the floor)."""


class StageChecker(Protocol):
    """What :meth:`Staging.stage` calls, inside its transaction, after writing rows
    (the data-quality engine, outbox.quality.engine.Checker)."""

    deferring: bool
    """Whether the checks only mark the hours written (:meth:`mark`), to judge them at
    the end of the run (no rule quarantines), instead of judging them (:meth:`check`)."""

    def mark(
        self,
        cur: sqlite3.Cursor,
        keys: list[tuple[str, str]],
        span: tuple[list[str], str, str] | None,
        revised_after: int,
        run_id: int | None,
        now: str,
    ) -> None:
        """Mark the hours written: ``span`` (BAs, first and last hour) when given, else
        those of ``keys``; judge the revisions recorded after id ``revised_after``."""

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


class Staging:
    """The fetch side of the outbox (``store.staging``): stage pages of rows, read back
    watermarks, stream progress and history markers, enforce the size ceiling."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.size_limit: SizeLimit | None = None
        self.checker: StageChecker | None = None
        # Series ids whose row a committed stage inserted (series rows are never deleted):
        # a page's series already among them are not offered to INSERT OR IGNORE again.
        self._series_staged: set[str] = set()

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
        hours: tuple[str, str] | None = None,
        remember: tuple[str, str] | None = None,
    ) -> StageResult:
        """Upsert observation rows, the page they came from, watermarks, stream
        progress and history markers (stream -> hour, None to clear; see
        :meth:`history_markers`) atomically.

        ``hours``: the first and last hour of the rows (the page's), when the caller
        knows them: deferred quality checks mark them for the series' BAs instead of
        reading back the keys written.

        ``rows`` are tuples in :data:`ROW_COLUMNS` order (or a :class:`RowBatch` of
        them); ``series_rows`` in :data:`SERIES_COLUMNS` order. The page is stored only
        when at least one row was written (an unchanged re-fetch writes nothing at all).
        Under a :meth:`limit_size` ceiling, a page that would pass it raises
        OutboxFullError and nothing of it is written. ``remember`` (digest, summary JSON)
        records, in the same transaction, that the page is staged whole
        (:meth:`known_digests`).
        """
        now = now or now_ts()
        limit = self.size_limit
        prepared = rows if isinstance(rows, RowBatch) else RowBatch.of(rows)
        rows = prepared.rows
        with self._store.write() as conn:
            cur = cursor(conn)
            growth = self._check_rows(cur, limit, rows) if limit is not None else None
            pages_before = (
                one_value(cur, "PRAGMA page_count")
                if limit and (limit.max_bytes or limit.min_free_bytes)
                else 0
            )
            page_id = None
            if page is not None:
                page_id = cur.execute("SELECT coalesce(max(id), 0) + 1 FROM pages").fetchone()[0]
            series = [tuple(s) for s in series_rows]
            known = self._series_staged
            _insert_series(cur, [s for s in series if s[0] not in known], now)
            checker = self.checker
            written, keys, revised_after = self._write_rows(
                cur, prepared, page, page_id, run_id, now
            )
            grouped = self._store.grouped()
            if written and checker is not None and (checker.deferring or not grouped):
                _judge_written(cur, checker, keys, rows, series, hours, revised_after, run_id, now)
            _upsert_watermarks(cur, [_mark_row(w) for w in watermark_updates], now, run_id)
            _upsert_progress(cur, progress_updates, now, run_id)
            for stream, before in (history_updates or {}).items():
                _set_meta(cur, HISTORY_PREFIX + stream, before)
            if limit is not None and written:
                self._check_bytes(cur, limit, pages_before)
            if remember is not None:  # after the rows: the ledger's head includes theirs
                cur.execute(_REMEMBER_PAGE, (DIGEST_PREFIX + remember[0], remember[1]))
            cur.close()
            crashpoint("stage.before_commit")
        added = {s[0] for s in series} - known
        if added:  # once the rows are committed (a write group's: when it commits)
            self._store.on_commit(lambda: known.update(added))
        if written and checker is not None and grouped and not checker.deferring:
            # In a write group the checks run once, on every page's rows, before it commits.
            checker.defer(keys, revised_after, run_id, now)
        if limit is not None:
            limit.rows += written if growth is None else growth
        return StageResult(written=written, page_id=page_id if written else None, offered=len(rows))

    def _write_rows(
        self,
        cur: sqlite3.Cursor,
        prepared: RowBatch,
        page: PageRecord | None,
        page_id: int | None,
        run_id: int | None,
        now: str,
    ) -> tuple[int, list[tuple[str, str]], int]:
        """The page and its rows: (rows written, their keys when a checker judges them,
        the newest ledger row id before them)."""
        checker = self.checker
        rows, batch = prepared.rows, prepared.json
        keys: list[tuple[str, str]] = []
        revised_after = 0
        if batch is None:
            # The page goes in first here too: the revision ledger's trigger reads the
            # run of a revised row from its page.
            if page is not None:
                _insert_page(cur, page_id, run_id, page, now)
            revised_after = _last_revision_id(cur) if checker is not None else 0
            written = _upsert_rows(cur, rows, page_id, now)
            if page is not None and not written:
                cur.execute("DELETE FROM pages WHERE id = ?", (page_id,))
            if written and checker is not None:
                keys = [(r[0], r[1]) for r in rows]
        elif page is None or _any_change(cur, prepared):
            # The page goes in before its rows: inserted after them, SQLite would scan
            # all of observations (no index on page_id) to settle the deferred key.
            if page is not None:
                _insert_page(cur, page_id, run_id, page, now)
            revised_after = _last_revision_id(cur) if checker is not None else 0
            if checker is None or checker.deferring:
                written = _upsert_json(cur, prepared, page_id, now)
            else:
                keys = _upsert_json(cur, prepared, page_id, now, returning=True)
                written = len(keys)
            if page is not None and not written:  # cannot happen: the check saw a change
                cur.execute("DELETE FROM pages WHERE id = ?", (page_id,))
        else:
            written = 0  # every row is staged with this revision: nothing to write
        crashpoint("stage.rows_written")
        return written, keys, revised_after

    def flush_checks(self, conn: Connection) -> None:
        """Run the quality checks deferred by the stages of a write group (before it commits)."""
        checker = self.checker
        if checker is not None and checker.deferred():
            cur = cursor(conn)
            checker.flush(cur)
            cur.close()
            crashpoint("stage.checked")

    def known_digests(self) -> set[str]:
        """Digests of the pages staged whole since the last revised or pruned row: staging
        one of them again would write nothing (see :meth:`known_page`)."""
        with self._store.read() as conn:
            rows = conn.exec_driver_sql(
                _KNOWN_DIGESTS, (len(DIGEST_PREFIX) + 1, DIGEST_PREFIX, _DIGEST_END)
            ).all()
        return {r[0] for r in rows}

    def known_page(self, digest: str) -> str | None:
        """The summary a page was remembered with (``stage(remember=...)``) if staging it
        again would still write nothing, else None. Read in the write transaction (a
        write group's, with what its earlier pages wrote), so that it holds when the
        caller stages in that transaction next."""
        with self._store.write() as conn:
            row = conn.exec_driver_sql(_KNOWN_PAGE, (DIGEST_PREFIX + digest,)).first()
        return None if row is None else str(row[0])

    def watermarks(self) -> dict[str, str]:
        """stream -> last fully staged ts."""
        with self._store.read() as conn:
            rows = conn.exec_driver_sql("SELECT stream, last_ts FROM watermarks").all()
        return {r[0]: r[1] for r in rows}

    def stream_progress(self) -> dict[str, str]:
        """stream -> newest hour EIA has been asked for and answered completely."""
        with self._store.read() as conn:
            rows = conn.exec_driver_sql("SELECT stream, asked_through FROM stream_progress")
            return {r[0]: r[1] for r in rows.all()}

    def history_markers(self) -> dict[str, str]:
        """stream -> the hour before which its history is still to be fetched.

        Recorded when a stream's first rows reach back to the start of the window that
        was asked (EIA may hold older hours too), in the transaction of those rows;
        cleared with the last page of the windows that fetch the older hours.
        """
        with self._store.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                (len(HISTORY_PREFIX), HISTORY_PREFIX),
            ).all()
        return {r[0].removeprefix(HISTORY_PREFIX): r[1] for r in rows}

    def progress_rows(self) -> list[dict[str, Any]]:
        """Every stream_progress row as a dict (for status; none on a schema from before
        the table, which status may read before an upgrade)."""
        with self._store.read() as conn:
            if not has_table(conn, "stream_progress"):
                return []
            table = stream_progress
            result = conn.execute(table.select().order_by(table.c.stream))
            return [dict(r._mapping) for r in result]

    def watermark_rows(self) -> list[dict[str, Any]]:
        """Every watermark row as a dict (for status)."""
        with self._store.read() as conn:
            result = conn.execute(watermarks.select().order_by(watermarks.c.stream))
            return [dict(r._mapping) for r in result]

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
        with self._store.read() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM observations").scalar() or 0)

    @staticmethod
    def _check_rows(
        cur: sqlite3.Cursor, limit: SizeLimit, rows: Sequence[Sequence[Any]]
    ) -> int | None:
        """The rows a page adds when it could pass ``max_rows`` (None: it cannot)."""
        if limit.max_rows is None or limit.rows + len(rows) <= limit.max_rows:
            return None
        keys = json.dumps([[r[0], r[1]] for r in rows])
        new = int(one_value(cur, _COUNT_NEW_KEYS, (keys,)) or 0)
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
        pages = int(one_value(cur, "PRAGMA page_count") or 0)
        page_size = int(one_value(cur, "PRAGMA page_size") or 0)
        self._check_free(limit, max(0, pages - pages_before) * page_size)
        size = pages * page_size
        if limit.max_bytes is None:
            return
        if pages > pages_before and size > limit.max_bytes:
            name = self._store.path.name
            raise OutboxFullError(
                f"outbox full: staging this page would grow {name} to {size} bytes "
                f"(housekeeping.max_bytes = {limit.max_bytes}); nothing was staged and nothing "
                "evicted: let `outbox send` deliver, `outbox prune` remove acknowledged rows, "
                "or raise the limit"
            )

    def _check_free(self, limit: SizeLimit, growth: int) -> None:
        """Refuse a page that writes rows while the disk has (or would have, after the
        file grows by ``growth`` bytes) less than ``min_free_bytes`` free."""
        floor = limit.min_free_bytes
        free = disk_free_bytes(self._store.path) if floor else None
        if floor is None or free is None or free - growth >= floor:
            return
        raise OutboxFullError(
            f"disk space low: {free} bytes free on the file system of {self._store.path} and this "
            f"page needs about {growth} more (housekeeping.min_free_bytes = {floor}); nothing "
            "was staged and nothing evicted: free space on that disk, let `outbox send` "
            "deliver and `outbox prune` remove acknowledged rows, or lower the floor"
        )

    def mark_checked(self, hours: Iterable[tuple[str, str]], now: str | None = None) -> int:
        """Record the requested hours that are still absent as checked; returns how many."""
        now = now or now_ts()
        with self._store.write() as conn:
            return executemany(conn, _MARK_CHECKED, ((s, t, now) for s, t in hours))


def _judge_written(
    cur: sqlite3.Cursor,
    checker: StageChecker,
    keys: list[tuple[str, str]],
    rows: Sequence[Sequence[Any]],
    series: list[tuple[Any, ...]],
    hours: tuple[str, str] | None,
    revised_after: int,
    run_id: int | None,
    now: str,
) -> None:
    """The checker's part of a stage, in its transaction (outside a write group, or
    deferring): mark the hours written, or judge the rows."""
    if checker.deferring:
        # No rule quarantines: mark the hours written, to judge at the run's end.
        span = (sorted({s[1] for s in series}), *hours) if hours and series else None
        if span is None and not keys:  # not told: every row offered
            keys = [(r[0], r[1]) for r in rows]
        checker.mark(cur, keys, span, revised_after, run_id, now)
    else:
        # Same transaction: a row a rule dead-letters is never claimed before.
        checker.check(cur, keys, revised_after, run_id, now)
    crashpoint("stage.checked")


def _any_change(cur: sqlite3.Cursor, batch: RowBatch) -> bool:
    """Whether upserting the rows would write any (a row new, or with another revision):
    the first row alone when it is one (a first stage), else every row."""
    if batch.first is not None and cur.execute(_ROW_CHANGED, batch.first).fetchone():
        return True
    return cur.execute(_ANY_CHANGE_JSON, (batch.json,)).fetchone() is not None


def _upsert_rows(
    cur: sqlite3.Cursor, rows: Sequence[Sequence[Any]], page_id: int | None, now: str
) -> int:
    """The row-by-row upsert, for rows that do not encode as JSON."""
    cur.executemany(_UPSERT, ((*row, page_id, now) for row in rows))
    return max(cur.rowcount, 0)


@overload
def _upsert_json(cur: sqlite3.Cursor, batch: RowBatch, page_id: int | None, now: str) -> int: ...
@overload
def _upsert_json(
    cur: sqlite3.Cursor, batch: RowBatch, page_id: int | None, now: str, *, returning: Literal[True]
) -> list[tuple[str, str]]: ...
def _upsert_json(
    cur: sqlite3.Cursor, batch: RowBatch, page_id: int | None, now: str, *, returning: bool = False
) -> int | list[tuple[str, str]]:
    """The bulk upsert; with ``returning``, the keys it wrote (for the quality checks).

    When :meth:`RowBatch.of` found every row passing the CHECKs of ``observations`` (its
    Python mirror, :func:`~outbox.store.rows._pass_checks`), SQLite is told to skip them
    for this one statement (~a quarter of the upsert's CPU): the pragma is set on the
    write connection right before it and cleared in ``finally``, so no other statement,
    and no later user of the pooled connection, runs without them. A batch with a row
    they refuse runs with them on, and SQLite refuses it (tests/test_stage_rows.py).
    """
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


def _mark_row(w: WatermarkUpdate) -> tuple[str, str, str, str, str]:
    return (w.stream, w.dataset, w.respondent, w.route, w.last_ts)


def _insert_series(cur: sqlite3.Cursor, rows: list[tuple[Any, ...]], now: str) -> None:
    if not rows:
        return
    batch = json_rows(rows)
    if batch is None:
        cur.executemany(_SERIES_INSERT, [(*r, now) for r in rows])
    else:
        cur.execute(_SERIES_INSERT_JSON, (now, batch))


def _upsert_watermarks(
    cur: sqlite3.Cursor, rows: list[tuple[str, ...]], now: str, run_id: int | None
) -> None:
    if not rows:
        return
    batch = json_rows(rows)
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


def _last_revision_id(cur: sqlite3.Cursor) -> int:
    """The id of the newest ledger row: the ledger rows a stage adds come after it."""
    return int(one_value(cur, "SELECT coalesce(max(id), 0) FROM revisions") or 0)
