"""Gaps: hours missing inside a series, and the fetch that asks EIA for exactly those.

A gap hour is an hour absent between two staged hours of one series that

* lies inside the retention window (older hours are pruned, so holes there mean nothing),
* is at least the dataset's publication lag old (EIA may simply not have published it),
* and was not already checked: an hour EIA did not return when asked is recorded in
  ``checked_gaps`` and never requested again.

``fetch --fill-gaps`` groups the gap hours per EIA route, merges hours no more than
:data:`MERGE_HOURS` apart into one range (across respondents and types), and makes one
request per range covering the respondents (and region-data types) that need it. Pages go
through the same :class:`~outbox.pipeline.Fetcher` / ``Store.stage`` path as any fetch,
but a gap fill never moves a watermark. A row EIA returns with a null value is staged as
a ``missing`` observation, which fills the gap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from operator import itemgetter
from typing import Any

from outbox import datasets as table
from outbox import eia as eia_mod
from outbox.config import Config
from outbox.pipeline import Fetcher, FetchResult, Stream, Window
from outbox.redact import redact
from outbox.store import Store, file_lock, lock_holder
from outbox.timeutil import HOUR, floor_hour, parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

MERGE_HOURS = 6
"""Gap hours of one route at most this far apart share one request: refetching a few
present hours is cheaper than another request (EIA allows ~5 requests a second)."""

Source = tuple[str, dict[str, str]]


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


@dataclass(frozen=True)
class FillRequest:
    """One EIA request of a gap fill and the ``(series_id, ts)`` gap hours it covers."""

    window: Window
    hours: tuple[tuple[str, str], ...]


@dataclass
class FillResult:
    """What one ``fetch --fill-gaps`` run did."""

    fetch: FetchResult = field(default_factory=FetchResult)
    gap_hours: int = 0
    windows: int = 0
    checked: int = 0

    @property
    def filled(self) -> int:
        """Gap hours that are staged now."""
        return self.gap_hours - self.checked

    def counts(self) -> dict[str, Any]:
        """The counts as stored in ``runs.counts``."""
        return {
            **self.fetch.counts(),
            "mode": "fill_gaps",
            "gap_hours": self.gap_hours,
            "filled": self.filled,
            "checked": self.checked,
        }


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
            dataset = _dataset(sources[sid])
        except (KeyError, ValueError):
            log.warning("gaps skipped: series has no usable EIA facets series=%s", sid)
            continue
        newest = to_ts(now - timedelta(hours=config.publication_lag(dataset)))
        hours = [parse_ts(ts) for _, ts in rows if ts <= newest]
        gaps.extend(_runs(sid, dataset, hours))
    return gaps


def _dataset(source: Source) -> str:
    route, facets = source
    return table.of_row(route, facets.get(table.route(route).code_facet))


def _runs(series_id: str, dataset: str, hours: Sequence[datetime]) -> list[Gap]:
    """Consecutive hours as one Gap each."""
    out: list[Gap] = []
    for group in _group(hours, lambda first, last, h: h - last == HOUR):
        out.append(Gap(series_id, dataset, to_ts(group[0]), to_ts(group[-1]), len(group)))
    return out


def _group(
    items: Iterable[datetime], joins: Callable[[datetime, datetime, datetime], bool]
) -> list[list[datetime]]:
    """Sorted hours split where ``joins(first, last, next)`` is false."""
    groups: list[list[datetime]] = []
    for h in items:
        if groups and joins(groups[-1][0], groups[-1][-1], h):
            groups[-1].append(h)
        else:
            groups.append([h])
    return groups


def plan_fill(
    gaps: Iterable[Gap], sources: dict[str, Source], *, max_hours: int
) -> list[FillRequest]:
    """The fewest requests covering every gap hour, per route, in route then time order.

    Hours of one route no more than :data:`MERGE_HOURS` apart share a request (a range
    never longer than ``max_hours``); each request asks for the respondents and
    region-data types that have a gap in its range.
    """
    by_route: dict[str, dict[datetime, set[str]]] = {}
    for gap in gaps:
        hours = by_route.setdefault(sources[gap.series_id][0], {})
        for h in gap.each_hour():
            hours.setdefault(h, set()).add(gap.series_id)
    merge, longest = timedelta(hours=MERGE_HOURS), timedelta(hours=max_hours)
    plan = []
    for route in table.routes():
        hours = by_route.get(route, {})
        ranges = _group(sorted(hours), lambda f, last, h: h - last <= merge and h - f < longest)
        for group in ranges:
            wanted = [(sid, h) for h in group for sid in sorted(hours[h])]
            streams = sorted({_stream(route, sources[sid]) for sid, _ in wanted}, key=_order)
            window = Window(route, tuple(streams), group[0], group[-1])
            plan.append(FillRequest(window, tuple((sid, to_ts(h)) for sid, h in wanted)))
    return plan


def _stream(route: str, source: Source) -> Stream:
    facets = source[1]
    respondent = facets[table.route(route).respondent_facet]
    return Stream(_dataset(source), respondent, route)


def _order(stream: Stream) -> tuple[int, str]:
    return table.order(stream.dataset), stream.respondent


def run_fill_gaps(
    config: Config, store: Store, client: eia_mod.EIAClient, *, now: datetime | None = None
) -> FillResult:
    """One ``fetch --fill-gaps`` run under the fetch lock, recorded in ``runs``."""
    result = FillResult()
    with file_lock(store.lock_path("fetch"), blocking=False) as got:
        if not got:
            result.fetch.skipped = True
            result.fetch.holder = lock_holder(store.lock_path("fetch"))
            return result
        run_id = result.fetch.run_id = store.runs.start_run("fetch")
        try:
            _fill(config, store, client, result, now)
        except BaseException as exc:
            store.runs.finish_run(run_id, "failed", result.counts(), _describe(exc))
            raise
        store.runs.finish_run(run_id, "ok", result.counts())
    log.info(
        "fill-gaps done run=%d gap_hours=%d requests=%d filled=%d checked=%d",
        result.fetch.run_id,
        result.gap_hours,
        result.fetch.requests,
        result.filled,
        result.checked,
    )
    return result


def _fill(
    config: Config,
    store: Store,
    client: eia_mod.EIAClient,
    result: FillResult,
    now: datetime | None,
) -> None:
    gaps = find_gaps(config, store, now=now)
    plan = plan_fill(gaps, store.reads.series_sources(), max_hours=config.eia.backfill_chunk_hours)
    result.gap_hours = sum(g.hours for g in gaps)
    result.windows = len(plan)
    fetcher = Fetcher(config, store, result.fetch.run_id, result.fetch)
    for request in plan:
        fetcher.stage_window(client, request.window, backfill=True, advance=False)
        result.checked += store.staging.mark_checked(request.hours)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return redact(str(exc) or type(exc).__name__)


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
