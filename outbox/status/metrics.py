"""``outbox status --metrics``: the status as Prometheus text, and the textfile after a run."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from outbox import __version__
from outbox.config import Config
from outbox.redact import redact
from outbox.status.model import (
    FRESH_CRITICAL,
    FRESH_NO_DATA,
    FRESH_OK,
    FRESH_WARNING,
    STAGES,
    Group,
    Status,
)
from outbox.status.read import read
from outbox.timeutil import parse_ts

log = logging.getLogger(__name__)

_METRICS: dict[str, str] = {
    "outbox_info": "Version and schema of the outbox (always 1).",
    "outbox_status_timestamp_seconds": "When this status was collected.",
    "outbox_check_status": "Verdict of `outbox status --check`: 0 OK, 1 WARNING, 2 CRITICAL.",
    "outbox_database_bytes": "Size of the outbox database file plus its WAL.",
    "outbox_disk_free_bytes": "Free bytes on the file system that holds the outbox.",
    "outbox_series": "Series in the outbox.",
    "outbox_pending_rows": "Rows waiting to be delivered.",
    "outbox_dead_rows": "Rows GridPulse rejected permanently (dead letters).",
    "outbox_acks_unapplied_rows": (
        "Rows GridPulse acknowledged whose rows a stopped send left to mark (the next does)."
    ),
    "outbox_oldest_pending_age_seconds": (
        "How long the oldest pending row has waited since it was staged (0 when none)."
    ),
    "outbox_next_retry_timestamp_seconds": "Earliest next attempt of a deferred row.",
    "outbox_last_fetch_invalid_rows": "Invalid EIA rows in the last finished fetch run.",
    "outbox_series_pending_rows": "Pending rows per series.",
    "outbox_series_dead_rows": "Dead rows per series.",
    "outbox_series_newest_staged_timestamp_seconds": "Newest hour staged per series.",
    "outbox_series_newest_acked_timestamp_seconds": "Newest hour acknowledged per series.",
    "outbox_series_delivered_through_timestamp_seconds": (
        "Per series, the newest hour such that every staged hour up to it is delivered."
    ),
    "outbox_freshness_seconds": "Age of the newest staged hour per dataset and BA.",
    "outbox_freshness_level": (
        "Freshness per enabled dataset and BA: 0 ok, 1 warning, 2 critical, 3 no data."
    ),
    "outbox_freshness_warning_seconds": "Freshness warning threshold per dataset.",
    "outbox_freshness_critical_seconds": "Freshness critical threshold per dataset.",
    "outbox_last_run_timestamp_seconds": "Start of the last finished run per stage.",
    "outbox_last_run_duration_seconds": "Duration of the last finished run per stage.",
    "outbox_last_run_success": "Whether the last finished run per stage succeeded (1) or not.",
    "outbox_last_success_timestamp_seconds": "End of the last successful run per stage.",
    "outbox_consecutive_failed_runs": "Failed runs since the last successful one, per stage.",
    "outbox_alerts_sent_total": "Notifications delivered on a change of the verdict.",
    "outbox_alert_failures_total": "Notifications that failed (each retried at the next run).",
    "outbox_quality_findings": "Open data-quality findings per rule, BA and severity.",
    "outbox_revisions_total": "Revisions of staged rows recorded in the ledger.",
}
_LEVELS = {FRESH_OK: 0, FRESH_WARNING: 1, FRESH_CRITICAL: 2, FRESH_NO_DATA: 3}

Sample = tuple[dict[str, str], float]


def render_metrics(status: Status) -> str:
    """Prometheus text exposition (format 0.0.4) of the status."""
    samples: dict[str, list[Sample]] = {name: [] for name in _METRICS}
    _add_global(samples, status)
    for s in status.series:
        labels = {"dataset": s.dataset, "ba": s.ba, "series": s.series_id}
        samples["outbox_series_pending_rows"].append((labels, s.pending))
        samples["outbox_series_dead_rows"].append((labels, s.dead))
        _add_ts(samples["outbox_series_newest_staged_timestamp_seconds"], labels, s.newest_staged)
        _add_ts(samples["outbox_series_newest_acked_timestamp_seconds"], labels, s.newest_acked)
        _add_ts(
            samples["outbox_series_delivered_through_timestamp_seconds"],
            labels,
            s.delivered_through,
        )
    _add_groups(samples, status.groups)
    _add_runs(samples, status)
    _add_quality(samples, status.quality)
    lines = []
    for name, rows in samples.items():
        if not rows:
            continue
        lines.append(f"# HELP {name} {_METRICS[name]}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in rows)
    return "\n".join(lines) + "\n"


def _add_global(samples: dict[str, list[Sample]], status: Status) -> None:
    info = {
        "version": __version__,
        "schema": status.outbox_schema or "",
        "schema_head": status.schema_head,
    }
    samples["outbox_info"].append((info, 1))
    _add_ts(samples["outbox_status_timestamp_seconds"], {}, status.generated_at)
    if status.check is not None:
        samples["outbox_check_status"].append(({}, status.check.code))
    samples["outbox_database_bytes"].append(({}, status.database_bytes))
    if status.disk_free_bytes is not None:
        samples["outbox_disk_free_bytes"].append(({}, status.disk_free_bytes))
    samples["outbox_series"].append(({}, status.totals.get("series", 0)))
    samples["outbox_pending_rows"].append(({}, status.totals.get("pending", 0)))
    samples["outbox_dead_rows"].append(({}, status.totals.get("dead", 0)))
    samples["outbox_acks_unapplied_rows"].append(({}, status.totals.get("acks_unapplied", 0)))
    samples["outbox_oldest_pending_age_seconds"].append(
        ({}, status.oldest_pending_age_seconds or 0)
    )
    _add_ts(samples["outbox_next_retry_timestamp_seconds"], {}, status.next_retry_at)
    samples["outbox_last_fetch_invalid_rows"].append(({}, status.invalid_last_fetch))
    samples["outbox_alerts_sent_total"].append(({}, status.alerts.get("sent", 0)))
    samples["outbox_alert_failures_total"].append(({}, status.alerts.get("failures", 0)))


def _add_quality(samples: dict[str, list[Sample]], quality: dict[str, Any]) -> None:
    if not quality:
        return
    for g in quality.get("open_by_rule", []):
        labels = {"rule": g["rule"], "ba": g["ba"], "severity": g["severity"]}
        samples["outbox_quality_findings"].append((labels, g["n"]))
    samples["outbox_revisions_total"].append(({}, quality.get("revisions_total", 0)))


def _add_groups(samples: dict[str, list[Sample]], groups: Sequence[Group]) -> None:
    thresholds: dict[str, Group] = {}
    for g in groups:
        labels = {"dataset": g.dataset, "ba": g.ba}
        if g.freshness_seconds is not None:
            samples["outbox_freshness_seconds"].append((labels, g.freshness_seconds))
        if g.freshness_state in _LEVELS:
            samples["outbox_freshness_level"].append((labels, _LEVELS[g.freshness_state]))
        if g.stale_warning_seconds is not None:
            thresholds.setdefault(g.dataset, g)
    for dataset, g in thresholds.items():
        labels = {"dataset": dataset}
        samples["outbox_freshness_warning_seconds"].append((labels, g.stale_warning_seconds or 0))
        samples["outbox_freshness_critical_seconds"].append((labels, g.stale_critical_seconds or 0))


def _add_runs(samples: dict[str, list[Sample]], status: Status) -> None:
    for stage in STAGES:
        labels = {"stage": stage}
        run = status.last_runs.get(stage)
        if run is not None and run.get("finished_at"):
            _add_ts(samples["outbox_last_run_timestamp_seconds"], labels, run["started_at"])
            samples["outbox_last_run_duration_seconds"].append((labels, run["seconds"] or 0))
            samples["outbox_last_run_success"].append((labels, int(run["status"] == "ok")))
        _add_ts(
            samples["outbox_last_success_timestamp_seconds"],
            labels,
            status.last_success.get(stage),
        )
        samples["outbox_consecutive_failed_runs"].append(
            (labels, status.consecutive_failures.get(stage, 0))
        )


def _add_ts(rows: list[Sample], labels: dict[str, str], ts: str | None) -> None:
    if ts:
        rows.append((labels, parse_ts(ts).timestamp()))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def write_metrics(status: Status, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_metrics` to ``path`` atomically (temp file beside it + rename).

    node_exporter's textfile collector reads only ``*.prom`` files, so the temporary
    ``.outbox-metrics-*.tmp`` file is never collected half-written.
    """
    from outbox.files import METRICS_HEAD, write_atomic

    return write_atomic(
        path,
        render_metrics(status),
        prefix=".outbox-metrics-",
        replaces=METRICS_HEAD,
        what="metrics file",
    )


def write_run_metrics(config: Config) -> None:
    """After a fetch or send run: refresh ``metrics_path`` if configured; never raises.

    Nothing is written while there is no outbox (a send before the first fetch).
    """
    if not config.metrics_path or not Path(config.database).exists():
        return
    try:
        write_metrics(read(config), config.metrics_path)
    except Exception as exc:  # metrics must never fail the run they describe
        log.warning("metrics not written path=%s error=%s", config.metrics_path, _q(str(exc)))


def _q(text: str) -> str:
    import json

    return json.dumps(redact(text))
