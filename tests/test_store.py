"""Store semantics on real SQLite files: stage, claim, ack/reject/defer, watermarks."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy.exc
from factories import ack, delivered_through, mark, obs, page, reject, series_row, total_changes, ts
from sqlalchemy import event

from outbox.errors import StoreError
from outbox.store import Key, Store

PJM = "EIA.PJM.demand"
MISO = "EIA.MISO.demand"


def _stage(store: Store, rows, marks=(), with_page=True):
    sids = sorted({r[0] for r in rows})
    return store.staging.stage(
        rows,
        series_rows=[series_row(s) for s in sids],
        page=page() if with_page else None,
        watermark_updates=marks,
    )


def _state(store: Store, sid: str, hour: int) -> str:
    row = store.reads.row(sid, ts(hour))
    assert row is not None
    return row["state"]


def _key(row: tuple) -> Key:
    return Key(row[0], row[1], row[5])


def _total_changes(store: Store) -> int:
    with store.read() as conn:
        return total_changes(conn)


def test_restage_of_unchanged_rows_writes_nothing(store: Store, db_path: Path) -> None:
    rows = [obs(PJM, h, 1000.0 + h) for h in range(48)]
    first = _stage(store, rows, [mark("demand:PJM", 47)])
    assert first.written == 48 and first.page_id == 1
    before = _total_changes(store)
    wal_before = Path(f"{db_path}-wal").stat().st_size
    again = _stage(store, rows, [mark("demand:PJM", 47)])
    assert again.written == 0
    assert again.page_id is None  # an unchanged page is not archived again
    assert _total_changes(store) == before
    assert Path(f"{db_path}-wal").stat().st_size == wal_before
    with store.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pages").scalar() == 1


def _queued_revision(store: Store, series_id: str, hour: int) -> str | None:
    """The revision the row's queue entry is for (None: no entry, the row is acked)."""
    with store.read() as conn:
        found = conn.exec_driver_sql(
            "SELECT revision FROM queue WHERE series_id = ? AND ts = ?", (series_id, ts(hour))
        ).first()
    return found[0] if found else None


def _ack_minutes(store: Store) -> list[tuple[str, int, str]]:
    with store.read() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM ack_minutes ORDER BY 1")]


def test_a_deleted_row_takes_its_queue_entry_along(store: Store, db_path: Path) -> None:
    """Whoever deletes an observation (sqlite3 by hand, a test, housekeeping), its queue
    entry goes in the same statement: nothing is claimed or counted for a row not there."""
    _stage(store, [obs(PJM, h) for h in range(3)])
    reject(store, [(_key(obs(PJM, 2)), "VALUE_OUT_OF_RANGE", "no")])
    con = sqlite3.connect(db_path)
    with con:
        con.execute("DELETE FROM observations WHERE ts IN (?, ?)", (ts(0), ts(2)))
    queued = con.execute("SELECT ts, state FROM queue ORDER BY ts").fetchall()
    con.close()
    assert queued == [(ts(1), "pending")]
    assert store.reads.counts() == {"pending": 1, "dead": 0}
    assert [c.ts for c in store.delivery.claim(10, ts(100))] == [ts(1)]


def test_new_revision_goes_back_to_pending(store: Store) -> None:
    _stage(store, [obs(PJM, 0, 10.0), obs(PJM, 1, 11.0)])
    ack(store, [_key(obs(PJM, 0, 10.0)), _key(obs(PJM, 1, 11.0))])
    store.delivery.defer([_key(obs(PJM, 1, 11.0))], ts(5), "x")  # no-op: already acked
    result = _stage(store, [obs(PJM, 0, 10.0), obs(PJM, 1, 12.5)])
    assert result.written == 1
    assert _state(store, PJM, 0) == "acked"
    row = store.reads.row(PJM, ts(1))
    assert row["state"] == "pending" and row["value"] == 12.5 and row["attempts"] == 0
    assert _queued_revision(store, PJM, 1) == obs(PJM, 1, 12.5)[5]
    assert ack(store, [_key(obs(PJM, 1, 11.0))]) == 0  # a late ack of the old one: stale
    assert [c.ts for c in store.delivery.claim(10, ts(100))] == [ts(1)]


def test_revision_equal_to_acked_revision_is_sent_again(store: Store) -> None:
    _stage(store, [obs(PJM, 0, 10.0)])
    ack(store, [_key(obs(PJM, 0, 10.0))])
    _stage(store, [obs(PJM, 0, 99.0)])
    assert _state(store, PJM, 0) == "pending"
    # EIA flipped back. 99.0 may have reached GridPulse unacknowledged (a crash after the
    # 2xx; tests/test_model.py), so GridPulse's copy is unknown: 10.0 travels again.
    _stage(store, [obs(PJM, 0, 10.0)])
    assert _state(store, PJM, 0) == "pending"
    assert [c.value for c in store.delivery.claim(10, ts(100))] == [10.0]


def test_dead_row_with_new_revision_is_pending_again(store: Store) -> None:
    _stage(store, [obs(PJM, 0, -5.0)])
    reject(store, [(_key(obs(PJM, 0, -5.0)), "VALUE_OUT_OF_RANGE", "negative")])
    assert _state(store, PJM, 0) == "dead"
    _stage(store, [obs(PJM, 0, 5.0)])
    row = store.reads.row(PJM, ts(0))
    assert row["state"] == "pending" and row["last_error"] is None


def test_ack_reject_defer_ignore_stale_revision(store: Store) -> None:
    old = obs(PJM, 0, 10.0)
    _stage(store, [old, obs(PJM, 1, 11.0), obs(PJM, 2, 12.0)])
    claimed = store.delivery.claim(10, ts(100))
    assert len(claimed) == 3
    new = obs(PJM, 0, 10.5)
    _stage(store, [new])  # revised while the batch was in flight
    assert ack(store, [_key(old)]) == 0
    assert reject(store, [(_key(old), "X", "y")]) == 0
    assert store.delivery.defer([_key(old)], ts(50), "boom") == 0
    row = store.reads.row(PJM, ts(0))
    assert row["state"] == "pending" and row["revision"] == new[5] and row["attempts"] == 0
    assert ack(store, [_key(new)]) == 1
    assert _state(store, PJM, 0) == "acked"


def test_defer_hides_rows_until_due_and_counts_attempts(store: Store) -> None:
    _stage(store, [obs(PJM, 0), obs(PJM, 1)])
    assert store.delivery.defer([_key(obs(PJM, 0))], ts(10), "503", code="SINK_UNAVAILABLE") == 1
    assert [c.ts for c in store.delivery.claim(10, ts(9))] == [ts(1)]
    assert [c.ts for c in store.delivery.claim(10, ts(10))] == [ts(0), ts(1)]
    assert store.delivery.count_deferred(ts(0)) == (1, ts(10))
    assert store.delivery.has_deferred("SINK_UNAVAILABLE") and not store.delivery.has_deferred(
        "OTHER"
    )
    assert store.delivery.clear_deferred("OTHER") == 0
    assert store.delivery.clear_deferred("SINK_UNAVAILABLE") == 1
    assert not store.delivery.has_deferred("SINK_UNAVAILABLE")
    assert store.reads.row(PJM, ts(0))["attempts"] == 1
    assert store.delivery.count_due(ts(0)) == 2


def test_pending_and_dead_scans_read_only_the_queue(store: Store, db_path: Path) -> None:
    """Status, count_due, count_deferred and has_deferred never read an observation per
    pending or dead row: the queue's own rows, or its covering partial indexes, answer
    (migrations 0002 and 0008); observations are only sought by primary key."""
    _stage(store, [obs(PJM, h) for h in range(4)] + [obs(MISO, h) for h in range(4)])
    store.delivery.defer([_key(obs(PJM, 1))], ts(10), "503", code="SINK_UNAVAILABLE")
    reject(store, [(_key(obs(MISO, 2)), "VALUE_OUT_OF_RANGE", "no")])
    statements: list[str] = []
    event.listen(
        store.engine, "connect", lambda dbapi, _: dbapi.set_trace_callback(statements.append)
    )
    store.engine.dispose()  # new connections: traced
    store.reads.series_states()
    store.reads.counts()
    store.delivery.count_due(ts(5))
    store.delivery.count_deferred(ts(5))
    store.delivery.has_deferred("SINK_UNAVAILABLE")
    con = sqlite3.connect(db_path)
    lines = [
        line
        for sql in statements
        if sql.lstrip().upper().startswith("SELECT")
        for *_, line in con.execute(f"EXPLAIN QUERY PLAN {sql}")
    ]
    con.close()
    uses = [line for line in lines if re.search(r"\bqueue\b", line)]
    assert len(uses) >= 6
    assert all(
        "COVERING INDEX ix_queue_" in line or re.fullmatch(r"(SCAN|SEARCH) queue\b.*", line)
        for line in uses
    ), uses
    # A plain `SCAN queue` reads the narrow queue rows themselves (WITHOUT ROWID).
    assert not [line for line in lines if re.match(r"SCAN (o|observations)\b", line)], lines
    assert any("COVERING INDEX ix_queue_dead" in line for line in uses), uses
    assert any("COVERING INDEX ix_queue_deferred" in line for line in uses), uses


def test_claim_orders_by_ts_then_series(store: Store) -> None:
    _stage(store, [obs(PJM, 2), obs(MISO, 2), obs(PJM, 1), obs(MISO, 3)])
    got = [(c.ts, c.series_id) for c in store.delivery.claim(3, ts(100))]
    assert got == [(ts(1), PJM), (ts(2), MISO), (ts(2), PJM)]
    first = store.delivery.claim(1, ts(100))[0]
    assert (first.ba, first.type, first.subtype, first.units) == ("PJM", "demand", None, "MW")


def test_claim_knows_series_staged_after_its_first_claim(store: Store) -> None:
    _stage(store, [obs(PJM, 1)])
    assert [c.ba for c in store.delivery.claim(10, ts(100))] == ["PJM"]
    _stage(store, [obs("EIA.MISO.fuel.WND", 2)])
    got = [(c.series_id, c.ba, c.type, c.subtype) for c in store.delivery.claim(10, ts(100))]
    assert got == [(PJM, "PJM", "demand", None), ("EIA.MISO.fuel.WND", "MISO", "fuel", "WND")]
    after = store.delivery.claim(10, ts(100), after=(ts(1), PJM))
    assert [(c.ba, c.subtype) for c in after] == [("MISO", "WND")]


def test_claim_skips_a_row_without_its_series_row(store: Store, db_path: Path) -> None:
    _stage(store, [obs(PJM, 1), obs(MISO, 2)])
    assert len(store.delivery.claim(10, ts(100))) == 2
    con = sqlite3.connect(db_path)
    con.execute("DELETE FROM series WHERE series_id = ?", (MISO,))
    con.commit()
    con.close()
    _stage(store, [obs("EIA.SPP.demand", 3)])  # a series the claim's map has not seen
    assert [c.series_id for c in store.delivery.claim(10, ts(100))] == [PJM, "EIA.SPP.demand"]


def test_watermark_never_moves_back(store: Store) -> None:
    _stage(store, [obs(PJM, 10)], [mark("demand:PJM", 10)])
    _stage(store, [obs(PJM, 3)], [mark("demand:PJM", 3)])
    assert store.staging.watermarks() == {"demand:PJM": ts(10)}
    _stage(store, [obs(PJM, 11)], [mark("demand:PJM", 11)])
    assert store.staging.watermarks() == {"demand:PJM": ts(11)}


def test_delivered_through_with_gaps_dead_rows_and_revisions(store: Store) -> None:
    rows = [obs(PJM, h, 100.0 + h) for h in (0, 1, 2, 4, 5, 8)]  # gaps at 3, 6, 7
    _stage(store, [*rows, obs(MISO, 0)])
    assert delivered_through(store) == {MISO: None, PJM: None}
    ack(store, [_key(r) for r in rows[:3]])
    assert delivered_through(store)[PJM] == ts(2)
    reject(store, [(_key(rows[3]), "BAD", "bad row")])  # hour 4 dead counts as settled
    ack(store, [_key(rows[5])])  # hour 8 acked, hour 5 still pending
    assert delivered_through(store)[PJM] == ts(4)
    _stage(store, [obs(PJM, 1, 555.0)])  # hour 1 revised: back to pending
    assert delivered_through(store)[PJM] == ts(0)
    ack(store, [_key(obs(PJM, 1, 555.0)), _key(rows[4])])
    assert delivered_through(store)[PJM] == ts(8)
    state = {s.series_id: s for s in store.reads.series_states()}[PJM]
    assert (state.pending, state.dead, state.newest_staged, state.newest_acked) == (
        0,
        1,
        ts(8),
        ts(8),
    )
    with store.read() as conn:
        view = conn.exec_driver_sql(
            "SELECT pending, acked, dead, delivered_through FROM series_status WHERE series_id = ?",
            (PJM,),
        ).one()
    assert tuple(view) == (0, 5, 1, ts(8))


@pytest.mark.parametrize("seed", range(12))
def test_series_states_agree_with_the_plain_view(store: Store, seed: int) -> None:
    # series_states takes shortcuts (one index scan, seeks, a filled pending block's
    # newest acknowledged row looked up before it); the series_status view computes
    # the same by brute force. Random histories: gaps, acks, dead rows, revisions.
    import random

    rng = random.Random(seed)
    sids = [PJM, MISO, "EIA.ERCO.demand"]
    live: dict[tuple[str, int], float] = {}
    for step in range(6):
        rows = []
        for sid in sids:
            for h in range(step * 8, step * 8 + 8):
                if rng.random() < 0.85:
                    live[sid, h] = 100.0 + h
                    rows.append(obs(sid, h, live[sid, h]))
        for sid, h in rng.sample(sorted(live), k=min(4, len(live))):  # revisions
            live[sid, h] += 1
            rows.append(obs(sid, h, live[sid, h]))
        _stage(store, rows)
        pending = store.delivery.claim(10_000)
        rng.shuffle(pending)
        cut = rng.randint(0, len(pending))
        ack(store, [_key(c) for c in pending[:cut] if rng.random() < 0.9])
        reject(store, [(_key(c), "BAD", "bad") for c in pending[cut:] if rng.random() < 0.05])
    # And two shapes the shortcut is for: a block never sent after acknowledged rows, and
    # a series never sent at all.
    block, never = "EIA.SWPP.demand", "EIA.CISO.demand"
    _stage(store, [obs(block, h) for h in range(10)] + [obs(never, h) for h in range(5)])
    ack(store, [_key(obs(block, h)) for h in range(4)])
    with store.read() as conn:
        view = {
            r[0]: tuple(r[1:])
            for r in conn.exec_driver_sql(
                "SELECT series_id, pending, dead, newest_staged, newest_acked, delivered_through"
                " FROM series_status"
            )
        }
    states = {
        s.series_id: (s.pending, s.dead, s.newest_staged, s.newest_acked, s.delivered_through)
        for s in store.reads.series_states()
    }
    assert states == view
    assert states[block] == (6, 0, ts(9), ts(3), ts(3))
    assert states[never] == (5, 0, ts(4), None, None)


def test_requeue_dead(store: Store) -> None:
    _stage(store, [obs(PJM, 0), obs(MISO, 0)])
    reject(store, [(_key(obs(PJM, 0)), "A", "a"), (_key(obs(MISO, 0)), "B", "b")])
    assert store.delivery.requeue_dead(series_glob="EIA.PJM.*") == 1
    assert store.delivery.requeue_dead(code="nope") == 0
    assert _state(store, PJM, 0) == "pending" and _state(store, MISO, 0) == "dead"
    assert store.reads.counts() == {"pending": 1, "dead": 1}


def test_page_archive_and_row_pointer(store: Store) -> None:
    _stage(store, [obs(PJM, 0, row=0), obs(PJM, 1, row=1)])
    row = store.reads.row(PJM, ts(1))
    info, body = store.reads.page_body(row["page_id"])
    assert row["page_row"] == 1
    assert info["route"] == "electricity/rto/region-data" and body.startswith(b'{"response"')


def test_runs_are_recorded(store: Store) -> None:
    run = store.runs.start_run("send")
    store.runs.finish_run(run, "failed", {"sent": 3}, "GET https://x/?api_key=SEKRET1 failed")
    (rec,) = store.runs.recent_runs()
    assert rec.status == "failed" and rec.counts.pop("seconds") >= 0  # measured duration
    assert rec.counts == {"sent": 3}
    assert "SEKRET1" not in rec.error and "api_key=***" in rec.error


def _writer(path: str, n: int, errors: mp.Queue) -> None:
    try:
        with Store.open(path) as s:
            for i in range(n):
                rows = [obs(PJM, i * 10 + h, float(h)) for h in range(10)]
                s.staging.stage(rows, series_rows=[series_row(PJM)], page=page(i))
                due = s.delivery.claim(5, ts(10_000))
                ack(s, [Key(c.series_id, c.ts, c.revision) for c in due])
    except Exception as exc:  # reported to the parent
        errors.put(repr(exc))


def _reader(path: str, n: int, errors: mp.Queue) -> None:
    try:
        with Store.open(path) as s:
            for _ in range(n):
                s.reads.series_states()
                s.reads.counts()
                s.delivery.claim(100, ts(10_000))
    except Exception as exc:
        errors.put(repr(exc))


def test_concurrent_writers_and_readers_never_see_locked(db_path: Path) -> None:
    Store.open(db_path).close()
    errors: mp.Queue = mp.Queue()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(db_path), 60, errors)) for _ in range(2)]
    procs += [ctx.Process(target=_reader, args=(str(db_path), 150, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert errors.empty(), errors.get()
    con = sqlite3.connect(db_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM observations").fetchone()[0] == 600


def test_pragmas(store: Store) -> None:
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def _committed(db_path: Path) -> tuple[int, list[tuple]]:
    """Rows and watermarks another connection sees (what a kill would leave)."""
    con = sqlite3.connect(db_path)
    try:
        rows = con.execute("SELECT count(*) FROM observations").fetchone()[0]
        marks = con.execute("SELECT stream, last_ts FROM watermarks ORDER BY 1").fetchall()
        return rows, marks
    finally:
        con.close()


def test_write_group_commits_pages_together(store: Store, db_path: Path) -> None:
    with store.write_group() as group:
        _stage(store, [obs(PJM, h) for h in range(3)], [mark("demand:PJM", 2)])
        _stage(store, [obs(PJM, h) for h in range(3, 6)], [mark("demand:PJM", 5)])
        assert _committed(db_path) == (0, [])  # nothing visible before the commit
        assert store.staging.watermarks() == {}
        group.commit()
        assert _committed(db_path) == (6, [("demand:PJM", ts(5))])
        _stage(store, [obs(PJM, 6)], [mark("demand:PJM", 6)])
        assert _committed(db_path) == (6, [("demand:PJM", ts(5))])
    assert _committed(db_path) == (7, [("demand:PJM", ts(6))])  # committed when it ends


def test_write_group_failed_block_is_undone_and_earlier_blocks_kept(
    store: Store, db_path: Path
) -> None:
    bad = (PJM, ts(9), None, "MW", "good", "r9", 0)  # no value and not flagged missing
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"), store.write_group():
        _stage(store, [obs(PJM, 0), obs(PJM, 1)], [mark("demand:PJM", 1)])
        _stage(store, [obs(PJM, 2), bad], [mark("demand:PJM", 9)])
    # Exactly what one transaction per page leaves: the first page and its watermark.
    assert _committed(db_path) == (2, [("demand:PJM", ts(1))])
    with store.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pages").scalar() == 1


def test_write_group_runs_commit_actions_only_for_what_commits(store: Store, db_path: Path) -> None:
    """What a fetch counts per page waits for the commit, and a commit that fails (here a
    deferred foreign key; on a full disk the WAL write) never counts its pages."""
    done: list[str] = []
    store.on_commit(lambda: done.append("alone"))  # no group: every write has committed
    assert done == ["alone"]
    with (
        pytest.raises(sqlalchemy.exc.IntegrityError, match="FOREIGN KEY"),
        store.write_group() as group,
    ):
        _stage(store, [obs(PJM, 0)])
        store.on_commit(lambda: done.append("first"))
        assert done == ["alone"]
        group.commit()
        assert done == ["alone", "first"]
        _stage(store, [obs(PJM, 1)])
        with store.write() as conn:  # points the row at a page that does not exist
            conn.exec_driver_sql("UPDATE observations SET page_id = 999 WHERE ts = ?", (ts(1),))
        store.on_commit(lambda: done.append("second"))
    assert done == ["alone", "first"]
    assert _committed(db_path)[0] == 1


def test_series_rows_offered_again_until_committed(store: Store, db_path: Path) -> None:
    """A stage leaves out of its series insert only the series a committed stage wrote:
    one rolled back with its page, or not yet committed by its write group, is offered
    again."""
    statements: list[str] = []

    @event.listens_for(store.engine, "connect")
    def trace(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    store.engine.dispose()

    def series_inserts() -> int:
        return sum("INTO series" in s for s in statements)

    bad = (PJM, ts(9), None, "MW", "good", "r9", 0)  # no value and not flagged missing
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        _stage(store, [obs(PJM, 0), bad])  # rolled back, its series row with it
    assert series_inserts() == 1
    with store.write_group() as group:
        _stage(store, [obs(PJM, 0)])
        _stage(store, [obs(PJM, 1)])  # the first is not committed yet: offered again
        assert series_inserts() == 3
        group.commit()
    _stage(store, [obs(PJM, 2)])
    assert series_inserts() == 3  # PJM is staged and committed: not offered again
    _stage(store, [obs(PJM, 3), obs(MISO, 3)])
    assert series_inserts() == 4  # MISO is new
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("SELECT series_id FROM series ORDER BY 1").fetchall() == [
            (MISO,),
            (PJM,),
        ]
    finally:
        con.close()


def test_write_group_is_per_thread_and_does_not_nest(store: Store, db_path: Path) -> None:
    with store.write_group() as group:
        _stage(store, [obs(PJM, 0)])
        with pytest.raises(StoreError, match="nest"), store.write_group():
            pass
        group.commit()
        # Another thread's write is a transaction of its own, committed at once.
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(_stage(store, [obs(MISO, 0)]).written))
        worker.start()
        worker.join(30)
        assert seen == [1]
        assert _committed(db_path)[0] == 2
        _stage(store, [obs(PJM, 1)])
        assert _committed(db_path)[0] == 2
    assert _committed(db_path)[0] == 3


def test_an_outcome_with_nothing_acknowledged_records_no_batch(store: Store, db_path: Path) -> None:
    _stage(store, [obs(PJM, 0)])
    assert store.delivery.record_outcome([], [(_key(obs(PJM, 0)), "INVALID_VALUE", "bad")]) == 1
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT count(*) FROM ack_log").fetchone() == (0,)
    con.close()
    assert _state(store, PJM, 0) == "dead"


def test_recorded_acks_reach_their_rows_when_applied(store: Store) -> None:
    rows = [obs(PJM, h, 10.0 + h) for h in range(4)]
    _stage(store, rows)
    dead = store.delivery.record_outcome(
        [_key(r) for r in rows[:3]], [(_key(rows[3]), "INVALID_VALUE", "bad")], now=ts(50)
    )
    assert dead == 1 and _state(store, PJM, 3) == "dead"  # dead-lettered at once
    assert [_state(store, PJM, h) for h in range(3)] == ["pending"] * 3
    assert store.delivery.unapplied_acks() == 3
    # EIA revises hour 1 before the acks are applied: the new revision stays pending.
    _stage(store, [obs(PJM, 1, 99.0)])
    assert store.delivery.apply_acks() == 2
    assert [_state(store, PJM, h) for h in range(3)] == ["acked", "pending", "acked"]
    # The minute of the ack counts the two rows it acknowledged (the report's backlog).
    assert _ack_minutes(store) == [(ts(50)[:16], 2, ts(2))]
    assert _queued_revision(store, PJM, 0) is None and _queued_revision(store, PJM, 2) is None
    assert (
        _queued_revision(store, PJM, 1) == obs(PJM, 1, 99.0)[5]
    )  # the entry left is the new revision's
    assert (
        store.delivery.unapplied_acks() == 0 and store.delivery.apply_acks() == 0
    )  # nothing left to apply


def test_a_recorded_ack_deletes_only_its_own_keys_inside_its_span(store: Store) -> None:
    """An ack reads the queue from its batch's first hour to its last: entries in that
    span it does not hold (a series claimed by no batch, a row deferred or dead, a row
    staged after the claim, another revision) are left as they are."""
    sids = [PJM, MISO, "EIA.SPP.demand", "EIA.ERCO.demand"]
    _stage(store, [obs(s, h) for s in sids[:3] for h in range(1, 5)])
    store.delivery.defer([_key(obs(MISO, 2))], ts(99), "503", code="SINK_UNAVAILABLE")
    reject(store, [(_key(obs(MISO, 3)), "VALUE_OUT_OF_RANGE", "no")])
    sent = [obs(PJM, h) for h in range(1, 5)] + [obs(MISO, 1), obs(MISO, 4)]
    # Staged after the claim, inside the span: a new series, and a new revision.
    _stage(store, [obs(sids[3], 2), obs(PJM, 3, 77.0)])
    # Out of order on purpose: the span comes from the keys, not from their order.
    store.delivery.record_outcome([_key(r) for r in reversed(sent)], now=ts(50))
    assert store.delivery.unapplied_acks() == 6
    assert store.delivery.apply_acks() == 5
    assert [_state(store, PJM, h) for h in range(1, 5)] == ["acked", "acked", "pending", "acked"]
    assert [_state(store, MISO, h) for h in range(1, 5)] == ["acked", "pending", "dead", "acked"]
    assert [_state(store, "EIA.SPP.demand", h) for h in range(1, 5)] == ["pending"] * 4
    assert _state(store, sids[3], 2) == "pending"
    assert _ack_minutes(store) == [(ts(50)[:16], 5, ts(4))]


def test_an_ack_reads_one_range_of_the_queue(store: Store, db_path: Path) -> None:
    """The ack statement's plan: the batch's span of the queue's primary key, no seek per
    key and no scan of the queue (which may hold millions of entries)."""
    from outbox.store.deliver import _ACK_RANGE, encode_acks

    con = sqlite3.connect(db_path)
    plan = [
        r[3]
        for r in con.execute(
            f"EXPLAIN QUERY PLAN {_ACK_RANGE}", (encode_acks([_key(obs(PJM, 1))]),)
        )
    ]
    con.close()
    assert plan[0] == "SEARCH queue USING PRIMARY KEY (ts>? AND ts<?)", plan
    assert not [line for line in plan if line.startswith("SCAN queue")], plan


def test_acks_recorded_in_the_format_before_0009_still_apply(store: Store, db_path: Path) -> None:
    """A send started before the upgrade to 0009 may still record a batch as arrays."""
    rows = [obs(PJM, h) for h in range(3)]
    _stage(store, rows)
    con = sqlite3.connect(db_path)
    with con:
        con.execute(
            "INSERT INTO ack_log (acked_at, keys) VALUES (?, ?)",
            (ts(50), json.dumps([list(_key(r)) for r in rows[:2]])),
        )
        con.execute("INSERT INTO ack_log (acked_at, keys) VALUES (?, '[]')", (ts(51),))
    con.close()
    assert store.delivery.unapplied_acks() == 2
    assert store.delivery.apply_acks() == 2
    assert [_state(store, PJM, h) for h in range(3)] == ["acked", "acked", "pending"]
    assert _ack_minutes(store) == [(ts(50)[:16], 2, ts(1))]
    assert store.delivery.unapplied_acks() == 0 and store.delivery.apply_acks() == 0


def test_recorded_keys_decode_as_they_were_recorded() -> None:
    from outbox.store.deliver import decode_acks, encode_acks

    keys = [Key(MISO, ts(3), "r3"), Key(PJM, ts(1), "r1"), Key("EIA.X-Y.z w", ts(2), "r2")]
    text = encode_acks(keys)
    assert decode_acks(text) == keys
    doc = json.loads(text)
    assert (doc["from"], doc["to"]) == (ts(1), ts(3))
    empty = encode_acks([])  # a span of nothing: its range statement deletes no row
    assert decode_acks(empty) == [] and json.loads(empty) == {"from": None, "to": None, "keys": []}
    old = '[["EIA.PJM.demand", "2026-01-01T00:00:00Z", "ab"]]'  # before migration 0009
    assert decode_acks(old) == [Key(PJM, "2026-01-01T00:00:00Z", "ab")]


def test_recorded_acks_apply_in_order_and_survive_reopen(store: Store, db_path: Path) -> None:
    _stage(store, [obs(PJM, h) for h in range(4)])
    store.delivery.record_outcome([_key(obs(PJM, h)) for h in range(2)], now=ts(50))
    store.delivery.record_outcome([_key(obs(PJM, h)) for h in range(2, 4)], now=ts(51))
    store.close()
    with Store.open(db_path) as again:  # as after a kill: the log is still there
        assert again.delivery.unapplied_acks() == 4
        assert again.delivery.apply_acks() == 4
        assert [_state(again, PJM, h) for h in range(4)] == ["acked"] * 4
        assert _ack_minutes(again) == [(ts(50)[:16], 2, ts(1)), (ts(51)[:16], 2, ts(3))]
