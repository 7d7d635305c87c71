"""CLI: help lists every command, `db upgrade` builds the outbox that status then reads."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from durability import outbox, outbox_env
from typer.testing import CliRunner

from outbox.cli import app
from outbox.sample import sample_dir
from outbox.store import Store

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_stages() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("fetch", "send", "status", "requeue", "show", "runs", "db", "receiver"):
        assert name in result.output


def test_db_upgrade_creates_the_outbox_status_reads(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        (ROOT / "config.yaml")
        .read_text()
        .replace("database: outbox.db", "database: " + str(tmp_path / "fresh.db"))
    )
    up = runner.invoke(app, ["-c", str(cfg), "db", "upgrade"])
    assert up.exit_code == 0, up.output
    result = runner.invoke(app, ["-c", str(cfg), "status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema_version"] == 1
    assert data["totals"] == {"series": 0, "pending": 0, "dead": 0, "acks_unapplied": 0}
    assert data["groups"] == [] and data["outbox_schema"] == "0009"
    con = sqlite3.connect(tmp_path / "fresh.db")
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert {
        "observations",
        "pages",
        "series",
        "watermarks",
        "runs",
        "pending",
        "dead",
        "series_status",
    } <= names
    table = runner.invoke(app, ["-c", str(cfg), "status"])
    assert table.exit_code == 0 and "totals: 0 series in 0 rows, 0 pending, 0 dead" in table.output


def test_db_commands(tmp_path: Path) -> None:
    env = {"OUTBOX_DB": str(tmp_path / "o.db")}
    missing = runner.invoke(app, ["db", "current"], env=env)
    assert missing.exit_code == 2 and f"no outbox at {tmp_path / 'o.db'}" in missing.output
    up = runner.invoke(app, ["db", "upgrade"], env=env)
    assert up.exit_code == 0 and "schema at 0009" in up.output
    cur = runner.invoke(app, ["db", "current"], env=env)
    assert cur.output.strip() == "0009 (head 0009, up to date)"


def test_console_script_and_sqlite3_view(tmp_path: Path) -> None:
    exe = shutil.which("outbox")
    assert exe, "the console script is installed"
    env = {"OUTBOX_DB": str(tmp_path / "o.db"), "PATH": str(Path(exe).parent)}
    done = subprocess.run([exe, "status", "--check"], env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith(f"UNKNOWN - no outbox at {tmp_path / 'o.db'}")
    up = subprocess.run([exe, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    done = subprocess.run([exe, "status", "--check"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK - 0 series")


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    env = {"OUTBOX_DB": str(tmp_path / "o.db")}
    result = runner.invoke(app, ["fetch", "--start", "yesterday"], env=env)
    assert result.exit_code == 2 and "not a date or RFC 3339 time" in result.output
    result = runner.invoke(app, ["fetch", "--start", "2025-02-01", "--end", "2025-01-01"], env=env)
    assert result.exit_code == 2 and "is before --start" in result.output
    result = runner.invoke(app, ["runs", "--stage", "nope"], env=env)
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["requeue", "--since", "2025-08-21"], "requeued 0 dead rows"),
        (["gaps", "--since", "2025-08-21T00:00:00Z"], "no missing hours"),
        (["revisions", "--since", "2025-08-21"], "0 revisions of 0 rows"),
        (["quality", "--since", "2025-08-21"], "0 findings, 0 open"),
    ],
)
def test_since_is_taken_by_every_command_that_has_it(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    db = tmp_path / "outbox.db"
    Store.open(db).close()
    result = runner.invoke(app, argv, env={"OUTBOX_DB": str(db)})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.output
    assert expected in result.output


def _internal_error(tmp_path: Path, raised: str, *options: str) -> subprocess.CompletedProcess:
    """``outbox [OPTIONS] fetch --replay`` with the command's body raising ``raised`` (a bug)."""
    replaced = (
        "import outbox.cli.stages as stages\n"
        "def boom(*a, **k):\n"
        f"    raise {raised}\n"
        "stages.run_fetch_command = boom"
    )
    args = [*options, "fetch", "--replay", str(sample_dir())]
    env = outbox_env(tmp_path / "outbox.db")
    return outbox(*args, env=env, timeout=60, prelude=replaced, cwd=tmp_path)


@pytest.mark.parametrize(
    ("raised", "said"),
    [("TypeError()", "TypeError"), ("ValueError('x' * 1000)", "ValueError: " + "x" * 300 + "...")],
    ids=["no-message", "long-message"],
)
def test_an_internal_error_line_stays_short(tmp_path: Path, raised: str, said: str) -> None:
    done = _internal_error(tmp_path, raised)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: internal error: {said} (a bug; -v logs where)"]


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_an_internal_error_is_one_line_and_exit_1(tmp_path: Path, verbose: bool) -> None:
    """A bug (an exception no error type maps) still ends in one line; -v logs where."""
    raised = r"TypeError('an unexpected None\nin two lines')"
    done = _internal_error(tmp_path, raised, *(["-v"] if verbose else []))
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "error: internal error: TypeError: an unexpected None in two lines (a bug; -v logs where)"
    )
    assert "Traceback" not in done.stderr
    if verbose:  # one log line naming the frame that raised, then the way to it
        (where,) = [line for line in done.stderr.splitlines() if 'msg="internal error"' in line]
        assert 'where="<string>:3 boom < stages.py:' in where, where
    else:
        assert done.stderr.strip().splitlines() == [last]


def test_an_internal_error_line_keeps_secrets_out(tmp_path: Path) -> None:
    """A bug's message may hold a URL with EIA's key or a GridPulse token: redacted."""
    raised = (
        "RuntimeError('GET https://api.eia.gov/v2/electricity?api_key=eia-s3cret&x=1"
        " with Authorization: Bearer gp-t0ken failed')"
    )
    done = _internal_error(tmp_path, raised, "-v")
    assert done.returncode == 1
    assert "eia-s3cret" not in done.stderr + done.stdout
    assert "gp-t0ken" not in done.stderr + done.stdout
    assert "api_key=***" in done.stderr.splitlines()[-1]


# -- leaving the process ------------------------------------------------------------------
# The command line exits without the interpreter's teardown (0.4-0.5 s after a stage of a
# million rows): exit handlers still run, output is flushed, a worker thread is waited for.

_EXIT_PRELUDE = """
import atexit, os, pathlib, sys, threading, time
marks = pathlib.Path({marks!r})
real_exit, command_pid = os._exit, os.getpid()
def fast_exit(code):  # told when the command's process leaves without the teardown
    if os.getpid() == command_pid:  # (a forked read-ahead process leaves this way too)
        (marks / "fast-exit").write_text(str(code))
    real_exit(code)
os._exit = fast_exit
def handler():
    (marks / "exit-handler").write_text("ran")
    if {full!r}:  # output redirected to a full disk
        sys.stdout = open("/dev/full", "w")
    sys.stdout.write("bye")  # a last write, buffered: lost if the exit did not flush
atexit.register(handler)
if {worker!r}:  # a thread still working when the command is done
    import outbox.cli
    def work():
        time.sleep(0.5)
        (marks / "worker").write_text("done")
    command = outbox.cli._main
    def with_worker():
        threading.Thread(target=work).start()
        command()
    outbox.cli._main = with_worker
"""


def _exiting(
    tmp_path: Path, *args: str, worker: bool = False, full: bool = False
) -> subprocess.CompletedProcess:
    env = outbox_env(tmp_path / "outbox.db")
    env.pop("PYTHONUNBUFFERED", None)  # it would write through: the flush would go untested
    prelude = _EXIT_PRELUDE.format(marks=str(tmp_path), worker=worker, full=full)
    return outbox(*args, env=env, timeout=60, prelude=prelude, cwd=tmp_path)


def test_the_exit_runs_handlers_and_flushes_without_the_teardown(tmp_path: Path) -> None:
    done = _exiting(tmp_path, "fetch", "--replay", str(sample_dir()))
    assert done.returncode == 0, done.stderr
    *_, last, after = done.stdout.splitlines()
    assert last.startswith("quality:")  # the command's last line...
    assert after == "bye"  # ...and what an exit handler wrote after it, unflushed
    assert (tmp_path / "exit-handler").read_text() == "ran"
    assert (tmp_path / "fast-exit").read_text() == "0"  # no teardown
    # The outbox was closed before: every row is in the file itself, no WAL left behind.
    assert not (tmp_path / "outbox.db-wal").exists()
    con = sqlite3.connect(tmp_path / "outbox.db")
    assert con.execute("SELECT count(*) FROM observations").fetchone()[0] > 0
    con.close()


def test_the_exit_keeps_its_code(tmp_path: Path) -> None:
    done = _exiting(tmp_path, "fetch", "--start", "not-a-date")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert (tmp_path / "exit-handler").read_text() == "ran"
    assert (tmp_path / "fast-exit").read_text() == "2"


def test_the_exit_waits_for_a_thread_that_is_not_a_daemon(tmp_path: Path) -> None:
    """Someone's work still running: the normal exit, which waits for it, tears down."""
    done = _exiting(tmp_path, "--version", worker=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "worker").read_text() == "done"
    assert (tmp_path / "exit-handler").read_text() == "ran"
    assert done.stdout.endswith("bye")
    assert not (tmp_path / "fast-exit").exists()


def test_the_exit_says_when_the_last_output_could_not_be_written(tmp_path: Path) -> None:
    """A flush that fails (a full disk) turns a 0 into 120, as CPython's own exit does."""
    done = _exiting(tmp_path, "db", "upgrade", full=True)
    assert done.returncode == 120, done.stderr
    assert (tmp_path / "fast-exit").read_text() == "120"


@pytest.mark.parametrize("command", [["db", "upgrade"], ["status", "--json"]])
def test_output_to_a_full_disk_is_one_line_naming_it_not_a_bug(
    tmp_path: Path, command: list[str]
) -> None:
    """``outbox ... > file`` on a full file system: the line says the output could not be
    written and why, exit 1 (a failed run), not "internal error ... (a bug)"."""
    db = tmp_path / "outbox.db"
    Store.open(db).close()
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "outbox", *command],
            env=outbox_env(db),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr == "error: cannot write the output: No space left on device\n"


def test_a_full_disk_under_a_file_the_command_writes_is_not_called_the_output() -> None:
    """A buffered write names no file (``Path.write_text`` on a full disk): while the
    output itself still flushes, the line says a file, not the output."""
    import errno

    from outbox.cli import _unwritable

    full = OSError(errno.ENOSPC, "No space left on device")
    assert _unwritable(full) == "cannot write a file: No space left on device"
    named = OSError(errno.EDQUOT, "Disk quota exceeded", "/srv/units/outbox-fetch.timer")
    assert _unwritable(named) == ("cannot write /srv/units/outbox-fetch.timer: Disk quota exceeded")
    assert _unwritable(OSError(errno.EACCES, "Permission denied")) is None
    assert _unwritable(ValueError("no")) is None


def test_the_exit_leaves_a_profiler_its_output(tmp_path: Path) -> None:
    """``python -m cProfile -o FILE -m outbox ...`` writes FILE after ``main`` returns:
    under a profiler (or coverage, a tracer) the exit is the normal one."""
    env = outbox_env(tmp_path / "outbox.db")
    profile = tmp_path / "run.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "outbox", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "schema at" in done.stdout
    assert profile.stat().st_size > 0
