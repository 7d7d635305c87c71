"""Send benchmark: drain N pending rows to the reference receiver, against the transport floor.

Contenders, alternating in rounds, each against a fresh receiver subprocess on 127.0.0.1:

* ``floor``: a plain ``httpx`` loop POSTing pre-built gzip batches (the same rows, the
  same 5,000-row batches, the same bodies our sender builds) one after another.
* ``ours``: :func:`outbox.stages.send.run_send` on a copy of an outbox holding N pending rows
  (claim, encode, gzip, POST, settle, batch after batch).

With ``--sink postgres``, also ``postgres_sink``: the same run_send through the direct
PostgreSQL sink (``sink: {kind: postgres}``) into a throwaway cluster (tests/pgcluster.py)
holding GridPulse's schema, a fresh database per round.

Also measured: ``receiver_alone``, the receiver's own work per batch (gunzip, JSON,
validation, batch upsert) called in-process without HTTP; and ``hourly_requests``, the
EIA requests one hourly ``outbox fetch`` makes for 5 BAs x all datasets against the
stand-in EIA server after a first fetch caught up.

``--receiver-db postgres`` runs every receiver on a fresh database of a throwaway
PostgreSQL cluster (:mod:`outbox.testing.pgcluster`) instead of a SQLite file.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common as c
import httpx

from outbox.sample.receiver import running_receiver
from outbox.sinks.gridpulse import (
    INGEST_PATH,
    GridPulseClient,
    GridPulseSink,
    batch_id_of,
    encode_batch,
)
from outbox.sources.eia import EIAClient
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.stages.send import run_send
from outbox.store import Store
from outbox.testing import synth
from outbox.testing.fake_eia import FakeEIA

SETTINGS = {
    "smoke": {"rows": 20_000, "rounds": 1},
    "full": {"rows": 1_000_000, "rounds": 3},
}
KEY = "bench-key"
BATCH = 5_000
GZIP_LEVEL = 1  # GridPulseClient's default
_ROWS = """
SELECT o.series_id, s.ba, s.type, s.subtype, o.units, o.ts, o.value, o.quality_flag, o.revision
FROM queue q CROSS JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts
JOIN series s ON s.series_id = o.series_id
WHERE q.state = 'pending' ORDER BY q.ts, q.series_id
"""
_RECEIVER = SimpleNamespace(cluster=None)  # set by --receiver-db postgres


def receiver_db() -> str | None:
    """A fresh PostgreSQL database for the next receiver, or None (its SQLite file)."""
    cluster = _RECEIVER.cluster
    return None if cluster is None else cluster.dsn(cluster.database())


_FIELDS = ("series_id", "ba", "type", "subtype", "units", "ts", "value", "quality_flag", "revision")


def stage_template(cache: Path, rows: int) -> tuple[Path, int]:
    """An outbox with ``rows`` pending rows (staged once by replay, then cached)."""
    info = c.replay_pages(cache, rows)
    database = Path(info["dir"]) / "pending.outbox"
    if not database.exists():
        c.log(f"staging {info['rows']} rows into {database}")
        scratch = database.with_suffix(".tmp")
        c.remove_db(scratch)
        with Store.open(scratch) as store:  # closing the last connection checkpoints
            run_fetch(
                c.config_for(scratch, Path(info["dir"])), store, ReplaySource(Path(info["dir"]))
            )
        scratch.rename(database)
    return database, info["rows"]


def batches(database: Path) -> Iterator[tuple[str, bytes, int]]:
    """(batch_id, gzip body, rows) of every batch our sender would send, in its order."""
    import zlib

    con = sqlite3.connect(database)
    cur = con.execute(_ROWS)
    while chunk := cur.fetchmany(BATCH):
        observations = [dict(zip(_FIELDS, r, strict=True)) for r in chunk]
        batch_id = batch_id_of((o["series_id"], o["ts"], o["revision"]) for o in observations)
        raw = encode_batch(batch_id, observations)
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        yield batch_id, packer.compress(raw) + packer.flush(), len(chunk)
    con.close()


def run_floor(work: Path, prepared: list[tuple[str, bytes, int]]) -> float:
    """POST the pre-built batches with a plain httpx loop to a fresh receiver."""
    scratch = Path(tempfile.mkdtemp(dir=work))
    with (
        running_receiver(scratch, api_key=KEY, db=receiver_db()) as receiver,
        httpx.Client(timeout=60) as http,
    ):
        url = receiver.url(INGEST_PATH)
        base = {
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        }

        def loop() -> None:
            for batch_id, body, _ in prepared:
                response = http.post(
                    url, content=body, headers={**base, "Idempotency-Key": batch_id}
                )
                response.raise_for_status()

        seconds, _ = c.timed(loop)
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def run_ours(work: Path, template: Path, rows: int) -> float:
    """run_send on a fresh copy of the pending outbox, to a fresh receiver."""
    seconds, _ = _send_once(work, template, rows)
    return seconds


def run_profile(work: Path, template: Path, rows: int) -> dict[str, Any]:
    """One more run of ours with each phase's CPU counted (see send_profile.py)."""
    import send_profile

    with send_profile.profiled() as phases:
        seconds, receiver_cpu = _send_once(work, template, rows)
    report = phases.report(rows)
    ours_cpu = sum(v["cpu_s"] for k, v in report.items() if k != "wait_acks")
    return {
        "seconds": round(seconds, 3),
        "phases": report,
        "ours_cpu_us_per_row": round(ours_cpu / rows * 1e6, 2),
        "receiver_cpu_us_per_row": (
            round(receiver_cpu / rows * 1e6, 2) if receiver_cpu is not None else None
        ),
        "note": "thread CPU per phase; post's wall less its CPU is waiting for the receiver",
    }


def _send_once(work: Path, template: Path, rows: int) -> tuple[float, float | None]:
    """Seconds of one run_send of ``rows`` pending rows, and the receiver's CPU seconds."""
    from send_profile import process_cpu

    scratch = Path(tempfile.mkdtemp(dir=work))
    database = scratch / "outbox.db"
    shutil.copyfile(template, database)
    with (
        running_receiver(scratch, api_key=KEY, db=receiver_db()) as receiver,
        httpx.Client(timeout=60) as http,
    ):
        cfg = c.config_for(database, base_url=receiver.base_url)
        sink = GridPulseSink(GridPulseClient(http, receiver.base_url, KEY))
        pid = receiver.proc.pid if receiver.proc is not None else None
        before = process_cpu(pid) if pid is not None else None
        with Store.open(database) as store:
            seconds, result = c.timed(lambda: run_send(cfg, store, sink))
        after = process_cpu(pid) if pid is not None else None
    if result.acked != rows:
        raise RuntimeError(f"send acked {result.acked} of {rows} rows")
    shutil.rmtree(scratch, ignore_errors=True)
    spent = after - before if after is not None and before is not None else None
    return seconds, spent


def run_postgres_sink(work: Path, template: Path, rows: int, cluster: Any) -> float:
    """run_send on a fresh copy of the pending outbox, through the direct PostgreSQL sink
    into a fresh database of ``cluster`` holding GridPulse's tables."""
    from outbox.sinks.postgres import PostgresSink
    from tests.pgschema import create_contract_schema

    scratch = Path(tempfile.mkdtemp(dir=work))
    database = scratch / "outbox.db"
    shutil.copyfile(template, database)
    dsn = cluster.dsn(cluster.database())
    create_contract_schema(dsn)
    cfg = c.config_for(database)
    sink = PostgresSink(dsn)
    try:
        with Store.open(database) as store:
            seconds, result = c.timed(lambda: run_send(cfg, store, sink))
    finally:
        sink.close()
    if result.acked != rows:
        raise RuntimeError(f"postgres sink acked {result.acked} of {rows} rows")
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


@contextlib.contextmanager
def postgres_cluster(wanted: bool) -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for ``--sink postgres`` (None without it)."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pgcluster import Cluster

    cluster = Cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def run_receiver_alone(work: Path, prepared: list[tuple[str, bytes, int]]) -> float:
    """The receiver's ingest work on every batch, in-process (no HTTP, no event loop)."""
    from outbox.receiver.app import _Receiver
    from outbox.receiver.db import ReceiverDB, to_url
    from outbox.receiver.faults import Faults

    scratch = Path(tempfile.mkdtemp(dir=work))
    db = ReceiverDB(to_url(receiver_db() or scratch / "receiver.db"))
    receiver = _Receiver(db, KEY, "auto", Faults())

    def loop() -> None:
        for batch_id, body, _ in prepared:
            receiver._ingest(body, "application/json", "gzip", batch_id, SimpleNamespace())

    try:
        seconds, _ = c.timed(loop)
    finally:
        db.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def hourly_requests(work: Path) -> dict[str, Any]:
    """EIA requests of one hourly fetch (5 BAs x all datasets) after a first fetch."""
    now = datetime(2025, 8, 22, 12, tzinfo=UTC)
    start = now - timedelta(days=14)
    rows = {
        route: synth.make_rows(route, synth.DEFAULT_RESPONDENTS, start, 14 * 24 + 2)
        for route in synth.ROUTES
    }
    database = work / "hourly.db"
    c.remove_db(database)
    with FakeEIA(rows, api_key=KEY) as fake, httpx.Client(timeout=60) as http:
        base = c.config_for(database)
        cfg = base.model_copy(
            update={
                "eia": base.eia.model_copy(
                    update={"base_url": fake.base_url, "history_start": start}
                )
            }
        )
        client = EIAClient(http, fake.base_url, KEY, max_per_second=1000, max_per_hour=100_000)
        with Store.open(database) as store:
            first = run_fetch(cfg, store, client, now=now)
            before = len(fake.requests)
            hourly = run_fetch(cfg, store, client, now=now + timedelta(hours=1))
        made = fake.requests[before:]
    per_route = {
        route.rsplit("/", 1)[-1]: sum(f"/{route}/data" in target for target in made)
        for route in synth.ROUTES
    }
    return {
        "bas": len(synth.DEFAULT_RESPONDENTS),
        "datasets": "all",
        "first_run_requests": first.requests,
        "hourly_requests": len(made),
        "hourly_rows": hourly.rows,
        "per_route": per_route,
        "target": 3,
    }


def main() -> None:
    """Stage N rows once, then alternate floor and ours; print the figures."""
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="one more run, CPU per phase")
    p.add_argument("--sink", choices=("gridpulse", "postgres"), default="gridpulse")
    p.add_argument("--receiver-db", choices=("sqlite", "postgres"), default="sqlite")
    args = p.parse_args()
    if args.receiver_db == "postgres":
        from outbox.testing.pgcluster import Cluster

        _RECEIVER.cluster = Cluster.start()
    try:
        run(args)
    finally:
        if _RECEIVER.cluster is not None:
            _RECEIVER.cluster.stop()


def run(args: Any) -> None:
    """The rounds and the figures of :func:`main`."""
    cfg = SETTINGS[args.size]
    rounds = args.rounds or cfg["rounds"]
    template, n = stage_template(args.cache, args.rows or cfg["rows"])
    c.log("building the floor's batches")
    prepared = list(batches(template))
    assert sum(b[2] for b in prepared) == n
    runs: dict[str, list[float]] = {"floor": [], "ours": [], "receiver": [], "pg_sink": []}
    with c.workdir(args.workdir) as work, postgres_cluster(args.sink == "postgres") as pg:
        for i in range(rounds):
            c.log(f"round {i + 1}/{rounds}: {n} rows in {len(prepared)} batches")
            runs["floor"].append(run_floor(work, prepared))
            runs["ours"].append(run_ours(work, template, n))
            runs["receiver"].append(run_receiver_alone(work, prepared))
            if pg is not None:
                runs["pg_sink"].append(run_postgres_sink(work, template, n, pg))
        hourly = hourly_requests(work)
        profile = run_profile(work, template, n) if args.profile else None
    per_round = [o / f for o, f in zip(runs["ours"], runs["floor"], strict=True)]
    result = {
        "benchmark": "send",
        "size": args.size,
        "receiver_db": args.receiver_db,
        "rows": n,
        "batches": len(prepared),
        "batch_rows": BATCH,
        "gzip_bytes": sum(len(b[1]) for b in prepared),
        "rounds": rounds,
        "floor": c.figure(n, runs["floor"]),
        "ours": c.figure(n, runs["ours"]),
        "receiver_alone": c.figure(n, runs["receiver"], note="in-process ingest, no HTTP"),
        "ratios": {
            "ours_over_floor": round(c.median(per_round), 3),
            "receiver_alone_over_floor": round(
                c.median([r / f for r, f in zip(runs["receiver"], runs["floor"], strict=True)]), 3
            ),
        },
        "hourly": hourly,
    }
    if profile is not None:
        result["profile"] = profile
    if runs["pg_sink"]:
        result["postgres_sink"] = c.figure(n, runs["pg_sink"], note="direct sink, PostgreSQL")
        result["ratios"]["postgres_sink_over_ours"] = round(
            c.median([p / o for p, o in zip(runs["pg_sink"], runs["ours"], strict=True)]), 3
        )
    c.emit(result)


if __name__ == "__main__":
    main()
