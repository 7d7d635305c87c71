"""The ``--check`` verdict: which problems the status shows, each WARNING or CRITICAL.

Reads only the :class:`~outbox.status.model.Status` and the config's thresholds; never
the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from outbox.config import Config
from outbox.status.model import (
    CRITICAL,
    FRESH_CRITICAL,
    FRESH_WARNING,
    LABELS,
    OK,
    WARNING,
    Group,
    Status,
)
from outbox.status.table import age_text, size_text

Problem = tuple[int, str]


def evaluate(config: Config, status: Status) -> tuple[int, str]:
    """The monitoring verdict: (exit code, one summary line naming what is wrong)."""
    found = problems(config, status)
    if not found:
        t = status.totals
        return OK, (
            f"OK - {t.get('series', 0)} series, {t.get('pending', 0)} pending, "
            f"{t.get('dead', 0)} dead"
        )
    code = found[0][0]
    return code, f"{LABELS[code]} - " + "; ".join(text for _, text in found)


def problems(config: Config, status: Status) -> list[Problem]:
    """What makes the verdict: (WARNING or CRITICAL, text) pairs, the worst first.

    Problems, each WARNING or CRITICAL by its thresholds: a stale dataset x BA (per
    dataset: ``datasets.<name>.stale_*_hours`` or publication lag + 6 h / + 24 h), the
    send queue's head waiting too long, dead rows, consecutive failed runs per stage,
    and config warnings. Disabled datasets and BAs no longer configured are never
    stale; an empty outbox is OK.
    """
    found = _stale_problems(status.groups)
    found.extend(_queue_problems(config, status.oldest_pending_age_seconds))
    found.extend(_dead_problems(config, status.totals.get("dead", 0)))
    found.extend(_failed_run_problems(config, status.consecutive_failures))
    found.extend(_disk_problems(config, status.disk_free_bytes))
    found.extend(_quality_problems(config, status.quality))
    found.extend((WARNING, w) for w in status.warnings)
    found.sort(key=lambda p: -p[0])
    return found


def _queue_problems(config: Config, age: int | None) -> list[Problem]:
    th = config.status
    if age is None or age <= th.oldest_pending_warning_hours * 3600:
        return []
    crit = age > th.oldest_pending_critical_hours * 3600
    limit = th.oldest_pending_critical_hours if crit else th.oldest_pending_warning_hours
    return [
        (
            CRITICAL if crit else WARNING,
            f"oldest pending row waiting {age_text(age)} "
            f"({'crit' if crit else 'warn'} > {_limit(limit * 3600)})",
        )
    ]


def _dead_problems(config: Config, dead: int) -> list[Problem]:
    th = config.status
    if dead < th.dead_rows_warning:
        return []
    crit = dead >= th.dead_rows_critical
    limit = th.dead_rows_critical if crit else th.dead_rows_warning
    rows = "row" if dead == 1 else "rows"
    return [(CRITICAL if crit else WARNING, f"{dead} dead {rows} ({_at(crit, limit)})")]


def _failed_run_problems(config: Config, failures: dict[str, int]) -> list[Problem]:
    th = config.status
    found: list[Problem] = []
    for stage, n in failures.items():
        if n >= th.failed_runs_warning:
            crit = n >= th.failed_runs_critical
            limit = th.failed_runs_critical if crit else th.failed_runs_warning
            found.append(
                (
                    CRITICAL if crit else WARNING,
                    f"{stage} failed {n} runs in a row ({_at(crit, limit)})",
                )
            )
    return found


def _disk_problems(config: Config, free: int | None) -> list[Problem]:
    floor = config.housekeeping.min_free_bytes
    if not floor or free is None or free >= floor:
        return []
    return [
        (
            WARNING,
            f"disk space low: {size_text(free)} free (housekeeping.min_free_bytes "
            f"{size_text(floor)}: fetch stages nothing below it)",
        )
    ]


def _quality_problems(config: Config, quality: dict[str, Any]) -> list[Problem]:
    """Open findings at or above ``quality.check_{warning,critical}_severity``."""
    order = ("info", "warn", "crit")
    by = quality.get("open_by_severity") or {}
    for level, floor in (
        (CRITICAL, config.quality.check_critical_severity),
        (WARNING, config.quality.check_warning_severity),
    ):
        if floor == "off":
            continue
        n = sum(by.get(sev, 0) for sev in order[order.index(floor) :])
        if n:
            noun = "finding" if n == 1 else "findings"
            worst = quality.get("worst_rule")
            return [(level, f"{n} open quality {noun} at {floor} or worse (worst: {worst})")]
    return []


def _at(crit: bool, limit: int) -> str:
    return f"{'crit' if crit else 'warn'} at {limit}"


def _stale_problems(groups: Sequence[Group]) -> list[Problem]:
    by_dataset: dict[str, list[Group]] = {}
    enabled: dict[str, int] = {}
    for g in groups:
        enabled[g.dataset] = enabled.get(g.dataset, 0) + int(g.enabled)
        if g.freshness_state in (FRESH_WARNING, FRESH_CRITICAL):
            by_dataset.setdefault(g.dataset, []).append(g)
    problems = []
    for dataset, stale in by_dataset.items():
        critical = [g for g in stale if g.freshness_state == FRESH_CRITICAL]
        level = CRITICAL if critical else WARNING
        oldest = max(g.freshness_seconds or 0 for g in stale)
        if len(stale) == enabled[dataset] > 1:
            where = f"all {len(stale)} BAs"
        else:
            where = ", ".join(g.ba for g in stale)
        limit = (
            f"crit > {_limit(stale[0].stale_critical_seconds)}"
            if critical
            else f"warn > {_limit(stale[0].stale_warning_seconds)}"
        )
        problems.append((level, f"{dataset} stale {age_text(oldest)} ({where}; {limit})"))
    return problems


def _limit(seconds: float | None) -> str:
    return f"{(seconds or 0) / 3600:g}h"
