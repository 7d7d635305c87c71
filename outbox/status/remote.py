"""``outbox status --remote``: each series' acknowledged rows against GridPulse's latest.

Status asks through :class:`LatestSource` (the GridPulse client implements it) and never
speaks HTTP itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from outbox.redact import redact
from outbox.status.model import Status
from outbox.timeutil import parse_ts


class LatestSource(Protocol):
    """What ``--remote`` needs from GridPulse (a ``sinks.gridpulse.GridPulseClient``)."""

    def latest(self, series_id: str) -> tuple[str | None, str | None] | None:
        """``(latest_ts, revision)`` or None when GridPulse does not know the series."""
        ...


def compare_remote(status: Status, client: LatestSource, base_url: str) -> dict[str, Any]:
    """Each series' acknowledged rows against GridPulse's latest ts for it.

    Verdicts: ``ok`` (GridPulse's latest equals our newest acknowledged ts, or both are
    empty), ``behind`` (GridPulse lacks rows it acknowledged: its latest is older, or it
    does not know the series), ``ahead`` (GridPulse holds newer rows than this outbox ever
    delivered: another writer, or a reset outbox that has not caught up). Raises the
    client's SinkError when GridPulse cannot be asked.
    """
    rows = []
    for s in status.series:
        answer = client.latest(s.series_id)
        latest, revision = answer if answer is not None else (None, None)
        rows.append(
            {
                "series_id": s.series_id,
                "delivered_through": s.delivered_through,
                "newest_acked": s.newest_acked,
                "gridpulse_known": answer is not None,
                "gridpulse_latest": latest,
                "gridpulse_revision": revision,
                "verdict": _verdict(s.newest_acked, latest),
            }
        )
    disagree = sum(1 for r in rows if r["verdict"] != "ok")
    return {
        "base_url": redact(base_url),
        "checked": len(rows),
        "agree": len(rows) - disagree,
        "disagree": disagree,
        "series": rows,
    }


def _verdict(acked: str | None, latest: str | None) -> str:
    if acked is not None and (latest is None or parse_ts(latest) < parse_ts(acked)):
        return "behind"
    if latest is not None and (acked is None or parse_ts(latest) > parse_ts(acked)):
        return "ahead"
    return "ok"
