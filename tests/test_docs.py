"""The README is the manual: its commands exist, every command is in it, CI runs its tests."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from typer.main import get_command
from typer.testing import CliRunner

from outbox.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def _commands() -> dict[str, typer.core.TyperCommand]:
    root = get_command(app)
    out = {}
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        if subs:
            out.update({f"{name} {sub}": c for sub, c in subs.items()})
        else:
            out[name] = cmd
    return out


def test_every_command_has_help_and_is_in_the_readme() -> None:
    commands = _commands()
    assert {"fetch", "send", "status", "demo", "db upgrade"} <= set(commands)
    for name, cmd in commands.items():
        assert (cmd.help or "").strip(), f"{name} has no help text"
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0, result.output
        assert f"outbox {name}" in README, f"README does not mention `outbox {name}`"


def test_readme_opens_with_the_two_fresh_machine_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    assert "pip install -e '.[dev]'" in lines[0] and lines[0].endswith("outbox demo")
    assert lines[1] == "python -m pytest -q -n 2"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[dev]'" in ci
    assert re.search(r"^python -m pytest -q -n 2$", ci, re.M), "CI runs the README's test command"


def _help(*words: str) -> str:
    result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_shows_flags_counters_and_values_as_typed() -> None:
    """No Typer type names where a user types nothing (<bool>) or a value (<list[str]>)."""
    for name in ["", *_commands()]:
        text = _help(*name.split())
        for metavar in ("<bool>", "<list", "{"):
            assert metavar not in text, f"`outbox {name} --help` shows {metavar}:\n{text}"
    top = _help()
    verbose = next(line for line in top.splitlines() if "--verbose" in line)
    assert re.search(r"--verbose\s+-v\s+More logging, repeat for more: -v .*, -vv ", verbose)
    assert "<int>" not in verbose and "default" not in verbose
    dry_run = next(line for line in _help("send").splitlines() if "--dry-run" in line)
    assert re.search(r"--dry-run\s+Say what would be sent", dry_run)
    assert re.search(r"--ba\s+BA\s+Only this balancing authority", _help("fetch"))
    assert "Usage: outbox show [OPTIONS] SERIES_ID TS" in _help("show")
