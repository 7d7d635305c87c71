"""The stages: :func:`run_fetch` (EIA -> outbox) and :func:`run_send` (outbox -> GridPulse).

Each stage records itself in ``runs`` and builds its retry policy once from the
config. Clients are passed in (tests swap the transport); the CLI builds them.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from outbox import datasets as table
from outbox import eia as eia_mod
from outbox.config import Config, RetryConfig
from outbox.crash import crashpoint
from outbox.errors import (
    BatchRejectedError,
    OutboxError,
    PayloadTooLargeError,
    RejectsEverythingError,
    SinkTransientError,
    SourceFatalError,
)
from outbox.gridpulse import (
    GridPulseClient,
    IngestResult,
    batch_id_of,
    check_result,
    encode_batch,
)
from outbox.logsetup import bind, quote, scoped
from outbox.normalize import SKIP_REASONS, Normalized, normalize_page, stream_key
from outbox.readahead import Elided, SharedFlag, can_fork, forked_read_ahead, read_ahead
from outbox.redact import redact
from outbox.retry import RetryPolicy, call_with_retry
from outbox.store import (
    Claimed,
    Key,
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
UNAVAILABLE = "SINK_UNAVAILABLE"
SERVER_ERROR = "SERVER_ERROR"
# Rows waiting for the time GridPulse asked for (Retry-After): not made due by a
# health check, since GridPulse said when, and it may be up yet not ready for them.
RETRY_AFTER = "SINK_RETRY_AFTER"
# A longer Retry-After is more likely a broken header than a plan: wait a day, then ask.
MAX_ASKED_DEFER = 86400.0


def retry_policy(cfg: RetryConfig, deadline: float = 0.0) -> RetryPolicy:
    """The RetryPolicy for one configured retry section."""
    return RetryPolicy(
        attempts=cfg.attempts,
        initial=cfg.initial_backoff_seconds,
        maximum=cfg.max_backoff_seconds,
        max_wait=cfg.max_retry_after_seconds,
        deadline=deadline,
    )


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
        self.marks = store.watermarks()
        self.progress = store.stream_progress()
        # As the run found it: a stream answered before this run may since have been
        # published with history (see _history_found).
        self.answered = frozenset(self.progress)
        self.history = store.history_markers()
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
        staged = self.store.stage(
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
        result.run_id = store.start_run("fetch")
        bind(stage="fetch", run=result.run_id)
        started = time.monotonic()
        fetcher = Fetcher(config, store, result.run_id, result, now=now)
        if config.quality.enabled:
            from outbox.quality.engine import Checker

            store.checker = result.quality = Checker(config)
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
            store.finish_run(result.run_id, "failed", result.counts(), _describe(exc))
            _log_failed("fetch", result.run_id, started, result.counts(), _describe(exc))
            raise
        finally:
            store.checker = None
        store.finish_run(result.run_id, "ok", result.counts())
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


# ---------------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------------


@dataclass
class SendResult:
    """Counts of one send run.

    Each count says what this run recorded, never what it only tried: ``sent`` counts
    the rows whose outcome GridPulse gave and the run committed (acknowledged, rejected
    per row, or dead after a bisection or a 413), ``batches`` the 200 answers whose
    outcome committed, ``acked`` the rows marked acknowledged, ``deferred`` the rows
    given a later attempt. ``requests`` and ``bytes`` count every POST attempt, answered
    or not.
    """

    run_id: int = 0
    batches: int = 0
    requests: int = 0
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    deferred: int = 0
    bytes: int = 0
    skipped: bool = False
    holder: int | None = None
    due: int = 0
    waiting: int = 0
    waiting_until: str | None = None
    error: str | None = None

    def counts(self) -> dict[str, Any]:
        """The counts as stored in ``runs.counts``."""
        return {
            "batches": self.batches,
            "requests": self.requests,
            "sent": self.sent,
            "acked": self.acked,
            "rejected": self.rejected,
            "deferred": self.deferred,
            "bytes": self.bytes,
        }


class SendFailed(OutboxError):
    """GridPulse stayed unavailable through the run's retry budget (rows deferred)."""


class Batch(NamedTuple):
    """Claimed rows encoded for one POST: the batch id, the JSON body, the body as sent."""

    rows: list[Claimed]
    batch_id: str
    body: bytes
    packed: bytes | None


class Sender:
    """Delivers claimed rows: batching, bisection, 413 halving, deferral."""

    def __init__(
        self,
        config: Config,
        store: Store,
        client: GridPulseClient,
        result: SendResult,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        ends_at: float | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.result = result
        self.batch_size = config.gridpulse.batch_size
        self.policy = retry_policy(
            config.gridpulse.retry, deadline=config.gridpulse.retry_budget_seconds
        )
        self.sleep = sleep
        self.clock = clock
        # When the run must end (``--max-seconds``, on ``clock``): no retry waits past it.
        self.ends_at = ends_at
        # The retry budget the last POST had, and the Retry-After deferral it ended in.
        self.budget_left = self.policy.deadline
        self.asked: tuple[float, str] | None = None
        # Rows GridPulse refused alone in a row with one code, none accepted since.
        self._refused: tuple[str, int] = ("", 0)
        self._pages: dict[int, list[dict[str, Any]]] = {}
        # Compress ahead when the client can take a body compressed ahead (test doubles
        # that only implement post_batch(batch_id, body) get the plain body).
        self._pack: Callable[[bytes], bytes] | None = None
        takes = inspect.signature(client.post_batch).parameters
        if "packed" in takes:
            self._pack = getattr(client, "pack", None)
        # The client checks the answer against the rows sent when it takes them; for one
        # that does not, the same check runs here: only an answer that accounts for every
        # row of its batch settles any row.
        self._client_checks = "keys" in takes
        # Recorded acks are applied to their rows on this thread while the next POST is
        # in flight; one application at a time, finished before any other write.
        self._acks: ThreadPoolExecutor | None = None
        self._applying: Future[int] | None = None

    def prepare(self, rows: Sequence[Claimed]) -> Batch:
        """The batch id and request body of ``rows`` (reads pages only for source_data).

        Safe on another thread than :meth:`deliver`'s: the send pipeline encodes the
        next batch while this one is in flight.
        """
        batch_id = batch_id_of([(r.series_id, r.ts, r.revision) for r in rows])
        body = encode_batch(batch_id, [self._wire(r) for r in rows])
        packed = self._pack(body) if self._pack is not None else None
        return Batch(list(rows), batch_id, body, packed)

    def deliver(self, rows: Sequence[Claimed], batch: Batch | None = None) -> bool:
        """Deliver ``rows`` (``batch``: as :meth:`prepare` encoded them, if it did).

        Rows left untested by a bisection simply stay pending. Returns True when the
        rows went in one accepted request; False after a 413 or a bisection, when the
        caller must claim afresh (rows may be left pending, the batch size may be smaller).
        """
        try:
            outcome = self._post(rows, batch)
        except PayloadTooLargeError as exc:
            if len(rows) == 1:
                self._dead(rows, "PAYLOAD_TOO_LARGE", str(exc))
                return False
            self.batch_size = max(1, math.ceil(min(self.batch_size, len(rows)) / 2))
            log.info("batch too large for GridPulse (413) batch_size=%d", self.batch_size)
            done = 0
            while done < len(rows):  # the size may shrink again inside
                chunk = rows[done : done + self.batch_size]
                self.deliver(chunk)
                done += len(chunk)
            return False
        except BatchRejectedError as exc:
            self._bisect(rows, exc)
            return False
        self._settle(rows, outcome)
        return True

    def _bisect(self, rows: Sequence[Claimed], exc: BatchRejectedError) -> None:
        """Find the rows that make a batch 400/422, one request per halving.

        Rows in ``suspect`` hold at least one bad row (the last request that held them
        failed). Each step sends the first half alone: if it is accepted the bad row
        is in the second half; if not, the second half is left pending, untested, for
        a later batch. A single row that fails alone is dead with the server's words.
        While GridPulse has refused every row tried since it last accepted one, the first
        step sends the first row alone instead of half: a GridPulse that refuses
        everything costs two requests a row, and the circuit breaker stops the run once
        a row from outside the refused run is refused alone as well (see
        :meth:`_count_refused`).
        """
        suspect, error, alone = list(rows), exc, len(rows) == 1
        accepted = False
        while len(suspect) > 1:
            first = 1 if self._refused[1] and not accepted else math.ceil(len(suspect) / 2)
            half = suspect[:first]
            try:
                outcome = self._post(half)
            except BatchRejectedError as again:
                suspect, error, alone = half, again, len(half) == 1
                continue
            self._settle(half, outcome)
            accepted = accepted or outcome.accepted > 0
            suspect, alone = suspect[len(half) :], False
        code = error.code or f"HTTP_{error.status}"
        message = str(error) if alone else f"rejected by bisection (its sibling passed): {error}"
        self._dead(suspect, code, message)
        if not accepted:
            # With no row accepted the bisection only sent first halves: the dead row is
            # the batch's first, and its last row (when it has another) is untested.
            self._count_refused(code, len(suspect), rows[-1] if len(rows) > 1 else None)

    def _count_refused(self, code: str, rows: int, beyond: Claimed | None) -> None:
        """Count rows refused with no row accepted; at the breaker's limit, probe.

        K refused rows in a row may be one bad stretch of the queue (one hour of one BA:
        its demand, forecast and generation rows are neighbours), not a GridPulse that
        refuses everything. So before stopping the run one row from outside the refused
        run goes alone: ``beyond`` (the refused batch's last row), else the newest due
        row. Accepted (or answered 200 at all): the count starts again and the run goes
        on; the refused rows stay dead, each was refused alone. Refused with another
        code: that row is dead and the count starts at it. Refused with the same code:
        that row is dead too (refused alone, like any other) and the run stops, with at
        most K + 1 rows dead.
        """
        seen, count = self._refused
        count = count + rows if code == seen else rows
        self._refused = (code, count)
        limit = self.config.gridpulse.circuit_breaker_rows
        if count < limit:
            return
        probe = beyond or self.store.newest_due(to_ts(utcnow()))
        if probe is None:  # no row left to try: nothing for the breaker to save
            return
        try:
            outcome = self._post([probe])
        except PayloadTooLargeError as exc:  # too large alone: dead, as in deliver
            self._dead([probe], "PAYLOAD_TOO_LARGE", str(exc))
            self._refused = ("", 0)
            return
        except BatchRejectedError as exc:
            again = exc.code or f"HTTP_{exc.status}"
            self._dead([probe], again, str(exc))
            if again != code:
                self._refused = (again, 1)
                return
            raise RejectsEverythingError(
                f"GridPulse rejects everything (code {code}): {count} rows in a row refused "
                f"alone, none accepted, and a row from outside that run ({probe.series_id} "
                f"{probe.ts}) refused alone too; they are dead, the rest stay pending "
                f"(outbox requeue --code {code} once GridPulse accepts them)",
                code,
            ) from None
        self._settle([probe], outcome)
        self._refused = ("", 0)
        log.info(
            "circuit breaker probe answered, the run goes on code=%s refused=%d probe=%s",
            code,
            count,
            quote(f"{probe.series_id} {probe.ts}"),
        )

    def _post(self, rows: Sequence[Claimed], batch: Batch | None = None) -> IngestResult:
        batch = batch or self.prepare(rows)
        batch_id, body, packed = batch.batch_id, batch.body, batch.packed

        def attempt() -> IngestResult:
            self.result.requests += 1
            self.result.bytes += len(body)
            if self._client_checks:
                return self.client.post_batch(batch_id, body, packed=packed, keys=rows)
            if packed is None:
                answer = self.client.post_batch(batch_id, body)
            else:
                answer = self.client.post_batch(batch_id, body, packed=packed)  # type: ignore[call-arg]
            check_result(answer, batch_id, rows)
            return answer

        crashpoint("send.before_post")
        outcome = call_with_retry(self._policy_now(), attempt, sleep=self.sleep)
        crashpoint("send.after_post")
        return outcome

    def _policy_now(self) -> RetryPolicy:
        """The retry policy of the next POST: the budget, or less if the run ends sooner."""
        left = self.policy.deadline
        if self.ends_at is not None:
            # A deadline of 0 means none: a run with no time left still gets no wait.
            run_left = max(self.ends_at - self.clock(), 1e-3)
            left = run_left if left <= 0 else min(left, run_left)
        self.budget_left = left
        return self.policy if left == self.policy.deadline else replace(self.policy, deadline=left)

    def _wire(self, r: Claimed) -> dict[str, Any]:
        obs = {
            "series_id": r.series_id,
            "ba": r.ba,
            "type": r.type,
            "subtype": r.subtype,
            "units": r.units,
            "ts": r.ts,
            "value": r.value,
            "quality_flag": r.quality_flag,
            "revision": r.revision,
        }
        if self.config.gridpulse.send_source_data and r.page_id is not None:
            obs["source_data"] = self._source_row(r.page_id, r.page_row)
        return obs

    def _source_row(self, page_id: int, row: int | None) -> dict[str, Any] | None:
        if page_id not in self._pages:
            import orjson

            found = self.store.page_body(page_id)
            data = orjson.loads(found[1]) if found else {}
            self._pages = {page_id: (data.get("response") or {}).get("data") or []}
        data = self._pages[page_id]
        return data[row] if row is not None and 0 <= row < len(data) else None

    def _settle(self, rows: Sequence[Claimed], outcome: IngestResult) -> None:
        # The answer passed check_result: every rejection names one distinct row sent.
        bad = {rej.index: rej for rej in outcome.rejected}
        # Plain (series_id, ts, revision) tuples: what a Key holds, built at half the cost.
        acked = [(r.series_id, r.ts, r.revision) for i, r in enumerate(rows) if i not in bad]
        rejected = [
            (Key(rows[i].series_id, rows[i].ts, rows[i].revision), rej.code, rej.message)
            for i, rej in bad.items()
        ]
        # The outcome commits before the next POST (a kill re-delivers at most the batch
        # in flight); marking its rows acked overlaps that POST.
        self.wait_acks()
        self.result.rejected += self.store.record_outcome(acked, rejected)
        self.result.batches += 1
        self.result.sent += len(rows)
        if outcome.accepted:
            self._refused = ("", 0)
        if acked:
            if self._acks is None:
                self._acks = ThreadPoolExecutor(1, thread_name_prefix="outbox-acks")
            self._applying = self._acks.submit(self.store.apply_acks)

    def wait_acks(self) -> None:
        """Wait until the recorded acks are applied to their rows (raises what that raised)."""
        applying, self._applying = self._applying, None
        if applying is not None:
            self.result.acked += applying.result()

    def close(self) -> None:
        """Apply the recorded acks and stop the thread that applies them."""
        try:
            self.wait_acks()
        finally:
            if self._acks is not None:
                self._acks.shutdown(wait=True)
                self._acks = None

    def _dead(self, rows: Sequence[Claimed], code: str, message: str) -> None:
        keys = [(Key(r.series_id, r.ts, r.revision), code, message) for r in rows]
        self.wait_acks()
        self.result.rejected += self.store.record_outcome([], keys)
        self.result.sent += len(rows)

    def defer(self, rows: Sequence[Claimed], exc: SinkTransientError) -> None:
        """Leave ``rows`` pending with a growing, capped next attempt time, or until the
        time GridPulse asked for with ``Retry-After`` when that is later."""
        gp = self.config.gridpulse
        attempts = max((r.attempts for r in rows), default=0)
        delay = min(gp.defer_max_seconds, gp.defer_initial_seconds * (2**attempts))
        # A 500 from a live server may be caused by these rows: they keep their own
        # backoff. Anything else means GridPulse was unreachable or overloaded.
        code = SERVER_ERROR if exc.status in (500, 501, 505) else UNAVAILABLE
        asked = exc.retry_after
        if asked is not None and asked > delay:
            delay, code = min(asked, MAX_ASKED_DEFER), RETRY_AFTER
        when = to_ts(utcnow() + timedelta(seconds=delay))
        if code == RETRY_AFTER:
            self.asked = (delay, when)
        keys = [Key(r.series_id, r.ts, r.revision) for r in rows]
        self.wait_acks()
        self.result.deferred += self.store.defer(keys, when, f"{code}: {exc}", code=code)


@scoped
def run_send(
    config: Config,
    store: Store,
    client: GridPulseClient,
    *,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SendResult:
    """One send run: drain due rows oldest first until none is due or a limit is hit."""
    result = SendResult()
    with file_lock(store.lock_path("send"), blocking=False) as got:
        if not got:
            from outbox.store import lock_holder

            result.skipped = True
            result.holder = lock_holder(store.lock_path("send"))
            return result
        if dry_run:
            now = to_ts(utcnow())
            result.due = store.count_due(now)
            result.waiting, result.waiting_until = store.count_deferred(now)
            return result
        result.run_id = store.start_run("send")
        bind(stage="send", run=result.run_id)
        started = time.monotonic()
        ends_at = clock() + max_seconds if max_seconds is not None else None
        sender = Sender(config, store, client, result, sleep=sleep, clock=clock, ends_at=ends_at)
        try:
            try:
                _drain(store, sender, max_batches, max_seconds, clock)
            finally:
                sender.close()
        except SinkTransientError as exc:
            result.error = f"GridPulse unavailable: {exc}"
            if sender.asked is not None:
                result.error += (
                    f" (Retry-After {sender.asked[0]:g}s, the run's budget had "
                    f"{sender.budget_left:g}s left: deferred until {sender.asked[1]})"
                )
            store.finish_run(result.run_id, "failed", result.counts(), result.error)
            _log_failed("send", result.run_id, started, result.counts(), result.error)
            raise SendFailed(result.error) from None
        except BaseException as exc:
            result.error = _describe(exc)
            store.finish_run(result.run_id, "failed", result.counts(), result.error)
            _log_failed("send", result.run_id, started, result.counts(), result.error)
            raise
        store.finish_run(result.run_id, "ok", result.counts())
    log.info(
        "send done run=%d seconds=%.3f batches=%d requests=%d sent=%d acked=%d rejected=%d"
        " bytes=%d",
        result.run_id,
        time.monotonic() - started,
        result.batches,
        result.requests,
        result.sent,
        result.acked,
        result.rejected,
        result.bytes,
    )
    return result


def _drain(
    store: Store,
    sender: Sender,
    max_batches: int | None,
    max_seconds: float | None,
    clock: Callable[[], float],
) -> None:
    started = clock()
    # Acks a killed send recorded and did not apply: applied before anything is claimed,
    # or their rows would go again in other batches.
    store.apply_acks()
    if store.has_deferred(UNAVAILABLE) and sender.client.health():
        # GridPulse is back: rows deferred only because it was down are due again, so
        # the backlog drains oldest first instead of behind newer rows.
        store.clear_deferred(UNAVAILABLE)
    rounds = 0
    # A worker thread claims and encodes the next batch while this one is posted and its
    # outcome recorded; it claims behind the batch in flight, which stays pending until
    # its outcome commits. Still one batch at a time: the next POST starts only after the
    # previous outcome committed. A pass ends when nothing more is due behind the last
    # batch, or after a 413 or a bisection; a pass that found nothing ends the run.
    while True:
        found = False
        sender.wait_acks()  # a pass claims from the oldest row: the rows acked are not due
        batches = read_ahead(_claims(store, sender), sender.prepare, depth=1)
        try:
            for batch in batches:
                if max_batches is not None and rounds >= max_batches:
                    return
                if max_seconds is not None and clock() - started >= max_seconds:
                    return
                found = True
                rounds += 1
                crashpoint("send.after_claim")
                try:
                    whole = sender.deliver(batch.rows, batch)
                except SinkTransientError as exc:
                    sender.defer(batch.rows, exc)
                    raise
                if not whole:
                    break
        finally:
            batches.close()
        if not found:
            return


def _claims(store: Store, sender: Sender) -> Iterator[list[Claimed]]:
    """Successive batches of due rows, oldest first, each claimed behind the one before."""
    after: tuple[str, str] | None = None
    while rows := store.claim(sender.batch_size, to_ts(utcnow()), after=after):
        yield rows
        after = (rows[-1].ts, rows[-1].series_id)
