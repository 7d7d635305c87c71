"""outbox doctor: one line per check; broken databases are set aside, never deleted."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import respx
from durability import lock_held_by_child
from freezegun import freeze_time
from typer.testing import CliRunner

from outbox.cli import app
from outbox.store import Store, file_lock

NOW = "2025-08-22T12:00:00Z"
GP = "https://gp.test"
EIA = "https://eia.test/v2"
EIA_KEY = "eia-secret-key-5678"
GP_KEY = "gp-secret-key-1234"
CONFIG = f"""\
database: outbox.db
balancing_authorities: {{PJM: PJM, CAISO: CISO}}
eia: {{base_url: "{EIA}", api_key: {EIA_KEY}}}
gridpulse: {{base_url: "{GP}", api_key: {GP_KEY}}}
"""
SAMPLES = Path(__file__).parent / "data" / "eia-samples"
# The one EIA request doctor makes, as its messages show it (key masked).
EIA_SHOWN = (
    f"{EIA}/electricity/rto/region-data/data/?api_key=***&frequency=hourly&data[0]=value"
    "&facets[respondent][]=PJM&facets[type][]=D&start=2025-08-20T12&end=2025-08-22T12"
    "&sort[0][column]=period&sort[0][direction]=asc&sort[1][column]=respondent"
    "&sort[1][direction]=asc&sort[2][column]=type&sort[2][direction]=asc&offset=0&length=1"
)
OK_LINES = {
    "config": "OK    config    config.yaml: database outbox.db, 2 BAs, 6 datasets, "
    "eia key ***, gridpulse key ***",
    "database": "OK    database  outbox.db: quick_check ok (<size>)",
    "schema": "OK    schema    0009 (head)",
    "locks": "OK    locks     fetch idle, send idle",
    "disk": "OK    disk      <free> on the file system of outbox.db; floor 268.4 MB",
    "gridpulse": "OK    gridpulse https://gp.test: credentials accepted (worker gridpulse-outbox)",
    "clock": "OK    clock     +0.0s against GridPulse",
    "eia": "OK    eia       https://eia.test/v2: key accepted; 48 demand rows for PJM "
    "in the last 48 h",
    "eia codes": "OK    eia codes 2 BA codes known to EIA (4 respondents)",
}
# EIA's answer to GET <route>/facet/respondent/ (shape of the v2 facet endpoint).
RESPONDENTS = {
    "CISO": "California Independent System Operator",
    "ERCO": "Electric Reliability Council of Texas, Inc.",
    "PJM": "PJM Interconnection, LLC",
    "SWPP": "Southwest Power Pool",
}
NO_EIA_CODES = "SKIP  eia codes needs an answer from EIA (see the eia check)"
runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(CONFIG)
    Store.open(tmp_path / "outbox.db").close()
    return tmp_path


def eia_page(total: int = 48) -> dict:
    return {
        "response": {
            "total": str(total),
            "dateFormat": 'YYYY-MM-DD"T"HH24',
            "frequency": "hourly",
            "data": [
                {
                    "period": "2025-08-20T12",
                    "respondent": "PJM",
                    "type": "D",
                    "value": "90000",
                    "value-units": "megawatthours",
                }
            ],
        },
        "request": {
            "command": "/v2/electricity/rto/region-data/data/",
            "params": {"api_key": EIA_KEY, "length": "1"},
        },
        "apiVersion": "2.1.8",
    }


def auth_answer(server_time: str = NOW) -> httpx.Response:
    body = {"worker_id": "gridpulse-outbox", "authenticated": True, "server_time": server_time}
    return httpx.Response(200, json=body)


def facet_answer(values: dict[str, str] = RESPONDENTS) -> httpx.Response:
    facets = [{"id": k, "name": v, "alias": f"({k}) {v}"} for k, v in values.items()]
    body = {
        "response": {"totalFacets": len(facets), "facets": facets},
        "request": {
            "command": "/v2/electricity/rto/region-data/facet/respondent/",
            "params": {"api_key": EIA_KEY},
        },
        "apiVersion": "2.1.8",
    }
    return httpx.Response(200, json=body)


def routes(
    router: respx.MockRouter,
    gridpulse: httpx.Response | Exception,
    eia: httpx.Response | Exception,
    facets: httpx.Response | Exception | None = None,
) -> None:
    """The requests doctor makes, matched strictly (key, worker id, one row); the facet
    list is asked for only after EIA answered the data request."""
    auth = router.post(
        f"{GP}/api/v1/auth/worker",
        headers={"Authorization": f"Bearer {GP_KEY}"},
        json={"worker_id": "gridpulse-outbox"},
    )
    region = router.get(
        f"{EIA}/electricity/rto/region-data/data/", params={"api_key": EIA_KEY, "length": "1"}
    )
    for route, outcome in ((auth, gridpulse), (region, eia)):
        if isinstance(outcome, Exception):
            route.mock(side_effect=outcome)
        else:
            route.mock(return_value=outcome)
    if isinstance(eia, httpx.Response) and eia.status_code == 200:
        facet = router.get(
            f"{EIA}/electricity/rto/region-data/facet/respondent/", params={"api_key": EIA_KEY}
        )
        outcome = facet_answer() if facets is None else facets
        if isinstance(outcome, Exception):
            facet.mock(side_effect=outcome)
        else:
            facet.mock(return_value=outcome)


def doctor(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["-c", "config.yaml", "doctor", *args])
    text = re.sub(r"quick_check ok \(\d+\.\d MB\)", "quick_check ok (<size>)", result.output)
    text = re.sub(r"\d+(\.\d)? [kMGT]B free \(\d+ bytes\)", "<free>", text)
    return result.exit_code, text


def lines(**changed: str) -> str:
    return "\n".join({**OK_LINES, **changed}.values()) + "\n"


@freeze_time(NOW)
def test_all_ok(workdir: Path) -> None:
    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        assert doctor() == (0, lines())


@freeze_time(NOW)
def test_bad_keys(workdir: Path) -> None:
    refused = httpx.Response(
        401, json={"error": {"code": "UNAUTHORIZED", "message": "missing or wrong key"}}
    )
    invalid = httpx.Response(
        403, content=(SAMPLES / "error-api-key-invalid-http403.json").read_bytes()
    )
    with respx.mock(assert_all_called=True) as router:
        routes(router, refused, invalid)
        code, text = doctor()
    assert code == 1
    message = json.loads((SAMPLES / "error-api-key-invalid-http403.json").read_text())["error"]
    assert text == lines(
        gridpulse="FAIL  gridpulse https://gp.test: credentials refused: GridPulse answered 401 "
        "UNAUTHORIZED: missing or wrong key; hint: check GRIDPULSE_API_KEY / "
        "GRIDPULSE_API_KEY_FILE (403: the key may not ingest)",
        clock="SKIP  clock     needs GridPulse",
        eia="FAIL  eia       https://eia.test/v2: key refused: EIA electricity/rto/region-data "
        f"page 0 (offset 0): HTTP 403, EIA error API_KEY_INVALID: {message['message']} "
        f"[{EIA_SHOWN}]; hint: check EIA_API_KEY / EIA_API_KEY_FILE "
        "(free: https://www.eia.gov/opendata/)",
        **{"eia codes": NO_EIA_CODES},
    )
    assert EIA_KEY not in text and GP_KEY not in text


@freeze_time(NOW)
def test_unreachable(workdir: Path) -> None:
    refused = httpx.ConnectError("Connection refused")
    with respx.mock(assert_all_called=True) as router:
        routes(router, refused, refused)
        code, text = doctor()
    assert code == 1
    assert text == lines(
        gridpulse="FAIL  gridpulse https://gp.test: unreachable: GridPulse connection failed on "
        "POST /api/v1/auth/worker: ConnectError: Connection refused; hint: check "
        "gridpulse.base_url, DNS and the network; is GridPulse up?",
        clock="SKIP  clock     needs GridPulse",
        eia="FAIL  eia       https://eia.test/v2: unreachable: EIA electricity/rto/region-data "
        f"page 0 (offset 0): ConnectError: Connection refused [{EIA_SHOWN}]; hint: check "
        "eia.base_url and the network; EIA itself is down now and then",
        **{"eia codes": NO_EIA_CODES},
    )


@freeze_time(NOW)
def test_clock_skew_fails(workdir: Path) -> None:
    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer("2025-08-22T11:55:00Z"), httpx.Response(200, json=eia_page()))
        code, text = doctor()
    assert code == 1
    assert text == lines(
        clock="FAIL  clock     +300.0s against GridPulse (limit 60s); hint: synchronise the "
        "clock (e.g. `timedatectl set-ntp true`): freshness and retries use it"
    )


def test_missing_keys_and_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("database: outbox.db\n")
    code, text = doctor()  # no network: nothing to ask without keys
    assert code == 1
    assert text == (
        "OK    config    config.yaml: database outbox.db, 5 BAs, 6 datasets, eia key missing, "
        "gridpulse key missing\n"
        "SKIP  database  no outbox at outbox.db yet; hint: the first fetch (or `outbox db "
        "upgrade`) creates it\n"
        "SKIP  schema    no database yet\n"
        "OK    locks     fetch idle, send idle\n"
        "OK    disk      <free> on the file system of outbox.db; floor 268.4 MB\n"
        "FAIL  gridpulse gridpulse.api_key is missing; hint: set GRIDPULSE_API_KEY or "
        "GRIDPULSE_API_KEY_FILE\n"
        "SKIP  clock     needs an answer from GridPulse\n"
        "FAIL  eia       eia.api_key is missing; hint: set EIA_API_KEY or EIA_API_KEY_FILE "
        "(free: https://www.eia.gov/opendata/)\n"
        f"{NO_EIA_CODES}\n"
    )
    assert not (tmp_path / "outbox.db").exists()  # doctor does not create the outbox


def test_unreadable_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("datasets: {nope: {}}\n")
    code, text = doctor()
    assert code == 1
    assert text == (
        "FAIL  config    config.yaml: datasets: unknown dataset 'nope'; known: demand, "
        "demand_forecast, net_generation, interchange, generation, ba_interchange; "
        "hint: fix the named key, then run doctor again\n"
        "SKIP  database  needs a valid config\n"
        "SKIP  schema    needs a valid config\n"
        "SKIP  locks     needs a valid config\n"
        "SKIP  disk      needs a valid config\n"
        "SKIP  gridpulse needs a valid config\n"
        "SKIP  clock     needs a valid config\n"
        "SKIP  eia       needs a valid config\n"
        "SKIP  eia codes needs a valid config\n"
    )


GARBAGE = b"PK\x03\x04 not an SQLite file at all " * 512
WAL = b"a write-ahead log that belongs to the broken file" * 64


@freeze_time(NOW)
def test_broken_database_is_reported_then_set_aside_with_reset(workdir: Path) -> None:
    db = workdir / "outbox.db"
    db.unlink()
    db.write_bytes(GARBAGE)
    (workdir / "outbox.db-wal").write_bytes(WAL)
    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        code, text = doctor()
    assert code == 1
    assert text == lines(
        database="FAIL  database  outbox.db: unreadable: file is not a database; hint: run "
        "`outbox doctor --reset` to set it aside (renamed, never deleted) and start a fresh "
        "outbox",
        schema="SKIP  schema    database unreadable",
    )
    assert db.read_bytes() == GARBAGE  # without --reset nothing moves

    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        code, text = doctor("--reset")
    assert (code, text) == (
        0,
        lines(
            database="OK    database  outbox.db: was unreadable (file is not a database); "
            "set aside as outbox.db.broken-20250822T120000Z; started a fresh outbox",
        ),
    )
    aside = workdir / "outbox.db.broken-20250822T120000Z"
    assert aside.read_bytes() == GARBAGE
    assert (workdir / "outbox.db.broken-20250822T120000Z-wal").read_bytes() == WAL
    with Store.open_readonly(db) as store:
        assert store.upkeep.quick_check() == ["ok"] and store.schema_version() == "0009"


@freeze_time(NOW)
def test_corrupt_pages_fail_quick_check(workdir: Path) -> None:
    db = workdir / "outbox.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 5 * 4096
    data[2 * 4096 : 5 * 4096] = b"\xff" * (3 * 4096)  # b-tree pages, header intact
    db.write_bytes(bytes(data))
    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        code, text = doctor()
    assert code == 1
    database = text.splitlines()[1]
    assert database.startswith("FAIL  database  outbox.db: unreadable: "), database
    assert db.read_bytes() == bytes(data)


@freeze_time(NOW)
def test_reset_refuses_while_a_stage_holds_its_lock(workdir: Path) -> None:
    import os

    db = workdir / "outbox.db"
    db.unlink()
    db.write_bytes(GARBAGE)
    with (
        file_lock(workdir / "outbox.db.send.lock", blocking=False) as got,
        respx.mock(assert_all_called=True) as router,
    ):
        assert got
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        code, text = doctor("--reset")
    assert code == 1
    assert text == lines(
        database="FAIL  database  outbox.db: unreadable (file is not a database) and in use; "
        "hint: stop the fetch/send timers first, then run `outbox doctor --reset` again",
        schema="SKIP  schema    database unreadable",
        locks=f"OK    locks     fetch idle, send running (pid {os.getpid()})",
    )
    assert db.read_bytes() == GARBAGE


@pytest.mark.parametrize("write_pid", [True, False])
def test_a_held_lock_is_never_idle_even_when_its_pid_cannot_be_read(
    workdir: Path, write_pid: bool
) -> None:
    """A fetch holding its lock (file mode 0600) is running with its pid, or, when the
    pid cannot be read, held (pid unknown): never idle."""
    lock = workdir / "outbox.db.fetch.lock"
    with lock_held_by_child(lock, write_pid=write_pid) as pid:
        assert lock.stat().st_mode & 0o777 == 0o600
        with respx.mock(assert_all_called=True) as router, freeze_time(NOW):
            routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
            code, text = doctor()
    fetch = f"running (pid {pid})" if write_pid else "held (pid unknown)"
    assert (code, text) == (0, lines(locks=f"OK    locks     fetch {fetch}, send idle"))


def test_reset_refuses_while_a_lock_is_held_by_a_pid_it_cannot_read(workdir: Path) -> None:
    db = workdir / "outbox.db"
    db.unlink()
    db.write_bytes(GARBAGE)
    with (
        lock_held_by_child(workdir / "outbox.db.send.lock", write_pid=False),
        respx.mock(assert_all_called=True) as router,
        freeze_time(NOW),
    ):
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        code, text = doctor("--reset")
    assert code == 1
    assert text == lines(
        database="FAIL  database  outbox.db: unreadable (file is not a database) and in use; "
        "hint: stop the fetch/send timers first, then run `outbox doctor --reset` again",
        schema="SKIP  schema    database unreadable",
        locks="OK    locks     fetch idle, send held (pid unknown)",
    )
    assert db.read_bytes() == GARBAGE
    assert sorted(p.name for p in workdir.iterdir() if ".broken-" in p.name) == []


def test_doctor_is_in_help_and_readme() -> None:
    result = runner.invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0, result.output
    assert "--reset" in result.output
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "outbox doctor" in readme


@freeze_time(NOW)
def test_a_ba_code_eia_does_not_know_is_a_warning_with_the_closest_codes(workdir: Path) -> None:
    (workdir / "config.yaml").write_text(
        CONFIG.replace("{PJM: PJM, CAISO: CISO}", "{PJM: PJM, CAISO: CISOO, TYPO: XXXX}")
    )
    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()))
        code, text = doctor()
    assert code == 0  # a warning, not a failure
    assert text.splitlines()[-1] == (
        "WARN  eia codes unknown to EIA: CAISO: CISOO (closest: CISO California Independent "
        "System Operator); TYPO: XXXX (no close match); hint: fix balancing_authorities (EIA "
        "answers an unknown code with no rows, not an error)"
    )
    assert EIA_KEY not in text


@freeze_time(NOW)
def test_the_code_check_is_skipped_when_eia_cannot_list_its_respondents(workdir: Path) -> None:
    down = httpx.Response(503, text="<html>busy</html>")
    with respx.mock(assert_all_called=True) as router:
        routes(router, auth_answer(), httpx.Response(200, json=eia_page()), facets=down)
        code, text = doctor()
    assert code == 0
    last = text.splitlines()[-1]
    assert last.startswith(
        "SKIP  eia codes could not list EIA's respondents: EIA electricity/rto/region-data "
        "facet respondent: HTTP 503"
    )
    assert "api_key=***" in last and EIA_KEY not in text


def test_code_check_against_the_stand_in_eia(tmp_path: Path) -> None:
    from outbox import doctor as doctor_mod
    from outbox.config import load_config
    from outbox.sample import sample_dir
    from outbox.testing.fake_eia import FakeEIA
    from outbox.testing.synth import read_rows

    cfg = tmp_path / "c.yaml"
    cfg.write_text("balancing_authorities: {PJM: PJM, CAISO: CISO, NEW: BHBA, TYPO: PJN}\n")
    eia_ok = doctor_mod.Finding("eia", doctor_mod.OK, "key accepted")
    with FakeEIA(read_rows(sample_dir()), api_key=EIA_KEY) as fake:
        fake.add_facet_values(
            "electricity/rto/region-data", "respondent", {"BHBA": "Black Hills BA"}
        )
        config = load_config(cfg, env={"EIA_BASE_URL": fake.start(), "EIA_API_KEY": EIA_KEY})
        with httpx.Client() as http:
            found = doctor_mod.check_eia_codes(config, http, eia_ok)
        asked = list(fake.requests)
    assert found.outcome == doctor_mod.WARN
    assert found.detail == "unknown to EIA: TYPO: PJN (closest: PJM PJM Interconnection, LLC)"
    assert asked == [f"/v2/electricity/rto/region-data/facet/respondent/?api_key={EIA_KEY}"]


def test_disk_shows_the_free_bytes_and_fails_under_the_floor(workdir: Path) -> None:
    free = shutil.disk_usage(workdir).free
    result = runner.invoke(app, ["-c", "config.yaml", "doctor"])
    (line,) = [x for x in result.output.splitlines() if x.startswith(("OK    disk", "FAIL  disk"))]
    shown = re.fullmatch(
        r"OK    disk      \d+\.\d [MGT]B free \((\d+) bytes\) on the file system of "
        r"outbox\.db; floor 268\.4 MB",
        line,
    )
    assert shown, line
    assert abs(int(shown.group(1)) - free) < 2**30  # the same file system, moments apart

    floor = free + 2**40
    env = {"OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES": str(floor)}
    low = runner.invoke(app, ["-c", "config.yaml", "doctor"], env=env)
    assert low.exit_code == 1
    (line,) = [x for x in low.output.splitlines() if x.startswith("FAIL  disk")]
    assert line.endswith(
        "hint: free space on that disk or lower housekeeping.min_free_bytes: fetch stages "
        "nothing below the floor (exit 4)"
    )
    off = runner.invoke(
        app, ["-c", "config.yaml", "doctor"], env={"OUTBOX__HOUSEKEEPING__MIN_FREE_BYTES": "0"}
    )
    assert re.search(r"^OK    disk      .*; no floor$", off.output, re.M), off.output
