"""Stage benchmark: ``outbox fetch --replay DIR`` against the floor and two older designs.

Contenders, alternating in rounds in this one process (so machine noise hits all alike):

* ``floor``: stdlib ``json`` + ``sqlite3.executemany`` of ``(series_id, ts, value)``
  tuples into an indexed table, one executemany per file, one transaction.
* ``ours``: :func:`outbox.stages.fetch.run_fetch` of a ``ReplaySource(DIR)`` on a fresh outbox,
  then ``restage``: the same replay again (nothing changed, nothing may be written).
* ``ours_cli``: ``outbox fetch --replay DIR`` as a subprocess (startup and migrations
  included), fresh outbox; then ``restage_cli``: the same command again on that outbox
  (nothing changed), with the checks on and (``restage_cli_no_checks``) off.
* ``old_design``: pandas row-wise ``apply`` + ``to_sql(method="multi")`` into a temp
  table + ``INSERT ... ON CONFLICT`` from it; ``persist_queue``: persist-queue's
  ``SQLiteAckQueue.put`` of every row. Both are slow: at full size they run on the
  first files only and their rows/s is extrapolated (``subset: true``).

Also reported: outbox size on disk per million staged rows, raw pages included; and
``region_65ba``: floor, ours and the re-stages on region-data-only pages of 65 BAs (the
same number of rows; ``--region-bas 0`` skips it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from functools import partial
from hashlib import blake2b
from pathlib import Path
from typing import Any

import _common as c

from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store

SETTINGS = {
    # rows, rounds, rows for the slow designs (a prefix of the files)
    "smoke": {"rows": 20_000, "rounds": 1, "old_rows": 5_000, "queue_rows": 1_000},
    "full": {"rows": 1_000_000, "rounds": 3, "old_rows": 100_000, "queue_rows": 20_000},
}


def files_of(directory: Path) -> list[Path]:
    """The page files in replay order."""
    return sorted(p for p in directory.glob("*.json"))


def subset(files: list[Path], rows: int) -> tuple[list[Path], int]:
    """The first files holding at least ``rows`` rows, and how many rows they hold."""
    chosen, total = [], 0
    for path in files:
        if total >= rows:
            break
        chosen.append(path)
        total += len(json.loads(path.read_bytes())["response"]["data"])
    return chosen, total


def route_keys(doc: dict[str, Any]) -> tuple[str, str, str]:
    """(route tag, respondent key, series-code key) of a response body."""
    route = doc["request"]["command"].split("/")[4]  # /v2/electricity/rto/<route>/data/
    if route.startswith("interchange"):
        return "i", "fromba", "toba"
    return route[0], "respondent", "fueltype" if route.startswith("fuel") else "type"


# -- the floor ------------------------------------------------------------------------


def run_floor(files: list[Path], database: Path) -> int:
    """The plain script: json.loads, tuples, one executemany per file, one transaction."""
    c.remove_db(database)
    con = sqlite3.connect(database, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("CREATE TABLE obs (series_id TEXT NOT NULL, ts TEXT NOT NULL, value REAL)")
    con.execute("CREATE UNIQUE INDEX ix_obs ON obs (series_id, ts)")
    rows = 0
    con.execute("BEGIN")
    for path in files:
        doc = json.loads(path.read_bytes())
        tag, resp, code = route_keys(doc)
        data = [
            (
                f"{tag}.{r[resp]}.{r[code]}",
                r["period"],
                None if r["value"] is None else float(r["value"]),
            )
            for r in doc["response"]["data"]
        ]
        con.executemany("INSERT INTO obs VALUES (?, ?, ?)", data)
        rows += len(data)
    con.execute("COMMIT")
    con.close()
    return rows


# -- ours -------------------------------------------------------------------------------


def run_ours(
    directory: Path, database: Path, fresh: bool, cpu: list[float], checks: bool = True
) -> tuple[float, Any]:
    """run_fetch(ReplaySource(directory)) and closing the store (as the floor closes its
    connection, checkpoint included), timed without opening it (migrations).

    Appends the CPU seconds (all threads, and the read-ahead process) to ``cpu``.
    ``checks=False`` turns the data-quality checks off (``quality.enabled: false``).
    """
    if fresh:
        c.remove_db(database)
    store = Store.open(database)
    config = c.config_for(database, directory)
    if not checks:
        quality = config.quality.model_copy(update={"enabled": False})
        config = config.model_copy(update={"quality": quality})

    def run() -> Any:
        try:
            return run_fetch(config, store, ReplaySource(directory))
        finally:
            store.close()

    started = c.cpu_seconds()
    seconds, result = c.timed(run)
    cpu.append(c.cpu_seconds() - started)
    return seconds, result


def run_cli(directory: Path, database: Path, fresh: bool = True, checks: bool = True) -> float:
    """``outbox fetch --replay DIR`` in a fresh process (all included), on a fresh outbox
    unless not ``fresh``; ``checks=False`` turns the quality checks off."""
    if fresh:
        c.remove_db(database)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX", "EIA_", "GRIDPULSE_"))
    }
    env["OUTBOX_DB"] = str(database)
    env.update(c.replay_env(directory))
    if not checks:
        env["OUTBOX__QUALITY__ENABLED"] = "false"
    seconds, done = c.timed(
        lambda: subprocess.run(
            [sys.executable, "-m", "outbox", "fetch", "--replay", str(directory)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    )
    if done.returncode != 0:
        raise RuntimeError(f"outbox fetch --replay failed:\n{done.stderr}")
    return seconds


def disk_figures(database: Path, rows: int) -> dict[str, Any]:
    """Bytes of the outbox after staging ``rows``, per million rows, pages included."""
    con = sqlite3.connect(database)
    pages, bodies = con.execute(
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM pages"
    ).fetchone()
    con.close()
    total = c.db_bytes(database)
    return {
        "rows": rows,
        "bytes": total,
        "page_bodies_bytes": bodies,
        "pages": pages,
        "mb_per_million_rows": round(total / rows * 1e6 / 1e6, 1),
        "page_bodies_mb_per_million_rows": round(bodies / rows * 1e6 / 1e6, 1),
    }


# -- the old design ---------------------------------------------------------------------

OLD_TABLE = """
CREATE TABLE observations (
    series_id TEXT NOT NULL, ts TEXT NOT NULL, value REAL, units TEXT NOT NULL,
    quality_flag TEXT NOT NULL, revision TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (series_id, ts))
"""
OLD_UPSERT = """
INSERT INTO observations (series_id, ts, value, units, quality_flag, revision, state)
SELECT series_id, ts, value, units, quality_flag, revision, 'pending' FROM staging WHERE true
ON CONFLICT (series_id, ts) DO UPDATE SET value = excluded.value, units = excluded.units,
    quality_flag = excluded.quality_flag, revision = excluded.revision, state = 'pending'
WHERE observations.revision <> excluded.revision
"""


def run_old_design(files: list[Path], database: Path) -> int:
    """Row-wise pandas apply, to_sql(method="multi") into a temp table, upsert from it."""
    import pandas as pd

    c.remove_db(database)
    con = sqlite3.connect(database, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute(OLD_TABLE)
    rows = 0
    for path in files:
        doc = json.loads(path.read_bytes())
        tag, resp, code = route_keys(doc)

        def normalize(
            r: pd.Series, tag: str = tag, resp: str = resp, code: str = code
        ) -> pd.Series:
            value = None if r["value"] in (None, "") else float(r["value"])
            flag = "missing" if value is None else "good"
            revision = blake2b(f"{value!r}|{flag}|MW".encode(), digest_size=8).hexdigest()
            return pd.Series(
                {
                    "series_id": f"EIA.{tag}.{r[resp]}.{r[code]}",
                    "ts": f"{r['period']}:00:00Z",
                    "value": value,
                    "units": "MW",
                    "quality_flag": flag,
                    "revision": revision,
                }
            )

        frame = pd.DataFrame(doc["response"]["data"]).apply(normalize, axis=1)
        # pandas commits the temp table itself; the upsert from it is its own transaction.
        frame.to_sql(
            "staging", con, if_exists="replace", index=False, method="multi", chunksize=5000
        )
        con.execute(OLD_UPSERT)
        rows += len(frame)
    con.close()
    return rows


def run_persist_queue(files: list[Path], directory: Path, limit: int) -> int:
    """persist-queue SQLiteAckQueue.put of (series_id, ts, value) for the first rows."""
    import shutil

    from persistqueue import SQLiteAckQueue

    shutil.rmtree(directory, ignore_errors=True)
    queue = SQLiteAckQueue(str(directory), auto_commit=True, multithreading=False)
    rows = 0
    for path in files:
        doc = json.loads(path.read_bytes())
        tag, resp, code = route_keys(doc)
        for r in doc["response"]["data"]:
            if rows >= limit:
                return rows
            value = None if r["value"] is None else float(r["value"])
            queue.put((f"{tag}.{r[resp]}.{r[code]}", r["period"], value))
            rows += 1
    return rows


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    """Generate pages, run the contenders in alternating rounds, print the figures."""
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="override the size's row count")
    p.add_argument("--bas", type=int, default=len(c.ALL_BAS), help="balancing authorities")
    p.add_argument("--routes", default="region,fuel,interchange", help="comma-separated")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--ours-only", action="store_true", help="skip floor and older designs")
    p.add_argument("--no-cli", action="store_true", help="skip the subprocess run")
    p.add_argument("--no-old", action="store_true", help="skip the old design and persist-queue")
    p.add_argument(
        "--region-bas", type=int, default=65, help="BAs of the region-data-only shape (0: none)"
    )
    args = p.parse_args()
    import pandas  # noqa: F401  (imported on first use by normalize: not charged to round 1)

    cfg = dict(SETTINGS[args.size])
    rows = args.rows or cfg["rows"]
    rounds = args.rounds or cfg["rounds"]
    routes = tuple(r.strip() for r in args.routes.split(",") if r.strip())
    info = c.replay_pages(args.cache, rows, bas=args.bas, routes=routes)
    directory = Path(info["dir"])
    files = files_of(directory)
    n = info["rows"]
    with c.workdir(args.workdir) as work:
        ours_db = work / "ours.db"
        old_files, old_rows = subset(files, cfg["old_rows"])
        old = None if args.ours_only or args.no_old else (old_files, old_rows, cfg["queue_rows"])
        runs, written, cpu, queued = measure(directory, files, n, rounds, work, args, old)
        result = report(args.size, info, runs, written, old_rows, queued)
        result["cpu_seconds"] = {k: c.median(v) for k, v in cpu.items() if v}
        if cpu["floor"]:
            result["ratios"]["ours_over_floor_cpu"] = c.ratio(
                c.median(cpu["ours"]), c.median(cpu["floor"])
            )
        # Stage once more on a fresh outbox so that its size is that of one staging.
        run_ours(directory, ours_db, True, [])
        result["disk"] = disk_figures(ours_db, n)
        if args.region_bas:
            result[f"region_{args.region_bas}ba"] = region_shape(args, rows, rounds, work)
    c.emit(result)


def region_shape(args: Any, rows: int, rounds: int, work: Path) -> dict[str, Any]:
    """The contenders but the older designs on region-data-only pages of many BAs."""
    info = c.replay_pages(args.cache, rows, bas=args.region_bas, routes=("region",))
    directory = Path(info["dir"])
    files = files_of(directory)
    runs, written, _cpu, _queued = measure(directory, files, info["rows"], rounds, work, args)
    result = report(args.size, info, runs, written, 0, 0)
    keep = ("rows", "files", "bas", "routes", "input_mb", "rounds", "ratios")
    figures = ("floor", "ours", "ours_no_checks", "restage", "ours_cli", "restage_cli")
    return {k: v for k, v in result.items() if k in keep or k.startswith(figures)}


def measure(
    directory: Path,
    files: list[Path],
    n: int,
    rounds: int,
    work: Path,
    args: Any,
    old: tuple[list[Path], int, int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, list[float]], int]:
    """Every contender in alternating rounds: (seconds, rows written, CPU seconds, rows
    persist-queue took); the older designs only with ``old`` (files, rows, queue rows)."""
    floor_db, ours_db, cli_db = work / "floor.db", work / "ours.db", work / "cli.db"
    names = ("floor", "ours", "ours_no_checks", "restage", "cli", "restage_cli")
    runs: dict[str, list[float]] = {
        k: [] for k in (*names, "restage_cli_no_checks", "old", "queue")
    }
    written: dict[str, int] = {}
    cpu: dict[str, list[float]] = {"floor": [], "ours": [], "ours_no_checks": [], "restage": []}
    queued = 0
    for i in range(rounds):
        c.log(f"round {i + 1}/{rounds}: {n} rows in {len(files)} files")
        if not args.ours_only:
            started = c.cpu_seconds()
            seconds, floor_rows = c.timed(lambda: run_floor(files, floor_db))
            cpu["floor"].append(c.cpu_seconds() - started)
            assert floor_rows == n, (floor_rows, n)
            runs["floor"].append(seconds)
        seconds, first = run_ours(directory, ours_db, True, cpu["ours"])
        runs["ours"].append(seconds)
        written["ours"] = first.written
        seconds, again = run_ours(directory, ours_db, False, cpu["restage"])
        runs["restage"].append(seconds)
        written["restage"] = again.written
        # Side by side: the same stage with the quality checks off.
        seconds, plain = run_ours(directory, ours_db, True, cpu["ours_no_checks"], False)
        runs["ours_no_checks"].append(seconds)
        written["ours_no_checks"] = plain.written
        if not args.no_cli:
            runs["cli"].append(run_cli(directory, cli_db))
            runs["restage_cli"].append(run_cli(directory, cli_db, fresh=False))
            runs["restage_cli_no_checks"].append(run_cli(directory, cli_db, False, False))
        if old is not None:
            old_files, old_rows, queue_rows = old
            seconds, got = c.timed(partial(run_old_design, old_files, work / "old.db"))
            runs["old"].append(seconds * old_rows / got)
            seconds, queued = c.timed(partial(run_persist_queue, files, work / "queue", queue_rows))
            runs["queue"].append(seconds)
    return runs, written, cpu, queued


def report(
    size: str,
    info: dict[str, Any],
    runs: dict[str, list[float]],
    written: dict[str, int],
    old_rows: int,
    queued: int,
) -> dict[str, Any]:
    """The JSON object of figures and ratios."""
    n = info["rows"]
    result: dict[str, Any] = {
        "benchmark": "stage",
        "size": size,
        "rows": n,
        "files": info["files"],
        "page_rows": info["page_rows"],
        "bas": info["bas"],
        "routes": info["routes"],
        "input_mb": round(info["bytes"] / 1e6, 1),
        "rounds": len(runs["ours"]),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "ours": c.figure(n, runs["ours"], written=written["ours"]),
        "ours_no_checks": c.figure(
            n, runs["ours_no_checks"], written=written["ours_no_checks"], note="quality off"
        ),
        "restage": c.figure(n, runs["restage"], written=written["restage"]),
    }
    if runs["cli"]:
        result["ours_cli"] = c.figure(n, runs["cli"], note="whole process: startup, migrations")
        result["restage_cli"] = c.figure(n, runs["restage_cli"], note="whole process")
        result["restage_cli_no_checks"] = c.figure(
            n, runs["restage_cli_no_checks"], note="whole process, quality off"
        )
    ratios: dict[str, float] = {}
    if runs["floor"]:
        result["floor"] = c.figure(n, runs["floor"])
        per_round = [o / f for o, f in zip(runs["ours"], runs["floor"], strict=True)]
        ratios["ours_over_floor"] = round(c.median(per_round), 3)
        ratios["restage_over_floor"] = round(
            c.median([r / f for r, f in zip(runs["restage"], runs["floor"], strict=True)]), 3
        )
        ratios["stage_over_floor"] = ratios["ours_over_floor"]
        ratios["stage_no_checks_over_floor"] = per_round_ratio(runs, "ours_no_checks")
        if runs["cli"]:
            ratios["ours_cli_over_floor"] = per_round_ratio(runs, "cli")
            ratios["restage_cli_over_floor"] = per_round_ratio(runs, "restage_cli")
            ratios["restage_cli_no_checks_over_floor"] = per_round_ratio(
                runs, "restage_cli_no_checks"
            )
    if runs["old"]:
        # runs["old"] holds seconds scaled to old_rows; rate = old_rows / seconds.
        result["old_design"] = {
            **c.figure(old_rows, runs["old"]),
            "subset": old_rows < n,
            "note": f"run on the first {old_rows} rows; rows/s extrapolates to {n} rows",
        }
        result["persist_queue"] = {
            **c.figure(queued, runs["queue"]),
            "subset": queued < n,
            "note": f"put of the first {queued} rows; rows/s extrapolates to {n} rows",
        }
        ours_rate = n / c.median(runs["ours"])
        ratios["ours_speedup_over_old_design"] = c.ratio(
            ours_rate, result["old_design"]["rows_per_s"]
        )
        ratios["ours_speedup_over_persist_queue"] = c.ratio(
            ours_rate, result["persist_queue"]["rows_per_s"]
        )
    # Issue 13's budget: the stage with the quality checks against the same stage without.
    per_round = [a / b for a, b in zip(runs["ours"], runs["ours_no_checks"], strict=True)]
    ratios["checks_on_over_off"] = round(c.median(per_round), 3)
    result["ratios"] = ratios
    return result


def per_round_ratio(runs: dict[str, list[float]], name: str) -> float:
    """The median over rounds of ``name``'s seconds over the floor's."""
    return round(c.median([o / f for o, f in zip(runs[name], runs["floor"], strict=True)]), 3)


if __name__ == "__main__":
    main()
