"""Reading the rows around the hours a stage wrote into the rules' frame.

The frame holds, per BA of the scope, the rows of the BA's series and of the BA-to-BA
series pointing at it, from ``before`` hours ahead of the first hour written to ``after``
hours past the last (``Checker.context``). A series that two BAs of the scope read (A -> B
with A and B both written) holds the union of the two windows, once.

Each series is read on its own primary-key range (``series_id, ts``), values only when
the range has every hour (the usual case: the hours follow from the first one), and the
frame is assembled from numpy arrays: no Python object per row but the value itself.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

Scope = dict[str, tuple[int, int]]
"""BA -> (first, last) hour written."""

# The first and last hour of a range: two seeks on the primary key (no scan).
_SPAN = """
SELECT (SELECT min(ts) FROM observations WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3),
       (SELECT max(ts) FROM observations WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3)
"""
_VALUES = "SELECT value FROM observations WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3"
_ROWS = """
SELECT CAST(strftime('%s', ts) AS INTEGER) / 3600, value FROM observations
WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3 AND value IS NOT NULL
"""
COLUMNS = ["sid", "ba", "sub", "h", "v", "ds"]


class SeriesInfo(NamedTuple):
    """What the frame says about a series besides its rows."""

    ba: str
    type: str
    sub: str | None
    ds: str


@lru_cache(maxsize=1 << 14)
def _ts(h: int) -> str:
    return datetime.fromtimestamp(h * 3600, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@lru_cache(maxsize=1 << 14)
def _hour(ts: str) -> int:
    when = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(when.timestamp()) // 3600


def windows(
    series: dict[str, SeriesInfo], scope: Scope, context: tuple[int, int]
) -> dict[str, list[tuple[int, int]]]:
    """Per series, the disjoint sorted hour ranges the scope's BAs read of it."""
    pointing: dict[str, list[str]] = defaultdict(list)
    own: dict[str, list[str]] = defaultdict(list)
    for sid, info in series.items():
        own[info.ba].append(sid)
        if info.type == "interchange" and info.sub is not None:
            pointing[info.sub].append(sid)
    wanted: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ba, (lo, hi) in scope.items():
        window = (lo - context[0], hi + context[1])
        for sid in own.get(ba, []) + pointing.get(ba, []):
            wanted[sid].append(window)
    return {sid: _merged(ranges) for sid, ranges in wanted.items()}


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    ranges = sorted(set(ranges))
    out = [ranges[0]]
    for lo, hi in ranges[1:]:
        if lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _read(cur: sqlite3.Cursor, sid: str, lo: int, hi: int) -> tuple[list[int], list[float]]:
    """(hours, values) of a series' non-missing rows in ``lo..hi``."""
    params = (sid, _ts(lo), _ts(hi))
    first, last = cur.execute(_SPAN, params).fetchone()
    if first is None:
        return [], []
    if first.endswith(":00:00Z") and last.endswith(":00:00Z"):
        h0, h1 = _hour(first), _hour(last)
        rows = cur.execute(_VALUES, params).fetchall()
        if len(rows) == h1 - h0 + 1:  # every hour: the hours follow from the first
            values = [v for (v,) in rows]
            if None not in values:
                return list(range(h0, h1 + 1)), values
            hours = [h for h, v in zip(range(h0, h1 + 1), values, strict=True) if v is not None]
            return hours, [v for v in values if v is not None]
    rows = cur.execute(_ROWS, params).fetchall()
    return [h for h, _ in rows], [v for _, v in rows]


class Rows(NamedTuple):
    """A frame's rows as arrays (what a reader hands over; it pickles small): per series
    read, in order, its id and row count; per row, its hour and value."""

    sids: list[str]
    counts: list[int]
    hours: np.ndarray
    values: np.ndarray


def read_rows(
    cur: sqlite3.Cursor,
    series: dict[str, SeriesInfo],
    scope: Scope,
    context: tuple[int, int],
) -> Rows:
    """The rows of ``scope``'s frame (see the module docstring), sorted by (sid, h)."""
    import numpy as np

    hours: list[int] = []
    values: list[float] = []
    sids: list[str] = []
    counts: list[int] = []
    for sid, ranges in sorted(windows(series, scope, context).items()):
        n = 0
        for lo, hi in ranges:
            h, v = _read(cur, sid, lo, hi)
            hours.extend(h)
            values.extend(v)
            n += len(h)
        if n:
            sids.append(sid)
            counts.append(n)
    return Rows(sids, counts, np.array(hours, dtype=np.int64), np.array(values, dtype=np.float64))


def read_frame(
    cur: sqlite3.Cursor,
    series: dict[str, SeriesInfo],
    scope: Scope,
    context: tuple[int, int],
) -> pd.DataFrame | None:
    """The rules' frame for ``scope`` (see the module docstring), sorted by (sid, h)."""
    return to_frame(read_rows(cur, series, scope, context), series)


def to_frame(rows: Rows, series: dict[str, SeriesInfo]) -> pd.DataFrame | None:
    """The rules' frame of ``rows`` (None when there are none)."""
    import numpy as np
    import pandas as pd

    sids, counts = rows.sids, rows.counts
    if not sids:
        return None
    info = [series[s] for s in sids]
    names = sorted({i.ds for i in info})  # the categories pd.Categorical would infer
    number = {name: k for k, name in enumerate(names)}
    codes = np.repeat(np.array([number[i.ds] for i in info], dtype=np.int8), counts)
    ds = pd.Categorical.from_codes(codes, categories=names)
    return pd.DataFrame(
        {
            "sid": np.repeat(np.array(sids, dtype=object), counts),
            "ba": np.repeat(np.array([i.ba for i in info], dtype=object), counts),
            "sub": np.repeat(np.array([i.sub for i in info], dtype=object), counts),
            "h": rows.hours,
            "v": rows.values,
            "ds": ds,
        }
    )


def in_scope(frame: pd.DataFrame, scope: Scope, before: int = 0, after: int = 0) -> pd.Series:
    """Whether each row's hour is in its BA's scope, widened by ``before`` and ``after``
    (False for a BA outside the scope)."""
    import numpy as np
    import pandas as pd

    codes, names = pd.factorize(frame["ba"])
    nan = float("nan")
    bounds = [scope.get(ba, (nan, nan)) for ba in names] + [(nan, nan)]  # code -1: missing
    lo = np.array([b[0] for b in bounds], dtype=float)[codes] - before
    hi = np.array([b[1] for b in bounds], dtype=float)[codes] + after
    h = frame["h"].to_numpy()
    return pd.Series((h >= lo) & (h <= hi), index=frame.index)


class Frame:
    """A scope's frame (``rows``, sorted by sid and hour) and the parts of it the rules
    filter out, each cut once: a dataset's rows, and those at the hours of the scope."""

    def __init__(self, rows: pd.DataFrame, scope: Scope) -> None:
        self.rows = rows
        self.scope = scope
        self._parts: dict[str, pd.DataFrame] | None = None
        self._hours: dict[tuple[str, bool], pd.DataFrame] = {}
        self._starts: np.ndarray | None = None
        self._firsts: np.ndarray | None = None
        self._ba_codes: tuple[np.ndarray, np.ndarray] | None = None
        self.bas: list[str] = sorted(set(rows["ba"].unique()) | set(scope))
        """The BAs of the frame and scope, sorted: :meth:`key` numbers them."""

    def key(self, part: pd.DataFrame) -> np.ndarray:
        """One integer per row for its (ba, h), in the order of (ba, h)."""
        import numpy as np

        codes = self._codes()[0][part.index.to_numpy()]
        keys: np.ndarray = (codes << 32) | part["h"].to_numpy(np.int64)
        return keys

    def split_key(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(BA number, hour) of :meth:`key`'s integers."""
        return keys >> 32, keys & 0xFFFFFFFF

    def of(self, ds: str) -> pd.DataFrame:
        """The rows of dataset ``ds``, in frame order."""
        if self._parts is None:
            grouped = self.rows.groupby("ds", observed=True, sort=False)
            self._parts = {str(name): part for name, part in grouped}
        part = self._parts.get(ds)
        return self.rows.iloc[:0] if part is None else part

    def at_hours(self, ds: str, either_side: bool = False) -> pd.DataFrame:
        """The rows of ``ds`` at hours in the scope of their BA (``either_side``: or of
        their counterparty, for a BA-to-BA row)."""
        import numpy as np

        key = (ds, either_side)
        if key not in self._hours:
            part = self.of(ds)
            pos, h = part.index.to_numpy(), part["h"].to_numpy()
            nan = float("nan")
            # per BA number (and -1: no BA, the last entry), the scope's first and last hour
            bounds = [self.scope.get(ba, (nan, nan)) for ba in self.bas] + [(nan, nan)]
            lo = np.array([b[0] for b in bounds], dtype=float)
            hi = np.array([b[1] for b in bounds], dtype=float)
            ba, sub = self._codes()
            c = ba[pos]
            keep = (h >= lo[c]) & (h <= hi[c])
            if either_side:
                c = sub[pos]
                keep |= (h >= lo[c]) & (h <= hi[c])
            self._hours[key] = part[keep]
        return self._hours[key]

    def _codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row (by position), the number in :attr:`bas` of its BA and of its
        counterparty (-1: none), from each series' first row."""
        import numpy as np

        if self._ba_codes is None:
            first = self.firsts()
            counts = np.diff(np.r_[first, len(self.rows)])
            number = {ba: i for i, ba in enumerate(self.bas)}
            bas = self.rows["ba"].to_numpy()[first].tolist()
            subs = self.rows["sub"].to_numpy()[first].tolist()
            ba = np.array([number[b] for b in bas], dtype=np.int64)
            sub = np.array([number.get(b, -1) if isinstance(b, str) else -1 for b in subs])
            self._ba_codes = np.repeat(ba, counts), np.repeat(sub.astype(np.int64), counts)
        return self._ba_codes

    def firsts(self) -> np.ndarray:
        """The position of each series' first row, in frame order."""
        import numpy as np

        if self._firsts is None:
            starts = self.starts()
            self._firsts = np.flatnonzero(starts == np.arange(len(starts)))
        return self._firsts

    def starts(self) -> np.ndarray:
        """Per row, the index of the first row of its series."""
        from outbox.quality.arrays import group_starts

        if self._starts is None:
            self._starts = group_starts(self.rows["sid"].to_numpy())
        return self._starts
