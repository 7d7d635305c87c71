"""The reference receiver on PostgreSQL: the contract's types, one statement per batch, the
same answers as on SQLite, timescaledb's two branches, and its start-up errors.

Real PostgreSQL (a throwaway cluster, a fresh database per test) for everything but the
"timescaledb available" branch, which this machine cannot run: its statements are checked.
"""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from durability import outbox
from factories import wire_observation
from sqlalchemy import event
from starlette.exceptions import StarletteDeprecationWarning

from outbox.receiver import create_app, seed_catalog
from outbox.receiver import pg as receiver_pg
from outbox.receiver.db import ReceiverDB, parse_series_id, to_url
from outbox.sample.receiver import receiver_batches
from outbox.sinks.gridpulse import batch_id_of, encode_batch
from outbox.testing.pgcluster import free_port

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning
    )
    from starlette.testclient import TestClient

KEY = "pg-receiver-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INGEST = "/api/v1/data/observations"
SERIES = "/api/v1/data/series"


def post(client: TestClient, rows: list[dict[str, Any]], batch_id: str | None = None) -> Any:
    batch_id = batch_id or batch_id_of((r["series_id"], r["ts"], r["revision"]) for r in rows)
    body = gzip.compress(encode_batch(batch_id, rows), 1)
    headers = {
        **AUTH,
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "Idempotency-Key": batch_id,
    }
    return client.post(INGEST, content=body, headers=headers)


def read_all(client: TestClient) -> dict[str, Any]:
    """Everything the read endpoints answer, as JSON (the listing, each series' pages)."""
    listing = client.get(SERIES, headers=AUTH).json()
    found: dict[str, Any] = {"series": listing}
    for item in listing["series"]:
        sid = item["series_id"]
        found[sid + "/latest"] = client.get(f"{SERIES}/{sid}/latest", headers=AUTH).json()
        pages, start = [], "2000-01-01T00:00:00Z"
        while start is not None:  # small pages would need PAGE_ROWS rows; one page here
            page = client.get(
                f"{SERIES}/{sid}/observations",
                params={"start": start, "end": "2100-01-01T00:00:00Z"},
                headers=AUTH,
            ).json()
            pages.append(page)
            start = page["next"]
        found[sid + "/observations"] = pages
    return found


@pytest.fixture
def pg_client(pg_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(to_url(pg_url), KEY)) as client:
        yield client


def scenario(client: TestClient) -> list[Any]:
    """A batch with a rejection, its retry, a revision, a duplicate key, a 409: the answers."""
    first = [
        wire_observation(0),
        wire_observation(1, value=1234.5678),  # rounded to numeric(12,3) on both
        wire_observation(2, value=None, quality_flag="missing"),
        wire_observation(3, value=-5.0),  # demand below zero: a per-row rejection
        wire_observation(0, "EIA.CAISO.generation.solar", value=0),
        wire_observation(4, value=7, revision="int"),
    ]
    answers = [post(client, first, "b-1"), post(client, first, "b-1")]  # an idempotent retry
    revised = [wire_observation(1, value=99.25, revision="r1-v2")]
    answers.append(post(client, revised, "b-2"))
    twice = [wire_observation(5, revision="a"), wire_observation(5, value=55.5, revision="b")]
    answers.append(post(client, twice, "b-3"))  # one key twice in a batch: the last wins
    answers.append(post(client, revised + revised, "b-1"))  # same id, another body
    return [(a.status_code, a.json()) for a in answers]


@pytest.mark.postgres
def test_same_answers_and_reads_as_sqlite(pg_client: TestClient, tmp_path: Path) -> None:
    with TestClient(create_app(to_url(tmp_path / "r.db"), KEY)) as sqlite_client:
        expected = scenario(sqlite_client)
        expected_reads = read_all(sqlite_client)
    assert scenario(pg_client) == expected
    reads = read_all(pg_client)
    assert reads == expected_reads
    observations = reads["EIA.PJM.demand/observations"][0]["observations"]
    by_ts = {o["ts"]: o for o in observations}
    assert by_ts["2025-08-22T01:00:00Z"]["value"] == 99.25  # the revision that won
    assert by_ts["2025-08-22T01:00:00Z"]["revision"] == "r1-v2"
    assert by_ts["2025-08-22T05:00:00Z"]["revision"] == "b"
    assert "2025-08-22T03:00:00Z" not in by_ts
    assert [s for s, _ in expected] == [200, 200, 200, 200, 409]
    assert expected[0][1]["rejected"][0]["index"] == 3


@pytest.mark.postgres
def test_contract_types_and_one_statement_per_batch(pg_url: str) -> None:
    db = ReceiverDB(to_url(pg_url))
    seen: list[tuple[str, bool]] = []

    def record(_conn: Any, _cursor: Any, sql: str, _params: Any, _ctx: Any, many: bool) -> None:
        seen.append((sql, many))

    event.listen(db.engine, "before_cursor_execute", record)
    rows = [
        ("EIA.PJM.demand", wire_observation(i)["ts"], 1.5 * i, "good", f"r{i}") for i in range(500)
    ]
    spec = parse_series_id("EIA.PJM.demand")
    try:
        db.ingest("b", "d", rows, {spec.series_id: spec}, (500, 500, 0), "2025-01-01T00:00:00Z")
        stored = db.observations(
            "EIA.PJM.demand", "2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z", 1000
        )
    finally:
        db.close()
    upserts = [(sql, many) for sql, many in seen if "INSERT INTO observations" in sql]
    assert upserts == [(receiver_pg.UPSERT_SQL, False)]
    assert (
        "unnest" in upserts[0][0]
        and "WHERE observations.revision IS DISTINCT FROM" in upserts[0][0]
    )
    assert stored is not None and len(stored[0]) == 500
    assert stored[0][3] == {
        "ts": "2025-08-22T03:00:00Z",
        "value": 4.5,
        "quality_flag": "good",
        "revision": "r3",
    }
    with psycopg.connect(pg_url.replace("+psycopg", "")) as con:
        types = dict(
            con.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'observations'::regclass AND attnum > 0"
            ).fetchall()
        )
        pkey = con.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'observations'::regclass AND contype = 'p'"
        ).fetchone()
    assert types["ts"] == "timestamp with time zone"
    assert types["value"] == "numeric(12,3)"
    assert pkey == ("PRIMARY KEY (series_id, ts)",)


@pytest.mark.postgres
def test_resent_revision_leaves_its_row_alone(pg_client: TestClient, pg_url: str) -> None:
    """The upsert's WHERE: the same revision again does not rewrite the stored row."""
    rows = [wire_observation(0), wire_observation(1)]
    assert post(pg_client, rows, "b-1").status_code == 200
    with psycopg.connect(pg_url.replace("+psycopg", "")) as con:
        before = con.execute("SELECT ts, xmin::text FROM observations ORDER BY ts").fetchall()
    again = post(pg_client, [*rows, wire_observation(2)], "b-2")
    assert again.json()["accepted"] == 3
    with psycopg.connect(pg_url.replace("+psycopg", "")) as con:
        after = con.execute("SELECT ts, xmin::text FROM observations ORDER BY ts").fetchall()
    assert after[:2] == before and len(after) == 3
    assert receiver_batches(pg_url)["b-2"]["accepted"] == 3


@pytest.mark.postgres
def test_without_timescaledb_plain_tables_said_once(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    seed_catalog(to_url(pg_url), ["EIA.PJM.demand"])
    with caplog.at_level(logging.INFO, logger="outbox.receiver"):
        ReceiverDB(to_url(pg_url)).close()
    said = [r.getMessage() for r in caplog.records if r.name == "outbox.receiver.pg"]
    assert said == [receiver_pg.PLAIN_TABLES]
    with psycopg.connect(pg_url.replace("+psycopg", "")) as con:
        assert con.execute(receiver_pg.AVAILABLE_SQL).fetchone() is None
        kind = con.execute("SELECT relkind FROM pg_class WHERE relname = 'observations'")
        assert kind.fetchone() == ("r",)


class _Recorder:
    """A stand-in connection: answers the availability probe, records what runs."""

    def __init__(self, available: bool) -> None:
        self.available = available
        self.ran: list[str] = []

    def exec_driver_sql(self, sql: str) -> Any:
        self.ran.append(sql)
        found = self.available and sql == receiver_pg.AVAILABLE_SQL
        return type("R", (), {"first": lambda _self: (1,) if found else None})()


def test_with_timescaledb_the_extension_and_a_hypertable_on_ts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = _Recorder(available=True)
    with caplog.at_level(logging.INFO, logger="outbox.receiver"):
        assert receiver_pg.setup_timescale(conn) is True  # type: ignore[arg-type]
    assert conn.ran == [
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
        "CREATE EXTENSION IF NOT EXISTS timescaledb",
        "SELECT create_hypertable('observations', 'ts', if_not_exists => TRUE,"
        " migrate_data => TRUE)",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "timescaledb: observations is a hypertable on ts"
    ]
    plain = _Recorder(available=False)
    assert receiver_pg.setup_timescale(plain, announce=False) is False  # type: ignore[arg-type]
    assert plain.ran == [receiver_pg.AVAILABLE_SQL]


def test_postgres_urls_map_to_psycopg_3() -> None:
    for url in ("postgresql://u@h/d", "postgres://u@h/d", "postgresql+psycopg://u@h/d"):
        assert to_url(url) == "postgresql+psycopg://u@h/d"
    assert to_url("postgresql://u:p%40ss@h:5433/d") == "postgresql+psycopg://u:p%40ss@h:5433/d"
    assert receiver_pg.masked("postgresql://u:secret@h/d") == "postgresql://u:***@h/d"
    with pytest.raises(receiver_pg.ReceiverDatabaseError, match="psycopg 3"):
        to_url("postgresql+psycopg2://u:secret@h/d")


def receiver_cli(*args: str, block_driver: bool = False) -> subprocess.CompletedProcess[str]:
    """``outbox receiver ...`` in a subprocess; ``block_driver`` hides psycopg from it."""
    hidden = "import sys\nsys.modules['psycopg'] = None" if block_driver else ""
    argv = ["receiver", "--port", "0", "--api-key", "k", *args]
    return outbox(*argv, env=dict(os.environ), timeout=60, prelude=hidden)


def test_missing_driver_is_one_line_naming_the_extra() -> None:
    done = receiver_cli("--db", "postgresql://u:secret@127.0.0.1/d", block_driver=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "pip install 'gridpulse-outbox[postgres]'" in lines[0]
    assert "secret" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://gp:s3cret-pw@127.0.0.1:{port}/gridpulse",  # nothing listens there
        "postgresql+psycopg2://gp:s3cret-pw@127.0.0.1:{port}/gridpulse",
        "postgresql://gp:s3cret-pw@127.0.0.1:notaport/gridpulse",
    ],
)
def test_unusable_url_is_one_line_with_the_password_masked(url: str) -> None:
    done = receiver_cli("--db", url.format(port=free_port()))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: receiver: ")
    assert "s3cret-pw" not in done.stderr + done.stdout
    if "notaport" not in url:
        assert "***@127.0.0.1" in lines[0]  # (the CLI masks the user name too)


def test_resent_revision_leaves_its_row_alone_on_sqlite_too(tmp_path: Path) -> None:
    """The SQLite receiver's upsert has the same WHERE: a resend rewrites nothing."""
    import sqlite3

    db = tmp_path / "receiver.db"
    rows = [wire_observation(0), wire_observation(1)]
    with TestClient(create_app(to_url(db), KEY)) as client:
        assert post(client, rows, "b-1").status_code == 200
        with sqlite3.connect(db) as con:
            con.execute("UPDATE observations SET received_at = 'marked'")
        assert post(client, [*rows, wire_observation(2)], "b-2").json()["accepted"] == 3
        revised = dict(rows[1], value=rows[1]["value"] + 1, revision="r-new")
        assert post(client, [revised], "b-3").json()["accepted"] == 1
    with sqlite3.connect(db) as con:
        got = con.execute(
            "SELECT ts, received_at != 'marked' FROM observations ORDER BY ts"
        ).fetchall()
    assert [changed for _, changed in got] == [0, 1, 1]


@pytest.mark.parametrize(
    "url",
    [
        "mysql://gp:s3cret-pw@127.0.0.1:1/gridpulse",
        "oracle://gp:s3cret-pw@127.0.0.1:1/gridpulse",
        "foo://gp:s3cret-pw@127.0.0.1/gridpulse",
        "sqlite:////nonexistent/dir/x.db",
    ],
)
@pytest.mark.parametrize("entry", ["outbox receiver", "python -m outbox.receiver"])
def test_another_database_or_an_unopenable_file_is_one_line_exit_2(url: str, entry: str) -> None:
    """Another database, a dialect SQLAlchemy does not know, a SQLite file whose directory
    is missing: one line, exit 2, the password masked (it was a traceback and exit 1)."""
    if entry == "outbox receiver":
        done = receiver_cli("--db", url)
    else:
        argv = [sys.executable, "-m", "outbox.receiver", "--port", "0", "--api-key", "k"]
        done = subprocess.run(
            [*argv, "--db", url], capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "receiver: " in lines[0]
    assert "s3cret-pw" not in done.stderr + done.stdout
