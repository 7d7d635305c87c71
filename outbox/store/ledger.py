"""The run ledger: one ``runs`` row per fetch, send or housekeeping run.

A run is recorded ``running`` holding its stage's lock and finished ``ok`` or ``failed``
with its counts; a ``running`` run whose process is gone (its lock free) reads as failed,
``process gone (pid N)``, and the next run of its stage records it so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from outbox.redact import redact
from outbox.store.engine import cursor
from outbox.store.locks import lock_held
from outbox.timeutil import now_ts

if TYPE_CHECKING:
    from outbox.store.handle import Store

log = logging.getLogger(__name__)

# The error of a run whose process died without recording its end (see RunLedger.start_run).
PROCESS_GONE = "process gone"
# The key of ``runs.counts`` that holds a run's measured duration in seconds.
RUN_SECONDS = "seconds"


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


class RunLedger:
    """The ``runs`` table (``store.runs``): record a run's start and end, read the history."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # Monotonic start of each run this process started and is timing (see start_run).
        self._run_clocks: dict[int, float] = {}

    def start_run(self, stage: str, now: str | None = None) -> int:
        """Record the start of a run; returns its id.

        Without ``now`` the run is timed on the monotonic clock from here to
        :meth:`finish_run`, which stores the measured duration as ``counts.seconds``:
        ``started_at``/``finished_at`` keep whole seconds (the format every reader knows).

        Call it holding the stage's lock (:meth:`Store.lock_path`). A run of the stage still
        ``running`` then belongs to a process that is gone (SIGKILL, out of memory, power
        loss): a live one would hold the lock. Each such run is recorded as failed,
        ``process gone (pid N)``, with the time it was found as its ``finished_at``.
        """
        timed = now is None
        now = now or now_ts()
        with self._store.write() as conn:
            cur = cursor(conn)
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
        with self._store.write() as conn:
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
        with self._store.read() as conn:
            cur = cursor(conn)
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
        free = {r.stage for r in running if not lock_held(self._store.lock_path(r.stage))}
        suspects = [r.id for r in running if r.stage in free]
        if not suspects:
            return list(records)
        marks = ", ".join("?" * len(suspects))
        with self._store.read() as conn:
            still = {
                row[0]
                for row in conn.exec_driver_sql(
                    f"SELECT id FROM runs WHERE status = 'running' AND id IN ({marks})",
                    tuple(suspects),
                )
            }
        return [r.as_gone() if r.id in still else r for r in records]

    def run_summary(self, stage: str) -> RunSummary:
        """Newest run, newest finished run, newest ok run, and failed runs since that one.

        Walks ``runs`` newest first (by rowid, ``+stage`` keeps the planner off the
        stage index) and stops at the first ok run, so it reads a handful of rows. A
        ``running`` run whose process is gone counts as failed (:meth:`as_found`).
        """
        records: list[RunRecord] = []
        with self._store.read() as conn:
            cur = cursor(conn)
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


def _run_record(r: Sequence[Any]) -> RunRecord:
    return RunRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6], r[7])
