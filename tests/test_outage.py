"""Outage and shutdown.

* GridPulse answers 503 for a simulated 72 hours of hourly fetch + send runs (frozen
  clock moved one hour a run; the stand-in EIA server publishes one more hour each time;
  the reference receiver runs with ``--fault 503:1.0``). Nothing is dropped or
  dead-lettered; after recovery one send drains the whole backlog, oldest first.
* SIGTERM (how systemd stops a service) during a send whose receiver keeps failing, and
  during a fetch: the process exits promptly with 143, the run is recorded as failed
  ("interrupted by SIGTERM"), and no row changes state.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from durability import (
    KEY_EIA,
    KEY_GP,
    await_run,
    connect,
    expected_streams,
    integrity,
    outbox_env,
    route_rows,
    spawn,
    tables,
    watermark_violations,
    write_replay,
)
from freezegun import freeze_time

from outbox.config import Config
from outbox.retry import RetryPolicy
from outbox.sample.receiver import receiver_rows, running_receiver
from outbox.sinks.gridpulse import GridPulseClient, GridPulseSink, IngestResult
from outbox.sources.eia import EIAClient
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.stages.send import SendFailed, run_send
from outbox.store import Store
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import ROUTES, make_rows
from outbox.timeutil import to_ts

T0 = datetime(2026, 3, 1, tzinfo=UTC)
BACKFILL = 24
OUTAGE_HOURS = {"ci": 72, "soak": 168}
SIGTERM_TRIALS = {"ci": 1, "soak": 10}
BAS = {"PJM": "PJM"}


class Recording(GridPulseClient):
    """The real client, remembering the ``ts`` of every batch it posts, in order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.posted: list[list[str]] = []

    def post_batch(self, batch_id: str, body: bytes, **kwargs: Any) -> IngestResult:
        self.posted.append([o["ts"] for o in orjson.loads(body)["observations"]])
        return super().post_batch(batch_id, body, **kwargs)


def published(rows: dict[str, list[dict]], now: datetime) -> dict[str, list[dict]]:
    """What EIA has published at ``now``: every hour that has ended (demand forecasts
    a day ahead)."""
    last = now.strftime("%Y-%m-%dT%H")
    ahead = (now + timedelta(hours=24)).strftime("%Y-%m-%dT%H")
    return {
        route: [r for r in data if r["period"] <= (ahead if r.get("type") == "DF" else last)]
        for route, data in rows.items()
    }


def test_72_hours_of_503_then_one_run_drains_oldest_first(
    tmp_path: Path, scale: str, figures, receiver_db: str | None
) -> None:
    """On the SQLite and on the PostgreSQL receiver (``receiver_db``)."""
    hours = OUTAGE_HOURS[scale]
    start = T0 - timedelta(hours=BACKFILL)
    rows = {
        route: make_rows(route, list(BAS.values()), start, BACKFILL + hours + 48)
        for route in ROUTES
    }
    config = Config.model_validate(
        {
            "balancing_authorities": BAS,
            "eia": {"history_start": to_ts(start), "backfill_chunk_hours": 100000},
            "gridpulse": {
                "batch_size": 500,
                "retry": {"attempts": 2, "initial_backoff_seconds": 0, "max_backoff_seconds": 0},
            },
            "housekeeping": {"retention_days": 36500},
        }
    )
    db = tmp_path / "outbox.db"
    with (
        running_receiver(tmp_path, api_key=KEY_GP, faults=["503:1.0"], db=receiver_db) as receiver,
        FakeEIA(published(rows, T0), api_key=KEY_EIA) as fake,
        httpx.Client(timeout=30) as http,
        Store.open(db) as store,
    ):
        assert fake.base_url is not None
        eia = EIAClient(http, fake.base_url, KEY_EIA, retry=RetryPolicy.no_wait(2), sleep=_no_wait)
        gridpulse = Recording(http, receiver.base_url, KEY_GP)
        first_batches = []
        with freeze_time(T0 + timedelta(minutes=5)) as clock:
            for hour in range(hours):
                now = T0 + timedelta(hours=hour, minutes=5)
                clock.move_to(now)
                for route, data in published(rows, now).items():
                    fake.set_rows(route, data)
                run_fetch(config, store, eia)
                head = store.reads.queue_head()
                before = len(gridpulse.posted)
                with pytest.raises(SendFailed):
                    run_send(config, store, GridPulseSink(gridpulse), sleep=_no_wait)
                assert len(gridpulse.posted) > before
                # Every failing run retried the oldest rows: the backlog keeps its order.
                assert head is not None and gridpulse.posted[before][0] == head[1]
                first_batches.append(gridpulse.posted[before][0])

            staged = store.staging.count_rows()
            expected = sum(len(v) for v in published(rows, now).values())
            assert staged == expected, "every published row of the outage is staged"
            assert (
                store.reads.count_state("pending") == staged
                and store.reads.count_state("dead") == 0
            )
            sends = store.runs.recent_runs(limit=hours, stage="send")
            assert [r.status for r in sends] == ["failed"] * hours
            assert receiver_rows(receiver.base_url, KEY_GP) == {}

            receiver.faults = ()
            receiver.restart()
            gridpulse = Recording(http, receiver.base_url, KEY_GP)
            clock.move_to(now + timedelta(minutes=30))
            result = run_send(config, store, GridPulseSink(gridpulse), sleep=_no_wait)
        assert result.acked == staged and result.rejected == 0
        assert store.reads.count_state("pending") == 0 and store.reads.count_state("dead") == 0
        flat = [ts for batch in gridpulse.posted for ts in batch]
        assert flat == sorted(flat), "the backlog drains oldest first"
        held = receiver_rows(receiver.base_url, KEY_GP)
    assert len(held) == staged
    figures(
        suite="outage-503",
        hours=hours,
        send_runs_failed=hours,
        rows=staged,
        drain_batches=len(gridpulse.posted),
        lost=staged - len(held),
        dead=0,
        duplicates=0,
    )


def _no_wait(_seconds: float) -> None:
    return None


def _last_run(db: Path, stage: str) -> tuple:
    with connect(db) as con:
        return con.execute(
            "SELECT status, error, finished_at FROM runs WHERE stage = ? ORDER BY id DESC LIMIT 1",
            (stage,),
        ).fetchone()


def _terminate(proc: subprocess.Popen) -> tuple[int, float]:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    return code, time.monotonic() - sent


def test_sigterm_during_failing_send_changes_no_row(tmp_path: Path, scale: str, figures) -> None:
    rng = random.Random(f"sigterm-send-{scale}")
    db = tmp_path / "outbox.db"
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(write_replay(tmp_path / "eia", route_rows(24))))
    trials, slowest = SIGTERM_TRIALS[scale], 0.0
    with running_receiver(tmp_path, api_key=KEY_GP, faults=["503:1.0"]) as receiver:
        env = outbox_env(
            db,
            receiver=receiver,
            OUTBOX__GRIDPULSE__RETRY__ATTEMPTS="100",
            OUTBOX__GRIDPULSE__RETRY__INITIAL_BACKOFF_SECONDS="0.2",
            OUTBOX__GRIDPULSE__RETRY__MAX_BACKOFF_SECONDS="0.2",
        )
        for _ in range(trials):
            before = tables(db, skip=("runs",))
            pending = before["observations"]
            log = tmp_path / "send.log"
            proc = spawn("send", env=env, log=log)
            await_run(db, proc, "send")
            time.sleep(rng.uniform(0.2, 1.5))
            code, took = _terminate(proc)
            slowest = max(slowest, took)
            said = log.read_text()
            assert code == 128 + signal.SIGTERM, said
            assert took < 5, f"took {took:.1f}s to stop"
            assert "interrupted by SIGTERM" in said and "Traceback" not in said
            status, error, finished = _last_run(db, "send")
            assert (status, error) == ("failed", "interrupted by SIGTERM") and finished
            after = tables(db, skip=("runs",))
            assert after == before, "SIGTERM changed row state"
            assert len(pending) > 0
    figures(suite="sigterm-send", trials=trials, kills=trials, seconds_to_stop=round(slowest, 2))


def test_sigterm_during_fetch_leaves_whole_pages(tmp_path: Path, scale: str, figures) -> None:
    rng = random.Random(f"sigterm-fetch-{scale}")
    data = write_replay(tmp_path / "eia", route_rows(240))
    reference = tmp_path / "reference.db"
    with Store.open(reference) as store:
        started = time.monotonic()
        run_fetch(Config(), store, ReplaySource(data))
        work = time.monotonic() - started  # the range the SIGTERMs are drawn from
    expected = expected_streams(reference)
    trials, stopped_mid = SIGTERM_TRIALS[scale], 0
    for n in range(trials):
        db = tmp_path / f"outbox{n}.db"
        log = tmp_path / f"fetch{n}.log"
        proc = spawn("fetch", "--replay", str(data), env=outbox_env(db), log=log)
        await_run(db, proc, "fetch")
        time.sleep(rng.uniform(0.0, work * 0.8))
        code, took = _terminate(proc)
        said = log.read_text()
        assert took < 5 and "Traceback" not in said
        if code == 0:
            continue  # it finished first
        stopped_mid += 1
        assert code == 128 + signal.SIGTERM, said
        assert _last_run(db, "fetch")[:2] == ("failed", "interrupted by SIGTERM")
        assert integrity(db) == "ok"
        assert watermark_violations(db, expected) == []
    assert stopped_mid >= (trials + 1) // 2, f"only {stopped_mid} of {trials} stopped mid-run"
    figures(suite="sigterm-fetch", trials=trials, interrupted=stopped_mid)
