"""The outbox's disk: a full file system during fetch or send, and the free-space floor.

A full disk is made real two ways: SQLite's ``PRAGMA max_page_count`` (set on every
connection the worker opens) makes SQLite itself answer SQLITE_FULL on a real file,
everywhere; and, where the machine lets the test mount one, a small tmpfs that a filler
file has nearly filled gives the worker real ENOSPC/SQLITE_FULL in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from durability import T0, integrity, outbox, outbox_env, route_rows, tables, write_replay
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, event
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import load_config
from outbox.sample import sample_dir
from outbox.sample.receiver import receiver_batches, receiver_rows, running_receiver

runner = CliRunner()
# A replay commits each page on its own, so a run that fails part-way leaves whole pages.
ONE_PAGE_A_COMMIT = {
    "OUTBOX__EIA__REPLAY_COMMIT_ROWS": "1",
    "OUTBOX__EIA__REPLAY_READ_AHEAD": "thread",
}


def full_message(db: Path) -> str:
    return f"error: disk full writing {db}: nothing lost, rerun when there is space"


def said(stderr: str) -> list[str]:
    """What a command told its user on stderr: every line but the log lines."""
    return [line for line in stderr.splitlines() if not line.startswith("ts=")]


def failed_line(stderr: str, stage: str) -> str:
    (line,) = [line for line in stderr.splitlines() if f'msg="{stage} failed"' in line]
    return line


def count(line: str, name: str) -> int:
    found = re.search(rf" {name}=(\d+)", line)
    assert found, line
    return int(found.group(1))


@contextmanager
def page_cap(db: Path, extra_pages: int) -> Iterator[None]:
    """Every SQLite connection opened in the block may grow ``db`` by ``extra_pages`` only."""
    with sqlite3.connect(db) as con:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        assert con.execute("PRAGMA freelist_count").fetchone()[0] == 0

    def cap(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages + extra_pages}")

    event.listen(Engine, "connect", cap)
    try:
        yield
    finally:
        event.remove(Engine, "connect", cap)


def run_rows(db: Path, run_id: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Rows staged by one run, and (page id, rows it holds, rows on the page) per page."""
    with sqlite3.connect(db) as con:
        found = con.execute(
            "SELECT p.id, count(o.series_id), p.row_count FROM pages p"
            " LEFT JOIN observations o ON o.page_id = p.id WHERE p.run_id = ?"
            " GROUP BY p.id ORDER BY p.id",
            (run_id,),
        ).fetchall()
    return sum(n for _, n, _ in found), found


# -- a full disk during fetch ---------------------------------------------------------


def test_fetch_on_a_full_database_fails_in_one_line_and_stages_whole_pages(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    env = {**outbox_env(db), **ONE_PAGE_A_COMMIT}
    assert runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env).exit_code == 0
    before = tables(db)
    rows = route_rows(24, start=T0 + timedelta(days=90))
    later, offered = write_replay(tmp_path / "later", rows), sum(map(len, rows.values()))

    with page_cap(db, 60):  # room for a page or two of the 15 the replay holds
        result = runner.invoke(app, ["fetch", "--replay", str(later)], env=env)

    assert result.exit_code == 1, result.output
    assert said(result.stderr) == [full_message(db)]
    assert "Traceback" not in result.output
    assert integrity(db) == "ok"
    after = tables(db)
    assert set(before["observations"]) <= set(after["observations"])  # intact, unchanged
    staged, by_page = run_rows(db, 2)
    assert all(held == on_page for _, held, on_page in by_page)  # whole pages only
    assert 0 < staged < offered  # some pages went in, the failed one did not
    assert len(after["observations"]) == len(before["observations"]) + staged
    line = failed_line(result.stderr, "fetch")
    assert (count(line, "written"), count(line, "pages")) == (staged, len(by_page))
    with sqlite3.connect(db) as con:
        status, error = con.execute("SELECT status, error FROM runs WHERE id = 2").fetchone()
    assert (status, error) == ("failed", full_message(db).removeprefix("error: "))

    again = runner.invoke(app, ["fetch", "--replay", str(later)], env=env)  # space again
    assert again.exit_code == 0, again.output
    assert run_rows(db, 3)[0] == offered - staged  # nothing lost: the rest arrives


# -- a full disk during send -------------------------------------------------------------


def test_send_whose_ack_write_finds_the_disk_full_leaves_every_row_pending(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    with running_receiver(tmp_path) as receiver:
        env = {**outbox_env(db, receiver=receiver), **ONE_PAGE_A_COMMIT}
        fetched = runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env)
        assert fetched.exit_code == 0, fetched.output
        before = tables(db)

        with page_cap(db, 0):  # the batch's acknowledgement (2,376 keys) needs new pages
            result = runner.invoke(app, ["send"], env=env)

        assert result.exit_code == 1, result.output
        assert said(result.stderr) == [full_message(db)]
        assert "Traceback" not in result.output
        (batch,) = receiver_batches(receiver.db_path).values()  # GridPulse answered it
        assert integrity(db) == "ok"
        assert tables(db) == before  # every row pending as it was, no ack recorded
        line = failed_line(result.stderr, "send")
        assert (count(line, "acked"), count(line, "rejected")) == (0, 0)

        again = runner.invoke(app, ["send"], env=env)
        assert again.exit_code == 0, again.output
        (resent,) = receiver_batches(receiver.db_path).values()  # the same batch again
        assert (resent["batch_id"], resent["times_seen"]) == (batch["batch_id"], 2)
        held = receiver_rows(receiver.base_url, receiver.api_key)
    with sqlite3.connect(db) as con:
        states = dict(con.execute("SELECT state, count(*) FROM row_states GROUP BY state"))
    assert states == {"acked": 2376} and len(held) == 2376


# -- a real small file system ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 8 MiB tmpfs mounted for this test (skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on ``disk``."""
    filler = disk / f"filler-{uuid.uuid4().hex}"
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def test_fetch_on_a_full_tmpfs(small_disk: Path, tmp_path: Path) -> None:
    db = small_disk / "outbox.db"
    # No free-space floor: this is what happens when the disk fills all the same.
    env = outbox_env(db, **ONE_PAGE_A_COMMIT, OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES="0")
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    before = tables(db)
    rows = route_rows(72, start=T0 + timedelta(days=90))
    later, offered = write_replay(tmp_path / "later", rows), sum(map(len, rows.values()))
    filler = fill(small_disk, 600_000)

    done = outbox("fetch", "--replay", str(later), env=env)

    assert done.returncode == 1, done.stderr
    assert said(done.stderr) == [full_message(db)]
    assert "Traceback" not in done.stderr + done.stdout
    assert integrity(db) == "ok"
    after = tables(db)
    assert set(before["observations"]) <= set(after["observations"])
    staged, by_page = run_rows(db, 2)
    assert all(held == on_page for _, held, on_page in by_page)
    assert len(after["observations"]) == len(before["observations"]) + staged
    assert count(failed_line(done.stderr, "fetch"), "written") == staged

    os.unlink(filler)
    again = outbox("fetch", "--replay", str(later), env=env)
    assert again.returncode == 0, again.stderr
    assert len(tables(db)["observations"]) == len(before["observations"]) + offered


def test_send_on_a_full_tmpfs(small_disk: Path, tmp_path: Path) -> None:
    db = small_disk / "outbox.db"
    with running_receiver(tmp_path) as receiver:
        env = outbox_env(db, receiver=receiver, OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES="0")
        assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
        before = tables(db)
        filler = fill(small_disk, 64_000)

        done = outbox("send", env=env)

        assert done.returncode == 1, done.stderr
        assert said(done.stderr) == [full_message(db)]
        assert "Traceback" not in done.stderr + done.stdout
        assert integrity(db) == "ok"
        assert tables(db) == before  # nothing acknowledged in the outbox, nothing lost

        os.unlink(filler)
        again = outbox("send", env=env)
        assert again.returncode == 0, again.stderr
        held = receiver_rows(receiver.base_url, receiver.api_key)
    with sqlite3.connect(db) as con:
        states = dict(con.execute("SELECT state, count(*) FROM row_states GROUP BY state"))
    assert states == {"acked": 2376} and len(held) == 2376


# -- the free-space floor (housekeeping.min_free_bytes) -------------------------------------

GiB = 2**30


def test_fetch_refuses_to_stage_under_the_free_space_floor(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    env = {**outbox_env(db), "OUTBOX__EIA__REPLAY_READ_AHEAD": "thread"}
    assert load_config(None).housekeeping.min_free_bytes == 256 * 2**20
    staged = runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env)
    assert staged.exit_code == 0, staged.output  # under the default floor: stages
    before = tables(db)
    later = write_replay(tmp_path / "later", route_rows(24, start=T0 + timedelta(days=90)))
    free = shutil.disk_usage(tmp_path).free
    floor = free + 1024 * GiB

    result = runner.invoke(
        app,
        ["fetch", "--replay", str(later)],
        env={**env, "OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES": str(floor)},
    )

    assert result.exit_code == 4, result.output
    (line,) = said(result.stderr)
    shown = re.fullmatch(
        rf"error: disk space low: (\d+) bytes free on the file system of {re.escape(str(db))}"
        rf" and this page needs about \d+ more \(housekeeping\.min_free_bytes = {floor}\);"
        r" nothing was staged and nothing evicted: .*",
        line,
    )
    assert shown, line
    assert abs(int(shown.group(1)) - free) < GiB  # the real figure, moments apart
    assert "Traceback" not in result.output
    assert tables(db) == before  # nothing staged: the outbox is as it was
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT status FROM runs WHERE id = 2").fetchone() == ("failed",)

    normal = runner.invoke(
        app,
        ["fetch", "--replay", str(later)],
        env={**env, "OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES": str(2**20)},
    )
    assert normal.exit_code == 0, normal.output
    assert len(tables(db)["observations"]) > len(before["observations"])


def test_status_shows_free_disk_space_and_warns_under_the_floor(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    env = {**outbox_env(db), "OUTBOX__EIA__REPLAY_READ_AHEAD": "thread", "COLUMNS": "200"}
    assert runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env).exit_code == 0
    free = shutil.disk_usage(tmp_path).free

    data = json.loads(runner.invoke(app, ["status", "--json"], env=env).stdout)
    assert abs(data["disk_free_bytes"] - free) < GiB
    assert "disk space low" not in data["check"]["summary"]
    metrics = tmp_path / "outbox.prom"
    assert runner.invoke(app, ["status", "--metrics", str(metrics)], env=env).exit_code == 0
    (sample,) = [
        s
        for family in text_string_to_metric_families(metrics.read_text())
        for s in family.samples
        if s.name == "outbox_disk_free_bytes"
    ]
    assert abs(sample.value - free) < GiB
    table = runner.invoke(app, ["status"], env=env).stdout
    assert re.search(r"^database: .*; \d+\.\d [MGT]B free\)$", table, re.M), table

    low = {**env, "OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES": str(free + 1024 * GiB)}
    check = runner.invoke(app, ["status", "--check"], env=low)
    assert check.exit_code >= 1  # at least a warning (the sample's data is old: stale too)
    assert re.search(
        r"; disk space low: \d+\.\d [MGT]B free \(housekeeping\.min_free_bytes \d+\.\d TB:"
        r" fetch stages nothing below it\)",
        check.stdout,
    ), check.stdout
    off = {**env, "OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES": "0"}
    assert "disk space low" not in runner.invoke(app, ["status", "--check"], env=off).stdout
