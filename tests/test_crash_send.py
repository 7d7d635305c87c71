"""Send crash matrix: SIGKILL ``outbox send`` at named points and at random times against
the reference receiver (a real subprocess), which is itself killed and restarted in some
trials.

Trials run in epochs: EIA revises a random share of the delivered rows, then several
sends are killed in a row, then one send drains the rest. After every kill: the outbox
passes ``integrity_check`` and no row is acked that the receiver does not hold at that
revision. At the end, through the receiver's read endpoints: it holds exactly the staged
set at the latest revisions. From its ``batches`` table: every staged (row, revision)
travelled in exactly one distinct batch (zero duplicates beyond idempotent retries), and
re-deliveries of a batch are at most one per kill. ``pytest -m soak`` runs >= 300 random
kills.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from durability import (
    KEY_GP,
    acked_not_held,
    connect,
    integrity,
    latest_staged,
    outbox,
    outbox_env,
    receiver_held,
    route_rows,
    spawn,
    states,
    write_replay,
)

from outbox.config import Config
from outbox.normalize import revision_of
from outbox.sample.receiver import (
    Receiver,
    receiver_batches,
    receiver_rows,
    running_receiver,
)
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store

BATCH = 100
HOURS = 48
EPOCHS = {"ci": 2, "soak": 60}
KILLS_PER_EPOCH = {"ci": 3, "soak": 5}
NAMED_REPEATS = {"ci": 1, "soak": 10}
POINTS = (
    "send.after_claim",
    "send.before_post",
    "send.after_post",
    "settle.before_commit",
    "acks.before_commit",
)
LATENCY = "latency:400ms"
MID_REQUEST_DELAY = "0.2"
POLL = 0.01
SEND_SECONDS = re.compile(r"send done.*? seconds=([0-9.]+)")


@dataclass
class Tally:
    """What the trials did: kills of each side, staged (row, revision) pairs."""

    staged_pairs: int = 0
    sender_kills: int = 0
    receiver_kills: int = 0
    trials: int = 0
    drains: int = 0
    rows_per_second: float = 4000.0  # a first guess; every drain measures it again

    def work(self, db: Path) -> float:
        """Seconds a send needs for what is pending now: kills land inside that."""
        return max(0.05, states(db).get("pending", 0) / self.rows_per_second)

    @property
    def kills(self) -> int:
        return self.sender_kills + self.receiver_kills


@pytest.fixture
def outbox_db(tmp_path: Path) -> tuple[Path, int]:
    """An outbox holding 48 hours of the five BAs (about 4,750 rows), nothing sent."""
    db = tmp_path / "outbox.db"
    with Store.open(db) as store:
        result = run_fetch(
            Config(), store, ReplaySource(write_replay(tmp_path / "eia", route_rows(HOURS)))
        )
    return db, result.written


def env_of(db: Path, receiver: Receiver, **extra: str) -> dict[str, str]:
    return outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE=str(BATCH), **extra)


def revise(db: Path, rng: random.Random, share: float) -> int:
    """EIA revises ``share`` of the delivered rows; returns how many were staged anew."""
    with connect(db) as con:
        acked = con.execute(
            "SELECT series_id, ts, value FROM row_states WHERE state = 'acked'"
        ).fetchall()
    chosen = rng.sample(acked, int(len(acked) * share))
    revised = []
    for sid, ts, value in chosen:
        new = (value or 0.0) + rng.choice((-7.0, 1.0, 13.0))
        revised.append((sid, ts, new, "MW", "good", revision_of(new, "good", "MW"), 0))
    with Store.open(db) as store:
        return store.staging.stage(revised).written


def await_send(db: Path, proc: subprocess.Popen) -> None:
    """Wait until ``proc`` has recorded its send run (imports done, work starting)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                if con.execute(
                    "SELECT 1 FROM runs WHERE pid = ? AND stage = 'send'", (proc.pid,)
                ).fetchone():
                    return
            finally:
                con.close()
        except sqlite3.Error:
            pass
        time.sleep(POLL)


def check_after_kill(db: Path, receiver: Receiver, tally: Tally) -> None:
    """At any instant a sender or receiver can die: sound file, nothing acked unheld."""
    assert integrity(db) == "ok"
    assert acked_not_held(db, receiver_held(receiver.db_path)) == []
    tally.trials += 1


def drain(db: Path, receiver: Receiver, tally: Tally) -> None:
    """A clean send that must deliver everything pending."""
    if not receiver.running:
        receiver.start()
    pending = states(db).get("pending", 0)
    done = outbox("send", env=env_of(db, receiver))
    assert done.returncode == 0, done.stdout + done.stderr
    took = SEND_SECONDS.search(done.stderr)  # the run's own work, from its log line
    if pending > 500 and took:
        tally.rows_per_second = pending / max(float(took.group(1)), 0.05)
    assert states(db) == {"acked": len(latest_staged(db))}
    assert acked_not_held(db, receiver_held(receiver.db_path)) == []
    tally.drains += 1


def random_trial(db: Path, receiver: Receiver, rng: random.Random, tally: Tally) -> None:
    """Kill the sender, the receiver, or both, at random moments of one send."""
    kind = rng.choices(("sender", "receiver", "both"), weights=(7, 2, 1))[0]
    work = tally.work(db)
    proc = spawn("send", env=env_of(db, receiver))
    await_send(db, proc)
    started = time.monotonic()
    kill_sender = started + rng.uniform(0.0, work) if kind != "receiver" else None
    kill_receiver = started + rng.uniform(0.0, work) if kind != "sender" else None
    while proc.poll() is None:
        now = time.monotonic()
        if kill_receiver is not None and now >= kill_receiver:
            receiver.kill()
            tally.receiver_kills += 1
            kill_receiver = None
        if kill_sender is not None and now >= kill_sender:
            proc.send_signal(signal.SIGKILL)
            kill_sender = None
        if kill_sender is None and kill_receiver is None:
            break
        time.sleep(POLL)
    code = proc.wait(60)
    tally.sender_kills += code == -signal.SIGKILL
    if kill_receiver is not None:  # the send ended first: the receiver dies idle
        receiver.kill()
        tally.receiver_kills += 1
    check_after_kill(db, receiver, tally)
    if not receiver.running:
        receiver.start()


def named_trial(db: Path, receiver: Receiver, point: str, after: int, tally: Tally) -> None:
    """Kill the sender at ``point`` the ``after``-th time it gets there."""
    extra = {"OUTBOX_CRASH_AT": point, "OUTBOX_CRASH_AFTER": str(after)}
    if point == "send.before_post":  # mid request: the receiver holds the answer back
        extra["OUTBOX_CRASH_DELAY"] = MID_REQUEST_DELAY
    crashed = outbox("send", env=env_of(db, receiver, **extra))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    tally.sender_kills += 1
    check_after_kill(db, receiver, tally)


def final_checks(db: Path, receiver: Receiver, tally: Tally, figures, suite: str) -> None:
    """The receiver holds exactly the staged set; duplicates and re-deliveries bounded."""
    drain(db, receiver, tally)
    staged = latest_staged(db)
    with connect(db) as con:
        outbox_rows = {
            (r[0], r[1]): (r[2], r[3], r[4])
            for r in con.execute(
                "SELECT series_id, ts, value, quality_flag, revision FROM observations"
            )
        }
    held = receiver_rows(receiver.base_url, KEY_GP)
    lost = sum(1 for key, rev in staged.items() if held.get(key, (None, None, None))[2] != rev)
    batches = receiver_batches(receiver.db_path).values()
    distinct_rows = sum(b["rows"] for b in batches)
    redelivered_batches = sum(b["times_seen"] - 1 for b in batches)
    redelivered_rows = sum(b["rows"] * (b["times_seen"] - 1) for b in batches)
    duplicates = distinct_rows - tally.staged_pairs
    figures(
        suite=suite,
        trials=tally.trials,
        kills=tally.kills,
        sender_kills=tally.sender_kills,
        receiver_kills=tally.receiver_kills,
        rows=len(staged),
        staged_pairs=tally.staged_pairs,
        lost=lost,
        duplicates=duplicates,
        redelivered_batches=redelivered_batches,
        redelivered_rows=redelivered_rows,
    )
    assert held == outbox_rows, "the receiver holds exactly the staged set, latest revisions"
    assert lost == 0
    assert duplicates == 0, "a (row, revision) travelled in two distinct batches"
    assert redelivered_batches <= tally.kills, "more than one batch re-delivered per kill"
    assert redelivered_rows <= BATCH * tally.kills


def test_sigkill_send_and_receiver_at_random_times(
    outbox_db: tuple[Path, int], tmp_path: Path, scale: str, figures, receiver_db: str | None
) -> None:
    """On the SQLite and on the PostgreSQL receiver (``receiver_db``)."""
    db, staged = outbox_db
    tally = Tally(staged_pairs=staged)
    rng = random.Random(f"send-{scale}")
    with running_receiver(tmp_path, api_key=KEY_GP, db=receiver_db) as receiver:
        for epoch in range(EPOCHS[scale]):
            if epoch:
                tally.staged_pairs += revise(db, rng, rng.uniform(0.3, 0.8))
            for _ in range(KILLS_PER_EPOCH[scale]):
                random_trial(db, receiver, rng, tally)
            drain(db, receiver, tally)
        final_checks(db, receiver, tally, figures, "send-random")
    assert tally.kills >= tally.trials // 2, f"only {tally.kills} kills in {tally.trials}"


def test_sigkill_send_at_named_points(
    outbox_db: tuple[Path, int], tmp_path: Path, scale: str, figures
) -> None:
    """after claim, mid request (receiver latency + delayed kill), after the 2xx, mid ack
    commit; each repeat is a new epoch of revisions."""
    db, staged = outbox_db
    tally = Tally(staged_pairs=staged)
    rng = random.Random(f"named-send-{scale}")
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        for repeat in range(NAMED_REPEATS[scale]):
            if repeat:
                tally.staged_pairs += revise(db, rng, rng.uniform(0.3, 0.8))
            for point in POINTS:
                batches = -(-states(db).get("pending", 0) // BATCH)
                after = rng.randint(1, max(1, batches - 1))
                if point == "send.before_post":
                    receiver.faults = (LATENCY,)
                    receiver.restart()
                named_trial(db, receiver, point, after, tally)
                if point == "send.before_post":
                    receiver.faults = ()
                    receiver.restart()
            drain(db, receiver, tally)
        final_checks(db, receiver, tally, figures, "send-named")
