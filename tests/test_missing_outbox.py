"""Commands on a path where no outbox exists create nothing and say so in one line.

Only ``fetch``, ``db upgrade`` and ``doctor --reset`` create an outbox. Every other
command, run as a real process on a missing path (a missing file, and a missing parent
directory), leaves the directory exactly as it was: no database, no ``-wal``/``-shm``,
no lock file, no migration lock, no metrics file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from durability import outbox, outbox_env
from typer.testing import CliRunner

from outbox.cli import app

CREATE_HINT = "(run `outbox fetch` or `outbox db upgrade` to create one)"
# (arguments, exit code, which stream carries the one line)
READERS = [
    (["status"], 2, "stderr"),
    (["status", "--json"], 2, "stderr"),
    (["status", "--remote"], 2, "stderr"),
    (["status", "--metrics", "{tmp}/outbox.prom"], 2, "stderr"),
    (["status", "--check"], 3, "stdout"),
    (["gaps"], 2, "stderr"),
    (["gaps", "--json"], 2, "stderr"),
    (["runs"], 2, "stderr"),
    (["runs", "--json", "--failed"], 2, "stderr"),
    (["show", "EIA.PJM.demand", "2025-08-22T14:00:00Z"], 2, "stderr"),
    (["requeue"], 2, "stderr"),
    (["prune"], 2, "stderr"),
    (["db", "current"], 2, "stderr"),
    (["report", "{tmp}/report.html"], 2, "stderr"),
    (["plot", "EIA.*"], 2, "stderr"),
    (["send"], 0, "stdout"),
    (["send", "--dry-run"], 0, "stdout"),
]
runner = CliRunner()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def env_for(db: Path, tmp: Path) -> dict[str, str]:
    return outbox_env(
        db,
        # Never the internet: a command that wrongly went on would hit a closed port.
        GRIDPULSE_BASE_URL="http://127.0.0.1:9",
        GRIDPULSE_API_KEY="missing-outbox-gp-key-0b5e",
        OUTBOX__METRICS_PATH=str(tmp / "run.prom"),
    )


def run_all(db: Path, tmp: Path) -> list[tuple[list[str], subprocess.CompletedProcess]]:
    """Every command of READERS on ``db``, as real processes started side by side."""
    env = env_for(db, tmp)
    procs = []
    for args, _, _ in READERS:
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        procs.append(
            (
                argv,
                subprocess.Popen(
                    [sys.executable, "-m", "outbox", *argv],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                ),
            )
        )
    done = []
    for argv, proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append((argv, subprocess.CompletedProcess(argv, proc.returncode, out, err)))
    return done


def invoke_all(db: Path, tmp: Path) -> list[tuple[list[str], subprocess.CompletedProcess]]:
    """The same in this process (CliRunner): quicker, and an escaped exception shows."""
    env = env_for(db, tmp)
    done = []
    for args, _, _ in READERS:
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        result = runner.invoke(app, argv, env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), argv
        done.append(
            (
                argv,
                subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr),
            )
        )
    return done


@pytest.mark.parametrize("where", ["file", "parent"])
def test_no_command_but_the_creating_ones_creates_an_outbox(tmp_path: Path, where: str) -> None:
    # A missing file, as real processes; a missing parent directory, in this process.
    db = tmp_path / "outbox.db" if where == "file" else tmp_path / "not-yet" / "outbox.db"
    (tmp_path / "keep.txt").write_text("the directory is not empty\n")
    before = listing(tmp_path)
    results = run_all(db, tmp_path) if where == "file" else invoke_all(db, tmp_path)
    for (argv, result), (_, code, stream) in zip(results, READERS, strict=True):
        shown = f"outbox {argv}: rc={result.returncode} {result.stdout!r} {result.stderr!r}"
        assert result.returncode == code, shown
        line = result.stdout if stream == "stdout" else result.stderr
        other = result.stderr if stream == "stdout" else result.stdout
        assert "Traceback" not in result.stdout + result.stderr, shown
        assert other == "", shown
        assert line.endswith("\n") and line.count("\n") == 1, shown
        assert str(db) in line, shown
        if argv[0] == "send":
            assert line == (
                f"nothing to send: no outbox at {db} yet (the first `outbox fetch` creates it)\n"
            ), shown
        elif argv[:2] == ["status", "--check"]:
            assert line == f"UNKNOWN - no outbox at {db} {CREATE_HINT}\n", shown
        else:
            assert line == f"error: no outbox at {db} {CREATE_HINT}\n", shown
    assert listing(tmp_path) == before


def test_the_creating_commands_create_it_and_the_readers_then_read_it(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    env = outbox_env(db, GRIDPULSE_BASE_URL="http://127.0.0.1:9")
    up = outbox("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    assert db.is_file()
    check = outbox("status", "--check", env=env)
    assert (check.returncode, check.stdout) == (0, "OK - 0 series, 0 pending, 0 dead\n")
    current = outbox("db", "current", env=env)
    assert current.returncode == 0 and "up to date" in current.stdout, current.stderr


EMPTY_FILE_READERS = [
    ["status"],
    ["runs"],
    ["gaps"],
    ["show", "EIA.PJM.demand", "2025-08-22T14:00:00Z"],
    ["plot", "EIA.*"],
    ["report", "{tmp}/report.html"],
]


@pytest.mark.parametrize("argv", EMPTY_FILE_READERS, ids=lambda a: a[0])
def test_a_file_that_is_not_an_outbox_is_read_by_no_command(
    tmp_path: Path, argv: list[str]
) -> None:
    db = tmp_path / "outbox.db"
    db.touch()  # an empty file where the outbox should be (the README's sqlite3 mistake)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = outbox(*args, env=outbox_env(db), timeout=120)
    assert done.returncode == 1, done.stderr  # as for any outbox that cannot be read
    assert done.stderr.splitlines() == [
        f"error: {db}: not an outbox (no schema): run `outbox db upgrade`"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert db.stat().st_size == 0  # not migrated into an outbox by a reading command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outbox.db"]
