"""Migrations: every command creates the schema through Alembic; up/down/up has no drift."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from factories import obs, series_row

import outbox.store.migrate as migrate_mod
from outbox.errors import StoreError
from outbox.store import ProgressUpdate, Store
from outbox.store.headschema import migrated
from outbox.store.migrate import (
    HEAD_SCHEMA,
    alembic_head,
    downgrade,
    head_revision,
    head_schema_sql,
    migrations_dir,
    scanned_head,
    upgrade,
)
from outbox.store.schema import metadata

TABLES = {
    "observations",
    "queue",
    "ack_minutes",
    "pages",
    "series",
    "watermarks",
    "stream_progress",
    "runs",
    "checked_gaps",
    "meta",
}
VIEWS = {"pending", "dead", "series_status", "row_states"}


def _objects(path: Path) -> dict[str, set[str]]:
    con = sqlite3.connect(path)
    rows = con.execute("SELECT type, name FROM sqlite_master").fetchall()
    con.close()
    out: dict[str, set[str]] = {}
    for kind, name in rows:
        out.setdefault(kind, set()).add(name)
    return out


def _drift(store: Store) -> list:
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_open_creates_schema_at_head(store: Store, db_path: Path) -> None:
    assert store.schema_version() == head_revision()
    objects = _objects(db_path)
    assert objects["table"] >= TABLES
    assert objects["view"] >= VIEWS
    assert {"ix_queue_dead", "ix_queue_deferred"} <= objects["index"]
    assert {"tr_observations_queued", "tr_observations_requeued"} <= objects["trigger"]
    assert {"tr_observations_forgotten", "tr_observations_revised"} <= objects["trigger"]
    assert _drift(store) == []


def test_upgrade_downgrade_upgrade_no_drift(store: Store, db_path: Path) -> None:
    downgrade(store, "base")
    assert TABLES.isdisjoint(_objects(db_path).get("table", set()))
    upgrade(store)
    assert store.schema_version() == head_revision()
    assert _drift(store) == []
    assert _objects(db_path)["view"] >= VIEWS


def _index_columns(path: Path, name: str) -> list[str]:
    con = sqlite3.connect(path)
    cols = [r[2] for r in con.execute(f"PRAGMA index_info({name})")]
    con.close()
    return cols


def test_0002_puts_state_last_in_the_partial_indexes_and_back(store: Store, db_path: Path) -> None:
    downgrade(store, "0002")  # the indexes of observations, as 0002 left them
    assert _index_columns(db_path, "ix_observations_pending_due") == [
        "ts",
        "series_id",
        "next_attempt_at",
        "state",
    ]
    assert _index_columns(db_path, "ix_observations_dead") == ["series_id", "ts", "state"]
    downgrade(store, "0001")
    assert store.schema_version() == "0001"
    assert _index_columns(db_path, "ix_observations_pending_due") == [
        "ts",
        "series_id",
        "next_attempt_at",
    ]
    assert _index_columns(db_path, "ix_observations_dead") == ["series_id", "ts"]
    Store.open(db_path).close()  # an old outbox is upgraded on open
    assert store.schema_version() == head_revision()
    assert _drift(store) == []


def test_0003_downgrade_applies_recorded_acks_first(store: Store, db_path: Path) -> None:
    rows = [obs("EIA.PJM.demand", h, 100.0 + h) for h in range(4)]
    store.staging.stage(rows, series_rows=[series_row("EIA.PJM.demand")])
    store.delivery.record_outcome(
        [(r[0], r[1], r[5]) for r in rows[:3]], now="2026-11-22T00:00:00Z"
    )
    assert store.reads.count_state("acked") == 0 and store.delivery.unapplied_acks() == 3
    downgrade(store, "0002")
    con = sqlite3.connect(db_path)
    states = con.execute("SELECT ts, state, acked_at FROM observations ORDER BY ts").fetchall()
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    con.close()
    assert [s for _, s, _ in states] == ["acked", "acked", "acked", "pending"]
    assert states[0][2] == "2026-11-22T00:00:00Z"
    assert "ack_log" not in tables
    Store.open(db_path).close()
    assert _drift(store) == []


def _ack_log_columns(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(ack_log)")]
    con.close()
    return cols


def test_an_outbox_from_the_released_0003_is_upgraded_and_keeps_its_recorded_acks(
    store: Store, db_path: Path
) -> None:
    # 0003 as released created ack_log.rows NOT NULL; an outbox stamped 0003 with that
    # column, holding an acknowledgement a killed send recorded, must keep working.
    rows = [obs("EIA.PJM.demand", h, 100.0 + h) for h in range(4)]
    store.staging.stage(rows, series_rows=[series_row("EIA.PJM.demand")])
    downgrade(store, "0003")
    assert _ack_log_columns(db_path) == ["id", "acked_at", "keys", "rows"]
    con = sqlite3.connect(db_path)
    with con:  # what the released send wrote
        con.execute(
            "INSERT INTO ack_log (acked_at, rows, keys) VALUES (?, 2, ?)",
            ("2026-11-22T00:00:00Z", json.dumps([[r[0], r[1], r[5]] for r in rows[:2]])),
        )
    con.close()
    with Store.open(db_path) as reopened:  # upgraded on open
        assert reopened.schema_version() == head_revision()
        assert _ack_log_columns(db_path) == ["id", "acked_at", "keys"]
        assert reopened.delivery.unapplied_acks() == 2
        reopened.delivery.record_outcome([(r[0], r[1], r[5]) for r in rows[2:3]])
        assert reopened.delivery.apply_acks() == 3
        assert reopened.reads.count_state("acked") == 3
        assert _drift(reopened) == []


def test_0004_leaves_an_ack_log_without_rows_as_it_is(store: Store, db_path: Path) -> None:
    downgrade(store, "0003")
    con = sqlite3.connect(db_path)
    con.execute("ALTER TABLE ack_log DROP COLUMN rows")  # an 0003 built without it
    con.close()
    upgrade(store)
    assert _ack_log_columns(db_path) == ["id", "acked_at", "keys"]
    assert _drift(store) == []


def test_0005_stream_progress_goes_and_comes_back(store: Store, db_path: Path) -> None:
    progress = ProgressUpdate("demand:GENX", "demand", "GENX", "2025-08-22T10:00:00Z")
    store.staging.stage([], progress_updates=[progress])
    assert store.staging.stream_progress() == {"demand:GENX": "2025-08-22T10:00:00Z"}
    downgrade(store, "0004")
    assert "stream_progress" not in _objects(db_path)["table"]
    assert store.staging.progress_rows() == []  # status may read an outbox not upgraded yet
    with Store.open(db_path) as reopened:  # upgraded on open: the stream is asked again
        assert reopened.schema_version() == head_revision()
        assert reopened.staging.stream_progress() == {}
        assert _drift(reopened) == []


def test_head_is_read_without_alembic_and_agrees_with_it(tmp_path: Path) -> None:
    assert scanned_head(migrations_dir() / "versions") == alembic_head() == head_revision()
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "__init__.py").write_text("")
    (versions / "a.py").write_text('revision = "a"\ndown_revision = None\n')
    (versions / "b.py").write_text('revision: str = "b"\ndown_revision: str | None = "a"\n')
    assert scanned_head(versions) == "b"
    (versions / "c.py").write_text('revision = "c"\ndown_revision = "a"\n')
    assert scanned_head(versions) is None  # two heads: Alembic decides
    (versions / "c.py").write_text("revision = make_id()\ndown_revision = 'b'\n")
    assert scanned_head(versions) is None  # not spelled plainly: Alembic decides


def test_reopen_is_idempotent(db_path: Path) -> None:
    for _ in range(3):
        Store.open(db_path).close()
    assert Store.open(db_path, migrate=False).schema_version() == head_revision()


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    try:
        Store.open(bad)
    except Exception as exc:
        from outbox.errors import StoreError

        assert isinstance(exc, StoreError)
        assert "not a usable outbox database" in str(exc)
    else:
        raise AssertionError("opening junk must fail")
    assert bad.read_bytes() == b"this is not sqlite" * 100


def test_a_schema_from_a_newer_version_is_one_line_and_left_alone(tmp_path: Path) -> None:
    import sqlite3

    from durability import outbox, outbox_env

    from outbox.sample import sample_dir

    db = tmp_path / "outbox.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    for args in (("fetch", "--replay", str(sample_dir())), ("send",), ("db", "upgrade")):
        done = outbox(*args, env={**outbox_env(db), "GRIDPULSE_API_KEY": "k"}, timeout=120)
        assert done.returncode == 1, (args, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "schema 0099 is unknown to this version" in lines[0], args
        assert "Traceback" not in done.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099",)]
        assert conn.execute("SELECT count(*) FROM observations").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def _legacy_rows(path: Path) -> list[tuple]:
    con = sqlite3.connect(path)
    rows = con.execute(
        "SELECT ts, value, revision, state, attempts, next_attempt_at, last_error,"
        " last_error_code, acked_revision FROM observations ORDER BY ts"
    ).fetchall()
    con.close()
    return rows


def test_0008_moves_each_rows_delivery_state_to_the_queue_and_back(
    store: Store, db_path: Path
) -> None:
    sid = "EIA.PJM.demand"
    rows = [obs(sid, h, 100.0 + h) for h in range(5)]
    store.staging.stage(rows, series_rows=[series_row(sid)])
    store.delivery.record_outcome(
        [(r[0], r[1], r[5]) for r in rows[:2]],
        rejected=[((rows[2][0], rows[2][1], rows[2][5]), "VALUE_OUT_OF_RANGE", "bad")],
        now="2026-11-22T00:00:00Z",
    )
    store.delivery.apply_acks()
    store.delivery.defer([(rows[3][0], rows[3][1], rows[3][5])], "2026-11-23T00:00:00Z", "503", "X")
    downgrade(store, "0007")
    before = _legacy_rows(db_path)
    assert [r[3] for r in before] == ["acked", "acked", "dead", "pending", "pending"]
    assert before[0][8] == rows[0][5] and before[3][4:6] == (1, "2026-11-23T00:00:00Z")
    assert before[2][6:8] == ("bad", "VALUE_OUT_OF_RANGE")
    con = sqlite3.connect(db_path)
    with con:  # an acknowledged row as 0007 kept it: with its ack time
        con.execute(
            "UPDATE observations SET acked_at = '2026-11-22T00:00:00Z'"
            " WHERE acked_at IS NULL AND state = 'acked'"
        )
    con.close()
    upgrade(store)
    assert _drift(store) == []
    assert [store.reads.row(sid, r[1])["state"] for r in rows] == [
        "acked",
        "acked",
        "dead",
        "pending",
        "pending",
    ]
    deferred = store.reads.row(sid, rows[3][1])
    assert (deferred["attempts"], deferred["next_attempt_at"]) == (1, "2026-11-23T00:00:00Z")
    assert store.reads.row(sid, rows[2][1])["last_error_code"] == "VALUE_OUT_OF_RANGE"
    assert [c.ts for c in store.delivery.claim(10, "2026-11-22T12:00:00Z")] == [rows[4][1]]
    with store.read() as conn:
        minutes = conn.exec_driver_sql("SELECT * FROM ack_minutes").all()
    assert [tuple(m) for m in minutes] == [("2026-11-22T00:00", 2, rows[1][1])]
    downgrade(store, "0007")  # and back: the same states, attempts and errors
    assert _legacy_rows(db_path) == before
    upgrade(store)
    assert _drift(store) == []


def test_0009_rewrites_recorded_acks_both_ways(store: Store, db_path: Path) -> None:
    """A batch a killed send recorded and did not apply survives the upgrade and the
    downgrade: the keys are rewritten, none is lost, and they apply to their rows."""
    sid = "EIA.PJM.demand"
    rows = [obs(sid, h, 100.0 + h) for h in range(5)]
    store.staging.stage(rows, series_rows=[series_row(sid)])
    keys = [(r[0], r[1], r[5]) for r in rows]
    store.delivery.record_outcome(keys[3:1:-1], now="2026-11-22T00:00:00Z")
    store.delivery.record_outcome(keys[:1], now="2026-11-22T00:01:00Z")
    downgrade(store, "0008")
    con = sqlite3.connect(db_path)
    logged = [json.loads(k) for (k,) in con.execute("SELECT keys FROM ack_log ORDER BY id")]
    con.close()
    assert logged == [[list(k) for k in keys[3:1:-1]], [list(keys[0])]]  # as 0008 wrote them
    assert store.delivery.unapplied_acks() == 3  # status reads either format
    upgrade(store)
    assert _drift(store) == []
    con = sqlite3.connect(db_path)
    logged = [json.loads(k) for (k,) in con.execute("SELECT keys FROM ack_log ORDER BY id")]
    con.close()
    assert logged[0] == {
        "from": rows[2][1],
        "to": rows[3][1],
        "keys": [f"{k[1]}\x1f{k[0]}\x1f{k[2]}" for k in keys[3:1:-1]],
    }
    assert store.delivery.unapplied_acks() == 3
    assert store.delivery.apply_acks() == 3
    assert store.reads.count_state("acked") == 3 and store.reads.count_state("pending") == 2
    with store.read() as conn:
        minutes = [tuple(m) for m in conn.exec_driver_sql("SELECT * FROM ack_minutes")]
    assert minutes == [("2026-11-22T00:00", 2, rows[3][1]), ("2026-11-22T00:01", 1, rows[0][1])]


def _everything(path: Path) -> dict[str, Any]:
    con = sqlite3.connect(path)
    try:
        found: dict[str, Any] = {
            "objects": set(con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")),
            "pragmas": [
                con.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("auto_vacuum", "journal_mode", "page_size", "user_version")
            ],
        }
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            found[name] = sorted(con.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr)
    finally:
        con.close()
    return found


def test_a_new_file_gets_in_one_script_what_the_migrations_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store.open of a new path runs head_schema.sql, not the migrations: the same tables,
    indexes, views, triggers (their SQL as SQLite keeps it), pragmas and stamp."""
    built = migrated(tmp_path / "migrated.db")

    def no_migrations(*_args: object, **_kw: object) -> None:
        raise AssertionError("a new file was migrated, not given the head script")

    monkeypatch.setattr(migrate_mod, "upgrade", no_migrations)
    with Store.open(tmp_path / "scripted.db") as store:
        assert store.schema_version() == head_revision()
        assert _drift(store) == []
    assert _everything(tmp_path / "scripted.db") == _everything(built)
    assert _everything(built)["alembic_version"] == [(head_revision(),)]


def test_head_schema_sql_is_the_migrations_head(tmp_path: Path) -> None:
    """A migration added without the script rewritten fails here (and a new outbox would
    be migrated one by one, correct but slow: see the test after)."""
    written = head_schema_sql(migrated(tmp_path / "outbox.db"))
    assert HEAD_SCHEMA.read_text(encoding="utf-8") == written, (
        "outbox/store/head_schema.sql is stale: run `python -m outbox.store.headschema`"
    )


def test_a_new_outbox_is_made_without_importing_alembic(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    probe = (
        "import sys\nfrom outbox.store import Store\n"
        f"store = Store.open({str(db)!r})\n"
        "print(store.schema_version(), 'alembic' in sys.modules)\nstore.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == [head_revision(), "False"], done.stderr


def test_a_stale_head_script_is_not_run_a_new_file_ismigrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "head_schema.sql"
    stale.write_text(
        "CREATE TABLE t (x);\nINSERT INTO alembic_version (version_num) VALUES ('0001');\n"
    )
    monkeypatch.setattr(migrate_mod, "HEAD_SCHEMA", stale)
    migrate_mod._head_script.cache_clear()
    try:
        with Store.open(tmp_path / "new.db") as store:
            assert store.schema_version() == head_revision() and _drift(store) == []
    finally:  # the real script again, for every later test in this process
        monkeypatch.undo()
        migrate_mod._head_script.cache_clear()
    assert "t" not in _objects(tmp_path / "new.db")["table"]
    assert migrate_mod._head_script() is not None


def test_a_file_with_tables_in_it_is_migrated_not_scripted(tmp_path: Path) -> None:
    """The head script is for an empty file only: someone's table in it stays, and the
    outbox's tables are migrated in beside it."""
    assert migrate_mod._head_script() is not None  # the script would run, were it empty
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x)")
    con.close()
    with Store.open(other) as store:
        assert not migrate_mod.create_fresh(store)  # refused: the file is not empty
        assert store.schema_version() == head_revision()
    assert _objects(other)["table"] >= TABLES | {"notes"}


def test_a_head_script_that_fails_halfway_leaves_the_file_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script runs in one transaction: a statement failing after a dozen tables were
    made rolls them all back (as a kill would), and the next open makes the file whole."""
    real = migrate_mod._head_script()
    assert real is not None
    broken = (*real[:12], "INSERT INTO no_such_table VALUES (1)", *real[12:])
    monkeypatch.setattr(migrate_mod, "_head_script", lambda: broken)
    db = tmp_path / "outbox.db"
    with pytest.raises(StoreError, match="no such table: no_such_table"):
        Store.open(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    con.close()
    monkeypatch.undo()
    with Store.open(db) as store:
        assert store.schema_version() == head_revision() and _drift(store) == []
    assert _everything(db) == _everything(migrated(tmp_path / "migrated.db"))
