"""Staging pages: each page in one transaction with the watermark advances it earns.

One rule for live and replayed pages (:func:`continues` + :func:`advanced`): a stream's
watermark moves to the newest hour read when what was read continues what is known of
the stream, and a page that is not the last of its request stops an hour short (the
other rows of its newest hour may be on the next page). A live page knows what was asked
(the window start); a replayed page only what it holds (its oldest row per stream, and
what the page before it in the same request reached). :mod:`outbox.stages.fetch` runs
the :class:`Fetcher` in each mode.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from outbox.config import Config
from outbox.crash import crashpoint
from outbox.errors import SourceFatalError
from outbox.normalize import SKIP_REASONS, Normalized, normalize_page
from outbox.ports import Page, Source, iter_requests
from outbox.preload import preload
from outbox.readahead import SharedFlag, can_fork, forked_read_ahead, read_ahead
from outbox.stages.plan import Window, asked_cutoffs, known_through, latest_hours
from outbox.stages.prepared import (
    READ_AHEAD,
    Prepared,
    detach,
    digest_context,
    encode,
    known,
    page_digest,
    recalled,
    summary_of,
    unknown,
)
from outbox.store import PageRecord, ProgressUpdate, RowBatch, Store, WatermarkUpdate
from outbox.timeutil import HOUR, parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)


@dataclass
class FillCounts:
    """What a ``fetch --fill-gaps`` run did besides fetching."""

    gap_hours: int = 0
    windows: int = 0
    checked: int = 0

    @property
    def filled(self) -> int:
        """Gap hours that are staged now."""
        return self.gap_hours - self.checked


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
    fill: FillCounts | None = None
    """A ``--fill-gaps`` run's gap counts (None for every other mode)."""

    def counts(self) -> dict[str, Any]:
        """The counts as stored in ``runs.counts``."""
        out = {
            "requests": self.requests,
            "pages": self.pages,
            "rows": self.rows,
            "written": self.written,
            "duplicates": self.duplicates,
            "invalid": invalid_count(self.invalid),
            "invalid_by_reason": {k: v for k, v in self.invalid.items() if k not in SKIP_REASONS},
            "skipped": sum(v for k, v in self.invalid.items() if k in SKIP_REASONS),
            "skipped_by_reason": {k: v for k, v in self.invalid.items() if k in SKIP_REASONS},
            **(self.quality.counts() if self.quality is not None else {}),
        }
        if self.fill is not None:
            out.update(
                mode="fill_gaps",
                gap_hours=self.fill.gap_hours,
                filled=self.fill.filled,
                checked=self.fill.checked,
            )
        return out


def continues(start: datetime, edge: str | None, *, new: bool) -> bool:
    """Whether what was read from ``start`` continues what is known of a stream.

    It does when it starts at most an hour after ``edge`` (the stream's watermark, or how
    far it is known otherwise); with nothing known, ``new`` decides (an incremental
    fetch or a replay starts a stream, a backfill does not).
    """
    return new if edge is None else start <= parse_ts(edge) + HOUR


def advanced(newest: str, cap: str | None, mark: str | None) -> str | None:
    """A continuing stream's new watermark: the newest hour read, no later than ``cap``
    (None: no cap; "": a page with no rows, which moves nothing), when past ``mark``."""
    last = newest if cap is None else min(newest, cap)
    return last if last and (mark is None or last > mark) else None


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
        # Replayed pages staged whole before, by digest (a replay of unchanged pages).
        self._known: set[str] = set()
        self._context = b""

    def stage_window(
        self, source: Source, window: Window, *, backfill: bool, advance: bool = True
    ) -> None:
        """Fetch every page of one window and stage each (:meth:`stage_windows`)."""
        self.stage_windows(source, [window], backfill=backfill, advance=advance)

    def stage_windows(
        self,
        source: Source,
        windows: Sequence[Window],
        *,
        backfill: bool,
        advance: bool = True,
        done: Callable[[int], None] | None = None,
    ) -> None:
        """Fetch every page of each window and stage each with its watermark advance.

        The source may have several requests in flight (:func:`~outbox.ports.iter_requests`);
        pages still arrive, and are staged here one transaction each, in window order and
        page order. ``done(i)`` runs once window ``i``'s last page is staged.

        The window's last page also records, for each of its streams, that EIA answered
        the window completely (:meth:`_asked`), in the same transaction.
        ``advance=False`` (gap fills) stages the rows and never moves a watermark or the
        stream progress. A window of older history (``window.history_from``) moves no
        watermark either: its last page moves its streams' history markers instead.
        """
        seen: dict[int, dict[str, str]] = {}
        if windows:
            preload()  # normalize's pandas, imported while the first answers are awaited
        requests = [window.request() for window in windows]
        pages = iter_requests(source, requests)
        with closing(pages):
            for index, page in pages:
                window = windows[index]
                self._stage_live(
                    page,
                    window,
                    requests[index].respondents,
                    seen.setdefault(index, {}),
                    backfill=backfill or window.history_from is not None,
                    advance=advance,
                )
                if page.last:
                    seen.pop(index, None)
                    if done is not None:
                        done(index)

    def _stage_live(
        self,
        page: Page,
        window: Window,
        respondents: Sequence[str],
        seen: dict[str, str],
        *,
        backfill: bool,
        advance: bool,
    ) -> None:
        """Stage one page of ``window``; ``seen`` is the newest hour per stream so far."""
        crashpoint("fetch.page_fetched")
        self.result.requests += 1
        datasets = {s.dataset for s in window.streams}
        norm = self._normalize(page, (window.start, window.end), respondents, datasets)
        for key, ts in norm.stream_max.items():
            if ts > seen.get(key, ""):
                seen[key] = ts
        # Rows come sorted by period: once a page ends at hour H, every row before H has
        # been seen; only the last page completes the window.
        cap = None if page.last else _minus_hour(norm.page_max_ts)
        updates = self._advances(window, seen, cap, backfill=backfill) if advance else []
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

    def stage_replay(self, source: Source) -> None:
        """Stage every page of a source of saved pages (the route from each body).

        A stream's watermark advances when a page continues it (its oldest row is at most
        an hour after the watermark, or after what the previous page of the same request
        reached). A page that is not the last of its request stops one hour short of its
        newest period: the other rows of that hour may be on the next page.
        """
        carry: tuple[Page, dict[str, str]] | None = None
        datasets = self.config.enabled_datasets()
        self._context = digest_context(self.ba_codes, self.configured, datasets)
        self._known = self.store.staging.known_digests()
        pages = source.iter_pages(None)
        if self.config.eia.replay_read_ahead == "process" and can_fork():
            # Only the checks' end-of-run pass needs pandas here: it is imported once the
            # child has started (never before a fork), while this process would wait.
            checks = self.store.staging.checker is not None
            prepared_pages = forked_read_ahead(
                pages, self._prepare_detached, READ_AHEAD, meanwhile=preload if checks else None
            )
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
        self, prepared: Prepared, carry: tuple[Page, dict[str, str]] | None
    ) -> tuple[Page, dict[str, str]] | None:
        """Stage one replayed page; returns what the next page of its request continues."""
        prepared = self._recall(prepared)
        page, norm, record, rows = prepared[:4]
        crashpoint("fetch.page_fetched")
        reach = dict(self.marks)
        if carry is not None and _continues(carry[0], page):
            for key, ts in carry[1].items():
                reach[key] = max(reach.get(key, ts), ts)
        cap = None if page.last else _minus_hour(norm.page_max_ts)
        reached, updates = {}, []
        for key, newest in norm.stream_max.items():
            oldest = norm.stream_min.get(key, newest)
            if not continues(parse_ts(oldest), reach.get(key), new=True):
                continue
            reached[key] = newest
            last_ts = advanced(newest, cap, self.marks.get(key))
            if last_ts is not None:
                dataset, respondent = key.split(":", 1)
                updates.append(WatermarkUpdate(key, dataset, respondent, page.route, last_ts))
        summary = None if prepared.known else summary_of(norm, self.latest)
        remember = (
            None if prepared.digest is None or summary is None else (prepared.digest, summary)
        )
        self._stage(page, norm, updates, (record, rows), remember=remember)
        return None if page.last else (page, reached)

    def _recall(self, prepared: Prepared) -> Prepared:
        """A known page with its normalized summary, or prepared in full after all (a row
        was revised or pruned since it was remembered: the digest no longer vouches)."""
        if not prepared.known or prepared.digest is None:
            return prepared
        summary = self.store.staging.known_page(prepared.digest)
        norm = None if summary is None else recalled(summary, self.latest)
        if norm is None:
            return self._prepare_replay(unknown(prepared.page), remembered=False)
        self._check_invalid(prepared.page, norm)
        return prepared._replace(norm=norm)

    def _prepare_replay(self, page: Page, *, remembered: bool = True) -> Prepared:
        """Normalize and encode one replayed page (runs on the read-ahead worker); a page
        staged whole before is only recognized (:func:`~outbox.stages.prepared.known`)."""
        digest = page_digest(page, self._context) if self._context else None
        if remembered and digest in self._known:
            return known(page, digest)
        respondents = _param_list(page.params, ("respondent", "fromba"))
        norm = self._normalize(page, None, respondents or None, None, configured=self.configured)
        record, rows = encode(page, norm, precompress=bool(self._writing))
        return Prepared(page, norm, record, rows, digest)

    def _prepare_detached(self, page: Page) -> Prepared:
        """:meth:`_prepare_replay` for a read-ahead process: only what the stage reads."""
        return detach(self._prepare_replay(page))

    def _normalize(
        self,
        page: Page,
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
        self._check_invalid(page, norm)
        return norm

    def _check_invalid(self, page: Page, norm: Normalized) -> None:
        """SourceFatalError for a page with more invalid rows than ``eia.max_invalid_fraction``."""
        invalid = invalid_count(norm.invalid)
        considered = invalid + norm.count + norm.duplicates
        if considered and invalid / considered > self.config.eia.max_invalid_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(norm.invalid.items()))
            raise SourceFatalError(
                f"{page.route} page {page.page_no} (offset {page.offset}): {invalid} of "
                f"{considered} rows invalid ({reasons}); nothing from this page was staged"
            )

    def _advances(
        self, window: Window, seen: dict[str, str], cap: str | None, *, backfill: bool
    ) -> list[WatermarkUpdate]:
        out = []
        for s in window.streams:
            newest = seen.get(s.key)
            if newest is None:
                continue
            mark = self.marks.get(s.key)
            if not continues(window.start, mark, new=not backfill):
                continue
            last_ts = advanced(newest, cap, mark)
            if last_ts is not None:
                out.append(WatermarkUpdate(s.key, s.dataset, s.respondent, s.route, last_ts))
        return out

    def _asked(self, window: Window, *, backfill: bool) -> list[ProgressUpdate]:
        """Progress records for a window EIA has answered completely (its last page).

        Each stream is recorded through the window's end, but never past its dataset's
        cutoff (:func:`~outbox.stages.plan.asked_cutoffs`), and only when the window
        continues what is known of the stream (it starts at most an hour after the
        stream's watermark or progress; an incremental run also starts a stream nothing
        is known of), the same rule as for a watermark.
        """
        out = []
        for s in window.streams:
            through = min(to_ts(window.end), self.cutoffs[s.dataset])
            if through < to_ts(window.start):
                continue  # the window lies wholly within the publication lag
            known = known_through(s.key, self.marks, self.progress)
            if not continues(window.start, known, new=not backfill):
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
        (:func:`~outbox.stages.plan.plan_history`), in the transaction that stages the
        first rows and their watermark.
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

    def _stage(
        self,
        page: Page,
        norm: Normalized,
        updates: list[WatermarkUpdate],
        prepared: tuple[PageRecord, RowBatch] | None = None,
        *,
        progress: Sequence[ProgressUpdate] = (),
        history: dict[str, str | None] | None = None,
        remember: tuple[str, str] | None = None,
    ) -> None:
        record, rows = prepared or encode(page, norm)
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
            hours=_page_hours(norm),
            remember=remember,
        )
        # Pages staged ahead are compressed ahead too while pages keep bringing new rows
        # (a backfill); while they bring nothing new (a re-run) the page is never stored.
        self._writing.set(staged.written > 0)
        self._remember(updates, progress, history or {})
        # A replay's pages share a transaction: they count once it commits, so a run that
        # fails (a full disk rolls the whole transaction back) never claims their rows.
        self.store.on_commit(lambda: self._count(page, norm, staged.written))

    def _remember(
        self,
        updates: Sequence[WatermarkUpdate],
        progress: Sequence[ProgressUpdate],
        history: dict[str, str | None],
    ) -> None:
        for u in updates:
            self.marks[u.stream] = u.last_ts
        for p in progress:
            self.progress[p.stream] = p.asked_through
        for stream, before in history.items():
            if before is None:
                self.history.pop(stream, None)
            else:
                self.history[stream] = before

    def _count(self, page: Page, norm: Normalized, written: int) -> None:
        result = self.result
        result.pages += 1
        result.rows += norm.count
        result.written += written
        result.duplicates += norm.duplicates
        result.invalid.update(norm.invalid)
        result.unconfigured.update(norm.unconfigured)
        log.debug(
            "page staged route=%s page=%d rows=%d written=%d invalid=%d duplicates=%d",
            page.route,
            page.page_no,
            norm.count,
            written,
            invalid_count(norm.invalid),
            norm.duplicates,
        )


def invalid_count(counts: dict[str, int]) -> int:
    """Rows rejected as bad data (rows merely not asked for are not counted)."""
    return sum(v for k, v in counts.items() if k not in SKIP_REASONS)


def _minus_hour(ts: str | None) -> str | None:
    return to_ts(parse_ts(ts) - HOUR) if ts else ""


def _continues(before: Page, page: Page) -> bool:
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


def _page_hours(norm: Normalized) -> tuple[str, str] | None:
    """The first and last hour of a page's valid rows (None: it has none)."""
    if not norm.stream_min or not norm.stream_max:
        return None
    return min(norm.stream_min.values()), max(norm.stream_max.values())
