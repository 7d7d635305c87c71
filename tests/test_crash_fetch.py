"""Fetch crash matrix: SIGKILL ``outbox fetch`` (replay, and live against a stand-in EIA
server in its own process) at named crash points and at random times.

``live`` fetches one request after another (``eia.max_in_flight=1``); ``inflight`` keeps
four requests in flight against a stand-in that holds each answer 0.3 s (so a kill finds
pages fetched, in flight and buffered out of order, none of them staged yet).

After every kill, before anything else runs: the file passes ``integrity_check`` and no
watermark is ahead of the rows it covers (every reference row of the stream at or before
the watermark is staged, at its revision). After a clean rerun the outbox equals an
uninterrupted run's, row for row. ``pytest -m soak`` runs >= 200 random kills.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from durability import (
    OBS_COLUMNS,
    await_run,
    connect,
    expected_streams,
    fake_eia_process,
    integrity,
    outbox,
    outbox_env,
    processes_naming,
    route_rows,
    rows,
    spawn,
    watermark_violations,
    work_seconds,
    write_replay,
)

from outbox.config import Config
from outbox.sources.eia import EIAClient
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.stages.fetcher import Fetcher
from outbox.store import Store
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import read_rows

HOURS = 48
POINTS = ("fetch.page_fetched", "stage.rows_written", "stage.before_commit")
# Replay pages keep their page ids across a kill and a rerun; a live rerun asks EIA for a
# different window (watermark minus look-back), so its pages differ: compare the rows.
COLUMNS = {
    "replay": (*OBS_COLUMNS, "page_id", "page_row"),
    "live": OBS_COLUMNS,
    "inflight": OBS_COLUMNS,
}
RANDOM_TRIALS = {
    "replay": {"ci": 4, "soak": 200},
    "live": {"ci": 2, "soak": 80},
    "inflight": {"ci": 3, "soak": 80},
}
IN_FLIGHT = {"live": "1", "inflight": "4"}
ANSWER_DELAY = {"live": 0.0, "inflight": 0.3}
NAMED_CHAINS = {"ci": 1, "soak": 8}


@dataclass
class Source:
    """How to run one clean fetch of the test data, and what that run leaves."""

    mode: str
    data: Path
    base_url: str | None
    pages: int
    reference: Path
    seconds: float = 0.0

    def env(self, db: Path, **extra: str) -> dict[str, str]:
        """Environment of a fetch into ``db``."""
        if self.mode == "replay":
            return outbox_env(db, **extra)
        return outbox_env(
            db,
            eia_base=self.base_url,
            OUTBOX__EIA__HISTORY_START="2025-06-01T00:00:00Z",
            OUTBOX__EIA__PAGE_LENGTH="1000",
            OUTBOX__EIA__MAX_IN_FLIGHT=IN_FLIGHT[self.mode],
            **({"OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5"} if self.mode == "inflight" else {}),
            **extra,
        )

    def args(self) -> tuple[str, ...]:
        """The fetch command line."""
        return ("fetch", "--replay", str(self.data)) if self.mode == "replay" else ("fetch",)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 hours of the five BAs on every route, 500 rows a page (about 4,800 rows)."""
    return write_replay(tmp_path_factory.mktemp("eia"), route_rows(HOURS))


@pytest.fixture(scope="module", params=["replay", "live", "inflight"])
def source(
    request: pytest.FixtureRequest, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Source]:
    """A clean, uninterrupted fetch of the data: the reference every rerun must equal."""
    work = tmp_path_factory.mktemp(f"ref-{request.param}")
    reference = work / "reference.db"
    if request.param == "replay":
        yield _clean(Source("replay", data_dir, None, 0, reference))
        return
    with fake_eia_process(data_dir, delay=ANSWER_DELAY[request.param]) as base_url:
        yield _clean(Source(request.param, data_dir, base_url, 0, reference))


def _clean(src: Source) -> Source:
    src.seconds = work_seconds(*src.args(), env=src.env(src.reference), db=src.reference)
    with connect(src.reference) as con:
        src.pages = con.execute("SELECT count(*) FROM pages").fetchone()[0]
    assert src.pages >= 5
    return src


def check_after_kill(db: Path, expected: dict) -> None:
    """The invariants that must hold at any instant a fetch can die."""
    if not db.exists():
        return
    assert integrity(db) == "ok"
    assert watermark_violations(db, expected) == []


def rerun_and_compare(src: Source, db: Path) -> tuple[int, int]:
    """A clean rerun; then the outbox must equal the reference. Returns (rows, lost)."""
    done = outbox(*src.args(), env=src.env(db))
    assert done.returncode == 0, done.stderr
    want, got = rows(src.reference, COLUMNS[src.mode]), rows(db, COLUMNS[src.mode])
    lost = len(set(want) - set(got))
    assert got == want
    assert _marks(db) == _marks(src.reference)
    assert _series(db) == _series(src.reference)
    return len(got), lost


def _marks(db: Path) -> list[tuple]:
    with connect(db) as con:
        return con.execute(
            "SELECT stream, dataset, respondent, route, last_ts FROM watermarks ORDER BY 1"
        ).fetchall()


def _series(db: Path) -> list[tuple]:
    with connect(db) as con:
        return con.execute(
            "SELECT series_id, ba, type, subtype, units, route, facets FROM series ORDER BY 1"
        ).fetchall()


def _fresh(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_reference_watermarks_cover_their_rows(source: Source) -> None:
    expected = expected_streams(source.reference)
    assert watermark_violations(source.reference, expected) == []
    assert len(expected) == 30 and all(expected.values())


def test_sigkill_fetch_at_random_times(source: Source, scale: str, tmp_path: Path, figures) -> None:
    expected = expected_streams(source.reference)
    rng = random.Random(f"fetch-{source.mode}-{scale}")
    trials = RANDOM_TRIALS[source.mode][scale]
    kills = compared = total_rows = lost = 0
    db = tmp_path / "outbox.db"
    episode_left = 0
    for _trial in range(trials):
        if episode_left == 0:  # a fresh outbox, killed one to three times in a row
            _fresh(db)
            episode_left = rng.randint(1, 3)
        # A replay commits its pages in groups: one page or four pages a commit (these
        # 4,800 rows are a single group at the default size; test_fetch.py kills that).
        commit_rows = rng.choice(("1", "2000"))
        proc = spawn(
            *source.args(), env=source.env(db, OUTBOX__EIA__REPLAY_COMMIT_ROWS=commit_rows)
        )
        await_run(db, proc)
        time.sleep(rng.uniform(0.0, _kill_window(source, db)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(60)
        kills += code == -signal.SIGKILL
        check_after_kill(db, expected)
        episode_left -= 1
        if episode_left == 0:
            n, missing = rerun_and_compare(source, db)
            compared, total_rows, lost = compared + 1, total_rows + n, lost + missing
    if episode_left:
        n, missing = rerun_and_compare(source, db)
        compared, total_rows, lost = compared + 1, total_rows + n, lost + missing
    figures(
        suite="fetch-random",
        mode=source.mode,
        trials=trials,
        kills=kills,
        reruns=compared,
        rows=total_rows,
        lost=lost,
        duplicates=0,
    )
    assert kills >= trials // 2, f"only {kills} of {trials} fetches were killed mid-run"
    if source.mode == "replay":
        assert processes_naming(f"--replay {source.data}") == [], "a killed fetch left a process"


def test_sigkill_fetch_at_named_points(source: Source, scale: str, tmp_path: Path, figures) -> None:
    """Each chain crashes at every named point in turn, each time later in the run,
    resuming from what the previous crash left; then one clean rerun."""
    expected = expected_streams(source.reference)
    rng = random.Random(f"named-{source.mode}-{scale}")
    chains = NAMED_CHAINS[scale]
    total_rows = lost = kills = finished = 0
    for n in range(chains):
        db = tmp_path / f"crash{n}.db"
        for point in rng.sample(POINTS, len(POINTS)):
            before = _pages(db)
            # A replay rerun passes the pages it already holds without storing them again.
            first = before + 1 if source.mode == "replay" else 1
            after = rng.randint(first, source.pages)
            # One commit per replayed page, so that exactly the pages before the crash
            # survive (grouped commits: tests/test_fetch.py::test_sigkill_at_named_points).
            crashed = outbox(
                *source.args(),
                env=source.env(
                    db,
                    OUTBOX_CRASH_AT=point,
                    OUTBOX_CRASH_AFTER=str(after),
                    OUTBOX__EIA__REPLAY_COMMIT_ROWS="1",
                ),
            )
            if crashed.returncode == 0 and source.mode != "replay" and before:
                # A live rerun asks EIA only from its watermarks on: it can hold fewer
                # pages than the point's count, and then it ends before the point. Only
                # that may end a run of the chain unkilled (each point is hit at most
                # once a page); the outbox it leaves is checked all the same.
                assert after > _run_pages(crashed.stdout), crashed.stdout
                finished += 1
            else:
                assert crashed.returncode == -signal.SIGKILL, crashed.stderr
                kills += 1
            check_after_kill(db, expected)
            if source.mode == "replay":
                assert _pages(db) == max(before, after - 1), "only committed pages survive"
        got, missing = rerun_and_compare(source, db)
        total_rows, lost = total_rows + got, lost + missing
    # the first run of every chain, on a fresh outbox, holds every page: it is killed
    assert kills >= chains and kills + finished == chains * len(POINTS)
    figures(
        suite="fetch-named",
        mode=source.mode,
        trials=kills + finished,
        kills=kills,
        rows=total_rows,
        lost=lost,
        duplicates=0,
    )


def _run_pages(stdout: str) -> int:
    """The pages a finished fetch run reports (``fetch run N: R requests, P pages, ...``)."""
    found = re.search(r"^fetch run \d+: \d+ requests, (\d+) pages", stdout, flags=re.M)
    assert found, stdout
    return int(found.group(1))


def _kill_window(source: Source, db: Path) -> float:
    """The seconds a kill time is drawn from: the run's work still to do, so that kills
    land mid-run rather than after it ended. A fetch resuming what a kill left does less:
    a live one asks only for the pages not staged, and a replay reads the staged pages
    again but skips them by digest (about a third of the cost of staging them)."""
    left = 1.0 - min(_pages(db), source.pages) / source.pages
    if source.mode == "replay":
        left += (1.0 - left) / 3
    return source.seconds * 1.1 * max(left, 0.2)


def _pages(db: Path) -> int:
    if not db.exists():
        return 0
    with connect(db) as con:
        return con.execute("SELECT count(*) FROM pages").fetchone()[0]


@pytest.mark.parametrize("mode", ["replay", "live", "inflight"])
def test_watermarks_cover_their_rows_after_every_committed_page(
    mode: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page commit is an instant a kill can follow: check the invariant at each.

    Multi-series streams (fuel mix, BA-to-BA interchange) split an hour across two pages;
    a watermark that reached that hour after the first page would be ahead of its rows.
    """
    reference = tmp_path / "reference.db"
    with Store.open(reference) as store:
        run_fetch(Config(), store, ReplaySource(data_dir))
    expected = expected_streams(reference)
    db = tmp_path / "outbox.db"
    checked: list[int] = []
    original = Fetcher._stage

    def stage_then_check(self: Fetcher, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        assert watermark_violations(db, expected) == [], f"after page {len(checked) + 1}"
        checked.append(1)

    monkeypatch.setattr(Fetcher, "_stage", stage_then_check)
    config = Config.model_validate(
        {"eia": {"history_start": "2025-06-01T00:00:00Z", "backfill_chunk_hours": 100000}}
    )
    with Store.open(db) as store:
        if mode == "replay":
            run_fetch(config, store, ReplaySource(data_dir))
        else:
            delay = 0.1 if mode == "inflight" else 0.0
            with FakeEIA(read_rows(data_dir), delay=delay) as fake, httpx.Client() as http:
                assert fake.base_url is not None
                client = EIAClient(
                    http,
                    fake.base_url,
                    None,
                    page_length=700,
                    max_per_second=50,
                    max_in_flight=4 if mode == "inflight" else 1,
                    sleep=lambda s: None,
                )
                run_fetch(config, store, client)
    assert len(checked) >= 7
    assert rows(db, OBS_COLUMNS[:6]) == rows(reference, OBS_COLUMNS[:6])
