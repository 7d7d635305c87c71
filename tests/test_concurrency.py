"""Concurrency: senders started together, and fetch + send + status running side by side.

* 2-8 ``outbox send`` processes start at the same instant, round after round (EIA
  revises part of the data between rounds; the first round starts on an empty database
  file, no tables yet, so the migrations race too): exactly one of them sends, the others
  report the running one and exit 0; the receiver never sees a batch twice.
* ``fetch``, ``send`` and ``status`` (table, ``--json``, ``--check``, ``--metrics``) and
  ``runs`` loop together: no "database is locked" (or any traceback) reaches the user.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from durability import (
    KEY_GP,
    connect,
    latest_staged,
    outbox,
    outbox_env,
    receiver_held,
    route_rows,
    states,
    write_replay,
)

from outbox.normalize import revision_of
from outbox.sample.receiver import receiver_batches, running_receiver
from outbox.store import Store

ROUNDS = {"ci": [2, 8], "soak": None}
SOAK_ROUNDS = 100
LOOP_SECONDS = {"ci": 8.0, "soak": 60.0}
SENT = re.compile(r"send run \d+: (\d+) rows in (\d+) batches")
LOCKED = re.compile(r"database is locked|database table is locked|Traceback", re.IGNORECASE)


def start_together(n: int, env: dict[str, str]) -> list[tuple[int, str]]:
    """Start ``n`` senders at once (a barrier releases them); (exit code, output) each."""
    barrier = threading.Barrier(n)
    results: list[tuple[int, str]] = [(0, "")] * n

    def run(i: int) -> None:
        barrier.wait()
        done = subprocess.run(
            [sys.executable, "-m", "outbox", "send"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        results[i] = (done.returncode, done.stdout + done.stderr)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def revise(db: Path, rng: random.Random, share: float) -> int:
    with connect(db) as con:
        acked = con.execute(
            "SELECT series_id, ts, value FROM row_states WHERE state = 'acked'"
        ).fetchall()
    rows = []
    for sid, ts, value in rng.sample(acked, int(len(acked) * share)):
        new = (value or 0.0) + rng.choice((-3.0, 2.0, 5.0))
        rows.append((sid, ts, new, "MW", "good", revision_of(new, "good", "MW"), 0))
    with Store.open(db) as store:
        return store.staging.stage(rows).written


def test_senders_started_together_exactly_one_sends(tmp_path: Path, scale: str, figures) -> None:
    rng = random.Random(f"together-{scale}")
    rounds = ROUNDS[scale] or [rng.randint(2, 8) for _ in range(SOAK_ROUNDS)]
    db = tmp_path / "outbox.db"
    data = write_replay(tmp_path / "eia", route_rows(24))
    db.touch()  # no tables yet: the first round's senders race to migrate it
    staged_pairs = processes = 0
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="100")
        for r, n in enumerate(rounds):
            if r == 1:
                fetched = outbox("fetch", "--replay", str(data), env=env)
                assert fetched.returncode == 0, fetched.stderr
                staged_pairs += states(db)["pending"]
            elif r > 1:
                staged_pairs += revise(db, rng, rng.uniform(0.2, 0.6))
            results = start_together(n, env)
            processes += n
            outputs = [out for _, out in results]
            assert [code for code, _ in results] == [0] * n, outputs
            assert not [o for o in outputs if LOCKED.search(o)], outputs
            sent = [int(m.group(1)) for o in outputs if (m := SENT.search(o))]
            waited = sum("a send is already running" in o for o in outputs)
            assert len(sent) + waited == n, outputs
            if r == 0:
                assert sum(sent) == 0  # an empty file: every process migrated or waited
            else:
                assert sum(1 for s in sent if s > 0) == 1, f"round {r}: {outputs}"
                assert states(db) == {"acked": len(latest_staged(db))}
        batches = receiver_batches(receiver.db_path).values()
        held = receiver_held(receiver.db_path)
    duplicates = sum(b["rows"] for b in batches) - staged_pairs
    resent = sum(b["times_seen"] - 1 for b in batches)
    figures(
        suite="senders-together",
        trials=len(rounds),
        processes=processes,
        rows=len(held),
        staged_pairs=staged_pairs,
        lost=sum(1 for k, v in latest_staged(db).items() if held.get(k) != v),
        duplicates=duplicates,
        redelivered_batches=resent,
    )
    assert resent == 0 and duplicates == 0
    assert held == latest_staged(db)


class Loop(threading.Thread):
    """Runs one command line after another until the deadline; keeps every output."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], until: float) -> None:
        super().__init__(daemon=True)
        self.commands, self.env, self.until = commands, env, until
        self.results: list[tuple[list[str], int, str]] = []

    def run(self) -> None:
        i = 0
        while time.monotonic() < self.until:
            args = self.commands[i % len(self.commands)]
            done = subprocess.run(
                [sys.executable, "-m", "outbox", *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.results.append((args, done.returncode, done.stdout + done.stderr))
            i += 1


def test_fetch_send_status_together_never_locked(tmp_path: Path, scale: str, figures) -> None:
    db = tmp_path / "outbox.db"
    versions = []
    for seed in (0, 1):
        versions.append(write_replay(tmp_path / f"eia{seed}", route_rows(24, seed=seed)))
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="200")
        assert outbox("db", "upgrade", env=env).returncode == 0
        until = time.monotonic() + LOOP_SECONDS[scale]
        metrics = tmp_path / "outbox.prom"
        loops = [
            Loop([["fetch", "--replay", str(v)] for v in versions], env, until),
            Loop([["send"]], env, until),
            Loop(
                [
                    ["status"],
                    ["status", "--json"],
                    ["status", "--check"],
                    ["status", "--metrics", str(metrics)],
                    ["runs", "--limit", "5"],
                ],
                env,
                until,
            ),
        ]
        for loop in loops:
            loop.start()
        for loop in loops:
            loop.join(LOOP_SECONDS[scale] + 300)
        final = outbox("send", env=env)
        assert final.returncode == 0, final.stderr
        held = receiver_held(receiver.db_path)
    runs = [r for loop in loops for r in loop.results]
    locked = [(args, out) for args, _, out in runs if LOCKED.search(out)]
    failed = [
        (args, code, out)
        for args, code, out in runs
        if code != 0 and not (args[:2] == ["status", "--check"] and code in (1, 2))
    ]
    figures(
        suite="fetch-send-status",
        seconds=LOOP_SECONDS[scale],
        commands=len(runs),
        fetches=len(loops[0].results),
        sends=len(loops[1].results),
        status=len(loops[2].results),
        locked=len(locked),
        failed=len(failed),
    )
    assert locked == [] and failed == []
    assert min(len(loop.results) for loop in loops) >= 1
    assert held == latest_staged(db) and states(db) == {"acked": len(held)}
