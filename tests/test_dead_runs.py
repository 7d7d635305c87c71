"""A run whose process died never stays ``running``.

The next run of the stage, holding the stage's lock, records every earlier run of that
stage still ``running`` as failed, "process gone (pid N)". Until then status and ``runs``
(read-only) show such a run as failed already when the stage's lock is free, and
``status --check`` counts it in the stage's failed runs in a row; a run whose process
holds the lock is running, whatever its age.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from durability import KEY_GP, connect, outbox, outbox_env, route_rows, spawn, write_replay

from outbox import status as status_mod
from outbox.config import load_config
from outbox.sample.receiver import running_receiver
from outbox.store import Store, file_lock, lock_file


def runs_table(db: Path) -> list[tuple]:
    """(id, stage, status, error, pid, finished) of every run, oldest first."""
    with connect(db) as con:
        return con.execute(
            "SELECT id, stage, status, error, pid, finished_at IS NOT NULL FROM runs ORDER BY id"
        ).fetchall()


def killed(*args: str, env: dict[str, str], point: str) -> int:
    """Run ``outbox ARGS`` until it SIGKILLs itself at crash point ``point``; its pid."""
    proc = spawn(*args, env={**env, "OUTBOX_CRASH_AT": point})
    assert proc.wait(120) == -signal.SIGKILL
    return proc.pid


def status_json(env: dict[str, str]) -> dict:
    done = outbox("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_killed_fetches_are_failed_process_gone_and_counted_in_a_row(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    data = write_replay(tmp_path / "eia", route_rows(6))
    env = outbox_env(db)
    first = killed("fetch", "--replay", str(data), env=env, point="stage.before_commit")
    assert runs_table(db) == [(1, "fetch", "running", None, first, 0)]

    # Read-only, before any rerun: shown as failed, the database left as it was.
    seen = status_json(env)
    gone = f"process gone (pid {first})"
    assert seen["last_runs"]["fetch"] | {"counts": None} == {
        "id": 1,
        "stage": "fetch",
        "started_at": seen["last_runs"]["fetch"]["started_at"],
        "finished_at": None,
        "status": "failed",
        "counts": None,
        "error": gone,
        "pid": first,
        "seconds": None,
    }
    assert seen["consecutive_failures"]["fetch"] == 1
    listed = outbox("runs", "--failed", "--json", env=env)
    assert [(r["id"], r["status"], r["error"]) for r in json.loads(listed.stdout)] == [
        (1, "failed", gone)
    ]
    assert runs_table(db) == [(1, "fetch", "running", None, first, 0)]

    # The next fetch records it; killed too, it is itself shown gone: two in a row.
    second = killed("fetch", "--replay", str(data), env=env, point="stage.before_commit")
    assert runs_table(db) == [
        (1, "fetch", "failed", gone, first, 1),
        (2, "fetch", "running", None, second, 0),
    ]
    check = outbox("status", "--check", env=env)
    assert (check.returncode, check.stdout, check.stderr) == (
        1,
        "WARNING - fetch failed 2 runs in a row (warn at 2)\n",
        "",
    )

    done = outbox("fetch", "--replay", str(data), env=env)
    assert done.returncode == 0, done.stderr
    logged = r'level=warning .*msg="earlier run recorded as failed: process gone"'
    logged += rf".* gone_run=2 pid={second}"
    assert re.search(logged, done.stderr), done.stderr
    assert runs_table(db) == [
        (1, "fetch", "failed", gone, first, 1),
        (2, "fetch", "failed", f"process gone (pid {second})", second, 1),
        (3, "fetch", "ok", None, done_pid(db, 3), 1),
    ]
    assert status_json(env)["consecutive_failures"]["fetch"] == 0
    table = outbox("runs", env={**env, "COLUMNS": "160"})
    assert f"process gone (pid {second})" in table.stdout


def done_pid(db: Path, run_id: int) -> int:
    with connect(db) as con:
        return con.execute("SELECT pid FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


def test_a_killed_send_is_failed_by_the_next_send(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    data = write_replay(tmp_path / "eia", route_rows(2, bas=("PJM",)))
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        env = outbox_env(db, receiver=receiver)
        assert outbox("fetch", "--replay", str(data), env=env).returncode == 0
        pid = killed("send", env=env, point="send.after_post")
        assert runs_table(db)[-1] == (2, "send", "running", None, pid, 0)
        done = outbox("send", env=env)
        assert done.returncode == 0, done.stderr
    assert runs_table(db)[1:] == [
        (2, "send", "failed", f"process gone (pid {pid})", pid, 1),
        (3, "send", "ok", None, done_pid(db, 3), 1),
    ]
    with connect(db) as con:
        assert con.execute("SELECT DISTINCT state FROM row_states").fetchall() == [("acked",)]


def test_a_run_whose_process_holds_the_lock_is_running(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    config = load_config(None).model_copy(update={"database": str(db)})
    data = write_replay(tmp_path / "eia", route_rows(1, bas=("PJM",)))
    env = outbox_env(db)
    with file_lock(lock_file(db, "fetch"), blocking=False) as got:
        assert got
        with Store.open(db) as store:
            store.runs.start_run("fetch", now="2025-01-01T00:00:00Z")  # long ago: age says nothing
        model = status_mod.read(config)
        assert model.last_runs["fetch"]["status"] == "running"
        assert model.consecutive_failures["fetch"] == 0
        other = outbox("fetch", "--replay", str(data), env=env)
        assert other.returncode == 0, other.stderr
        assert other.stdout == f"a fetch is already running (pid {os.getpid()}); nothing to do\n"
        assert [r[2] for r in runs_table(db)] == ["running"]
    # The lock is free now and the run still shows running: its process is gone.
    model = status_mod.read(config)
    assert model.last_runs["fetch"]["status"] == "failed"
    assert model.last_runs["fetch"]["error"] == f"process gone (pid {os.getpid()})"
    assert model.consecutive_failures["fetch"] == 1


def test_a_run_that_finishes_while_status_looks_is_not_called_gone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = store.runs.start_run("send")

    def finishes_meanwhile(path: object) -> bool:
        # The run records its end and releases its lock between status's read and probe.
        store.runs.finish_run(run, "ok", {})
        return False

    monkeypatch.setattr("outbox.store.ledger.lock_held", finishes_meanwhile)
    summary = store.runs.run_summary("send")
    assert summary.last is not None and summary.last.status == "running"  # the first read
    assert summary.consecutive_failures == 0
    monkeypatch.undo()
    assert store.runs.run_summary("send").last_ok is not None


def test_start_run_fails_the_stages_leftover_runs_only(store: Store) -> None:
    old = store.runs.start_run("fetch", now="2025-08-22T09:00:00Z")
    store.runs.finish_run(old, "ok", {}, now="2025-08-22T09:01:00Z")
    store.runs.start_run("fetch", now="2025-08-22T10:00:00Z")
    store.runs.start_run("send", now="2025-08-22T10:00:00Z")
    store.runs.start_run("fetch", now="2025-08-22T11:00:00Z")
    gone = f"process gone (pid {os.getpid()})"
    with connect(store.path) as con:
        assert con.execute("SELECT id, stage, status, finished_at, error FROM runs").fetchall() == [
            (1, "fetch", "ok", "2025-08-22T09:01:00Z", None),
            (2, "fetch", "failed", "2025-08-22T11:00:00Z", gone),  # finished: when found
            (3, "send", "running", None, None),  # left to the next send
            (4, "fetch", "running", None, None),
        ]
    with file_lock(store.lock_path("fetch"), blocking=False):  # run 4 is alive
        records = {r.id: r for r in store.runs.recent_runs(stage="fetch")}
    assert records[4].status == "running" and not records[4].gone
    assert records[2].gone and status_mod.run_seconds(records[2]) is None  # end unknown
    assert status_mod.run_seconds(records[1]) == 60.0


def test_status_probes_a_lock_without_creating_or_writing_it(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Store.open(db) as store:
        store.runs.start_run("send")
    lock = lock_file(db, "send")
    assert not lock.exists()
    env = outbox_env(db)
    done = outbox("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["last_runs"]["send"]["status"] == "failed"
    assert not lock.exists()
    lock.write_text("4711\n")
    assert json.loads(outbox("status", "--json", env=env).stdout)["consecutive_failures"] == {
        "fetch": 0,
        "send": 1,
    }
    assert lock.read_text() == "4711\n"
