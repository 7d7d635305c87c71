"""Streams EIA has no rows for: asked once, then from how far EIA has answered them.

A watermark moves only when rows arrive; ``stream_progress.asked_through`` records how far
EIA has been asked for a stream and has answered completely (never past now - the
dataset's publication lag). These tests fetch through the stand-in EIA server on
127.0.0.1 into real outboxes, with the run's clock given as ``now``.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from durability import outbox, outbox_env
from factories import obs, page, series_row, ts
from freezegun import freeze_time
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import Config
from outbox.errors import OutboxFullError, SourceTransientError
from outbox.ports import ROUTE_FUEL, ROUTE_INTERCHANGE, ROUTE_REGION
from outbox.retry import RetryPolicy
from outbox.sources.eia import EIAClient
from outbox.stages.fetch import run_fetch
from outbox.stages.plan import plan_incremental, plan_streams, with_lookback
from outbox.store import ProgressUpdate, Store
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import ROUTES, make_rows
from outbox.timeutil import floor_hour, parse_ts, to_ts, utcnow

KEY = "eia-progress-key-0123456789"
NOW = datetime(2025, 8, 22, 12, 20, tzinfo=UTC)  # the hourly fetch runs at :15-:20
HISTORY = NOW.replace(hour=0, minute=0) - timedelta(days=40)  # two 744-hour chunks back
BAS = {"PJM": "PJM", "CAISO": "CISO", "GENX": "GENX"}
# GENX is generation-only: no demand, no forecast; CISO publishes no day-ahead forecast;
# only PJM has BA-to-BA interchange rows (the synthetic data has no GENX neighbours).
EMPTY = {
    "demand_forecast:CISO",
    "ba_interchange:CISO",
    "demand:GENX",
    "demand_forecast:GENX",
    "ba_interchange:GENX",
}
REGION_DATASET = {
    "D": "demand",
    "DF": "demand_forecast",
    "NG": "net_generation",
    "TI": "interchange",
}
LAGS = {  # the defaults (eia-v2.md "Publication lag")
    "demand": 2,
    "demand_forecast": 0,
    "net_generation": 30,
    "interchange": 30,
    "generation": 30,
    "ba_interchange": 54,
}


def stream_of(route: str, row: dict) -> str:
    if route == ROUTE_REGION:
        return f"{REGION_DATASET[row['type']]}:{row['respondent']}"
    if route == ROUTE_FUEL:
        return f"generation:{row['respondent']}"
    return f"ba_interchange:{row['fromba']}"


def published(through: datetime, *, also: frozenset[str] = frozenset()) -> dict[str, list]:
    """What EIA holds at ``through``: every stream but the empty ones (unless in ``also``)."""
    hours = int((floor_hour(through) - HISTORY) / timedelta(hours=1)) + 1
    out = {}
    for route in ROUTES:
        rows = make_rows(route, sorted(BAS.values()), HISTORY, hours)
        out[route] = [r for r in rows if stream_of(route, r) not in EMPTY - also]
    return out


def config(base_url: str, **datasets: dict) -> Config:
    return Config.model_validate(
        {
            "balancing_authorities": BAS,
            "datasets": datasets,
            "eia": {"base_url": base_url, "history_start": to_ts(HISTORY)},
            "housekeeping": {"retention_days": 36500},
        }
    )


@pytest.fixture
def fake() -> Iterator[FakeEIA]:
    with FakeEIA(published(NOW), api_key=KEY) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as client:
        yield client


def client(http: httpx.Client, fake: FakeEIA) -> EIAClient:
    assert fake.base_url is not None
    return EIAClient(
        http, fake.base_url, KEY, retry=RetryPolicy.no_wait(attempts=1), max_per_second=0
    )


def fetch(store: Store, cfg: Config, http: httpx.Client, fake: FakeEIA, now: datetime, **kw):
    """One incremental fetch at ``now``; returns the requests it made, as (route, query)."""
    fake.requests.clear()
    run_fetch(cfg, store, client(http, fake), now=now, **kw)
    return [request_of(target) for target in fake.requests]


def request_of(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    route = parts.path.removeprefix("/v2/").removesuffix("/data/")
    return route, dict(parse_qsl(parts.query))


def progress(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT stream, asked_through FROM stream_progress").fetchall()
    con.close()
    return dict(rows)


def cutoff(now: datetime, dataset: str) -> str:
    return to_ts(floor_hour(now) - timedelta(hours=LAGS[dataset]))


# -- planning --------------------------------------------------------------------------


def test_plan_starts_a_stream_from_its_progress_when_newer_than_its_watermark() -> None:
    cfg = config("https://eia.test/v2")
    streams = plan_streams(cfg)
    marks = {s.key: "2025-08-22T11:00:00Z" for s in streams if s.key not in EMPTY}
    asked = {s.key: cutoff(NOW, s.dataset) for s in streams}
    asked["demand:PJM"] = "2025-08-19T00:00:00Z"  # older than its watermark: the mark wins
    without = plan_incremental(cfg, streams, marks, NOW)
    windows = plan_incremental(cfg, streams, marks, NOW, progress=asked)
    # Without progress the empty streams start at history start, in 744-hour chunks.
    assert [w.start for w in without if w.route == ROUTE_REGION][:2] == [
        HISTORY,
        HISTORY + timedelta(hours=744),
    ]
    assert [w.route for w in windows] == [ROUTE_REGION, ROUTE_FUEL, ROUTE_INTERCHANGE]
    region, _, interchange = windows
    # GENX's demand, answered through 08-22T10 (2 h lag), minus 72 h: before every
    # watermark (08-22T11) and every other progress minus its look-back.
    assert region.start == datetime(2025, 8, 19, 10, tzinfo=UTC)
    assert len(region.streams) == 3 * 4
    assert region.end == datetime(2025, 8, 24, 12, tzinfo=UTC)  # the forecast horizon
    # BA-to-BA interchange: CISO and GENX answered through 08-20T06 (54 h lag), minus 96 h.
    assert interchange.start == datetime(2025, 8, 16, 6, tzinfo=UTC)
    # The deep re-check (fetch --lookback 336) goes back from the same point.
    deep = plan_incremental(with_lookback(cfg, 336), streams, marks, NOW, progress=asked)
    assert deep[0].start == datetime(2025, 8, 8, 10, tzinfo=UTC)


# -- fetching --------------------------------------------------------------------------


def test_five_empty_streams_are_asked_once_then_one_request_per_route(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")
    first = fetch(store, cfg, http, fake, NOW)
    assert len(first) > 3  # the history, in 744-hour chunks (and pages of 5,000 rows)
    assert EMPTY.isdisjoint(store.staging.watermarks())
    later = NOW + timedelta(hours=1)
    fake.set_rows(ROUTE_REGION, published(later)[ROUTE_REGION])
    second = fetch(store, cfg, http, fake, later)
    assert Counter(route for route, _ in second) == {r: 1 for r in ROUTES}
    starts = {route: query["start"] for route, query in second}
    # From the oldest point any stream of the route needs again: answered through (or
    # the watermark) minus the look-back (72 h; 96 h for fuel type and BA-to-BA).
    assert starts == {
        ROUTE_REGION: "2025-08-19T10",  # GENX's demand: answered through 08-22T10 by run 1
        ROUTE_FUEL: "2025-08-18T12",  # the watermarks, 08-22T12
        ROUTE_INTERCHANGE: "2025-08-16T06",  # CISO, GENX: answered through 08-20T06
    }
    asked = progress(db_path)
    assert {k: v for k, v in asked.items() if k in EMPTY} == {
        s: cutoff(later, s.split(":")[0]) for s in EMPTY
    }
    assert EMPTY.isdisjoint(store.staging.watermarks())
    assert len(asked) == 3 * 6  # every configured stream answered, with rows or without


def test_asked_through_never_passes_now_minus_the_publication_lag(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "", demand={"publication_lag_hours": 5})
    fetch(store, cfg, http, fake, NOW)
    asked = progress(db_path)
    assert len(asked) == 18
    lags = {**LAGS, "demand": 5}
    for stream, through in asked.items():
        limit = floor_hour(NOW) - timedelta(hours=lags[stream.split(":")[0]])
        # The windows reach now (the forecast's the horizon): each stops at its limit.
        assert parse_ts(through) == limit, stream
    assert asked["demand_forecast:PJM"] == "2025-08-22T12:00:00Z"
    assert asked["demand:GENX"] == "2025-08-22T07:00:00Z"


def test_a_new_ba_picks_up_its_first_rows_on_the_run_after_they_appear(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")
    fetch(store, cfg, http, fake, NOW)
    fetch(store, cfg, http, fake, NOW + timedelta(hours=1))
    assert "demand:GENX" not in store.staging.watermarks()
    # EIA starts publishing GENX's demand, with its last two days.
    appear = NOW + timedelta(hours=2)
    rows = published(appear, also=frozenset({"demand:GENX"}))[ROUTE_REGION]
    first = floor_hour(appear) - timedelta(hours=47)
    rows = [
        r
        for r in rows
        if stream_of(ROUTE_REGION, r) != "demand:GENX"
        or r["period"] >= first.strftime("%Y-%m-%dT%H")
    ]
    fake.set_rows(ROUTE_REGION, rows)
    fetch(store, cfg, http, fake, appear)
    con = sqlite3.connect(db_path)
    staged = [
        r[0]
        for r in con.execute(
            "SELECT ts FROM observations WHERE series_id = ? ORDER BY ts", ("EIA.GENX.demand",)
        )
    ]
    con.close()
    assert staged[0] == to_ts(first) and staged[-1] == to_ts(floor_hour(appear))
    assert len(staged) == 48
    assert store.staging.watermarks()["demand:GENX"] == to_ts(floor_hour(appear))


def genx_demand(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    staged = [
        r[0]
        for r in con.execute(
            "SELECT ts FROM observations WHERE series_id = ? ORDER BY ts", ("EIA.GENX.demand",)
        )
    ]
    con.close()
    return staged


APPEAR = NOW + timedelta(hours=2)
# The first hour of GENX's demand when EIA starts publishing it at APPEAR with ten days of
# history: more than the 72 h look-back from where the stream was answered (08-22T11).
GENX_FIRST = floor_hour(APPEAR) - timedelta(hours=239)


def publish_genx_demand(fake: FakeEIA, now: datetime, since: datetime = GENX_FIRST) -> None:
    """EIA's region rows at ``now``, GENX's demand among them from ``since``."""
    rows = published(now, also=frozenset({"demand:GENX"}))[ROUTE_REGION]
    first = since.strftime("%Y-%m-%dT%H")
    fake.set_rows(
        ROUTE_REGION,
        [r for r in rows if stream_of(ROUTE_REGION, r) != "demand:GENX" or r["period"] >= first],
    )


def test_a_new_ba_with_more_history_than_the_look_back_gets_all_of_it_by_the_next_run(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")
    fetch(store, cfg, http, fake, NOW)
    fetch(store, cfg, http, fake, NOW + timedelta(hours=1))
    publish_genx_demand(fake, APPEAR)
    third = fetch(store, cfg, http, fake, APPEAR)
    # One request per route, as before: the rows from the window start on are staged
    # (76 of the 240 hours), and, with them, that the hours before it are still to fetch.
    assert Counter(route for route, _ in third) == {r: 1 for r in ROUTES}
    window_start = datetime(2025, 8, 19, 11, tzinfo=UTC)
    staged = genx_demand(db_path)
    assert staged[0] == to_ts(window_start) and len(staged) == 76
    assert store.staging.history_markers() == {"demand:GENX": to_ts(window_start)}
    # The next run fetches GENX's demand from history start to that hour, newest first,
    # in 744-hour chunks (two: 899 hours), besides its one request per route.
    later = APPEAR + timedelta(hours=1)
    publish_genx_demand(fake, later)
    fourth = fetch(store, cfg, http, fake, later)
    assert Counter(route for route, _ in fourth) == {
        ROUTE_REGION: 3,
        ROUTE_FUEL: 1,
        ROUTE_INTERCHANGE: 1,
    }
    history = [
        q for route, q in fourth if route == ROUTE_REGION and q["facets[respondent][]"] == "GENX"
    ]
    assert [(q["start"], q["end"]) for q in history] == [
        ("2025-07-19T11", "2025-08-19T10"),
        ("2025-07-13T00", "2025-07-19T10"),
    ]
    staged = genx_demand(db_path)
    assert staged[0] == to_ts(GENX_FIRST) and staged[-1] == to_ts(floor_hour(later))
    assert len(staged) == 241  # the 240 hours published at 14:00, and 15:00
    assert store.staging.history_markers() == {}
    # From then on, one request per route again.
    last = later + timedelta(hours=1)
    publish_genx_demand(fake, last)
    assert Counter(r for r, _ in fetch(store, cfg, http, fake, last)) == {r: 1 for r in ROUTES}
    assert len(genx_demand(db_path)) == 242


def test_a_new_ba_whose_rows_begin_inside_the_window_needs_no_more_requests(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")
    fetch(store, cfg, http, fake, NOW)
    fetch(store, cfg, http, fake, NOW + timedelta(hours=1))
    since = floor_hour(APPEAR) - timedelta(hours=47)  # after the window start, 08-19T11
    publish_genx_demand(fake, APPEAR, since)
    fetch(store, cfg, http, fake, APPEAR)
    assert len(genx_demand(db_path)) == 48 and store.staging.history_markers() == {}
    later = APPEAR + timedelta(hours=1)
    publish_genx_demand(fake, later, since)
    assert Counter(r for r, _ in fetch(store, cfg, http, fake, later)) == {r: 1 for r in ROUTES}
    assert len(genx_demand(db_path)) == 49


def test_the_history_marker_commits_with_the_first_rows_and_moves_down_chunk_by_chunk(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")
    fetch(store, cfg, http, fake, NOW)
    fetch(store, cfg, http, fake, NOW + timedelta(hours=1))
    publish_genx_demand(fake, APPEAR)
    # The page with GENX's first rows is refused: neither they, their watermark nor the
    # marker are written.
    store.staging.limit_size(max_rows=store.staging.count_rows() + 1, max_bytes=None)
    with pytest.raises(OutboxFullError):
        fetch(store, cfg, http, fake, APPEAR)
    assert genx_demand(db_path) == [] and store.staging.history_markers() == {}
    assert "demand:GENX" not in store.staging.watermarks()
    store.staging.limit_size(None, None)
    fetch(store, cfg, http, fake, APPEAR)
    assert store.staging.history_markers() == {"demand:GENX": "2025-08-19T11:00:00Z"}
    # The next run fails after the newer history chunk: the marker has moved down to it.
    later = APPEAR + timedelta(hours=1)
    publish_genx_demand(fake, later)

    def fail_after_the_first_history_chunk(done: int, total: int, window: object) -> None:
        if done == total - 1:
            fake.fail_next(status=500)

    with pytest.raises(SourceTransientError):
        fetch(store, cfg, http, fake, later, progress=fail_after_the_first_history_chunk)
    assert store.staging.history_markers() == {"demand:GENX": "2025-07-19T11:00:00Z"}
    # The run after asks for the rest only, once, and clears the marker.
    again = fetch(store, cfg, http, fake, later)
    history = [q for r, q in again if r == ROUTE_REGION and q["facets[respondent][]"] == "GENX"]
    assert [(q["start"], q["end"]) for q in history] == [("2025-07-13T00", "2025-07-19T10")]
    assert store.staging.history_markers() == {}
    staged = genx_demand(db_path)
    assert staged[0] == to_ts(GENX_FIRST) and len(staged) == 241


def test_a_run_far_behind_resumes_after_the_last_window_eia_answered(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")

    def fail_after_first_window(done: int, total: int, window: object) -> None:
        if done == 1:
            fake.fail_next(status=500)

    with pytest.raises(SourceTransientError):
        fetch(store, cfg, http, fake, NOW, progress=fail_after_first_window)
    chunk_end = to_ts(HISTORY + timedelta(hours=743))  # the first 744-hour chunk
    asked = progress(db_path)
    assert set(asked) == {s.key for s in plan_streams(cfg) if s.route == ROUTE_REGION}
    assert set(asked.values()) == {chunk_end}
    again = fetch(store, cfg, http, fake, NOW)
    region = [query for route, query in again if route == ROUTE_REGION]
    # One window from the chunk's end minus the look-back, not from history start again.
    expected = to_ts(parse_ts(chunk_end) - timedelta(hours=72))
    assert {q["start"] for q in region} == {expected[:13]}


def test_a_page_that_fails_to_stage_leaves_the_progress_as_it_was(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client
) -> None:
    cfg = config(fake.base_url or "")
    fetch(store, cfg, http, fake, NOW)
    before = progress(db_path), store.staging.watermarks(), store.staging.count_rows()
    later = NOW + timedelta(hours=1)
    fake.set_rows(ROUTE_REGION, published(later)[ROUTE_REGION])
    # The region window's only (and so last) page brings the new hour's rows; the ceiling
    # refuses it, and with it the progress and watermarks it carried.
    store.staging.limit_size(max_rows=store.staging.count_rows() + 1, max_bytes=None)
    with pytest.raises(OutboxFullError):
        fetch(store, cfg, http, fake, later)
    assert (progress(db_path), store.staging.watermarks(), store.staging.count_rows()) == before
    store.staging.limit_size(None, None)
    fetch(store, cfg, http, fake, later)
    assert progress(db_path)["demand_forecast:GENX"] == to_ts(floor_hour(later))


# -- the store -------------------------------------------------------------------------


def test_stage_writes_progress_with_the_rows_never_backwards_and_not_on_failure(
    store: Store, db_path: Path
) -> None:
    def asked(hour: int) -> ProgressUpdate:
        return ProgressUpdate("demand:GENX", "demand", "GENX", ts(hour))

    sid = "EIA.PJM.demand"
    store.staging.stage(
        [obs(sid, 0)], series_rows=[series_row(sid)], page=page(), progress_updates=[asked(5)]
    )
    assert store.staging.stream_progress() == {"demand:GENX": ts(5)}
    store.staging.stage([], progress_updates=[asked(3)])
    assert store.staging.stream_progress() == {"demand:GENX": ts(5)}
    bad = (*obs(sid, 1)[:2], None, "MW", "good", "x", 0)  # breaks a CHECK constraint
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        store.staging.stage(
            [bad], series_rows=[series_row(sid)], page=page(), progress_updates=[asked(9)]
        )
    assert store.staging.stream_progress() == {"demand:GENX": ts(5)}
    assert store.reads.row(sid, ts(1)) is None


# -- what a user sees ------------------------------------------------------------------


def test_status_shows_no_data_at_eia_through(
    store: Store, db_path: Path, fake: FakeEIA, http: httpx.Client, tmp_path: Path
) -> None:
    cfg = config(fake.base_url or "")
    fetch(store, cfg, http, fake, NOW)
    (tmp_path / "c.yaml").write_text(
        f"database: {db_path}\nbalancing_authorities: {json.dumps(BAS)}\n"
    )
    runner = CliRunner()
    with freeze_time(NOW + timedelta(minutes=5)):
        table = runner.invoke(
            app, ["-c", str(tmp_path / "c.yaml"), "status"], env={"COLUMNS": "120"}
        )
        data = runner.invoke(app, ["-c", str(tmp_path / "c.yaml"), "status", "--json"])
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if "no data" in line]
    assert lines == [
        "no data at EIA through 08-22 12:00: demand_forecast CAISO, demand_forecast GENX",
        "no data at EIA through 08-22 10:00: demand GENX",
        "no data at EIA through 08-20 06:00: ba_interchange CAISO, ba_interchange GENX",
    ]
    assert data.exit_code == 0, data.output
    missing = json.loads(data.stdout)["missing"]
    assert {(m["dataset"], m["ba"]): m["asked_through"] for m in missing} == {
        ("demand_forecast", "CAISO"): "2025-08-22T12:00:00Z",
        ("demand_forecast", "GENX"): "2025-08-22T12:00:00Z",
        ("demand", "GENX"): "2025-08-22T10:00:00Z",
        ("ba_interchange", "CAISO"): "2025-08-20T06:00:00Z",
        ("ba_interchange", "GENX"): "2025-08-20T06:00:00Z",
    }


def test_two_fetch_commands_the_second_one_request_per_route(tmp_path: Path) -> None:
    now = utcnow()
    # Far enough back that the empty streams would form groups of their own, in chunks.
    start = floor_hour(now) - timedelta(days=12)
    rows = {}
    hours = int((floor_hour(now) - start) / timedelta(hours=1)) + 1
    for route in ROUTES:
        made = make_rows(route, sorted(BAS.values()), start, hours)
        rows[route] = [r for r in made if stream_of(route, r) not in EMPTY]
    db = tmp_path / "cli.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"balancing_authorities: {json.dumps(BAS)}\n")
    with FakeEIA(rows) as fake:
        env = outbox_env(
            db,
            eia_base=fake.start(),
            OUTBOX_CONFIG=str(cfg),
            OUTBOX__EIA__HISTORY_START=to_ts(start),
            OUTBOX__EIA__BACKFILL_CHUNK_HOURS="744",
        )
        first = outbox("fetch", env=env)
        assert first.returncode == 0, first.stderr
        fake.requests.clear()
        second = outbox("fetch", env=env)
        assert second.returncode == 0, second.stderr
        assert Counter(request_of(r)[0] for r in fake.requests) == {r: 1 for r in ROUTES}
    assert second.stdout.startswith("fetch run 2: 3 requests, 3 pages,")
    shown = outbox("status", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "no data at EIA through" in shown.stdout and "demand GENX" in shown.stdout
    assert "Traceback" not in first.stderr + second.stderr + shown.stderr
