"""What a stage hands SQLite: the JSON layout of RowBatch, and the CHECK constraints that
the stage's upsert may skip only because RowBatch.of has checked them in Python."""

from __future__ import annotations

import pickle
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from factories import obs, page, series_row, ts
from sqlalchemy import event

from outbox.normalize import normalize_page
from outbox.ports import Page
from outbox.stages.prepared import detach_rows, encode
from outbox.store import RowBatch, Store
from outbox.store.rows import _CHECKS_MIRRORED, decode_rows
from outbox.testing.synth import ROUTE_REGION

PJM = "EIA.PJM.demand"
MISO = "EIA.MISO.demand"

# The three widths of a row in RowBatch.json: 4 (units, quality flag and page_row bound
# once), 5 (the quality flag varies), 7 (page_row is not the position).
SHAPES = {
    4: [obs(PJM, h, 100.0 + h, row=h) for h in range(6)],
    5: [obs(PJM, h, None if h % 2 else 1.5 * h, row=h) for h in range(6)],
    7: [obs(sid, h, 7.0, row=2 * h + (sid == MISO) + 1) for h in range(3) for sid in (PJM, MISO)],
}


def _stage(store: Store, rows: list[tuple] | RowBatch) -> int:
    plain = rows.rows if isinstance(rows, RowBatch) else rows
    sids = sorted({r[0] for r in plain})
    result = store.staging.stage(
        rows, series_rows=[series_row(s) for s in sids], page=page(), now="2025-01-01T00:00:00Z"
    )
    return result.written


def _observations(db_path: Path) -> list[tuple]:
    con = sqlite3.connect(db_path)
    try:
        return con.execute("SELECT * FROM observations ORDER BY series_id, ts").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("width", sorted(SHAPES))
def test_json_rows_round_trip_at_each_width(width: int) -> None:
    rows = SHAPES[width]
    batch = RowBatch.of(rows)
    assert batch.json is not None
    assert {len(r) for r in orjson.loads(batch.json)} == {width}
    assert decode_rows(batch.json, batch.units, batch.quality_flag) == rows
    # What crosses from a read-ahead process decodes to the same rows.
    detached = pickle.loads(pickle.dumps(detach_rows(batch)))
    assert list(detached.rows) == rows and len(detached.rows) == len(rows)


@pytest.mark.parametrize("width", sorted(SHAPES))
def test_json_upsert_writes_what_the_row_by_row_upsert_writes(width: int, tmp_path: Path) -> None:
    """The json_each upsert at each width against the executemany fallback (no JSON)."""
    rows = SHAPES[width]
    batch = RowBatch.of(rows)
    fallback = replace(batch, json=None, checked=False)
    written = []
    for name, staged in (("json", batch), ("rows", fallback)):
        store = Store.open(tmp_path / f"{name}.db")
        try:
            written.append(_stage(store, staged))
            # A re-stage finds every row unchanged (the probe reads the same layout).
            written.append(_stage(store, RowBatch.of(rows)))
        finally:
            store.close()
    assert written == [len(rows), 0, len(rows), 0]
    assert _observations(tmp_path / "json.db") == _observations(tmp_path / "rows.db")


def test_mirrored_checks_are_the_tables_checks() -> None:
    # A CHECK added to observations but not mirrored in _pass_checks turns the shortcut off.
    assert _CHECKS_MIRRORED


@pytest.mark.parametrize(
    "bad",
    [
        (PJM, ts(9), 1.0, "MW", "bogus", "r9", 1),  # quality_flag outside its domain
        (PJM, ts(9), None, "MW", "good", "r9", 1),  # no value and not flagged missing
        (PJM, ts(9), None, "MW", "estimated", "r9", 1),
    ],
)
def test_rows_failing_a_check_are_left_to_sqlite(bad: tuple, store: Store, db_path: Path) -> None:
    """RowBatch.of refuses the shortcut for a batch with a row a CHECK refuses: SQLite then
    evaluates the CHECKs and refuses the page, as it always did."""
    batch = RowBatch.of([obs(PJM, 0), bad])
    assert batch.json is not None and not batch.checked
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        _stage(store, batch)
    assert _observations(db_path) == []


def test_normalized_rows_pass_the_checks_in_python() -> None:
    """The rows normalize_page makes always pass the CHECKs (a missing value is flagged
    'missing', the flags are 'good' or 'missing'), so the stage of a page skips them."""
    data = [
        {"period": f"2025-08-21T{h:02d}", "respondent": "PJM", "type": "D", "value": value}
        | {"value-units": "megawatthours"}
        for h, value in enumerate(["100", None, "", "7.5", "0"])
    ]
    norm = normalize_page(ROUTE_REGION, data, ba_codes={"PJM": "PJM"})
    assert norm.count == 5 and set(norm.quality_flag) == {"good", "missing"}
    body = orjson.dumps({"response": {"total": 5, "data": data}})
    eia_page = Page(ROUTE_REGION, 0, 0, 5, data, body, {}, "https://x/", True)
    _record, batch = encode(eia_page, norm)
    assert batch.checked


def test_checks_are_skipped_for_the_upsert_only(store: Store, db_path: Path) -> None:
    """PRAGMA ignore_check_constraints is on for exactly the page's upsert statement, off
    again after it even when the upsert fails, and never for another writer."""
    statements: list[str] = []

    @event.listens_for(store.engine, "connect")
    def trace(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # The statement again for each trigger program it runs (the queue's): once here.
        dbapi_connection.set_trace_callback(
            lambda sql: None if statements[-1:] == [sql] else statements.append(sql)
        )

    store.engine.dispose()
    assert _stage(store, SHAPES[4]) == 6
    on = [i for i, s in enumerate(statements) if "ignore_check_constraints = ON" in s]
    off = [i for i, s in enumerate(statements) if "ignore_check_constraints = OFF" in s]
    assert len(on) == len(off) == 1 and off[0] == on[0] + 2
    assert statements[on[0] + 1].lstrip().startswith("INSERT INTO observations")

    # An upsert that fails with the pragma on (here: JSON SQLite cannot read) leaves it
    # off on the pooled connection: the next writer's CHECKs hold.
    broken = replace(RowBatch.of([obs(PJM, 20)]), json=b"[[")
    assert broken.checked
    with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
        _stage(store, broken)
    with store.write() as conn:
        assert conn.exec_driver_sql("PRAGMA ignore_check_constraints").scalar() == 0
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        _stage(store, [(PJM, ts(30), None, "MW", "good", "r30", 0)])  # executemany path

    # Any other writer of the file: the CHECKs are the table's, always on.
    con = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            con.execute(
                "INSERT INTO observations (series_id, ts, value, units, quality_flag, revision,"
                " fetched_at) VALUES (?, ?, NULL, 'MW', 'good', 'r', 'now')",
                (PJM, ts(40)),
            )
    finally:
        con.close()
    assert len(_observations(db_path)) == 6
