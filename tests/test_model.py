"""Model-based test: random sequences of fetches, send outcomes, crashes and restarts,
checked after every step against a small pure-Python model of the outbox.

The machine drives the real stages in process: ``run_fetch`` on one saved EIA page at a
time (revisions, values flipping back, duplicates within a page), ``run_send`` against a
scripted GridPulse (accept, per-row reject, 413, 429, 5xx, timeout, a poison row that
makes its batch 422), crashes raised at the named crash points (the open transaction
rolls back, as after SIGKILL), store restarts and requeues. The model keeps, per row:
value, revision, state and acked revision; per stream: the watermark; and what
GridPulse holds. After each step the outbox must equal the model: rows and states,
watermarks, delivered-through per series, and no row acked that GridPulse does not hold.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from factories import delivered_through
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import outbox.stages.fetcher as fetcher_mod
import outbox.stages.send as send_mod
import outbox.store.deliver as deliver_mod
import outbox.store.stage as stage_mod
from outbox.config import Config
from outbox.errors import (
    BatchRejectedError,
    PayloadTooLargeError,
    RateLimitedError,
    SinkTransientError,
)
from outbox.normalize import revision_of
from outbox.sinks.gridpulse import GridPulseSink, IngestResult, Rejection, check_result
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.stages.send import SendFailed, run_send
from outbox.store import Store
from outbox.testing.synth import ROUTES, request_params_for, response_body
from outbox.timeutil import parse_ts

REGION = ROUTES[0]
SERIES = {  # (respondent, type) -> (series_id, stream)
    ("PJM", "D"): ("EIA.PJM.demand", "demand:PJM"),
    ("PJM", "NG"): ("EIA.PJM.net_generation", "net_generation:PJM"),
    ("MISO", "D"): ("EIA.MISO.demand", "demand:MISO"),
}
PAIRS = sorted(SERIES)
HOURS = 8
VALUES = ("10", "20", "35", None, "")
FETCH_POINTS = ("fetch.page_fetched", "stage.rows_written", "stage.before_commit")
SEND_POINTS = (
    "send.after_claim",
    "send.before_post",
    "send.after_post",
    "settle.before_commit",
    "acks.before_commit",
)
OUTCOMES = ("accept", "reject", "413", "429", "503", "500", "timeout", "poison")
EXAMPLES = {"ci": (20, 20), "soak": (400, 40)}
Key = tuple[str, str]


class Crash(BaseException):
    """A crash at a named point: not an Exception, so nothing on the way swallows it."""


@dataclass
class Row:
    """The model of one observation row."""

    value: float | None
    revision: str
    state: str = "pending"
    acked_revision: str | None = None
    code: str | None = None


class ScriptedGridPulse:
    """A GridPulse whose answers follow a plan; it remembers what it holds and each post."""

    def __init__(self, held: dict[Key, str]) -> None:
        self.held = held
        self.failures: list[str] = []
        self.max_rows: int | None = None
        self.reject: set[Key] = set()
        self.poison: set[Key] = set()
        # Every answered post: (accepted, refused), each a list of (key, revision).
        self.posts: list[tuple[list[tuple[Key, str]], list[tuple[Key, str]]]] = []

    def pack(self, body: bytes) -> bytes:
        return body

    def post_batch(
        self, batch_id: str, body: bytes, *, packed: bytes | None = None, keys: Any = None
    ) -> IngestResult:
        obs = orjson.loads(body)["observations"]
        sent = [((o["series_id"], o["ts"]), o["revision"]) for o in obs]
        if self.max_rows is not None and len(obs) > self.max_rows:
            raise PayloadTooLargeError("GridPulse answered 413")
        if self.failures:
            kind = self.failures.pop(0)
            if kind == "429":
                raise RateLimitedError("GridPulse answered 429", 0.0, status=429)
            if kind == "timeout":
                raise SinkTransientError("GridPulse timed out")
            status = int(kind)
            raise SinkTransientError(
                f"GridPulse answered {kind}", status=status, rows_suspect=status in (500, 501, 505)
            )
        if any(k in self.poison for k, _ in sent):
            raise BatchRejectedError("GridPulse answered 422 POISONED", 422, "POISONED")
        answer, taken, refused = [], [], []
        for i, (key, rev) in enumerate(sent):
            if key in self.reject:
                answer.append(Rejection(i, key[0], key[1], "REJECTED", f"bad {key[1]}"))
                refused.append((key, rev))
            else:
                self.held[key] = rev
                taken.append((key, rev))
        self.posts.append((taken, refused))
        result = IngestResult(batch_id, len(taken), tuple(answer))
        if keys is not None:
            check_result(result, batch_id, keys)
        return result

    def health(self) -> bool:
        return True


def _config(batch_size: int) -> Config:
    return Config.model_validate(
        {
            "gridpulse": {
                "batch_size": batch_size,
                "retry": {"attempts": 3, "initial_backoff_seconds": 0, "max_backoff_seconds": 0},
                "defer_initial_seconds": 0,
            },
            "housekeeping": {"retention_days": 36500},
        }
    )


class OutboxMachine(RuleBasedStateMachine):
    """The outbox against its model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.db = self.dir / "outbox.db"
        self.store = Store.open(self.db)
        self.rows: dict[Key, Row] = {}
        self.marks: dict[str, str] = {}
        self.held: dict[Key, str] = {}
        self.pages = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- fetch -------------------------------------------------------------------------

    def _write_page(self, page: list[tuple[int, int, str | None]]) -> Path:
        data = [
            {
                "period": f"2025-08-01T{hour:02d}",
                "respondent": PAIRS[pair][0],
                "respondent-name": PAIRS[pair][0],
                "type": PAIRS[pair][1],
                "type-name": PAIRS[pair][1],
                "value": value,
                "value-units": "megawatthours",
            }
            for pair, hour, value in page
        ]
        self.pages += 1
        directory = self.dir / f"page{self.pages}"
        directory.mkdir()
        body = response_body(REGION, data, len(data), request_params_for(REGION, data))
        (directory / "page.json").write_bytes(orjson.dumps(body))
        return directory

    def _apply_page(self, page: list[tuple[int, int, str | None]]) -> None:
        last: dict[tuple[int, int], str | None] = {}
        for pair, hour, value in page:  # within a page the last row for a key wins
            last[(pair, hour)] = value
        bounds: dict[str, tuple[str, str]] = {}
        for (pair, hour), raw in last.items():
            sid, stream = SERIES[PAIRS[pair]]
            ts = f"2025-08-01T{hour:02d}:00:00Z"
            value = None if raw in (None, "") else float(raw)
            rev = revision_of(value, "missing" if value is None else "good", "MW")
            row = self.rows.get((sid, ts))
            if row is None:
                self.rows[(sid, ts)] = Row(value, rev)
            elif row.revision != rev:
                # Even a flip back to the acked revision travels again (see the test below).
                row.value, row.revision, row.code, row.state = value, rev, None, "pending"
            lo, hi = bounds.get(stream, (ts, ts))
            bounds[stream] = (min(lo, ts), max(hi, ts))
        for stream, (oldest, newest) in bounds.items():
            mark = self.marks.get(stream)
            continues = mark is None or parse_ts(oldest) <= parse_ts(mark) + timedelta(hours=1)
            if continues and (mark is None or newest > mark):
                self.marks[stream] = newest

    pages_st = st.lists(
        st.tuples(
            st.integers(0, len(PAIRS) - 1), st.integers(0, HOURS - 1), st.sampled_from(VALUES)
        ),
        min_size=1,
        max_size=12,
    )

    @rule(page=pages_st)
    def fetch(self, page: list[tuple[int, int, str | None]]) -> None:
        run_fetch(_config(5), self.store, ReplaySource(self._write_page(page)))
        self._apply_page(page)

    @rule(page=pages_st, point=st.sampled_from(FETCH_POINTS))
    def fetch_crashes(self, page: list[tuple[int, int, str | None]], point: str) -> None:
        directory = self._write_page(page)
        with crashing(point, 1), pytest.raises(Crash):
            run_fetch(_config(5), self.store, ReplaySource(directory))
        self._restart()  # a crashed page leaves nothing: the model is unchanged

    # -- send --------------------------------------------------------------------------

    def _gridpulse(self, outcome: str, failures: int, pick: int, limit: int) -> ScriptedGridPulse:
        gp = ScriptedGridPulse(self.held)
        pending = sorted(k for k, r in self.rows.items() if r.state == "pending")
        chosen = {k for i, k in enumerate(pending) if (i + pick) % 3 == 0}
        if outcome == "reject":
            gp.reject = chosen
        elif outcome == "poison":
            gp.poison = set(sorted(chosen)[:1])
        elif outcome == "413":
            gp.max_rows = limit
        elif outcome in ("429", "503", "500", "timeout"):
            gp.failures = [outcome] * failures
        return gp

    def _settle_model(self, gp: ScriptedGridPulse, torn: int | None) -> None:
        """Apply GridPulse's answers; post ``torn`` crashed before its outcome committed."""
        observed = {r[0]: r[3] for r in self._store_rows()}
        for i, (taken, refused) in enumerate(gp.posts):
            if i == torn:
                # Delivered, outcome rolled back: every row of it is still pending.
                assert {observed[k] for k, _ in taken + refused} <= {"pending"}, (taken, refused)
                continue
            for key, rev in taken:
                row = self.rows[key]
                assert row.revision == rev
                row.state, row.acked_revision, row.code = "acked", rev, None
            for key, _rev in refused:
                self.rows[key].state, self.rows[key].code = "dead", "REJECTED"
        for key in gp.poison:  # isolated by bisection within the run
            assert observed[key] == "dead", key
            self.rows[key].state, self.rows[key].code = "dead", "POISONED"

    @rule(
        outcome=st.sampled_from(OUTCOMES),
        failures=st.integers(1, 4),
        pick=st.integers(0, 2),
        limit=st.integers(1, 3),
        batch_size=st.integers(1, 6),
    )
    def send(self, outcome: str, failures: int, pick: int, limit: int, batch_size: int) -> None:
        gp = self._gridpulse(outcome, failures, pick, limit)
        try:
            run_send(_config(batch_size), self.store, GridPulseSink(gp), sleep=_no_sleep)
            failed = False
        except SendFailed:
            failed = True
            assert outcome in ("429", "503", "500", "timeout") and failures >= 3
        self._settle_model(gp, None)
        if not failed:  # a run that did not give up leaves nothing due
            assert [k for k, r in self.rows.items() if r.state == "pending"] == []

    @rule(
        point=st.sampled_from(SEND_POINTS),
        after=st.integers(1, 4),
        pick=st.integers(0, 2),
        batch_size=st.integers(1, 4),
    )
    def send_crashes(self, point: str, after: int, pick: int, batch_size: int) -> None:
        gp = self._gridpulse("reject" if pick == 0 else "accept", 0, pick, 1)
        torn = None
        try:
            with crashing(point, after):
                run_send(_config(batch_size), self.store, GridPulseSink(gp), sleep=_no_sleep)
        except Crash:
            if point in ("send.after_post", "settle.before_commit"):
                torn = len(gp.posts) - 1  # the post in flight: answered, not recorded
            elif point == "acks.before_commit":
                # Outcomes recorded, their rows not marked yet: the next send applies them
                # first. In-process the crash surfaces at the sender's next wait for the
                # acks, which may come after one more POST was answered and not recorded.
                self.store.delivery.apply_acks()
                observed = {r[0]: r[3] for r in self._store_rows()}
                last = gp.posts[-1] if gp.posts else ([], [])
                if all(observed[k] == "pending" for k, _ in last[0] + last[1]) and any(last):
                    torn = len(gp.posts) - 1
        self._settle_model(gp, torn)
        self._restart()

    # -- operations --------------------------------------------------------------------

    @rule()
    def restart(self) -> None:
        self._restart()

    @rule()
    def requeue(self) -> None:
        moved = self.store.delivery.requeue_dead()
        dead = [r for r in self.rows.values() if r.state == "dead"]
        assert moved == len(dead)
        for row in dead:
            row.state = "pending"

    def _restart(self) -> None:
        self.store.close()
        self.store = Store.open(self.db)

    # -- the comparison ----------------------------------------------------------------

    def _store_rows(self) -> list[tuple]:
        with self.store.read() as conn:
            return [
                ((r[0], r[1]), r[2], r[3], r[4], r[5], r[6])
                for r in conn.exec_driver_sql(
                    "SELECT o.series_id, o.ts, o.value, o.revision, coalesce(q.state, 'acked'),"
                    " q.revision, q.last_error_code FROM observations o"
                    " LEFT JOIN queue q ON q.ts = o.ts AND q.series_id = o.series_id"
                    " ORDER BY o.series_id, o.ts"
                ).all()
            ]

    @invariant()
    def outbox_equals_model(self) -> None:
        got = {r[0]: r[1:4] for r in self._store_rows()}
        want = {k: (r.value, r.revision, r.state) for k, r in self.rows.items()}
        assert got == want

    @invariant()
    def queue_holds_the_current_revision_of_every_row_not_acked(self) -> None:
        # A row is acked exactly when its queue entry is gone; an entry left is for the
        # revision staged now (an ack of an older one must not have removed it).
        for key, _value, revision, state, queued, _code in self._store_rows():
            assert queued == (None if state == "acked" else revision), key
        with self.store.read() as conn:
            entries = conn.exec_driver_sql("SELECT count(*) FROM queue").scalar()
        assert entries == sum(r.state != "acked" for r in self.rows.values())

    @invariant()
    def dead_rows_carry_their_code(self) -> None:
        for key, _value, _rev, state, _acked, code in self._store_rows():
            if state == "dead":
                assert code == self.rows[key].code, key

    @invariant()
    def watermarks_equal_model(self) -> None:
        assert self.store.staging.watermarks() == self.marks

    @invariant()
    def nothing_acked_that_gridpulse_does_not_hold(self) -> None:
        for key, row in self.rows.items():
            if row.state == "acked":
                assert self.held.get(key) == row.revision == row.acked_revision, key

    @invariant()
    def delivered_through_equals_model(self) -> None:
        want: dict[str, str | None] = {}
        for sid, _ in SERIES.values():
            mine = sorted((k[1], r.state) for k, r in self.rows.items() if k[0] == sid)
            if not mine:
                continue
            pending = [ts for ts, state in mine if state == "pending"]
            if not pending:
                want[sid] = mine[-1][0]
            else:
                before = [ts for ts, _ in mine if ts < pending[0]]
                want[sid] = before[-1] if before else None
        assert delivered_through(self.store) == want


class crashing:
    """Raise :class:`Crash` the ``after``-th time the stages reach crash point ``point``."""

    def __init__(self, point: str, after: int) -> None:
        self.point, self.after, self.seen = point, after, 0
        self.saved: list[tuple[Any, Callable[[str], None]]] = []

    def hit(self, name: str) -> None:
        if name == self.point:
            self.seen += 1
            if self.seen == self.after:
                raise Crash(name)

    def __enter__(self) -> crashing:
        for module in (fetcher_mod, send_mod, stage_mod, deliver_mod):
            self.saved.append((module, module.crashpoint))
            module.crashpoint = self.hit  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        for module, original in self.saved:
            module.crashpoint = original  # type: ignore[attr-defined]


def _no_sleep(_seconds: float) -> None:
    return None


def test_outbox_matches_its_model(scale: str, figures) -> None:
    examples, steps = EXAMPLES[scale]
    run_state_machine_as_test(
        OutboxMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
    figures(suite="model", examples=examples, steps_per_example=steps, lost=0, duplicates=0)


def test_flip_back_after_an_unacknowledged_delivery_is_sent_again(tmp_path: Path) -> None:
    """Found by the model: GridPulse holds A; EIA revises to B; B is delivered but the
    process dies before the ack commits; EIA flips back to A. The row must not count as
    acknowledged at A: GridPulse holds B, so A has to travel again."""
    held: dict[Key, str] = {}
    key = ("EIA.PJM.demand", "2025-08-01T03:00:00Z")
    with Store.open(tmp_path / "outbox.db") as store:
        steps = (("10", None), ("20", "settle.before_commit"), ("10", None))
        for n, (value, crash) in enumerate(steps):
            directory = tmp_path / f"page{n}"
            directory.mkdir()
            data = [
                {"period": "2025-08-01T03", "respondent": "PJM", "type": "D"}
                | {"value": value, "value-units": "megawatthours"}
            ]
            body = response_body(REGION, data, 1, request_params_for(REGION, data))
            (directory / "page.json").write_bytes(orjson.dumps(body))
            run_fetch(_config(5), store, ReplaySource(directory))
            if crash is None:
                run_send(_config(5), store, GridPulseSink(ScriptedGridPulse(held)), sleep=_no_sleep)
                continue
            with crashing(crash, 1), pytest.raises(Crash):
                run_send(_config(5), store, GridPulseSink(ScriptedGridPulse(held)), sleep=_no_sleep)
        row = store.reads.row(*key)
    assert row is not None and row["state"] == "acked"
    assert held[key] == row["revision"] == revision_of(10.0, "good", "MW")
