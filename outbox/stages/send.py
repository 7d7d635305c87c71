"""The send stage: outbox -> a :class:`~outbox.ports.Sink`, oldest row first.

:func:`run_send` claims due rows in batches and settles each row by the sink's answer:
acknowledged, dead (refused for good), or deferred to a later attempt. It is the same for
every sink: the sink says what happened with a :class:`~outbox.ports.Outcome` or one of
the errors listed in :mod:`outbox.ports`, and the stage does

* bisection on a rejected batch (:class:`~outbox.errors.BatchRejectedError`), down to
  the rows the sink refuses alone;
* halving on a batch too large (:class:`~outbox.errors.PayloadTooLargeError`), for the
  rest of the run;
* retries with backoff on a transient error, inside the run's budget, then deferral;
* the circuit breaker: a sink that refuses row after row alone with one code, and then
  a row from outside that run, stops the run.

The run is recorded and logged by the run context (:mod:`outbox.stages.runs`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, NamedTuple

from outbox.config import Config
from outbox.crash import crashpoint
from outbox.errors import (
    BatchRejectedError,
    OutboxError,
    PayloadTooLargeError,
    RejectsEverythingError,
    SinkTransientError,
)
from outbox.heap import frozen_heap
from outbox.logsetup import quote, scoped
from outbox.ports import Batch, Outcome, Prepared, Sink
from outbox.readahead import read_ahead
from outbox.retry import RetryPolicy, call_with_retry, retry_policy
from outbox.stages.runs import Run, describe, recorded_run, stage_lock
from outbox.store import Claimed, Key, Store
from outbox.timeutil import to_ts, utcnow

log = logging.getLogger(__name__)

UNAVAILABLE = "SINK_UNAVAILABLE"
SERVER_ERROR = "SERVER_ERROR"
# Rows waiting for the time GridPulse asked for (Retry-After): not made due by a
# health check, since GridPulse said when, and it may be up yet not ready for them.
RETRY_AFTER = "SINK_RETRY_AFTER"
# A longer Retry-After is more likely a broken header than a plan: wait a day, then ask.
MAX_ASKED_DEFER = 86400.0


@dataclass
class SendResult:
    """Counts of one send run.

    Each count says what this run recorded, never what it only tried: ``sent`` counts
    the rows whose outcome GridPulse gave and the run committed (acknowledged, rejected
    per row, or dead after a bisection or a 413), ``batches`` the 200 answers whose
    outcome committed, ``acked`` the rows marked acknowledged, ``deferred`` the rows
    given a later attempt. ``requests`` and ``bytes`` count every POST attempt, answered
    or not.
    """

    run_id: int = 0
    batches: int = 0
    requests: int = 0
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    deferred: int = 0
    bytes: int = 0
    skipped: bool = False
    holder: int | None = None
    due: int = 0
    waiting: int = 0
    waiting_until: str | None = None
    error: str | None = None

    def counts(self) -> dict[str, Any]:
        """The counts as stored in ``runs.counts``."""
        return {
            "batches": self.batches,
            "requests": self.requests,
            "sent": self.sent,
            "acked": self.acked,
            "rejected": self.rejected,
            "deferred": self.deferred,
            "bytes": self.bytes,
        }


class SendFailed(OutboxError):
    """GridPulse stayed unavailable through the run's retry budget (rows deferred)."""


class Ready(NamedTuple):
    """Claimed rows and the sink's encoding of them, ready for one delivery."""

    rows: list[Claimed]
    prepared: Prepared


class Sender:
    """Delivers claimed rows to a sink: batching, bisection, 413 halving, deferral."""

    def __init__(
        self,
        config: Config,
        store: Store,
        sink: Sink,
        result: SendResult,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        ends_at: float | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.sink = sink
        self.result = result
        self.batch_size = config.gridpulse.batch_size
        self.policy = retry_policy(
            config.gridpulse.retry, deadline=config.gridpulse.retry_budget_seconds
        )
        self.sleep = sleep
        self.clock = clock
        # When the run must end (``--max-seconds``, on ``clock``): no retry waits past it.
        self.ends_at = ends_at
        # The retry budget the last POST had, and the Retry-After deferral it ended in.
        self.budget_left = self.policy.deadline
        self.asked: tuple[float, str] | None = None
        # Rows GridPulse refused alone in a row with one code, none accepted since.
        self._refused: tuple[str, int] = ("", 0)
        self._pages: dict[int, list[dict[str, Any]]] = {}
        # Recorded acks are applied to their rows on this thread while the next POST is
        # in flight; one application at a time, finished before any other write.
        self._acks: ThreadPoolExecutor | None = None
        self._applying: Future[int] | None = None

    def prepare(self, rows: Sequence[Claimed]) -> Ready:
        """``rows`` as the sink encodes them (reads pages only for source_data).

        Safe on another thread than :meth:`deliver`'s: the send pipeline encodes the
        next batch while this one is in flight.
        """
        sources = None
        if self.config.gridpulse.send_source_data:
            sources = [self._source_row(r.page_id, r.page_row) for r in rows]
        return Ready(list(rows), self.sink.prepare(Batch(rows, sources)))

    def deliver(self, rows: Sequence[Claimed], prepared: Prepared | None = None) -> bool:
        """Deliver ``rows`` (``prepared``: as :meth:`prepare` encoded them, if it did).

        Rows left untested by a bisection simply stay pending. Returns True when the
        rows went in one accepted request; False after a 413 or a bisection, when the
        caller must claim afresh (rows may be left pending, the batch size may be smaller).
        """
        try:
            outcome = self._post(rows, prepared)
        except PayloadTooLargeError as exc:
            if len(rows) == 1:
                self._dead(rows, "PAYLOAD_TOO_LARGE", str(exc))
                return False
            self.batch_size = max(1, math.ceil(min(self.batch_size, len(rows)) / 2))
            log.info("batch too large for GridPulse (413) batch_size=%d", self.batch_size)
            done = 0
            while done < len(rows):  # the size may shrink again inside
                chunk = rows[done : done + self.batch_size]
                self.deliver(chunk)
                done += len(chunk)
            return False
        except BatchRejectedError as exc:
            self._bisect(rows, exc)
            return False
        self._settle(rows, outcome)
        return True

    def _bisect(self, rows: Sequence[Claimed], exc: BatchRejectedError) -> None:
        """Find the rows that make a batch 400/422, one request per halving.

        Rows in ``suspect`` hold at least one bad row (the last request that held them
        failed). Each step sends the first half alone: if it is accepted the bad row
        is in the second half; if not, the second half is left pending, untested, for
        a later batch. A single row that fails alone is dead with the server's words.
        While GridPulse has refused every row tried since it last accepted one, the first
        step sends the first row alone instead of half: a GridPulse that refuses
        everything costs two requests a row, and the circuit breaker stops the run once
        a row from outside the refused run is refused alone as well (see
        :meth:`_count_refused`).
        """
        suspect, error, alone = list(rows), exc, len(rows) == 1
        accepted = False
        while len(suspect) > 1:
            first = 1 if self._refused[1] and not accepted else math.ceil(len(suspect) / 2)
            half = suspect[:first]
            try:
                outcome = self._post(half)
            except BatchRejectedError as again:
                suspect, error, alone = half, again, len(half) == 1
                continue
            self._settle(half, outcome)
            accepted = accepted or outcome.accepted > 0
            suspect, alone = suspect[len(half) :], False
        code = error.reason
        message = str(error) if alone else f"rejected by bisection (its sibling passed): {error}"
        self._dead(suspect, code, message)
        if not accepted:
            # With no row accepted the bisection only sent first halves: the dead row is
            # the batch's first, and its last row (when it has another) is untested.
            self._count_refused(code, len(suspect), rows[-1] if len(rows) > 1 else None)

    def _count_refused(self, code: str, rows: int, beyond: Claimed | None) -> None:
        """Count rows refused with no row accepted; at the breaker's limit, probe.

        K refused rows in a row may be one bad stretch of the queue (one hour of one BA:
        its demand, forecast and generation rows are neighbours), not a GridPulse that
        refuses everything. So before stopping the run one row from outside the refused
        run goes alone: ``beyond`` (the refused batch's last row), else the newest due
        row. Accepted (or answered 200 at all): the count starts again and the run goes
        on; the refused rows stay dead, each was refused alone. Refused with another
        code: that row is dead and the count starts at it. Refused with the same code:
        that row is dead too (refused alone, like any other) and the run stops, with at
        most K + 1 rows dead.
        """
        seen, count = self._refused
        count = count + rows if code == seen else rows
        self._refused = (code, count)
        limit = self.config.gridpulse.circuit_breaker_rows
        if count < limit:
            return
        probe = beyond or self.store.delivery.newest_due(to_ts(utcnow()))
        if probe is None:  # no row left to try: nothing for the breaker to save
            return
        try:
            outcome = self._post([probe])
        except PayloadTooLargeError as exc:  # too large alone: dead, as in deliver
            self._dead([probe], "PAYLOAD_TOO_LARGE", str(exc))
            self._refused = ("", 0)
            return
        except BatchRejectedError as exc:
            self._probe_refused(probe, exc, code, count)
            return
        self._settle([probe], outcome)
        self._refused = ("", 0)
        log.info(
            "circuit breaker probe answered, the run goes on code=%s refused=%d probe=%s",
            code,
            count,
            quote(f"{probe.series_id} {probe.ts}"),
        )

    def _probe_refused(
        self, probe: Claimed, exc: BatchRejectedError, code: str, count: int
    ) -> None:
        """The breaker's probe refused alone: dead; with the same code the run stops."""
        again = exc.reason
        self._dead([probe], again, str(exc))
        if again != code:
            self._refused = (again, 1)
            return
        raise RejectsEverythingError(
            f"GridPulse rejects everything (code {code}): {count} rows in a row refused "
            f"alone, none accepted, and a row from outside that run ({probe.series_id} "
            f"{probe.ts}) refused alone too; they are dead, the rest stay pending "
            f"(outbox requeue --code {code} once GridPulse accepts them)",
            code,
        ) from None

    def _post(self, rows: Sequence[Claimed], prepared: Prepared | None = None) -> Outcome:
        ready = prepared or self.prepare(rows).prepared

        def attempt() -> Outcome:
            self.result.requests += 1
            self.result.bytes += ready.size
            return self.sink.send(ready)

        crashpoint("send.before_post")
        outcome = call_with_retry(self._policy_now(), attempt, sleep=self.sleep)
        crashpoint("send.after_post")
        return outcome

    def _policy_now(self) -> RetryPolicy:
        """The retry policy of the next POST: the budget, or less if the run ends sooner."""
        left = self.policy.deadline
        if self.ends_at is not None:
            # A deadline of 0 means none: a run with no time left still gets no wait.
            run_left = max(self.ends_at - self.clock(), 1e-3)
            left = run_left if left <= 0 else min(left, run_left)
        self.budget_left = left
        return self.policy if left == self.policy.deadline else replace(self.policy, deadline=left)

    def _source_row(self, page_id: int | None, row: int | None) -> Mapping[str, Any] | None:
        if page_id is None:
            return None
        if page_id not in self._pages:
            import orjson

            found = self.store.reads.page_body(page_id)
            data = orjson.loads(found[1]) if found else {}
            self._pages = {page_id: (data.get("response") or {}).get("data") or []}
        data = self._pages[page_id]
        return data[row] if row is not None and 0 <= row < len(data) else None

    def _settle(self, rows: Sequence[Claimed], outcome: Outcome) -> None:
        # The sink accounted for the batch: every rejection names one distinct row sent.
        bad = {rej.index: rej for rej in outcome.rejected}
        # Plain (series_id, ts, revision) tuples: what a Key holds, built at half the cost.
        acked = [(r.series_id, r.ts, r.revision) for i, r in enumerate(rows) if i not in bad]
        rejected = [
            (Key(rows[i].series_id, rows[i].ts, rows[i].revision), rej.code, rej.message)
            for i, rej in bad.items()
        ]
        # The outcome commits before the next POST (a kill re-delivers at most the batch
        # in flight); marking its rows acked overlaps that POST.
        self.wait_acks()
        self.result.rejected += self.store.delivery.record_outcome(acked, rejected)
        self.result.batches += 1
        self.result.sent += len(rows)
        if outcome.accepted:
            self._refused = ("", 0)
        if acked:
            if self._acks is None:
                self._acks = ThreadPoolExecutor(1, thread_name_prefix="outbox-acks")
            self._applying = self._acks.submit(self.store.delivery.apply_acks)

    def wait_acks(self) -> None:
        """Wait until the recorded acks are applied to their rows (raises what that raised)."""
        applying, self._applying = self._applying, None
        if applying is not None:
            self.result.acked += applying.result()

    def close(self) -> None:
        """Apply the recorded acks and stop the thread that applies them."""
        try:
            self.wait_acks()
        finally:
            if self._acks is not None:
                self._acks.shutdown(wait=True)
                self._acks = None

    def _dead(self, rows: Sequence[Claimed], code: str, message: str) -> None:
        keys = [(Key(r.series_id, r.ts, r.revision), code, message) for r in rows]
        self.wait_acks()
        self.result.rejected += self.store.delivery.record_outcome([], keys)
        self.result.sent += len(rows)

    def defer(self, rows: Sequence[Claimed], exc: SinkTransientError) -> None:
        """Leave ``rows`` pending with a growing, capped next attempt time, or until the
        time GridPulse asked for with ``Retry-After`` when that is later."""
        gp = self.config.gridpulse
        attempts = max((r.attempts for r in rows), default=0)
        delay = min(gp.defer_max_seconds, gp.defer_initial_seconds * (2**attempts))
        # Rows a live sink failed on may be the cause: they keep their own backoff.
        # Anything else means the sink was unreachable or overloaded.
        code = SERVER_ERROR if exc.rows_suspect else UNAVAILABLE
        asked = exc.retry_after
        if asked is not None and asked > delay:
            delay, code = min(asked, MAX_ASKED_DEFER), RETRY_AFTER
        when = to_ts(utcnow() + timedelta(seconds=delay))
        if code == RETRY_AFTER:
            self.asked = (delay, when)
        keys = [Key(r.series_id, r.ts, r.revision) for r in rows]
        self.wait_acks()
        self.result.deferred += self.store.delivery.defer(keys, when, f"{code}: {exc}", code=code)

    def describe_failure(self, exc: BaseException) -> str:
        """The error a failed run is recorded with; the sink unavailable says for how long
        it asked to wait when that was past the run's budget."""
        if not isinstance(exc, SinkTransientError):
            return describe(exc)
        error = f"GridPulse unavailable: {exc}"
        if self.asked is not None:
            error += (
                f" (Retry-After {self.asked[0]:g}s, the run's budget had "
                f"{self.budget_left:g}s left: deferred until {self.asked[1]})"
            )
        return error


@scoped
def run_send(
    config: Config,
    store: Store,
    sink: Sink | None,
    *,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SendResult:
    """One send run: drain due rows oldest first until none is due or a limit is hit.

    ``dry_run`` counts what is due and deferred, under the lock, and sends nothing (``sink``
    may then be None). Raises :class:`SendFailed` when the sink stayed unavailable.
    """
    result = SendResult()
    with stage_lock(store, "send") as lock:
        if not lock.held:
            result.skipped, result.holder = True, lock.holder
            return result
        if dry_run:
            now = to_ts(utcnow())
            result.due = store.delivery.count_due(now)
            result.waiting, result.waiting_until = store.delivery.count_deferred(now)
            return result
        assert sink is not None, "a send that is not a dry run needs a sink"
        ends_at = clock() + max_seconds if max_seconds is not None else None
        sender = Sender(config, store, sink, result, sleep=sleep, clock=clock, ends_at=ends_at)
        run: Run | None = None
        try:
            with recorded_run(
                store, "send", result.counts, describe=sender.describe_failure
            ) as run:
                result.run_id = run.id
                try:
                    with frozen_heap():  # see outbox.heap: full collections stay cheap
                        _drain(store, sender, max_batches, max_seconds, clock)
                finally:
                    sender.close()
        except BaseException as exc:
            result.error = run.error if run is not None else None
            if isinstance(exc, SinkTransientError):
                raise SendFailed(result.error or str(exc)) from None
            raise
    run.log_done(**result.counts())
    return result


def _drain(
    store: Store,
    sender: Sender,
    max_batches: int | None,
    max_seconds: float | None,
    clock: Callable[[], float],
) -> None:
    started = clock()
    # Acks a killed send recorded and did not apply: applied before anything is claimed,
    # or their rows would go again in other batches.
    store.delivery.apply_acks()
    if store.delivery.has_deferred(UNAVAILABLE) and sender.sink.health():
        # The sink is back: rows deferred only because it was down are due again, so
        # the backlog drains oldest first instead of behind newer rows.
        store.delivery.clear_deferred(UNAVAILABLE)
    rounds = 0
    # A worker thread claims and encodes the next batch while this one is posted and its
    # outcome recorded; it claims behind the batch in flight, which stays pending until
    # its outcome commits. Still one batch at a time: the next POST starts only after the
    # previous outcome committed. A pass ends when nothing more is due behind the last
    # batch, or after a 413 or a bisection; a pass that found nothing ends the run.
    while True:
        found = False
        sender.wait_acks()  # a pass claims from the oldest row: the rows acked are not due
        batches = read_ahead(_claims(store, sender), sender.prepare, depth=1)
        try:
            for ready in batches:
                if max_batches is not None and rounds >= max_batches:
                    return
                if max_seconds is not None and clock() - started >= max_seconds:
                    return
                found = True
                rounds += 1
                crashpoint("send.after_claim")
                try:
                    whole = sender.deliver(ready.rows, ready.prepared)
                except SinkTransientError as exc:
                    sender.defer(ready.rows, exc)
                    raise
                if not whole:
                    break
        finally:
            batches.close()
        if not found:
            return


def _claims(store: Store, sender: Sender) -> Iterator[list[Claimed]]:
    """Successive batches of due rows, oldest first, each claimed behind the one before."""
    after: tuple[str, str] | None = None
    while rows := store.delivery.claim(sender.batch_size, to_ts(utcnow()), after=after):
        yield rows
        after = (rows[-1].ts, rows[-1].series_id)
