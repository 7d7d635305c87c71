"""The SQLite outbox: tables, and every SQL statement the worker runs.

Semantics (the contract every stage relies on):

* ``observations`` is keyed by ``(series_id, ts)``. :meth:`Store.stage` upserts rows;
  a row whose revision equals the stored one is not written at all (no timestamp
  moves, ``total_changes()`` does not move). A new revision goes back to ``pending``
  with ``attempts = 0`` - unless it equals ``acked_revision`` (EIA flipped a value and
  flipped it back), which makes it ``acked`` again.
* Watermarks advance in the same transaction as the rows they cover, and never move
  backwards, so a kill at any instant leaves rows and watermarks consistent.
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

import fcntl
import json
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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

from outbox.crash import crashpoint
from outbox.errors import StoreError
from outbox.redact import redact
from outbox.timeutil import now_ts

BUSY_TIMEOUT_MS = 60_000
PAGE_ENCODING = "zlib"
STATES = ("pending", "acked", "dead")
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
Index(
    "ix_observations_pending_due",
    observations.c.ts,
    observations.c.series_id,
    observations.c.next_attempt_at,
    sqlite_where=text("state = 'pending'"),
)
Index(
    "ix_observations_dead",
    observations.c.series_id,
    observations.c.ts,
    sqlite_where=text("state = 'dead'"),
)

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

_UPSERT = """
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, page_row,
                          page_id, fetched_at, state, attempts)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0)
ON CONFLICT (series_id, ts) DO UPDATE SET
    value = excluded.value, units = excluded.units, quality_flag = excluded.quality_flag,
    revision = excluded.revision, page_row = excluded.page_row, page_id = excluded.page_id,
    fetched_at = excluded.fetched_at,
    state = CASE WHEN excluded.revision = observations.acked_revision
                 THEN 'acked' ELSE 'pending' END,
    attempts = 0, next_attempt_at = NULL, last_error = NULL, last_error_code = NULL
WHERE observations.revision <> excluded.revision
"""
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
_CLAIM = """
SELECT o.series_id, o.ts, o.value, o.units, o.quality_flag, o.revision, o.attempts,
       s.ba, s.type, s.subtype, o.page_id, o.page_row
FROM observations o INDEXED BY ix_observations_pending_due
JOIN series s ON s.series_id = o.series_id
WHERE o.state = 'pending' AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)
ORDER BY o.ts, o.series_id
LIMIT ?
"""
_ACK = """
UPDATE observations SET state = 'acked', acked_revision = revision, acked_at = ?,
       last_error = NULL, last_error_code = NULL, next_attempt_at = NULL
WHERE series_id = ? AND ts = ? AND revision = ? AND state = 'pending'
"""
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


@dataclass(frozen=True)
class WatermarkUpdate:
    """Advance ``stream`` (``dataset:respondent``) to ``last_ts`` if that is newer."""

    stream: str
    dataset: str
    respondent: str
    route: str
    last_ts: str


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


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """SQLAlchemy URL of an outbox file."""
    return f"sqlite:///{Path(path)}"


def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode and str(mode[0]).lower() != "wal":
        raise StoreError(f"cannot switch the outbox to WAL mode (got {mode[0]!r})")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA cache_size = -65536")
    cursor.execute("PRAGMA temp_store = MEMORY")
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


@contextmanager
def file_lock(path: str | os.PathLike[str], *, blocking: bool) -> Iterator[bool]:
    """An ``flock`` on ``path``: yields False when another process holds it (non-blocking).

    The kernel drops the lock when the process dies, so SIGKILL leaves no stale lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid holding the lock file ``path``, or None when nobody holds it."""
    if not Path(path).exists():
        return None
    with file_lock(path, blocking=False) as got:
        if got:
            return None
    try:
        return int(Path(path).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


class Store:
    """The outbox database. Open it with :meth:`Store.open`; close it with :meth:`close`."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self.engine = engine

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, migrate: bool = True) -> Store:
        """Open (and, with ``migrate``, create or upgrade) the outbox at ``path``."""
        path = Path(path)
        if path.parent and not path.parent.exists():
            raise StoreError(f"{path}: directory {path.parent} does not exist")
        engine = make_engine(path)
        store = cls(path, engine)
        try:
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

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success."""
        with self.engine.connect() as conn:
            conn.execution_options(outbox_write=True)
            with conn.begin():
                yield conn

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
        return self.path.with_name(f"{self.path.name}.{name}.lock")

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
        rows: Iterable[Sequence[Any]],
        *,
        series_rows: Iterable[Sequence[Any]] = (),
        page: PageRecord | None = None,
        watermark_updates: Iterable[WatermarkUpdate] = (),
        run_id: int | None = None,
        now: str | None = None,
    ) -> StageResult:
        """Upsert observation rows, the page they came from and watermarks atomically.

        ``rows`` are tuples in :data:`ROW_COLUMNS` order; ``series_rows`` in
        :data:`SERIES_COLUMNS` order. The page is stored only when at least one row
        was written (an unchanged re-fetch writes nothing at all).
        """
        now = now or now_ts()
        with self.write() as conn:
            cur = self.cursor(conn)
            page_id = None
            if page is not None:
                page_id = cur.execute("SELECT coalesce(max(id), 0) + 1 FROM pages").fetchone()[0]
            cur.executemany(_SERIES_INSERT, ((*tuple(s), now) for s in series_rows))
            offered = 0

            def params() -> Iterator[tuple[Any, ...]]:
                nonlocal offered
                for row in rows:
                    offered += 1
                    yield (*row, page_id, now)

            cur.executemany(_UPSERT, params())
            written = max(cur.rowcount, 0)
            crashpoint("stage.rows_written")
            if page is not None and written:
                cur.execute(
                    "INSERT INTO pages (id, run_id, route, params, url, page_no, page_offset,"
                    " total, row_count, fetched_at, encoding, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                        zlib.compress(page.body, 1),
                    ),
                )
            cur.executemany(
                _WATERMARK_UPSERT,
                [
                    (w.stream, w.dataset, w.respondent, w.route, w.last_ts, now, run_id)
                    for w in watermark_updates
                ],
            )
            cur.close()
            crashpoint("stage.before_commit")
        return StageResult(written=written, page_id=page_id if written else None, offered=offered)

    def watermarks(self) -> dict[str, str]:
        """stream -> last fully staged ts."""
        with self.read() as conn:
            rows = conn.exec_driver_sql("SELECT stream, last_ts FROM watermarks").all()
        return {r[0]: r[1] for r in rows}

    def watermark_rows(self) -> list[dict[str, Any]]:
        """Every watermark row as a dict (for status)."""
        with self.read() as conn:
            result = conn.execute(watermarks.select().order_by(watermarks.c.stream))
            return [dict(r._mapping) for r in result]

    # -- send side -----------------------------------------------------------------

    def claim(self, limit: int, now: str | None = None) -> list[Claimed]:
        """Up to ``limit`` pending rows due at ``now``, oldest ts first, then series_id."""
        now = now or now_ts()
        with self.read() as conn:
            cur = self.cursor(conn)
            rows = cur.execute(_CLAIM, (now, limit)).fetchall()
            cur.close()
        return [Claimed._make(r) for r in rows]

    def ack(self, keys: Iterable[Sequence[str]], now: str | None = None) -> int:
        """Mark sent rows ``acked``; rows whose revision changed meanwhile stay pending."""
        now = now or now_ts()
        with self.write() as conn:
            return self._executemany(conn, _ACK, ((now, k[0], k[1], k[2]) for k in keys))

    def reject(
        self, items: Iterable[tuple[Sequence[str], str, str]], now: str | None = None
    ) -> int:
        """Dead-letter rows: each item is (key, code, message)."""
        with self.write() as conn:
            return self._executemany(
                conn,
                _REJECT,
                ((code, redact(msg), k[0], k[1], k[2]) for k, code, msg in items),
            )

    def settle(
        self,
        acked: Iterable[Sequence[str]],
        rejected: Iterable[tuple[Sequence[str], str, str]] = (),
        now: str | None = None,
    ) -> tuple[int, int]:
        """Record one batch outcome in one transaction: (acked rows, dead rows)."""
        now = now or now_ts()
        with self.write() as conn:
            dead = self._executemany(
                conn,
                _REJECT,
                ((code, redact(msg), k[0], k[1], k[2]) for k, code, msg in rejected),
            )
            ok = self._executemany(conn, _ACK, ((now, k[0], k[1], k[2]) for k in acked))
            crashpoint("settle.before_commit")
        return ok, dead

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
        """Whether any pending row waits on a deferral recorded with ``code``."""
        with self.read() as conn:
            return (
                conn.exec_driver_sql(
                    "SELECT 1 FROM observations INDEXED BY ix_observations_pending_due"
                    " WHERE state = 'pending' AND next_attempt_at IS NOT NULL"
                    " AND last_error_code = ? LIMIT 1",
                    (code,),
                ).first()
                is not None
            )

    def clear_deferred(self, code: str) -> int:
        """Make rows deferred with ``code`` due now (the cause went away)."""
        with self.write() as conn:
            return conn.exec_driver_sql(
                "UPDATE observations SET next_attempt_at = NULL"
                " WHERE state = 'pending' AND next_attempt_at IS NOT NULL"
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

    def series_states(self) -> list[SeriesState]:
        """Per-series pending/dead counts, newest staged/acked and delivered-through."""
        with self.read() as conn:
            cur = self.cursor(conn)
            pend = {
                r[0]: (r[1], r[2])
                for r in cur.execute(
                    "SELECT series_id, count(*), min(ts) FROM observations"
                    " INDEXED BY ix_observations_pending_due WHERE state = 'pending'"
                    " GROUP BY series_id"
                )
            }
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
                n_pending, oldest = pend.get(sid, (0, None))
                out.append(
                    SeriesState(
                        series_id=sid,
                        ba=ba,
                        type=typ,
                        subtype=sub,
                        pending=n_pending,
                        dead=dead.get(sid, 0),
                        newest_staged=_one(
                            cur, "SELECT max(ts) FROM observations WHERE series_id = ?", (sid,)
                        ),
                        newest_acked=_one(
                            cur,
                            "SELECT ts FROM observations WHERE series_id = ?"
                            " AND state = 'acked' ORDER BY ts DESC LIMIT 1",
                            (sid,),
                        ),
                        delivered_through=self._delivered_through(cur, sid, oldest),
                        oldest_pending=oldest,
                    )
                )
            cur.close()
        return out

    @staticmethod
    def _delivered_through(cur: sqlite3.Cursor, sid: str, oldest_pending: str | None) -> str | None:
        if oldest_pending is None:
            return _one(cur, "SELECT max(ts) FROM observations WHERE series_id = ?", (sid,))
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

    # -- runs ----------------------------------------------------------------------

    def start_run(self, stage: str, now: str | None = None) -> int:
        """Record the start of a run; returns its id."""
        with self.write() as conn:
            result = conn.exec_driver_sql(
                "INSERT INTO runs (stage, started_at, status, counts, pid)"
                " VALUES (?, ?, 'running', '{}', ?)",
                (stage, now or now_ts(), os.getpid()),
            )
            return int(result.lastrowid or 0)

    def finish_run(
        self,
        run_id: int,
        status: str,
        counts: Mapping[str, Any],
        error: str | None = None,
        now: str | None = None,
    ) -> None:
        """Record a run's outcome (error text is redacted)."""
        with self.write() as conn:
            conn.exec_driver_sql(
                "UPDATE runs SET finished_at = ?, status = ?, counts = ?, error = ? WHERE id = ?",
                (
                    now or now_ts(),
                    status,
                    json.dumps(dict(counts), sort_keys=True, default=str),
                    redact(error) if error else None,
                    run_id,
                ),
            )

    def recent_runs(
        self, limit: int = 20, stage: str | None = None, failed: bool = False
    ) -> list[RunRecord]:
        """Newest runs first."""
        clauses, params = [], []
        if stage:
            clauses.append("stage = ?")
            params.append(stage)
        if failed:
            clauses.append("status = 'failed'")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, stage, started_at, finished_at, status, counts, error, pid"
                f" FROM runs{where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).all()
        return [
            RunRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6], r[7])
            for r in rows
        ]


def _one(cur: sqlite3.Cursor, sql: str, params: Sequence[Any] = ()) -> Any:
    row = cur.execute(sql, params).fetchone()
    return row[0] if row else None


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]
