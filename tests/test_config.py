"""Config: defaults, env overrides, secret files, one-line errors with exit code 2."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import load_config
from outbox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_example_config_is_valid_and_complete() -> None:
    config = load_config(ROOT / "config.yaml", env={})
    assert config.balancing_authorities == {
        "PJM": "PJM",
        "CAISO": "CISO",
        "MISO": "MISO",
        "ERCOT": "ERCO",
        "SPP": "SWPP",
    }
    assert config.datasets["ba_interchange"].lookback_hours == 96
    assert config.datasets["generation"].lookback_hours == 96
    assert config.gridpulse.batch_size == 5000
    assert config.eia_to_gridpulse["CISO"] == "CAISO"
    assert config.eia.api_key is None


def test_env_overrides_and_secret_files(tmp_path: Path) -> None:
    key_file = tmp_path / "eia.key"
    key_file.write_text("FILEKEY123\n")
    env = {
        "OUTBOX_DB": str(tmp_path / "x.db"),
        "EIA_BASE_URL": "http://127.0.0.1:9/v2/",
        "EIA_API_KEY_FILE": str(key_file),
        "GRIDPULSE_BASE_URL": "http://127.0.0.1:8",
        "GRIDPULSE_API_KEY": "GPKEY456",
        "OUTBOX__GRIDPULSE__BATCH_SIZE": "250",
        "OUTBOX__DATASETS__GENERATION__ENABLED": "false",
    }
    config = load_config(ROOT / "config.yaml", env=env)
    assert config.database == str(tmp_path / "x.db")
    assert config.eia.base_url == "http://127.0.0.1:9/v2"
    assert config.require_eia_key() == "FILEKEY123"
    assert config.require_gridpulse_key() == "GPKEY456"
    assert config.gridpulse.batch_size == 250
    assert "generation" not in config.enabled_datasets()
    shown = str(config.redacted())
    assert "FILEKEY123" not in shown and "GPKEY456" not in shown and "***" in shown


def test_outbox_config_env_picks_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("database: picked.db\n")
    assert load_config(env={"OUTBOX_CONFIG": str(cfg)}).database == str(tmp_path / "picked.db")


def test_relative_database_lies_next_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``database:`` relative in a file: next to the file; ``OUTBOX_DB``: from the cwd."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "c.yaml").write_text("database: data/o.db\n")
    (tmp_path / "etc" / "data").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert load_config("../etc/c.yaml", env={}).database == "../etc/data/o.db"
    assert load_config(tmp_path / "etc" / "c.yaml", env={}).database == str(
        tmp_path / "etc" / "data" / "o.db"
    )
    absolute = tmp_path / "abs.db"
    (tmp_path / "etc" / "abs.yaml").write_text(f"database: {absolute}\n")
    assert load_config(tmp_path / "etc" / "abs.yaml", env={}).database == str(absolute)

    made = runner.invoke(app, ["-c", "../etc/c.yaml", "db", "upgrade"], env={})
    assert made.exit_code == 0, made.output
    assert (tmp_path / "etc" / "data" / "o.db").is_file()
    assert not (tmp_path / "work" / "data").exists()

    env = {"OUTBOX_DB": "here.db"}
    assert load_config("../etc/c.yaml", env=env).database == "here.db"
    made = runner.invoke(app, ["-c", "../etc/c.yaml", "db", "upgrade"], env=env)
    assert made.exit_code == 0, made.output
    assert (tmp_path / "work" / "here.db").is_file()
    assert not (tmp_path / "etc" / "here.db").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("databse: x.db\n", "databse: unknown key"),
        (
            "gridpulse:\n  batch_size: lots\n",
            "gridpulse.batch_size: Input should be a valid integer",
        ),
        ("gridpulse:\n  batch_size: 9000\n", "gridpulse.batch_size: Input should be less than"),
        ("datasets:\n  weather: {enabled: true}\n", "datasets: unknown dataset 'weather'"),
        ("eia:\n  base_url: ftp://x\n", "eia.base_url: 'ftp://x' is not an http(s) URL"),
        (
            "eia:\n  history_start: yesterday\n",
            "eia.history_start: Input should be a valid datetime",
        ),
        (
            "housekeeping:\n  retention_days: 2\n",
            "retention_days (2) must exceed the longest lookback",
        ),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_config_mistakes_give_one_line_and_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env={})
    assert expected in str(err.value)
    result = runner.invoke(app, ["-c", str(cfg), "status"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_missing_config_file_and_unreadable_key_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["-c", str(tmp_path / "nope.yaml"), "status"])
    assert result.exit_code == 2
    assert "config file not found" in result.output
    result = runner.invoke(app, ["status"], env={"EIA_API_KEY_FILE": str(tmp_path / "missing.key")})
    assert result.exit_code == 2
    assert re.search(r"EIA_API_KEY_FILE: cannot read secret file .*missing.key", result.output)


def test_a_config_that_is_no_config_file_is_one_line(tmp_path: Path) -> None:
    """A FIFO would block the read forever, a directory or a huge file is the wrong path,
    and YAML nested ten thousand deep overflows the parser's recursion: each is one line,
    exit 2, and the outbox is never touched."""
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 10_000 + "]" * 10_000 + "\n")
    db = tmp_path / "o.db"
    cases = {
        fifo: "not a regular file",
        tmp_path: "not a regular file",
        huge: "is not a config file",
        deep: "invalid YAML: nested too deeply",
    }
    for path, expected in cases.items():
        result = runner.invoke(app, ["-c", str(path), "status"], env={"OUTBOX_DB": str(db)})
        assert result.exit_code == 2, (path, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {path}: ") and expected in lines[0], lines
    assert not db.exists()


def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "base.yaml"
    cfg.write_text("housekeeping: {retention_days: 30}\n")
    env = {"OUTBOX_DB": str(tmp_path / "o.db"), "OUTBOX__HOUSEKEEPING__RETENTION_DAYS": "-1"}
    result = runner.invoke(app, ["-c", str(cfg), "config"], env=env)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: OUTBOX__HOUSEKEEPING__RETENTION_DAYS: housekeeping.retention_days: "
        "Input should be greater than 0"
    ), result.output
    # the same mistake in the file still names the file
    cfg.write_text("housekeeping: {retention_days: -1}\n")
    result = runner.invoke(app, ["-c", str(cfg), "config"], env={"OUTBOX_DB": env["OUTBOX_DB"]})
    assert result.output.strip().startswith(f"error: {cfg}: housekeeping.retention_days: ")


def test_missing_secret_where_needed(tmp_path: Path) -> None:
    env = {"OUTBOX_DB": str(tmp_path / "o.db")}
    result = runner.invoke(app, ["send"], env=env)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: gridpulse.api_key: missing: set GRIDPULSE_API_KEY or GRIDPULSE_API_KEY_FILE"
    )
    result = runner.invoke(app, ["fetch"], env=env)
    assert result.exit_code == 2
    assert "eia.api_key: missing" in result.output


def test_secrets_absent_from_every_output(tmp_path: Path) -> None:
    env = {
        "OUTBOX_DB": str(tmp_path / "o.db"),
        "EIA_API_KEY": "EIASECRET-abc123",
        "GRIDPULSE_API_KEY": "GPSECRET-def456",
        # Unreachable on purpose: port 9 on loopback refuses connections.
        "GRIDPULSE_BASE_URL": "http://127.0.0.1:9",
        "EIA_BASE_URL": "http://127.0.0.1:9/v2",
        "OUTBOX__EIA__RETRY__ATTEMPTS": "1",
        "OUTBOX__GRIDPULSE__RETRY__ATTEMPTS": "1",
    }
    outputs = []
    for args in (["config"], ["status"], ["status", "--json"], ["fetch"], ["-v", "fetch"]):
        result = runner.invoke(app, args, env=env)
        outputs.append(result.output)
    text = "\n".join(outputs)
    assert "EIASECRET" not in text and "GPSECRET" not in text
    assert '"api_key": "***"' in outputs[0]
    db = (tmp_path / "o.db").read_bytes()
    assert b"EIASECRET" not in db and b"GPSECRET" not in db


def test_one_ba_from_the_environment_joins_the_map_with_its_case_kept(tmp_path: Path) -> None:
    env = {"OUTBOX__BALANCING_AUTHORITIES__NYISO": "NYIS"}
    config = load_config(ROOT / "config.yaml", env=env)
    assert config.balancing_authorities == {
        "PJM": "PJM",
        "CAISO": "CISO",
        "MISO": "MISO",
        "ERCOT": "ERCO",
        "SPP": "SWPP",
        "NYISO": "NYIS",
    }
    # Without a file, the entry joins the defaults; an existing code is replaced, not doubled.
    config = load_config(env={"OUTBOX__BALANCING_AUTHORITIES__PJM": "pjm"})
    assert config.balancing_authorities["PJM"] == "PJM"
    assert len(config.balancing_authorities) == 5
    # An empty value takes one entry out.
    config = load_config(ROOT / "config.yaml", env={"OUTBOX__BALANCING_AUTHORITIES__SPP": ""})
    assert "SPP" not in config.balancing_authorities and "PJM" in config.balancing_authorities


def test_a_dataset_from_the_environment_changes_one_key_of_one_dataset(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets:\n  generation: {lookback_hours: 120}\n  demand: {enabled: false}\n")
    env = {"OUTBOX__DATASETS__GENERATION__ENABLED": "false"}
    config = load_config(cfg, env=env)
    assert config.datasets["generation"].lookback_hours == 120
    assert not config.datasets["generation"].enabled and not config.datasets["demand"].enabled
    assert config.datasets["ba_interchange"].lookback_hours == 96
    assert config.enabled_datasets() == [
        "demand_forecast",
        "net_generation",
        "interchange",
        "ba_interchange",
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"OUTBOX__BALANCING_AUTHORITIES__PJM__X": "1"},
            "OUTBOX__BALANCING_AUTHORITIES__PJM__X: balancing_authorities entries are",
        ),
        (
            {"OUTBOX__BALANCING_AUTHORITIES__PJM": "P J M"},
            "balancing_authorities: PJM: 'P J M' is not an EIA respondent code",
        ),
        (
            {"OUTBOX__DATASETS__WEATHER__ENABLED": "true"},
            "datasets: unknown dataset 'weather'",
        ),
        (
            {"GRIDPULSE_BASE_URL": "https://gp.test/ingest?token=SECRET-tok-1"},
            "gridpulse.base_url: 'https://gp.test/ingest?token=***': a query string",
        ),
        (
            {"EIA_BASE_URL": "https://api.eia.gov/v2?api_key=SECRET-tok-2"},
            "eia.base_url: 'https://api.eia.gov/v2?api_key=***': a query string",
        ),
    ],
)
def test_map_and_url_overrides_refused_in_one_line(env: dict[str, str], expected: str) -> None:
    result = runner.invoke(app, ["config"], env=env)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in result.output and "SECRET-tok" not in result.output


def test_gridpulse_base_url_may_carry_a_path_prefix(tmp_path: Path) -> None:
    import httpx
    import respx

    from outbox.sinks.gridpulse import GridPulseClient

    config = load_config(env={"GRIDPULSE_BASE_URL": "https://proxy.test/gridpulse/"})
    assert config.gridpulse.base_url == "https://proxy.test/gridpulse"
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get("https://proxy.test/gridpulse/api/v1/health").respond(
            200, json={"status": "ok"}
        )
        with httpx.Client() as http:
            GridPulseClient(http, config.gridpulse.base_url, "k").health()
        assert route.called


def test_outbox_config_masks_secrets_inside_urls() -> None:
    env = {
        "GRIDPULSE_BASE_URL": "https://worker:SECRET-pw-1@gp.test/gridpulse",
        "EIA_BASE_URL": "https://SECRET-tok-3@eia.test/v2",
        "GRIDPULSE_API_KEY": "SECRET-gp-key",
    }
    result = runner.invoke(app, ["config"], env=env)
    assert result.exit_code == 0, result.output
    assert "SECRET" not in result.output
    assert '"base_url": "https://***@gp.test/gridpulse"' in result.output
    assert '"base_url": "https://***@eia.test/v2"' in result.output
