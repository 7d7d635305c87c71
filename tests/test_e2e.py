"""End to end with the reference receiver as a real subprocess on 127.0.0.1.

fetch (replay) -> outbox -> send -> receiver, checked through the receiver's read
endpoints against what the outbox acknowledged; outages; SIGKILLed senders; overlap.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from durability import await_run, outbox, outbox_env, work_seconds

from outbox.config import Config
from outbox.sample import sample_dir
from outbox.sample.receiver import (
    Receiver,
    receiver_batches,
    receiver_query,
    receiver_rows,
    running_receiver,
)
from outbox.sinks.gridpulse import batch_id_of
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store
from outbox.store.deliver import decode_acks
from outbox.testing.synth import ROUTES, make_rows, write_pages

KEY = "e2e-gridpulse-key-42"


@pytest.fixture
def receiver(tmp_path: Path, receiver_db: str | None) -> Iterator[Receiver]:
    """The receiver subprocess, on SQLite and on PostgreSQL (``receiver_db``)."""
    with running_receiver(tmp_path, api_key=KEY, db=receiver_db) as r:
        yield r


def acked_rows(db: Path) -> dict[tuple[str, str], tuple]:
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT series_id, ts, value, quality_flag, revision, state FROM row_states"
    ).fetchall()
    queued = con.execute("SELECT count(*) FROM queue").fetchone()[0]
    con.close()
    # Acked at its revision: a revision staged after the ack would have re-queued the row.
    assert all(r[5] == "acked" for r in rows) and queued == 0, "every row acked"
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def test_fetch_send_receiver_equals_outbox_then_nothing_then_one_revision(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = tmp_path / "outbox.db"
    env = outbox_env(db, receiver=receiver)
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    sent = outbox("send", env=env)
    assert sent.returncode == 0, sent.stderr
    assert "2376 rows in 1 batches, 2376 acked, 0 dead" in sent.stdout
    assert receiver_rows(receiver.base_url, KEY) == acked_rows(db)
    batches = receiver_batches(receiver.db_path)
    assert len(batches) == 1

    again = outbox("send", env=env)
    assert again.returncode == 0 and "0 rows in 0 batches" in again.stdout
    assert receiver_batches(receiver.db_path) == batches  # not one request reached it

    # EIA revises one hour of CAISO demand: exactly that row travels again.
    revised = tmp_path / "revised"
    rows = make_rows(
        ROUTES[0], ["PJM", "CISO", "MISO", "ERCO", "SWPP"], datetime(2025, 8, 21, tzinfo=UTC), 24
    )
    hit = next(
        r
        for r in rows
        if (r["respondent"], r["type"], r["period"]) == ("CISO", "D", "2025-08-21T13")
    )
    hit["value"] = str(int(hit["value"]) + 321)
    write_pages(revised, ROUTES[0], rows)
    fetched = outbox("fetch", "--replay", str(revised), env=env)
    assert "1 written" in fetched.stdout, fetched.stdout
    resent = outbox("send", env=env)
    assert "1 rows in 1 batches, 1 acked" in resent.stdout, resent.stdout
    new_batches = {k: v for k, v in receiver_batches(receiver.db_path).items() if k not in batches}
    assert [b["rows"] for b in new_batches.values()] == [1]
    held = receiver_rows(receiver.base_url, KEY)
    assert held == acked_rows(db)
    assert held[("EIA.CAISO.demand", "2025-08-21T13:00:00Z")][0] == float(hit["value"])


def test_outage_three_failed_sends_then_one_drains_in_order(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = tmp_path / "outbox.db"
    env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="500")
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(sample_dir()))
    receiver.stop()
    for _ in range(3):
        failed = outbox("send", env=env)
        assert failed.returncode == 1
        assert "GridPulse unavailable" in failed.stderr and "rows stay pending" in failed.stderr
    with Store.open(db) as store:
        assert store.reads.count_state("pending") == 2376
        runs = store.runs.recent_runs(stage="send")
        assert [r.status for r in runs] == ["failed"] * 3
        assert all("GridPulse unavailable" in (r.error or "") for r in runs)
        assert KEY not in " ".join(r.error or "" for r in runs)
    receiver.start()
    drained = outbox("send", env=env)
    assert drained.returncode == 0, drained.stderr
    assert "2376 acked" in drained.stdout
    assert receiver_rows(receiver.base_url, KEY) == acked_rows(db)
    # Oldest first: within each series, arrival order follows ts.
    order = receiver_query(
        receiver.db_path,
        "SELECT s.eia_series_id AS sid, o.received_at AS received FROM observations o"
        " JOIN series s ON s.id = o.series_id ORDER BY s.eia_series_id, o.ts",
    )
    by_series: dict[str, list[str]] = {}
    for row in order:
        by_series.setdefault(row["sid"], []).append(row["received"])
    assert all(times == sorted(times) for times in by_series.values())


def big_replay(directory: Path, bump: int = 0, every: int = 0, hours: int = 480) -> Path:
    """~99 rows an hour; with ``every``, each ``every``-th row revised by ``bump``."""
    start = datetime(2025, 6, 1, tzinfo=UTC)
    for route in ROUTES:
        rows = make_rows(route, ["PJM", "CISO", "MISO", "ERCO", "SWPP"], start, hours)
        if every:
            for i, row in enumerate(rows):
                if i % every == bump % every and row["value"] not in (None, ""):
                    row["value"] = str(float(row["value"]) + bump)
        write_pages(directory / route.rsplit("/", 1)[-1], route, rows)
    return directory


# On PostgreSQL fewer kills by default: the variant must not add minutes to CI (the kill
# points are the sender's; test_crash_send kills both sides on PostgreSQL too).
KILL_TRIALS = {None: 30, "postgres": 6}


def test_sigkilled_sender_converges_exactly(
    tmp_path: Path, receiver: Receiver, receiver_db: str | None
) -> None:
    db = tmp_path / "outbox.db"
    env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="200")
    rng = random.Random(7)
    default = KILL_TRIALS[None if receiver_db is None else "postgres"]
    trials = int(os.environ.get("OUTBOX_SEND_KILL_TRIALS", str(default)))
    points = ["send.after_claim", "send.after_post", "settle.before_commit", "acks.before_commit"]
    kills = 0
    # One uncut send of ~100 batches first: its own work (imports excluded) is the range
    # the kill times are drawn from, so they land mid-run however fast this machine is.
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(big_replay(tmp_path / "r", hours=200)))
    work = work_seconds("send", env=env, db=db, stage="send")
    for trial in range(trials):
        # EIA revises every row between kills, so each send has ~100 batches to do.
        with Store.open(db) as store:
            pages = big_replay(tmp_path / f"r{trial}", trial + 1, 1, hours=200)
            run_fetch(Config(), store, ReplaySource(pages))
        extra = {}
        if trial % 3 == 0:
            extra = {
                "OUTBOX_CRASH_AT": points[trial % len(points)],
                "OUTBOX_CRASH_AFTER": str(rng.randint(1, 20)),
            }
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "send"],
            env={**env, **extra},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not extra:
            await_run(db, proc, "send")
            time.sleep(rng.uniform(0.0, work * 0.8))
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(60)
        kills += code == -signal.SIGKILL
    assert kills >= trials * 2 // 3, f"only {kills} of {trials} sends were killed mid-run"
    final = outbox("send", env=env)
    assert final.returncode == 0, final.stderr
    with Store.open(db) as store:
        assert store.reads.count_state("pending") == 0 and store.reads.count_state("dead") == 0
    assert receiver_rows(receiver.base_url, KEY) == acked_rows(db)


@pytest.mark.parametrize("after", [1, 3])
def test_batch_recorded_but_not_applied_is_not_sent_again(
    tmp_path: Path, receiver: Receiver, after: int
) -> None:
    """A kill after a batch outcome committed, while its acks are being applied to the
    rows: the next send applies them first and sends none of those rows again."""
    db = tmp_path / "outbox.db"
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(sample_dir()))
        staged = store.reads.count_state("pending")
    env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="500")
    crashed = outbox(
        "send",
        env={**env, "OUTBOX_CRASH_AT": "acks.before_commit", "OUTBOX_CRASH_AFTER": str(after)},
    )
    assert crashed.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    logged = [decode_acks(k) for (k,) in con.execute("SELECT keys FROM ack_log")]
    con.close()
    recorded = {batch_id_of(keys) for keys in logged}
    assert recorded, "the kill came while a recorded batch was being applied"
    posted = receiver_batches(receiver.db_path)
    assert recorded <= posted.keys()
    done = outbox("send", env=env)
    assert done.returncode == 0, done.stderr
    after_run = receiver_batches(receiver.db_path)
    for batch_id in recorded:  # recorded as acknowledged: never sent again
        assert after_run[batch_id]["times_seen"] == 1
    # Only the batch in flight at the kill (if one was) may go again.
    assert sum(b["times_seen"] - 1 for b in after_run.values()) <= 1
    with Store.open(db) as store:
        assert store.delivery.unapplied_acks() == 0
        assert (
            store.reads.count_state("pending") == 0 and store.reads.count_state("acked") == staged
        )
    assert receiver_rows(receiver.base_url, KEY) == acked_rows(db)


def test_two_senders_started_together(tmp_path: Path, receiver: Receiver) -> None:
    db = tmp_path / "outbox.db"
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(big_replay(tmp_path / "r")))
    env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="1000")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "outbox", "send"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = [o[0] for o in outs]
    assert sum("a send is already running" in s for s in said) == 1, said
    assert sum("acked" in s for s in said) == 1, said
    batches = receiver_batches(receiver.db_path)
    assert all(b["times_seen"] == 1 for b in batches.values())
    assert receiver_rows(receiver.base_url, KEY) == acked_rows(db)
