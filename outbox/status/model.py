"""The status model: what ``outbox status`` reports, as plain values.

:class:`Status` is what every output renders (the table, ``--json``, ``--check``,
``--metrics``, ``--remote``); :meth:`Status.to_dict` is the ``--json`` document, documented
field by field in ``docs/status.md``. Bump :data:`SCHEMA_VERSION` on any incompatible
change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from outbox.redact import redact
from outbox.store import RUN_SECONDS, RunRecord, SeriesState
from outbox.timeutil import parse_ts

SCHEMA_VERSION = 1
STAGES = ("fetch", "send")
# Freshness states of a dataset x BA group.
FRESH_OK, FRESH_WARNING, FRESH_CRITICAL = "ok", "warning", "critical"
FRESH_DISABLED, FRESH_NO_DATA = "disabled", "no_data"
# The ``--check`` verdicts (Nagios plugin exit codes).
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
LABELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


@dataclass(frozen=True)
class SeriesStatus:
    """Delivery state of one series (``--json`` ``series[]``, metrics, ``--remote``): the
    store's read model of the series plus the dataset status groups it under."""

    state: SeriesState
    dataset: str

    @property
    def series_id(self) -> str:
        return self.state.series_id

    @property
    def ba(self) -> str:
        return self.state.ba

    @property
    def pending(self) -> int:
        return self.state.pending

    @property
    def dead(self) -> int:
        return self.state.dead

    @property
    def newest_staged(self) -> str | None:
        return self.state.newest_staged

    @property
    def newest_acked(self) -> str | None:
        return self.state.newest_acked

    @property
    def delivered_through(self) -> str | None:
        return self.state.delivered_through

    @property
    def oldest_pending(self) -> str | None:
        return self.state.oldest_pending

    def to_dict(self) -> dict[str, Any]:
        """The ``series[]`` entry of ``--json`` (docs/status.md)."""
        return {
            "series_id": self.series_id,
            "dataset": self.dataset,
            "ba": self.ba,
            "pending": self.pending,
            "dead": self.dead,
            "newest_staged": self.newest_staged,
            "newest_acked": self.newest_acked,
            "delivered_through": self.delivered_through,
            "oldest_pending": self.oldest_pending,
        }


@dataclass
class Group:
    """One dataset x BA line of the status table."""

    dataset: str
    ba: str
    enabled: bool
    series: int = 0
    pending: int = 0
    dead: int = 0
    newest_staged: str | None = None
    newest_acked: str | None = None
    delivered_through: str | None = None
    oldest_pending: str | None = None
    freshness_seconds: int | None = None
    stale_warning_seconds: int | None = None
    stale_critical_seconds: int | None = None
    freshness_state: str = FRESH_OK


@dataclass(frozen=True)
class Check:
    """The ``--check`` verdict: exit code, its label and the one summary line."""

    code: int
    label: str
    summary: str


@dataclass
class Status:
    """Everything ``outbox status`` reports (see docs/status.md for each field)."""

    schema_version: int
    generated_at: str
    database: str
    database_bytes: int
    disk_free_bytes: int | None
    outbox_schema: str | None
    schema_head: str
    totals: dict[str, int]
    oldest_pending: str | None = None
    oldest_pending_series: str | None = None
    oldest_pending_since: str | None = None
    oldest_pending_age_seconds: int | None = None
    next_retry_at: str | None = None
    groups: list[Group] = field(default_factory=list)
    missing: list[dict[str, str | None]] = field(default_factory=list)
    series: list[SeriesStatus] = field(default_factory=list)
    watermarks: list[dict[str, Any]] = field(default_factory=list)
    stream_progress: list[dict[str, Any]] = field(default_factory=list)
    last_runs: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    last_success: dict[str, str | None] = field(default_factory=dict)
    consecutive_failures: dict[str, int] = field(default_factory=dict)
    invalid_last_fetch: int = 0
    warnings: list[str] = field(default_factory=list)
    check: Check | None = None
    remote: dict[str, Any] | None = None
    alerts: dict[str, int] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` (stable keys, documented in docs/status.md)."""
        out = asdict(replace(self, series=[]))
        out["series"] = [s.to_dict() for s in self.series]  # keeps the key's place
        return out


def run_dict(run: RunRecord | None) -> dict[str, Any] | None:
    """A run as plain data: the ``runs`` row plus ``seconds``, its error redacted."""
    if run is None:
        return None
    out = asdict(run)
    out["counts"] = {k: v for k, v in run.counts.items() if k != RUN_SECONDS}
    out["seconds"] = run_seconds(run)
    out["error"] = redact(run.error) if run.error else None
    return out


def run_seconds(run: RunRecord) -> float | None:
    """How long a finished run took (None while it runs, and when its process died: a
    gone run's ``finished_at`` is when it was found, its end is not known): as measured
    by the run (``counts.seconds``), else from its whole-second timestamps."""
    if not run.finished_at or run.gone:
        return None
    measured = run.counts.get(RUN_SECONDS)
    if isinstance(measured, int | float) and not isinstance(measured, bool):
        return round(float(measured), 3)
    return round((parse_ts(run.finished_at) - parse_ts(run.started_at)).total_seconds(), 3)
