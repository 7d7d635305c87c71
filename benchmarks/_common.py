"""Shared helpers of the benchmark scripts: sizes, synthetic EIA pages, timing, output.

Every script prints exactly one JSON object on stdout (progress goes to stderr), so
``python benchmarks/bench_x.py --size smoke | jq`` works and CI can parse the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson

from outbox.config import DEFAULT_BAS, Config
from outbox.testing import synth

T = TypeVar("T")

SIZES = ("smoke", "full")
START = datetime(2023, 1, 1, tzinfo=UTC)
BLOCK_HOURS = 744  # one backfill chunk (config default): one request per route per block
ROUTE_NAMES = {
    "region": synth.ROUTE_REGION,
    "fuel": synth.ROUTE_FUEL,
    "interchange": synth.ROUTE_INTERCHANGE,
}
ALL_BAS = sorted(synth.BA_NAMES)  # the 35 EIA-930 respondents the generator knows by name


def parser(description: str) -> argparse.ArgumentParser:
    """The options every script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=SIZES, default="smoke", help="smoke: seconds; full: 1M+")
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gridpulse-outbox-bench",
        help="where generated EIA pages are kept between runs",
    )
    return p


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON object of figures."""
    print(json.dumps(result, indent=2))


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """``path`` (created, kept), or a temporary directory removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def choose_bas(count: int) -> list[str]:
    """``count`` respondents: the named ones first, then made-up codes (no interchange)."""
    extra = [f"X{i:02d}" for i in range(max(0, count - len(ALL_BAS)))]
    return (ALL_BAS + extra)[:count]


def rows_per_hour(bas: Sequence[str], routes: Sequence[str]) -> int:
    """How many EIA rows one hour of ``routes`` for ``bas`` has."""
    return sum(len(synth.make_rows(ROUTE_NAMES[r], bas, START, 1)) for r in routes)


def replay_pages(
    cache: Path,
    rows: int,
    *,
    bas: int = len(ALL_BAS),
    routes: Sequence[str] = tuple(ROUTE_NAMES),
    page_rows: int = synth.MAX_ROWS,
) -> dict[str, Any]:
    """A directory of EIA v2 response bodies holding at least ``rows`` rows (cached).

    The hours are split in blocks of :data:`BLOCK_HOURS`: each block is one request per
    route, paged by ``page_rows`` exactly as the API pages it (``total``, ``offset``,
    the "incomplete return" warning). Values are strings, as the API sends them.
    """
    chosen = choose_bas(bas)
    per_hour = rows_per_hour(chosen, routes)
    hours = math.ceil(rows / per_hour)
    name = f"pages-{hours}h-{len(chosen)}ba-{'-'.join(routes)}-{page_rows}"
    directory = cache / name
    info_path = directory / "info.meta"
    if info_path.exists():
        return json.loads(info_path.read_text())
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log(f"generating {hours} hours x {len(chosen)} BAs x {len(routes)} routes in {directory}")
    total = files = size = 0
    for block, first in enumerate(range(0, hours, BLOCK_HOURS)):
        start = START + timedelta(hours=first)
        span = min(BLOCK_HOURS, hours - first)
        for route in routes:
            data = synth.make_rows(ROUTE_NAMES[route], chosen, start, span)
            for i, page in enumerate(synth.make_pages(ROUTE_NAMES[route], data, page_rows)):
                path = directory / f"{route}-{block:04d}-{i:04d}.json"
                body = orjson.dumps(page)
                path.write_bytes(body)
                files += 1
                size += len(body)
            total += len(data)
    info = {
        "dir": str(directory),
        "rows": total,
        "files": files,
        "bytes": size,
        "hours": hours,
        "bas": len(chosen),
        "routes": list(routes),
        "page_rows": page_rows,
    }
    info_path.write_text(json.dumps(info))
    return info


def replayed_bas(directory: Path) -> dict[str, str]:
    """The BA map for replaying ``directory``: the default five, plus every other
    respondent of its pages under its EIA code (a replay stages configured BAs only)."""
    info = json.loads((Path(directory) / "info.meta").read_text())
    bas = dict(DEFAULT_BAS)
    known = set(bas.values())
    bas.update({r: r for r in choose_bas(info["bas"]) if r not in known})
    return bas


def replay_env(directory: Path) -> dict[str, str]:
    """:func:`replayed_bas` as environment variables, for ``outbox fetch --replay`` runs."""
    return {f"OUTBOX__BALANCING_AUTHORITIES__{k}": v for k, v in replayed_bas(directory).items()}


def config_for(database: Path, replayed: Path | None = None, **gridpulse: Any) -> Config:
    """The default config (5 BAs mapped, all datasets) on ``database``; with ``replayed``
    (a directory of :func:`replay_pages`), every BA of its pages is configured too."""
    base = Config()
    update: dict[str, Any] = {"database": str(database)}
    if replayed is not None:
        update["balancing_authorities"] = replayed_bas(replayed)
    if gridpulse:
        update["gridpulse"] = base.gridpulse.model_copy(update=gridpulse)
    return base.model_copy(update=update)


def remove_db(path: Path) -> None:
    """Delete an SQLite file with its WAL, shared-memory and lock files."""
    for suffix in ("", "-wal", "-shm", ".fetch.lock", ".send.lock", ".migrate.lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def db_bytes(path: Path) -> int:
    """Bytes on disk of an SQLite database: main file plus WAL."""
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if os.path.exists(p))


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of ``fn()`` on the monotonic clock.

    The page cache is flushed first (``os.sync``), so that no contender pays for the
    writeback of the files the one before it wrote (the floor's ~100 MB database, an
    outbox copied for a send): a checkpoint's fsync otherwise queues behind it.
    """
    os.sync()
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its children that have ended (a
    replay's read-ahead process is joined before the run returns)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def median(values: Sequence[float]) -> float:
    """The median, rounded for the report."""
    return round(statistics.median(values), 4)


def rate(rows: int, seconds: float) -> float:
    """Rows per second, rounded."""
    return round(rows / seconds, 1) if seconds > 0 else float("inf")


def figure(rows: int, runs: Sequence[float], **extra: Any) -> dict[str, Any]:
    """The standard figure of one contender: median seconds, rows/s, every run."""
    seconds = median(runs)
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rate(rows, seconds),
        "runs": [round(r, 4) for r in runs],
        **extra,
    }


def ratio(a: float, b: float) -> float:
    """a / b, rounded."""
    return round(a / b, 3) if b else float("inf")
