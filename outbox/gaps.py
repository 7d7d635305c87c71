"""Gaps: hours missing inside a series, and the fetch that asks EIA for exactly those.

A gap hour is an hour absent between two staged hours of one series that

* lies inside the retention window (older hours are pruned, so holes there mean nothing),
* is at least the dataset's publication lag old (EIA may simply not have published it),
* and was not already checked: an hour EIA did not return when asked is recorded in
  ``checked_gaps`` and never requested again.

``fetch --fill-gaps`` groups the gap hours per EIA route, merges hours no more than
:data:`~outbox.stages.plan.MERGE_HOURS` apart into one range (across respondents and
types), and makes one request per range covering the respondents (and region-data types)
that need it (:func:`~outbox.stages.plan.plan_fill`). Pages go through the same
:class:`~outbox.stages.fetch.Fetcher` / ``Store.stage`` path as any fetch, but a gap
fill never moves a watermark. A row EIA returns with a null value is staged as
a ``missing`` observation, which fills the gap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from operator import itemgetter
from typing import Any

from outbox import datasets as table
from outbox.config import Config
from outbox.stages.plan import dataset_of_source, group_hours
from outbox.store import Store
from outbox.timeutil import HOUR, floor_hour, parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gap:
    """A run of consecutive missing hours of one series (``start``..``end`` inclusive)."""

    series_id: str
    dataset: str
    start: str
    end: str
    hours: int

    def to_dict(self) -> dict[str, Any]:
        """The gap as plain data (``outbox gaps --json``)."""
        return {
            "series_id": self.series_id,
            "dataset": self.dataset,
            "start": self.start,
            "end": self.end,
            "hours": self.hours,
        }

    def each_hour(self) -> list[datetime]:
        """Every hour of the gap."""
        first = parse_ts(self.start)
        return [first + i * HOUR for i in range(self.hours)]


def find_gaps(
    config: Config, store: Store, *, since: datetime | None = None, now: datetime | None = None
) -> list[Gap]:
    """The missing hours of every series, as runs of consecutive hours per series."""
    now = now or utcnow()
    floor = floor_hour(now - timedelta(days=config.housekeeping.retention_days))
    lo = max(since, floor) if since is not None else floor
    shortest_lag = min(config.publication_lag(name) for name in table.names())
    missing = store.reads.missing_hours(to_ts(lo), to_ts(now - timedelta(hours=shortest_lag)))
    sources = store.reads.series_sources()
    gaps: list[Gap] = []
    for sid, rows in groupby(missing, key=itemgetter(0)):
        try:
            dataset = dataset_of_source(sources[sid])
        except (KeyError, ValueError):
            log.warning("gaps skipped: series has no usable EIA facets series=%s", sid)
            continue
        newest = to_ts(now - timedelta(hours=config.publication_lag(dataset)))
        hours = [parse_ts(ts) for _, ts in rows if ts <= newest]
        gaps.extend(_runs(sid, dataset, hours))
    return gaps


def _runs(series_id: str, dataset: str, hours: Sequence[datetime]) -> list[Gap]:
    """Consecutive hours as one Gap each."""
    out: list[Gap] = []
    for group in group_hours(hours, lambda first, last, h: h - last == HOUR):
        out.append(Gap(series_id, dataset, to_ts(group[0]), to_ts(group[-1]), len(group)))
    return out


def report(config: Config, *, since: datetime | None, as_json: bool) -> str:
    """``outbox gaps``: missing hours per series, as ranges (plain text or JSON)."""
    from outbox.status import open_store

    with open_store(config) as store:  # reads only: creates and migrates nothing
        found = find_gaps(config, store, since=since)
    if as_json:
        data = {"gaps": [g.to_dict() for g in found], "hours": sum(g.hours for g in found)}
        return json.dumps(data, indent=2)
    return render(found)


def render(gaps: Sequence[Gap]) -> str:
    """The plain-text listing of ``outbox gaps``."""
    if not gaps:
        return "no missing hours"
    width = max(len("series"), *(len(g.series_id) for g in gaps))
    lines = [f"{'series':<{width}}  {'from':<20}  {'to':<20}  hours"]
    lines += [f"{g.series_id:<{width}}  {g.start:<20}  {g.end:<20}  {g.hours:>5}" for g in gaps]
    total = sum(g.hours for g in gaps)
    series = len({g.series_id for g in gaps})
    lines.append(
        f"{total} missing {_plural(total, 'hour')} in {len(gaps)} {_plural(len(gaps), 'range')}"
        f" of {series} {_plural(series, 'series', 'series')}"
    )
    return "\n".join(lines)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return one if n == 1 else (many or one + "s")
