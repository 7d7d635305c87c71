"""outbox status: the model, its four outputs, --remote, and that it only ever reads.

Golden files live in tests/data/golden/; regenerate them after a deliberate change with
``GOLDEN_UPDATE=1 python -m pytest tests/test_status.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from durability import outbox
from factories import ack, mark, obs, page, reject, series_row, ts
from freezegun import freeze_time
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event
from typer.testing import CliRunner

from outbox import status as status_mod
from outbox.cli import app
from outbox.config import load_config
from outbox.store import ProgressUpdate, Store, file_lock, lock_file
from outbox.timeutil import parse_ts

GOLDEN = Path(__file__).parent / "data" / "golden"
NOW = "2025-08-22T12:00:00Z"
STAGED_AT = "2025-08-22T10:05:00Z"
GP = "https://gp.test"
CONFIG = """\
database: outbox.db
balancing_authorities: {PJM: PJM, CAISO: CISO}
datasets:
  net_generation: {enabled: false}
  interchange: {enabled: false}
gridpulse: {base_url: "https://gp.test", api_key: gp-secret-key-1234}
"""
runner = CliRunner()


# -- the prepared outbox --------------------------------------------------------------

SERIES = {
    # series_id: hours staged (T0 = 2025-08-22T00Z)
    "EIA.PJM.demand": range(0, 11),  # 0-5 acked, 6 dead, 7-10 pending (7, 8 deferred)
    "EIA.CAISO.demand": range(0, 3),  # all acked; newest 10 h old: stale (warning)
    "EIA.PJM.demand_forecast": range(0, 41),  # 0-11 acked; newest is 28 h ahead
    "EIA.PJM.generation.solar": range(0, 10),  # all acked
    "EIA.PJM.generation.wind": range(0, 10),  # hour 9 pending
    "EIA.PJM.interchange.CAISO": range(0, 9),  # ba_interchange, all acked
    "EIA.PJM.interchange": range(0, 4),  # total interchange: dataset disabled
    "EIA.MISO.demand": range(0, 2),  # a BA no longer configured
}
UNACKED = {
    "EIA.PJM.demand": set(range(6, 11)),
    "EIA.PJM.demand_forecast": set(range(12, 41)),
    "EIA.PJM.generation.wind": {9},
}


def key(series_id: str, hour: int) -> tuple[str, str, str]:
    row = obs(series_id, hour)
    return (row[0], row[1], row[5])


def prepare(path: Path) -> None:
    """Stage, ack, dead-letter and defer rows; one ok fetch run and two failed sends."""
    with Store.open(path) as store:
        run = store.runs.start_run("fetch", now="2025-08-22T10:04:00Z")
        rows = [obs(sid, h) for sid, hours in SERIES.items() for h in hours]
        store.staging.stage(
            rows,
            series_rows=[series_row(sid) for sid in SERIES],
            page=page(),
            watermark_updates=[mark("demand:PJM", 10), mark("demand:CISO", 2)],
            # EIA answered CAISO's day-ahead forecast through 10:00, with no rows.
            progress_updates=[
                ProgressUpdate("demand_forecast:CISO", "demand_forecast", "CISO", ts(10))
            ],
            run_id=run,
            now=STAGED_AT,
        )
        counts = {"requests": 3, "pages": 3, "rows": len(rows), "written": len(rows)}
        store.runs.finish_run(run, "ok", {**counts, "invalid": 2}, now="2025-08-22T10:05:30Z")
        acked = [
            key(sid, h)
            for sid, hours in SERIES.items()
            for h in hours
            if h not in UNACKED.get(sid, ())
        ]
        ack(store, acked, now="2025-08-22T10:10:00Z")
        reject(store, [(key("EIA.PJM.demand", 6), "VALUE_OUT_OF_RANGE", "value -5 below 0")])
        store.delivery.defer(
            [key("EIA.PJM.demand", 7), key("EIA.PJM.demand", 8)],
            "2025-08-22T12:30:00Z",
            "SINK_UNAVAILABLE: GridPulse connection failed",
            code="SINK_UNAVAILABLE",
        )
        for started in ("2025-08-22T10:10:00Z", "2025-08-22T11:10:00Z"):
            run = store.runs.start_run("send", now=started)
            store.runs.finish_run(
                run,
                "failed",
                {"batches": 1, "requests": 4, "sent": 2, "acked": 0},
                "GridPulse unavailable: connection failed on https://gp.test/x?token=tok-secret",
                now=started.replace(":10:00", ":10:42"),
            )


@pytest.fixture
def outbox_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prepared outbox and its config in the working directory (relative paths)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(CONFIG)
    prepare(tmp_path / "outbox.db")
    return tmp_path


def invoke(*args: str, columns: int = 80) -> Any:
    return runner.invoke(app, ["-c", "config.yaml", *args], env={"COLUMNS": str(columns)})


def normalize(text: str) -> str:
    """Trailing blanks off; the file size and pids vary by SQLite build and process, the
    free disk space from one moment to the next."""
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    text = re.sub(r"\(\d+(\.\d)? [kM]B,", "(<size>,", text)
    text = re.sub(r"; \d+(\.\d)? [kMGT]B free\)", "; <free> free)", text)
    return re.sub(r'"(database_bytes|disk_free_bytes|pid)": \d+', r'"\1": 0', text)


def golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GOLDEN_UPDATE"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"{path} is missing: run with GOLDEN_UPDATE=1"
    assert actual == path.read_text()


# -- golden outputs -----------------------------------------------------------------


@freeze_time(NOW)
@pytest.mark.parametrize("columns", [80, 120])
def test_status_table_golden(outbox_dir: Path, columns: int) -> None:
    result = invoke("status", columns=columns)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= columns
    assert "…" not in result.stdout  # nothing truncated
    golden(f"status-{columns}.txt", normalize(result.stdout))


@freeze_time(NOW)
def test_status_json_golden(outbox_dir: Path) -> None:
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema_version"] == status_mod.SCHEMA_VERSION
    golden("status.json", normalize(result.stdout))


@freeze_time(NOW)
def test_status_model_semantics(outbox_dir: Path) -> None:
    """The numbers behind the goldens, spelled out."""
    model = status_mod.read(load_config("config.yaml"))
    groups = {(g.dataset, g.ba): g for g in model.groups}
    pjm = groups["demand", "PJM"]
    assert (pjm.pending, pjm.dead, pjm.newest_acked) == (4, 1, ts(5))
    assert pjm.delivered_through == ts(6)  # the dead row counts as delivered
    assert pjm.freshness_state == "ok" and pjm.freshness_seconds == 2 * 3600
    assert groups["demand", "CAISO"].freshness_state == "warning"
    forecast = groups["demand_forecast", "PJM"]
    assert forecast.freshness_seconds == -28 * 3600 and forecast.freshness_state == "ok"
    generation = groups["generation", "PJM"]
    # Two series, the wind one pending at 09:00: delivered through 08:00 for the group.
    assert (generation.series, generation.delivered_through) == (2, ts(8))
    assert groups["interchange", "PJM"].freshness_state == "disabled"  # dataset disabled
    assert groups["demand", "MISO"].freshness_state == "disabled"  # BA not configured
    assert model.missing == [
        {"dataset": "demand_forecast", "ba": "CAISO", "asked_through": ts(10)},
        {"dataset": "generation", "ba": "CAISO", "asked_through": None},
        {"dataset": "ba_interchange", "ba": "CAISO", "asked_through": None},
    ]
    assert model.totals == {"series": 8, "pending": 34, "dead": 1, "acks_unapplied": 0}
    assert (model.oldest_pending, model.oldest_pending_since) == (ts(7), STAGED_AT)
    assert model.oldest_pending_age_seconds == 6900
    assert model.next_retry_at == "2025-08-22T12:30:00Z"
    assert model.consecutive_failures == {"fetch": 0, "send": 2}
    assert model.invalid_last_fetch == 2
    assert "tok-secret" not in json.dumps(model.to_dict())


@freeze_time(NOW)
def test_acks_a_stopped_send_left_unapplied_are_shown(outbox_dir: Path) -> None:
    # A send killed between recording GridPulse's acknowledgement and marking the rows
    # leaves them pending in the table; status says how many are in fact acknowledged.
    keys = [key("EIA.PJM.demand_forecast", h) for h in range(12, 22)]
    with Store.open(outbox_dir / "outbox.db") as store:
        store.delivery.record_outcome(keys, now="2025-08-22T11:50:00Z")
    model = status_mod.read(load_config("config.yaml"))
    assert model.totals == {"series": 8, "pending": 34, "dead": 1, "acks_unapplied": 10}
    shown = invoke("status", columns=120)
    assert "acknowledged, not yet marked: 10 rows" in shown.stdout
    assert invoke("status", "--metrics", "outbox.prom").exit_code == 0
    assert "\noutbox_acks_unapplied_rows 10\n" in (outbox_dir / "outbox.prom").read_text()
    with Store.open(outbox_dir / "outbox.db") as store:
        assert store.delivery.apply_acks() == 10
    model = status_mod.read(load_config("config.yaml"))
    assert model.totals == {"series": 8, "pending": 24, "dead": 1, "acks_unapplied": 0}
    assert "not yet marked" not in invoke("status", columns=120).stdout


def test_status_reads_a_schema_from_before_the_ack_log(outbox_dir: Path) -> None:
    from outbox.store.migrate import downgrade

    with Store.open(outbox_dir / "outbox.db") as store:
        downgrade(store, "0002")
    model = status_mod.read(load_config("config.yaml"))
    assert (model.outbox_schema, model.totals["acks_unapplied"]) == ("0002", 0)
    assert model.totals["pending"] == 34


def test_a_reader_open_across_the_upgrade_to_the_queue_reads_the_new_schema(
    outbox_dir: Path,
) -> None:
    """A read-only store opened on a 0007 outbox (its queue: temporary views) that another
    process upgrades meanwhile reads the real queue afterwards, not the views."""
    from outbox.store.migrate import downgrade

    path = outbox_dir / "outbox.db"
    with Store.open(path) as store:
        want = store.reads.counts()
        downgrade(store, "0007")
    reader = Store.open_readonly(path)
    try:
        assert reader.reads.counts() == want  # through the views over observations.state
        Store.open(path).close()  # a fetch or send migrates the file to head
        assert reader.reads.counts() == want
        assert reader.delivery.count_pending() == want["pending"]
        with reader.read() as conn:
            temp = conn.exec_driver_sql("SELECT name FROM sqlite_temp_master").all()
        assert temp == []
    finally:
        reader.close()


# -- times, totals and piped output -------------------------------------------------------


@freeze_time("2026-01-02T00:00:00Z")
def test_times_outside_this_year_carry_the_year_and_the_hour(outbox_dir: Path) -> None:
    out = invoke("status", columns=200).stdout.splitlines()
    rule = next(i for i, line in enumerate(out) if line.startswith("───"))
    totals = next(i for i, line in enumerate(out) if line.startswith("totals:"))
    rows = [line.split() for line in out[rule + 1 : totals]]
    assert rows[2][:6] == ["demand", "PJM", "2025-08-22", "10:00", "2025-08-22", "05:00"]
    assert re.search(r"\b\d{4}-\d\d-\d\d(?![ T]\d\d:\d\d)", "\n".join(out)) is None
    assert "last fetch: run 1 ok at 2025-08-22 10:04, 1m 30s" in "\n".join(out)
    # The totals line counts what the table shows: its rows, and their pending and dead sums.
    pending, dead = (sum(int(r[column]) for r in rows) for column in (8, 9))
    assert (pending, dead) == (34, 1)
    assert out[totals] == f"totals: 8 series in {len(rows)} rows, 34 pending, 1 dead"
    runs = invoke("runs", columns=200).stdout
    assert "  3 send  2025-08-22 11:10 42.00s failed" in runs
    assert status_mod.compact_ts("2025-12-31T23:00:00Z", parse_ts("2025-08-22T12:00:00Z")) == (
        "12-31 23:00"
    )


LONG_ERROR = "GridPulse unavailable: " + ", ".join(
    f"attempt {n} refused by the proxy" for n in range(6)
)


def test_piped_output_keeps_every_line_whole(outbox_dir: Path) -> None:
    """With stdout a pipe (and no $COLUMNS), status, runs and --check lines are not broken
    at 80 columns: a 200-character error and the long check line each stay on one line."""
    assert len(LONG_ERROR) > 200
    with Store.open(outbox_dir / "outbox.db") as store:
        run = store.runs.start_run("send", now="2025-08-22T11:40:00Z")
        store.runs.finish_run(run, "failed", {"batches": 1}, LONG_ERROR, now="2025-08-22T11:40:05Z")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def piped(*args: str) -> tuple[int, list[str]]:
        done = outbox("-c", "config.yaml", *args, env=env, cwd=outbox_dir, timeout=60)
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, done.stdout.splitlines()

    code, check = piped("status", "--check")
    assert code == 2 and len(check) == 1 and len(check[0]) > 80, check
    code, status = piped("status")
    assert code == 0
    assert f"check: {check[0]}" in status
    last_send = next(line for line in status if line.startswith("last send:"))
    assert last_send.endswith(f"{LONG_ERROR} [3 failed in a row]")
    code, runs = piped("runs")
    assert code == 0
    assert any(line.endswith(f"failed {LONG_ERROR}") for line in runs), runs


# -- --check ------------------------------------------------------------------------


@freeze_time(NOW)
def test_check_reads_less_and_judges_the_same(outbox_dir: Path) -> None:
    # The probe skips the per-series pending counts (a sort of the pending index, seconds
    # with millions pending) but reaches the same verdict on the same totals.
    config = load_config("config.yaml")
    full = status_mod.read(config)
    light = status_mod.read(config, for_check=True)
    assert status_mod.evaluate(config, light) == status_mod.evaluate(config, full)
    assert light.totals == full.totals
    assert light.oldest_pending_age_seconds == full.oldest_pending_age_seconds == 6900
    assert [(g.dataset, g.ba, g.freshness_state) for g in light.groups] == [
        (g.dataset, g.ba, g.freshness_state) for g in full.groups
    ]
    assert {s.pending for s in light.series} == {0}  # not read
    assert {g.delivered_through for g in light.groups} == {None}
    queries: list[str] = []
    with Store.open_readonly(outbox_dir / "outbox.db") as store:
        event.listen(
            store.engine,
            "connect",
            lambda dbapi, _r: dbapi.set_trace_callback(queries.append),
        )
        store.engine.dispose()
        status_mod.collect(config, store, for_check=True)
    assert not [q for q in queries if "GROUP BY series_id" in q and "pending" in q]


def check(tmp_path: Path, config: str = CONFIG) -> tuple[int, str]:
    (tmp_path / "config.yaml").write_text(config)
    result = runner.invoke(app, ["-c", str(tmp_path / "config.yaml"), "status", "--check"])
    return result.exit_code, result.output


def one_series(path: Path, series_id: str, newest: int, *, acked: bool = True) -> None:
    with Store.open(path) as store:
        rows = [obs(series_id, h) for h in range(newest - 2, newest + 1)]
        store.staging.stage(rows, series_rows=[series_row(series_id)], now=ts(newest))
        if acked:
            ack(store, [(r[0], r[1], r[5]) for r in rows], now=ts(newest))


ONLY_DEMAND = """\
database: {db}
balancing_authorities: {{PJM: PJM}}
datasets:
  demand_forecast: {{enabled: false}}
  net_generation: {{enabled: false}}
  interchange: {{enabled: false}}
  generation: {{enabled: false}}
  ba_interchange: {{enabled: false}}
status: {{dead_rows_critical: 3, failed_runs_critical: 3}}
"""


def test_check_brand_new_outbox_is_ok(tmp_path: Path) -> None:
    Store.open(tmp_path / "new.db").close()
    assert check(tmp_path, ONLY_DEMAND.format(db=tmp_path / "new.db")) == (
        0,
        "OK - 0 series, 0 pending, 0 dead\n",
    )


@pytest.mark.parametrize(
    ("age_hours", "expected"),
    [
        (2, (0, "OK - 1 series, 0 pending, 0 dead\n")),
        (9, (1, "WARNING - demand stale 9h (PJM; warn > 8h)\n")),
        (30, (2, "CRITICAL - demand stale 30h (PJM; crit > 26h)\n")),
    ],
)
def test_check_stale_demand(tmp_path: Path, age_hours: int, expected: tuple[int, str]) -> None:
    db = tmp_path / "o.db"
    one_series(db, "EIA.PJM.demand", 10)
    with freeze_time(ts(10 + age_hours)):
        assert check(tmp_path, ONLY_DEMAND.format(db=db)) == expected


def test_check_disabled_dataset_and_unconfigured_ba_are_never_stale(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    one_series(db, "EIA.PJM.demand", 10)
    one_series(db, "EIA.PJM.generation.coal", 1)  # generation is disabled
    one_series(db, "EIA.TVA.demand", 1)  # TVA is not configured
    with freeze_time(ts(12)):
        assert check(tmp_path, ONLY_DEMAND.format(db=db)) == (
            0,
            "OK - 3 series, 0 pending, 0 dead\n",
        )


def test_check_ba_interchange_group_is_fresh_when_any_counterparty_is(tmp_path: Path) -> None:
    config = ONLY_DEMAND.replace("ba_interchange: {{enabled: false}}", "").format(
        db=tmp_path / "o.db"
    )
    one_series(tmp_path / "o.db", "EIA.PJM.demand", 50)
    one_series(tmp_path / "o.db", "EIA.PJM.interchange.MISO", 50)
    one_series(tmp_path / "o.db", "EIA.PJM.interchange.NYIS", 2)  # stopped trading long ago
    with freeze_time(ts(52)):
        assert check(tmp_path, config) == (0, "OK - 3 series, 0 pending, 0 dead\n")
    with freeze_time(ts(50 + 61)):  # ba_interchange: lag 54 h, warning after 60 h
        code, line = check(tmp_path, config)
    assert (code, line) == (
        2,
        "CRITICAL - demand stale 61h (PJM; crit > 26h); "
        "ba_interchange stale 61h (PJM; warn > 60h)\n",
    )


@pytest.mark.parametrize(
    ("dead", "expected"),
    [
        (1, (1, "WARNING - 1 dead row (warn at 1)\n")),
        (3, (2, "CRITICAL - 3 dead rows (crit at 3)\n")),
    ],
)
def test_check_dead_rows(tmp_path: Path, dead: int, expected: tuple[int, str]) -> None:
    db = tmp_path / "o.db"
    one_series(db, "EIA.PJM.demand", 10, acked=False)
    with Store.open(db) as store:
        rows = store.delivery.claim(dead)
        reject(store, [((r.series_id, r.ts, r.revision), "BAD", "bad") for r in rows])
        ack(store, [(r.series_id, r.ts, r.revision) for r in store.delivery.claim(10)])
    with freeze_time(ts(11)):
        assert check(tmp_path, ONLY_DEMAND.format(db=db)) == expected


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        (1, (0, "OK - 1 series, 0 pending, 0 dead\n")),
        (2, (1, "WARNING - send failed 2 runs in a row (warn at 2)\n")),
        (3, (2, "CRITICAL - send failed 3 runs in a row (crit at 3)\n")),
    ],
)
def test_check_consecutive_failed_runs(
    tmp_path: Path, failures: int, expected: tuple[int, str]
) -> None:
    db = tmp_path / "o.db"
    one_series(db, "EIA.PJM.demand", 10)
    with Store.open(db) as store:
        for status in ["failed"] * 5 + ["ok"] + ["failed"] * failures + ["running"]:
            run = store.runs.start_run("send", now=ts(10))
            if status != "running":
                store.runs.finish_run(
                    run, status, {}, "boom" if status == "failed" else None, ts(10)
                )
    # The last run is still going (it holds the send lock): it counts for nothing.
    with file_lock(lock_file(db, "send"), blocking=False) as got, freeze_time(ts(11)):
        assert got
        assert check(tmp_path, ONLY_DEMAND.format(db=db)) == expected


def test_check_oldest_pending_waits_by_staging_time(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    one_series(db, "EIA.PJM.demand", 10, acked=False)  # staged at hour 10
    with freeze_time(ts(12)):
        assert check(tmp_path, ONLY_DEMAND.format(db=db)) == (
            0,
            "OK - 1 series, 3 pending, 0 dead\n",
        )
    with freeze_time(ts(17)):
        assert check(tmp_path, ONLY_DEMAND.format(db=db)) == (
            1,
            "WARNING - oldest pending row waiting 7h (warn > 6h)\n",
        )
    with freeze_time(ts(40)):
        code, line = check(tmp_path, ONLY_DEMAND.format(db=db))
    assert code == 2 and "oldest pending row waiting 30h (crit > 24h)" in line


def test_check_unknown_for_unreadable_config_and_database(tmp_path: Path) -> None:
    assert check(tmp_path, "database: [unclosed\n")[0] == 3
    code, line = check(tmp_path, "datasets: {nope: {}}\n")
    assert code == 3 and line.startswith("UNKNOWN - ") and "unknown dataset 'nope'" in line
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database at all" * 100)
    code, line = check(tmp_path, f"database: {bad}\n")
    assert (code, line) == (
        3,
        f"UNKNOWN - {bad}: not a usable outbox database: file is not a database\n",
    )
    assert bad.read_bytes() == b"this is not a database at all" * 100


# -- --metrics ----------------------------------------------------------------------


@freeze_time(NOW)
def test_metrics_parse_strictly_and_carry_the_model(outbox_dir: Path) -> None:
    result = invoke("status", "--metrics", "outbox.prom")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # --metrics alone is quiet, for cron
    text = (outbox_dir / "outbox.prom").read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    series_keys = [line.rsplit(" ", 1)[0] for line in lines]
    assert len(series_keys) == len(set(series_keys)), "duplicate series"
    for name, family in families.items():
        assert family.type == "gauge" and family.documentation, name
        assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in families[name].samples if s.labels == labels]
        assert len(found) == 1, (name, labels, families[name].samples)
        return found[0]

    pjm = {"dataset": "demand", "ba": "PJM", "series": "EIA.PJM.demand"}
    assert value("outbox_series_pending_rows", **pjm) == 4
    assert value("outbox_series_dead_rows", **pjm) == 1
    assert value("outbox_series_newest_staged_timestamp_seconds", **pjm) == 1755856800  # 10:00
    assert value("outbox_series_delivered_through_timestamp_seconds", **pjm) == 1755842400
    assert value("outbox_freshness_seconds", dataset="demand", ba="CAISO") == 36000
    assert value("outbox_freshness_level", dataset="demand", ba="CAISO") == 1
    assert value("outbox_freshness_warning_seconds", dataset="demand") == 8 * 3600
    assert value("outbox_pending_rows") == 34 and value("outbox_dead_rows") == 1
    assert value("outbox_oldest_pending_age_seconds") == 6900
    assert value("outbox_consecutive_failed_runs", stage="send") == 2
    assert value("outbox_last_run_success", stage="send") == 0
    assert value("outbox_last_run_duration_seconds", stage="send") == 42
    assert value("outbox_last_run_success", stage="fetch") == 1
    assert value("outbox_last_fetch_invalid_rows") == 2
    assert value("outbox_check_status") == 1
    assert value("outbox_info", version=_version(), schema="0009", schema_head="0009") == 1
    # Disabled groups export their age but no freshness level.
    assert not [s for s in families["outbox_freshness_level"].samples if s.labels["ba"] == "MISO"]


def _version() -> str:
    from outbox import __version__

    return __version__


def test_metrics_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "o.db"
    one_series(db, "EIA.PJM.demand", 10)
    model = status_mod.read(load_config(None, env={"OUTBOX_DB": str(db)}))
    target = tmp_path / "outbox.prom"
    target.write_text("# previous complete file\n")
    seen: list[tuple[str, str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        # At the moment of the rename the target still holds the previous whole file and
        # the new text is complete in a sibling that the textfile collector ignores.
        seen.append((Path(src).name, target.read_text(), Path(src).read_text()))
        assert Path(src).parent == target.parent and not str(src).endswith(".prom")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    status_mod.write_metrics(model, target)
    assert seen[0][1] == "# previous complete file\n"
    assert seen[0][2] == target.read_text() == status_mod.render_metrics(model)
    assert oct(target.stat().st_mode & 0o777) == "0o644"  # node_exporter must read it

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    from outbox.errors import DiskFullError

    with pytest.raises(DiskFullError, match=f"disk full writing {target}"):
        status_mod.write_metrics(model, target)
    assert target.read_text() == status_mod.render_metrics(model)  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir() if "metrics" in p.name) == []


def test_metrics_written_after_each_fetch_and_send_run(tmp_path: Path) -> None:
    from outbox.sample import sample_dir

    prom = tmp_path / "outbox.prom"
    env = {
        "OUTBOX_DB": str(tmp_path / "o.db"),
        "OUTBOX__METRICS_PATH": str(prom),
        "GRIDPULSE_BASE_URL": "http://127.0.0.1:9",  # refuses connections
        "GRIDPULSE_API_KEY": "gp-secret-key-1234",
        "OUTBOX__GRIDPULSE__RETRY__ATTEMPTS": "1",
    }
    fetched = runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env)
    assert fetched.exit_code == 0, fetched.output
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert families["outbox_pending_rows"].samples[0].value == 2376
    sent = runner.invoke(app, ["send"], env=env)
    assert sent.exit_code == 1, sent.output  # GridPulse unreachable: the run failed ...
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    success = {s.labels["stage"]: s.value for s in families["outbox_last_run_success"].samples}
    assert success == {"fetch": 1, "send": 0}  # ... and the metrics say so


# -- --remote ---------------------------------------------------------------------------


def latest(series_id: str, ts_: str | None) -> httpx.Response:
    return httpx.Response(200, json={"series_id": series_id, "latest_ts": ts_, "revision": "r"})


def mock_gridpulse(router: respx.MockRouter, answers: dict[str, httpx.Response]) -> None:
    for series_id, response in answers.items():
        path = f"/api/v1/data/series/{series_id}/latest"
        router.get(path, headers={"Authorization": "Bearer gp-secret-key-1234"}).mock(response)


AGREE = {
    "EIA.CAISO.demand": latest("EIA.CAISO.demand", ts(2)),
    "EIA.MISO.demand": latest("EIA.MISO.demand", ts(1)),
    "EIA.PJM.demand": latest("EIA.PJM.demand", ts(5)),
    "EIA.PJM.demand_forecast": latest("EIA.PJM.demand_forecast", ts(11)),
    "EIA.PJM.generation.solar": latest("EIA.PJM.generation.solar", ts(9)),
    "EIA.PJM.generation.wind": latest("EIA.PJM.generation.wind", ts(8)),
    "EIA.PJM.interchange": latest("EIA.PJM.interchange", ts(3)),
    "EIA.PJM.interchange.CAISO": latest("EIA.PJM.interchange.CAISO", ts(8)),
}


@freeze_time(NOW)
def test_remote_all_agree(outbox_dir: Path) -> None:
    with respx.mock(base_url=GP, assert_all_called=True) as router:
        mock_gridpulse(router, AGREE)
        result = invoke("status", "--remote", "--json")
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)["remote"]
    assert (remote["checked"], remote["agree"], remote["disagree"]) == (8, 8, 0)


@freeze_time(NOW)
def test_remote_reports_disagreements(outbox_dir: Path) -> None:
    answers = {
        **AGREE,
        # GridPulse lost hours it acknowledged: behind.
        "EIA.CAISO.demand": latest("EIA.CAISO.demand", ts(1)),
        # GridPulse does not know the series at all: behind.
        "EIA.PJM.generation.solar": httpx.Response(
            404, json={"error": {"code": "NOT_FOUND", "message": "unknown series"}}
        ),
        # GridPulse holds newer hours than this outbox ever delivered: ahead.
        "EIA.PJM.interchange": latest("EIA.PJM.interchange", ts(20)),
    }
    with respx.mock(base_url=GP, assert_all_called=True) as router:
        mock_gridpulse(router, answers)
        table = invoke("status", "--remote")
    assert table.exit_code == 0, table.output
    golden("status-remote-80.txt", normalize(table.stdout))
    with respx.mock(base_url=GP, assert_all_called=True) as router:
        mock_gridpulse(router, answers)
        data = invoke("status", "--remote", "--json")
    remote = json.loads(data.stdout)["remote"]
    verdicts = {r["series_id"]: r["verdict"] for r in remote["series"] if r["verdict"] != "ok"}
    assert verdicts == {
        "EIA.CAISO.demand": "behind",
        "EIA.PJM.generation.solar": "behind",
        "EIA.PJM.interchange": "ahead",
    }
    solar = next(r for r in remote["series"] if r["series_id"] == "EIA.PJM.generation.solar")
    assert solar == {
        "series_id": "EIA.PJM.generation.solar",
        "delivered_through": ts(9),
        "newest_acked": ts(9),
        "gridpulse_known": False,
        "gridpulse_latest": None,
        "gridpulse_revision": None,
        "verdict": "behind",
    }


@freeze_time(NOW)
def test_remote_unreachable_exits_1_with_a_clear_message(outbox_dir: Path) -> None:
    with respx.mock(base_url=GP, assert_all_called=True) as router:
        router.get(path__startswith="/api/v1/data/series/").mock(
            side_effect=httpx.ConnectError("Connection refused")
        )
        result = invoke("status", "--remote")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: cannot compare with GridPulse at https://gp.test: GridPulse connection failed "
        "on GET /api/v1/data/series/EIA.CAISO.demand/latest: ConnectError: Connection refused\n"
    )


# -- status only reads -------------------------------------------------------------------


def _leave_wal_frames(db: Path) -> None:
    """A writer that dies without checkpointing: the last commit lives only in the WAL."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "c.execute(\"INSERT INTO meta VALUES ('left-in-wal', 'x')\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(db)], check=True)


def _fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@freeze_time(NOW)
def test_status_never_writes_the_database(outbox_dir: Path) -> None:
    db = outbox_dir / "outbox.db"
    _leave_wal_frames(db)
    before = _fingerprint(db)
    wal = (outbox_dir / "outbox.db-wal").read_bytes()
    assert wal, "the WAL holds a commit not yet in the main file"
    for args in (
        ["status"],
        ["status", "--json"],
        ["status", "--check"],
        ["status", "--metrics", "m.prom"],
        ["runs"],
        ["runs", "--json"],
    ):
        result = invoke(*args)
        assert result.exit_code in (0, 1), result.output
        assert _fingerprint(db) == before, args
    assert (outbox_dir / "outbox.db-wal").read_bytes() == wal
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'left-in-wal'").fetchone()


@freeze_time(NOW)
def test_status_does_not_wait_for_a_running_writer(outbox_dir: Path) -> None:
    writer = sqlite3.connect(outbox_dir / "outbox.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta VALUES ('in-flight', 'x')")
    try:
        with file_lock(outbox_dir / "outbox.db.send.lock", blocking=False) as got:
            assert got
            started = time.monotonic()
            result = invoke("status", "--json")
            assert time.monotonic() - started < 5
    finally:
        writer.rollback()
        writer.close()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["pending"] == 34


def test_every_status_query_is_index_driven(outbox_dir: Path) -> None:
    """EXPLAIN QUERY PLAN of each statement collect() runs: no full scan of observations."""
    statements: list[str] = []
    with Store.open_readonly(outbox_dir / "outbox.db") as store:

        def trace(dbapi_connection: sqlite3.Connection, _record: object) -> None:
            dbapi_connection.set_trace_callback(statements.append)

        event.listen(store.engine, "connect", trace)
        store.engine.dispose()
        status_mod.collect(load_config("config.yaml"), store)
    plans = {}
    with sqlite3.connect(outbox_dir / "outbox.db") as con:
        for sql in {s for s in statements if s.lstrip().upper().startswith("SELECT")}:
            plans[sql] = [row[3] for row in con.execute(f"EXPLAIN QUERY PLAN {sql}")]
    assert any("observations" in sql for sql in plans)
    for sql, plan in plans.items():
        for step in plan:
            assert not re.fullmatch(r"SCAN (observations|o)", step), (sql, plan)
            if step.startswith("SCAN observations"):
                assert "USING" in step and "INDEX" in step, (sql, plan)


# -- runs ---------------------------------------------------------------------------------


@freeze_time(NOW)
def test_runs_table_and_json(outbox_dir: Path) -> None:
    table = invoke("runs")
    assert table.exit_code == 0, table.output
    assert normalize(table.stdout) == (
        "run stage started       took status counts / error\n"
        "────────────────────────────────────────────────────────────────────────────────\n"
        "  3 send  08-22 11:10 42.00s failed GridPulse unavailable: connection failed on\n"
        "                                    https://gp.test/x?token=***\n"
        "  2 send  08-22 10:10 42.00s failed GridPulse unavailable: connection failed on\n"
        "                                    https://gp.test/x?token=***\n"
        "  1 fetch 08-22 10:04 1m 30s ok     invalid 2, pages 3, requests 3, rows 90,\n"
        "                                    written 90\n"
    )
    failed = invoke("runs", "--failed", "--stage", "send", "--limit", "1", "--json")
    assert failed.exit_code == 0, failed.output
    assert json.loads(failed.stdout) == [
        {
            "id": 3,
            "stage": "send",
            "started_at": "2025-08-22T11:10:00Z",
            "finished_at": "2025-08-22T11:10:42Z",
            "status": "failed",
            "counts": {"acked": 0, "batches": 1, "requests": 4, "sent": 2},
            "error": "GridPulse unavailable: connection failed on https://gp.test/x?token=***",
            "pid": os.getpid(),
            "seconds": 42.0,
        }
    ]
    fetches = json.loads(invoke("runs", "--stage", "fetch", "--json").stdout)
    assert [r["id"] for r in fetches] == [1]


def test_status_on_a_missing_outbox_creates_nothing(tmp_path: Path) -> None:
    env = {"OUTBOX_DB": str(tmp_path / "new.db")}
    result = runner.invoke(app, ["status", "--json"], env=env)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_runs_on_a_fresh_outbox(tmp_path: Path) -> None:
    Store.open(tmp_path / "r.db").close()
    result = runner.invoke(app, ["runs", "--json"], env={"OUTBOX_DB": str(tmp_path / "r.db")})
    assert (result.exit_code, result.stdout) == (0, "[]\n")


@freeze_time(NOW)
def test_every_json_key_is_documented(outbox_dir: Path) -> None:
    with respx.mock(base_url=GP, assert_all_called=True) as router:
        mock_gridpulse(router, AGREE)
        data = json.loads(invoke("status", "--remote", "--json").stdout)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "status.md").read_text()
    keys = set(data) | set(data["totals"]) | set(data["check"]) | set(data["remote"])
    keys |= set(data["groups"][0]) | set(data["series"][0]) | set(data["watermarks"][0])
    keys |= set(data["missing"][0]) | set(data["stream_progress"][0])
    keys |= set(data["last_runs"]["fetch"]) | set(data["remote"]["series"][0])
    undocumented = sorted(k for k in keys if f"`{k}`" not in doc)
    assert undocumented == []
    metrics = status_mod.render_metrics(status_mod.read(load_config("config.yaml")))
    names = set(re.findall(r"^# TYPE (\w+) ", metrics, re.M))
    assert sorted(n for n in names if f"`{n}`" not in doc) == []


def test_a_configured_ba_eia_never_returned_a_row_for_is_a_warning(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from outbox.sample import sample_dir
    from outbox.stages.fetch import run_fetch
    from outbox.testing.fake_eia import FakeEIA
    from outbox.testing.synth import read_rows
    from outbox.wiring import eia_client

    pjm_only = {
        route: [r for r in rows if r.get("respondent", r.get("fromba")) == "PJM"]
        for route, rows in read_rows(sample_dir()).items()
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"database: {tmp_path / 'o.db'}\n"
        "balancing_authorities: {PJM: PJM, TYPO: XXXX}\n"
        "eia: {history_start: '2025-08-21T00:00:00Z', max_requests_per_second: 5}\n"
    )
    now = datetime(2025, 8, 22, 2, tzinfo=UTC)
    key = "eia-status-key-0123"
    with FakeEIA(pjm_only, api_key=key) as fake:
        config = load_config(cfg, env={"EIA_BASE_URL": fake.start(), "EIA_API_KEY": key})
        with Store.open(config.database) as store, httpx.Client() as http:
            assert status_mod.read(config, now=now).warnings == []  # nothing asked yet
            run_fetch(config, store, eia_client(config, http), bas=["PJM"], now=now)
            assert status_mod.read(config, now=now).warnings == []  # XXXX not asked for
            run_fetch(config, store, eia_client(config, http), now=now)
            assert (
                "asked_through" not in store.runs.recent_runs(limit=1)[0].counts
            )  # progress has it
        asked = [q for q in fake.requests if "XXXX" in q]
    assert asked  # the second run asked EIA for XXXX, and EIA answered with no rows

    warning = (
        "TYPO (EIA XXXX) has never had a row: EIA returned none for it through "
        "2025-08-22T02:00:00Z (fetch run 2) while PJM has data; check the code in "
        "balancing_authorities"
    )
    model = status_mod.read(config, now=now)
    assert model.warnings == [warning]
    assert model.check is not None and model.check.code == status_mod.WARNING
    assert model.check.summary == f"WARNING - {warning}"
    probe = status_mod.read(config, now=now, for_check=True)
    assert probe.check == model.check
    with freeze_time(NOW):
        shown = runner.invoke(app, ["-c", str(cfg), "status", "--json"])
    assert shown.exit_code == 0, shown.output
    assert warning in json.loads(shown.output)["warnings"]
    checked = runner.invoke(app, ["-c", str(cfg), "status", "--check"])
    assert checked.exit_code in (1, 2) and warning in checked.output  # (stale by now, too)
    assert len(checked.output.splitlines()) == 1
    table = runner.invoke(app, ["-c", str(cfg), "status"], env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    assert f"warning: {warning}" in table.output.splitlines()


def test_the_never_answered_warning_is_built_from_stream_progress(tmp_path: Path) -> None:
    """One warning per silent BA, with the newest asked_through of its streams (the hour
    the table's "no data at EIA through" line shows), whatever the runs' counts say; a
    silent BA EIA has not been asked for (no progress rows) is not warned of."""
    db = tmp_path / "o.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"database: {db}\nbalancing_authorities: {{PJM: PJM, TYPO: XXXX, NEW: NEW}}\n")
    sid = "EIA.PJM.demand"
    with Store.open(db) as store:
        run_id = store.runs.start_run("fetch")
        store.staging.stage(
            [obs(sid, 0)],
            series_rows=[series_row(sid)],
            page=page(),
            progress_updates=[
                ProgressUpdate("demand:XXXX", "demand", "XXXX", ts(7)),
                ProgressUpdate("demand_forecast:XXXX", "demand_forecast", "XXXX", ts(9)),
            ],
            run_id=run_id,
        )
        store.runs.finish_run(run_id, "ok", {"asked_through": {"XXXX": ts(1)}})
    model = status_mod.read(load_config(cfg), now=parse_ts(ts(10)))
    assert model.warnings == [
        f"TYPO (EIA XXXX) has never had a row: EIA returned none for it through {ts(9)} "
        f"(fetch run {run_id}) while PJM has data; check the code in balancing_authorities"
    ]
    assert model.check is not None and model.check.code == status_mod.WARNING


def test_run_durations_are_shown_as_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that takes 2.39 s is shown as 2.39s by `runs` and status, not as the 2 s its
    whole-second timestamps span."""
    from outbox.sample import sample_dir
    from outbox.stages.fetcher import Fetcher

    env = {"OUTBOX_DB": str(tmp_path / "outbox.db"), "OUTBOX__EIA__REPLAY_READ_AHEAD": "thread"}
    stage_replay = Fetcher.stage_replay
    with freeze_time(NOW) as frozen:

        def slow(self: Fetcher, directory: Path) -> None:
            stage_replay(self, directory)
            frozen.tick(2.39)

        monkeypatch.setattr(Fetcher, "stage_replay", slow)
        fetched = runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env)
        assert fetched.exit_code == 0, fetched.output
        shown = runner.invoke(app, ["runs"], env={**env, "COLUMNS": "120"})
        data = json.loads(runner.invoke(app, ["status", "--json"], env=env).stdout)
        table = runner.invoke(app, ["status"], env={**env, "COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    assert re.search(r"^\s+1 fetch\s+08-22 12:00\s+2\.39s ok ", shown.stdout, re.M), shown.stdout
    run = data["last_runs"]["fetch"]
    assert (run["started_at"], run["finished_at"]) == ("2025-08-22T12:00:00Z", NOW[:-3] + "02Z")
    assert run["seconds"] == 2.39
    assert "seconds" not in run["counts"]  # the duration is `seconds`, not a count
    assert "run 1 ok at 08-22 12:00, 2.39s" in table.stdout
