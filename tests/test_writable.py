"""An outbox this user cannot write: one line naming the file, exit 1, nothing changed.

The README warns that a root-owned file locks the service out. These tests make that
real: an outbox owned by root (mode 0644) in a root-owned directory, and the CLI run as
a second uid (nobody, 65534) in a subprocess. Where the interpreter lives somewhere that
uid cannot reach (a home directory of mode 0700), the process keeps only
CAP_DAC_READ_SEARCH: it may read and traverse everything, and write only what is its own,
which is the permission question under test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from durability import lock_held_by_child, outbox, outbox_env, tables

from outbox.config import Config
from outbox.doctor import check_locks
from outbox.sample import sample_dir
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store, readonly_reason, write_problem

NOBODY = 65534
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens, nothing is reached

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the tests run the CLI as a second uid"
)


@cache
def _plain_uid_can_run_python() -> bool:
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import outbox"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=60,
        )
    except PermissionError:
        return False
    return done.returncode == 0


def as_nobody(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m outbox ARGS`` as uid/gid 65534 (see the module docstring)."""
    command = [sys.executable, "-m", "outbox", *args]
    if _plain_uid_can_run_python():
        return subprocess.run(
            command,
            env=env,
            cwd=cwd,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=120,
        )
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("uid 65534 cannot run this interpreter and setpriv is not installed")
    keep_read = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run(
        [setpriv, *ids, *keep_read, *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_as_root(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return outbox(*args, env=env, cwd=cwd, timeout=120)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory owned by root, mode 0755, that uid 65534 can enter (unlike tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="outbox-writable-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def seed(db: Path) -> None:
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(sample_dir()))
    db.chmod(0o644)


def fingerprint(db: Path) -> tuple[str, int, list[str]]:
    """The file's bytes, its mtime and the names beside it: all a refused command must keep."""
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    return digest, db.stat().st_mtime_ns, sorted(p.name for p in db.parent.iterdir())


def own_everything(directory: Path, uid: int) -> None:
    """Give ``directory`` and every file in it to ``uid``: the outbox is that user's."""
    for path in (directory, *directory.iterdir()):
        os.chown(path, uid, uid)


def env_for(db: Path) -> dict[str, str]:
    return outbox_env(
        db, GRIDPULSE_BASE_URL=UNREACHABLE, GRIDPULSE_API_KEY="gp-test-key", EIA_API_KEY="e"
    )


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done.stderr.splitlines()


@pytest.mark.parametrize("command", [["fetch", "--replay", str(sample_dir())], ["send"]])
def test_fetch_and_send_refuse_a_file_another_user_owns(command: list[str], workdir: Path) -> None:
    db = workdir / "outbox.db"
    seed(db)
    before, rows = fingerprint(db), tables(db, skip=())
    done = as_nobody(*command, env=env_for(db), cwd=workdir)
    assert done.returncode == 1, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1, lines
    assert f"{db}: not writable by nobody (owned by root, mode 0644)" in lines[0]
    assert fingerprint(db) == before and tables(db, skip=()) == rows


@pytest.mark.parametrize("companion", ["-wal", ".fetch.lock"])
def test_a_companion_file_left_by_root_is_named(companion: str, workdir: Path) -> None:
    """The README's case: root ran a command, and its -wal or lock file stays root's."""
    db = workdir / "outbox.db"
    seed(db)
    own_everything(workdir, NOBODY)
    rows = tables(db, skip=())
    with contextlib.closing(sqlite3.connect(db)) as con:
        # An open connection keeps the -wal beside the file. SQLite running as root hands
        # a new -wal to the database's owner; one copied in or left by other tools is not.
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE IF NOT EXISTS probe (x)")
        Path(f"{db}{companion}").touch()
        os.chown(f"{db}{companion}", 0, 0)
        assert Path(f"{db}-wal").exists()
        done = as_nobody("fetch", "--replay", str(sample_dir()), env=env_for(db), cwd=workdir)
    assert done.returncode == 1, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1, lines
    first = "-wal" if companion == "-wal" else ".fetch.lock"
    assert f"{db}{first}: not writable by nobody (owned by root" in lines[0], lines
    assert tables(db, skip=("probe",)) == rows


def test_doctor_fails_on_an_unwritable_file_and_never_offers_reset(workdir: Path) -> None:
    db = workdir / "outbox.db"
    seed(db)
    before = fingerprint(db)
    for args in (["doctor"], ["doctor", "--reset"]):
        done = as_nobody(*args, env=env_for(db), cwd=workdir)
        assert done.returncode == 1
        out = done.stdout.splitlines()
        assert "Traceback" not in done.stdout + done.stderr, done.stderr
        database = next(line for line in out if line.split()[1] == "database")
        assert database.startswith("FAIL"), database
        assert f"{db}: not writable by nobody (owned by root, mode 0644)" in database
        assert f"hint: run as root, or `chown nobody {db}`" in database
        assert "--reset" not in done.stdout, "a sound file it cannot write is not broken"
        assert fingerprint(db) == before, "doctor must leave the file where it is"


def test_doctor_names_a_directory_it_cannot_write(workdir: Path) -> None:
    """SQLite creates -wal/-shm beside the file: the directory must be writable too."""
    db = workdir / "outbox.db"
    seed(db)
    own_everything(workdir, NOBODY)
    os.chown(workdir, 0, 0)
    done = as_nobody("doctor", env=env_for(db), cwd=workdir)
    database = next(line for line in done.stdout.splitlines() if line.split()[1] == "database")
    assert database.startswith("FAIL")
    assert f"directory {workdir}: not writable by nobody (owned by root, mode 0755)" in database
    assert "--reset" not in done.stdout


def check_locks_as_nobody(db: Path) -> str:
    """``check_locks`` in a forked process that became uid 65534 with no capabilities
    (setuid from root drops them all), as an operator's own account runs doctor: its
    line."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, check_locks(db).line().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as out:
        line = out.read().decode()
    os.waitpid(pid, 0)
    return line


def test_a_lock_another_user_holds_is_held_never_idle(workdir: Path) -> None:
    """A fetch running as the service user holds its lock file, mode 0600 (UMask=0077):
    doctor as another user cannot read the pid, and says so instead of "idle"."""
    db = workdir / "outbox.db"
    seed(db)
    lock = workdir / "outbox.db.fetch.lock"
    lock.unlink()  # seeding left one of mode 0644: the service creates it under its umask
    unknown = (
        "OK    locks     fetch held (pid unknown), send idle; hint: outbox.db.fetch.lock not "
        "readable by this user, so counted as held: run doctor as the services' user (or "
        "root) to see whether a stage runs"
    )
    with lock_held_by_child(lock) as holder:
        assert lock.stat().st_mode & 0o777 == 0o600
        assert check_locks_as_nobody(db) == unknown
        running = f"OK    locks     fetch running (pid {holder}), send idle"
        assert check_locks(db).line() == running  # root reads the pid
        done = as_nobody("doctor", env=env_for(db), cwd=workdir)
    shown = next(line for line in done.stdout.splitlines() if line.split()[1] == "locks")
    # The setpriv fallback keeps CAP_DAC_READ_SEARCH: that process can read the pid.
    assert shown == (unknown if _plain_uid_can_run_python() else running), done.stdout
    # Released, the file still cannot be read: held as far as that user can tell.
    assert check_locks_as_nobody(db) == unknown
    assert check_locks(db).line() == "OK    locks     fetch idle, send idle"


def test_root_still_writes_a_file_another_user_owns(workdir: Path) -> None:
    db = workdir / "outbox.db"
    seed(db)
    os.chown(db, NOBODY, NOBODY)
    assert write_problem(db) is None
    done = run_as_root("fetch", "--replay", str(sample_dir()), env=env_for(db), cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "fetch run 2:" in done.stdout
    doctor = run_as_root("doctor", env=env_for(db), cwd=workdir)
    assert any(line.startswith("OK    database") for line in doctor.stdout.splitlines())


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs holding a seeded outbox, remounted read-only."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"this machine refuses `mount -t tmpfs`: {made.stderr.decode().strip()}")
    try:
        seed(mnt / "outbox.db")
        ro = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"this machine refuses `mount -o remount,ro`: {ro.stderr.decode()}")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_database_on_a_read_only_mount_is_reported_read_only(
    read_only_mount: Path, tmp_path: Path
) -> None:
    db = read_only_mount / "outbox.db"
    before = fingerprint(db)
    for command in (["fetch", "--replay", str(sample_dir())], ["send"]):
        done = run_as_root(*command, env=env_for(db), cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        lines = error_lines(done)
        assert len(lines) == 1 and f"{db}: read-only: on a read-only file system" in lines[0]
    doctor = run_as_root("doctor", "--reset", env=env_for(db), cwd=tmp_path)
    database = next(line for line in doctor.stdout.splitlines() if line.split()[1] == "database")
    assert database.startswith("FAIL") and "read-only file system" in database
    assert "--reset" not in doctor.stdout and "Traceback" not in doctor.stderr
    assert fingerprint(db) == before


def test_sqlites_readonly_error_is_classified(tmp_path: Path) -> None:
    """The mapping itself, on SQLite's real error from a file opened ``mode=ro``."""
    db = tmp_path / "outbox.db"
    seed(db)
    uri = f"{db.as_uri()}?mode=ro"
    with (
        contextlib.closing(sqlite3.connect(uri, uri=True)) as con,
        pytest.raises(sqlite3.OperationalError) as caught,
    ):
        con.execute("DELETE FROM observations")
    assert "attempt to write a readonly database" in str(caught.value)
    found = readonly_reason(db, caught.value)
    assert found is not None and found.cause.startswith(f"{db}: read-only (attempt to write")
    assert readonly_reason(db, sqlite3.DatabaseError("file is not a database")) is None


def test_reading_commands_name_the_missing_write_access(workdir: Path) -> None:
    """status, its probe and runs read a WAL file: SQLite needs its -shm writable."""
    db = workdir / "outbox.db"
    seed(db)
    before = fingerprint(db)
    cause = f"{db}: not writable by nobody (owned by root, mode 0644)"
    for args, code in ((["status"], 1), (["runs"], 1), (["status", "--check"], 3)):
        done = as_nobody(*args, env=env_for(db), cwd=workdir)
        assert done.returncode == code, done.stderr
        lines = (done.stdout if code == 3 else done.stderr).splitlines()
        assert "Traceback" not in done.stdout + done.stderr
        assert len(lines) == 1 and cause in lines[0], lines
        assert "not a usable outbox database" not in lines[0]
    assert fingerprint(db) == before


def test_doctor_reads_a_sound_file_it_cannot_write_and_still_fails(workdir: Path) -> None:
    """In a directory of its own the user can read root's file (SQLite makes the -shm):
    the file is sound, and the FAIL says so along with who owns it."""
    db = workdir / "outbox.db"
    seed(db)
    own_everything(workdir, NOBODY)
    os.chown(db, 0, 0)
    done = as_nobody("doctor", "--reset", env=env_for(db), cwd=workdir)
    lines = done.stdout.splitlines()
    database = next(line for line in lines if line.split()[1] == "database")
    assert database.startswith(f"FAIL  database  {db}: quick_check ok (")
    assert f"but {db}: not writable by nobody (owned by root, mode 0644)" in database
    assert any(line.startswith("OK    schema") for line in lines), lines
    assert "--reset" not in done.stdout and not list(workdir.glob("*.broken-*"))
