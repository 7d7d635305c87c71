"""Upkeep: retention, page sweeps, vacuum, checkpoints and the file's integrity check
(housekeeping and doctor)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection
from sqlalchemy.exc import DatabaseError

from outbox.errors import StoreError
from outbox.store.engine import cursor, disk_full_as_error, executemany, one_value, short_error
from outbox.store.stage import FORGET_PAGES

if TYPE_CHECKING:
    from outbox.store.handle import Store

# Acknowledged rows: those without a queue entry (pending and dead rows stay).
_PRUNE_ACKED = """
DELETE FROM observations WHERE series_id = ? AND ts < ?
AND NOT EXISTS (SELECT 1 FROM queue q
                WHERE q.ts = observations.ts AND q.series_id = observations.series_id)
"""
_PRUNE_REVISIONS = """
DELETE FROM revisions WHERE ts < ? AND NOT EXISTS
    (SELECT 1 FROM observations o WHERE o.series_id = revisions.series_id AND o.ts = revisions.ts)
"""
AUTO_VACUUM_MODES = {0: "none", 1: "full", 2: "incremental"}


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


class Upkeep:
    """Housekeeping's side of the outbox (``store.upkeep``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def prune_before(self, before: str, batch: int = 256) -> tuple[int, int, int]:
        """Delete acknowledged rows, checked gap hours and finished runs older than ``before``.

        Rows are matched on ``ts`` (pending and dead rows stay), one primary-key range per
        series, so only old rows are read; runs on ``started_at``. Returns (rows, checked
        gap hours, runs). Each transaction covers ``batch`` series, which keeps the WAL
        small when a first prune removes a lot.
        """
        with self._store.write() as conn:
            cur = cursor(conn)
            sids = [r[0] for r in cur.execute("SELECT series_id FROM series")]
            checked = cur.execute("DELETE FROM checked_gaps WHERE ts < ?", (before,)).rowcount
            runs = cur.execute(
                "DELETE FROM runs WHERE started_at < ? AND status <> 'running'", (before,)
            ).rowcount
            cur.close()
            rows = _prune_series(conn, sids[:batch], before)
        for i in range(batch, len(sids), batch):
            with self._store.write() as conn:
                rows += _prune_series(conn, sids[i : i + batch], before)
        with self._store.write() as conn:
            # The ledger goes with its rows; findings about hours past retention go too.
            if conn.exec_driver_sql(_PRUNE_REVISIONS, (before,)).rowcount > 0:
                conn.exec_driver_sql(FORGET_PAGES)  # the ledger's head may move back
            conn.exec_driver_sql('DELETE FROM findings WHERE "end" < ?', (before,))
            conn.exec_driver_sql(
                "DELETE FROM ack_minutes WHERE minute < substr(?, 1, 16)", (before,)
            )
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
            cur = cursor(conn)
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
        with disk_full_as_error(self._store.path), self._store.engine.connect() as conn:
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
        with self._store.read() as conn:
            cur = cursor(conn)
            size, count, free, mode = (
                int(one_value(cur, f"PRAGMA {name}") or 0)
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
        with disk_full_as_error(self._store.path), self._store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.executescript(f"PRAGMA incremental_vacuum({int(pages)});")  # type: ignore[union-attr]

    def vacuum(self) -> None:
        """Rebuild the file (VACUUM): it shrinks, and an old file becomes auto_vacuum=incremental.

        Holds the write lock for the whole rebuild and needs free disk space about the
        size of the file.
        """
        with disk_full_as_error(self._store.path), self._store.engine.connect() as conn:
            conn.connection.driver_connection.execute("VACUUM")  # type: ignore[union-attr]

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy the WAL into the main file (``TRUNCATE`` also empties the -wal file)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        with disk_full_as_error(self._store.path), self._store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()  # type: ignore[union-attr]

    def quick_check(self) -> list[str]:
        """``PRAGMA quick_check`` lines (``["ok"]`` for a sound file); StoreError if unreadable."""
        try:
            with self._store.read() as conn:
                return [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            raise StoreError(
                f"{self._store.path}: not a usable outbox database: {short_error(exc)}"
            ) from None


def _prune_series(conn: Connection, sids: Sequence[str], before: str) -> int:
    """Delete the acknowledged rows of ``sids`` older than ``before``; returns how many.

    A page staged again may bring back rows pruned here, so the page digests are
    forgotten in the same transaction, and only when a row went (every send prunes, and
    the digests are what makes a re-stage cheap).
    """
    pruned = executemany(conn, _PRUNE_ACKED, ((sid, before) for sid in sids))
    if pruned:
        conn.exec_driver_sql(FORGET_PAGES)
    return pruned
