"""Timers: rendered systemd units verify, the crontab parses, deploy/ stays in sync."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from outbox import timers
from outbox.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("dow", 0, 7))
ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def test_repo_deploy_holds_the_rendered_defaults() -> None:
    rendered = timers.render_all(timers.settings(prefix=Path("/usr/local")))
    on_disk = {p.name: p.read_text() for p in (ROOT / "deploy").iterdir() if p.is_file()}
    assert on_disk == rendered, "run: outbox timers print --prefix /usr/local --out deploy"


def _verify(directory: Path) -> subprocess.CompletedProcess[str]:
    units = sorted(p.name for p in directory.iterdir() if p.suffix in (".service", ".timer"))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("user", [None, "gridpulse"])
def test_systemd_analyze_verify_passes(tmp_path: Path, user: str | None) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    settings = timers.settings(user=user)  # this installation's outbox: it must exist
    assert settings.executable.is_file(), settings.executable
    timers.write(timers.render_all(settings), tmp_path)
    done = _verify(tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def _cron_field(text: str, low: int, high: int) -> bool:
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return False
        if base == "*":
            continue
        lo, _, hi = base.partition("-")
        bounds = [lo, hi] if hi else [lo]
        if not all(b.isdigit() and low <= int(b) <= high for b in bounds):
            return False
        if hi and int(lo) > int(hi):
            return False
    return True


def _check_outbox_args(args: list[str]) -> None:
    """Parse (without running) an outbox command line exactly as the CLI would."""
    group = typer.main.get_command(app)
    ctx = group.make_context("outbox", list(args), resilient_parsing=False)
    words = [*getattr(ctx, "protected_args", ctx._protected_args), *ctx.args]
    name, command, rest = group.resolve_command(ctx, words)
    assert command is not None, name
    command.make_context(name, rest, parent=ctx)  # raises on an unknown option or value


def test_crontab_lines_parse() -> None:
    crontab = timers.render_crontab(timers.settings(prefix=Path("/usr/local")))
    entries = []
    for line in crontab.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ENV_LINE.match(line):
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, line
        for value, (name, low, high) in zip(fields[:5], CRON_FIELDS, strict=True):
            assert _cron_field(value, low, high), f"{name} {value!r} in {line!r}"
        command = shlex.split(fields[5])
        assert command[-1] == ">/dev/null" and command[0] == "/usr/local/bin/outbox", line
        assert "flock" not in line
        _check_outbox_args(command[1:-1])
        entries.append((" ".join(fields[:5]), " ".join(command[1:-1])))
    assert entries == [
        ("15 * * * *", "fetch"),
        ("*/5 * * * *", "send"),
        ("45 3 * * *", f"fetch --lookback {timers.DEEP_LOOKBACK_HOURS}"),
        ("30 5 * * *", "fetch --fill-gaps"),
    ]
    assert "EIA_API_KEY_FILE=/etc/gridpulse-outbox/eia_api_key" in crontab.splitlines()


def test_cron_field_checker_rejects_bad_fields() -> None:
    assert not _cron_field("60", 0, 59)
    assert not _cron_field("*/0", 0, 59)
    assert not _cron_field("5-2", 0, 59)
    assert _cron_field("1-5,7/2", 0, 7)


def test_timers_print_for_another_prefix_config_and_user(tmp_path: Path) -> None:
    args = ["timers", "print", "--prefix", "/opt/gp", "--config", "/srv/gp.yaml", "--user", "gp"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    names = re.findall(r"^### (\S+)$", out, flags=re.M)
    assert names == list(timers.render_all(timers.settings()))
    assert "ExecStart=/opt/gp/bin/outbox fetch\n" in out
    assert "ExecStart=/opt/gp/bin/outbox fetch --fill-gaps\n" in out
    assert "Environment=OUTBOX_CONFIG=/srv/gp.yaml\n" in out
    assert "User=gp\n" in out and "DynamicUser" not in out
    assert "OUTBOX_CONFIG=/srv/gp.yaml\n" in out.split("### crontab")[1]

    written = runner.invoke(app, ["timers", "print", "--out", str(tmp_path / "units")])
    assert written.exit_code == 0, written.output
    paths = written.stdout.split()
    assert len(paths) == 9 and all(Path(p).is_file() for p in paths)


def test_timers_print_uses_the_config_it_was_given(tmp_path: Path) -> None:
    cfg = tmp_path / "gp.yaml"
    cfg.write_text("database: /var/lib/gridpulse-outbox/outbox.db\n")
    result = runner.invoke(app, ["-c", str(cfg), "timers", "print"])
    assert result.exit_code == 0, result.output
    assert f"Environment=OUTBOX_CONFIG={cfg.absolute()}\n" in result.stdout
    # --config still says which file the units use, whatever -c this command read
    other = runner.invoke(app, ["-c", str(cfg), "timers", "print", "--config", "/srv/gp.yaml"])
    assert "Environment=OUTBOX_CONFIG=/srv/gp.yaml\n" in other.stdout


def test_service_hardening_and_credentials() -> None:
    files = timers.render_all(timers.settings(prefix=Path("/usr/local")))
    send = files["gridpulse-outbox-send.service"]
    for line in (
        "Type=oneshot",
        "DynamicUser=yes",
        "User=gridpulse-outbox",
        "StateDirectory=gridpulse-outbox",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Environment=OUTBOX_DB=%S/gridpulse-outbox/outbox.db",
        "LoadCredential=gridpulse_api_key:/etc/gridpulse-outbox/gridpulse_api_key",
        "Environment=GRIDPULSE_API_KEY_FILE=%d/gridpulse_api_key",
    ):
        assert line in send.splitlines(), line
    assert "eia_api_key" not in send  # each unit loads only the keys it uses
    fetch_timer = files["gridpulse-outbox-fetch.timer"].splitlines()
    assert "OnCalendar=*-*-* *:15:00" in fetch_timer and "RandomizedDelaySec=5min" in fetch_timer
    assert "OnCalendar=*:0/5" in files["gridpulse-outbox-send.timer"].splitlines()
    home = timers.render_all(timers.settings(prefix=Path("/home/me/.venv")))
    assert "ProtectHome=read-only" in home["gridpulse-outbox-fetch.service"].splitlines()


def test_readme_explains_running_it_for_real() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running it for real", 1)[1].split("\n## ", 1)[0]
    for needle in ("outbox timers print", "systemctl enable --now", "--lookback", "--fill-gaps"):
        assert needle in section, needle
    for command in ("outbox gaps", "outbox prune", "outbox timers print", "fetch --fill-gaps"):
        assert command in readme, command


def test_deep_recheck_lookback_widens_every_dataset_within_retention(tmp_path: Path) -> None:
    from outbox.config import load_config
    from outbox.errors import UsageError
    from outbox.stages.plan import with_lookback

    config = load_config(None, env={})
    deep = with_lookback(config, timers.DEEP_LOOKBACK_HOURS)
    assert {name: ds.lookback_hours for name, ds in deep.datasets.items()} == dict.fromkeys(
        config.datasets, timers.DEEP_LOOKBACK_HOURS
    )
    assert with_lookback(config, 80).datasets["ba_interchange"].lookback_hours == 96
    with pytest.raises(UsageError, match=r"shorter than housekeeping\.retention_days"):
        with_lookback(config, 90 * 24)
    env = {"EIA_API_KEY": "k", "OUTBOX_DB": str(tmp_path / "o.db")}
    result = runner.invoke(app, ["fetch", "--lookback", "5000"], env=env)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "o.db").exists()
