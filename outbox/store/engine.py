"""Engines for the outbox file: pragmas, explicit BEGIN handling, the shared write group,
and the small helpers every part of the store runs its SQL with.

Write transactions start with ``BEGIN IMMEDIATE`` (execution option ``outbox_write``) so
that a writer waits on the busy timeout instead of failing a lock upgrade ("database is
locked"). Readers use plain ``BEGIN``; a read-only engine opens the file ``mode=ro``.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DatabaseError
from sqlalchemy.pool import QueuePool

from outbox.errors import DiskFullError, StoreError

BUSY_TIMEOUT_MS = 60_000
SQLITE_FULL = 13  # "database or disk is full": no space for the file, or max_page_count
# WAL pages between checkpoints (SQLite's default is 1,000, 4 MB). Consecutive batches of
# acks, and of staged pages, rewrite mostly the same B-tree leaves (a few hours of every
# series); a checkpoint copies each page once however often it was rewritten since the
# last one, so a longer interval copies far less: acking 400k rows 13.5 -> 9.7 us a row.
WAL_AUTOCHECKPOINT_PAGES = 10_000
# Readers never wait on writers in WAL mode; this only covers WAL recovery by another process.
READ_BUSY_TIMEOUT_MS = 5_000
READ_MMAP_BYTES = 1 << 32  # address space, not memory: only pages read are resident


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
    # Before the temporary views: changing temp_store drops every temporary object.
    cursor.execute("PRAGMA temp_store = MEMORY")
    cursor.execute("PRAGMA query_only = ON")
    cursor.execute("PRAGMA cache_size = -65536")
    # Status seeks a few table pages per series: mapped pages save a read() per page
    # (status.read on a 10M-row outbox in a fresh process: ~0.18 s mapped, ~0.23 s not).
    cursor.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")
    cursor.close()


# An outbox from before migration 0008 keeps each row's delivery state in observations.
# The reading commands do not migrate (status must not write), so a read-only connection
# to such a file sees the queue, the per-minute acks and the row states as temporary views
# over the old columns: the same queries answer, only slower.
_LEGACY_VIEWS = {
    "queue": "SELECT ts, series_id, revision, state, attempts, next_attempt_at, last_error,"
    " last_error_code FROM main.observations WHERE state IN ('pending', 'dead')",
    "ack_minutes": "SELECT substr(acked_at, 1, 16) AS minute, count(*) AS rows,"
    " max(ts) AS newest_ts FROM main.observations"
    " WHERE state = 'acked' AND acked_at IS NOT NULL GROUP BY 1",
    "row_states": "SELECT series_id, ts, value, units, quality_flag, revision, page_id,"
    " page_row, fetched_at, state, attempts, next_attempt_at, last_error_code, last_error"
    " FROM main.observations",
}


def _recheck_legacy_views(
    dbapi_connection: sqlite3.Connection, record: Any, _proxy: object
) -> None:
    """At each checkout of a read-only connection: (re)decide the legacy views when the
    file's schema changed since they were last decided (another process may have
    migrated it to 0008 meanwhile: the views would then hide the real queue). One
    ``PRAGMA schema_version`` (a header read) when nothing changed. An outbox is legacy
    when its ``observations`` still has a ``state`` column."""
    cursor = dbapi_connection.cursor()
    try:
        version = cursor.execute("PRAGMA main.schema_version").fetchone()[0]
        if record.info.get("outbox_schema_version") == version:
            return
        columns = {r[1] for r in cursor.execute("PRAGMA main.table_info(observations)")}
    except sqlite3.DatabaseError:  # not a database, or unreadable: open_readonly says so
        return
    finally:
        cursor.close()
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only = OFF")  # temporary objects only, never the file
    for name, sql in _LEGACY_VIEWS.items():
        cursor.execute(f"DROP VIEW IF EXISTS temp.{name}")
        if "state" in columns:
            cursor.execute(f"CREATE TEMP VIEW {name} AS {sql}")
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()
    record.info["outbox_schema_version"] = version


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
    event.listen(engine, "checkout", _recheck_legacy_views)
    event.listen(engine, "begin", _on_begin)
    return engine


def cursor(conn: Connection) -> sqlite3.Cursor:
    """The DB-API cursor of ``conn`` (for executemany on hot paths)."""
    # a sqlite engine: its driver connection is always the sqlite3 one
    return cast(sqlite3.Connection, conn.connection.driver_connection).cursor()


def executemany(conn: Connection, sql: str, params: Iterable[Sequence[Any]]) -> int:
    """``executemany`` on the DB-API cursor of ``conn``; returns the rows it changed."""
    cur = cursor(conn)
    cur.executemany(sql, params)
    count = max(cur.rowcount, 0)
    cur.close()
    return count


def one_value(cur: sqlite3.Cursor, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row ``sql`` returns, or None."""
    row = cur.execute(sql, params).fetchone()
    return row[0] if row else None


def has_table(conn: Connection, name: str) -> bool:
    """Whether the file has the table ``name`` (status may read an old schema)."""
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return conn.exec_driver_sql(sql, (name,)).first() is not None


def short_error(exc: BaseException) -> str:
    """The first line of SQLite's message in ``exc`` (SQLAlchemy's wrapper unwrapped)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]


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
