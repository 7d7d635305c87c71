"""The outbox handle: opening the file, transactions, and the parts that hold the SQL."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DatabaseError, OperationalError

from outbox.errors import NoOutboxError, StoreError
from outbox.store.deliver import Delivery
from outbox.store.engine import (
    WriteGroup,
    cursor,
    disk_full_as_error,
    make_engine,
    make_readonly_engine,
    short_error,
)
from outbox.store.ledger import RunLedger
from outbox.store.locks import lock_file, readonly_reason, write_problem
from outbox.store.migrate import ensure_schema
from outbox.store.reads import Reads
from outbox.store.stage import Staging
from outbox.store.upkeep import Upkeep


class Store:
    """The outbox database. Open it with :meth:`Store.open`; close it with :meth:`close`.

    The handle owns the engine and the transactions; the SQL lives in its parts:
    ``staging`` (:class:`Staging`), ``delivery`` (:class:`Delivery`), ``runs``
    (:class:`RunLedger`), ``reads`` (:class:`Reads`) and ``upkeep`` (:class:`Upkeep`).
    """

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self.engine = engine
        self._group: WriteGroup | None = None
        self.staging = Staging(self)
        self.delivery = Delivery(self)
        self.runs = RunLedger(self)
        self.reads = Reads(self)
        self.upkeep = Upkeep(self)

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
                    ensure_schema(store)
                else:
                    store.schema_version()
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            engine.dispose()
            raise StoreError(f"{path}: not a usable outbox database: {short_error(exc)}") from None
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
            raise StoreError(f"{path}: not a usable outbox database: {short_error(exc)}") from None
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
        blocks that carry their own watermark advances (:meth:`Staging.stage`).
        """
        if self._group is not None:
            raise StoreError("write groups do not nest")
        group = WriteGroup(self.engine, self.path)
        group.before_commit = self.staging.flush_checks
        self._group = group
        try:
            yield group
        finally:
            self._group = None
            with disk_full_as_error(self.path):
                group.close()

    def grouped(self) -> bool:
        """Whether this thread writes inside a :meth:`write_group` now."""
        group = self._group
        return group is not None and group.thread == threading.get_ident()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot; never blocks writers (WAL)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn
            conn.rollback()

    @staticmethod
    def cursor(conn: Connection) -> sqlite3.Cursor:
        """The DB-API cursor of ``conn`` (for executemany on hot paths)."""
        return cursor(conn)

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
