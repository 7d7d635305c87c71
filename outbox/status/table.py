"""The human outputs: the ``outbox status`` table, the ``outbox runs`` table and the short
texts (ages, hours, sizes, durations, counts) other outputs share."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from outbox.redact import redact
from outbox.status.model import (
    CRITICAL,
    FRESH_CRITICAL,
    FRESH_DISABLED,
    FRESH_NO_DATA,
    FRESH_WARNING,
    OK,
    STAGES,
    WARNING,
    Group,
    Status,
    run_seconds,
)
from outbox.store import RunRecord
from outbox.timeutil import parse_ts, utcnow

_STATE_STYLE = {FRESH_WARNING: "yellow", FRESH_CRITICAL: "bold red", FRESH_NO_DATA: "yellow"}
_STATE_WORD = {FRESH_WARNING: " warn", FRESH_CRITICAL: " CRIT", FRESH_NO_DATA: ""}


def render_table(status: Status) -> Any:
    """A rich renderable: the dataset x BA table, then runs, queue, database and remote."""
    from rich.console import Group as RichGroup
    from rich.text import Text

    now = parse_ts(status.generated_at)
    parts: list[Any] = [
        Text(f"gridpulse-outbox status at {status.generated_at}", style="bold"),
        _group_table(status, now),
    ]
    parts.extend(_summary_lines(status, now))
    if status.remote is not None:
        parts.extend(_remote_parts(status.remote, now))
    return RichGroup(*parts)


def _group_table(status: Status, now: datetime) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0),
        show_edge=False,
    )
    for name, justify in (
        ("dataset", "left"),
        ("ba", "left"),
        ("newest\nstaged", "left"),
        ("newest\nacked", "left"),
        ("delivered\nthrough", "left"),
        ("pending", "right"),
        ("dead", "right"),
        ("age", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for g in status.groups:
        table.add_row(
            g.dataset,
            g.ba,
            compact_ts(g.newest_staged, now),
            compact_ts(g.newest_acked, now),
            compact_ts(g.delivered_through, now),
            f"{g.pending:,}",
            f"{g.dead:,}",
            _freshness_cell(g),
        )
    return table


def _freshness_cell(g: Group) -> Any:
    from rich.text import Text

    if g.freshness_state == FRESH_DISABLED:
        return Text("off", style="dim")
    if g.freshness_seconds is None:
        return Text("no data", style="yellow")
    text = age_text(g.freshness_seconds) + _STATE_WORD.get(g.freshness_state, "")
    return Text(text, style=_STATE_STYLE.get(g.freshness_state, ""))


def _summary_lines(status: Status, now: datetime) -> list[Any]:
    from rich.text import Text

    t = status.totals
    # The table has a row per dataset x BA, the totals count series: say how they relate.
    lines = [
        Text(
            f"totals: {t.get('series', 0)} series in {len(status.groups)} rows, "
            f"{t.get('pending', 0):,} pending, {t.get('dead', 0):,} dead"
        )
    ]
    if t.get("acks_unapplied"):
        lines.append(
            Text(
                f"acknowledged, not yet marked: {t['acks_unapplied']:,} rows"
                " (a send was stopped; the next send marks them and never resends them)"
            )
        )
    lines.extend(_missing_lines(status.missing, now))
    lines.append(Text(_queue_line(status, now)))
    if status.quality:
        lines.append(Text(quality_line(status.quality)))
    for stage in STAGES:
        lines.append(_run_line(status, stage, now))
    schema = status.outbox_schema or "none"
    head = "" if schema == status.schema_head else f", head {status.schema_head}"
    free = "" if status.disk_free_bytes is None else f"; {size_text(status.disk_free_bytes)} free"
    lines.append(
        Text(
            f"database: {status.database} ({_megabytes(status.database_bytes)}, "
            f"schema {schema}{head}{free})"
        )
    )
    lines.extend(Text(f"warning: {w}", style="yellow") for w in status.warnings)
    if status.check is not None:
        style = {OK: "green", WARNING: "yellow", CRITICAL: "bold red"}.get(status.check.code, "")
        lines.append(Text(f"check: {status.check.summary}", style=style))
    return lines


def _missing_lines(missing: Sequence[dict[str, str | None]], now: datetime) -> list[Any]:
    """``no data yet: ...`` for streams no request has completed for, then ``no data at
    EIA through T: ...`` for the others, one line per such hour, newest first."""
    from rich.text import Text

    by_through: dict[str, list[str]] = {}
    for m in missing:
        by_through.setdefault(m.get("asked_through") or "", []).append(f"{m['dataset']} {m['ba']}")
    lines = []
    if "" in by_through:
        lines.append(Text(f"no data yet: {', '.join(by_through.pop(''))}", style="yellow"))
    for through in sorted(by_through, reverse=True):
        names = ", ".join(by_through[through])
        when = compact_ts(through, now)
        lines.append(Text(f"no data at EIA through {when}: {names}", style="yellow"))
    return lines


def quality_line(quality: dict[str, Any]) -> str:
    """``quality: 3 open findings (1 crit, 2 warn; worst repeated_day); 5 rows revised
    in the last 24 h``."""
    n = quality.get("open", 0)
    revised = quality.get("revised_last_24h", 0)
    tail = f"{revised:,} rows revised in the last 24 h"
    if not n:
        return f"quality: no open findings; {tail}"
    by = quality.get("open_by_severity") or {}
    parts = ", ".join(f"{by[sev]} {sev}" for sev in ("crit", "warn", "info") if by.get(sev))
    noun = "finding" if n == 1 else "findings"
    return f"quality: {n} open {noun} ({parts}; worst {quality.get('worst_rule')}); {tail}"


def _queue_line(status: Status, now: datetime) -> str:
    if status.oldest_pending is None:
        line = "queue: empty"
    else:
        waited = age_text(status.oldest_pending_age_seconds or 0)
        line = (
            f"queue: oldest pending {status.oldest_pending_series} "
            f"{compact_ts(status.oldest_pending, now)}, waiting {waited}"
        )
    if status.next_retry_at:
        line += f"; next retry {compact_ts(status.next_retry_at, now)}"
    return line


def _run_line(status: Status, stage: str, now: datetime) -> Any:
    from rich.text import Text

    run = status.last_runs.get(stage)
    label = f"last {stage}: ".ljust(12)
    if run is None:
        return Text(label + "never")
    took = "" if run["seconds"] is None else f", {duration_text(run['seconds'])}"
    text = f"{label}run {run['id']} {run['status']} at {compact_ts(run['started_at'], now)}{took}"
    if run.get("error"):
        text += f": {run['error']}"
    else:
        counts = counts_text(stage, run.get("counts") or {})
        text += f" ({counts})" if counts else ""
    failures = status.consecutive_failures.get(stage, 0)
    if failures > 1:
        text += f" [{failures} failed in a row]"
    style = "red" if run["status"] == "failed" else ""
    return Text(text, style=style)


def counts_text(stage: str, counts: dict[str, Any]) -> str:
    """``pages 3, rows 2,376, invalid 0``: the non-zero counts (a fetch always shows invalid)."""
    return ", ".join(
        f"{k} {v:,}"
        for k, v in counts.items()
        if isinstance(v, int) and (v or (stage == "fetch" and k == "invalid"))
    )


def duration_text(seconds: float) -> str:
    """``0.40s``, ``2.39s``, ``12.30s``, ``5m 02s``."""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def render_runs(records: Sequence[RunRecord], now: datetime | None = None) -> Any:
    """The ``outbox runs`` table: id, stage, start, duration, status, counts or error."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    now = now or utcnow()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False)
    for name in ("run", "stage", "started", "took", "status"):
        table.add_column(name, no_wrap=True, justify="right" if name in ("run", "took") else "left")
    table.add_column("counts / error", overflow="fold")
    for r in records:
        seconds = run_seconds(r)
        detail = redact(r.error) if r.error else counts_text(r.stage, r.counts)
        table.add_row(
            str(r.id),
            r.stage,
            compact_ts(r.started_at, now),
            "-" if seconds is None else duration_text(seconds),
            Text(r.status, style="red" if r.status == "failed" else ""),
            Text(detail),
        )
    return table


def _remote_parts(remote: dict[str, Any], now: datetime) -> list[Any]:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"remote: {remote['agree']} of {remote['checked']} series agree with {remote['base_url']}",
        style="green" if not remote["disagree"] else "yellow",
    )
    rows = [r for r in remote["series"] if r["verdict"] != "ok"]
    if not rows:
        return [head]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False)
    for name in ("series", "delivered\nthrough", "newest\nacked", "GridPulse\nlatest", "verdict"):
        table.add_column(name, no_wrap=name != "series")
    for r in rows:
        latest = compact_ts(r["gridpulse_latest"], now) if r["gridpulse_known"] else "unknown"
        table.add_row(
            r["series_id"],
            compact_ts(r["delivered_through"], now),
            compact_ts(r["newest_acked"], now),
            latest,
            r["verdict"],
        )
    return [head, table]


def compact_ts(ts: str | None, now: datetime | None = None) -> str:
    """``08-21 23:00`` UTC for the table, ``2024-08-21 23:00`` when not in ``now``'s year:
    always the hour, never a date alone."""
    if not ts:
        return "-"
    when = parse_ts(ts)
    if now is not None and when.year != now.year:
        return when.strftime("%Y-%m-%d %H:%M")
    return when.strftime("%m-%d %H:%M")


def size_text(size: float) -> str:
    """``84 kB``, ``412.3 MB``, ``75.3 GB`` (decimal units, as ``df -H``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.0f} kB"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def age_text(seconds: float) -> str:
    """A short age: ``45m``, ``2.5h``, ``31h``, ``12d``."""
    if abs(seconds) < 3600:
        return f"{seconds / 60:.0f}m"
    hours = seconds / 3600
    if abs(hours) < 10:
        return f"{hours:.1f}".rstrip("0").rstrip(".") + "h"
    if abs(hours) < 72:
        return f"{hours:.0f}h"
    return f"{hours / 24:.0f}d"
