"""Bad input never corrupts the outbox: the corpus under tests/data/bad/.

Every malformed EIA response is fed twice: as a saved page (``fetch --replay``) and
served by the stand-in EIA server for a live fetch. Every malformed config file and
secret file is given to a fetch. Each must give a non-zero exit and a message naming the
cause; the outbox (every table but ``runs``) must be byte-for-byte what it was; no
secret may appear in any output, in the run history or in the database files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import typer
from durability import KEY_EIA, KEY_GP, outbox, tables
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import Config
from outbox.sample import sample_dir
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store
from outbox.testing.fake_eia import FakeEIA

BAD = Path(__file__).parent / "data" / "bad"
LIVE_SKIP = None
# file -> (cause named for a replayed page, cause named for a live fetch)
EIA_CAUSES: dict[str, tuple[str, str | None]] = {
    "html-error-page.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    "truncated.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    "empty.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    "null.json": ("no request.command", "no 'response' object"),
    "array.json": ("no request.command", "no 'response' object"),
    "string.json": ("no request.command", "no 'response' object"),
    "no-response.json": ("no 'response' object", "no 'response' object"),
    "response-list.json": ("no 'response' object", "no 'response' object"),
    "no-data.json": ("response.data is missing", "response.data is missing"),
    "data-object.json": ("response.data is missing or not a list", "not a list"),
    "no-total.json": ("response.total None is not an integer", "is not an integer"),
    "total-words.json": ("response.total 'lots' is not an integer", "'lots' is not an integer"),
    "total-negative.json": ("response.total '-5' is not an integer", "'-5' is not an integer"),
    "total-fraction.json": ("response.total '12.5'", "'12.5' is not an integer"),
    "total-bool.json": ("response.total True is not an integer", "True is not an integer"),
    "row-not-object.json": ("a row that is not an object", "a row that is not an object"),
    "rows-without-period.json": ("missing_field=5", "missing_field=5"),
    "rows-without-value.json": ("missing_field=5", "missing_field=5"),
    "rows-without-respondent.json": ("missing_field=5", "missing_field=5"),
    "respondent-empty.json": ("missing_field=5", "missing_field=5"),
    "value-text.json": ("non_numeric_value=5", "non_numeric_value=5"),
    "value-object.json": ("non_numeric_value=5", "non_numeric_value=5"),
    "value-bool.json": ("non_numeric_value=5", "non_numeric_value=5"),
    "value-nan.json": ("non_finite_value=5", "non_finite_value=5"),
    "value-infinity.json": ("non_finite_value=5", "non_finite_value=5"),
    "value-huge-exponent.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    "period-with-space.json": ("bad_period=5", "bad_period=5"),
    "period-local-offset.json": ("bad_period=5", "bad_period=5"),
    "period-month-13.json": ("bad_period=5", "bad_period=5"),
    "period-number.json": ("bad_period=5", "bad_period=5"),
    "period-future.json": ("future_period=5", "outside_window=5"),
    "respondent-not-requested.json": ("unexpected_respondent=5", "unexpected_respondent=5"),
    "respondent-quoted.json": ("bad_code=5", "bad_code=5"),
    "respondent-spaces.json": ("bad_code=5", "bad_code=5"),
    "respondent-100k-chars.json": ("bad_code=5", "bad_code=5"),
    "units-kilowatthours.json": ("unknown_units=5", "unknown_units=5"),
    "units-missing.json": ("unknown_units=5", "unknown_units=5"),
    "type-unknown.json": ("unknown_type=5", "unknown_type=5"),
    "demand-negative.json": ("negative_demand=5", "negative_demand=5"),
    "value-out-of-range.json": ("out_of_range=5", "out_of_range=5"),
    "total-below-rows.json": ("5 rows is more than response.total 2", "more than total 2"),
    "duplicate-rows-past-total.json": ("10 rows is more than response.total 5", "more than total"),
    "error-envelope-200.json": ("saved EIA error API_KEY_INVALID", "EIA error API_KEY_INVALID"),
    "error-echoing-key.json": ("saved EIA error 400", "EIA error 400"),
    "other-route.json": ("no request.command naming an EIA-930 route", LIVE_SKIP),
    "invalid-utf8.json": ("not valid JSON/UTF-8", "not JSON (truncated or an HTML page)"),
    "utf16.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    "deep-nesting.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    "gzip-bytes.json": ("not valid JSON", "not JSON (truncated or an HTML page)"),
    # generated by the tests below, too big to keep in the repository
    "page-50mb.json": ("larger than the 16777216-byte page limit", "page limit"),
    "too-many-rows.json": ("5001 rows on one page", "5001 rows on a page of at most 5000"),
}
CONFIG_CAUSES = {
    "batch-size-text.yaml": "gridpulse.batch_size: Input should be a valid integer",
    "batch-size-huge.yaml": "gridpulse.batch_size: Input should be less than or equal to 5000",
    "unknown-key.yaml": "gridpulse.batchsize: unknown key",
    "url-ftp.yaml": "eia.base_url: 'ftp://api.eia.gov/v2' is not an http(s) URL",
    "top-level-list.yaml": "the top level must be a mapping",
    "unclosed-bracket.yaml": "invalid YAML",
    "tab-indent.yaml": "invalid YAML",
    "verify-tls-maybe.yaml": "eia.verify_tls: Input should be a valid boolean",
    "unknown-dataset.yaml": "unknown dataset 'co2'",
    "bas-list.yaml": "balancing_authorities: Input should be a valid dictionary",
    "history-start-word.yaml": "eia.history_start: Input should be a valid datetime",
    "retention-short.yaml": "housekeeping.retention_days (2) must exceed the longest lookback",
    "key-beside-bad-value.yaml": "gridpulse.batch_size: Input should be greater than or equal to 1",
    "api-key-list.yaml": "gridpulse.api_key: Input should be a valid string",
    "log-format-xml.yaml": "log_format: Input should be 'logfmt' or 'json'",
    "page-length-text.yaml": "eia.page_length: Input should be a valid integer",
    "invalid-utf8.yaml": "cannot read config file",
}
KEY_CAUSES = {
    "key-empty.txt": "is empty",
    "key-invalid-utf8.txt": "cannot read secret file",
    "missing": "cannot read secret file",
    "directory": "cannot read secret file",
}
SECRETS = (KEY_EIA, KEY_GP)


def _corpus() -> ModuleType:
    """tests/data/bad/make_corpus.py, which builds every page from one valid page."""
    spec = importlib.util.spec_from_file_location("make_corpus", BAD / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = _corpus()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An outbox holding the bundled sample day: what a bad page must leave untouched."""
    db = tmp_path_factory.mktemp("seed") / "outbox.db"
    with Store.open(db) as store:
        run_fetch(Config(), store, ReplaySource(sample_dir()))
    return db


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pages too big to keep: 50 MB, one row more than EIA's 5,000, and a respondent
    code of 100,000 characters."""
    out = tmp_path_factory.mktemp("generated")
    doc = CORPUS.good()
    filler = "x" * 10_000
    doc["response"]["data"] = [
        dict(doc["response"]["data"][0], **{"respondent-name": filler}) for _ in range(5000)
    ]
    doc["response"]["total"] = "5000"
    (out / "page-50mb.json").write_bytes(orjson.dumps(doc))
    assert (out / "page-50mb.json").stat().st_size > 50_000_000
    doc = CORPUS.good()
    CORPUS.too_many(doc)
    (out / "too-many-rows.json").write_bytes(orjson.dumps(doc))
    doc = CORPUS.good()
    CORPUS.rows_set("respondent", "P" * 100_000)(doc)
    (out / "respondent-100k-chars.json").write_bytes(orjson.dumps(doc))
    return out


def corpus_file(name: str, generated: Path) -> Path:
    path = BAD / "eia" / name
    return path if path.exists() else generated / name


@pytest.fixture
def outbox_copy(seeded: Path, tmp_path: Path) -> Path:
    db = tmp_path / "outbox.db"
    shutil.copyfile(seeded, db)
    return db


def invoke(args: list[str], env: dict[str, str | None]) -> tuple[int, str]:
    """The CLI in process; (exit code, stdout + stderr). Any traceback fails the test."""
    result = CliRunner().invoke(app, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def base_env(db: Path) -> dict[str, str | None]:
    return {
        "OUTBOX_DB": str(db),
        "EIA_API_KEY": KEY_EIA,
        "GRIDPULSE_API_KEY": KEY_GP,
        "OUTBOX__EIA__RETRY__ATTEMPTS": "2",
        "OUTBOX__EIA__RETRY__INITIAL_BACKOFF_SECONDS": "0",
        "OUTBOX__EIA__RETRY__MAX_BACKOFF_SECONDS": "0",
        "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
        "OUTBOX__HOUSEKEEPING__RETENTION_DAYS": "36500",
    }


def assert_no_secret(*texts: str, db: Path | None = None) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    if db is not None:
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{db}{suffix}")
            if part.exists():
                content = part.read_bytes()
                assert not [s for s in SECRETS if s.encode() in content], part


def last_run(db: Path) -> tuple[str, str]:
    with Store.open(db) as store:
        run = store.runs.recent_runs(limit=1, stage="fetch")[0]
    return run.status, run.error or ""


@pytest.mark.parametrize("name", sorted(EIA_CAUSES))
def test_bad_page_replayed(name: str, outbox_copy: Path, generated: Path, tmp_path: Path) -> None:
    cause = EIA_CAUSES[name][0]
    replay = tmp_path / "replay"
    replay.mkdir()
    shutil.copyfile(corpus_file(name, generated), replay / "page.json")
    before = tables(outbox_copy)
    code, said = invoke(["fetch", "--replay", str(replay)], base_env(outbox_copy))
    assert code != 0 and cause in said, said
    assert tables(outbox_copy) == before, "the outbox changed"
    status, error = last_run(outbox_copy)
    assert status == "failed" and cause in error
    assert_no_secret(said, error, db=outbox_copy)


@pytest.mark.parametrize("name", sorted(n for n, c in EIA_CAUSES.items() if c[1]))
def test_bad_page_served_live(
    name: str, outbox_copy: Path, generated: Path, tmp_path: Path
) -> None:
    cause = EIA_CAUSES[name][1]
    assert cause is not None
    body = corpus_file(name, generated).read_bytes()
    before = tables(outbox_copy)
    with FakeEIA({}, api_key=KEY_EIA) as fake:
        fake.fail_next(5, status=200, body=body, headers={"Content-Type": "application/json"})
        env = {**base_env(outbox_copy), "EIA_BASE_URL": fake.base_url}
        args = ["fetch", "--start", "2025-08-21", "--end", "2025-08-21T23", "--dataset", "demand"]
        code, said = invoke(args, env)
        assert len(fake.requests) in (1, 2)  # transient causes are retried once, no more
    assert code != 0 and cause in said, said
    assert tables(outbox_copy) == before, "the outbox changed"
    assert last_run(outbox_copy)[0] == "failed"
    assert_no_secret(said, db=outbox_copy)


@pytest.mark.parametrize("name", sorted(CONFIG_CAUSES))
def test_bad_config_file(name: str, tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    config = tmp_path / name
    shutil.copyfile(BAD / "config" / name, config)
    # Only the keys come from the environment: any other variable would override the file.
    env: dict[str, str | None] = {"OUTBOX_DB": str(db), "EIA_API_KEY": KEY_EIA}
    if name != "api-key-list.yaml":
        env["GRIDPULSE_API_KEY"] = KEY_GP
    code, said = invoke(["-c", str(config), "fetch", "--replay", str(sample_dir())], env)
    assert code == 2, said
    assert CONFIG_CAUSES[name] in said and str(config) in said, said
    assert not db.exists(), "a bad config must not touch the outbox"
    assert_no_secret(said)


@pytest.mark.parametrize("name", sorted(KEY_CAUSES))
def test_unusable_key_file(name: str, tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    key = tmp_path / "gridpulse.key"
    if name == "directory":
        key.mkdir()
    elif name != "missing":
        shutil.copyfile(BAD / "keys" / name, key)
    env = {**base_env(db), "GRIDPULSE_API_KEY": None, "GRIDPULSE_API_KEY_FILE": str(key)}
    code, said = invoke(["send"], env)
    assert code == 2, said
    assert "GRIDPULSE_API_KEY_FILE" in said and KEY_CAUSES[name] in said, said
    assert not db.exists()
    assert_no_secret(said)


def test_corpus_is_complete() -> None:
    """Every stored file has an expectation, and the corpus has at least 40 entries."""
    stored = {p.name for p in (BAD / "eia").iterdir()}
    assert stored <= set(EIA_CAUSES)
    assert {p.name for p in (BAD / "config").iterdir()} == set(CONFIG_CAUSES)
    assert {p.name for p in (BAD / "keys").iterdir()} <= set(KEY_CAUSES)
    assert len(EIA_CAUSES) + len(CONFIG_CAUSES) + len(KEY_CAUSES) >= 40


def test_tolerated_by_contract_duplicates_keep_the_last(tmp_path: Path) -> None:
    """Not an error: EIA may send several rows for one key; the last one wins (eia-v2.md)."""
    doc = CORPUS.good()
    rows = doc["response"]["data"]
    doc["response"]["data"] = [*rows, dict(rows[0], value="1")]
    doc["response"]["total"] = str(len(doc["response"]["data"]))
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "page.json").write_bytes(orjson.dumps(doc))
    db = tmp_path / "outbox.db"
    code, said = invoke(["fetch", "--replay", str(replay)], base_env(db))
    assert code == 0, said
    assert "1 duplicates" in said
    with Store.open(db) as store:
        row = store.reads.row("EIA.PJM.demand", "2025-08-21T00:00:00Z")
        runs = store.runs.recent_runs(limit=1)
    assert row is not None and row["value"] == 1.0
    assert runs[0].counts["duplicates"] == 1


# -- every command: a bad input is one line, the documented exit code, nothing changed ----


@dataclass(frozen=True)
class Bad:
    """One bad input: ``argv`` gives exit ``code`` and one line holding ``fragment``.

    ``where`` the line is: stderr; stdout for the probe; the FAIL lines for doctor.
    Placeholders: ``{db}`` the seeded outbox, ``{tmp}`` the test's directory, ``{cfg}``
    the config file written from ``config`` (then passed as ``-c``).
    """

    command: str
    argv: tuple[str, ...]
    code: int
    fragment: str
    config: str | None = None
    env: tuple[tuple[str, str | None], ...] = ()
    where: str = "stderr"


NOT_EMPTY = "{cfg}: database: must be the path of the outbox file, not empty"
NO_DATE = "--since 'garbage': not a date or RFC 3339 time"
BAD_INPUTS = [
    Bad("fetch", ("fetch", "--replay", "{tmp}/missing"), 2, "--replay {tmp}/missing: no such dir"),
    Bad("fetch", ("fetch", "--replay", "{db}"), 2, "--replay {db}: not a directory"),
    Bad(
        "doctor",
        ("doctor", "--reset"),
        1,
        "database: {tmp} is a directory; name the outbox file in it",
        env=(("OUTBOX_DB", "{tmp}"),),
        where="FAIL",
    ),
    Bad(
        "fetch",
        ("fetch",),
        2,
        "database: /dev/null is not a regular file",
        env=(("OUTBOX_DB", "/dev/null"),),
    ),
    Bad("fetch", ("fetch", "--replay", "{tmp}"), 2, "--replay {tmp}: no saved EIA response"),
    Bad(
        "fetch",
        ("fetch", "--replay", "{tmp}", "--ba", "PJM"),
        2,
        "--replay cannot be combined with --start/--end, --ba, --dataset",
    ),
    Bad("fetch", ("fetch", "--start", "yesterday"), 2, "--start/--end: not a date or RFC 3339"),
    Bad("send", ("send",), 2, "gridpulse.api_key: missing", env=(("GRIDPULSE_API_KEY", None),)),
    Bad(
        "status",
        ("status", "--metrics", "{tmp}/nodir/outbox.prom"),
        2,
        "--metrics {tmp}/nodir/outbox.prom: directory {tmp}/nodir does not exist",
    ),
    Bad("status", ("status", "--metrics", "{tmp}"), 2, "--metrics {tmp}: is a directory"),
    Bad(
        "status",
        ("status", "--check"),
        3,
        "UNKNOWN - " + NOT_EMPTY,
        config='database: ""\n',
        env=(("OUTBOX_DB", None),),
        where="stdout",
    ),
    Bad("show", ("show", "EIA.PJM.demand", "garbage"), 2, "'garbage' is not an RFC 3339 time"),
    Bad("requeue", ("requeue", "--since", "garbage"), 2, NO_DATE),
    Bad("runs", ("runs", "--stage", "nope"), 2, "--stage nope: use fetch or send"),
    Bad("gaps", ("gaps", "--since", "garbage"), 2, NO_DATE),
    Bad(
        "prune",
        ("prune",),
        2,
        "housekeeping.retention_days: Input should be greater than 0",
        env=(("OUTBOX__HOUSEKEEPING__RETENTION_DAYS", "-1"),),
    ),
    Bad("timers print", ("timers", "print", "--out", "{db}"), 2, "--out {db}: not a directory"),
    Bad(
        "timers print",
        ("timers", "print", "--user", "gp\nExecStartPre=/bin/sh"),
        2,
        "--user 'gp\\nExecStartPre=/bin/sh': not a user name",
    ),
    Bad(
        "db upgrade",
        ("db", "upgrade"),
        2,
        NOT_EMPTY,
        config='database: ""\n',
        env=(("OUTBOX_DB", None),),
    ),
    Bad(
        "db current",
        ("db", "current"),
        2,
        "no outbox at {tmp}/none.db",
        env=(("OUTBOX_DB", "{tmp}/none.db"),),
    ),
    Bad(
        "config",
        ("config",),
        2,
        "{tmp}/missing.yaml: config file not found",
        env=(("OUTBOX_CONFIG", "{tmp}/missing.yaml"),),
    ),
    Bad(
        "config",
        ("config",),
        2,
        "status.dead_rows_warning (5000) is past status.dead_rows_critical (1000)",
        config="status: {dead_rows_warning: 5000}\n",
    ),
    Bad(
        "config",
        ("config",),
        2,
        "status.oldest_pending_warning_hours (48) is past"
        " status.oldest_pending_critical_hours (24)",
        config="status: {oldest_pending_warning_hours: 48}\n",
    ),
    Bad(
        "config",
        ("config",),
        2,
        "status.failed_runs_warning (7) is past status.failed_runs_critical (6)",
        config="status: {failed_runs_warning: 7}\n",
    ),
    Bad(
        "config",
        ("config",),
        2,
        "datasets.demand.stale_warning_hours (30) is past"
        " datasets.demand.stale_critical_hours (26)",
        config="datasets: {demand: {stale_warning_hours: 30}}\n",
    ),
    Bad(
        "doctor",
        ("doctor",),
        1,
        NOT_EMPTY,
        config='database: ""\n',
        env=(("OUTBOX_DB", None),),
        where="FAIL",
    ),
    Bad(
        "receiver",
        ("receiver", "--port", "99999", "--api-key", "k"),
        2,
        "--port 99999: not a TCP port (0-65535; 0 picks a free one)",
    ),
    Bad(
        "receiver",
        ("receiver", "--port", "0", "--fault", "bogus", "--api-key", "k"),
        2,
        "bad --fault 'bogus': unknown fault kind 'bogus'",
    ),
    Bad(
        "receiver",
        ("receiver", "--port", "0", "--fault", "latency:-5s", "--api-key", "k"),
        2,
        "bad --fault 'latency:-5s': -5s: a duration is a finite number >= 0",
    ),
    Bad("demo", ("demo", "--keep", "{db}"), 2, "--keep {db}: not a directory"),
    Bad("report", ("report", "{tmp}/missing/r.html"), 2, "directory {tmp}/missing does not exist"),
    # A mistyped target never overwrites the outbox (the snapshot proves it untouched).
    Bad("report", ("report", "{db}"), 2, "{db}: exists and is not an earlier report"),
    Bad(
        "status",
        ("status", "--metrics", "{db}"),
        2,
        "{db}: exists and is not an earlier metrics file; not overwriting it",
    ),
    Bad(
        "receiver",
        ("receiver", "--db", "{tmp}/missing/r.db", "--port", "0", "--api-key", "k"),
        2,
        "--db {tmp}/missing/r.db: directory {tmp}/missing does not exist",
    ),
    Bad(
        "config",
        ("config",),
        2,
        "housekeeping.retention_days: Input should be less than or equal to 36500",
        env=(("OUTBOX__HOUSEKEEPING__RETENTION_DAYS", "1e308"),),
    ),
    Bad(
        "send",
        ("send",),
        2,
        "gridpulse.api_key: must be printable ASCII without spaces",
        env=(("GRIDPULSE_API_KEY", "k\u00e9ySECRET"),),
    ),
    Bad("plot", ("plot", " "), 2, "SERIES_GLOB is empty: give a pattern such as 'EIA.PJM.*'"),
    Bad("quality", ("quality", "--rule", "bogus"), 2, "--rule bogus: unknown; known: balance"),
    Bad("revisions", ("revisions", "--since", "garbage"), 2, "--since 'garbage': not a date"),
    Bad(
        "alerts test",
        ("alerts", "test"),
        2,
        "alerts.urls is empty: nothing to test (set it in config.yaml)",
    ),
    Bad("(global)", ("--log-format", "xml", "status"), 2, "--log-format: 'xml' is not logfmt"),
]


def _fill(text: str, **values: str) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def snapshot(db: Path) -> tuple[str, int, dict[str, list[tuple]], list[str]]:
    """The outbox's bytes, mtime and rows (runs included), and the files beside it."""
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    names = sorted(p.name for p in db.parent.iterdir())
    return digest, db.stat().st_mtime_ns, tables(db, skip=()), names


@pytest.mark.parametrize(
    "bad", BAD_INPUTS, ids=[f"{b.command}-{i}" for i, b in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_one_line(bad: Bad, outbox_copy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    values = {"db": str(outbox_copy), "tmp": str(tmp_path), "cfg": str(cfg)}
    env = base_env(outbox_copy)
    env.update({k: v if v is None else _fill(v, **values) for k, v in bad.env})
    args = [_fill(a, **values) for a in bad.argv]
    if bad.config is not None:
        cfg.write_text(bad.config)
        args = ["-c", str(cfg), *args]
    before = snapshot(outbox_copy)
    result = CliRunner().invoke(app, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback would have reached the user
    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err
    assert result.exit_code == bad.code, out + err
    if bad.where == "FAIL":
        lines = [line for line in out.splitlines() if line.startswith("FAIL")]
    else:
        lines = (err if bad.where == "stderr" else out).splitlines()
        assert (out if bad.where == "stderr" else err) == "", "only the one line is printed"
    assert len(lines) == 1, out + err
    assert _fill(bad.fragment, **values) in lines[0], lines[0]
    assert snapshot(outbox_copy) == before, "bad input changed the outbox"
    assert not (tmp_path / "none.db").exists(), "db current created an outbox"
    assert_no_secret(out, err)


def _command_paths(group: Any, prefix: str = "") -> set[str]:
    """Every command's path (``db upgrade``) under a Typer/Click group."""
    paths: set[str] = set()
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(command, "commands"):  # a group (Typer vendors its own Click)
            paths |= _command_paths(command, f"{path} ")
        else:
            paths.add(path)
    return paths


def test_every_command_has_a_bad_input_case() -> None:
    """A new command cannot be added without a row in BAD_INPUTS."""
    commands = _command_paths(typer.main.get_command(app))
    assert {"fetch", "send", "db upgrade", "timers print", "receiver"} <= commands
    covered = {bad.command for bad in BAD_INPUTS}
    assert commands - covered == set(), "commands without a bad-input case"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["runs", "--limit", "0"], "error: outbox runs: Invalid value for '--limit'"),
        (["bogus"], "error: outbox: No such command 'bogus'. (see `outbox --help`)"),
        (["status", "--nope"], "error: outbox status: No such option: --nope"),
        (["send", "--max-seconds", "abc"], "error: outbox send: Invalid value for '--max-seconds'"),
        (["plot"], "error: outbox plot: Missing argument 'SERIES_GLOB'."),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, argv: list[str], line: str) -> None:
    """Click's own usage errors (a box of lines by default) reach the user as one line."""
    done = outbox(*argv, env={**os.environ, "OUTBOX_DB": str(tmp_path / "outbox.db")}, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    said = done.stderr.replace("python -m outbox", "outbox")  # the program as it was run
    assert len(said.splitlines()) == 1 and said.startswith(line), said
    assert not (tmp_path / "outbox.db").exists()
