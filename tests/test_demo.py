"""`outbox demo`: the README's first command, offline, ends with every row acknowledged,
and leaves an outbox the README's sqlite3 lines can explore."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
from pathlib import Path

from outbox.sample import sample_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROWS = 2376


def outbox(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("outbox")
    assert exe
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**environ, **(env or {})},
    )


def states(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT state, count(*) FROM row_states GROUP BY state").fetchall()


def sqlite3_lines(text: str) -> list[tuple[str, str]]:
    """``(path, sql)`` of every ``sqlite3 [options] PATH 'SQL'`` line in ``text``."""
    found = []
    for line in text.splitlines():
        if line.strip().startswith("sqlite3 "):
            *_, path, sql = shlex.split(line.strip())
            found.append((path, sql))
    return found


def run_sqlite3_lines(lines: list[tuple[str, str]], cwd: Path) -> dict[str, list[tuple]]:
    """Each line's query on its file, the path taken from ``cwd`` as a shell would."""
    results = {}
    for path, sql in lines:
        with sqlite3.connect(f"file:{cwd / path}?mode=ro", uri=True) as conn:
            results[sql] = conn.execute(sql).fetchall()
    return results


def test_demo_keeps_an_explorable_outbox_in_outbox_demo(tmp_path: Path) -> None:
    done = outbox("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"ok: the receiver holds all {SAMPLE_ROWS} observations; {SAMPLE_ROWS} acknowledged" in (
        done.stdout
    )
    assert "check: OK - 99 series, 0 pending, 0 dead" in done.stdout
    assert "totals: 99 series in 30 rows, 0 pending, 0 dead" in done.stdout
    assert "kept in outbox-demo/ (outbox.db, receiver.db, config.yaml, report.html)" in done.stdout
    kept = tmp_path / "outbox-demo"
    # It ends by writing the report, as of the hours after the sample day (so: OK).
    assert "report: outbox-demo/report.html (open it in a browser)" in done.stdout
    page = (kept / "report.html").read_text()
    assert '<span class="label">OK</span>' in page and '"id":"generation-PJM"' in page
    # The demo's send ends with the cheap prune, as `outbox send` does: its retention
    # covers the old sample day, so every row is still there, acknowledged.
    assert states(kept / "outbox.db") == [("acked", SAMPLE_ROWS)]
    with sqlite3.connect(kept / "receiver.db") as conn:
        assert conn.execute("SELECT count(*) FROM observations").fetchone() == (SAMPLE_ROWS,)

    # The lines the demo prints, and the README's sqlite3 lines, work as written.
    printed = sqlite3_lines(done.stdout)
    assert ("outbox-demo/outbox.db", "select count(*) from observations") in printed
    assert run_sqlite3_lines(printed, tmp_path)["select count(*) from observations"] == [
        (SAMPLE_ROWS,)
    ]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Inspecting the outbox with sqlite3", 1)[1].split("\n## ", 1)[0]
    documented = sqlite3_lines(section)
    assert len(documented) >= 5 and {path for path, _ in documented} == {"outbox-demo/outbox.db"}
    answers = run_sqlite3_lines(documented, tmp_path)
    assert answers["select count(*) from observations"] == [(SAMPLE_ROWS,)]
    assert answers["select count(*) from pending"] == [(0,)]

    # Its config.yaml finds the outbox from anywhere, and a prune keeps the sample.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pruned = outbox("-c", str(kept / "config.yaml"), "prune", cwd=elsewhere)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("pruned 0 acknowledged rows")
    assert states(kept / "outbox.db") == [("acked", SAMPLE_ROWS)]
    assert not list(elsewhere.iterdir())

    # Run again: it starts afresh in its own directory (no second copy of anything).
    again = outbox("demo", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert states(kept / "outbox.db") == [("acked", SAMPLE_ROWS)]
    with sqlite3.connect(kept / "outbox.db") as conn:
        assert conn.execute("SELECT id, stage FROM runs ORDER BY id").fetchall() == [
            (1, "fetch"),
            (2, "send"),
        ]
    assert sorted(p.name for p in kept.glob("receiver-*")) == ["receiver-1.err", "receiver-1.out"]


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    done = outbox("demo", "--keep", "mine", cwd=tmp_path)
    assert done.returncode == 2
    assert one_error_line(done) == (
        "error: --keep mine: not empty and not made by `outbox demo`; name a new or empty directory"
    )
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    done = outbox("demo", "--keep", "afile", cwd=tmp_path)
    assert done.returncode == 2
    assert one_error_line(done) == "error: --keep afile: not a directory"


def test_demo_says_in_one_line_when_its_receiver_cannot_start(tmp_path: Path) -> None:
    kept = tmp_path / "outbox-demo"
    kept.mkdir()
    (kept / ".outbox-demo").write_text("")  # a directory a previous demo made
    (kept / "receiver.db").mkdir()  # ... where the receiver cannot open its database
    done = outbox("demo", cwd=tmp_path)
    assert done.returncode == 1
    line = one_error_line(done)
    assert line.startswith("error: demo: the reference receiver did not start (receiver exited")
    assert line.endswith("see outbox-demo/receiver-*.err)")


def test_sample_dir_is_printed_and_replays(tmp_path: Path) -> None:
    """The README's `outbox fetch --replay "$(outbox demo --sample-dir)"`."""
    shown = outbox("demo", "--sample-dir", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"{sample_dir()}\n"
    assert sorted(p.name for p in Path(shown.stdout.strip()).glob("*.json"))
    assert not list(tmp_path.iterdir())  # it only prints
    readme = (ROOT / "README.md").read_text()
    assert 'outbox fetch --replay "$(outbox demo --sample-dir)"' in readme
    replay = outbox(
        "fetch", "--replay", shown.stdout.strip(), cwd=tmp_path, env={"OUTBOX_DB": "o.db"}
    )
    assert replay.returncode == 0, replay.stderr
    assert re.search(rf"\b{SAMPLE_ROWS} rows, {SAMPLE_ROWS} written\b", replay.stdout)
    assert states(tmp_path / "o.db") == [("pending", SAMPLE_ROWS)]
