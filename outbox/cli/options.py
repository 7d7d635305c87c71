"""Every option's check that Typer cannot make itself: one place, each a one-line UsageError."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from outbox.errors import UsageError
from outbox.timeutil import parse_bound, to_ts


def parse_bounds(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    try:
        lo = parse_bound(start) if start else None
        hi = parse_bound(end) if end else None
    except ValueError as exc:
        raise UsageError(f"--start/--end: not a date or RFC 3339 time: {exc}") from None
    if hi is not None and lo is None:
        raise UsageError("--end needs --start")
    if lo is not None and hi is not None and hi < lo:
        raise UsageError(f"--end {to_ts(hi)} is before --start {to_ts(lo)}")
    return lo, hi


def check_directory(option: str, path: Path, *, must_exist: bool = False) -> None:
    """Refuse (exit 2) a directory option naming a file, or a missing one where it must exist."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: not a directory")
    if must_exist and not path.exists():
        raise UsageError(f"{option} {path}: no such directory")


def check_replay_files(directory: Path) -> None:
    """Refuse (exit 2) a replay directory holding no saved response body: a mistyped or
    empty directory would otherwise be a run that staged nothing and said it was fine."""
    bodies = (p for p in directory.rglob("*.json") if not p.name.endswith(".http-meta.json"))
    if next(bodies, None) is None:
        raise UsageError(f"--replay {directory}: no saved EIA response bodies (*.json) in it")


# What systemd takes as User= (a POSIX user name, or a numeric UID), and nothing that
# could end the line and write another directive into the unit.
_UNIT_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10}")


def check_unit_user(user: str) -> None:
    """Refuse (exit 2) a ``--user`` that is not a user name systemd accepts."""
    if not _UNIT_USER.fullmatch(user):
        raise UsageError(
            f"--user {user!r}: not a user name (letters, digits, '_', '.', '-'; or a UID)"
        )


def check_metrics_target(path: Path) -> None:
    """``--metrics PATH`` must name a file in an existing directory (checked before reading)."""
    if path.is_dir():
        raise UsageError(
            f"--metrics {path}: is a directory; give a file such as {path}/outbox.prom"
        )
    if not path.parent.is_dir():
        raise UsageError(f"--metrics {path}: directory {path.parent} does not exist")
    from outbox.files import METRICS_HEAD, check_target

    check_target(path, METRICS_HEAD, "metrics file")


def since_bound(since: str | None) -> datetime | None:
    try:
        return parse_bound(since) if since else None
    except ValueError:
        raise UsageError(f"--since {since!r}: not a date or RFC 3339 time") from None


def check_datasets(names: list[str]) -> None:
    from outbox import datasets

    for name in names:
        if name not in datasets.names():
            known = ", ".join(datasets.names())
            raise UsageError(f"--dataset {name}: unknown; known: {known}")


def since_ts(since: str | None) -> str | None:
    """``--since`` as outbox ts text (None when not given)."""
    bound = since_bound(since)
    return to_ts(bound) if bound else None


def check_report_target(target: Path) -> None:
    """The report must go to a file in an existing directory, not over a foreign file."""
    if target.is_dir():
        raise UsageError(f"report path {target} is a directory; name a file")
    if not target.parent.is_dir():
        raise UsageError(f"report path {target}: directory {target.parent} does not exist")
    from outbox.files import REPORT_HEAD, check_target

    check_target(target, REPORT_HEAD, "report")


def check_fetch_mode(
    *,
    start: datetime | None,
    bas: Sequence[str] | None,
    datasets: Sequence[str] | None,
    fill_gaps: bool,
    lookback: int | None,
) -> None:
    """The fetch modes' options that do not go together (one line, exit 2)."""
    if fill_gaps and (start is not None or bas or datasets or lookback is not None):
        raise UsageError(
            "--fill-gaps re-requests every listed gap: no --start/--ba/--dataset/--lookback"
        )
    if lookback is not None and start is not None:
        raise UsageError("--lookback is for incremental fetches; a backfill has --start/--end")
