"""Lock files beside the outbox, and why this process could not write it.

A stage holds an ``flock`` on its own lock file (``outbox.db.fetch.lock``,
``outbox.db.send.lock``, ``outbox.db.migrate.lock``) for as long as it runs; readers probe
the locks without taking or creating them (status, doctor, the run ledger).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from outbox.store.engine import disk_full_as_error, short_error


@contextmanager
def file_lock(path: str | os.PathLike[str], *, blocking: bool) -> Iterator[bool]:
    """An ``flock`` on ``path``: yields False when another process holds it (non-blocking).

    The kernel drops the lock when the process dies, so SIGKILL leaves no stale lock.
    """
    with disk_full_as_error(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        with disk_full_as_error(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def lock_file(database: str | os.PathLike[str], name: str) -> Path:
    """The lock file of one stage (``send``, ``fetch``) beside the database file."""
    path = Path(database)
    return path.with_name(f"{path.name}.{name}.lock")


def lock_held(path: str | os.PathLike[str]) -> bool:
    """Whether a process holds the lock file ``path`` now.

    Reads only: a missing file is a free lock and is not created, and the file is not
    written (a shared ``flock`` probe, released at once). A lock file this user cannot
    read counts as held: nobody is declared gone on a guess.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid holding the lock file ``path``, or None when nobody holds it or its pid
    cannot be read (reads only): to tell the two apart, ask :func:`lock_held`."""
    if not lock_held(path):
        return None
    return lock_pid(path)


def lock_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid written in the lock file ``path``, or None when it cannot be read (a file
    of mode 0600 owned by another user, none written yet). Says nothing of whether the
    lock is held: see :func:`lock_held`."""
    try:
        return int(Path(path).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


# Files a writing command opens for writing beside the database (SQLite's and the stages').
WRITTEN_COMPANIONS = ("-wal", "-shm", ".fetch.lock", ".send.lock", ".migrate.lock")


@dataclass(frozen=True)
class WriteProblem:
    """Why the outbox cannot be written by this process, and what would fix it."""

    cause: str
    hint: str

    def __str__(self) -> str:
        return f"{self.cause}: {self.hint}"


def write_problem(database: str | os.PathLike[str]) -> WriteProblem | None:
    """Why this process cannot write the outbox at ``database``, or None when it can.

    Checks the file, each companion that exists (``-wal``, ``-shm``, the lock files) and
    the directory (SQLite creates ``-wal``/``-shm`` there): ``PATH: not writable by USER
    (owned by OWNER, mode 0644)``, or ``on a read-only file system``. A missing file is
    no problem unless its directory cannot be written.
    """
    path = Path(database)
    directory = path.parent
    if _read_only_fs(directory):
        hint = "remount it read-write, or set `database` to a path on a writable one"
        return WriteProblem(f"{path}: read-only: on a read-only file system", hint)
    candidates = [path, *(Path(f"{path}{suffix}") for suffix in WRITTEN_COMPANIONS)]
    for candidate in candidates:
        if candidate.exists() and not _writable(candidate):
            return _not_writable(candidate)
    if directory.is_dir() and not _writable(directory):
        return _not_writable(directory, what="directory ")
    return None


def readonly_reason(database: str | os.PathLike[str], exc: BaseException) -> WriteProblem | None:
    """The cause of SQLite's "attempt to write a readonly database" (or of a denied
    open) as :func:`write_problem` names it; None when ``exc`` is another error."""
    text = short_error(exc)
    if "readonly database" not in text.lower() and "permission denied" not in text.lower():
        return None
    found = write_problem(database)
    if found is not None:
        return found
    hint = "check the ownership and mode of it, its -wal/-shm and its directory"
    return WriteProblem(f"{database}: read-only ({text})", hint)


def _writable(path: Path) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK, effective_ids=effective)


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _not_writable(path: Path, what: str = "") -> WriteProblem:
    user = _user_name(os.geteuid())
    try:
        info = path.stat()
    except OSError:
        return WriteProblem(f"{what}{path}: not writable by {user}", "run as its owner")
    owner = _user_name(info.st_uid)
    cause = (
        f"{what}{path}: not writable by {user} (owned by {owner}, mode {info.st_mode & 0o777:04o})"
    )
    return WriteProblem(cause, f"run as {owner}, or `chown {user} {path}`")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
