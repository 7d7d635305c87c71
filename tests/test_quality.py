"""Data quality: each rule on real-format EIA pages with a defect planted, and without it;
the revision ledger; resolution; quarantine end to end with the reference receiver."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from durability import KEY_GP, outbox, outbox_env, processes_naming
from factories import ack
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import Config
from outbox.quality import ledger
from outbox.sample import sample_dir
from outbox.sample.receiver import receiver_rows, running_receiver
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Key, Store

REAL = Path(__file__).resolve().parents[2] / "shared" / "contracts" / "eia-samples"
if not REAL.is_dir():  # the worktree's own checkout of the shared contracts
    REAL = Path("/work/shared/contracts/eia-samples")
PACW_FILES = (
    "region-data-pacw-d-hourly-2023-01-01_08.json",
    "fuel-type-pacw-hourly-2023-01-01_08.json",
)
PACW = {"balancing_authorities": {"PACW": "PACW"}}
runner = CliRunner()
Rows = list[dict[str, Any]]


def pages(out: Path, files: list[Path], edit: Callable[[str, Rows], None] | None = None) -> Path:
    """Copy EIA response bodies into ``out``, letting ``edit`` change each file's rows."""
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        body = json.loads(path.read_text())
        if edit is not None:
            edit(path.name, body["response"]["data"])
        (out / path.name).write_text(json.dumps(body))
    assert getattr(edit, "hits", 1), "the planted defect matched no row"
    return out


def sample_pages(out: Path, edit: Callable[[str, Rows], None] | None = None) -> Path:
    return pages(out, sorted(sample_dir().glob("*.json")), edit)


def pacw_pages(out: Path, edit: Callable[[str, Rows], None] | None = None) -> Path:
    return pages(out, [REAL / name for name in PACW_FILES], edit)


def replay(db: Path, directory: Path, **config: Any) -> Any:
    with Store.open(db) as store:
        return run_fetch(Config(**config), store, ReplaySource(directory))


def found(db: Path, rule: str | None = None, *, open_only: bool = True) -> set[tuple]:
    """(rule, ba, series_id, start, end) of the findings."""
    with Store.open(db) as store:
        rows = ledger.findings(store, rule=rule, open_only=open_only)
    return {(f["rule"], f["ba"], f["series_id"], f["start"], f["end"]) for f in rows}


def rules_found(db: Path) -> set[str]:
    return {f[0] for f in found(db)}


def scale(value: str, factor: float) -> str:
    return str(round(float(value) * factor))


def edit_rows(match: Callable[[dict], bool], change: Callable[[dict], None]):
    def edit(_name: str, rows: Rows) -> None:
        for r in rows:
            if match(r):
                change(r)
                edit.hits += 1  # type: ignore[attr-defined]

    edit.hits = 0  # type: ignore[attr-defined]
    return edit


def at(period: str, **fields: str) -> Callable[[dict], bool]:
    return lambda r: r["period"] == period and all(r.get(k) == v for k, v in fields.items())


# -- each rule: planted on real-format pages, and absent from the same pages without it ----


@pytest.fixture(scope="module")
def clean_sample(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    db = tmp_path_factory.mktemp("clean") / "o.db"
    replay(db, sample_pages(db.parent / "pages"))
    return rules_found(db)


@pytest.fixture(scope="module")
def clean_pacw(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    db = tmp_path_factory.mktemp("clean") / "o.db"
    replay(db, pacw_pages(db.parent / "pages"), **PACW)
    return rules_found(db)


def test_the_unplanted_pages_have_no_findings(clean_sample: set[str], clean_pacw: set[str]) -> None:
    assert clean_sample == set()
    assert clean_pacw == set()


def test_balance(tmp_path: Path) -> None:
    edit = edit_rows(
        at("2025-08-21T12", respondent="PJM", type="D"),
        lambda r: r.update(value=scale(r["value"], 1.3)),
    )
    replay(tmp_path / "o.db", sample_pages(tmp_path / "p", edit))
    assert found(tmp_path / "o.db", "balance") == {
        ("balance", "PJM", None, "2025-08-21T12:00:00Z", "2025-08-21T12:00:00Z")
    }


def test_interchange_sum(tmp_path: Path) -> None:
    # CPLE is not a configured BA: no reverse flow, so antisymmetry cannot see it.
    edit = edit_rows(
        at("2025-08-21T10", fromba="PJM", toba="CPLE"),
        lambda r: r.update(value=str(float(r["value"]) + 5000)),
    )
    replay(tmp_path / "o.db", sample_pages(tmp_path / "p", edit))
    assert rules_found(tmp_path / "o.db") == {"interchange_sum"}
    assert found(tmp_path / "o.db") == {
        ("interchange_sum", "PJM", None, "2025-08-21T10:00:00Z", "2025-08-21T10:00:00Z")
    }


def test_interchange_sum_is_not_checked_without_ba_interchange(tmp_path: Path) -> None:
    Store.open(tmp_path / "o.db").close()  # `quality` reads an outbox, it creates none
    result = runner.invoke(
        app,
        ["quality"],
        env={
            "OUTBOX_DB": str(tmp_path / "o.db"),
            "OUTBOX__DATASETS__BA_INTERCHANGE__ENABLED": "false",
        },
    )
    assert result.exit_code == 0, result.output
    assert "not checked: interchange_sum: ba_interchange is not fetched" in result.output


def test_antisymmetry(tmp_path: Path) -> None:
    edit = edit_rows(
        at("2025-08-21T08", fromba="PJM", toba="MISO"),
        lambda r: r.update(value=str(float(r["value"]) + 3000)),
    )
    replay(tmp_path / "o.db", sample_pages(tmp_path / "p", edit))
    # Reported once per pair, at the BA that sorts first, on its series.
    assert found(tmp_path / "o.db", "antisymmetry") == {
        (
            "antisymmetry",
            "MISO",
            "EIA.MISO.interchange.PJM",
            "2025-08-21T08:00:00Z",
            "2025-08-21T08:00:00Z",
        )
    }


def test_fuel_sum(tmp_path: Path) -> None:
    edit = edit_rows(
        at("2025-08-21T15", respondent="CISO", fueltype="NG"),
        lambda r: r.update(value=str(float(r["value"]) + 5000)),
    )
    replay(tmp_path / "o.db", sample_pages(tmp_path / "p", edit))
    assert found(tmp_path / "o.db") == {
        ("fuel_sum", "CAISO", None, "2025-08-21T15:00:00Z", "2025-08-21T15:00:00Z")
    }


def _pacw_demand(rows: Rows) -> dict[str, dict]:
    return {r["period"]: r for r in rows if r.get("type") == "D"}


def test_repeated_day(tmp_path: Path) -> None:
    def edit(name: str, rows: Rows) -> None:
        if name.startswith("region"):
            demand = _pacw_demand(rows)
            for hour in range(24):
                demand[f"2023-01-03T{hour:02d}"]["value"] = demand[f"2023-01-02T{hour:02d}"][
                    "value"
                ]

    replay(tmp_path / "o.db", pacw_pages(tmp_path / "p", edit), **PACW)
    assert found(tmp_path / "o.db", "repeated_day") == {
        ("repeated_day", "PACW", "EIA.PACW.demand", "2023-01-03T00:00:00Z", "2023-01-03T23:00:00Z")
    }


def test_flat_line(tmp_path: Path) -> None:
    def edit(name: str, rows: Rows) -> None:
        if name.startswith("region"):
            demand = _pacw_demand(rows)
            for hour in range(6, 14):
                demand[f"2023-01-05T{hour:02d}"]["value"] = "2500"

    replay(tmp_path / "o.db", pacw_pages(tmp_path / "p", edit), **PACW)
    assert found(tmp_path / "o.db", "flat_line") == {
        ("flat_line", "PACW", "EIA.PACW.demand", "2023-01-05T06:00:00Z", "2023-01-05T13:00:00Z")
    }


def test_spike(tmp_path: Path) -> None:
    edit = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    replay(tmp_path / "o.db", pacw_pages(tmp_path / "p", edit), **PACW)
    assert found(tmp_path / "o.db") == {
        ("spike", "PACW", "EIA.PACW.demand", "2023-01-04T12:00:00Z", "2023-01-04T12:00:00Z")
    }


def test_negative_generation_but_not_storage(tmp_path: Path) -> None:
    edit = edit_rows(at("2023-01-02T03", fueltype="WND"), lambda r: r.update(value="-500"))
    replay(tmp_path / "o.db", pacw_pages(tmp_path / "p", edit), **PACW)
    assert found(tmp_path / "o.db", "negative_generation") == {
        (
            "negative_generation",
            "PACW",
            "EIA.PACW.generation.wind",
            "2023-01-02T03:00:00Z",
            "2023-01-02T03:00:00Z",
        )
    }
    hydro = edit_rows(at("2023-01-02T03", fueltype="WAT"), lambda r: r.update(value="-500"))
    replay(tmp_path / "h.db", pacw_pages(tmp_path / "h", hydro), **PACW)
    assert found(tmp_path / "h.db", "negative_generation") == set()


def test_dropped_series_and_its_resolution(tmp_path: Path) -> None:
    def edit(name: str, rows: Rows) -> None:
        rows[:] = [
            r for r in rows if not (r.get("fueltype") == "WND" and r["period"] > "2023-01-06T00")
        ]

    db = tmp_path / "o.db"
    replay(db, pacw_pages(tmp_path / "p", edit), **PACW)
    assert found(db, "dropped_series") == {
        (
            "dropped_series",
            "PACW",
            "EIA.PACW.generation.wind",
            "2023-01-06T01:00:00Z",
            "2023-01-08T00:00:00Z",
        )
    }
    replay(db, pacw_pages(tmp_path / "full"), **PACW)  # the wind rows arrive after all
    assert found(db, "dropped_series") == set()
    assert len(found(db, "dropped_series", open_only=False)) == 1


def test_large_revision(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    replay(db, sample_pages(tmp_path / "p"))
    small = edit_rows(
        at("2025-08-21T09", respondent="PJM", type="D"),
        lambda r: r.update(value=str(float(r["value"]) + 1)),
    )
    replay(db, sample_pages(tmp_path / "small", small))
    assert found(db, "large_revision") == set()
    large = edit_rows(
        at("2025-08-21T09", respondent="PJM", type="D"),
        lambda r: r.update(value=scale(r["value"], 1.5)),
    )
    replay(db, sample_pages(tmp_path / "large", large))
    assert found(db, "large_revision") == {
        ("large_revision", "PJM", "EIA.PJM.demand", "2025-08-21T09:00:00Z", "2025-08-21T09:00:00Z")
    }


def test_a_revision_that_removes_the_defect_resolves_its_findings(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    edit = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    first = replay(db, pacw_pages(tmp_path / "p", edit), **PACW)
    assert first.counts()["findings_opened"] == 1
    again = replay(db, pacw_pages(tmp_path / "clean"), **PACW)
    assert (again.counts()["findings_opened"], again.counts()["findings_resolved"]) == (1, 1)
    # What is left open is the revision itself (-37.5%): large_revision, severity info.
    assert found(db) == {
        (
            "large_revision",
            "PACW",
            "EIA.PACW.demand",
            "2023-01-04T12:00:00Z",
            "2023-01-04T12:00:00Z",
        )
    }


def test_checks_off_find_nothing(tmp_path: Path) -> None:
    edit = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    result = replay(
        tmp_path / "o.db", pacw_pages(tmp_path / "p", edit), quality={"enabled": False}, **PACW
    )
    assert "findings_opened" not in result.counts()
    assert found(tmp_path / "o.db") == set()


# -- the revision ledger -------------------------------------------------------------------

CHANGED = (
    ("PJM", "D", "2025-08-21T05"),
    ("MISO", "NG", "2025-08-21T06"),
    ("ERCO", "TI", "2025-08-21T07"),
)


def test_a_replay_with_three_changed_values_records_exactly_three_revisions(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    replay(db, sample_pages(tmp_path / "p"))
    before: dict[tuple[str, str, str], float] = {}

    def edit(name: str, rows: Rows) -> None:
        for r in rows:
            key = (r.get("respondent"), r.get("type"), r["period"])
            if key in CHANGED:
                before[key] = float(r["value"])
                r["value"] = str(float(r["value"]) + 7)

    replay(db, sample_pages(tmp_path / "q", edit))
    with Store.open(db) as store:
        ledger_rows = ledger.revisions(store)
    ids = {
        "PJM": "EIA.PJM.demand",
        "MISO": "EIA.MISO.net_generation",
        "ERCO": "EIA.ERCOT.interchange",
    }
    expected = {
        (ids[ba], f"{period}:00:00Z", before[(ba, t, period)], before[(ba, t, period)] + 7)
        for ba, t, period in CHANGED
    }
    got = {(r["series_id"], r["ts"], r["old_value"], r["new_value"]) for r in ledger_rows}
    assert got == expected and len(ledger_rows) == 3
    assert {r["run_id"] for r in ledger_rows} == {2}

    env = {"OUTBOX_DB": str(db)}
    listed = runner.invoke(app, ["revisions", "--series", "EIA.PJM.*"], env=env)
    assert listed.exit_code == 0, listed.output
    old = before[("PJM", "D", "2025-08-21T05")]
    assert f"EIA.PJM.demand 2025-08-21T05:00:00Z: {old:g} -> {old + 7:g}" in listed.output
    assert listed.output.endswith("1 revisions of 1 rows\n")
    shown = runner.invoke(app, ["show", "EIA.PJM.demand", "2025-08-21T05:00:00Z"], env=env)
    assert shown.exit_code == 0, shown.output
    history = json.loads(shown.stdout)["revisions"]
    assert [(h["old_value"], h["new_value"], h["run_id"]) for h in history] == [(old, old + 7, 2)]

    # Prune removes ledger rows with their observations (once acknowledged and old).
    with Store.open(db) as store:
        keys = [
            Key(*r)
            for r in sqlite3.connect(db).execute("SELECT series_id, ts, revision FROM observations")
        ]
        ack(store, keys)
        store.upkeep.prune_before("2025-08-21T06:00:00Z")  # PJM's 05:00 row goes, the others stay
        kept = {(r["series_id"], r["ts"]) for r in ledger.revisions(store)}
    assert kept == {
        ("EIA.MISO.net_generation", "2025-08-21T06:00:00Z"),
        ("EIA.ERCOT.interchange", "2025-08-21T07:00:00Z"),
    }


def test_an_unchanged_replay_records_no_revision(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    replay(db, sample_pages(tmp_path / "p"))
    replay(db, sample_pages(tmp_path / "p"))
    with Store.open(db) as store:
        assert ledger.revisions(store) == []


# -- where it shows -------------------------------------------------------------------------


def test_status_check_and_metrics_show_open_findings(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    edit = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    replay(db, pacw_pages(tmp_path / "p", edit), **PACW)
    env = {"OUTBOX_DB": str(db)}
    ok = runner.invoke(app, ["status", "--json"], env=env)
    quality = json.loads(ok.stdout)["quality"]
    assert quality["open_by_severity"] == {"crit": 0, "warn": 1, "info": 0}
    assert quality["worst_rule"] == "spike"
    check = runner.invoke(
        app, ["status", "--check"], env={**env, "OUTBOX__QUALITY__CHECK_WARNING_SEVERITY": "warn"}
    )
    assert check.exit_code == 1
    assert "1 open quality finding at warn or worse (worst: spike)" in check.stdout
    metrics = tmp_path / "m.prom"
    runner.invoke(app, ["status", "--metrics", str(metrics)], env=env)
    text = metrics.read_text()
    assert 'outbox_quality_findings{rule="spike",ba="PACW",severity="warn"} 1' in text
    assert "outbox_revisions_total 0" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quality", "--since", "yesterday"], "--since 'yesterday': not a date or RFC 3339 time"),
        (
            ["revisions", "--since", "2025-13-01"],
            "--since '2025-13-01': not a date or RFC 3339 time",
        ),
        (["quality", "--rule", "spikes"], "--rule spikes: unknown; known: balance,"),
    ],
)
def test_bad_options_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, args, env={"OUTBOX_DB": str(tmp_path / "o.db")})
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_an_unknown_rule_in_the_config_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quality:\n  rules:\n    spikes: {action: quarantine}\n")
    result = runner.invoke(
        app, ["-c", str(cfg), "quality"], env={"OUTBOX_DB": str(tmp_path / "o.db")}
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown rule 'spikes'" in lines[0]
    assert not (tmp_path / "o.db").exists()


# -- quarantine -----------------------------------------------------------------------------

SPIKE = ("EIA.PACW.demand", "2023-01-04T12:00:00Z")


def _state(db: Path, key: tuple[str, str]) -> tuple[str, str | None]:
    con = sqlite3.connect(db)
    row = con.execute(
        "SELECT state, last_error_code FROM row_states WHERE series_id = ? AND ts = ?", key
    ).fetchone()
    con.close()
    return row


def test_a_quarantined_spike_is_held_back_until_requeued_and_a_revision_rechecks_it(
    tmp_path: Path,
) -> None:
    db = tmp_path / "o.db"
    spiked = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    spiked_more = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.8))
    )
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            "balancing_authorities: {PACW: PACW}\nquality: {rules: {spike: {action: quarantine}}}\n"
        )
        env = outbox_env(db, receiver=receiver, OUTBOX_CONFIG=str(cfg))
        for args in (("fetch", "--replay", str(pacw_pages(tmp_path / "p", spiked))), ("send",)):
            done = outbox(*args, env=env)
            assert done.returncode == 0, done.stderr
        assert _state(db, SPIKE) == ("dead", "QUALITY_SPIKE")
        held = receiver_rows(receiver.base_url, KEY_GP)
        assert SPIKE not in held and len(held) == 169 * 6 - 1

        for args in (("requeue", "--code", "QUALITY_SPIKE"), ("send",)):
            done = outbox(*args, env=env)
            assert done.returncode == 0, done.stderr
        assert _state(db, SPIKE)[0] == "acked"
        assert SPIKE in receiver_rows(receiver.base_url, KEY_GP)

        # EIA revises the spike: the row is pending again, re-checked, quarantined again.
        done = outbox("fetch", "--replay", str(pacw_pages(tmp_path / "p2", spiked_more)), env=env)
        assert done.returncode == 0, done.stderr
        assert _state(db, SPIKE) == ("dead", "QUALITY_SPIKE")
        # EIA corrects it: pending, the finding resolved, and delivered.
        done = outbox("fetch", "--replay", str(pacw_pages(tmp_path / "p3")), env=env)
        assert done.returncode == 0, done.stderr
        assert _state(db, SPIKE) == ("pending", None)
        assert found(db, "spike") == set()
        done = outbox("send", env=env)
        assert done.returncode == 0, done.stderr
        held = receiver_rows(receiver.base_url, KEY_GP)
    con = sqlite3.connect(db)
    value = con.execute(
        "SELECT value FROM observations WHERE series_id = ? AND ts = ?", SPIKE
    ).fetchone()[0]
    con.close()
    assert held[SPIKE][0] == value


def test_bundled_sample_day_findings(tmp_path: Path) -> None:
    """The bundled sample day: `outbox quality` after `fetch --replay` (docs/quality.md)."""
    env = {"OUTBOX_DB": str(tmp_path / "o.db")}
    fetched = runner.invoke(app, ["fetch", "--replay", str(sample_dir())], env=env)
    assert fetched.exit_code == 0, fetched.output
    assert "quality: 0 findings opened, 0 resolved, 0 rows quarantined" in fetched.stdout
    listed = runner.invoke(app, ["quality"], env=env)
    assert listed.stdout == "0 findings, 0 open\n"


def test_real_bodies_are_where_the_tests_expect_them() -> None:
    assert all((REAL / name).is_file() for name in PACW_FILES)


def test_sigkill_fetch_with_quarantine_on_never_lets_a_quarantined_row_out(
    tmp_path: Path,
) -> None:
    """Kill `fetch` at random times and at the stage's crash points with spikes planted and
    `action: quarantine`; send whatever each kill left committed. No spike ever reaches
    the reference receiver, and after a clean rerun every spike is dead as QUALITY_SPIKE."""
    import random

    from durability import await_run, route_rows, spawn, work_seconds, write_replay

    data = route_rows(96)
    spikes = {("PJM", "2025-06-01T10"), ("MISO", "2025-06-02T20"), ("ERCO", "2025-06-03T06")}
    keys = set()
    names = {"PJM": "PJM", "MISO": "MISO", "ERCO": "ERCOT"}
    for rows in data.values():
        for r in rows:
            if (r.get("respondent"), r["period"]) in spikes and r.get("type") == "D":
                r["value"] = scale(r["value"], 1.8)
                keys.add((f"EIA.{names[r['respondent']]}.demand", f"{r['period']}:00:00Z"))
    assert len(keys) == 3
    directory = write_replay(tmp_path / "replay", data, page_length=500)
    rng = random.Random(13)
    plan = [("stage.rows_written", 2), ("stage.checked", 1), ("stage.before_commit", 3)]
    plan += [(None, 0)] * 3
    with running_receiver(tmp_path, api_key=KEY_GP) as receiver:
        base = outbox_env(
            tmp_path / "w.db",
            receiver=receiver,
            OUTBOX__QUALITY__RULES__SPIKE__ACTION="quarantine",
            OUTBOX__EIA__REPLAY_COMMIT_ROWS="2000",
        )
        work = work_seconds("fetch", "--replay", str(directory), env=base, db=tmp_path / "w.db")
        for trial, (point, after) in enumerate(plan):
            db = tmp_path / f"t{trial}.db"
            env = {**base, "OUTBOX_DB": str(db)}
            if point is None:
                proc = spawn("fetch", "--replay", str(directory), env=env)
                await_run(db, proc)
                time.sleep(rng.uniform(0, work))
                proc.kill()
            else:
                crash = {"OUTBOX_CRASH_AT": point, "OUTBOX_CRASH_AFTER": str(after)}
                proc = spawn("fetch", "--replay", str(directory), env={**env, **crash})
            proc.wait(120)
            for args in (("send",), ("fetch", "--replay", str(directory)), ("send",)):
                done = outbox(*args, env=env)
                assert done.returncode == 0, done.stderr
            assert not keys & set(receiver_rows(receiver.base_url, KEY_GP)), trial
            assert {_state(db, k) for k in keys} == {("dead", "QUALITY_SPIKE")}


def _table(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("then", ["warn", "quarantine"])
@pytest.mark.parametrize("point", ["quality.pending", "quality.judged"])
def test_a_kill_before_the_deferred_checks_commit_leaves_markers_the_next_fetch_judges(
    tmp_path: Path, point: str, then: str
) -> None:
    """With every rule warning, a fetch run's pages commit with their hours marked and the
    checks judge them at the end of the run. SIGKILL it after the pages committed, before
    (or while) the checks run: the rows and markers are there, no finding is, and the
    next fetch, which writes nothing, judges the marked hours and opens the finding; also
    when a rule has been set to quarantine since (its checks judge in the staging
    transactions, and the markers left are judged at the end all the same)."""
    db = tmp_path / "o.db"
    spiked = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    directory = pacw_pages(tmp_path / "p", spiked)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("balancing_authorities: {PACW: PACW}\n")
    env = outbox_env(db, OUTBOX_CONFIG=str(cfg))
    killed = outbox("fetch", "--replay", str(directory), env={**env, "OUTBOX_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert _table(db, "SELECT count(*) FROM observations")[0][0] > 0
    marked = _table(db, "SELECT ba, lo, hi FROM quality_pending")
    assert {ba for ba, _lo, _hi in marked} == {"PACW"}
    assert min(lo for _ba, lo, _hi in marked) <= "2023-01-04T12:00:00Z"
    assert max(hi for _ba, _lo, hi in marked) >= "2023-01-04T12:00:00Z"
    assert found(db) == set()
    if then == "quarantine":
        cfg.write_text(cfg.read_text() + "quality: {rules: {flat_line: {action: quarantine}}}\n")
    again = outbox("fetch", "--replay", str(directory), env=env)
    assert again.returncode == 0, again.stderr
    assert found(db) == {
        ("spike", "PACW", "EIA.PACW.demand", "2023-01-04T12:00:00Z", "2023-01-04T12:00:00Z")
    }
    assert _table(db, "SELECT count(*) FROM quality_pending") == [(0,)]
    (counts,) = _table(db, "SELECT counts FROM runs WHERE stage = 'fetch' ORDER BY id DESC")[0]
    assert json.loads(counts)["written"] == 0
    assert json.loads(counts)["findings_opened"] == 1


def _spike_and_flat_line(name: str, rows: Rows) -> None:
    """PACW demand with a spike at 2023-01-04T12 and eight flat hours on 2023-01-05."""
    for r in rows:
        if r["period"] == "2023-01-04T12" and r.get("type") == "D":
            r["value"] = scale(r["value"], 1.6)
        if "2023-01-05T06" <= r["period"] <= "2023-01-05T13" and r.get("type") == "D":
            r["value"] = "4321"


def test_the_deferred_checks_in_many_small_passes_find_what_one_pass_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passes of a few rows each (every BA's hours cut in pieces, each reading its own
    context) open the same findings as the default single pass, and leave no marker."""
    from outbox.quality import pending

    directory = pacw_pages(tmp_path / "p", _spike_and_flat_line)
    chunks, passes = pending.chunks, []
    monkeypatch.setattr(pending, "chunks", lambda *a: passes.append(chunks(*a)) or passes[-1])
    replay(tmp_path / "one.db", directory, **PACW)
    replay(tmp_path / "many.db", directory, **PACW, quality={"pass_rows": 200})
    assert len(passes[0]) == 1 and len(passes[1]) > 5
    assert found(tmp_path / "many.db") == found(tmp_path / "one.db")
    assert {f[0] for f in found(tmp_path / "one.db")} >= {"spike", "flat_line"}
    assert _table(tmp_path / "many.db", "SELECT count(*) FROM quality_pending") == [(0,)]


def test_a_run_killed_between_passes_leaves_no_reader_and_the_next_run_judges_the_rest(
    tmp_path: Path,
) -> None:
    """SIGKILL a fetch inside its second of many passes (the first committed), while its
    reader process still has passes to hand over (more than a pipe's buffer holds, so it
    is blocked writing them): the reader goes too, the passes not judged stay marked, and
    the next run, which writes nothing, ends with the findings of one clean pass and no
    marker."""
    spiked = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    directory = pacw_pages(tmp_path / "p", spiked)
    replay(tmp_path / "clean.db", directory, **PACW)
    db = tmp_path / "o.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("balancing_authorities: {PACW: PACW}\nquality: {pass_rows: 50}\n")
    env = outbox_env(db, OUTBOX_CONFIG=str(cfg))
    crash = {"OUTBOX_CRASH_AT": "quality.judged", "OUTBOX_CRASH_AFTER": "2"}
    killed = outbox("fetch", "--replay", str(directory), env={**env, **crash})
    assert killed.returncode == -9, killed.stderr
    assert processes_naming(str(db), wait=5) == []
    assert _table(db, "SELECT count(*) FROM quality_pending")[0][0] > 0
    again = outbox("fetch", "--replay", str(directory), env=env)
    assert again.returncode == 0, again.stderr
    assert found(db) == found(tmp_path / "clean.db")
    assert ("spike", "PACW", "EIA.PACW.demand") in {f[:3] for f in found(db)}
    assert _table(db, "SELECT count(*) FROM quality_pending") == [(0,)]


@pytest.mark.parametrize(
    "reader", ["process", "none", "frozen", "dies", "garbage", "wrong", "hangs"]
)
def test_the_later_passes_are_read_by_a_reader_process_or_here_if_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """A run of many passes has a reader process read the rows of every pass after the
    first; whether it works, cannot start (no interpreter, a frozen app), dies, hands over
    garbage or rows that do not add up, or hangs, the findings are those of one pass read
    in the run's own process, and the reader is gone after. It is given no secret, and a
    working directory holding modules of the same names does not shadow its own."""
    import sys

    from outbox.quality import reader as module

    directory = pacw_pages(tmp_path / "p", _spike_and_flat_line)
    replay(tmp_path / "one.db", directory, **PACW)
    monkeypatch.setenv("EIA_API_KEY", "eia-secret-3141")
    monkeypatch.setenv("OUTBOX_GRIDPULSE_API_KEY_FILE", "/run/gp-secret-2718")
    fake, seen = tmp_path / "fake-python", tmp_path / "reader-env.txt"
    python = sys.executable
    wrong = (
        "import pickle, sys, numpy as np; from outbox.quality.frame import Rows; "
        "sys.stdout.buffer.write(pickle.dumps(Rows(['EIA.PACW.demand'], [5], "
        "np.zeros(1, np.int64), np.zeros(1))))"
    )
    bodies = {
        "dies": "exit 3",
        "garbage": "echo garbage",
        "wrong": f'exec "{python}" -c "{wrong}"',
        # keeps its arguments (the database's path) on its command line while it hangs
        "hangs": f'env > "{seen}"; exec "{python}" -c "import time; time.sleep(600)" "$@"',
    }
    if reader == "process":
        # Run from a directory whose own outbox/ and numpy.py would break the reader if
        # it put the working directory on its path (it starts with -P).
        shadow = tmp_path / "shadow"
        (shadow / "outbox").mkdir(parents=True)
        for module_file in (shadow / "outbox" / "__init__.py", shadow / "numpy.py"):
            module_file.write_text("raise ImportError('the shadow, not the package')\n")
        monkeypatch.chdir(shadow)
    elif reader == "none":
        monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    elif reader == "frozen":
        monkeypatch.setattr(sys, "frozen", True, raising=False)
    elif reader in bodies:
        fake.write_text(f"#!/bin/sh\n{bodies[reader]}\n")
        fake.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(fake))
        monkeypatch.setattr(module, "READ_TIMEOUT_SECONDS", 1.0)
    handed: list[bool] = []
    real_next = module.RowReader.next
    monkeypatch.setattr(
        module.RowReader, "next", lambda self: handed.append(bool(r := real_next(self))) or r
    )
    many = tmp_path / "many.db"
    replay(many, directory, **PACW, quality={"pass_rows": 200})
    assert found(many) == found(tmp_path / "one.db")
    assert {f[0] for f in found(many)} >= {"spike", "flat_line"}
    if reader == "process":
        assert len(handed) > 4 and all(handed)  # every later pass came from the reader
    elif reader in ("none", "frozen"):
        assert handed == []  # no reader: every pass read here
    else:
        assert len(handed) > 4 and not any(handed)  # it failed: every pass read here
    assert processes_naming(str(many), wait=5) == []
    if reader == "hangs":
        given = seen.read_text()
        assert "PATH=" in given and "secret" not in given


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_pass_size_is_a_config_error_before_anything_is_written(
    tmp_path: Path, value: str
) -> None:
    """``quality.pass_rows`` must be a positive number of rows: otherwise one line naming
    the variable, exit 2, and no outbox created."""
    db = tmp_path / "o.db"
    env = outbox_env(db, OUTBOX__QUALITY__PASS_ROWS=value)
    result = outbox("fetch", "--replay", str(pacw_pages(tmp_path / "p")), env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OUTBOX__QUALITY__PASS_ROWS: quality.pass_rows" in lines[0]
    assert "Traceback" not in result.stderr and not db.exists()


def test_with_a_rule_quarantining_the_checks_judge_in_the_staging_transaction(
    tmp_path: Path,
) -> None:
    """A kill right after a page's checks (before its commit) and a rerun: nothing was
    ever marked to judge later, and the spike is dead-lettered by the page that staged it."""
    db = tmp_path / "o.db"
    spiked = edit_rows(
        at("2023-01-04T12", type="D"), lambda r: r.update(value=scale(r["value"], 1.6))
    )
    directory = pacw_pages(tmp_path / "p", spiked)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "balancing_authorities: {PACW: PACW}\nquality: {rules: {spike: {action: quarantine}}}\n"
    )
    env = outbox_env(db, OUTBOX_CONFIG=str(cfg))
    killed = outbox(
        "fetch", "--replay", str(directory), env={**env, "OUTBOX_CRASH_AT": "quality.pending"}
    )
    assert killed.returncode == 0, killed.stderr  # that point is never reached
    assert _table(db, "SELECT count(*) FROM quality_pending") == [(0,)]
    assert _state(db, SPIKE) == ("dead", "QUALITY_SPIKE")


def test_overrides_go_rule_then_dataset_then_ba() -> None:
    from outbox.config import QualityConfig
    from outbox.quality.settings import Resolver

    cfg = QualityConfig(
        rules={
            "flat_line": {"window_hours": 8, "bas": {"PJM": {"action": "quarantine"}}},
            "spike": {"threshold": 10, "datasets": {"demand": {"threshold": 12}}},
        }
    )
    r = Resolver(cfg)
    assert r.get("flat_line", "demand").window_hours == 8
    assert r.get("flat_line", "generation").window_hours == 24  # the dataset default stands
    assert r.get("flat_line", "demand", "PJM").action == "quarantine"
    assert r.get("flat_line", "demand", "MISO").action == "warn"
    assert r.get("spike", "demand", "PJM").threshold == 12
    assert r.get("spike", "net_generation").threshold == 10
    assert not r.get("spike", "generation").enabled
