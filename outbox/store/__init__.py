"""The SQLite outbox: one handle (:class:`Store`) and the parts that hold every SQL
statement the worker runs.

Layout (each module holds its own SQL):

* ``schema``  - SQLAlchemy Core tables, Alembic's target (``migrations/env.py``);
* ``engine``  - engines and pragmas, the shared write group, disk-full detection;
* ``locks``   - the stages' lock files, and why a file cannot be written;
* ``migrate`` - Alembic upgrades on open and for ``outbox db``;
* ``rows`` / ``stage``  - what fetch stages (``store.staging``, :class:`Staging`);
* ``deliver`` - what send claims, acknowledges, rejects, defers (``store.delivery``);
* ``ledger``  - the run ledger (``store.runs``, :class:`RunLedger`);
* ``reads``   - read models for status, doctor, gaps, the report (``store.reads``);
* ``upkeep``  - prune, sweep, vacuum, checkpoint, quick_check (``store.upkeep``);
* ``handle``  - :class:`Store`: open, close, ``read``/``write``/``write_group``, meta.

Semantics (the contract every stage relies on):

* ``observations`` is keyed by ``(series_id, ts)`` and holds the data; ``queue`` holds
  the delivery state of every row not acknowledged yet, keyed ``(ts, series_id)`` (the
  claim's order): ``pending`` or ``dead``, attempts, retry time, last error, and the
  revision it is for. A row without a queue entry is acknowledged. Triggers on
  ``observations`` (migration 0008) keep the queue: a new row or a new revision gets a
  pending entry, a deleted row loses its entry, so no statement stages without queueing.
* :meth:`Staging.stage` upserts rows; a row whose revision equals the stored one is not
  written at all (no timestamp moves, ``total_changes()`` does not move). A new revision
  goes back to ``pending`` with ``attempts = 0`` - even one equal to the revision last
  acknowledged (EIA flipped a value and flipped it back): the revision in between may
  have reached GridPulse without its ack being recorded (a crash after the 2xx), so only
  sending again makes GridPulse's copy certain.
* Watermarks advance in the same transaction as the rows they cover, and never move
  backwards, so a kill at any instant leaves rows and watermarks consistent.
* ``stream_progress`` records how far EIA has been asked for a stream and answered
  completely; it advances in the transaction of a request's last page and never moves
  backwards either.
* A ``meta`` key ``history:<stream>`` records that a stream's history before that hour
  is still to be fetched (its first rows reached back to the start of the window asked);
  it is written with those rows and cleared with the last page of that history.
* :meth:`Delivery.record_outcome` (acks recorded in ``ack_log``, applied by
  :meth:`Delivery.apply_acks`, which deletes queue entries; rejections at once) and
  :meth:`Delivery.defer` only touch an entry whose revision is the one that was sent; a
  revision staged meanwhile stays pending.
* Delivered-through of a series is the newest ``ts`` such that every staged row at or
  before it is ``acked`` or ``dead``.

Write transactions start with ``BEGIN IMMEDIATE`` so that a writer waits on the busy
timeout instead of failing a lock upgrade ("database is locked"). The hot paths
(stage, claim, acks) run ``executemany`` or one ``json_each`` statement on the DB-API
cursor of the SQLAlchemy connection, inside the transaction SQLAlchemy began.

Import cycle: none. ``handle`` imports ``migrate``, which imports only ``locks``; the
parts import ``handle`` for type hints only.
"""

from outbox.store.deliver import Claimed, Delivery, Key
from outbox.store.engine import disk_free_bytes
from outbox.store.handle import Store
from outbox.store.ledger import RUN_SECONDS, RunLedger, RunRecord, RunSummary
from outbox.store.locks import (
    file_lock,
    lock_file,
    lock_held,
    lock_holder,
    lock_pid,
    readonly_reason,
    write_problem,
)
from outbox.store.reads import Reads, SeriesState
from outbox.store.rows import PageRecord, ProgressUpdate, RowBatch, WatermarkUpdate
from outbox.store.stage import SizeLimit, StageResult, Staging
from outbox.store.upkeep import FileStats, Upkeep

__all__ = [
    "RUN_SECONDS",
    "Claimed",
    "Delivery",
    "FileStats",
    "Key",
    "PageRecord",
    "ProgressUpdate",
    "Reads",
    "RowBatch",
    "RunLedger",
    "RunRecord",
    "RunSummary",
    "SeriesState",
    "SizeLimit",
    "StageResult",
    "Staging",
    "Store",
    "Upkeep",
    "WatermarkUpdate",
    "disk_free_bytes",
    "file_lock",
    "lock_file",
    "lock_held",
    "lock_holder",
    "lock_pid",
    "readonly_reason",
    "write_problem",
]
