"""Reading the rows of the end-of-run quality passes in a process of their own.

:meth:`outbox.quality.engine.Checker.finish` judges what a large run staged in passes of
about ``quality.pass_rows`` rows; reading a pass's rows from SQLite is about half of its
CPU, and needs neither pandas nor the run's state. A reader process (a fresh interpreter
running :func:`main`: sqlite3 and numpy only, about 0.1 s to start) reads the passes
after the first, in order, while the run reads the first itself and then judges and
stores each: on two cores the reading costs the run little wall time.

A fresh interpreter, not a fork: a forked child inherits SQLite's per-process state of
the open database file and cannot open it again (``SQLITE_PROTOCOL``).

The run names the database in the reader's arguments (so ``ps`` shows which outbox it
reads), gives it no key or credential in its environment, and hands it the series, the
context hours and the scopes on its stdin (pickled); the reader writes each scope's
:class:`Rows` to its stdout in that order, each from one read-only snapshot; the pipe's
buffer bounds how far ahead it reads (one pass, a few MB). It runs in a session of its
own and ignores SIGINT (the run decides when to stop it, and kills its process group
when done), and ends when the run is gone (a write to a closed pipe fails). Whatever
goes wrong with it (it cannot start, it dies, it hands over something else or nothing
for :data:`READ_TIMEOUT_SECONDS`), the run reads the remaining passes itself: the reader
can make a run faster, never fail it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from outbox.quality.frame import Rows, Scope, SeriesInfo, read_rows

log = logging.getLogger(__name__)

# A small page cache and no memory-mapped I/O: the reader reads each series' range once,
# and pages it mapped would count in its memory (a million rows' pages: ~190 MB of PSS).
_PRAGMAS = (
    "PRAGMA query_only = ON",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA cache_size = -2048",
    "PRAGMA mmap_size = 0",
)


READ_TIMEOUT_SECONDS = 60.0
"""How long the run waits for one pass's rows (about 0.1 s each on a PC) before it
stops the reader and reads the rest itself: a stuck reader never holds a run up."""


# What the reader is started with: ``-P`` leaves the working directory off its path (a
# stray ``outbox/`` or ``numpy.py`` there must not shadow the real ones); the package
# comes from where this run imported it, added only if the interpreter lacks it.
_BOOT = (
    "import sys; r = sys.argv[1]; sys.path[:0] = [] if r in sys.path else [r]; "
    "from outbox.quality.reader import main; main()"
)
# Environment variables the reader is not given: it needs no key and no credential.
_SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET")
_SECRET_PREFIXES = ("OUTBOX", "EIA", "GRIDPULSE", "PG")


def _without_secrets(env: dict[str, str]) -> dict[str, str]:
    def secret(name: str) -> bool:
        name = name.upper()
        return (
            any(word in name for word in _SECRET_WORDS)
            or name.endswith("_FILE")
            or name.startswith(_SECRET_PREFIXES)
        )

    return {k: v for k, v in env.items() if not secret(k)}


class RowReader:
    """The run's side of a reader process: :meth:`next` is the next scope's rows."""

    def __init__(self, proc: subprocess.Popen[bytes], series: dict[str, SeriesInfo]) -> None:
        self._proc = proc
        self._series = series
        self._failed = False

    @classmethod
    def start(
        cls,
        path: str | os.PathLike[str],
        series: dict[str, SeriesInfo],
        context: tuple[int, int],
        scopes: list[Scope],
    ) -> RowReader | None:
        """A reader of ``scopes``' rows, started; None when there is nothing to read or
        it cannot start (the caller reads them itself)."""
        if not scopes or not sys.executable or getattr(sys, "frozen", False):
            return None  # an embedded or frozen interpreter cannot run ``-c``
        root = str(Path(__file__).resolve().parents[2])  # where the package is imported from
        env = _without_secrets(dict(os.environ))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _BOOT, root, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own group: a stop kills all it started
            )
        except (OSError, ValueError, TypeError) as exc:
            log.debug("quality: no reader process (%s); reading every pass here", exc)
            return None
        request = pickle.dumps(
            ({sid: tuple(info) for sid, info in series.items()}, context, scopes),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        # Written from a thread: a request larger than the pipe's buffer must not hold
        # the run up while the reader starts.
        threading.Thread(target=_hand, args=(proc.stdin, request), daemon=True).start()
        return cls(proc, series)

    def next(self) -> Rows | None:
        """The next scope's rows; None once the reader has failed (read them yourself)."""
        if self._failed:
            return None
        watchdog = threading.Timer(READ_TIMEOUT_SECONDS, self._kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            rows = pickle.load(self._proc.stdout)  # type: ignore[arg-type]
            _check(rows, self._series)
            return rows  # type: ignore[no-any-return]
        except Exception as exc:  # any failure of the reader: the run reads on itself
            self._failed = True
            log.debug("quality: the reader process failed (%s); reading the rest here", exc)
            self.close()
            return None
        finally:
            watchdog.cancel()

    def close(self) -> None:
        """Stop the reader (whatever it was doing, and whatever it started) and reap it."""
        self._kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):  # gone already
            os.killpg(self._proc.pid, signal.SIGKILL)


def _check(rows: object, series: dict[str, SeriesInfo]) -> None:
    """Raise unless ``rows`` is a well-formed :class:`Rows` of known series."""
    if not isinstance(rows, Rows):
        raise TypeError(f"the reader handed over {type(rows).__name__}")
    n = sum(rows.counts)
    if not (len(rows.sids) == len(rows.counts) and len(rows.hours) == len(rows.values) == n):
        raise ValueError("the reader handed over rows whose lengths disagree")
    if rows.hours.ndim != 1 or rows.values.ndim != 1 or not all(s in series for s in rows.sids):
        raise ValueError("the reader handed over rows of an unknown shape or series")


def _hand(pipe: IO[bytes] | None, data: bytes) -> None:
    if pipe is None:
        return
    try:
        pipe.write(data)
        pipe.close()
    except OSError:  # the reader is gone: next() finds out and reads here
        pass


def main() -> None:
    """The reader process: read each scope's rows and hand them over in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = sys.argv[2]
    series, context, scopes = pickle.load(sys.stdin.buffer)
    info = {sid: SeriesInfo(*fields) for sid, fields in series.items()}
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    connection = sqlite3.connect(uri, uri=True, isolation_level=None)
    for pragma in _PRAGMAS:
        connection.execute(pragma)
    out = sys.stdout.buffer
    try:
        for scope in scopes:
            cur = connection.cursor()
            cur.execute("BEGIN")
            rows = read_rows(cur, info, scope, context)
            cur.execute("ROLLBACK")
            pickle.dump(rows, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
    except BrokenPipeError:
        os._exit(0)  # the run is gone or has stopped reading: nothing to do
    connection.close()


if __name__ == "__main__":
    main()
