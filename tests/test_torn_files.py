"""Torn files: copies of ``outbox.db`` + ``-wal`` taken at random moments of concurrent
fetch and send processes, as a crash or power loss would leave them.

Each snapshot freezes every running worker (SIGSTOP, waits until stopped), copies the
database, its WAL and shared-memory index, and resumes them: the files as they stood at
one instant. A second copy of each snapshot has its WAL cut at a random offset after the
last frame a checkpoint may already have copied into the database (frames a checkpoint
has started on were synced before it began, so a power loss cannot take them back; any
later byte may be lost). Every copy must open, pass ``integrity_check``, and converge to
the full set with one fetch and one send.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import sqlite3
import struct
import threading
import time
from pathlib import Path

from durability import (
    KEY_GP,
    OBS_COLUMNS,
    RecordingClient,
    connect,
    integrity,
    outbox,
    outbox_env,
    receiver_held,
    route_rows,
    rows,
    spawn,
    states,
    write_replay,
)

from outbox.config import Config
from outbox.sample.receiver import running_receiver
from outbox.sinks.gridpulse import GridPulseSink
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.stages.send import run_send
from outbox.store import Store
from outbox.store.deliver import decode_acks

HOURS = 48
CHUNKS = {"ci": 3, "soak": 12}
SNAPSHOTS = {"ci": 4, "soak": 60}
TORN = {"ci": 2, "soak": 10}
WAL_HEADER = 32
FRAME_HEADER = 24
SHM_BACKFILL = 96
SHM_BACKFILL_ATTEMPTED = 128
SUFFIXES = ("", "-wal", "-shm")


def write_chunks(root: Path, chunks: int) -> list[Path]:
    """The 48 hours as ``chunks`` replay directories, oldest first (hourly fetches)."""
    data = route_rows(HOURS)
    out = []
    per = HOURS // chunks
    for i in range(chunks):
        lo, hi = i * per, (i + 1) * per
        part = {
            route: [r for r in rows_ if _hour(r["period"]) in range(lo, hi)]
            for route, rows_ in data.items()
        }
        out.append(write_replay(root / f"chunk{i:02d}", part))
    return out


def _hour(period: str) -> int:
    day, hour = int(period[8:10]), int(period[11:13])
    return (day - 1) * 24 + hour


class Workers:
    """Runs fetch and send concurrently, chunk after chunk, in a background thread."""

    def __init__(self, db: Path, chunks: list[Path], env: dict[str, str]) -> None:
        self.db, self.chunks, self.env = db, chunks, env
        self.running: list = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.failures: list[str] = []

    def _run(self) -> None:
        for chunk in self.chunks:
            procs = [
                spawn("fetch", "--replay", str(chunk), env=self.env),
                spawn("send", env=self.env),
            ]
            with self.lock:
                self.running = procs
            codes = [p.wait(120) for p in procs]
            with self.lock:
                self.running = []
            if any(codes):
                self.failures.append(f"{chunk.name}: exit codes {codes}")

    def snapshot(self, target: Path) -> bool:
        """Freeze the workers, copy the three files, resume; False if nothing ran."""
        with self.lock:
            procs = [p for p in self.running if p.poll() is None]
            if not procs or not self.db.exists():
                return False
            stopped = [p for p in procs if _signal(p, signal.SIGSTOP)]
            try:
                for p in stopped:
                    _await_stopped(p.pid)
                target.mkdir(parents=True)
                for suffix in SUFFIXES:
                    source = Path(f"{self.db}{suffix}")
                    if source.exists():
                        shutil.copyfile(source, target / f"outbox.db{suffix}")
            finally:
                for p in stopped:
                    _signal(p, signal.SIGCONT)
        return True


def _signal(proc, sig: int) -> bool:
    try:
        proc.send_signal(sig)
        return True
    except ProcessLookupError:
        return False


def _await_stopped(pid: int) -> None:
    """Until the kernel reports the process stopped (or gone): no write is in flight."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


class Reservoirs:
    """Two uniform samples (reservoir sampling) of the snapshots offered: of all of them,
    and of those with a WAL to cut. A directory is removed once neither sample holds it."""

    def __init__(self, rng: random.Random, every: int, torn: int) -> None:
        self.rng = rng
        self.every: list[Path] = []
        self.torn: list[Path] = []
        self.sizes = {"every": every, "torn": torn}
        self.seen = {"every": 0, "torn": 0}
        self.taken = 0

    def offer(self, snapshot: Path, torn: bool) -> None:
        self.taken += 1
        evicted = [self._offer("every", self.every, snapshot)]
        if torn:
            evicted.append(self._offer("torn", self.torn, snapshot))
        for path in set(evicted):
            if path is not None and path not in self.every and path not in self.torn:
                shutil.rmtree(path)

    def _offer(self, name: str, sample: list[Path], item: Path) -> Path | None:
        """Offer ``item``; returns what left the sample (or ``item`` if it was not kept)."""
        self.seen[name] += 1
        if len(sample) < self.sizes[name]:
            sample.append(item)
            return None
        slot = self.rng.randrange(self.seen[name])
        if slot >= self.sizes[name]:
            return item
        sample[slot], evicted = item, sample[slot]
        return evicted

    def paths(self) -> list[Path]:
        """Every snapshot kept, once, in the order taken."""
        return sorted(set(self.every) | set(self.torn))


def _unsynced_wal(snapshot: Path) -> tuple[bytes, int] | None:
    """The WAL and the offset from which a power loss may lose it, if anything is past it."""
    wal = snapshot / "outbox.db-wal"
    if not wal.exists() or wal.stat().st_size <= WAL_HEADER:
        return None
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0] or 65536
    safe = WAL_HEADER + _backfilled(snapshot / "outbox.db-shm") * (FRAME_HEADER + page_size)
    return None if safe >= len(data) else (data, safe)


def truncate_wal(snapshot: Path, target: Path, rng: random.Random) -> int | None:
    """A copy of ``snapshot`` whose WAL loses a random tail; the offset, or None."""
    unsynced = _unsynced_wal(snapshot)
    if unsynced is None:
        return None
    data, safe = unsynced
    cut = rng.randint(safe, len(data) - 1)
    target.mkdir(parents=True)
    shutil.copyfile(snapshot / "outbox.db", target / "outbox.db")
    (target / "outbox.db-wal").write_bytes(data[:cut])
    return cut


def _backfilled(shm: Path) -> int:
    """Frames a checkpoint copied, or began copying, into the database (the WAL index)."""
    if not shm.exists() or shm.stat().st_size < SHM_BACKFILL_ATTEMPTED + 4:
        return 0
    raw = shm.read_bytes()
    done = struct.unpack("=I", raw[SHM_BACKFILL : SHM_BACKFILL + 4])[0]
    tried = struct.unpack("=I", raw[SHM_BACKFILL_ATTEMPTED : SHM_BACKFILL_ATTEMPTED + 4])[0]
    return max(done, tried)


def recover(copy: Path, data: Path, held: dict, reference: list[tuple]) -> int:
    """Open the copy, check it, fetch + send from it; returns rows it had acked already."""
    db = copy / "outbox.db"
    (copy / "outbox.db-shm").unlink(missing_ok=True)  # an index is rebuilt from the WAL
    if not db.exists():
        return 0
    assert integrity(db) == "ok", copy
    with connect(db) as con:
        try:
            acked = con.execute(
                "SELECT series_id, ts, revision FROM row_states WHERE state = 'acked'"
            ).fetchall()
        except Exception:  # the snapshot came before the schema existed
            acked = []
        # Batches whose acknowledgement is recorded but not yet applied to their rows
        # count as acknowledged: the next send applies them and never sends them again.
        with contextlib.suppress(sqlite3.Error):
            for (keys,) in con.execute("SELECT keys FROM ack_log"):
                acked.extend(decode_acks(keys))
    assert [r for r in acked if held.get((r[0], r[1])) != r[2]] == [], "acked but not held"
    recorder = RecordingClient()
    config = Config.model_validate({"housekeeping": {"retention_days": 36500}})
    with Store.open(db) as store:
        assert store.upkeep.quick_check() == ["ok"]
        run_fetch(config, store, ReplaySource(data))
        run_send(config, store, GridPulseSink(recorder), sleep=lambda s: None)
    assert rows(db, OBS_COLUMNS[:6]) == reference
    assert states(db) == {"acked": len(reference)}
    delivered = {**{(r[0], r[1]): r[2] for r in acked}, **recorder.held}
    assert delivered == {(r[0], r[1]): r[5] for r in reference}, "the full set, once in effect"
    return len(acked)


def test_torn_copies_open_pass_integrity_and_converge(tmp_path: Path, scale: str, figures) -> None:
    rng = random.Random(f"torn-{scale}")
    chunks = write_chunks(tmp_path / "eia", CHUNKS[scale])
    reference_db = tmp_path / "reference.db"
    with Store.open(reference_db) as store:
        run_fetch(Config(), store, ReplaySource(tmp_path / "eia"))
    reference = rows(reference_db, OBS_COLUMNS[:6])

    db = tmp_path / "outbox.db"
    # Snapshots are taken every 20-200 ms for as long as the workers run, and a uniform
    # random sample of them is kept (reservoir sampling): the copies checked are spread
    # over the whole run (before, during and after acks) however fast this machine is.
    # A second sample is drawn from the snapshots whose WAL holds frames no checkpoint
    # has reached (a copy of those is also checked with its WAL cut): a snapshot taken
    # while a command starts up has no WAL yet, and a small sample may hold only those.
    kept = Reservoirs(rng, every=SNAPSHOTS[scale], torn=TORN[scale])
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        env = outbox_env(db, receiver=receiver, OUTBOX__GRIDPULSE__BATCH_SIZE="200")
        workers = Workers(db, chunks, env)
        workers.thread.start()
        while workers.thread.is_alive():
            time.sleep(rng.uniform(0.02, 0.2))
            target = tmp_path / "snap" / f"{kept.taken:05d}"
            if workers.snapshot(target):
                kept.offer(target, torn=_unsynced_wal(target) is not None)
        workers.thread.join(300)
        assert workers.failures == []
        final = outbox("send", env=env)
        assert final.returncode == 0, final.stderr
        held = receiver_held(receiver.db_path)
    snapshots = kept.paths()
    assert len(kept.every) >= SNAPSHOTS[scale] // 2, "the workers ran too briefly to snapshot"
    assert kept.torn, f"none of {kept.taken} snapshots had WAL frames past the checkpoint"

    copies = truncated = had_acked = 0
    for snap in snapshots:
        cut = truncate_wal(snap, snap.with_name(snap.name + "-cut"), rng)
        targets = [snap] + ([snap.with_name(snap.name + "-cut")] if cut is not None else [])
        for copy in targets:
            had_acked += recover(copy, tmp_path / "eia", held, reference)
            copies += 1
        truncated += cut is not None
    figures(
        suite="torn-files",
        trials=copies,
        snapshots=len(snapshots),
        truncated_wal=truncated,
        rows=len(reference) * copies,
        acked_in_copies=had_acked,
        snapshots_taken=kept.taken,
        taken_with_unsynced_wal=kept.seen["torn"],
        lost=0,
        duplicates=0,
    )
    assert truncated >= len(kept.torn)
    if scale == "soak":  # with 60 copies spread over the run, some caught acked rows
        assert had_acked > 0, "no copy was taken after an acknowledgement"
