"""Array helpers of the rules (numpy, on a frame sorted by series and hour)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Per row, the index of the first row of its run of equal ``keys``."""
    import numpy as np

    first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    return np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))


def rolling_median(
    x: np.ndarray,
    starts: np.ndarray,
    window: int,
    min_periods: int,
    lag: int,
    at: np.ndarray | None = None,
) -> np.ndarray:
    """Per row ``i``, the median of the non-NaN ``x[j]`` for ``j`` in ``i - lag - window + 1
    .. i - lag`` within its group (rows from ``starts[i]``), NaN with fewer than
    ``min_periods`` of them: pandas' ``groupby(g)[x].transform(lambda s:
    s.shift(lag).rolling(window, min_periods).median())``, computed on all groups at once.

    With ``at`` (sorted row numbers), only at those rows: the others are NaN.
    """
    import numpy as np

    n = len(x)
    out = np.full(n, np.nan)
    wanted = np.arange(n) if at is None else at
    offsets = np.arange(window) - (window - 1) - lag
    step = max(1, 2_000_000 // max(window, 1))  # rows per block: bounded memory
    for lo in range(0, len(wanted), step):
        rows = wanted[lo : lo + step]
        idx = rows[:, None] + offsets[None, :]
        vals = np.where(idx >= starts[rows][:, None], x[np.clip(idx, 0, None)], np.nan)
        count = np.count_nonzero(~np.isnan(vals), axis=1)
        ordered = np.sort(vals, axis=1)  # NaN last
        pick = np.arange(len(rows))
        low = ordered[pick, np.maximum(count - 1, 0) // 2]
        high = ordered[pick, count // 2]
        med = np.where(count % 2 == 1, low, (low + high) / 2)
        out[rows] = np.where(count >= max(min_periods, 1), med, np.nan)
    return out


def neighbour_residuals(
    sid: np.ndarray, h: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual, has the hour before, has the hour after) per row: ``v - (prev + next) / 2``
    between two neighbours, ``v - (2 prev - prev2)`` for a series' newest hour, else NaN."""
    import numpy as np

    same_prev = np.r_[False, (sid[1:] == sid[:-1]) & (h[1:] == h[:-1] + 1)]
    same_next = np.r_[same_prev[1:], False]
    prev = np.r_[np.nan, v[:-1]]
    nxt = np.r_[v[1:], np.nan]
    # (as long as v: a frame of one row has one "two hours before")
    prev2 = np.r_[np.full(min(2, len(v)), np.nan), v[:-2]]
    same_prev2 = same_prev & np.r_[False, same_prev[:-1]]
    resid = np.where(
        same_prev & same_next,
        v - (prev + nxt) / 2,
        np.where(same_prev2 & ~same_next, v - (2 * prev - prev2), np.nan),
    )
    return resid, same_prev, same_next
