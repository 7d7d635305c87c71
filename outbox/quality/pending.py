"""Hours staged and not judged yet: the markers of the deferred (warn-only) checks.

With no rule set to quarantine, nothing the checks find changes what a send may claim,
so the frame rules need not run in each page's transaction. Each staging transaction
records instead, per BA, the hours it wrote (:func:`mark`, in that transaction: the
markers commit with the rows or not at all). At the end of the fetch run,
:meth:`outbox.quality.engine.Checker.finish` judges them in a few large vectorized
passes of at most about :data:`CHUNK_ROWS` rows; each pass, in one transaction, stores
its findings, deletes every marker (:func:`clear`) and marks again the hours still to
judge. A kill anywhere leaves the markers of what is not judged, and the next fetch
run judges them: no finding is lost."""

from __future__ import annotations

import sqlite3
from collections import defaultdict

from outbox.quality.frame import Scope
from outbox.timeutil import hour_ts, ts_hour

CHUNK_ROWS = 250_000
"""About how many rows (series x hours, context excluded) one pass reads at most by
default (``quality.pass_rows``): the frame and the rules' arrays stay a few tens of MB
however much a run staged."""

_MARK = "INSERT INTO quality_pending (ba, lo, hi, run_id) VALUES (?, ?, ?, ?)"
_READ = "SELECT id, ba, lo, hi FROM quality_pending ORDER BY id"
_NEWEST = "SELECT coalesce(max(id), 0) FROM quality_pending"
_CLEAR = "DELETE FROM quality_pending WHERE id <= ?"


def mark(cur: sqlite3.Cursor, scopes: list[Scope], run_id: int | None) -> None:
    """Record the runs of hours ``scopes`` hold as staged and not judged."""
    params = [
        (ba, hour_ts(lo), hour_ts(hi), run_id) for scope in scopes for ba, (lo, hi) in scope.items()
    ]
    if params:
        cur.executemany(_MARK, params)


def read(cur: sqlite3.Cursor, gap: int) -> tuple[int, dict[str, list[tuple[int, int]]]]:
    """(the newest marker's id, 0 for none; per BA, the marked runs of hours merged where
    they are at most ``gap`` hours apart)."""
    runs: dict[str, list[tuple[int, int]]] = defaultdict(list)
    newest = 0
    for marker, ba, lo, hi in cur.execute(_READ).fetchall():
        newest = max(newest, marker)
        runs[ba].append((ts_hour(lo), ts_hour(hi)))
    return newest, {ba: merged(r, gap) for ba, r in runs.items()}


def merged(runs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """``runs`` sorted, those at most ``gap`` hours apart joined."""
    ordered = sorted(runs)
    out = [ordered[0]]
    for lo, hi in ordered[1:]:
        if lo - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def chunks(
    runs: dict[str, list[tuple[int, int]]], series: dict[str, int], limit: int = CHUNK_ROWS
) -> list[Scope]:
    """The runs as scopes of at most about ``limit`` rows each (``series``: the
    number of series per BA). A run longer than that is cut in consecutive pieces (each
    piece reads its own context); the pieces are ordered by hour, so that one scope holds
    the same hours of many BAs."""
    pieces: list[tuple[int, str, int]] = []
    for ba, ranges in runs.items():
        width = max(1, limit // max(1, series.get(ba, 1)))
        for lo, hi in ranges:
            for start in range(lo, hi + 1, width):
                pieces.append((start, ba, min(hi, start + width - 1)))
    pieces.sort()
    out: list[Scope] = []
    size = limit
    for lo, ba, hi in pieces:
        rows = series.get(ba, 1) * (hi - lo + 1)
        if size + rows > limit or ba in out[-1]:
            out.append({})
            size = 0
        out[-1][ba] = (lo, hi)
        size += rows
    return out


def newest(cur: sqlite3.Cursor) -> int:
    """The newest marker's id (0 for none)."""
    return int(cur.execute(_NEWEST).fetchone()[0])


def clear(cur: sqlite3.Cursor, newest: int) -> None:
    """Delete the markers a pass judged (every one up to ``newest``)."""
    cur.execute(_CLEAR, (newest,))
