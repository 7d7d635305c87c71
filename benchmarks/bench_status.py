"""Status and claim benchmark on a large outbox generated directly into the real schema.

Two outboxes are built by :meth:`outbox.store.Store.open` (the migrations) and filled with
SQL in primary-key order (fast; no fetch involved), ~1,000 series:

* ``status``: N rows, mostly acknowledged, the newest hours pending, a few dead; timed:
  ``outbox status --json`` as a subprocess, and :func:`outbox.status.read` in-process.
* ``claim``: N rows, every one pending; timed: :meth:`Delivery.claim` of one 5,000-row batch
  (first call on a freshly opened store, and the median of repeated calls), and
  ``outbox status --check`` on it (the monitoring probe with the largest backlog).

Full size is 10 million rows, smoke 100,000. Generated files are cached by size and
schema revision.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import _common as c

from outbox import status as status_mod
from outbox.store import Store
from outbox.store.migrate import head_revision

SETTINGS = {
    "smoke": {"series_bas": 10, "hours": 1_000, "repeats": 1},
    "full": {"series_bas": 100, "hours": 10_000, "repeats": 5},
}
TYPES = (
    ("demand", None),
    ("demand_forecast", None),
    ("net_generation", None),
    ("interchange", None),
    ("generation", "coal"),
    ("generation", "gas"),
    ("generation", "nuclear"),
    ("generation", "solar"),
    ("generation", "wind"),
    ("generation", "hydro"),
)
PENDING_SHARE = 0.02  # the newest 2% of hours of every series are pending
DEAD_EVERY = 997  # one hour in 997 of the acknowledged range is dead
START = "2014-01-01T00:00:00Z"
_FILL = """
WITH RECURSIVE h(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM h WHERE n < :hours - 1)
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, page_id,
    page_row, fetched_at)
SELECT :sid, strftime('%Y-%m-%dT%H:%M:%SZ', :start, '+' || n || ' hours'), 1000.0 + n % 500,
    'MW', 'good', printf('%016x', (n * 2654435761 + :salt) % 9007199254740991), NULL, NULL,
    :start
FROM h
"""
# The queue entries of the series just filled: its newest hours pending (all of them with
# all_pending), one hour in DEAD_EVERY of the others dead, the rest acknowledged (no entry).
_QUEUE = """
WITH RECURSIVE h(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM h WHERE n < :hours - 1),
e(n, pending) AS (SELECT n, :all_pending OR n >= :pending_from FROM h)
INSERT INTO queue (ts, series_id, revision, state, attempts, last_error, last_error_code)
SELECT strftime('%Y-%m-%dT%H:%M:%SZ', :start, '+' || n || ' hours'), :sid,
    printf('%016x', (n * 2654435761 + :salt) % 9007199254740991),
    CASE WHEN pending THEN 'pending' ELSE 'dead' END, CASE WHEN pending THEN 0 ELSE 1 END,
    CASE WHEN NOT pending THEN 'value below 0 for demand' END,
    CASE WHEN NOT pending THEN 'VALUE_OUT_OF_RANGE' END
FROM e WHERE pending OR n % :dead_every = 0
"""


def series_of(bas: int) -> list[tuple[str, str, str, str | None]]:
    """(series_id, ba, type, subtype) of ``bas`` x 10 series."""
    out = []
    for i in range(bas):
        ba = f"B{i:03d}"
        for kind, sub in TYPES:
            sid = f"EIA.{ba}.{kind}" if sub is None else f"EIA.{ba}.{kind}.{sub}"
            out.append((sid, ba, kind, sub))
    return out


def build(path: Path, bas: int, hours: int, *, all_pending: bool) -> int:
    """Fill a fresh outbox at ``path``; returns its row count."""
    c.remove_db(path)
    Store.open(path).close()  # the real schema, by the migrations
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA cache_size = -262144")
    indexes = con.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger')"
        " AND tbl_name IN ('observations', 'queue') AND sql IS NOT NULL"
    ).fetchall()
    con.execute("BEGIN")
    # Indexes built once at the end: much faster than row by row; the queue written here
    # rather than by the triggers, which come back at the end too.
    for kind, name, _ in indexes:
        con.execute(f"DROP {kind.upper()} {name}")
    series = series_of(bas)
    con.executemany(
        "INSERT INTO series (series_id, ba, type, subtype, units, route, facets, first_seen)"
        " VALUES (?, ?, ?, ?, 'MW', 'electricity/rto/region-data', '{}', ?)",
        [(*s, START) for s in series],
    )
    params = {
        "hours": hours,
        "start": START,
        "all_pending": int(all_pending),
        "pending_from": int(hours * (1 - PENDING_SHARE)),
        "dead_every": DEAD_EVERY,
    }
    for i, (sid, *_rest) in enumerate(series):
        con.execute(_FILL, {**params, "sid": sid, "salt": i})
        con.execute(_QUEUE, {**params, "sid": sid, "salt": i})
    for _, _, sql in indexes:
        con.execute(sql)
    for stage in ("fetch", "send"):
        con.execute(
            "INSERT INTO runs (stage, started_at, finished_at, status, counts, pid)"
            " VALUES (?, ?, ?, 'ok', '{}', 1)",
            (stage, START, START),
        )
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return len(series) * hours


def outbox(cache: Path, size: str, *, all_pending: bool) -> tuple[Path, int]:
    """The cached generated outbox of this size and kind."""
    cfg = SETTINGS[size]
    kind = "pending" if all_pending else "mixed"
    path = cache / f"status-{kind}-{cfg['series_bas']}x{cfg['hours']}-{head_revision()}.db"
    rows = cfg["series_bas"] * len(TYPES) * cfg["hours"]
    if not path.exists():
        c.log(f"generating {rows} rows ({kind}) in {path}")
        scratch = path.with_suffix(".tmp")
        build(scratch, cfg["series_bas"], cfg["hours"], all_pending=all_pending)
        scratch.rename(path)
        # The migration lock of the scratch name has no user left (a real outbox keeps
        # its lock files: removing one another process holds would defeat the lock).
        scratch.with_name(f"{scratch.name}.migrate.lock").unlink(missing_ok=True)
    return path, rows


def status_cli(path: Path, flag: str = "--json") -> float:
    """``outbox status --json`` (or ``--check``) in a fresh process."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX", "EIA_", "GRIDPULSE_"))
    }
    env["OUTBOX_DB"] = str(path)
    seconds, done = c.timed(
        lambda: subprocess.run(
            [sys.executable, "-m", "outbox", "status", flag],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    )
    if done.returncode not in (0, 1, 2):  # 1/2: the status itself found problems
        raise RuntimeError(f"outbox status {flag} exited {done.returncode}:\n{done.stderr}")
    return seconds


def python_startup() -> float:
    """A bare ``python -c 'import outbox.cli'`` (the floor of any CLI call)."""
    seconds, _ = c.timed(
        lambda: subprocess.run([sys.executable, "-c", "import outbox.cli"], check=True)
    )
    return seconds


def claims(path: Path, repeats: int) -> dict[str, Any]:
    """Claim one 5,000-row batch: first call on a fresh store, then repeated calls."""
    with Store.open(path, migrate=False) as store:
        first, got = c.timed(lambda: store.delivery.claim(5000))
        runs = [c.timed(lambda: store.delivery.claim(5000))[0] for _ in range(repeats)]
    return {
        "rows": len(got),
        "first_seconds": round(first, 4),
        "seconds": c.median(runs),
        "runs": [round(r, 4) for r in runs],
    }


def main() -> None:
    """Build (or reuse) the outboxes and time status and claim."""
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    cfg = SETTINGS[args.size]
    args.cache.mkdir(parents=True, exist_ok=True)
    mixed, rows = outbox(args.cache, args.size, all_pending=False)
    pending, pending_rows = outbox(args.cache, args.size, all_pending=True)
    config = c.config_for(mixed)
    cli_runs, inproc_runs, check_runs = [], [], []
    for _ in range(cfg["repeats"]):
        cli_runs.append(status_cli(mixed))
        seconds, report = c.timed(lambda: status_mod.read(config))
        inproc_runs.append(seconds)
        check_runs.append(status_cli(pending, "--check"))
    totals = dict(report.totals)
    startup = python_startup()
    result = {
        "benchmark": "status",
        "size": args.size,
        "rows": rows,
        "series": totals.get("series"),
        "pending": totals.get("pending"),
        "dead": totals.get("dead"),
        "database_mb": round(c.db_bytes(mixed) / 1e6, 1),
        "status_cli": {
            "seconds": c.median(cli_runs),
            "runs": [round(r, 4) for r in cli_runs],
            "python_startup_seconds": round(startup, 4),
            "note": "outbox status --json, whole process",
        },
        "status_inprocess": {
            "seconds": c.median(inproc_runs),
            "runs": [round(r, 4) for r in inproc_runs],
            "note": "outbox.status.read(config)",
        },
        "check_all_pending": {
            "pending_rows": pending_rows,
            "seconds": c.median(check_runs),
            "runs": [round(r, 4) for r in check_runs],
            "note": "outbox status --check, whole process, every row pending",
        },
        "claim": {"pending_rows": pending_rows, **claims(pending, cfg["repeats"])},
    }
    c.emit(result)


if __name__ == "__main__":
    main()
