"""The direct PostgreSQL sink against a real throwaway cluster, in GridPulse's schema.

Each test gets a fresh database holding the contract's tables (tests/pgschema.py); the
sink is driven through its port (prepare/send) or, for row states, by the real send
stage over a real migrated outbox in tmp_path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from factories import obs, series_row, ts
from pgschema import create_contract_schema, held

from outbox.config import Config
from outbox.errors import SinkError, SinkTransientError
from outbox.ports import Batch
from outbox.sinks.postgres import UNKNOWN_SERIES, PostgresSink
from outbox.stages.send import run_send
from outbox.store import Store

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Row:
    series_id: str
    ts: str
    value: float | None
    units: str = "MW"
    quality_flag: str = "good"
    revision: str = "r1"
    ba: str = "PJM"
    type: str = "demand"
    subtype: str | None = None


@pytest.fixture
def dsn(pg_cluster) -> str:
    url = pg_cluster.dsn(pg_cluster.database())
    create_contract_schema(url)
    return url


@pytest.fixture
def sink(dsn: str) -> Iterator[PostgresSink]:
    s = PostgresSink(dsn)
    yield s
    s.close()


def send(sink: PostgresSink, rows: list[Row]):
    return sink.send(sink.prepare(Batch(rows)))


def execute(dsn: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def test_a_batch_creates_its_series_and_upserts_its_rows(sink: PostgresSink, dsn: str) -> None:
    rows = [Row("EIA.PJM.demand", ts(h), 100.0 + h) for h in range(3)]
    rows.append(
        Row(
            "EIA.CAISO.generation.solar", ts(0), 7.5, ba="CAISO", type="generation", subtype="solar"
        )
    )
    outcome = send(sink, rows)
    assert (outcome.accepted, outcome.rejected) == (4, ())
    assert held(dsn) == {
        **{("EIA.PJM.demand", ts(h)): (100.0 + h, "good") for h in range(3)},
        ("EIA.CAISO.generation.solar", ts(0)): (7.5, "good"),
    }
    listing = {s["series_id"]: s for s in sink.list_series()}
    assert listing["EIA.PJM.demand"]["latest_ts"] == ts(2)
    assert listing["EIA.CAISO.generation.solar"]["subtype"] == "solar"
    assert sink.latest("EIA.PJM.demand") == (ts(2), None)
    assert sink.latest("EIA.MISO.demand") is None


def test_a_revised_value_replaces_the_old_one_and_a_resend_is_harmless(
    sink: PostgresSink, dsn: str
) -> None:
    send(sink, [Row("EIA.PJM.demand", ts(0), 100.0), Row("EIA.PJM.demand", ts(1), 5.0)])
    before = _xmin(dsn, ts(1))
    outcome = send(
        sink,
        [
            Row("EIA.PJM.demand", ts(0), 123.456, quality_flag="estimated", revision="r2"),
            Row("EIA.PJM.demand", ts(1), 5.0),
        ],
    )
    assert outcome.accepted == 2
    assert held(dsn) == {
        ("EIA.PJM.demand", ts(0)): (123.456, "estimated"),
        ("EIA.PJM.demand", ts(1)): (5.0, "good"),
    }
    assert _xmin(dsn, ts(1)) == before, "an unchanged row is not rewritten"


def _xmin(dsn: str, when: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT xmin::text FROM observations WHERE ts = %s::timestamptz", (when,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_rows_the_database_refuses_are_refused_with_its_reason(
    sink: PostgresSink, dsn: str
) -> None:
    execute(dsn, "ALTER TABLE observations ADD CONSTRAINT demand_not_negative CHECK (value >= 0)")
    rows = [Row("EIA.PJM.demand", ts(h), float(h)) for h in range(40)]
    rows[7] = Row("EIA.PJM.demand", ts(7), -5.0)
    rows[30] = Row("EIA.PJM.demand", ts(30), 1e10)  # past numeric(12,3)
    outcome = send(sink, rows)
    assert outcome.accepted == 38
    refused = {r.index: r for r in outcome.rejected}
    assert sorted(refused) == [7, 30]
    assert refused[7].code == "CHECK_VIOLATION"
    assert "demand_not_negative" in refused[7].message
    assert refused[30].code == "NUMERIC_VALUE_OUT_OF_RANGE"
    assert "numeric field overflow" in refused[30].message
    assert set(held(dsn)) == {("EIA.PJM.demand", ts(h)) for h in range(40) if h not in (7, 30)}


def test_a_fixed_catalogue_refuses_unknown_series(dsn: str) -> None:
    open_sink = PostgresSink(dsn)
    send(open_sink, [Row("EIA.PJM.demand", ts(0), 1.0)])
    open_sink.close()
    fixed = PostgresSink(dsn, catalog="fixed")
    try:
        outcome = send(
            fixed,
            [Row("EIA.PJM.demand", ts(1), 2.0), Row("EIA.MISO.demand", ts(1), 3.0, ba="MISO")],
        )
    finally:
        fixed.close()
    assert outcome.accepted == 1
    (refusal,) = outcome.rejected
    assert (refusal.index, refusal.code) == (1, UNKNOWN_SERIES)
    assert "EIA.MISO.demand" in refusal.message
    assert set(held(dsn)) == {("EIA.PJM.demand", ts(0)), ("EIA.PJM.demand", ts(1))}


def test_a_role_that_may_not_create_series_refuses_their_rows_alone(dsn: str, pg_cluster) -> None:
    send_sink = PostgresSink(dsn)
    send(send_sink, [Row("EIA.PJM.demand", ts(0), 1.0)])
    send_sink.close()
    execute(dsn, "DROP ROLE IF EXISTS writer")
    execute(dsn, "CREATE ROLE writer LOGIN")
    execute(dsn, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO writer")
    execute(dsn, "GRANT INSERT, UPDATE ON observations TO writer")
    writer = PostgresSink(dsn.replace("outbox_test@", "writer@"))
    try:
        outcome = send(
            writer,
            [Row("EIA.MISO.demand", ts(1), 3.0, ba="MISO"), Row("EIA.PJM.demand", ts(1), 2.0)],
        )
    finally:
        writer.close()
        execute(dsn, "DROP OWNED BY writer")
        execute(dsn, "DROP ROLE writer")
    assert outcome.accepted == 1
    (refusal,) = outcome.rejected
    assert refusal.index == 0
    assert refusal.code == "INSUFFICIENT_PRIVILEGE"
    assert "permission denied" in refusal.message


def test_a_closed_port_and_a_lost_connection_are_transient(sink: PostgresSink, dsn: str) -> None:
    from tests.pgcluster import free_port

    nowhere = PostgresSink(f"postgresql://u:hunter2secret@127.0.0.1:{free_port()}/x")
    with pytest.raises(SinkTransientError) as caught:
        send(nowhere, [Row("EIA.PJM.demand", ts(0), 1.0)])
    assert "hunter2secret" not in str(caught.value)
    assert not nowhere.health()

    send(sink, [Row("EIA.PJM.demand", ts(0), 1.0)])
    execute(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'gridpulse-outbox'",
    )
    with pytest.raises(SinkTransientError):
        send(sink, [Row("EIA.PJM.demand", ts(1), 2.0)])
    assert send(sink, [Row("EIA.PJM.demand", ts(1), 2.0)]).accepted == 1  # reconnected
    assert sink.health()


def test_a_database_without_the_schema_stops_the_run(pg_cluster) -> None:
    empty = PostgresSink(pg_cluster.dsn(pg_cluster.database()))
    try:
        with pytest.raises(SinkError, match="no observations table") as caught:
            send(empty, [Row("EIA.PJM.demand", ts(0), 1.0)])
    finally:
        empty.close()
    assert not isinstance(caught.value, SinkTransientError)


def test_the_send_stage_settles_rows_by_the_database(tmp_path: Path, dsn: str) -> None:
    """Through the real send stage: acked rows are held, the refused one is dead with the
    database's reason, and a revision staged later replaces the value."""
    execute(dsn, "ALTER TABLE observations ADD CONSTRAINT demand_not_negative CHECK (value >= 0)")
    db = tmp_path / "outbox.db"
    config = Config(database=str(db))
    sid = "EIA.PJM.demand"
    with Store.open(db) as store:
        rows = [obs(sid, h, float(h)) for h in range(10)] + [obs(sid, 10, -1.0)]
        store.staging.stage(rows, series_rows=[series_row(sid)])
        sink = PostgresSink(dsn)
        try:
            result = run_send(config, store, sink)
            assert (result.acked, result.rejected) == (10, 1)
            store.staging.stage([obs(sid, 3, 333.0)])
            assert run_send(config, store, sink).acked == 1
        finally:
            sink.close()
    with sqlite3.connect(db) as con:
        dead = con.execute(
            "SELECT ts, last_error_code, last_error FROM row_states WHERE state = 'dead'"
        ).fetchall()
    assert len(dead) == 1
    assert dead[0][0] == ts(10)
    assert dead[0][1] == "CHECK_VIOLATION"
    assert "demand_not_negative" in dead[0][2]
    expected = {(sid, ts(h)): (float(h), "good") for h in range(10)}
    expected[(sid, ts(3))] = (333.0, "good")
    assert held(dsn) == expected


def test_the_sink_writes_into_the_schema_the_receiver_creates(pg_cluster) -> None:
    """One schema, two writers: rows the direct sink commits into a database whose tables
    the reference receiver created read back through the receiver exactly, revisions too."""
    from outbox.receiver.db import ReceiverDB

    name = pg_cluster.database()
    receiver = ReceiverDB(pg_cluster.url(name))  # creates GridPulse's tables
    sink = PostgresSink(pg_cluster.dsn(name))
    try:
        rows = [Row("EIA.PJM.demand", ts(h), 100.5 + h, revision=f"r{h}") for h in range(3)]
        rows.append(
            Row("EIA.PJM.interchange.MISO", ts(0), -42.25, type="interchange", subtype="MISO")
        )
        assert send(sink, rows).accepted == 4
        revised = [Row("EIA.PJM.demand", ts(1), 999.0, quality_flag="estimated", revision="r9")]
        assert send(sink, revised).accepted == 1
        page, _ = receiver.observations("EIA.PJM.demand", ts(0), ts(3), 10) or ([], None)
        assert [(o["ts"], o["value"], o["quality_flag"]) for o in page] == [
            (ts(0), 100.5, "good"),
            (ts(1), 999.0, "estimated"),
            (ts(2), 102.5, "good"),
        ]
        assert receiver.latest("EIA.PJM.demand") == (ts(2), "r2")
        listing = {s["series_id"]: s for s in receiver.list_series()}
        assert listing["EIA.PJM.interchange.MISO"]["subtype"] == "MISO"
        assert sink.latest("EIA.PJM.demand") == receiver.latest("EIA.PJM.demand")
    finally:
        sink.close()
        receiver.close()


def test_a_quality_flag_of_an_enum_or_domain_type_is_written(pg_cluster) -> None:
    """GridPulse's quality_flag may be an enum or a domain: the batch's COPY lands in
    columns of the target's own types, so the one upsert from them type-checks."""
    for ddl in (
        "CREATE TYPE quality AS ENUM ('good', 'estimated', 'missing')",
        "CREATE DOMAIN quality AS text CHECK (VALUE IN ('good', 'estimated', 'missing'))",
    ):
        dsn = pg_cluster.dsn(pg_cluster.database())
        create_contract_schema(dsn)
        execute(dsn, ddl)
        execute(
            dsn,
            "ALTER TABLE observations DROP CONSTRAINT observations_quality_flag_check, "
            "ALTER COLUMN quality_flag TYPE quality USING quality_flag::quality",
        )
        sink = PostgresSink(dsn)
        try:
            rows = [Row("EIA.PJM.demand", ts(h), float(h)) for h in range(5)]
            rows[2] = Row("EIA.PJM.demand", ts(2), 2.0, quality_flag="estimated")
            rows[3] = Row("EIA.PJM.demand", ts(3), 3.0, quality_flag="bogus")
            outcome = send(sink, rows)
        finally:
            sink.close()
        assert outcome.accepted == 4, ddl
        ((refused),) = outcome.rejected
        assert refused.index == 3
        assert held(dsn)[("EIA.PJM.demand", ts(2))] == (2.0, "estimated")
        assert set(held(dsn)) == {("EIA.PJM.demand", ts(h)) for h in (0, 1, 2, 4)}


def test_list_series_gives_each_series_latest_ts(sink: PostgresSink, dsn: str) -> None:
    """The listing (what first-start watermarks read: series_id and latest_ts) matches a
    plain GROUP BY over every observation; a series without rows has no latest_ts."""
    rows = [Row("EIA.PJM.demand", ts(h), float(h)) for h in (5, 1, 9)]
    rows += [Row("EIA.MISO.demand", ts(h), 1.0, ba="MISO") for h in (2, 3)]
    rows.append(Row("EIA.PJM.generation.wind", ts(4), 1.0, type="generation", subtype="wind"))
    send(sink, rows)
    execute(
        dsn,
        "INSERT INTO series (ba_id, type, subtype, units, eia_series_id) "
        "SELECT id, 'interchange', 'SWPP', 'MW', 'EIA.PJM.interchange.SWPP' "
        "FROM balancing_authorities WHERE code = 'PJM'",
    )
    listing = sink.list_series()
    assert [s["series_id"] for s in listing] == sorted(s["series_id"] for s in listing)
    assert {s["series_id"]: s["latest_ts"] for s in listing} == {
        "EIA.PJM.demand": ts(9),
        "EIA.MISO.demand": ts(3),
        "EIA.PJM.generation.wind": ts(4),
        "EIA.PJM.interchange.SWPP": None,
    }
    wind = next(s for s in listing if s["series_id"] == "EIA.PJM.generation.wind")
    assert wind == {
        "series_id": "EIA.PJM.generation.wind",
        "ba": "PJM",
        "type": "generation",
        "subtype": "wind",
        "units": "MW",
        "latest_ts": ts(4),
    }, "the unused row count is not computed"


@pytest.mark.parametrize(("seconds", "shown"), [(0.0004, "1ms"), (2.5, "2500ms"), (60.0, "1min")])
def test_the_statement_timeout_reaches_the_server_and_is_never_zero(
    dsn: str, seconds: float, shown: str
) -> None:
    """A tiny statement_timeout_seconds is 1 ms, not 0 (PostgreSQL's "no timeout")."""
    sink = PostgresSink(dsn, statement_timeout_seconds=seconds)
    try:
        found = sink._connection().execute("SHOW statement_timeout").fetchone()
    finally:
        sink.close()
    assert found == (shown,)


def test_a_serialization_failure_defers_the_batch_like_a_503(tmp_path: Path, dsn: str) -> None:
    """SQLSTATE 40001 (here raised by a trigger, as the server does under SERIALIZABLE):
    the batch is rolled back and its rows deferred, not refused; the next send delivers."""
    from outbox.stages.send import SendFailed

    execute(
        dsn,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; END $$; "
        "CREATE TRIGGER refuse BEFORE INSERT ON observations "
        "FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    db = tmp_path / "outbox.db"
    config = Config(database=str(db))
    sid = "EIA.PJM.demand"
    with Store.open(db) as store:
        store.staging.stage(
            [obs(sid, h, float(h)) for h in range(3)], series_rows=[series_row(sid)]
        )
        sink = PostgresSink(dsn)
        try:
            with pytest.raises(SendFailed, match="could not serialize"):
                run_send(config, store, sink)
            with sqlite3.connect(db) as con:
                found = con.execute(
                    "SELECT state, count(*), count(next_attempt_at) FROM row_states GROUP BY state"
                ).fetchall()
            assert found == [("pending", 3, 3)], "deferred with a next attempt time, none dead"
            assert held(dsn) == {}
            execute(dsn, "DROP TRIGGER refuse ON observations")
            with sqlite3.connect(db) as con:
                con.execute("UPDATE queue SET next_attempt_at = NULL")
            assert run_send(config, store, sink).acked == 3
        finally:
            sink.close()


def test_a_statement_timeout_is_transient(sink: PostgresSink, dsn: str) -> None:
    """A statement cancelled by statement_timeout (57014), here waiting on a lock another
    session holds, is a SinkTransientError (the batch deferred like a 503)."""
    import psycopg

    send(sink, [Row("EIA.PJM.demand", ts(0), 1.0)])
    slow = PostgresSink(dsn, statement_timeout_seconds=0.2)
    try:
        send(slow, [Row("EIA.PJM.demand", ts(1), 1.0)])
        with psycopg.connect(dsn) as holder:
            holder.execute("LOCK TABLE observations IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(SinkTransientError, match="statement timeout"):
                send(slow, [Row("EIA.PJM.demand", ts(2), 2.0)])
        assert send(slow, [Row("EIA.PJM.demand", ts(2), 2.0)]).accepted == 1  # reconnected
    finally:
        slow.close()


def test_the_configured_timeouts_reach_the_driver(dsn: str) -> None:
    """sink.connect_timeout_seconds and sink.statement_timeout_seconds, through the
    wiring, are the connection's connect_timeout and the server's statement_timeout."""
    from outbox.config import load_config
    from outbox.wiring import postgres_sink

    config = load_config(
        env={
            "OUTBOX__SINK__KIND": "postgres",
            "OUTBOX_SINK_URL": dsn,
            "OUTBOX__SINK__CONNECT_TIMEOUT_SECONDS": "3",
            "OUTBOX__SINK__STATEMENT_TIMEOUT_SECONDS": "2.5",
        }
    )
    sink = postgres_sink(config)
    try:
        conn = sink._connection()
        assert conn.info.get_parameters()["connect_timeout"] == "3"
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2500ms",)
    finally:
        sink.close()


def test_a_series_held_under_another_id_refuses_its_rows(sink: PostgresSink, dsn: str) -> None:
    """GridPulse holds PJM/generation/wind under another eia_series_id: creating ours hits
    UNIQUE (ba_id, type, subtype), so its rows are refused as SERIES_CONFLICT; the rest
    of the batch is written."""
    execute(
        dsn,
        "INSERT INTO balancing_authorities (code, name) VALUES ('PJM', 'PJM'); "
        "INSERT INTO series (ba_id, type, subtype, units, eia_series_id) "
        "SELECT id, 'generation', 'wind', 'MW', 'LEGACY.PJM.WND' FROM balancing_authorities",
    )
    wind = {"type": "generation", "subtype": "wind"}
    outcome = send(
        sink,
        [
            Row("EIA.PJM.demand", ts(0), 1.0),
            Row("EIA.PJM.generation.wind", ts(0), 2.0, **wind),
            Row("EIA.PJM.generation.wind", ts(1), 3.0, **wind),
        ],
    )
    assert outcome.accepted == 1
    assert [(r.index, r.code) for r in outcome.rejected] == [
        (1, "SERIES_CONFLICT"),
        (2, "SERIES_CONFLICT"),
    ]
    assert "PJM/generation/wind" in outcome.rejected[0].message
    assert held(dsn) == {("EIA.PJM.demand", ts(0)): (1.0, "good")}
