"""What a stage hands SQLite: the JSON layout of RowBatch."""

from __future__ import annotations

import pickle
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from factories import obs, page, series_row

from outbox.stages.prepared import detach_rows
from outbox.store import RowBatch, Store
from outbox.store.rows import decode_rows

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
