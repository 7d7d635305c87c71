"""Request planning: which EIA requests a fetch makes, and from where each stream starts.

Pure functions of the config, what the store knows (watermarks, progress, history
markers, gaps) and the clock: no HTTP, no database. The fetch stage
(:mod:`outbox.stages.fetch`) makes the requests and stages what they bring.

* incremental: per stream from its watermark (or what EIA answered) minus the look-back
  to now (:func:`plan_incremental`), then the older history of streams whose first rows
  reached back to the window start (:func:`plan_history`);
* backfill: each route over ``--start/--end`` in chunks (:func:`plan_backfill`);
* fill-gaps: the fewest requests covering every gap hour (:func:`plan_fill`);
* first start: a new outbox starts each stream at GridPulse's latest hour
  (:func:`first_starts`) instead of ``eia.history_start``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from outbox import datasets as table
from outbox.config import Config
from outbox.errors import UsageError
from outbox.normalize import stream_key
from outbox.ports import Request
from outbox.timeutil import HOUR, floor_hour, parse_ts, to_ts

if TYPE_CHECKING:
    from outbox.gaps import Gap

# Streams of one route whose start differs by less than this share one request.
MERGE_WINDOW = timedelta(days=7)
MERGE_HOURS = 6
"""Gap hours of one route at most this far apart share one request: refetching a few
present hours is cheaper than another request (EIA allows ~5 requests a second)."""

SeriesSource = tuple[str, dict[str, str]]
"""Where a series comes from: its EIA route and facets (``Reads.series_sources``)."""


@dataclass(frozen=True)
class Stream:
    """One watermark stream: a dataset of one respondent."""

    dataset: str
    respondent: str
    route: str

    @property
    def key(self) -> str:
        """The watermark key, ``dataset:respondent``."""
        return stream_key(self.dataset, self.respondent)


@dataclass(frozen=True)
class Window:
    """One EIA request to make: a route, its streams and the inclusive hour range."""

    route: str
    streams: tuple[Stream, ...]
    start: datetime
    end: datetime
    history_from: datetime | None = None
    """For a window of its streams' older history (:func:`plan_history`): where that
    history starts. Its last page moves their history markers down to the window
    start, or clears them when the window starts there."""

    def request(self) -> Request:
        """The EIA request for this window."""
        respondents = tuple(sorted({s.respondent for s in self.streams}))
        facet_values = table.facet_codes(self.route, {s.dataset for s in self.streams})
        return Request(self.route, respondents, facet_values, self.start, self.end)


def plan_streams(
    config: Config, bas: Sequence[str] | None = None, datasets: Sequence[str] | None = None
) -> list[Stream]:
    """The streams to fetch: enabled datasets x configured (or chosen) balancing authorities."""
    chosen_bas = _choose_bas(config, bas)
    chosen = datasets or config.enabled_datasets()
    out: list[Stream] = []
    for route in table.routes():
        for dataset in (ds.name for ds in table.for_route(route)):
            if dataset in chosen:
                out.extend(Stream(dataset, eia, route) for eia in chosen_bas)
    return out


def _choose_bas(config: Config, bas: Sequence[str] | None) -> list[str]:
    mapping = config.balancing_authorities
    if not bas:
        return list(mapping.values())
    by_eia = {v: v for v in mapping.values()}
    out = []
    for code in bas:
        eia = mapping.get(code) or by_eia.get(code) or mapping.get(code.upper())
        if eia is None:
            raise UsageError(f"--ba {code}: not a configured balancing authority")
        out.append(eia)
    return out


def plan_incremental(
    config: Config,
    streams: Sequence[Stream],
    marks: dict[str, str],
    now: datetime,
    initial: dict[str, datetime] | None = None,
    progress: dict[str, str] | None = None,
) -> list[Window]:
    """Windows for an incremental run: per stream from (watermark - look-back) to now.

    A stream EIA has been asked for and has answered completely past its watermark
    (``progress``: ``stream_progress.asked_through``; a stream EIA has no rows for has
    no watermark at all) starts from there minus the look-back instead.
    """
    end_now = floor_hour(now)
    windows: list[Window] = []
    for route in table.routes():
        starts: list[tuple[datetime, Stream]] = []
        for s in (s for s in streams if s.route == route):
            lookback = timedelta(hours=config.datasets[s.dataset].lookback_hours)
            known = known_through(s.key, marks, progress or {})
            if known is not None:
                start = parse_ts(known) - lookback
            elif initial and s.key in initial:  # GridPulse's latest acts as the watermark
                start = max(initial[s.key] - lookback, config.eia.history_start)
            else:
                start = config.eia.history_start
            starts.append((start, s))
        if not starts:
            continue
        end = end_now
        if any(table.by_name(s.dataset).horizon == "forecast" for _, s in starts):
            end = end_now + timedelta(hours=config.eia.forecast_horizon_hours)
        windows.extend(_group_windows(route, starts, end))
    return _chunk(windows, config.eia.backfill_chunk_hours)


def plan_history(
    config: Config,
    streams: Sequence[Stream],
    markers: dict[str, str],
    initial: dict[str, datetime] | None = None,
) -> list[Window]:
    """Windows for the history still to be fetched of streams whose first rows reached
    back to the start of the window asked (``markers``: :meth:`Store.history_markers`).

    Each stream's history is fetched from ``eia.history_start`` (or GridPulse's latest
    minus the look-back, as :func:`plan_incremental` starts a new stream) up to the hour
    before its marker, newest chunk first, so that each chunk answered moves the marker
    down. Streams of a route with the same range share the requests. A marker at or
    before where the history starts (``eia.history_start`` moved later) asks nothing.
    """
    groups: dict[tuple[str, datetime, datetime], list[Stream]] = {}
    for s in streams:
        before = markers.get(s.key)
        if before is None:
            continue
        lo = history_floor(config, s, initial)
        hi = parse_ts(before) - HOUR
        if lo <= hi:
            groups.setdefault((s.route, lo, hi), []).append(s)
    step = timedelta(hours=config.eia.backfill_chunk_hours)
    out = []
    for (route, lo, hi), chosen in groups.items():
        while hi >= lo:
            start = max(lo, hi - step + HOUR)
            out.append(Window(route, tuple(chosen), start, hi, history_from=lo))
            hi = start - HOUR
    return out


def history_floor(
    config: Config, stream: Stream, initial: dict[str, datetime] | None = None
) -> datetime:
    """Where a stream's history starts for the outbox: ``eia.history_start``, or, for a
    new outbox, GridPulse's latest minus the look-back."""
    if initial and stream.key in initial:
        lookback = timedelta(hours=config.datasets[stream.dataset].lookback_hours)
        return max(initial[stream.key] - lookback, config.eia.history_start)
    return config.eia.history_start


def known_through(key: str, marks: dict[str, str], progress: dict[str, str]) -> str | None:
    """The newer of a stream's watermark and how far EIA has answered it completely."""
    return max((t for t in (marks.get(key), progress.get(key)) if t), default=None)


def asked_cutoffs(config: Config, now: datetime) -> dict[str, str]:
    """Per dataset, the newest hour EIA may be taken to have answered completely at
    ``now``: the current hour minus the dataset's publication lag (rows for later hours
    may still arrive, so no stream's progress is ever recorded past this)."""
    current = floor_hour(now)
    return {
        name: to_ts(current - timedelta(hours=config.publication_lag(name)))
        for name in table.names()
    }


def _group_windows(
    route: str, starts: list[tuple[datetime, Stream]], end: datetime
) -> list[Window]:
    starts.sort(key=lambda x: (x[0], x[1].key))
    groups: list[list[tuple[datetime, Stream]]] = []
    for item in starts:
        if groups and item[0] - groups[-1][0][0] < MERGE_WINDOW:
            groups[-1].append(item)
        else:
            groups.append([item])
    return [Window(route, tuple(s for _, s in g), g[0][0], end) for g in groups if g[0][0] <= end]


def plan_backfill(
    config: Config, streams: Sequence[Stream], start: datetime, end: datetime
) -> list[Window]:
    """Windows for ``fetch --start/--end``: each route over the range, in chunks."""
    windows = []
    for route in table.routes():
        chosen = tuple(s for s in streams if s.route == route)
        if chosen:
            windows.append(Window(route, chosen, start, end))
    return _chunk(windows, config.eia.backfill_chunk_hours)


def _chunk(windows: list[Window], hours: int) -> list[Window]:
    step = timedelta(hours=hours)
    out = []
    for w in windows:
        lo = w.start
        while lo <= w.end:
            hi = min(w.end, lo + step - HOUR)
            out.append(Window(w.route, w.streams, lo, hi))
            lo = hi + HOUR
    return out


def latest_hours(config: Config, now: datetime) -> dict[str, datetime]:
    """The newest hour a row of each dataset may have at ``now``; a later row is refused.

    An hour-ending ``ts`` after the current hour is a future period (one hour of clock
    skew allowed), except for the day-ahead forecast, which reaches the forecast horizon.
    A row from the future would carry its stream's watermark past every real hour.
    """
    current = floor_hour(now) + HOUR
    horizon = current + timedelta(hours=config.eia.forecast_horizon_hours)
    return {
        name: horizon if table.by_name(name).horizon == "forecast" else current
        for name in table.names()
    }


@dataclass(frozen=True)
class FillRequest:
    """One EIA request of a gap fill and the ``(series_id, ts)`` gap hours it covers."""

    window: Window
    hours: tuple[tuple[str, str], ...]


def plan_fill(
    gaps: Iterable[Gap], sources: dict[str, SeriesSource], *, max_hours: int
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
        ranges = group_hours(
            sorted(hours), lambda f, last, h: h - last <= merge and h - f < longest
        )
        for group in ranges:
            wanted = [(sid, h) for h in group for sid in sorted(hours[h])]
            streams = sorted({_stream(route, sources[sid]) for sid, _ in wanted}, key=_order)
            window = Window(route, tuple(streams), group[0], group[-1])
            plan.append(FillRequest(window, tuple((sid, to_ts(h)) for sid, h in wanted)))
    return plan


def group_hours(
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


def dataset_of_source(source: SeriesSource) -> str:
    """The dataset of a series from its route and facets (ValueError when none fits)."""
    route, facets = source
    return table.of_row(route, facets.get(table.route(route).code_facet))


def _stream(route: str, source: SeriesSource) -> Stream:
    facets = source[1]
    respondent = facets[table.route(route).respondent_facet]
    return Stream(dataset_of_source(source), respondent, route)


def _order(stream: Stream) -> tuple[int, str]:
    return table.order(stream.dataset), stream.respondent


def first_starts(
    config: Config, listing: Iterable[Mapping[str, object]]
) -> dict[str, datetime] | None:
    """For a new outbox: where each stream starts, from GridPulse's series listing.

    A stream starts at the oldest ``latest_ts`` of its series in GridPulse (then minus
    the look-back, see :func:`plan_incremental`); None when GridPulse holds none of them
    (history start applies).
    """
    series = list(listing)
    latest: dict[str, datetime] = {}
    for stream in plan_streams(config):
        ba = config.eia_to_gridpulse.get(stream.respondent, stream.respondent)
        found = [
            parse_ts(str(s["latest_ts"]))
            for s in series
            if s.get("latest_ts")
            and table.is_series_of(stream.dataset, ba, str(s.get("series_id", "")))
        ]
        if found:
            latest[stream.key] = min(found)
    return latest or None


def with_lookback(config: Config, hours: int) -> Config:
    """``config`` with every dataset's look-back at least ``hours`` (``fetch --lookback``).

    The look-back must stay shorter than the retention, or prune and re-check would fight
    over the same rows.
    """
    kept = config.housekeeping.retention_days * 24
    if hours >= kept:
        raise UsageError(
            f"--lookback {hours}: must be shorter than housekeeping.retention_days "
            f"({config.housekeeping.retention_days:g} days = {kept:g} h)"
        )
    datasets = {
        name: ds.model_copy(update={"lookback_hours": max(ds.lookback_hours, hours)})
        for name, ds in config.datasets.items()
    }
    return config.model_copy(update={"datasets": datasets})
