"""A second sink needs no change to the send stage.

:class:`MemorySink` implements :class:`outbox.ports.Sink` here, in the test, with no
HTTP and nothing of GridPulse: it holds what it accepts in a dict and answers by rules
each test sets (accept, refuse rows, refuse a whole batch, too large, unavailable,
inconsistent). The real send stage drives it over a real migrated outbox in tmp_path,
rows staged through the store's staging path, and every test asserts the outbox's row
states after the run: bisection, halving, deferral and the circuit breaker work as they
do for GridPulse.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from factories import obs, series_row, ts
from freezegun import freeze_time

from outbox.config import Config
from outbox.errors import (
    BatchRejectedError,
    PayloadTooLargeError,
    ProtocolError,
    RejectsEverythingError,
    SinkTransientError,
)
from outbox.ports import Batch, Outcome, Prepared, Refusal, Sink
from outbox.stages.send import SendFailed, SendResult, run_send
from outbox.store import Store

SERIES = ("EIA.PJM.demand", "EIA.MISO.demand")
NOW = "2025-09-01T12:00:00Z"
Key = tuple[str, str]


@dataclass
class MemorySink:
    """An in-memory sink with scripted answers.

    ``refuse``: rows refused one by one in an accepted batch (code per row). ``poison``:
    rows whose presence makes the whole batch refused. ``max_rows``: a larger batch is
    too large. ``down``: how many sends fail as unavailable next (``-1``: all of them).
    ``miscount``: the next answers claim one row fewer than sent, so the sink's own check
    finds them inconsistent.
    """

    refuse: dict[Key, str] = field(default_factory=dict)
    poison: set[Key] = field(default_factory=set)
    poison_code: str = "POISONED"
    max_rows: int | None = None
    down: int = 0
    rows_suspect: bool = False
    retry_after: float | None = None
    miscount: bool = False
    healthy: bool = True
    held: dict[Key, str] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    health_checks: int = 0

    def prepare(self, batch: Batch) -> Prepared:
        return Prepared(batch, size=10 * len(batch.rows), payload=[_key(r) for r in batch.rows])

    def send(self, prepared: Prepared) -> Outcome:
        keys: list[Key] = prepared.payload
        self.sizes.append(len(keys))
        if self.down:
            self.down -= 1 if self.down > 0 else 0
            raise SinkTransientError(
                "memory sink unavailable",
                self.retry_after,
                rows_suspect=self.rows_suspect,
            )
        if self.max_rows is not None and len(keys) > self.max_rows:
            raise PayloadTooLargeError(f"memory sink takes at most {self.max_rows} rows")
        if any(k in self.poison for k in keys):
            raise BatchRejectedError("memory sink refused the batch", code=self.poison_code)
        refused = tuple(
            Refusal(i, self.refuse[k], f"refused {k[1]}")
            for i, k in enumerate(keys)
            if k in self.refuse
        )
        outcome = Outcome(len(keys) - len(refused) - self.miscount, refused)
        _check(outcome, len(keys))
        for key, row in zip(keys, prepared.batch.rows, strict=True):
            if key not in self.refuse:
                self.held[key] = row.revision
        return outcome

    def health(self) -> bool:
        self.health_checks += 1
        return self.healthy


def _key(row: object) -> Key:
    return (row.series_id, row.ts)  # type: ignore[attr-defined]


def _check(outcome: Outcome, sent: int) -> None:
    """The sink's own acknowledgement rule: every row accounted for, or no answer."""
    indexes = {r.index for r in outcome.rejected}
    if outcome.accepted + len(indexes) != sent:
        raise ProtocolError(
            f"memory sink's answer is inconsistent: accepted {outcome.accepted} + rejected "
            f"{len(indexes)} != {sent} rows sent"
        )


def test_memory_sink_is_a_sink() -> None:
    sink: Sink = MemorySink()
    assert sink.health()


# -- the outbox ------------------------------------------------------------------------


@pytest.fixture
def staged(store: Store) -> Iterator[Store]:
    """A real outbox (migrated, in tmp_path) holding 2 series x 20 hours, pending."""
    rows = [obs(sid, h, 100.0 + h) for h in range(20) for sid in SERIES]
    store.staging.stage(rows, series_rows=[series_row(s) for s in SERIES])
    yield store


def config(batch_size: int = 40, **gridpulse: object) -> Config:
    """Send settings; no retry waits."""
    retry = {"attempts": 2, "initial_backoff_seconds": 0, "max_backoff_seconds": 0}
    return Config.model_validate(
        {"gridpulse": {"batch_size": batch_size, "retry": retry, **gridpulse}}
    )


def send(store: Store, sink: MemorySink, cfg: Config | None = None) -> SendResult:
    return run_send(cfg or config(), store, sink, sleep=lambda s: None)


def rows(store: Store) -> dict[Key, tuple[str, str | None, str | None]]:
    """(series_id, ts) -> (state, last_error_code, next_attempt_at), read from the file."""
    with sqlite3.connect(store.path) as con:
        found = con.execute(
            "SELECT series_id, ts, state, last_error_code, next_attempt_at FROM row_states"
        ).fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in found}


def states(store: Store) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state, _, _ in rows(store).values():
        counts[state] = counts.get(state, 0) + 1
    return counts


def last_run(store: Store) -> tuple[str, str | None]:
    with sqlite3.connect(store.path) as con:
        return con.execute("SELECT status, error FROM runs ORDER BY id DESC LIMIT 1").fetchone()


# -- the behaviours ----------------------------------------------------------------------


def test_accepted_rows_are_acked_and_refused_rows_dead_with_their_code(staged: Store) -> None:
    sink = MemorySink(refuse={(SERIES[0], ts(3)): "OUT_OF_RANGE", (SERIES[1], ts(7)): "STALE"})
    result = send(staged, sink)
    assert states(staged) == {"acked": 38, "dead": 2}
    assert rows(staged)[(SERIES[0], ts(3))][:2] == ("dead", "OUT_OF_RANGE")
    assert rows(staged)[(SERIES[1], ts(7))][:2] == ("dead", "STALE")
    assert len(sink.held) == 38
    assert (result.batches, result.sent, result.acked, result.rejected) == (1, 40, 38, 2)
    assert result.bytes == 400  # the sink's own size of what it was handed
    assert last_run(staged) == ("ok", None)


def test_a_refused_batch_is_bisected_to_its_bad_row(staged: Store) -> None:
    bad = (SERIES[1], ts(12))
    sink = MemorySink(poison={bad})
    result = send(staged, sink)
    assert states(staged) == {"acked": 39, "dead": 1}
    state, code, _ = rows(staged)[bad]
    assert (state, code) == ("dead", "POISONED")
    assert bad not in sink.held and len(sink.held) == 39
    assert sink.sizes[0] == 40 and len(sink.sizes) <= 1 + 6 + 2  # one request per halving
    assert result.rejected == 1


def test_too_large_halves_the_batch_and_remembers(staged: Store) -> None:
    sink = MemorySink(max_rows=10)
    send(staged, sink)
    assert states(staged) == {"acked": 40}
    assert sink.sizes[:4] == [40, 20, 10, 10]
    assert max(sink.sizes[4:]) <= 10  # the rest of the run starts at the halved size


def test_a_single_row_too_large_is_dead(staged: Store) -> None:
    sink = MemorySink(max_rows=0)
    send(staged, sink, config(batch_size=1, circuit_breaker_rows=100))
    assert states(staged) == {"dead": 40}
    assert {code for _, code, _ in rows(staged).values()} == {"PAYLOAD_TOO_LARGE"}


@freeze_time(NOW)
@pytest.mark.parametrize(
    ("suspect", "retry_after", "code"),
    [
        (False, None, "SINK_UNAVAILABLE"),
        (True, None, "SERVER_ERROR"),
        (False, 7200.0, "SINK_RETRY_AFTER"),
    ],
)
def test_an_unavailable_sink_defers_the_batch_and_fails_the_run(
    staged: Store, suspect: bool, retry_after: float | None, code: str
) -> None:
    sink = MemorySink(down=-1, rows_suspect=suspect, retry_after=retry_after)
    with pytest.raises(SendFailed, match="GridPulse unavailable: memory sink unavailable"):
        send(staged, sink)
    # The first try and one retry, then deferred; a Retry-After past the run's budget:
    # no retry at all (the run does not wait two hours).
    assert sink.sizes == ([40] if retry_after else [40, 40])
    found = rows(staged)
    assert {(s, c) for s, c, _ in found.values()} == {("pending", code)}
    later = "2025-09-01T14:00:00Z" if retry_after else "2025-09-01T12:01:00Z"
    assert {when for _, _, when in found.values()} == {later}
    status, error = last_run(staged)
    assert status == "failed" and error and error.startswith("GridPulse unavailable")


def test_rows_deferred_while_the_sink_was_down_go_as_soon_as_it_is_healthy(
    staged: Store,
) -> None:
    down = MemorySink(down=-1)
    with pytest.raises(SendFailed):
        send(staged, down)
    assert {s for s, _, _ in rows(staged).values()} == {"pending"}
    back = MemorySink()
    send(staged, back)
    assert back.health_checks == 1
    assert states(staged) == {"acked": 40} and len(back.held) == 40


def test_deferred_rows_wait_while_the_sink_is_not_healthy(staged: Store) -> None:
    with pytest.raises(SendFailed):
        send(staged, MemorySink(down=-1))
    unhealthy = MemorySink(healthy=False)
    result = send(staged, unhealthy)
    assert (unhealthy.health_checks, unhealthy.sizes, result.sent) == (1, [], 0)
    assert {s for s, _, _ in rows(staged).values()} == {"pending"}


def test_one_transient_failure_is_retried_within_the_run(staged: Store) -> None:
    sink = MemorySink(down=1)
    send(staged, sink)
    assert sink.sizes == [40, 40]
    assert states(staged) == {"acked": 40}


def test_an_inconsistent_answer_changes_no_row_and_stops_the_run(staged: Store) -> None:
    before = rows(staged)
    sink = MemorySink(miscount=True)
    with pytest.raises(ProtocolError, match="inconsistent"):
        send(staged, sink)
    assert rows(staged) == before  # not acked, not dead, not deferred
    status, error = last_run(staged)
    assert status == "failed" and "inconsistent" in (error or "")
    sink.miscount = False
    send(staged, sink)  # the next send delivers the batch
    assert states(staged) == {"acked": 40}


def test_the_circuit_breaker_stops_a_sink_that_refuses_everything(staged: Store) -> None:
    everything = {(sid, ts(h)) for h in range(20) for sid in SERIES}
    sink = MemorySink(poison=everything, poison_code="NOPE")
    with pytest.raises(RejectsEverythingError, match="code NOPE"):
        send(staged, sink, config(batch_size=10, circuit_breaker_rows=3))
    dead = {k for k, (s, _, _) in rows(staged).items() if s == "dead"}
    assert 3 <= len(dead) <= 4  # K refused alone, and the probe from outside that run
    assert {rows(staged)[k][1] for k in dead} == {"NOPE"}
    assert states(staged) == {"dead": len(dead), "pending": 40 - len(dead)}
    assert sink.held == {}
    assert last_run(staged)[0] == "failed"


def test_a_probe_the_sink_accepts_keeps_the_run_going(staged: Store) -> None:
    # The oldest hour of both series is bad; everything after it is fine.
    bad = {(sid, ts(h)) for h in (0, 1) for sid in SERIES}
    sink = MemorySink(poison=bad, poison_code="NOPE")
    send(staged, sink, config(batch_size=10, circuit_breaker_rows=3))
    assert states(staged) == {"dead": 4, "acked": 36}
    assert {k for k, (s, _, _) in rows(staged).items() if s == "dead"} == bad
