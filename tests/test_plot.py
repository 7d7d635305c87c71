"""``outbox plot`` and the sparkline of ``outbox show``: real outboxes, real processes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from outbox.plot import literal_glob, segments, sparkline
from outbox.sample import sample_dir
from tests.durability import outbox, outbox_env


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("plot") / "outbox.db"
    assert outbox("fetch", "--replay", str(sample_dir()), env=outbox_env(db)).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute(
            "DELETE FROM observations WHERE series_id = 'EIA.PJM.demand'"
            " AND ts IN ('2025-08-21T10:00:00Z', '2025-08-21T11:00:00Z')"
        )
    return db


def test_a_gap_splits_the_line() -> None:
    rows = [
        ("A", "2025-08-21T00:00:00Z", 1.0),
        ("A", "2025-08-21T01:00:00Z", 2.0),
        ("A", "2025-08-21T03:00:00Z", 3.0),  # 02:00 absent
        ("A", "2025-08-21T04:00:00Z", None),  # EIA's null
        ("A", "2025-08-21T05:00:00Z", 5.0),
    ]
    runs = segments(rows)["A"]
    assert [[ts[11:13] for ts, _ in run] for run in runs] == [["00", "01"], ["03"], ["05"]]


def test_sparkline_heights_and_gaps() -> None:
    assert sparkline([0.0, 7.0, None, 3.5]) == "▁█ ▅"
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert sparkline([None, None]) == "  "
    assert literal_glob("EIA.A*B?[x]") == "EIA.A[*]B[?][[]x]"


def test_plot_overlays_series_in_the_terminal(staged: Path) -> None:
    done = outbox(
        "plot", "EIA.PJM.demand*", env={**outbox_env(staged), "COLUMNS": "120", "LINES": "40"}
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("EIA.PJM.demand*: 2025-08-14T23h .. 2025-08-21T23h UTC")
    assert "EIA.PJM.demand" in done.stdout and "EIA.PJM.demand_forecast" in done.stdout
    assert "\x1b[" not in done.stdout  # no colour codes into a pipe
    assert max(len(line) for line in lines) <= 120


@pytest.mark.parametrize(
    ("glob", "fragment"),
    [("nothing.*", "no series matches 'nothing.*'"), ("EIA.*", "matches 99 series")],
)
def test_plot_bad_glob_is_one_line(staged: Path, glob: str, fragment: str) -> None:
    done = outbox("plot", glob, env=outbox_env(staged))
    assert done.returncode == 2
    assert fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_show_prints_a_sparkline_around_the_row(staged: Path) -> None:
    done = outbox("show", "EIA.PJM.demand", "2025-08-21T12:00:00Z", env=outbox_env(staged))
    assert done.returncode == 0, done.stderr
    around = json.loads(done.stdout)["around"]
    assert around["from"] == "2025-08-21T00:00:00Z" and around["to"] == "2025-08-22T00:00:00Z"
    line = around["sparkline"]
    # 12 hours before, the row's hour bracketed, 12 after: 10:00 and 11:00 are gaps, and
    # nothing is staged past the sample day's 23:00.
    assert len(line) == 27 and line[12] == "[" and line[14] == "]"
    assert line[10:12] == "  " and line[-1] == " "
    assert around["min"] is not None and around["min"] < around["max"]
