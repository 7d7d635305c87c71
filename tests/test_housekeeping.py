"""Housekeeping: retention, page sweeps, a bounded file, and the outbox size ceiling."""

from __future__ import annotations

import pickle
import random
import sqlite3
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from factories import ack, obs, page, reject, series_row, ts
from freezegun import freeze_time
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import Config, load_config
from outbox.errors import OutboxFullError
from outbox.normalize import normalize_page
from outbox.sample import sample_dir
from outbox.stages import send as send_stage
from outbox.stages.housekeeping import PAGE_SWEEP_INTERVAL, page_margin, prune
from outbox.stages.prepared import EncodedRows, detach_rows
from outbox.stages.send import SendResult
from outbox.store import Key, PageRecord, RowBatch, Store
from outbox.store.engine import WAL_AUTOCHECKPOINT_PAGES
from outbox.testing.synth import ROUTE_REGION, SAMPLE_START, make_pages, make_rows, write_sample
from outbox.timeutil import to_ts

runner = CliRunner()
SIM_START = datetime(2025, 6, 1, tzinfo=UTC)
SIM_DAYS = 60
RETENTION_DAYS = 10
BAS = ["PJM", "CISO", "MISO", "ERCO", "SWPP"]
# 20 series (5 BAs x D/DF/NG/TI) with their raw page, hourly for 60 days: 28,800 rows and
# 1,440 pages. Kept 10 days, the file levels off at about 1.27 MB from day 14 on; without
# prune it is 6.3 MB at day 60 and grows by about 100 kB a day. The WAL of a connection
# kept open for all 60 days cycles up to the checkpoint interval (10,000 pages) and back;
# a command's process deletes it when it closes the file.
DB_BOUND = 1_500_000
DB_WAL_BOUND = DB_BOUND + (WAL_AUTOCHECKPOINT_PAGES + 100) * 4096


def _config(db: Path, **env: str) -> Config:
    return load_config(None, env={"OUTBOX_DB": str(db), **env})


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the simulation measures size, not disk speed."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        with tempfile.TemporaryDirectory(dir=shm) as d:
            yield Path(d)
    else:
        yield tmp_path


def _hourly_fetch(config: Config) -> list[tuple[list[tuple], list[tuple], bytes]]:
    """One day of region-data rows per hour of day, normalized, with its page body."""
    rows = make_rows(ROUTE_REGION, BAS, SIM_START, 24)
    norm = normalize_page(ROUTE_REGION, rows, ba_codes=config.eia_to_gridpulse)
    series = [
        (s.series_id, s.ba, s.type, s.subtype, s.units, s.route, s.facets) for s in norm.series
    ]
    columns = (norm.series_id, norm.ts, norm.value, norm.units, norm.quality_flag, norm.revision)
    staged = list(zip(*columns, norm.row, strict=True))
    per_hour = len(staged) // 24
    return [
        (
            staged[h * per_hour : (h + 1) * per_hour],
            series,
            orjson.dumps(make_pages(ROUTE_REGION, rows[h * per_hour : (h + 1) * per_hour])[0]),
        )
        for h in range(24)
    ]


def _size(db: Path) -> tuple[int, int]:
    wal = Path(f"{db}-wal")
    return db.stat().st_size, wal.stat().st_size if wal.exists() else 0


def test_prune_keeps_the_file_bounded_over_60_days(fast_dir: Path) -> None:
    db = fast_dir / "outbox.db"
    config = _config(db, OUTBOX__HOUSEKEEPING__RETENTION_DAYS=str(RETENTION_DAYS))
    day = _hourly_fetch(config)
    sizes = []
    with Store.open(db) as store:
        assert store.upkeep.file_stats().auto_vacuum == "incremental"
        for hour in range(SIM_DAYS * 24):
            when = SIM_START + timedelta(hours=hour)
            rows, series, body = day[hour % 24]
            hour_ts = to_ts(when)
            fetched = PageRecord(ROUTE_REGION, {}, "https://x/", 0, 0, len(rows), len(rows), body)
            store.staging.stage(
                [(r[0], hour_ts, *r[2:]) for r in rows],
                series_rows=series,
                page=fetched,
                now=to_ts(when + timedelta(minutes=15)),
            )
            sent = when + timedelta(minutes=20)  # the send: claim, ack, then the cheap prune
            claimed = store.delivery.claim(5000, to_ts(sent))
            ack(store, [Key(c.series_id, c.ts, c.revision) for c in claimed], to_ts(sent))
            prune(config, store, now=sent)
            if hour % 24 == 23:
                sizes.append(_size(db))
        kept = store.staging.count_rows()
        with store.read() as conn:
            pages = conn.exec_driver_sql("SELECT count(*) FROM pages").scalar()
        assert store.reads.counts()["pending"] == 0
    assert kept <= 20 * 24 * (RETENTION_DAYS + 1)
    sweep_lag = page_margin(config) + PAGE_SWEEP_INTERVAL
    assert pages <= 24 * (RETENTION_DAYS + 1) + sweep_lag / timedelta(hours=1)
    # bounded: the last day is no bigger than day 20, and under the stated bounds
    assert sizes[-1][0] <= sizes[19][0] * 1.05
    assert max(s[0] for s in sizes) <= DB_BOUND
    assert max(s[0] + s[1] for s in sizes) <= DB_WAL_BOUND


PJM = "EIA.PJM.demand"


def _key(hour: int, value: float | None = None) -> Key:
    """The key of the row ``_stage_old`` (or ``obs``) staged for ``hour``."""
    row = obs(PJM, hour, 10.0 + hour if value is None else value)
    return Key(row[0], row[1], row[5])


def _stage_old(store: Store, when: str) -> None:
    """Hours 0..5 of one series (values 10..15) from one page fetched at ``when``."""
    rows = [obs(PJM, h, 10.0 + h) for h in range(6)]
    store.staging.stage(rows, series_rows=[series_row(PJM)], page=page(), now=when)


def test_prune_removes_only_old_acknowledged_rows_and_orphaned_pages(db_path: Path) -> None:
    config = _config(db_path)
    now = datetime.fromisoformat(ts(0)) + timedelta(days=100)
    with Store.open(db_path) as store:
        _stage_old(store, ts(6))  # page 1: hours 0..5
        # page 2: a revision of hour 5 only (page 1 keeps hours 0..4); page 3: a recent row
        store.staging.stage([obs(PJM, 5, 99.0)], page=page(), now=ts(7))
        store.staging.stage([obs(PJM, 24 * 95)], page=page(), now=ts(24 * 95 + 1))
        ack(store, [_key(0), _key(1)], now=ts(8))  # acknowledged long ago
        ack(store, [_key(5, 99.0)], now=to_ts(now - timedelta(days=1)))
        reject(store, [(_key(2), "X", "bad")])
        result = prune(config, store, now=now)
        assert (result.rows, result.pages) == (3, 1)  # hours 0, 1, 5; page 2 (hour 5's)
        assert result.cutoff == to_ts(now - timedelta(days=90))
        left = {h: store.reads.row(PJM, ts(h)) for h in (2, 3, 4)}
        assert {h: r["state"] for h, r in left.items() if r} == {
            2: "dead",
            3: "pending",
            4: "pending",
        }
        # The per-minute ack counts go with retention too: the old minute, not yesterday's.
        with store.read() as conn:
            minutes = conn.exec_driver_sql("SELECT minute, rows FROM ack_minutes").all()
        assert [tuple(m) for m in minutes] == [(to_ts(now - timedelta(days=1))[:16], 1)]
        assert store.reads.page_body(1) is not None  # still behind the dead and pending rows
        assert store.reads.page_body(3) is not None
        # once those rows are acknowledged and pruned, the page goes too
        store.delivery.requeue_dead()
        ack(store, [_key(2), _key(3), _key(4)])
        assert prune(config, store, now=now + PAGE_SWEEP_INTERVAL).rows == 3
        assert store.reads.page_body(1) is None


def test_cheap_page_sweep_runs_at_most_every_interval(db_path: Path) -> None:
    config = _config(db_path)
    now = datetime.fromisoformat(ts(0)) + timedelta(days=100)
    with Store.open(db_path) as store:
        assert prune(config, store, now=now).pages == 0  # records the sweep time
        _stage_old(store, ts(6))
        ack(store, [_key(h) for h in range(6)])
        soon = prune(config, store, now=now + PAGE_SWEEP_INTERVAL / 2)
        assert (soon.rows, soon.pages) == (6, 0)  # the orphaned page waits for the next sweep
        assert prune(config, store, now=now + PAGE_SWEEP_INTERVAL).pages == 1


@freeze_time("2026-01-01T12:34:00Z")
def test_outbox_prune_prints_what_it_removed(db_path: Path) -> None:
    body = random.Random(0).randbytes(200_000)  # incompressible: 49 overflow pages
    with Store.open(db_path) as store:
        rows = [obs(PJM, h, 10.0 + h) for h in range(6)]
        big = PageRecord(ROUTE_REGION, {}, "https://x/", 0, 0, 6, 6, body)
        store.staging.stage(rows, series_rows=[series_row(PJM)], page=big, now=ts(6))
        ack(store, [_key(h) for h in range(6)])
        before = store.upkeep.file_stats().bytes
    result = runner.invoke(app, ["prune"], env={"OUTBOX_DB": str(db_path)})
    assert result.exit_code == 0, result.output
    with Store.open(db_path) as store:
        after = store.upkeep.file_stats().bytes
    assert before - after > 190_000
    assert result.stdout == (
        "pruned 6 acknowledged rows older than 2025-10-03T12:00:00Z, 1 pages, "
        "0 checked gap hours, 0 runs\n"
        f"file {before:,} -> {after:,} bytes (incremental vacuum)\n"
    )


def test_old_file_is_vacuumed_only_when_nothing_is_pending(db_path: Path) -> None:
    config = _config(db_path)
    now = datetime.fromisoformat(ts(0)) + timedelta(days=100)
    Store.open(db_path).close()
    con = sqlite3.connect(db_path)  # a file made before auto_vacuum was turned on
    con.execute("PRAGMA auto_vacuum = NONE")
    con.execute("VACUUM")
    con.close()
    with Store.open(db_path) as store:
        assert store.upkeep.file_stats().auto_vacuum == "none"
        _stage_old(store, ts(6))
        store.staging.stage([obs(PJM, 24 * 99)], now=ts(24 * 99))
        ack(store, [_key(h) for h in range(6)])
        held = prune(config, store, full=True, now=now)
        assert held.reclaim == "no VACUUM while 1 rows are pending; free pages are reused"
        assert store.upkeep.file_stats().auto_vacuum == "none"
        ack(store, [_key(24 * 99, 100.0)])
        done = prune(config, store, full=True, now=now)
        assert done.reclaim == "VACUUM"
        assert store.upkeep.file_stats().auto_vacuum == "incremental"
        assert store.upkeep.file_stats().freelist_count == 0


def test_send_prunes_at_its_end(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(db_path) as store:
        _stage_old(store, ts(6))
        ack(store, [_key(h) for h in range(6)])
    monkeypatch.setattr(send_stage, "run_send", lambda *a, **k: SendResult(run_id=1))
    env = {"OUTBOX_DB": str(db_path), "GRIDPULSE_API_KEY": "k" * 20}
    result = runner.invoke(app, ["send"], env=env)
    assert result.exit_code == 0, result.output
    with Store.open(db_path) as store:
        assert store.staging.count_rows() == 0
        assert store.meta_get("housekeeping:pages_swept_at") is not None


# -- the size ceiling --------------------------------------------------------------


def test_store_refuses_a_page_past_max_rows_but_not_revisions(store: Store) -> None:
    store.staging.stage(
        [obs(PJM, h) for h in range(10)], series_rows=[series_row(PJM)], page=page()
    )
    limit = store.staging.limit_size(12, None)
    assert limit is not None and limit.rows == 10
    revised = [obs(PJM, h, 5.0) for h in range(10)]  # revisions do not grow the outbox
    assert store.staging.stage([*revised, obs(PJM, 10)], page=page()).written == 11
    assert limit.rows == 11
    with pytest.raises(OutboxFullError, match=r"11 rows staged and this page would add 2"):
        store.staging.stage([obs(PJM, 11), obs(PJM, 12)], page=page())
    assert store.staging.count_rows() == 11
    with store.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pages").scalar() == 2


def test_a_detached_batch_stages_and_counts_exactly_as_its_rows(store: Store) -> None:
    """A page from the read-ahead process carries its rows as JSON only: the ceiling
    check decodes them when it needs the keys."""
    store.staging.stage(
        [obs(PJM, h) for h in range(10)], series_rows=[series_row(PJM)], page=page()
    )
    limit = store.staging.limit_size(12, None)
    assert limit is not None

    def detached(rows: list[tuple]) -> RowBatch:
        batch = pickle.loads(pickle.dumps(detach_rows(RowBatch.of(rows))))
        assert isinstance(batch.rows, EncodedRows) and len(batch.rows) == len(rows)
        return batch

    revised = [obs(PJM, h, 5.0) for h in range(10)]
    assert [tuple(r) for r in detached(revised).rows] == [tuple(r) for r in revised]
    assert store.staging.stage(detached([*revised, obs(PJM, 10)]), page=page()).written == 11
    assert limit.rows == 11
    with pytest.raises(OutboxFullError, match=r"11 rows staged and this page would add 2"):
        store.staging.stage(detached([obs(PJM, 11), obs(PJM, 12)]), page=page())
    assert store.staging.count_rows() == 11


def _fetch(db: Path, directory: Path, **env: str):
    return runner.invoke(
        app, ["fetch", "--replay", str(directory)], env={"OUTBOX_DB": str(db), **env}
    )


def _snapshot(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT * FROM observations ORDER BY series_id, ts").fetchall()
    con.close()
    return rows


@pytest.mark.parametrize("limit", ["rows", "bytes"])
def test_full_outbox_fetch_exits_4_and_evicts_nothing(tmp_path: Path, limit: str) -> None:
    db = tmp_path / "outbox.db"
    assert _fetch(db, sample_dir()).exit_code == 0
    next_day = tmp_path / "next"
    write_sample(next_day, start=SAMPLE_START + timedelta(days=1))
    before = _snapshot(db)
    with Store.open(db) as store:
        ceiling = store.staging.count_rows() if limit == "rows" else store.upkeep.file_stats().bytes
    env = {f"OUTBOX__HOUSEKEEPING__MAX_{limit.upper()}": str(ceiling)}

    again = _fetch(db, sample_dir(), **env)  # nothing new: the ceiling does not bite
    assert again.exit_code == 0, again.output
    full = _fetch(db, next_day, **env)
    assert full.exit_code == 4, full.output
    assert "error: outbox full: " in full.stderr
    assert f"housekeeping.max_{limit} = {ceiling}" in full.stderr
    assert "nothing was staged and nothing evicted" in full.stderr
    assert _snapshot(db) == before
    with Store.open(db) as store:
        assert store.runs.recent_runs(limit=1)[0].status == "failed"
