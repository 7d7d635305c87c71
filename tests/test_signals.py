"""Ctrl-C says why, as SIGTERM does: exit 130, "interrupted by SIGINT", the run failed.

A send whose receiver keeps answering 503 (retries every 0.2 s) is slow enough to be
interrupted mid-run; SIGINT reaches only the outbox process, as `kill -INT` would.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from durability import (
    KEY_GP,
    await_run,
    connect,
    outbox_env,
    route_rows,
    spawn,
    tables,
    write_replay,
)

from outbox.config import Config
from outbox.sample.receiver import running_receiver
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store


def test_sigint_during_send_says_interrupted_by_sigint(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(write_replay(tmp_path / "eia", route_rows(6))))
    before = tables(db)
    with running_receiver(tmp_path, api_key=KEY_GP, faults=["503:1.0"]) as receiver:
        env = outbox_env(
            db,
            receiver=receiver,
            OUTBOX__GRIDPULSE__RETRY__ATTEMPTS="100",
            OUTBOX__GRIDPULSE__RETRY__INITIAL_BACKOFF_SECONDS="0.2",
            OUTBOX__GRIDPULSE__RETRY__MAX_BACKOFF_SECONDS="0.2",
        )
        log = tmp_path / "send.log"
        proc = spawn("send", env=env, log=log)
        await_run(db, proc, "send")
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    said = log.read_text()
    assert code == 128 + signal.SIGINT, said
    assert "Traceback" not in said
    # Besides the log lines (ts=...), exactly one line: the reason.
    plain = [line for line in said.splitlines() if not line.startswith("ts=")]
    assert plain == ["interrupted by SIGINT: stopped; every row keeps its last state"], said
    with connect(db) as con:
        status, error, finished = con.execute(
            "SELECT status, error, finished_at FROM runs WHERE stage = 'send'"
            " ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert (status, error) == ("failed", "interrupted by SIGINT") and finished
    assert tables(db) == before, "SIGINT changed row state"
