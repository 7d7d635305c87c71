"""EIA requests in flight together (``eia.max_in_flight``): pages fetched concurrently
are staged exactly as a one-after-another fetch stages them.

The stand-in EIA answers later pages first (``delay_for``), shortens a page, or fails
one; the outbox (pages, rows, watermarks, progress, backfill chunks) must equal a
sequential run's, and a fatal error must leave exactly the pages before it.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
from durability import KEY_EIA, T0, await_run, outbox_env, route_rows, spawn

from outbox.config import Config
from outbox.errors import SourceFatalError
from outbox.ports import ROUTE_REGION, Page, Request
from outbox.retry import RetryPolicy
from outbox.sources.eia import EIAClient, RateLimiter
from outbox.sources.inflight import iter_in_order
from outbox.stages.fetch import run_fetch
from outbox.store import Store
from outbox.testing.fake_eia import FakeEIA, Reply

HOURS = 36
END = T0 + timedelta(hours=HOURS - 1)
PAGE = 150
CONFIG = Config.model_validate(
    {"eia": {"history_start": "2025-06-01T00:00:00Z", "backfill_chunk_hours": 12}}
)
TABLES = {
    "pages": "SELECT id, route, params, page_no, page_offset, total, row_count FROM pages",
    "observations": "SELECT series_id, ts, value, revision, page_id, page_row FROM observations",
    "watermarks": "SELECT stream, dataset, respondent, route, last_ts FROM watermarks",
    "progress": "SELECT stream, dataset, respondent, asked_through FROM stream_progress",
    "meta": "SELECT key, value FROM meta WHERE key LIKE 'backfill:%'",
}


def offset_of(target: str) -> int:
    return int(dict(parse_qsl(urlsplit(target).query)).get("offset", "0"))


def later_pages_first(target: str) -> float:
    """Page 0 of a request slowest, each later page quicker: completions come reversed."""
    return max(0.0, 0.12 - 0.03 * (offset_of(target) // PAGE))


def snapshot(db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(db) as con:
        return {name: sorted(con.execute(sql).fetchall()) for name, sql in TABLES.items()}


@pytest.fixture
def fake() -> Iterator[FakeEIA]:
    with FakeEIA(route_rows(HOURS)) as server:
        yield server


def fetch_into(
    db: Path, fake: FakeEIA, in_flight: int, *, backfill: bool, **client: object
) -> EIAClient:
    assert fake.base_url is not None
    with httpx.Client() as http, Store.open(db) as store:
        eia = EIAClient(
            http,
            fake.base_url,
            None,
            page_length=PAGE,
            max_per_second=50,
            max_in_flight=in_flight,
            **client,  # type: ignore[arg-type]
        )
        now = END + timedelta(hours=2)
        if backfill:
            run_fetch(CONFIG, store, eia, start=T0, end=END, now=now)
        else:
            run_fetch(CONFIG, store, eia, now=now)
    return eia


@pytest.mark.parametrize("backfill", [True, False], ids=["backfill", "incremental"])
def test_out_of_order_completions_stage_as_a_sequential_fetch(
    fake: FakeEIA, tmp_path: Path, backfill: bool
) -> None:
    fetch_into(tmp_path / "seq.db", fake, 1, backfill=backfill)
    assert fake.peak_in_flight == 1
    fake.delay_for = later_pages_first
    fake.peak_in_flight = 0
    fake.answered.clear()
    fetch_into(tmp_path / "conc.db", fake, 4, backfill=backfill)
    assert fake.peak_in_flight >= 3
    # Some request's pages were answered out of their order.
    done = [(urlsplit(t).path, offset_of(t)) for t in fake.answered]
    assert any(a[0] == b[0] and a[1] > b[1] for a, b in pairwise(done))
    seq, conc = snapshot(tmp_path / "seq.db"), snapshot(tmp_path / "conc.db")
    assert len(seq["pages"]) >= 12 and seq["observations"]
    assert len(seq["meta"]) == 3 if backfill else seq["watermarks"] and seq["progress"]
    assert conc == seq


class ShortPage(FakeEIA):
    """Answers the page at ``offset`` with ``keep`` rows only (a short, non-last page)."""

    offset = PAGE
    keep = 40

    def handle(self, target: str) -> Reply:
        status, headers, body = super().handle(target)
        if offset_of(target) != self.offset or urlsplit(target).path.find("region") < 0:
            return status, headers, body
        doc = orjson.loads(body)
        doc["response"]["data"] = doc["response"]["data"][: self.keep]
        return status, headers, orjson.dumps(doc)


def test_a_short_page_is_continued_where_it_ended(tmp_path: Path) -> None:
    with ShortPage(route_rows(HOURS)) as short:
        fetch_into(tmp_path / "seq.db", short, 1, backfill=False)
        fetch_into(tmp_path / "conc.db", short, 4, backfill=False)
    seq, conc = snapshot(tmp_path / "seq.db"), snapshot(tmp_path / "conc.db")
    assert any(row[6] == ShortPage.keep for row in seq["pages"])
    assert conc == seq


def start_of(target: str) -> str:
    return dict(parse_qsl(urlsplit(target).query)).get("start", "")


class FatalAt(FakeEIA):
    """A 400 for page 1 of the second region window (the fourth page of the run)."""

    offset = PAGE

    def handle(self, target: str) -> Reply:
        second = start_of(target) == "2025-06-01T12"
        if "region" in target and second and offset_of(target) == self.offset:
            return 400, {"Content-Type": "application/json"}, b'{"error": "bad", "code": 400}'
        return super().handle(target)


def test_a_fatal_error_mid_flight_leaves_exactly_the_pages_before_it(tmp_path: Path) -> None:
    errors = []
    with FatalAt(route_rows(HOURS), delay_for=later_pages_first) as fatal:
        for name, n in (("seq", 1), ("conc", 4)):
            with pytest.raises(SourceFatalError) as caught:
                fetch_into(tmp_path / f"{name}.db", fatal, n, backfill=False)
            errors.append(str(caught.value))
        assert fatal.peak_in_flight >= 3
    assert errors[0] == errors[1] and "page 1 (offset 150)" in errors[0]
    seq, conc = snapshot(tmp_path / "seq.db"), snapshot(tmp_path / "conc.db")
    assert [(r[1], r[3]) for r in seq["pages"]] == [(ROUTE_REGION, n) for n in (0, 1, 0)]
    assert conc == seq


def test_a_stopped_walk_cuts_short_a_page_waiting_to_retry(tmp_path: Path) -> None:
    """A page after a fatal one is waiting to retry (503, Retry-After 30 s): the run still
    ends at once, and the thread waiting on it ends too."""

    class Stuck(FakeEIA):
        """Page 1 of the first region window is fatal; the second window's first page
        answers 503 with a 30 s Retry-After, every time."""

        def handle(self, target: str) -> Reply:
            if "region" in target and start_of(target) == "2025-06-01T12":
                return 503, {"Retry-After": "30"}, b"busy"
            if "region" in target and offset_of(target) == PAGE:
                return 400, {"Content-Type": "application/json"}, b'{"error": "bad", "code": 400}'
            return super().handle(target)

    retry = RetryPolicy(attempts=5, initial=30.0, maximum=30.0)
    with Stuck(route_rows(HOURS)) as s:
        started = time.monotonic()
        with pytest.raises(SourceFatalError):
            fetch_into(tmp_path / "stuck.db", s, 4, backfill=False, retry=retry)
        assert time.monotonic() - started < 10
        assert any(start_of(t) == "2025-06-01T12" for t in s.requests)
    pending = [t for t in threading.enumerate() if t.name.startswith("eia-fetch")]
    for thread in pending:
        thread.join(5)
        assert not thread.is_alive()


def test_the_limiter_never_exceeds_its_rate_under_threads() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, 50, sleep=clock.sleep, clock=clock)
    granted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            slot, wait = limiter.reserve()
            with lock:
                granted.append(slot)
            clock.sleep(wait)
            clock.sleep(random.random() / 10)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted.sort()
    assert len(granted) == 160
    assert min(b - a for a, b in pairwise(granted)) >= 0.25 - 1e-9
    for i in range(len(granted) - 50):
        assert granted[i + 50] - granted[i] >= 3600.0 - 1e-9  # at most 50 in any hour


class FakeClock:
    """A monotonic clock that a thread's sleep moves forward (never backwards)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += max(0.0, seconds)


def test_iter_in_order_follows_a_total_that_grows() -> None:
    """Page 0 says 10 rows; page 1 (offset 4) says 14, so a third page is asked after it."""
    request = Request(ROUTE_REGION, ("PJM",), (), T0, END)
    totals = {0: 10, 4: 14, 8: 14, 12: 14}
    asked: list[int] = []

    def fetch(req: Request, page_no: int, offset: int) -> Page:
        asked.append(offset)
        time.sleep(0.02 if offset == 0 else 0)
        total = totals[offset]
        n = min(4, total - offset)
        rows = [{"period": f"2025-06-01T{offset + i:02d}"} for i in range(n)]
        return Page(req.route, page_no, offset, total, rows, b"", {}, "", last=offset + n >= total)

    pages = list(
        iter_in_order(
            [request, request],
            fetch,
            page_length=4,
            max_in_flight=3,
            stop=threading.Event(),
        )
    )
    got = [(i, p.page_no, p.offset, p.last) for i, p in pages]
    expected = [(0, 0, 0, False), (0, 1, 4, False), (0, 2, 8, False), (0, 3, 12, True)]
    assert got[:4] == expected and got[4:] == [(1, *e[1:]) for e in expected]


def test_in_flight_is_validated() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        EIAClient(httpx.Client(), "http://127.0.0.1:9/v2", None, max_in_flight=0)
    with pytest.raises(ValueError):
        Config.model_validate({"eia": {"max_in_flight": 0}})
    assert Config().eia.max_in_flight == 4


def test_sigterm_with_requests_in_flight_exits_at_once_and_quietly(tmp_path: Path) -> None:
    """The abandoned requests' threads do not hold the process: it exits in well under
    the stand-in's 30 s answer, with no retry lines for the reads cut short."""
    rows = route_rows(24)
    with FakeEIA(rows, api_key=KEY_EIA, delay=30.0) as fake:
        assert fake.base_url is not None
        db = tmp_path / "outbox.db"
        env = outbox_env(db, eia_base=fake.base_url, OUTBOX__EIA__MAX_IN_FLIGHT="4")
        log = tmp_path / "fetch.log"
        end = (T0 + timedelta(hours=23)).isoformat()
        proc = spawn("fetch", "--start", T0.isoformat(), "--end", end, env=env, log=log)
        await_run(db, proc, "fetch")
        deadline = time.monotonic() + 20
        while len(fake.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fake.requests) >= 3, log.read_text()  # the three routes are in flight
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - sent
    said = log.read_text()
    assert code == 128 + signal.SIGTERM, said
    assert took < 5, f"took {took:.1f} s to stop"
    assert "Traceback" not in said and "eia retry" not in said, said
    plain = [line for line in said.splitlines() if not line.startswith("ts=")]
    assert plain == ["interrupted by SIGTERM: stopped; every row keeps its last state"], said


def test_pandas_is_preloaded_while_the_first_answers_are_awaited(
    fake: FakeEIA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """outbox.preload starts before any request is made (the import runs while EIA answers)."""
    import outbox.stages.fetcher

    asked_before: list[int] = []
    monkeypatch.setattr(
        outbox.stages.fetcher, "preload", lambda: asked_before.append(len(fake.requests))
    )
    fetch_into(tmp_path / "o.db", fake, 4, backfill=False)
    assert asked_before and asked_before[0] == 0 and len(fake.requests) > 0
