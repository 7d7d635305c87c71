"""The fetch stage: :func:`run_fetch` (EIA -> outbox); the send stage is ``stages.send``.

Each stage records itself in ``runs`` and builds its retry policy once from the
config. Clients are passed in (tests swap the transport); the CLI builds them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from outbox import datasets as table
from outbox import eia as eia_mod
from outbox.config import Config
from outbox.crash import crashpoint
from outbox.errors import (
    OutboxError,
    SourceFatalError,
)
from outbox.logsetup import bind, quote, scoped
from outbox.normalize import SKIP_REASONS, Normalized, normalize_page, stream_key
from outbox.readahead import Elided, SharedFlag, can_fork, forked_read_ahead, read_ahead
from outbox.redact import redact
from outbox.store import (
    PageRecord,
    ProgressUpdate,
    RowBatch,
    Store,
    WatermarkUpdate,
    file_lock,
)
from outbox.timeutil import HOUR, floor_hour, parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

# Pages a replay reads and normalizes ahead of the one being staged (bounds memory).
READ_AHEAD = 2
# Streams of one route whose start differs by less than this share one request.
MERGE_WINDOW = timedelta(days=7)


# ---------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------


@dataclass
class FetchResult:
    """Counts of one fetch run."""

    run_id: int = 0
    requests: int = 0
    pages: int = 0
    rows: int = 0
    written: int = 0
    duplicates: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    unconfigured: Counter[str] = field(default_factory=Counter)
    """EIA respondent -> rows a replay skipped because that BA is not configured."""
    skipped: bool = False
    holder: int | None = None
    quality: Any = None  # the run's outbox.quality.engine.Checker, when checks are on

    def counts(self) -> dict[str, Any]:
        """The counts as stored in ``runs.counts``."""
        return {
            "requests": self.requests,
            "pages": self.pages,
            "rows": self.rows,
            "written": self.written,
            "duplicates": self.duplicates,
            "invalid": _invalid(self.invalid),
            "invalid_by_reason": {k: v for k, v in self.invalid.items() if k not in SKIP_REASONS},
            "skipped": sum(v for k, v in self.invalid.items() if k in SKIP_REASONS),
            "skipped_by_reason": {k: v for k, v in self.invalid.items() if k in SKIP_REASONS},
            **(self.quality.counts() if self.quality is not None else {}),
        }


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

    def request(self) -> eia_mod.EIARequest:
        """The EIA request for this window."""
        respondents = tuple(sorted({s.respondent for s in self.streams}))
        facet_values = table.facet_codes(self.route, {s.dataset for s in self.streams})
        return eia_mod.EIARequest(self.route, respondents, facet_values, self.start, self.end)


def plan_streams(
    config: Config, bas: Sequence[str] | None = None, datasets: Sequence[str] | None = None
) -> list[Stream]:
    """The streams to fetch: enabled datasets x configured (or chosen) balancing authorities."""
    chosen_bas = _choose_bas(config, bas)
    chosen = datasets or config.enabled_datasets()
    out = []
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
            from outbox.errors import UsageError

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
            known = _known_through(s.key, marks, progress or {})
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


def _known_through(key: str, marks: dict[str, str], progress: dict[str, str]) -> str | None:
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


class _Prepared(NamedTuple):
    """A page read ahead: its rows normalized, its record and rows ready to stage."""

    page: eia_mod.EIAPage
    norm: Normalized
    record: PageRecord
    rows: RowBatch

    def detached(self) -> _Prepared:
        """What staging the page needs, without what only its preparation did: the
        parsed rows, the per-row lists, the raw body once compressed. Only counts of
        them remain, so that the page crosses from a read-ahead process small."""
        page, norm = self.page, self.norm
        n = norm.count
        return _Prepared(
            replace(page, rows=Elided(len(page.rows)), body=b""),
            replace(
                norm,
                series_id=Elided(n),
                ts=Elided(n),
                value=Elided(n),
                units=Elided(n),
                quality_flag=Elided(n),
                revision=Elided(n),
                row=Elided(n),
            ),
            self.record.detached(),
            self.rows.detached(),
        )


class Fetcher:
    """Stages pages into the store with their watermark advances, one transaction each."""

    def __init__(
        self,
        config: Config,
        store: Store,
        run_id: int,
        result: FetchResult,
        now: datetime | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.result = result
        self.marks = store.staging.watermarks()
        self.progress = store.staging.stream_progress()
        # As the run found it: a stream answered before this run may since have been
        # published with history (see _history_found).
        self.answered = frozenset(self.progress)
        self.history = store.staging.history_markers()
        self.ba_codes = config.eia_to_gridpulse
        self.configured = frozenset(config.balancing_authorities.values())
        self.now = now or utcnow()
        self.latest = latest_hours(config, self.now)
        self.cutoffs = asked_cutoffs(config, self.now)
        # Whether the last staged page wrote rows (read by a forked read-ahead too).
        self._writing = SharedFlag(True)

    def stage_window(
        self, client: eia_mod.EIAClient, window: Window, *, backfill: bool, advance: bool = True
    ) -> None:
        """Fetch every page of one window and stage each with its watermark advance.

        The window's last page also records, for each of its streams, that EIA answered
        the window completely (:meth:`_asked`), in the same transaction.
        ``advance=False`` (gap fills) stages the rows and never moves a watermark or the
        stream progress. A window of older history (``window.history_from``) moves no
        watermark either: its last page moves its streams' history markers instead.
        """
        backfill = backfill or window.history_from is not None
        req = window.request()
        seen: dict[str, str] = {}
        datasets = {s.dataset for s in window.streams}
        for page in client.iter_pages(req):
            crashpoint("fetch.page_fetched")
            self.result.requests += 1
            norm = self._normalize(page, (window.start, window.end), req.respondents, datasets)
            for key, ts in norm.stream_max.items():
                if ts > seen.get(key, ""):
                    seen[key] = ts
            # Rows come sorted by period: once a page ends at hour H, every row before H has
            # been seen; only the last page completes the window.
            cap = None if page.last else _minus_hour(norm.page_max_ts)
            updates: list[WatermarkUpdate] = []
            if advance and cap != "":
                updates = self._advances(window, seen, cap, backfill=backfill)
            asked = self._asked(window, backfill=backfill) if advance and page.last else []
            history = self._history_found(window, norm) if advance and not backfill else {}
            if advance and page.last and window.history_from is not None:
                history = self._history_fetched(window)
            self._stage(page, norm, updates, progress=asked, history=history)
            for key, before in history.items():
                if window.history_from is None and before is not None:
                    log.info(
                        "first rows reach back to the window start, older history to fetch"
                        " stream=%s before=%s",
                        key,
                        before,
                    )

    def stage_replay(self, directory: Path) -> None:
        """Stage every saved EIA response under ``directory`` (the route from each body).

        A stream's watermark advances when a page continues it (its oldest row is at most
        an hour after the watermark, or after what the previous page of the same request
        reached). A page that is not the last of its request stops one hour short of its
        newest period: the other rows of that hour may be on the next page.
        """
        carry: tuple[eia_mod.EIAPage, dict[str, str]] | None = None
        pages = eia_mod.iter_replay_pages(directory)
        if self.config.eia.replay_read_ahead == "process" and can_fork():
            prepared_pages = forked_read_ahead(pages, self._prepare_detached, READ_AHEAD)
        else:
            prepared_pages = read_ahead(pages, self._prepare_replay, READ_AHEAD)
        with self.store.write_group() as group, closing(prepared_pages):
            grouped, since = 0, time.monotonic()
            for prepared in prepared_pages:
                carry = self._stage_replayed(prepared, carry)
                # Pages already on disk arrive faster than they stage: commit them in groups
                # (each page's rows still go in with their own watermark advances).
                grouped += len(prepared.page.rows)
                if (
                    grouped >= self.config.eia.replay_commit_rows
                    or time.monotonic() - since >= self.config.eia.replay_commit_seconds
                ):
                    group.commit()
                    grouped, since = 0, time.monotonic()

    def _stage_replayed(
        self, prepared: _Prepared, carry: tuple[eia_mod.EIAPage, dict[str, str]] | None
    ) -> tuple[eia_mod.EIAPage, dict[str, str]] | None:
        """Stage one replayed page; returns what the next page of its request continues."""
        page, norm, record, rows = prepared
        crashpoint("fetch.page_fetched")
        reach = dict(self.marks)
        if carry is not None and _continues(carry[0], page):
            for key, ts in carry[1].items():
                reach[key] = max(reach.get(key, ts), ts)
        cap = None if page.last else _minus_hour(norm.page_max_ts)
        reached, updates = {}, []
        for key, newest in norm.stream_max.items():
            oldest = norm.stream_min.get(key, newest)
            edge = reach.get(key)
            if edge is not None and parse_ts(oldest) > parse_ts(edge) + HOUR:
                continue
            reached[key] = newest
            last_ts = newest if cap is None else min(newest, cap)
            mark = self.marks.get(key)
            if last_ts and (mark is None or last_ts > mark):
                dataset, respondent = key.split(":", 1)
                updates.append(WatermarkUpdate(key, dataset, respondent, page.route, last_ts))
        self._stage(page, norm, updates, (record, rows))
        return None if page.last else (page, reached)

    def _prepare_replay(self, page: eia_mod.EIAPage) -> _Prepared:
        """Normalize and encode one replayed page (runs on the read-ahead worker)."""
        respondents = _param_list(page.params, ("respondent", "fromba"))
        norm = self._normalize(page, None, respondents or None, None, configured=self.configured)
        return _Prepared(page, norm, *self._prepare(page, norm, precompress=bool(self._writing)))

    def _prepare_detached(self, page: eia_mod.EIAPage) -> _Prepared:
        """:meth:`_prepare_replay` for a read-ahead process: only what the stage reads."""
        return self._prepare_replay(page).detached()

    def _normalize(
        self,
        page: eia_mod.EIAPage,
        window: tuple[datetime, datetime] | None,
        respondents: Iterable[str] | None,
        datasets: Iterable[str] | None,
        configured: frozenset[str] | None = None,
    ) -> Normalized:
        norm = normalize_page(
            page.route,
            page.rows,
            ba_codes=self.ba_codes,
            window=window,
            respondents=set(respondents) if respondents else None,
            datasets=set(datasets) if datasets else set(self.config.enabled_datasets()),
            latest=self.latest,
            configured=configured,
        )
        invalid = _invalid(norm.invalid)
        considered = invalid + norm.count + norm.duplicates
        if considered and invalid / considered > self.config.eia.max_invalid_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(norm.invalid.items()))
            raise SourceFatalError(
                f"{page.route} page {page.page_no} (offset {page.offset}): {invalid} of "
                f"{considered} rows invalid ({reasons}); nothing from this page was staged"
            )
        return norm

    def _advances(
        self, window: Window, seen: dict[str, str], cap: str | None, *, backfill: bool
    ) -> list[WatermarkUpdate]:
        out = []
        for s in window.streams:
            newest = seen.get(s.key)
            if newest is None:
                continue
            if cap is not None:
                newest = min(newest, cap)
            mark = self.marks.get(s.key)
            contiguous = mark is None and not backfill
            if mark is not None:
                contiguous = window.start <= parse_ts(mark) + HOUR
            if contiguous and (mark is None or newest > mark):
                out.append(WatermarkUpdate(s.key, s.dataset, s.respondent, s.route, newest))
        return out

    def _asked(self, window: Window, *, backfill: bool) -> list[ProgressUpdate]:
        """Progress records for a window EIA has answered completely (its last page).

        Each stream is recorded through the window's end, but never past its dataset's
        cutoff (:func:`asked_cutoffs`), and only when the window continues what is known
        of the stream (it starts at most an hour after the stream's watermark or
        progress; an incremental run also starts a stream nothing is known of), the same
        rule as for a watermark.
        """
        out = []
        for s in window.streams:
            through = min(to_ts(window.end), self.cutoffs[s.dataset])
            if through < to_ts(window.start):
                continue  # the window lies wholly within the publication lag
            known = _known_through(s.key, self.marks, self.progress)
            if known is None and backfill:
                continue
            if known is not None and window.start > parse_ts(known) + HOUR:
                continue
            done = self.progress.get(s.key)
            if done is None or through > done:
                out.append(ProgressUpdate(s.key, s.dataset, s.respondent, through))
        return out

    def _history_found(self, window: Window, norm: Normalized) -> dict[str, str | None]:
        """History markers for streams whose first rows this page brings and reach back
        to the window's start.

        A stream with no watermark that EIA had answered with no rows (it has progress)
        is asked again from its progress minus the look-back; if its first rows begin at
        the window start, EIA may have published older hours with them, which no later
        window would ask for. The marker records that they are still to be fetched
        (:func:`plan_history`), in the transaction that stages the first rows and their
        watermark.
        """
        out: dict[str, str | None] = {}
        start = to_ts(window.start)
        if window.start <= self.config.eia.history_start:
            return out
        for s in window.streams:
            if s.key in self.marks or s.key not in self.answered or s.key in self.history:
                continue
            if norm.stream_min.get(s.key) == start:
                out[s.key] = start
        return out

    def _history_fetched(self, window: Window) -> dict[str, str | None]:
        """The history markers of a window of older history once EIA answered it."""
        assert window.history_from is not None
        rest = to_ts(window.start) if window.start > window.history_from else None
        return {s.key: rest for s in window.streams if s.key in self.history}

    @staticmethod
    def _prepare(
        page: eia_mod.EIAPage, norm: Normalized, *, precompress: bool = False
    ) -> tuple[PageRecord, RowBatch]:
        """The page record and the encoded rows of one page (no database access)."""
        record = PageRecord(
            route=page.route,
            params=page.params,
            url=page.url,
            page_no=page.page_no,
            offset=page.offset,
            total=page.total,
            row_count=len(page.rows),
            body=page.body,
        )
        rows = zip(
            norm.series_id,
            norm.ts,
            norm.value,
            norm.units,
            norm.quality_flag,
            norm.revision,
            norm.row,
            strict=True,
        )
        return (record.precompress() if precompress else record), RowBatch.of(rows)

    def _stage(
        self,
        page: eia_mod.EIAPage,
        norm: Normalized,
        updates: list[WatermarkUpdate],
        prepared: tuple[PageRecord, RowBatch] | None = None,
        *,
        progress: Sequence[ProgressUpdate] = (),
        history: dict[str, str | None] | None = None,
    ) -> None:
        record, rows = prepared or self._prepare(page, norm)
        series_rows = [
            (s.series_id, s.ba, s.type, s.subtype, s.units, s.route, s.facets) for s in norm.series
        ]
        staged = self.store.staging.stage(
            rows,
            series_rows=series_rows,
            page=record,
            watermark_updates=updates,
            progress_updates=progress,
            history_updates=history,
            run_id=self.run_id,
        )
        # Pages staged ahead are compressed ahead too while pages keep bringing new rows
        # (a backfill); while they bring nothing new (a re-run) the page is never stored.
        self._writing.set(staged.written > 0)
        for u in updates:
            self.marks[u.stream] = u.last_ts
        for p in progress:
            self.progress[p.stream] = p.asked_through
        for stream, before in (history or {}).items():
            if before is None:
                self.history.pop(stream, None)
            else:
                self.history[stream] = before

        def count() -> None:
            self.result.pages += 1
            self.result.rows += norm.count
            self.result.written += staged.written
            self.result.duplicates += norm.duplicates
            self.result.invalid.update(norm.invalid)
            self.result.unconfigured.update(norm.unconfigured)
            log.debug(
                "page staged route=%s page=%d rows=%d written=%d invalid=%d duplicates=%d",
                page.route,
                page.page_no,
                norm.count,
                staged.written,
                _invalid(norm.invalid),
                norm.duplicates,
            )

        # A replay's pages share a transaction: they count once it commits, so a run that
        # fails (a full disk rolls the whole transaction back) never claims their rows.
        self.store.on_commit(count)


def _invalid(counts: dict[str, int]) -> int:
    """Rows rejected as bad data (rows merely not asked for are not counted)."""
    return sum(v for k, v in counts.items() if k not in SKIP_REASONS)


def _minus_hour(ts: str | None) -> str | None:
    return to_ts(parse_ts(ts) - HOUR) if ts else ""


def _continues(before: eia_mod.EIAPage, page: eia_mod.EIAPage) -> bool:
    """Whether ``page`` is the next page of the request ``before`` belongs to."""
    ignore = ("offset", "length")
    same = {k: v for k, v in before.params.items() if k not in ignore} == {
        k: v for k, v in page.params.items() if k not in ignore
    }
    return same and page.route == before.route and page.offset == before.offset + len(before.rows)


def _param_list(params: dict[str, Any], names: Sequence[str]) -> list[str]:
    facets = params.get("facets") or {}
    for name in names:
        values = facets.get(name) if isinstance(facets, dict) else None
        if values:
            return [str(v) for v in values]
    return []


@scoped
def run_fetch(
    config: Config,
    store: Store,
    *,
    client: eia_mod.EIAClient | None = None,
    replay: Path | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    bas: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    initial: dict[str, datetime] | None = None,
    progress: Callable[[int, int, Window], None] | None = None,
    now: datetime | None = None,
) -> FetchResult:
    """One fetch run: replay a directory, backfill a range, or fetch incrementally."""
    result = FetchResult()
    with file_lock(store.lock_path("fetch"), blocking=False) as got:
        if not got:
            from outbox.store import lock_holder

            result.skipped = True
            result.holder = lock_holder(store.lock_path("fetch"))
            return result
        result.run_id = store.runs.start_run("fetch")
        bind(stage="fetch", run=result.run_id)
        started = time.monotonic()
        fetcher = Fetcher(config, store, result.run_id, result, now=now)
        if config.quality.enabled:
            from outbox.quality.engine import Checker

            store.staging.checker = result.quality = Checker(config)
        try:
            if replay is not None:
                fetcher.stage_replay(replay)
                check_replay_staged(config, result)
            else:
                assert client is not None, "a live fetch needs an EIA client"
                streams = plan_streams(config, bas, datasets)
                now = now or utcnow()
                if start is not None:
                    hi = end or floor_hour(now)
                    windows = plan_backfill(config, streams, start, hi)
                    _backfill(store, fetcher, client, windows, (start, hi), progress)
                else:
                    windows = plan_incremental(
                        config, streams, fetcher.marks, now, initial, fetcher.progress
                    )
                    # Then the older history of streams whose first rows came with some.
                    windows += plan_history(config, streams, fetcher.history, initial)
                    for i, window in enumerate(windows):
                        fetcher.stage_window(client, window, backfill=False)
                        if progress:
                            progress(i + 1, len(windows), window)
        except BaseException as exc:
            store.runs.finish_run(result.run_id, "failed", result.counts(), _describe(exc))
            _log_failed("fetch", result.run_id, started, result.counts(), _describe(exc))
            raise
        finally:
            store.staging.checker = None
        store.runs.finish_run(result.run_id, "ok", result.counts())
    log.info(
        "fetch done run=%d seconds=%.3f requests=%d pages=%d rows=%d written=%d invalid=%d"
        " duplicates=%d skipped=%d%s",
        result.run_id,
        time.monotonic() - started,
        result.requests,
        result.pages,
        result.rows,
        result.written,
        _invalid(result.invalid),
        result.duplicates,
        result.counts()["skipped"],
        "".join(f" {k}={v}" for k, v in sorted(result.counts()["skipped_by_reason"].items())),
    )
    if result.unconfigured:
        log.warning(
            "replay skipped balancing authorities not configured rows=%d respondents=%s",
            sum(result.unconfigured.values()),
            ",".join(sorted(result.unconfigured)),
        )
    return result


def check_replay_staged(config: Config, result: FetchResult) -> None:
    """A replay that read rows but could stage none of them fails, saying why."""
    read = result.rows + result.duplicates + sum(result.invalid.values())
    if result.rows or not read:
        return
    invalid = _invalid(result.invalid)
    why = [skipped_text(config, result)] if result.counts()["skipped"] else []
    if invalid:
        reasons = ", ".join(
            f"{k} {v:,}" for k, v in sorted(result.invalid.items()) if k not in SKIP_REASONS
        )
        why.append(f"{invalid:,} invalid ({reasons})")
    raise SourceFatalError(f"replay staged nothing: {'; '.join(why)}")


def skipped_text(config: Config, result: FetchResult) -> str:
    """``12,000 rows skipped (unconfigured_ba 12,000: AVA, BPAT); configured: CISO, PJM``."""
    skipped = result.counts()["skipped_by_reason"]
    parts = []
    for reason, n in sorted(skipped.items()):
        text = f"{reason} {n:,}"
        if reason == "unconfigured_ba" and result.unconfigured:
            names = sorted(result.unconfigured)
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            text += f": {', '.join(names[:10])}{more}"
        parts.append(text)
    line = f"{sum(skipped.values()):,} rows skipped ({'; '.join(parts)})"
    if result.unconfigured:
        line += f"; configured: {', '.join(sorted(config.balancing_authorities.values()))}"
    return line


def _backfill(
    store: Store,
    fetcher: Fetcher,
    client: eia_mod.EIAClient,
    windows: list[Window],
    bounds: tuple[datetime, datetime],
    progress: Callable[[int, int, Window], None] | None,
) -> None:
    """Walk backfill chunks; a rerun of the same backfill resumes after the last done chunk."""
    for i, window in enumerate(windows):
        key = _backfill_key(window, bounds)
        done = store.meta_get(key)
        if done is None or parse_ts(done) < window.end:
            fetcher.stage_window(client, window, backfill=True)
            store.meta_set(key, to_ts(window.end))
        else:
            log.info("backfill chunk already done route=%s end=%s", window.route, done)
        if progress:
            progress(i + 1, len(windows), window)


def _backfill_key(window: Window, bounds: tuple[datetime, datetime]) -> str:
    streams = ",".join(sorted(s.key for s in window.streams))
    return f"backfill:{window.route}:{to_ts(bounds[0])}:{to_ts(bounds[1])}:{streams}"


def _log_failed(
    stage: str, run_id: int, started: float, counts: dict[str, Any], error: str
) -> None:
    """The one log line of a failed run: run id, duration, counts so far, the error."""
    numbers = " ".join(f"{k}={v}" for k, v in counts.items() if isinstance(v, int))
    log.error(
        "%s failed run=%d seconds=%.3f %s error=%s",
        stage,
        run_id,
        time.monotonic() - started,
        numbers,
        quote(error),
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted"
    text = str(exc) or type(exc).__name__
    return redact(text if isinstance(exc, OutboxError) else f"{type(exc).__name__}: {text}")
