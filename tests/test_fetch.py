"""The fetch stage end to end: replay, the stand-in EIA server, revisions, kills."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

import orjson
import pytest
from durability import await_run, outbox, processes_naming, work_seconds
from factories import ack, total_changes

from outbox.config import Config
from outbox.normalize import revision_of
from outbox.readahead import can_fork
from outbox.sample import sample_dir
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Key, Store
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import ROUTES, make_rows, read_rows, write_pages

KEY = "eia-test-key-0123456789"
ROW_FIELDS = (
    "series_id, ts, value, units, quality_flag, revision, page_id, page_row, state, attempts"
)


def snapshot(db: Path) -> list[tuple]:
    """Every observation row, minus the fetch timestamps (they are wall-clock)."""
    con = sqlite3.connect(db)
    rows = con.execute(f"SELECT {ROW_FIELDS} FROM row_states ORDER BY series_id, ts").fetchall()
    con.close()
    return rows


def tables(db: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(db)
    out = {
        "observations": con.execute("SELECT * FROM observations ORDER BY 1, 2").fetchall(),
        "pages": con.execute("SELECT id, body FROM pages ORDER BY id").fetchall(),
        "watermarks": con.execute("SELECT * FROM watermarks ORDER BY 1").fetchall(),
        "series": con.execute("SELECT * FROM series ORDER BY 1").fetchall(),
    }
    con.close()
    return out


def outbox_cmd(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    """``python -m outbox ARGS`` with ``env`` over this process's environment."""
    return outbox(*args, env={**os.environ, **env}, timeout=120, **kw)


def test_replay_of_sample_then_again_writes_nothing(store: Store, db_path: Path) -> None:
    config = Config()
    first = run_fetch(config, store, ReplaySource(sample_dir()))
    expected = sum(len(v) for v in read_rows(sample_dir()).values())
    assert first.rows == expected == 2376 and first.written == expected
    assert first.pages == 3 and sum(first.invalid.values()) == 0
    before = tables(db_path)
    with store.read() as conn:
        changes = total_changes(conn)
    again = run_fetch(config, store, ReplaySource(sample_dir()))
    assert again.written == 0 and again.rows == expected
    assert tables(db_path) == before
    with store.read() as conn:
        # The only writes of the second run are its own `runs` row (insert + finish).
        assert total_changes(conn) - changes == 2
    ids = {r[0] for r in before["series"]}
    assert {
        "EIA.PJM.demand",
        "EIA.CAISO.demand_forecast",
        "EIA.ERCOT.net_generation",
        "EIA.SPP.interchange",
        "EIA.CAISO.generation.solar",
    } <= ids
    assert any(i.startswith("EIA.PJM.interchange.") for i in ids)
    marks = dict((r[0], r[4]) for r in before["watermarks"])
    assert marks["demand:PJM"] == "2025-08-21T23:00:00Z"


def test_revised_value_in_one_page_puts_exactly_that_row_back(store: Store, tmp_path: Path) -> None:
    rows = make_rows(ROUTES[0], ["PJM", "CISO"], datetime(2025, 8, 21, tzinfo=UTC), 24)
    first = tmp_path / "v1"
    write_pages(first, ROUTES[0], rows)
    run_fetch(Config(), store, ReplaySource(first))
    ack(store, [Key(c.series_id, c.ts, c.revision) for c in store.delivery.claim(10_000)])
    target = next(
        r
        for r in rows
        if r["respondent"] == "CISO" and r["type"] == "D" and r["period"] == "2025-08-21T13"
    )
    target["value"] = str(int(target["value"]) + 250)
    second = tmp_path / "v2"
    write_pages(second, ROUTES[0], rows)
    result = run_fetch(Config(), store, ReplaySource(second))
    assert result.written == 1
    pending = store.delivery.claim(10_000)
    assert [(c.series_id, c.ts, c.value) for c in pending] == [
        ("EIA.CAISO.demand", "2025-08-21T13:00:00Z", float(target["value"]))
    ]
    assert pending[0].revision == revision_of(float(target["value"]), "good", "MW")


def test_fetch_subprocess_against_stand_in_eia(tmp_path: Path) -> None:
    rows = read_rows(sample_dir())
    db = tmp_path / "live.db"
    with FakeEIA(rows, api_key=KEY) as fake:
        base = fake.start()
        env = {
            "OUTBOX_DB": str(db),
            "EIA_BASE_URL": base,
            "EIA_API_KEY": KEY,
            "OUTBOX__EIA__HISTORY_START": "2025-08-20T00:00:00Z",
            "OUTBOX__EIA__BACKFILL_CHUNK_HOURS": "20000",
            "OUTBOX__EIA__PAGE_LENGTH": "400",
            "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
        }
        done = outbox_cmd("-v", "fetch", env=env)
        assert done.returncode == 0, done.stderr
        requests = [unquote(r) for r in fake.requests]
    assert KEY not in done.stdout + done.stderr
    assert "api_key=***" in done.stderr  # URLs are logged, redacted
    # One request sequence per route, paged by 400 rows: ceil(480/400)+ceil(984/400)+ceil(912/400)
    assert len(requests) == 2 + 3 + 3
    assert all(
        "facets[respondent][]=PJM" in r or "facets[fromba][]=PJM" in r
        for r in (requests[0], requests[2], requests[5])
    )
    staged = snapshot(db)
    assert len(staged) == 2376
    with Store.open(db) as store:
        replayed_db = tmp_path / "replay.db"
        with Store.open(replayed_db) as other:
            run_fetch(Config(), other, ReplaySource(sample_dir()))
        live = {(r[0], r[1]): r[2:6] for r in staged}
        replayed = {(r[0], r[1]): r[2:6] for r in snapshot(replayed_db)}
        assert live == replayed
        marks = store.staging.watermarks()
    assert marks["demand:PJM"] == "2025-08-21T23:00:00Z"
    assert marks["ba_interchange:SWPP"] == "2025-08-21T23:00:00Z"
    for part in (db, Path(f"{db}-wal")):
        assert not part.exists() or KEY.encode() not in part.read_bytes()


@pytest.mark.skipif(not can_fork(), reason="the forked read-ahead is Linux only")
def test_replay_read_ahead_in_a_process_or_a_thread_stages_the_same(
    tmp_path: Path, big_replay: Path
) -> None:
    got = {}
    for mode in ("process", "thread"):
        db = tmp_path / f"{mode}.db"
        config = Config.model_validate({"eia": {"replay_read_ahead": mode}})
        with Store.open(db) as store:
            result = run_fetch(config, store, ReplaySource(big_replay))
        con = sqlite3.connect(db)
        got[mode] = (
            (result.pages, result.rows, result.written, result.duplicates, result.invalid),
            snapshot(db),
            con.execute("SELECT id, page_no, row_count, body FROM pages ORDER BY id").fetchall(),
            con.execute("SELECT stream, last_ts FROM watermarks ORDER BY 1").fetchall(),
            con.execute(
                "SELECT series_id, ba, type, subtype, units, route, facets FROM series ORDER BY 1"
            ).fetchall(),
        )
        con.close()
    assert got["process"][0][2] > 40_000
    assert got["process"][0] == got["thread"][0]
    assert got["process"][1:] == got["thread"][1:]


@pytest.mark.skipif(not can_fork(), reason="the forked read-ahead is Linux only")
@pytest.mark.parametrize("checks", [True, False], ids=["checks", "no-checks"])
def test_a_replay_preloads_pandas_after_the_fork_only_for_the_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checks: bool
) -> None:
    """The run's own process needs pandas only for the checks' end-of-run pass: it is
    preloaded once the read-ahead process is running (outbox.preload), not before."""
    import multiprocessing

    import outbox.stages.fetcher

    children: list[int] = []
    monkeypatch.setattr(
        outbox.stages.fetcher,
        "preload",
        lambda: children.append(len(multiprocessing.active_children())),
    )
    config = Config.model_validate({"quality": {"enabled": checks}})
    with Store.open(tmp_path / "o.db") as store:
        assert run_fetch(config, store, ReplaySource(sample_dir())).written > 0
    assert children == ([1] if checks else [])


def test_watermarks_never_ahead_of_staged_rows(store: Store, db_path: Path) -> None:
    run_fetch(Config(), store, ReplaySource(sample_dir()))
    assert watermark_violations(db_path) == []


def watermark_violations(db: Path) -> list[str]:
    """Streams whose watermark is ahead of the newest row staged for them."""
    con = sqlite3.connect(db)
    if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'watermarks'").fetchone():
        con.close()
        return []  # killed before the schema was committed: nothing to be ahead of
    bad = []
    for stream, dataset, respondent, last_ts in con.execute(
        "SELECT stream, dataset, respondent, last_ts FROM watermarks"
    ):
        facets_like = f'%"{respondent}"%'
        newest = con.execute(
            "SELECT max(o.ts) FROM observations o JOIN series s USING (series_id)"
            " WHERE s.facets LIKE ? AND s.type = ?",
            (facets_like, _type_of(dataset)),
        ).fetchone()[0]
        if newest is None or newest < last_ts:
            bad.append(f"{stream}: watermark {last_ts} > newest staged {newest}")
    con.close()
    return bad


def _type_of(dataset: str) -> str:
    return {"ba_interchange": "interchange", "generation": "generation"}.get(dataset, dataset)


@pytest.fixture(scope="module")
def big_replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 47,500 rows in 96 pages of 500: long enough to be killed mid-way."""
    out = tmp_path_factory.mktemp("replay")
    start = datetime(2025, 6, 1, tzinfo=UTC)
    bas = ["PJM", "CISO", "MISO", "ERCO", "SWPP"]
    for route in ROUTES:
        write_pages(
            out / route.rsplit("/", 1)[-1],
            route,
            make_rows(route, bas, start, 480),
            page_length=500,
        )
    return out


def test_sigkill_replay_at_random_points_then_rerun_equals_clean_run(
    tmp_path: Path, big_replay: Path
) -> None:
    clean = tmp_path / "clean.db"
    # At the middle setting (a commit per 2,000 rows): the kill times are drawn from it. The
    # slowest (a commit per page) now also runs the quality checks once per page, so its
    # time would put most kills after the faster settings' runs had ended.
    work = work_seconds(
        "fetch",
        "--replay",
        str(big_replay),
        env={**os.environ, "OUTBOX_DB": str(clean), "OUTBOX__EIA__REPLAY_COMMIT_ROWS": "2000"},
        db=clean,
    )
    expected = snapshot(clean)
    assert len(expected) > 40_000

    rng = random.Random(20261121)
    trials = int(os.environ.get("OUTBOX_KILL_TRIALS", "20"))
    kills = 0
    for trial in range(trials):
        db = tmp_path / f"kill{trial % 4}.db"  # four outboxes, each killed repeatedly
        commit_rows = rng.choice(("1", "2000", "40000"))  # grouped commits of pages
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "fetch", "--replay", str(big_replay)],
            env={
                **os.environ,
                "OUTBOX_DB": str(db),
                "OUTBOX__EIA__REPLAY_COMMIT_ROWS": commit_rows,
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await_run(db, proc)
        time.sleep(rng.uniform(0.0, work * 0.8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
        if db.exists():
            con = sqlite3.connect(db)
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            con.close()
            assert watermark_violations(db) == []
    assert kills >= trials // 2, "most trials must actually kill mid-run"
    assert processes_naming(str(big_replay)) == [], "a killed fetch left a process behind"
    for n in range(min(trials, 4)):
        db = tmp_path / f"kill{n}.db"
        rerun = outbox_cmd("fetch", "--replay", str(big_replay), env={"OUTBOX_DB": str(db)})
        assert rerun.returncode == 0, rerun.stderr
        assert snapshot(db) == expected


@pytest.mark.parametrize(
    ("commit_rows", "commit_seconds", "committed_pages"),
    [
        (1, "3600", 6),  # a commit after every page
        (2000, "3600", 4),  # after every 4 pages of 500 rows
        (10**9, "0.000001", 6),  # the time limit alone: a commit after every page
    ],
)
@pytest.mark.parametrize(
    "point", ["fetch.page_fetched", "stage.rows_written", "stage.before_commit"]
)
def test_sigkill_at_named_points(
    tmp_path: Path,
    big_replay: Path,
    point: str,
    commit_rows: int,
    commit_seconds: str,
    committed_pages: int,
) -> None:
    clean = tmp_path / "clean.db"
    assert (
        outbox_cmd("fetch", "--replay", str(big_replay), env={"OUTBOX_DB": str(clean)}).returncode
        == 0
    )
    db = tmp_path / "crash.db"
    crashed = outbox_cmd(
        "fetch",
        "--replay",
        str(big_replay),
        env={
            "OUTBOX_DB": str(db),
            "OUTBOX_CRASH_AT": point,
            "OUTBOX_CRASH_AFTER": "7",
            "OUTBOX__EIA__REPLAY_COMMIT_ROWS": str(commit_rows),
            "OUTBOX__EIA__REPLAY_COMMIT_SECONDS": commit_seconds,
        },
    )
    assert crashed.returncode == -signal.SIGKILL
    partial = snapshot(db)
    # Exactly the pages of the committed groups survive, each with its watermark advance.
    assert len(partial) == committed_pages * 500
    assert watermark_violations(db) == []
    rerun = outbox_cmd("fetch", "--replay", str(big_replay), env={"OUTBOX_DB": str(db)})
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(db) == snapshot(clean)


@pytest.mark.parametrize("in_flight", [1, 4])
def test_backfill_in_chunks_resumes_after_kill(tmp_path: Path, in_flight: int) -> None:
    db = tmp_path / "backfill.db"
    with FakeEIA(read_rows(sample_dir()), api_key=KEY) as fake:
        env = {
            "OUTBOX_DB": str(db),
            "EIA_BASE_URL": fake.start(),
            "EIA_API_KEY": KEY,
            "OUTBOX__EIA__BACKFILL_CHUNK_HOURS": "6",
            "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
            "OUTBOX__EIA__MAX_IN_FLIGHT": str(in_flight),
        }
        args = ("fetch", "--start", "2025-08-21", "--end", "2025-08-21T23:00:00Z")
        crashed = outbox_cmd(
            *args, env={**env, "OUTBOX_CRASH_AT": "fetch.page_fetched", "OUTBOX_CRASH_AFTER": "6"}
        )
        assert crashed.returncode == -signal.SIGKILL
        if in_flight == 1:
            assert len(fake.requests) == 6
        else:  # the pages in flight or buffered ahead when it died (at most twice 4)
            assert 6 <= len(fake.requests) <= 6 + 2 * in_flight
        fake.requests.clear()
        done = outbox_cmd(*args, env=env)
        assert done.returncode == 0, done.stderr
        # 4 chunks x 3 routes = 12 windows; the 5 finished before the kill are skipped.
        assert len(fake.requests) == 12 - 5
    assert len(snapshot(db)) == 2376
    with Store.open(db) as store:
        assert store.staging.watermarks() == {}  # a backfill never invents a watermark


def test_new_outbox_starts_at_gridpulse_latest(tmp_path: Path) -> None:
    from outbox.sample.receiver import running_receiver

    with running_receiver(tmp_path, api_key="gp-key-1234") as receiver:
        seed = tmp_path / "seed.db"
        env = {
            "OUTBOX_DB": str(seed),
            "GRIDPULSE_BASE_URL": receiver.base_url,
            "GRIDPULSE_API_KEY": "gp-key-1234",
        }
        assert outbox_cmd("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
        assert outbox_cmd("send", env=env).returncode == 0
        with FakeEIA(read_rows(sample_dir()), api_key=KEY) as fake:
            fresh = {
                **env,
                "OUTBOX_DB": str(tmp_path / "fresh.db"),
                "EIA_BASE_URL": fake.start(),
                "EIA_API_KEY": KEY,
                "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
                "OUTBOX__EIA__BACKFILL_CHUNK_HOURS": "20000",
            }
            done = outbox_cmd("fetch", env=fresh)
            assert done.returncode == 0, done.stderr
            starts = {unquote(r).split("start=")[1][:13] for r in fake.requests}
    # GridPulse holds through 2025-08-21T23; look-backs are 72 h (region) and 96 h
    # (fuel type, BA-to-BA interchange).
    assert starts == {"2025-08-18T23", "2025-08-17T23"}


def test_replay_stages_only_configured_bas_and_counts_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    env = {"OUTBOX_DB": str(db), "OUTBOX__BALANCING_AUTHORITIES__SPP": ""}  # SPP left out
    done = outbox_cmd("fetch", "--replay", str(sample_dir()), env=env)
    assert done.returncode == 0, done.stderr
    swpp = sum(1 for rows in read_rows(sample_dir()).values() for r in rows if "SWPP" in r.values())
    swpp_from = sum(
        1
        for rows in read_rows(sample_dir()).values()
        for r in rows
        if r.get("respondent", r.get("fromba")) == "SWPP"
    )
    assert swpp > swpp_from > 0  # SWPP is also a counterparty of other BAs' interchange
    assert done.stdout.splitlines()[0].endswith(  # (the quality line follows it)
        f"; {swpp_from:,} rows skipped (unconfigured_ba {swpp_from:,}: SWPP); "
        "configured: CISO, ERCO, MISO, PJM"
    ), done.stdout
    assert f"skipped={swpp_from} unconfigured_ba={swpp_from}" in done.stderr
    assert "Traceback" not in done.stderr
    con = sqlite3.connect(db)
    bas = {r[0] for r in con.execute("SELECT DISTINCT ba FROM series")}
    marks = {r[0] for r in con.execute("SELECT stream FROM watermarks")}
    counts = orjson.loads(con.execute("SELECT counts FROM runs").fetchone()[0])
    peers = {
        r[0]
        for r in con.execute(
            "SELECT series_id FROM series WHERE series_id LIKE ?", ("%.interchange.SWPP",)
        )
    }
    con.close()
    assert bas == {"PJM", "CAISO", "MISO", "ERCOT"}
    assert not any(m.endswith(":SWPP") for m in marks)
    assert (
        peers
    )  # flows to SWPP are kept, under its EIA code (a counterparty need not be configured)
    assert counts["skipped_by_reason"] == {"unconfigured_ba": swpp_from}
    assert counts["invalid"] == 0 and counts["rows"] == 2376 - swpp_from


def test_replay_of_only_unconfigured_bas_fails_in_one_line_and_stages_nothing(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    replay = tmp_path / "pacw"
    replay.mkdir()
    samples = Path(__file__).parent / "data" / "eia-samples"
    for page in samples.glob("*-pacw-*[0-9].json"):
        (replay / page.name).write_bytes(page.read_bytes())
    with Store.open(db):
        pass
    before = tables(db)
    done = outbox_cmd("fetch", "--replay", str(replay), env={"OUTBOX_DB": str(db)})
    assert done.returncode == 1, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and len(done.stderr.splitlines()) == 2  # the error and the run's log
    assert said[0].startswith("error: replay staged nothing: ")
    assert "rows skipped (unconfigured_ba " in said[0] and ": PACW); configured: CISO" in said[0]
    assert tables(db) == before
    with Store.open(db) as store:
        run = store.runs.recent_runs(limit=1, stage="fetch")[0]
    assert run.status == "failed" and run.error == said[0].removeprefix("error: ")
    assert run.counts["skipped_by_reason"]["unconfigured_ba"] > 0

    configured = {"OUTBOX_DB": str(db), "OUTBOX__BALANCING_AUTHORITIES__PACW": "PACW"}
    done = outbox_cmd("fetch", "--replay", str(replay), env=configured)
    assert done.returncode == 0, done.stderr
    assert {r[0] for r in snapshot(db)} >= {"EIA.PACW.demand", "EIA.PACW.generation.wind"}
