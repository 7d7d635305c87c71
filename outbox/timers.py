"""systemd units, timers and a crontab that run the stages: rendered for this installation.

Four schedules, each a oneshot service and its timer (or one crontab line):

========== ===================================== ==========================================
unit       command                               when
========== ===================================== ==========================================
fetch      ``outbox fetch``                      hourly at :15, randomized by up to 5 min
send       ``outbox send`` (prunes at its end)   every 5 minutes
recheck    ``outbox fetch --lookback 336``       daily 03:45: two weeks back, for revisions
fill-gaps  ``outbox fetch --fill-gaps``          daily 05:30: the missing hours
========== ===================================== ==========================================

The templates (``outbox/deploy/*.in``) carry the hardening: ``DynamicUser=yes`` with
``User=gridpulse-outbox`` (one name, so all four units share one UID and the state
directory is never re-owned between them), or ``User=`` alone with ``--user``;
``StateDirectory=gridpulse-outbox`` holding the database,
``ProtectSystem=strict``, ``ProtectHome``, ``PrivateTmp``, ``NoNewPrivileges``, and the
API keys passed with ``LoadCredential=`` and read through ``*_API_KEY_FILE=%d/...``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_ETC = Path("/etc/gridpulse-outbox")
DEFAULT_CONFIG = DEFAULT_ETC / "config.yaml"
DEEP_LOOKBACK_HOURS = 336
PREFIX = "gridpulse-outbox"
CRONTAB = "crontab"
_HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
_KEYS = {"eia": "eia_api_key", "gridpulse": "gridpulse_api_key"}
_ENV = {"eia": "EIA_API_KEY_FILE", "gridpulse": "GRIDPULSE_API_KEY_FILE"}
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


@dataclass(frozen=True)
class Schedule:
    """One stage on a schedule: its command, when it runs and which keys it needs."""

    name: str
    description: str
    args: str
    on_calendar: str
    delay: str
    accuracy: str
    persistent: bool
    keys: tuple[str, ...]
    cron: str
    when: str


SCHEDULES = (
    Schedule(
        "fetch",
        "fetch new and revised EIA-930 hours into the outbox",
        "fetch",
        "*-*-* *:15:00",
        "5min",
        "1min",
        True,
        ("eia", "gridpulse"),
        "15 * * * *",
        "hourly at :15, randomized by up to 5 minutes",
    ),
    Schedule(
        "send",
        "deliver pending rows to GridPulse, then prune",
        "send",
        "*:0/5",
        "20s",
        "10s",
        False,
        ("gridpulse",),
        "*/5 * * * *",
        "every 5 minutes",
    ),
    Schedule(
        "recheck",
        f"re-check the last {DEEP_LOOKBACK_HOURS} hours for EIA revisions",
        f"fetch --lookback {DEEP_LOOKBACK_HOURS}",
        "*-*-* 03:45:00",
        "15min",
        "1min",
        True,
        ("eia", "gridpulse"),
        "45 3 * * *",
        "daily at 03:45, randomized by up to 15 minutes",
    ),
    Schedule(
        "fill-gaps",
        "ask EIA again for the hours missing inside each series",
        "fetch --fill-gaps",
        "*-*-* 05:30:00",
        "15min",
        "1min",
        True,
        ("eia",),
        "30 5 * * *",
        "daily at 05:30, randomized by up to 15 minutes",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Where things are on the machine the units are for."""

    executable: Path
    config: Path = DEFAULT_CONFIG
    user: str | None = None
    credential_dir: Path = DEFAULT_ETC


def settings(
    *, prefix: Path | None = None, config: Path | None = None, user: str | None = None
) -> Settings:
    """Settings for ``outbox timers print``: ``PREFIX/bin/outbox``, else this outbox."""
    executable = prefix / "bin" / "outbox" if prefix else installed_executable()
    return Settings(Path(executable).absolute(), Path(config or DEFAULT_CONFIG).absolute(), user)


def installed_executable() -> Path:
    """The real path of the running ``outbox`` script (or the one on PATH, or in sys.prefix)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "outbox" and argv0.is_file():
        return argv0.resolve()
    found = shutil.which("outbox")
    if found:
        return Path(found).resolve()
    return Path(sys.prefix) / "bin" / "outbox"


def unit_name(schedule: Schedule, kind: str) -> str:
    """``gridpulse-outbox-<name>.<kind>``."""
    return f"{PREFIX}-{schedule.name}.{kind}"


def render_all(s: Settings) -> dict[str, str]:
    """File name -> content: a service and a timer per schedule, then the crontab."""
    files: dict[str, str] = {}
    for schedule in SCHEDULES:
        files[unit_name(schedule, "service")] = render_service(schedule, s)
        files[unit_name(schedule, "timer")] = render_timer(schedule)
    files[CRONTAB] = render_crontab(s)
    return files


def render_service(schedule: Schedule, s: Settings) -> str:
    """The oneshot service of one schedule."""
    credentials = []
    for key in schedule.keys:
        name = _KEYS[key]
        credentials.append(f"LoadCredential={name}:{_unit_path(s.credential_dir / name)}")
        credentials.append(f"Environment={_ENV[key]}=%d/{name}")
    return _fill(
        "service.in",
        UNIT=unit_name(schedule, "service"),
        NAME=schedule.name,
        DESCRIPTION=schedule.description,
        EXEC_START=f"{_unit_path(s.executable)} {schedule.args}",
        CONFIG_ENV=_unit_env("OUTBOX_CONFIG", s.config),
        CREDENTIALS="\n".join(credentials),
        USER=f"User={s.user}" if s.user else f"DynamicUser=yes\nUser={PREFIX}",
        PROTECT_HOME="read-only" if _under_home(s) else "yes",
    )


def render_timer(schedule: Schedule) -> str:
    """The timer of one schedule."""
    return _fill(
        "timer.in",
        UNIT=unit_name(schedule, "timer"),
        NAME=schedule.name,
        SCHEDULE=schedule.when,
        ON_CALENDAR=schedule.on_calendar,
        DELAY=schedule.delay,
        ACCURACY=schedule.accuracy,
        PERSISTENT="true" if schedule.persistent else "false",
        SERVICE=unit_name(schedule, "service"),
    )


def render_crontab(s: Settings) -> str:
    """The crontab equivalent of the timers."""
    exe = shlex.quote(str(s.executable))
    lines = [f"{sch.cron:<20} {exe} {sch.args} >/dev/null" for sch in SCHEDULES]
    return _fill(
        "crontab.in",
        CONFIG=str(s.config),
        CREDENTIAL_DIR=str(s.credential_dir),
        LINES="\n".join(lines),
    )


def concatenate(files: dict[str, str]) -> str:
    """Every file under a ``### name`` header, for printing."""
    return "\n".join(f"### {name}\n{content}" for name, content in files.items())


def write(files: dict[str, str], directory: Path) -> list[Path]:
    """Write the files into ``directory`` (created if needed); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = directory / name
        path.write_text(content, encoding="utf-8")
        paths.append(path)
    return paths


def print_or_write(
    *, prefix: Path | None, config: Path | None, user: str | None, out: Path | None
) -> str:
    """``outbox timers print``: the files for this installation as one text, or, with
    ``out``, written into that directory and the paths written, one a line."""
    files = render_all(settings(prefix=prefix, config=config, user=user))
    if out is None:
        return concatenate(files)
    return "".join(f"{path}\n" for path in write(files, out))


def _fill(template: str, **values: str) -> str:
    text = resources.files("outbox").joinpath("deploy", template).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = _PLACEHOLDER.search(text)
    if left:
        raise ValueError(f"{template}: placeholder {left.group()} was left unfilled")
    return text


def _unit_path(path: Path) -> str:
    """A path as a unit file value: ``%`` doubled, quoted when it has whitespace."""
    text = str(path).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _unit_env(name: str, path: Path) -> str:
    """One ``Environment=`` assignment (systemd quotes the whole assignment)."""
    text = f"{name}={str(path).replace('%', '%%')}"
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _under_home(s: Settings) -> bool:
    return any(p.is_relative_to(home) for p in (s.executable, s.config) for home in _HOME_DIRS)
