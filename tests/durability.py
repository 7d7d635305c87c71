"""Helpers shared by the durability suites: data, subprocesses, snapshots, invariants.

The suites (``test_crash_*``, ``test_torn_files``, ``test_outage``, ``test_poison``,
``test_concurrency``, ``test_model``, ``test_bad_input``, ``test_security``) prove the
lines of ``docs/guarantees.md``; this module holds what they share.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from outbox.sinks.gridpulse import IngestResult, Rejection, check_result
from outbox.testing.synth import ROUTES, make_rows, write_pages

KEY_GP = "dur-gridpulse-key-4f9c2e71d0"
KEY_EIA = "dur-eia-key-8b1d07a3c5e6"
BAS = ("PJM", "CISO", "MISO", "ERCO", "SWPP")
T0 = datetime(2025, 6, 1, tzinfo=UTC)
OBS_COLUMNS = (
    "series_id",
    "ts",
    "value",
    "units",
    "quality_flag",
    "revision",
    "state",
    "attempts",
)
REGION_TYPES = {"D": "demand", "DF": "demand_forecast", "NG": "net_generation", "TI": "interchange"}
Key = tuple[str, str]


# -- data ------------------------------------------------------------------------------


def route_rows(
    hours: int, *, start: datetime = T0, bas: Sequence[str] = BAS, seed: int = 0
) -> dict[str, list[dict]]:
    """Synthetic EIA rows of every route: about 99 rows an hour for the default five BAs."""
    return {route: make_rows(route, bas, start, hours, seed=seed) for route in ROUTES}


def write_replay(directory: Path, rows: dict[str, list[dict]], page_length: int = 500) -> Path:
    """The rows as saved EIA responses, one sub-directory per route, ``page_length`` a page."""
    for route, data in rows.items():
        write_pages(directory / route.rsplit("/", 1)[-1], route, data, page_length=page_length)
    return directory


# -- processes -------------------------------------------------------------------------


def outbox_env(
    db: Path,
    *,
    receiver: Any = None,
    eia_base: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Environment of an ``outbox`` subprocess: zero-wait retries, nothing pruned."""
    env = {
        **os.environ,
        "OUTBOX_DB": str(db),
        # Test data is older than the default retention: keep acknowledged rows to compare.
        "OUTBOX__HOUSEKEEPING__RETENTION_DAYS": "36500",
        "OUTBOX__GRIDPULSE__RETRY__ATTEMPTS": "2",
        "OUTBOX__GRIDPULSE__RETRY__INITIAL_BACKOFF_SECONDS": "0",
        "OUTBOX__GRIDPULSE__RETRY__MAX_BACKOFF_SECONDS": "0",
        "OUTBOX__EIA__RETRY__ATTEMPTS": "2",
        "OUTBOX__EIA__RETRY__INITIAL_BACKOFF_SECONDS": "0",
        "OUTBOX__EIA__RETRY__MAX_BACKOFF_SECONDS": "0",
    }
    if receiver is not None:
        env["GRIDPULSE_BASE_URL"] = receiver.base_url
        env["GRIDPULSE_API_KEY"] = receiver.api_key
    if eia_base is not None:
        env.update(
            {
                "EIA_BASE_URL": eia_base,
                "EIA_API_KEY": KEY_EIA,
                "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
                "OUTBOX__EIA__BACKFILL_CHUNK_HOURS": "100000",
            }
        )
    env.update(extra)
    return env


def outbox(
    *args: str, env: Mapping[str, str], timeout: float = 180, prelude: str = "", **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m outbox ARGS`` to completion, its output captured as text; ``env`` is
    the child's whole environment; ``kw`` go to :func:`subprocess.run` (``cwd``, ...).

    ``prelude``: Python the child runs first (a module hidden, a function replaced), then
    the command line's ``main`` as ``python -m outbox`` would."""
    start = (
        ["-c", f"{prelude}\nfrom outbox.cli import main\nmain()"] if prelude else ["-m", "outbox"]
    )
    return subprocess.run(
        [sys.executable, *start, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def spawn(*args: str, env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """Start ``python -m outbox ARGS``; output to ``log`` (stdout and stderr) or nowhere."""
    out: Any = subprocess.DEVNULL
    if log is not None:
        out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "outbox", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if log is not None:
            out.close()


@contextlib.contextmanager
def fake_eia_process(directory: Path, api_key: str = KEY_EIA, delay: float = 0.0) -> Iterator[str]:
    """``python -m outbox.testing.fake_eia`` serving ``directory`` (each answer ``delay``
    seconds late); yields its v2 base URL."""
    command = [sys.executable, "-m", "outbox.testing.fake_eia", "--port", "0"]
    command += ["--api-key", api_key, "--dir", str(directory), "--delay", str(delay)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("FakeEIA serving "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# A process holding a stage lock as a running fetch or send does (under the units'
# UMask=0077, so the file is mode 0600), or with nothing written in it: a pid not readable.
_HOLD_LOCK = """
import fcntl, os, sys
os.umask(0o077)
if sys.argv[2] == "pid":
    from outbox.store import file_lock
    held = file_lock(sys.argv[1], blocking=False)
    assert held.__enter__()
else:
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_by_child(lock: Path, *, write_pid: bool = True) -> Iterator[int]:
    """A child process holds the lock file ``lock`` (mode 0600) until the block ends;
    yields its pid. ``write_pid=False``: it locks the file without writing its pid."""
    command = [sys.executable, "-c", _HOLD_LOCK, str(lock), "pid" if write_pid else "none"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        yield proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- reading outboxes ------------------------------------------------------------------


@contextlib.contextmanager
def connect(db: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection (closed afterwards)."""
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
        yield con


def rows(db: Path, columns: Sequence[str] = OBS_COLUMNS) -> list[tuple]:
    """Every observation, the given columns (of the ``row_states`` view: the row with its
    delivery state), in key order."""
    with connect(db) as con:
        return con.execute(
            f"SELECT {', '.join(columns)} FROM row_states ORDER BY series_id, ts"
        ).fetchall()


def tables(db: Path, skip: Iterable[str] = ("runs",)) -> dict[str, list[tuple]]:
    """Every row of every table but ``skip`` (for byte-for-byte "unchanged" checks)."""
    with connect(db) as con:
        names = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if r[0] not in set(skip)
        ]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of the file (``ok`` when sound)."""
    with connect(db) as con:
        return "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))


def states(db: Path) -> dict[str, int]:
    """Rows per state."""
    with connect(db) as con:
        return dict(con.execute("SELECT state, count(*) FROM row_states GROUP BY state"))


def stream_of(route: str, facets: str) -> str:
    """The watermark stream (``dataset:respondent``) a series belongs to."""
    f = json.loads(facets)
    if "type" in f:
        return f"{REGION_TYPES[f['type']]}:{f['respondent']}"
    if "fueltype" in f:
        return f"generation:{f['respondent']}"
    return f"ba_interchange:{f['fromba']}"


def expected_streams(db: Path) -> dict[str, dict[Key, str]]:
    """stream -> {(series_id, ts): revision} of a complete outbox (the reference)."""
    out: dict[str, dict[Key, str]] = {}
    with connect(db) as con:
        for sid, ts, rev, route, facets in con.execute(
            "SELECT o.series_id, o.ts, o.revision, s.route, s.facets"
            " FROM observations o JOIN series s USING (series_id)"
        ):
            out.setdefault(stream_of(route, facets), {})[(sid, ts)] = rev
    return out


def watermark_violations(db: Path, expected: dict[str, dict[Key, str]]) -> list[str]:
    """Watermarks ahead of the rows they cover.

    A watermark ``(stream, last_ts)`` promises that every row of the stream up to
    ``last_ts`` is staged: each row the reference holds for that stream at or before
    ``last_ts`` must be in ``db`` with the same revision.
    """
    bad = []
    with connect(db) as con:
        found = con.execute("SELECT series_id, ts, revision FROM observations").fetchall()
        have = {(r[0], r[1]): r[2] for r in found}
        marks = con.execute("SELECT stream, last_ts FROM watermarks").fetchall()
    for stream, last_ts in marks:
        missing = [
            key
            for key, rev in expected.get(stream, {}).items()
            if key[1] <= last_ts and have.get(key) != rev
        ]
        if stream not in expected or missing:
            bad.append(f"{stream} at {last_ts}: {len(missing)} rows not staged, e.g. {missing[:2]}")
    return bad


# -- the receiver's side ---------------------------------------------------------------


def receiver_held(receiver_db: Path | str) -> dict[Key, str]:
    """(series_id, ts) -> revision the receiver stores (read from its file, for speed, or
    from its PostgreSQL database when ``receiver_db`` is a URL)."""
    if "://" in str(receiver_db):
        return _postgres_held(str(receiver_db))
    assert isinstance(receiver_db, Path)
    if not receiver_db.exists():
        return {}
    with connect(receiver_db) as con:
        try:
            found = con.execute(
                "SELECT s.eia_series_id, o.ts, o.revision FROM observations o"
                " JOIN series s ON s.id = o.series_id"
            ).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return {}
    return {(r[0], r[1]): r[2] for r in found}


def _postgres_held(url: str) -> dict[Key, str]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as con:
        try:
            found = con.execute(
                "SELECT s.eia_series_id, to_char(o.ts AT TIME ZONE 'UTC',"
                ' \'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), o.revision FROM observations o'
                " JOIN series s ON s.id = o.series_id"
            ).fetchall()
        except psycopg.errors.UndefinedTable:  # not created yet
            return {}
    return {(r[0], r[1]): r[2] for r in found}


def acked_not_held(db: Path, held: dict[Key, str]) -> list[tuple]:
    """Rows the outbox takes as acked (no queue entry left) that the receiver does not hold
    at their current revision (a revision staged after an ack re-queues the row)."""
    with connect(db) as con:
        acked = con.execute(
            "SELECT series_id, ts, revision FROM row_states WHERE state = 'acked'"
        ).fetchall()
    return [r for r in acked if held.get((r[0], r[1])) != r[2]]


def latest_staged(db: Path) -> dict[Key, str]:
    """(series_id, ts) -> the revision staged now (the latest EIA revision)."""
    with connect(db) as con:
        return {
            (r[0], r[1]): r[2]
            for r in con.execute("SELECT series_id, ts, revision FROM observations")
        }


class RecordingClient:
    """An in-process stand-in for :class:`~outbox.sinks.gridpulse.GridPulseClient`
    (wrap it in a ``GridPulseSink``).

    Accepts every batch (``reject`` keys are refused per row), remembers what it holds
    and the ``ts`` of every batch in arrival order.
    """

    def __init__(self, reject: Iterable[Key] = ()) -> None:
        self.held: dict[Key, str] = {}
        self.batches: list[list[str]] = []
        self.reject = set(reject)

    def pack(self, body: bytes) -> bytes:
        """Sent as it is."""
        return body

    def post_batch(
        self, batch_id: str, body: bytes, *, packed: bytes | None = None, keys: Any = None
    ) -> IngestResult:
        """Store the batch; answer like GridPulse (an answer that passes check_result)."""
        observations = orjson.loads(body)["observations"]
        self.batches.append([o["ts"] for o in observations])
        refused = []
        for i, o in enumerate(observations):
            key = (o["series_id"], o["ts"])
            if key in self.reject:
                refused.append(Rejection(i, key[0], key[1], "REJECTED", "refused by the test"))
            else:
                self.held[key] = o["revision"]
        result = IngestResult(batch_id, len(observations) - len(refused), tuple(refused))
        if keys is not None:
            check_result(result, batch_id, keys)
        return result

    def health(self) -> bool:
        """Always up."""
        return True


def await_run(db: Path, proc: subprocess.Popen, stage: str = "fetch") -> float:
    """Wait until ``proc`` has recorded its run (imports and migrations done); when."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists() and run_recorded(db, proc.pid, stage):
            return time.monotonic()
        time.sleep(0.01)
    return time.monotonic()


def work_seconds(*args: str, env: dict[str, str], db: Path, stage: str = "fetch") -> float:
    """Run ``python -m outbox ARGS`` on ``db`` to success; the seconds of its own work,
    from recording its run (imports and migrations done) to its exit. Kill tests draw
    their kill times from it, so that they land mid-run however fast the machine is."""
    proc = spawn(*args, env=env)
    started = await_run(db, proc, stage)
    code = proc.wait(120)
    assert code == 0, f"outbox {' '.join(args)} exited {code}"
    return time.monotonic() - started


def run_recorded(db: Path, pid: int, stage: str) -> bool:
    """Whether process ``pid`` has a row in ``runs`` (read-only: never creates the file)."""
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return False
    try:
        return (
            con.execute("SELECT 1 FROM runs WHERE pid = ? AND stage = ?", (pid, stage)).fetchone()
            is not None
        )
    except sqlite3.Error:
        return False
    finally:
        con.close()


def processes_naming(marker: str, wait: float = 10.0) -> list[str]:
    """Command lines of live processes that name ``marker`` (a path of the test's own),
    after waiting up to ``wait`` seconds for them to go: a killed run must leave none
    behind (its read-ahead process exits once its parent is gone)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if marker in cmdline and state != "Z":
                found.append(f"{proc.name}: {cmdline.strip()}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
