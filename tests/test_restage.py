"""Re-staging replayed pages that were staged whole before (the page digests)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from factories import ack

from outbox import normalize
from outbox.config import Config
from outbox.sources.replay import ReplaySource
from outbox.stages import fetcher
from outbox.stages.fetch import run_fetch
from outbox.store import Key, Store
from outbox.testing.synth import ROUTES, make_rows, write_pages

START = datetime(2025, 8, 21, tzinfo=UTC)


def config(mode: str = "thread") -> Config:
    base = Config()
    return base.model_copy(update={"eia": base.eia.model_copy(update={"replay_read_ahead": mode})})


def pages(directory: Path, rows: list[dict]) -> Path:
    write_pages(directory, ROUTES[0], rows, page_length=120)  # several pages
    return directory


@pytest.fixture
def rows() -> list[dict]:
    return make_rows(ROUTES[0], ["PJM", "CISO"], START, 24)


@pytest.fixture
def normalized(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The routes of the pages normalized in this process (thread read-ahead)."""
    calls: list[str] = []

    def counting(route: str, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append(route)
        return normalize.normalize_page(route, *args, **kw)

    monkeypatch.setattr(fetcher, "normalize_page", counting)
    yield calls


def table(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def observations(db: Path) -> list[tuple]:
    return table(db, "SELECT series_id, ts, value, revision, state FROM row_states ORDER BY 1, 2")


def target_of(rows: list[dict]) -> dict:
    return next(
        r
        for r in rows
        if r["respondent"] == "CISO" and r["type"] == "D" and r["period"] == "2025-08-21T13"
    )


def test_unchanged_restage_writes_nothing_and_normalizes_nothing(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict], normalized: list[str]
) -> None:
    directory = pages(tmp_path / "v1", rows)
    first = run_fetch(config(), store, ReplaySource(directory))
    assert first.written == first.rows == len(rows) and first.pages > 1
    assert len(normalized) == first.pages
    before = observations(db_path), table(db_path, "SELECT * FROM watermarks ORDER BY 1")
    normalized.clear()
    again = run_fetch(config(), store, ReplaySource(directory))
    assert again.written == 0 and normalized == []
    assert (again.rows, again.pages, again.duplicates) == (first.rows, first.pages, 0)
    assert (observations(db_path), table(db_path, "SELECT * FROM watermarks ORDER BY 1")) == before


def test_a_known_page_still_advances_its_watermarks(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict], normalized: list[str]
) -> None:
    directory = pages(tmp_path / "v1", rows)
    run_fetch(config(), store, ReplaySource(directory))
    marks = table(db_path, "SELECT stream, last_ts FROM watermarks ORDER BY 1")
    assert marks and all(ts == "2025-08-21T23:00:00Z" for _, ts in marks)
    con = sqlite3.connect(db_path)
    con.execute("DELETE FROM watermarks")
    con.commit()
    con.close()
    normalized.clear()
    again = run_fetch(config(), store, ReplaySource(directory))
    assert again.written == 0 and normalized == []
    assert table(db_path, "SELECT stream, last_ts FROM watermarks ORDER BY 1") == marks


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_one_changed_value_in_an_identical_page_is_staged_and_ledgered(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict], mode: str
) -> None:
    run_fetch(config(mode), store, ReplaySource(pages(tmp_path / "v1", rows)))
    ack(store, [Key(c.series_id, c.ts, c.revision) for c in store.delivery.claim(10_000)])
    target = target_of(rows)
    old = float(target["value"])
    target["value"] = str(int(target["value"]) + 250)
    result = run_fetch(config(mode), store, ReplaySource(pages(tmp_path / "v2", rows)))
    assert result.written == 1
    pending = store.delivery.claim(10_000)
    assert [(c.series_id, c.ts, c.value) for c in pending] == [
        ("EIA.CAISO.demand", "2025-08-21T13:00:00Z", float(target["value"]))
    ]
    ledger = table(db_path, "SELECT series_id, ts, old_value, new_value FROM revisions")
    assert ledger == [("EIA.CAISO.demand", "2025-08-21T13:00:00Z", old, float(target["value"]))]


def test_a_page_known_before_a_revision_is_staged_again_in_full(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict], normalized: list[str]
) -> None:
    v1 = pages(tmp_path / "v1", rows)
    run_fetch(config(), store, ReplaySource(v1))
    original = observations(db_path)
    target = target_of(rows)
    target["value"] = str(int(target["value"]) + 250)
    assert run_fetch(config(), store, ReplaySource(pages(tmp_path / "v2", rows))).written == 1
    normalized.clear()
    # v1's pages were remembered before the revision: replaying them puts the old value back.
    again = run_fetch(config(), store, ReplaySource(v1))
    assert again.written == 1 and len(normalized) == again.pages
    assert [r[:4] for r in observations(db_path)] == [r[:4] for r in original]


def test_rows_pruned_since_are_staged_again(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict]
) -> None:
    directory = pages(tmp_path / "v1", rows)
    run_fetch(config(), store, ReplaySource(directory))
    ack(store, [Key(c.series_id, c.ts, c.revision) for c in store.delivery.claim(10_000)])
    store.upkeep.prune_before("2025-08-21T12:00:00Z")
    kept = len(observations(db_path))
    assert 0 < kept < len(rows)
    again = run_fetch(config(), store, ReplaySource(directory))
    assert again.written == len(rows) - kept
    assert len(observations(db_path)) == len(rows)


def test_a_prune_that_deletes_nothing_keeps_the_digests(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict], normalized: list[str]
) -> None:
    """Every send prunes; one that finds nothing past retention leaves re-stage cheap."""
    directory = pages(tmp_path / "v1", rows)
    first = run_fetch(config(), store, ReplaySource(directory))
    ack(store, [Key(c.series_id, c.ts, c.revision) for c in store.delivery.claim(10_000)])
    digests = table(db_path, "SELECT key FROM meta WHERE key LIKE 'page_digest:%'")
    assert len(digests) == first.pages
    assert store.upkeep.prune_before("2025-08-20T00:00:00Z")[0] == 0  # before every row
    assert table(db_path, "SELECT key FROM meta WHERE key LIKE 'page_digest:%'") == digests
    normalized.clear()
    again = run_fetch(config(), store, ReplaySource(directory))
    assert again.written == 0 and normalized == []


def test_another_ba_configured_since_is_staged(
    store: Store, db_path: Path, tmp_path: Path, rows: list[dict]
) -> None:
    directory = pages(tmp_path / "v1", rows)
    only_pjm = config().model_copy(update={"balancing_authorities": {"PJM": "PJM"}})
    first = run_fetch(only_pjm, store, ReplaySource(directory))
    assert 0 < first.written < len(rows)
    again = run_fetch(config(), store, ReplaySource(directory))
    assert again.written == len(rows) - first.written
