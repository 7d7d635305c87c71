"""Live fetch against the stand-in EIA answering each request after a delay.

(a) A backfill (``outbox fetch --start --end``) of the five default BAs' three routes at
``eia.max_requests_per_second`` (2 at full size): requests per second achieved and the
ratio to the limit, with requests in flight (``eia.max_in_flight``, default 4) and one
after another (``max_in_flight=1``, or ``--old-tree`` for the tree before concurrency).
(b) The hourly run (an incremental ``outbox fetch`` of an outbox fetched an hour before:
one request per route), wall time of the whole process, with the quality checks on (the
default; the backfill runs them off).

The stand-in runs in its own process (``python -m outbox.testing.fake_eia --synth``),
making each asked window's synthetic rows on demand. Full size: a year (2023), delay
1.0 s, 2 requests/s. Smoke: three days, delay 0.3 s, 5 requests/s, 500-row pages.

    python benchmarks/bench_backfill.py --size full [--old-tree /work/main]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _common as c

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-eia-key"
SYNTH_START = datetime(2023, 1, 1, tzinfo=UTC)
SIZES: dict[str, dict[str, Any]] = {
    "full": {"hours": 8760, "delay": 1.0, "rate": 2.0, "page": 5000, "chunk": 744, "hourly": 3},
    "smoke": {"hours": 72, "delay": 0.3, "rate": 5.0, "page": 500, "chunk": 24, "hourly": 1},
}
RUN_LINE = re.compile(r"^fetch run \d+: (\d+) requests, (\d+) pages", re.M)
# The run's own seconds in its end-of-run log line (interpreter start-up and imports excluded).
RUN_SECONDS = re.compile(r"fetch done.*? seconds=([\d.]+)")


@contextmanager
def stand_in(delay: float, hours: int) -> Iterator[str]:
    """The stand-in EIA in its own process; yields its v2 base URL."""
    command = [sys.executable, "-m", "outbox.testing.fake_eia", "--port", "0"]
    command += ["--api-key", KEY, "--delay", str(delay), "--synth", f"2023-01-01T00:{hours}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("FakeEIA serving "):
            raise RuntimeError(f"the stand-in EIA did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)


def fetch(
    base_url: str,
    db: Path,
    size: dict[str, Any],
    in_flight: int,
    tree: Path,
    *args: str,
    **env: str,
) -> tuple[float, float, int]:
    """One ``outbox fetch`` process on ``tree``'s code: (wall seconds, the run's own
    seconds, requests made)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX", "EIA_", "GRID"))}
    clean.update(
        PYTHONPATH=str(tree),
        OUTBOX_DB=str(db),
        EIA_BASE_URL=base_url,
        EIA_API_KEY=KEY,
        OUTBOX__EIA__MAX_REQUESTS_PER_SECOND=str(size["rate"]),
        OUTBOX__EIA__PAGE_LENGTH=str(size["page"]),
        OUTBOX__EIA__BACKFILL_CHUNK_HOURS=str(size["chunk"]),
        OUTBOX__HOUSEKEEPING__RETENTION_DAYS="36500",
        OUTBOX__QUALITY__ENABLED="false",
    )
    if tree == ROOT:  # an older tree knows no such key (and fetches one after another)
        clean["OUTBOX__EIA__MAX_IN_FLIGHT"] = str(in_flight)
    clean.update(env)
    command = [sys.executable, "-m", "outbox", "fetch", *args]
    started = time.perf_counter()
    # cwd: ``-m`` puts the working directory first on sys.path, before PYTHONPATH.
    done = subprocess.run(command, env=clean, cwd=tree, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"outbox fetch {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    found = RUN_LINE.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no run line in:\n{done.stdout}")
    run = RUN_SECONDS.search(done.stderr)
    return seconds, float(run.group(1)) if run else seconds, int(found.group(1))


def backfill(base_url: str, work: Path, size: dict[str, Any], in_flight: int, tree: Path) -> dict:
    """(a): the whole backfill on a fresh outbox."""
    db = work / f"backfill-{in_flight}-{tree.name}.db"
    c.remove_db(db)
    end = SYNTH_START + timedelta(hours=size["hours"] - 1)
    span = ("--start", SYNTH_START.strftime("%Y-%m-%dT%H"), "--end", end.strftime("%Y-%m-%dT%H"))
    seconds, run, requests = fetch(base_url, db, size, in_flight, tree, *span)
    rate = requests / run
    c.log(f"backfill in_flight={in_flight} tree={tree}: {requests} requests in {run:.1f}s")
    return {
        "requests": requests,
        "seconds": round(run, 2),
        "process_seconds": round(seconds, 2),
        "requests_per_second": round(rate, 3),
        "ratio_to_limit": round(rate / size["rate"], 3),
        "process_ratio_to_limit": round(requests / seconds / size["rate"], 3),
    }


def hourly(base_url: str, work: Path, size: dict[str, Any], in_flight: int, tree: Path) -> dict:
    """(b): an outbox fetched up to now, then the next run timed (median of a few)."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    db = work / f"hourly-{in_flight}-{tree.name}.db"
    walls, runs, requests = [], [], 0
    for _ in range(size["hourly"]):
        c.remove_db(db)
        start = (now - timedelta(hours=24)).strftime("%Y-%m-%dT%H:00:00Z")
        # The hourly run's requests are one page each, as EIA's 5,000-row pages make them.
        env = {
            "OUTBOX__EIA__HISTORY_START": start,
            "OUTBOX__EIA__PAGE_LENGTH": "5000",
            "OUTBOX__EIA__BACKFILL_CHUNK_HOURS": "744",
            "OUTBOX__QUALITY__ENABLED": "true",  # as an hourly timer runs it: the default
        }
        fetch(base_url, db, size, in_flight, tree, **env)
        seconds, run, requests = fetch(base_url, db, size, in_flight, tree, **env)
        walls.append(seconds)
        runs.append(run)
    wall = statistics.median(walls)
    c.log(f"hourly in_flight={in_flight} tree={tree}: {requests} requests, {wall:.2f}s")
    return {
        "requests": requests,
        "wall_seconds": round(wall, 3),
        "run_seconds": round(statistics.median(runs), 3),
        "walls": [round(w, 3) for w in walls],
    }


def main() -> None:
    """Print one JSON object: the backfill's rate and the hourly run's wall, both ways."""
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--old-tree", type=Path, default=None, help="also run this tree (sequential)")
    p.add_argument("--delay", type=float, default=None, help="the stand-in's answer delay")
    args = p.parse_args()
    size = dict(SIZES[args.size])
    if args.delay is not None:
        size["delay"] = args.delay
    now = datetime.now(UTC)
    hours_to_now = int((now - SYNTH_START).total_seconds() // 3600)  # nothing after now
    result: dict[str, Any] = {"size": args.size, **{k: size[k] for k in ("delay", "rate")}}
    with c.workdir(args.workdir) as work, stand_in(size["delay"], hours_to_now) as url:
        trees = [("sequential", 1, ROOT), ("in_flight", 4, ROOT)]
        if args.old_tree is not None:
            trees.insert(0, ("old_tree", 1, args.old_tree.resolve()))
        result["backfill"] = {name: backfill(url, work, size, n, t) for name, n, t in trees}
        result["hourly"] = {name: hourly(url, work, size, n, t) for name, n, t in trees}
    b, h = result["backfill"], result["hourly"]
    result["ratios"] = {
        "backfill_in_flight_to_limit": b["in_flight"]["ratio_to_limit"],
        "backfill_sequential_to_limit": b["sequential"]["ratio_to_limit"],
        "backfill_speedup": round(b["sequential"]["seconds"] / b["in_flight"]["seconds"], 2),
        "hourly_speedup": round(
            h["sequential"]["wall_seconds"] / h["in_flight"]["wall_seconds"], 2
        ),
    }
    result["targets"] = {
        "backfill_ratio_at_least": 0.9,
        "hourly_wall_under_seconds": 2.5,
        "met": b["in_flight"]["ratio_to_limit"] >= 0.9 and h["in_flight"]["wall_seconds"] < 2.5,
    }
    c.emit(result)


if __name__ == "__main__":
    main()
