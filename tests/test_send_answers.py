"""GridPulse answers the reference receiver never gives, against the real ``outbox send``.

A real outbox file, ``python -m outbox send`` as a subprocess, and a scripted GridPulse on
127.0.0.1 (:mod:`outbox.testing.scripted_gridpulse`) answering one way; then the reference
receiver (a subprocess) to show that what the refused run left is delivered exactly once.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from durability import outbox, outbox_env, states, tables

from outbox.config import Config
from outbox.sample import sample_dir
from outbox.sample.receiver import receiver_batches, receiver_rows, running_receiver
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store
from outbox.testing.scripted_gridpulse import Reply, scripted_gridpulse

KEY = "answers-gridpulse-key-93c1"
SAMPLE_ROWS = 2376
BATCH = 1000


@pytest.fixture(scope="module")
def sample_outbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real outbox holding the bundled sample, every row pending (staged once)."""
    db = tmp_path_factory.mktemp("sample") / "outbox.db"
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(sample_dir()))
    assert states(db) == {"pending": SAMPLE_ROWS}
    return db


@pytest.fixture
def db(sample_outbox: Path, tmp_path: Path) -> Path:
    """A copy of the staged outbox for one test (closed, so the file is the whole state)."""
    return Path(shutil.copy(sample_outbox, tmp_path / "outbox.db"))


def env(db: Path, base_url: str, **extra: str) -> dict[str, str]:
    return outbox_env(
        db,
        GRIDPULSE_BASE_URL=base_url,
        GRIDPULSE_API_KEY=KEY,
        OUTBOX__GRIDPULSE__BATCH_SIZE=str(BATCH),
        **extra,
    )


def error_lines(stderr: str) -> list[str]:
    """The command's final error lines (log lines are logfmt, ``level=...``)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def answered(**fields: Any) -> Callable[[dict[str, Any]], Reply]:
    """An answer of the ingest shape; a field given as a function gets the batch."""

    def answer(batch: dict[str, Any]) -> Reply:
        n = len(batch["observations"])
        payload = {"batch_id": batch["batch_id"], "accepted": n, "rejected": []}
        for name, value in fields.items():
            if value is _MISSING:
                payload.pop(name)
            else:
                payload[name] = value(batch) if callable(value) else value
        return Reply(200, payload)

    return answer


_MISSING = object()


def rejection(index: int, **override: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A rejection of the row at ``index`` of the batch (``index`` past the end: of row 0)."""

    def make(batch: dict[str, Any]) -> dict[str, Any]:
        obs = batch["observations"]
        row = obs[index] if index < len(obs) else obs[0]
        found = {"index": index, "series_id": row["series_id"], "ts": row["ts"]}
        return {**found, "code": "BAD", "message": "bad", **override}

    return make


def count(delta: int) -> Callable[[dict[str, Any]], int]:
    return lambda batch: len(batch["observations"]) + delta


INCONSISTENT = {
    "wrong batch_id": (answered(batch_id="0" * 32), 'it names batch "00000000'),
    "accepted missing": (answered(accepted=_MISSING), "accepted is missing"),
    "accepted a string": (
        answered(accepted=lambda b: str(len(b["observations"]))),
        f'accepted is "{BATCH}", not a count',
    ),
    "accepted a bool": (answered(accepted=True), "accepted is true, not a count"),
    "accepted negative": (answered(accepted=-1), "accepted is -1, not a count"),
    "accepted a float": (answered(accepted=1000.0), "accepted is 1000.0, not a count"),
    "accepted 0 of all": (answered(accepted=0), f"accepted 0 + rejected 0 != {BATCH} rows sent"),
    "accepted one short": (answered(accepted=count(-1)), f"+ rejected 0 != {BATCH} rows sent"),
    "accepted one more": (answered(accepted=count(1)), f"+ rejected 0 != {BATCH} rows sent"),
    "index out of range": (
        answered(accepted=count(-1), rejected=lambda b: [rejection(BATCH)(b)]),
        f"rejection index {BATCH} is outside the {BATCH} rows sent",
    ),
    "another series_id": (
        answered(
            accepted=count(-1), rejected=lambda b: [rejection(3, series_id="EIA.X.demand")(b)]
        ),
        'rejection 3 names series "EIA.X.demand"',
    ),
    "another ts": (
        answered(
            accepted=count(-1), rejected=lambda b: [rejection(3, ts="2020-01-01T00:00:00Z")(b)]
        ),
        'rejection 3 names ts "2020-01-01T00:00:00Z"',
    ),
    "the same index twice": (
        answered(accepted=count(-2), rejected=lambda b: [rejection(5)(b), rejection(5)(b)]),
        "index 5 is rejected twice",
    ),
}


@pytest.mark.parametrize("case", list(INCONSISTENT), ids=lambda c: c.replace(" ", "_"))
def test_inconsistent_answer_changes_no_row_and_the_next_send_delivers_all(
    tmp_path: Path, db: Path, case: str
) -> None:
    answer, named = INCONSISTENT[case]
    before = tables(db)
    with scripted_gridpulse(answer) as gp:
        refused = outbox("send", env=env(db, gp.base_url))
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1, said
    assert "Traceback" not in said
    [line] = error_lines(refused.stderr)
    assert line.startswith(f"error: GridPulse's answer to batch {gp.batches[0]['batch_id']} ")
    assert named in line and line.endswith("no row changed, the next send retries"), line
    assert len(gp.batches) == 1  # terminal for the run: not retried with backoff
    # Not acked, not dead, not deferred: every table but runs exactly as before.
    assert tables(db) == before
    with sqlite3.connect(db) as con:
        status, counts, error = con.execute(
            "SELECT status, counts, error FROM runs WHERE stage = 'send'"
        ).fetchone()
    assert status == "failed" and named in error
    recorded = json.loads(counts)
    assert (recorded["sent"], recorded["batches"], recorded["acked"]) == (0, 0, 0)
    assert recorded["requests"] == 1
    assert "sent=0 " in refused.stderr and "acked=0 " in refused.stderr  # the failed-run line

    with running_receiver(tmp_path, api_key=KEY) as receiver:
        sent = outbox("send", env=env(db, receiver.base_url))
        assert sent.returncode == 0, sent.stderr
        held = receiver_rows(receiver.base_url, KEY)
    assert states(db) == {"acked": SAMPLE_ROWS}
    assert len(held) == SAMPLE_ROWS
    batches = receiver_batches(receiver.db_path).values()
    assert sum(b["rows"] for b in batches) == SAMPLE_ROWS
    assert all(b["times_seen"] == 1 for b in batches)


def test_consistent_answer_with_rejections_is_an_acknowledgement(db: Path) -> None:
    """The control: the same server answering consistently settles every row."""

    def answer(batch: dict[str, Any]) -> Reply:
        n = len(batch["observations"])
        return answered(accepted=n - 2, rejected=[rejection(1)(batch), rejection(4)(batch)])(batch)

    with scripted_gridpulse(answer) as gp:
        done = outbox("send", env=env(db, gp.base_url))
    assert done.returncode == 0, done.stderr
    assert states(db) == {"acked": SAMPLE_ROWS - 6, "dead": 6}
    assert len(gp.batches) == 3


def refuse_all(batch: dict[str, Any]) -> Reply:
    return Reply(400, {"error": {"code": "SCHEMA_CHANGED", "message": "no", "details": {}}})


@pytest.mark.parametrize("limit", [3, 5])
def test_gridpulse_refusing_every_batch_trips_the_circuit_breaker(db: Path, limit: int) -> None:
    env_ = env(db, "")
    env_["OUTBOX__GRIDPULSE__BATCH_SIZE"] = "5000"  # the whole backlog in one batch
    if limit != 3:  # 3 is the default
        env_["OUTBOX__GRIDPULSE__CIRCUIT_BREAKER_ROWS"] = str(limit)
    with scripted_gridpulse(refuse_all) as gp:
        env_["GRIDPULSE_BASE_URL"] = gp.base_url
        stopped = outbox("send", env=env_)
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode == 1, said
    assert "Traceback" not in said
    [line] = error_lines(stopped.stderr)
    assert line.startswith("error: GridPulse rejects everything (code SCHEMA_CHANGED): "), line
    # K rows refused alone, then the probe (the batch's last row, the newest) refused
    # alone with the same code: dead like any row refused alone, K + 1 in all.
    assert states(db) == {"dead": limit + 1, "pending": SAMPLE_ROWS - limit - 1}
    # The first bisection halves down to one row (ceil(log2(n)) requests after the batch's
    # own); each further row costs its batch's request and one alone; the probe one more.
    first = 1 + math.ceil(math.log2(SAMPLE_ROWS))
    assert len(gp.batches) == first + 2 * (limit - 1) + 1
    assert [len(b["observations"]) for b in gp.batches[first:]] == [
        SAMPLE_ROWS - 1,
        1,
        SAMPLE_ROWS - 2,
        1,
    ] + [n for k in range(3, limit) for n in (SAMPLE_ROWS - k, 1)] + [1]
    newest = keys_in_order(db)[-1]
    assert keys(gp.batches[-1]) == [newest] and newest in line


def keys_in_order(db: Path) -> list[str]:
    """Every row as ``series_id ts``, in the order a send claims them."""
    with sqlite3.connect(db) as con:
        found = con.execute("SELECT series_id, ts FROM observations ORDER BY ts, series_id")
        return [f"{sid} {ts}" for sid, ts in found]


def keys(batch: dict[str, Any]) -> list[str]:
    return [f"{o['series_id']} {o['ts']}" for o in batch["observations"]]


def test_three_bad_rows_at_the_head_are_dead_and_every_good_row_delivered(db: Path) -> None:
    """Three refused rows in a row that are neighbours in the queue (its three oldest) are
    not a GridPulse rejecting everything: the probe from outside them is accepted."""
    order = keys_in_order(db)
    bad = set(order[:3])

    def answer(batch: dict[str, Any]) -> Reply:
        if bad & set(keys(batch)):
            return Reply(400, {"error": {"code": "OUT_OF_RANGE", "message": "no", "details": {}}})
        return answered()(batch)

    with scripted_gridpulse(answer) as gp:
        done = outbox("send", env=env(db, gp.base_url))
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert error_lines(done.stderr) == [] and "rejects everything" not in said
    assert states(db) == {"acked": SAMPLE_ROWS - 3, "dead": 3}
    with sqlite3.connect(db) as con:
        dead = con.execute(
            "SELECT series_id, ts, last_error_code FROM row_states WHERE state = 'dead'"
        ).fetchall()
    assert sorted(f"{sid} {ts}" for sid, ts, _ in dead) == sorted(bad)
    assert {code for *_, code in dead} == {"OUT_OF_RANGE"}
    # Every good row went in exactly one accepted request.
    delivered = [k for b in gp.batches if not bad & set(keys(b)) for k in keys(b)]
    assert sorted(delivered) == sorted(order[3:])
    # Requests: the first bisection of 1,000 rows (1 + 10), the 2nd and 3rd rows each in
    # their batch and alone (4), the probe (the third refused batch's last row, alone,
    # accepted), then the 2,372 rows left in full batches.
    first = 1 + math.ceil(math.log2(BATCH))
    probe = first + 4
    assert keys(gp.batches[probe]) == [order[BATCH + 1]]
    rest = math.ceil((SAMPLE_ROWS - 4) / BATCH)
    assert len(gp.batches) == probe + 1 + rest
