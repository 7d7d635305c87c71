"""The quality engine: judge the rows a fetch staged.

:class:`Checker` is what :meth:`outbox.store.stage.Staging.stage` calls after its upsert,
inside its transaction. Two ways to judge, by configuration:

* **Some rule quarantines** (``action: quarantine`` anywhere): every rule judges the rows
  in the transaction that stages them, so a row a rule dead-letters is never claimed by
  a send before the check has run. A kill loses the check together with the rows.
* **Every rule warns** (the default): the transaction records, per BA, the hours it wrote
  (:mod:`outbox.quality.pending`) and judges only ``large_revision`` (the revisions it
  just recorded, no frame); :meth:`Checker.finish`, at the end of the fetch run, judges
  every marked hour in a few large passes and deletes the markers in its transaction. A
  kill in between leaves the markers for the next fetch run.

A pass reads the rows around the hours judged (per BA,
:func:`outbox.quality.rules.context_hours` each side, never the whole outbox), runs the
rules, and then, in the same transaction:

* stores each finding, or updates the open one it repeats (``last_seen``, ``end``);
* resolves the open findings in the hours a rule evaluated that it did not find again;
* dead-letters the rows a ``quarantine`` rule judged, among those this stage wrote, with
  code ``QUALITY_<RULE>``; a resolved finding puts its rows back to pending.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from outbox import datasets
from outbox.config import Config
from outbox.crash import crashpoint
from outbox.quality import pending
from outbox.quality.frame import Frame, SeriesInfo, read_frame, to_frame
from outbox.quality.reader import RowReader
from outbox.quality.rules import FRAME_RULES, Evaluated, Finding, Outcome, Scope, context_hours
from outbox.quality.settings import Resolver
from outbox.timeutil import hour_ts, ts_hour

if TYPE_CHECKING:
    import pandas as pd

    from outbox.store.handle import Store

EVERY_HOUR = (-(2**40), 2**40)
REGION_GROUP = frozenset({"demand", "net_generation", "interchange"})

_NEWEST = """
SELECT s.series_id, s.type, s.subtype,
       (SELECT max(o.ts) FROM observations o WHERE o.series_id = s.series_id)
FROM series s WHERE s.ba = ?
"""
_REVISED = """
SELECT series_id, ts, old_value, new_value FROM revisions WHERE id > ? ORDER BY id
"""
_OPEN = """
SELECT id, key, rule, ba, series_id, start, "end" FROM findings
WHERE resolved_at IS NULL AND ba = ?
"""
_INSERT = """
INSERT INTO findings (key, rule, ba, series_id, start, "end", severity, measured, expected,
                      detail, first_seen, last_seen)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)
ON CONFLICT (key) DO UPDATE SET
    "end" = excluded."end", severity = excluded.severity, measured = excluded.measured,
    expected = excluded.expected, detail = excluded.detail, last_seen = excluded.last_seen,
    resolved_at = NULL
"""
_UPDATE = """
UPDATE findings SET "end" = max("end", ?2), severity = ?3, measured = ?4, expected = ?5,
       detail = ?6, last_seen = ?7
WHERE id = ?1
"""
_RESOLVE = "UPDATE findings SET resolved_at = ?2, last_seen = ?2 WHERE id = ?1"
_QUARANTINE = """
UPDATE queue SET state = 'dead', last_error_code = ?1, last_error = ?2,
       next_attempt_at = NULL
WHERE series_id = ?3 AND ts = ?4 AND state = 'pending'
"""
_RELEASE = """
UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = NULL,
       last_error = NULL, last_error_code = NULL
WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3 AND state = 'dead' AND last_error_code = ?4
"""


def dataset_of(type_: str, subtype: str | None) -> str:
    """The dataset of a series from its type and subtype."""
    return datasets.of_series(type_, subtype or None)


def quality_code(rule: str) -> str:
    """The dead-letter code of a row a rule quarantined: ``QUALITY_SPIKE``."""
    return f"QUALITY_{rule.upper()}"


class Checker:
    """Runs the rules on what each stage wrote; counts what it opened and resolved."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.resolver = Resolver(config.quality)
        self.context = context_hours(self.resolver)
        self.deferring = not self.resolver.any_quarantine()
        """Whether the frame rules wait for :meth:`finish` (no rule quarantines)."""
        self.opened = 0
        self.resolved = 0
        self.quarantined = 0
        self._series: dict[str, tuple[str, str]] = {}  # series_id -> (ba, dataset)
        self._info: dict[str, SeriesInfo] = {}
        self._ba_of: dict[str, str] = {}
        self._keys: list[tuple[str, str]] = []
        self._revised_after: int | None = None
        self._run_id: int | None = None
        self._now = ""

    def counts(self) -> dict[str, int]:
        """What the checks did, for ``runs.counts``."""
        return {
            "findings_opened": self.opened,
            "findings_resolved": self.resolved,
            "quarantined": self.quarantined,
        }

    def defer(
        self, keys: list[tuple[str, str]], revised_after: int, run_id: int | None, now: str
    ) -> None:
        """Keep rows a grouped stage wrote for :meth:`flush` (before the group commits)."""
        self._keys.extend(keys)
        if self._revised_after is None:
            self._revised_after = revised_after
        self._run_id, self._now = run_id, now

    def deferred(self) -> bool:
        """Whether deferred rows wait for :meth:`flush`."""
        return bool(self._keys)

    def flush(self, cur: sqlite3.Cursor) -> None:
        """Judge the deferred rows together."""
        keys, self._keys = self._keys, []
        after, self._revised_after = self._revised_after or 0, None
        self.check(cur, keys, after, self._run_id, self._now)

    def check(
        self,
        cur: sqlite3.Cursor,
        keys: list[tuple[str, str]],
        revised_after: int,
        run_id: int | None,
        now: str,
    ) -> None:
        """Judge the rows ``keys`` a stage just wrote, or mark their hours for
        :meth:`finish` (see the module docstring)."""
        if self.deferring:
            self.mark(cur, keys, None, revised_after, run_id, now)
            return
        self._know(cur, set(map(itemgetter(0), keys)))
        scopes = self._scopes(keys)
        outcome = self._judge(cur, scopes)
        _extend(outcome, self._large_revisions(cur, revised_after))
        self._store(cur, outcome, keys, now)

    def mark(
        self,
        cur: sqlite3.Cursor,
        keys: list[tuple[str, str]],
        span: tuple[list[str], str, str] | None,
        revised_after: int,
        run_id: int | None,
        now: str,
    ) -> None:
        """Mark the hours a stage wrote for :meth:`finish`: ``span`` (the page's BAs, its
        first and last hour) when given, else the hours of ``keys``; and judge the
        revisions it recorded (large_revision reads no frame)."""
        if span is not None:
            bas, lo, hi = span
            pending.mark(cur, [dict.fromkeys(bas, (ts_hour(lo), ts_hour(hi)))], run_id)
        elif keys:
            self._know(cur, set(map(itemgetter(0), keys)))
            pending.mark(cur, self._scopes(keys), run_id)
        outcome = self._large_revisions(cur, revised_after)
        if outcome.findings or outcome.evaluated:
            self._store(cur, outcome, [], now)

    def finish(self, store: Store, now: str | None = None) -> None:
        """Judge every hour marked as staged and not judged (this run's, and any a killed
        run left) and delete the markers: one transaction per pass of at most about
        ``quality.pass_rows`` rows, which also re-marks the hours still to judge (a kill
        between passes loses nothing).

        With more than one pass (a backfill, a replay), a reader process
        (:mod:`outbox.quality.reader`) reads the next passes' rows while this one judges
        and stores the current one: reading is half of a pass's CPU. What it reads cannot
        change meanwhile: the run holds the fetch lock, and nothing else writes a value
        (a send changes only delivery state, prune only rows past retention).
        """
        from outbox.timeutil import now_ts

        stamp = now or now_ts()
        # Markers, series and the reader's rows are read on connections of their own: a
        # fetch run calls this after its write groups have committed.
        with store.read() as conn:
            cur = store.cursor(conn)
            newest, runs = pending.read(cur, sum(self.context) + 1)
            if newest:
                self._know(cur, None)
            cur.close()
        if not newest:
            return
        counts: dict[str, int] = defaultdict(int)
        for ba, _ds in self._series.values():
            counts[ba] += 1
        scopes = pending.chunks(runs, counts, self.config.quality.pass_rows)
        # The first pass is read here while the reader starts; it reads the others.
        reader = RowReader.start(store.path, self._info, self.context, scopes[1:])
        try:
            for done, scope in enumerate(scopes, start=1):
                rows = reader.next() if reader is not None and done > 1 else None
                with store.write() as conn:
                    cur = store.cursor(conn)
                    frame = self._frame(cur, scope) if rows is None else to_frame(rows, self._info)
                    self._store(cur, self._judge(cur, [scope], [frame]), [], stamp)
                    pending.clear(cur, newest)  # the markers read, or re-marked by the last pass
                    pending.mark(cur, scopes[done:], None)
                    newest = pending.newest(cur)
                    crashpoint("quality.judged")
                    cur.close()
        finally:
            if reader is not None:
                reader.close()

    def _judge(
        self,
        cur: sqlite3.Cursor,
        scopes: list[Scope],
        frames: list[pd.DataFrame | None] | None = None,
    ) -> Outcome:
        """The frame rules and dropped_series over ``scopes`` (on ``frames``, the scopes'
        frames when already read)."""
        outcome = Outcome()
        for i, scope in enumerate(scopes):
            frame = self._frame(cur, scope) if frames is None else frames[i]
            data = Frame(frame, scope) if frame is not None and not frame.empty else None
            for rule, judge in FRAME_RULES.items():
                if data is not None:
                    _extend(outcome, judge(data, scope, self.resolver))
                else:
                    outcome.evaluated.extend(_whole(rule, scope))
        if scopes:
            _extend(outcome, self._dropped(cur, {ba: r for s in scopes for ba, r in s.items()}))
        return outcome

    # -- reading -------------------------------------------------------------------

    def _know(self, cur: sqlite3.Cursor, sids: Iterable[str] | None) -> None:
        """Read the series table when a series in ``sids`` is new (None: always)."""
        if sids is not None and all(s in self._series for s in sids):
            return
        for sid, ba, type_, sub in cur.execute("SELECT series_id, ba, type, subtype FROM series"):
            ds = dataset_of(type_, sub)
            self._series[sid] = (ba, ds)
            self._ba_of[sid] = ba
            self._info[sid] = SeriesInfo(ba, type_, sub, ds)

    def _scopes(self, keys: list[tuple[str, str]]) -> list[Scope]:
        """The hours written, per BA, as runs of hours that share their context: hours
        further apart than the context (pages of two routes in one write group) are
        judged apart, so that nothing in between is read. The i-th scope holds the i-th
        run of every BA."""
        hours: dict[str, set[str]] = defaultdict(set)
        ba_of = self._ba_of
        # map/zip/set iterate in C: the keys are every row written (200k in a replay group)
        bas = map(ba_of.get, map(itemgetter(0), keys))
        for ba, ts in set(zip(bas, map(itemgetter(1), keys), strict=True)):
            if ba is not None:
                hours[ba].add(ts)
        gap = sum(self.context) + 1
        scopes: list[Scope] = []
        for ba, stamps in hours.items():
            ordered = sorted(ts_hour(ts) for ts in stamps)
            runs, lo, prev = [], ordered[0], ordered[0]
            for h in ordered[1:]:
                if h - prev > gap:
                    runs.append((lo, prev))
                    lo = h
                prev = h
            runs.append((lo, prev))
            for i, run in enumerate(runs):
                if i == len(scopes):
                    scopes.append({})
                scopes[i][ba] = run
        return scopes

    def _frame(self, cur: sqlite3.Cursor, scope: Scope) -> pd.DataFrame | None:
        return read_frame(cur, self._info, scope, self.context)

    def _dropped(self, cur: sqlite3.Cursor, scope: Scope) -> Outcome:
        """dropped_series: a series ``threshold`` hours behind the BA's others of its kind."""
        out = Outcome()
        for ba in scope:
            out.evaluated.append(Evaluated("dropped_series", ba, *EVERY_HOUR))
            groups: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
            for sid, type_, sub, newest in cur.execute(_NEWEST, (ba,)):
                ds = dataset_of(type_, sub)
                if newest is None or ds == "demand_forecast":
                    continue
                group = "region" if ds in REGION_GROUP else ds
                groups[group].append((sid, ds, ts_hour(newest)))
            for members in groups.values():
                newest_of_group = max(m[2] for m in members)
                for sid, ds, newest in members:
                    s = self.resolver.get("dropped_series", ds, ba)
                    behind = newest_of_group - newest
                    if s.enabled and behind > s.threshold:
                        text = (
                            f"no rows after {hour_ts(newest)} while the BA's other {ds} series"
                            f" reach {hour_ts(newest_of_group)} ({behind} h behind)"
                        )
                        out.findings.append(
                            Finding(
                                "dropped_series",
                                ba,
                                sid,
                                newest + 1,
                                newest_of_group,
                                s.severity,
                                "warn",
                                float(behind),
                                s.threshold,
                                text,
                            )
                        )
        return out

    def _large_revisions(self, cur: sqlite3.Cursor, revised_after: int) -> Outcome:
        """large_revision: the revisions this stage recorded, against their old values."""
        out = Outcome()
        revised = cur.execute(_REVISED, (revised_after,)).fetchall()
        if revised:
            self._know(cur, {r[0] for r in revised})
        for sid, ts, old, new in revised:
            known = self._series.get(sid)
            if known is None:
                continue
            ba, ds = known
            h = ts_hour(ts)
            out.evaluated.append(Evaluated("large_revision", ba, h, h, sid))
            s = self.resolver.get("large_revision", ds, ba)
            if not s.enabled or old == new:
                continue
            if old is None or new is None:
                large, text = True, f"revised from {old} to {new}"
            else:
                limit = max(s.min_mw, s.threshold * abs(old))
                large = abs(new - old) > limit
                change = f"{(new - old) / abs(old):+.0%}" if old else "from 0"
                text = f"revised {old:g} -> {new:g} MW ({change}; limit {limit:g} MW)"
            if large:
                out.findings.append(
                    Finding("large_revision", ba, sid, h, h, s.severity, s.action, new, old, text)
                )
                out.findings[-1] = _judging(out.findings[-1], (sid,))
        return out

    # -- writing -------------------------------------------------------------------

    def _store(
        self, cur: sqlite3.Cursor, outcome: Outcome, keys: list[tuple[str, str]], now: str
    ) -> None:
        written: set[tuple[str, str]] | None = None  # built for the first quarantine only
        bas = {e.ba for e in outcome.evaluated} | {f.ba for f in outcome.findings}
        open_by: dict[tuple[str, str], list[list[Any]]] = defaultdict(list)
        for ba in bas:
            for fid, _key, rule, fba, sid, start, end in cur.execute(_OPEN, (ba,)).fetchall():
                open_by[(rule, fba)].append([fid, sid, ts_hour(start), ts_hour(end), False])
        for f in outcome.findings:
            self._put(cur, f, open_by[(f.rule, f.ba)], now)
            if f.action == "quarantine":
                written = set(keys) if written is None else written
                self._quarantine(cur, f, written)
        for e in outcome.evaluated:
            for item in open_by.get((e.rule, e.ba), []):
                fid, sid, start, end, seen = item
                if seen or start > e.hi or end < e.lo:
                    continue
                if e.series_id is not None and sid != e.series_id:
                    continue
                item[4] = True  # resolved once, however many scopes cover it
                cur.execute(_RESOLVE, (fid, now))
                self.resolved += 1
                self._release(cur, e.rule, e.ba, sid, start, end)

    def _put(self, cur: sqlite3.Cursor, f: Finding, open_: list[list[Any]], now: str) -> None:
        values = (f.severity, f.measured, f.expected, f.detail, now)
        for item in open_:
            fid, sid, start, end, _seen = item
            if sid == f.series_id and start <= f.end + 1 and end >= f.start - 1:
                item[4] = True
                cur.execute(_UPDATE, (fid, hour_ts(f.end), *values))
                return
        key = f"{f.rule}|{f.ba}|{f.series_id or ''}|{hour_ts(f.start)}"
        cur.execute(
            _INSERT,
            (key, f.rule, f.ba, f.series_id, hour_ts(f.start), hour_ts(f.end), *values),
        )
        self.opened += 1

    def _quarantine(self, cur: sqlite3.Cursor, f: Finding, written: set[tuple[str, str]]) -> None:
        code = quality_code(f.rule)
        hours = [hour_ts(h) for h in range(f.start, f.end + 1)]
        params = [
            (code, f"{f.rule}: {f.detail}", sid, ts)
            for sid in f.judged
            for ts in hours
            if (sid, ts) in written
        ]
        if params:
            cur.executemany(_QUARANTINE, params)
            self.quarantined += max(cur.rowcount, 0)

    def _release(
        self, cur: sqlite3.Cursor, rule: str, ba: str, sid: str | None, start: int, end: int
    ) -> None:
        if sid is not None:
            related = [sid]
            if rule == "antisymmetry":
                parts = sid.split(".")
                related.append(f"{parts[0]}.{parts[3]}.interchange.{parts[1]}")
        else:
            related = [s for s, (b, _ds) in self._series.items() if b == ba]
        code, lo, hi = quality_code(rule), hour_ts(start), hour_ts(end)
        cur.executemany(_RELEASE, [(s, lo, hi, code) for s in related])


def _extend(into: Outcome, other: Outcome) -> None:
    into.findings.extend(other.findings)
    into.evaluated.extend(other.evaluated)


def _whole(rule: str, scope: Scope) -> list[Evaluated]:
    return [Evaluated(rule, ba, lo, hi) for ba, (lo, hi) in scope.items()]


def _judging(f: Finding, judged: tuple[str, ...]) -> Finding:
    from dataclasses import replace

    return replace(f, judged=judged)
