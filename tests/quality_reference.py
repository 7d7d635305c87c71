"""The quality rules as they were before they were made cheap (outbox/quality/rules.py
at commit d66256b, and the engine's frame query; since then only the dataset list is
read from outbox.datasets): the reference the equivalence tests in
tests/test_quality_equivalence.py hold the current rules and frame to.

The quality rules: pure functions from a frame of observations to findings.

The frame holds the rows around the hours a stage wrote (``Checker`` reads them), one row
per non-missing observation: ``sid`` (series id), ``ba``, ``ds`` (dataset), ``sub``
(subtype: fuel or counterparty), ``h`` (hours since the epoch, hour-ending), ``v`` (MW).
Each rule looks only at the hours of ``scope`` (per BA, the hours written, widened by
what the rule needs) and says which hours it evaluated, so that the engine resolves the
open findings there that it did not find again. docs/quality.md defines each rule.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from outbox.quality.settings import Resolver

if TYPE_CHECKING:
    import pandas as pd

HOURLY = ("balance", "interchange_sum", "antisymmetry", "fuel_sum", "negative_generation")


@dataclass(frozen=True)
class Finding:
    """One thing a rule found: hours ``start..end`` (hours since the epoch)."""

    rule: str
    ba: str
    series_id: str | None
    start: int
    end: int
    severity: str
    action: str
    measured: float | None
    expected: float | None
    detail: str
    judged: tuple[str, ...] = ()
    """The series whose rows at start..end the finding judges (quarantine holds them)."""


@dataclass(frozen=True)
class Evaluated:
    """A rule looked at ``ba``'s hours ``lo..hi``: open findings there not found again hold."""

    rule: str
    ba: str
    lo: int
    hi: int
    series_id: str | None = None
    """Only this series' findings (None: every finding of the rule at the BA)."""


@dataclass
class Outcome:
    """Findings and the scopes they cover."""

    findings: list[Finding] = field(default_factory=list)
    evaluated: list[Evaluated] = field(default_factory=list)


Scope = dict[str, tuple[int, int]]
"""BA -> (first, last) hour written."""


def _ts(h: int) -> str:
    from outbox.timeutil import hour_ts

    return hour_ts(h)


def _in_scope(frame: pd.DataFrame, scope: Scope, before: int = 0, after: int = 0) -> pd.Series:
    lo = frame["ba"].map({ba: r[0] - before for ba, r in scope.items()})
    hi = frame["ba"].map({ba: r[1] + after for ba, r in scope.items()})
    return (frame["h"] >= lo) & (frame["h"] <= hi)


def _evaluated(rule: str, scope: Scope, before: int = 0, after: int = 0) -> list[Evaluated]:
    return [Evaluated(rule, ba, lo - before, hi + after) for ba, (lo, hi) in scope.items()]


def _enabled_bas(rule: str, resolver: Resolver, bas: Iterable[str]) -> dict[str, object]:
    out = {}
    for ba in bas:
        s = resolver.get(rule, None, ba)
        if s.enabled:
            out[ba] = s
    return out


def _by_hour(frame: pd.DataFrame, ds: str) -> pd.Series:
    """One value per (ba, h) of the BA-level series of dataset ``ds`` (no subtype)."""
    rows = frame[(frame["ds"] == ds)]
    return rows.set_index(["ba", "h"])["v"]


def _hourly_finding(
    rule: str,
    ba: str,
    h: int,
    s: object,
    measured: float,
    expected: float,
    detail: str,
    judged: tuple[str, ...],
    series_id: str | None = None,
) -> Finding:
    return Finding(
        rule,
        ba,
        series_id,
        h,
        h,
        s.severity,  # type: ignore[attr-defined]
        s.action,  # type: ignore[attr-defined]
        round(measured, 3),
        round(expected, 3),
        detail,
        judged,
    )


def _compare(
    rule: str,
    measured: pd.Series,
    expected: pd.Series,
    scale: pd.Series,
    resolver: Resolver,
    scope: Scope,
    describe: Callable[[str, int, float, float, float], str],
    judged: Callable[[str, int], tuple[str, ...]],
) -> Outcome:
    """Shared body of the identity rules: |measured - expected| beyond a per-BA limit."""
    out = Outcome(evaluated=_evaluated(rule, scope))
    both = measured.to_frame("m").join(expected.to_frame("e"), how="inner")
    if both.empty:
        return out
    both["scale"] = scale.reindex(both.index).abs().fillna(0.0)
    bas = _enabled_bas(rule, resolver, both.index.get_level_values(0).unique())
    if not bas:
        return out
    idx_ba = both.index.get_level_values(0)
    tol = idx_ba.map({ba: s.tolerance for ba, s in bas.items()})  # type: ignore[attr-defined]
    floor = idx_ba.map({ba: s.min_mw for ba, s in bas.items()})  # type: ignore[attr-defined]
    limit = (both["scale"].to_numpy() * tol.to_numpy(float, na_value=float("nan"))).clip(
        min=floor.to_numpy(float, na_value=float("nan"))
    )
    diff = (both["m"] - both["e"]).abs().to_numpy()
    hit = both[diff > limit]
    limits = dict(zip(both.index, limit, strict=True))
    for (ba, h), row in hit.iterrows():
        lo, hi = scope.get(ba, (h + 1, h))
        if not lo <= h <= hi:
            continue
        s = bas[ba]
        text = describe(ba, int(h), float(row["m"]), float(row["e"]), float(limits[(ba, h)]))
        out.findings.append(
            _hourly_finding(rule, ba, int(h), s, row["m"], row["e"], text, judged(ba, int(h)))
        )
    return out


class _SeriesOf:
    """(ba, ds) -> its series ids in the frame, read only when a finding needs them."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self._map: dict[tuple[str, str], list[str]] | None = None

    def get(self, key: tuple[str, str], default: list[str]) -> list[str]:
        if self._map is None:
            pairs = self.frame[["ba", "ds", "sid"]].drop_duplicates()
            found: dict[tuple[str, str], list[str]] = {}
            for ba, ds, sid in pairs.itertuples(index=False):
                found.setdefault((ba, ds), []).append(sid)
            self._map = {k: sorted(v) for k, v in found.items()}
        return self._map.get(key, default)


def _series_of(frame: pd.DataFrame) -> _SeriesOf:
    return _SeriesOf(frame)


def balance(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """|NG - D - TI| beyond ``max(min_mw, tolerance * D)`` for a BA and hour."""
    d, ng, ti = (_by_hour(frame, ds) for ds in ("demand", "net_generation", "interchange"))
    measured = (ng - d).dropna()
    series = _series_of(frame)

    def judged(ba: str, _h: int) -> tuple[str, ...]:
        return tuple(
            sid
            for ds in ("demand", "net_generation", "interchange")
            for sid in series.get((ba, ds), [])
        )

    def describe(ba: str, h: int, m: float, e: float, limit: float) -> str:
        return f"NG - D = {m:g} MW but TI = {e:g} MW (imbalance {m - e:+g} MW, limit {limit:g})"

    return _compare("balance", measured, ti, d, resolver, scope, describe, judged)


def interchange_sum(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """TI vs the sum of the BA's BA-to-BA rows, where those rows were staged for the hour."""
    ti = _by_hour(frame, "interchange")
    flows = frame[frame["ds"] == "ba_interchange"]
    total = flows.groupby(["ba", "h"])["v"].sum()
    gross = flows["v"].abs().groupby([flows["ba"], flows["h"]]).sum()
    series = _series_of(frame)

    def judged(ba: str, _h: int) -> tuple[str, ...]:
        return tuple(series.get((ba, "interchange"), []) + series.get((ba, "ba_interchange"), []))

    def describe(ba: str, h: int, m: float, e: float, limit: float) -> str:
        n = int(((flows["ba"] == ba) & (flows["h"] == h)).sum())
        return f"sum of {n} BA-to-BA flows = {m:g} MW but TI = {e:g} MW (limit {limit:g})"

    return _compare("interchange_sum", total, ti, gross, resolver, scope, describe, judged)


def fuel_sum(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """Sum of fuel-type generation vs NG, beyond ``max(min_mw, tolerance * NG)``."""
    ng = _by_hour(frame, "net_generation")
    fuels = frame[frame["ds"] == "generation"]
    total = fuels.groupby(["ba", "h"])["v"].sum()
    series = _series_of(frame)

    def judged(ba: str, _h: int) -> tuple[str, ...]:
        return tuple(series.get((ba, "net_generation"), []) + series.get((ba, "generation"), []))

    def describe(ba: str, h: int, m: float, e: float, limit: float) -> str:
        return f"sum of fuels = {m:g} MW but NG = {e:g} MW (limit {limit:g})"

    return _compare("fuel_sum", total, ng, ng, resolver, scope, describe, judged)


def antisymmetry(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """A -> B vs -(B -> A) for the same hour when both directions are staged.

    Reported once per pair, at the BA whose code sorts first, on its A -> B series.
    """
    out = Outcome(evaluated=_evaluated("antisymmetry", scope))
    flows = frame[frame["ds"] == "ba_interchange"][["sid", "ba", "sub", "h", "v"]]
    if flows.empty:
        return out
    back = flows.rename(columns={"ba": "sub", "sub": "ba", "v": "back", "sid": "back_sid"})
    pairs = flows.merge(back, on=["ba", "sub", "h"], how="inner")
    pairs = pairs[(pairs["ba"] < pairs["sub"]) & _pair_in_scope(pairs, scope)]
    if pairs.empty:
        return out
    scale = pairs[["v", "back"]].abs().max(axis=1)
    for ba in pairs["ba"].unique():
        s = resolver.get("antisymmetry", None, ba)
        if not s.enabled:
            continue
        mine = pairs[pairs["ba"] == ba]
        limit = (scale[mine.index] * s.tolerance).clip(lower=s.min_mw)
        hit = mine[(mine["v"] + mine["back"]).abs() > limit]
        for i, r in hit.iterrows():
            text = (
                f"{r['ba']} -> {r['sub']} = {r['v']:g} MW but {r['sub']} -> {r['ba']} = "
                f"{r['back']:g} MW (expected {-r['back']:g}, limit {limit[i]:g})"
            )
            out.findings.append(
                _hourly_finding(
                    "antisymmetry",
                    ba,
                    int(r["h"]),
                    s,
                    r["v"],
                    -r["back"],
                    text,
                    (r["sid"], r["back_sid"]),
                    series_id=r["sid"],
                )
            )
    # The pair may have been written from either side: the BA reported holds both.
    for ba, (lo, hi) in scope.items():
        for other in pairs.loc[pairs["sub"] == ba, "ba"].unique():
            out.evaluated.append(Evaluated("antisymmetry", other, lo, hi))
    return out


def _pair_in_scope(pairs: pd.DataFrame, scope: Scope) -> pd.Series:
    a = _in_scope(pairs, scope)
    b = _in_scope(pairs.assign(ba=pairs["sub"]), scope)
    return a.fillna(False) | b.fillna(False)


def negative_generation(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """A fuel's generation below ``-threshold`` MW (storage and pumped hydro exempt)."""
    out = Outcome(evaluated=_evaluated("negative_generation", scope))
    exempt = resolver.exempt_fuels()
    rows = frame[(frame["ds"] == "generation") & (frame["v"] < 0) & ~frame["sub"].isin(exempt)]
    rows = rows[_in_scope(rows, scope)]
    for r in rows.itertuples(index=False):
        s = resolver.get("negative_generation", "generation", r.ba)
        if s.enabled and r.v < -s.threshold:
            text = f"{r.sub} generation {r.v:g} MW (below -{s.threshold:g} MW)"
            out.findings.append(
                _hourly_finding(
                    "negative_generation",
                    r.ba,
                    int(r.h),
                    s,
                    r.v,
                    -s.threshold,
                    text,
                    (r.sid,),
                    series_id=r.sid,
                )
            )
    return out


def _runs(frame: pd.DataFrame, flag: pd.Series) -> pd.DataFrame:
    """Runs of consecutive hours per series where ``flag`` holds: sid, start, end, n.

    ``frame`` must be sorted by (sid, h).
    """
    import numpy as np
    import pandas as pd

    columns = ["sid", "ba", "ds", "start", "end", "n", "v", "distinct"]
    rows = frame[np.asarray(flag, dtype=bool)]
    if rows.empty:
        return pd.DataFrame(columns=columns).astype({"n": int})
    sid, h = rows["sid"].to_numpy(), rows["h"].to_numpy()
    first = np.r_[True, (sid[1:] != sid[:-1]) | (h[1:] != h[:-1] + 1)]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(rows)] - 1
    n = ends - starts + 1
    v = rows["v"].to_numpy()
    out = pd.DataFrame(
        {
            "sid": sid[starts],
            "ba": rows["ba"].to_numpy()[starts],
            "ds": rows["ds"].to_numpy()[starts],
            "start": h[starts],
            "end": h[ends],
            "n": n,
            "v": v[starts],
        }
    )
    out["distinct"] = [
        len(set(v[a : b + 1].tolist())) if b > a else 1 for a, b in zip(starts, ends, strict=True)
    ]
    return out


def _series_rule(
    rule: str,
    runs: pd.DataFrame,
    scope: Scope,
    resolver: Resolver,
    describe: Callable[[pd.Series, object], str | None],
    before: int,
    after: int,
) -> Outcome:
    out = Outcome(evaluated=_evaluated(rule, scope, before, after))
    from outbox import datasets

    shortest = min(resolver.get(rule, ds).window_hours for ds in datasets.names())
    shortest = min([shortest, *(resolver.get(rule, None, ba).window_hours for ba in scope)])
    for _, r in runs[runs["n"] >= shortest].iterrows():
        if r["ba"] not in scope:
            continue
        lo, hi = scope[r["ba"]]
        if r["end"] < lo - before or r["start"] > hi + after:
            continue
        s = resolver.get(rule, r["ds"], r["ba"])
        text = describe(r, s) if s.enabled else None
        if text is None:
            continue
        out.findings.append(
            Finding(
                rule,
                r["ba"],
                r["sid"],
                int(r["start"]),
                int(r["end"]),
                s.severity,
                s.action,
                float(r["n"]),
                float(s.window_hours),
                text,
                (r["sid"],),
            )
        )
    return out


def repeated_day(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """At least ``window_hours`` (24) consecutive hours each equal to the hour a day before.

    A block that is one constant value is left to flat_line (an idle unit at 0 repeats).
    """
    prev = frame[["sid", "h", "v"]].assign(h=frame["h"] + 24).rename(columns={"v": "prev"})
    joined = frame.merge(prev, on=["sid", "h"], how="left")
    runs = _runs(joined, joined["v"] == joined["prev"])

    def describe(r: pd.Series, s: object) -> str | None:
        if r["n"] < s.window_hours or r["distinct"] < 2:  # type: ignore[attr-defined]
            return None
        return (
            f"{int(r['n'])} consecutive hours identical to the same hours a day before"
            f" ({_ts(int(r['start']) - 24)} .. {_ts(int(r['end']) - 24)})"
        )

    # A changed hour changes its own comparison and the one a day later.
    return _series_rule("repeated_day", runs, scope, resolver, describe, 0, 24)


def flat_line(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """The same non-zero value for at least ``window_hours`` consecutive hours."""
    same = (frame["sid"] == frame["sid"].shift()) & (frame["h"] == frame["h"].shift() + 1)
    same &= frame["v"] == frame["v"].shift()
    # A run's first hour equals nothing before it; flag it from the hour after it.
    flag = same | same.shift(-1, fill_value=False)
    flag &= frame["v"] != 0
    runs = _runs(frame, flag)

    def describe(r: pd.Series, s: object) -> str | None:
        if r["n"] < s.window_hours:  # type: ignore[attr-defined]
            return None
        return f"{r['v']:g} MW for {int(r['n'])} consecutive hours"

    return _series_rule("flat_line", runs, scope, resolver, describe, 1, 1)


def _widest(resolver: Resolver, rule: str) -> int:
    from outbox import datasets

    windows = [resolver.get(rule, ds).window_hours for ds in datasets.names()]
    return max(windows)


def spike(frame: pd.DataFrame, scope: Scope, resolver: Resolver) -> Outcome:
    """A single-hour outlier: its residual against its neighbours, as a robust z-score.

    The residual is ``v - (prev + next) / 2`` (``v - (2 prev - prev2)`` for the newest
    hour, re-judged when the next hour arrives); the scale is 1.4826 x the median absolute
    residual over the previous ``window_hours``, floored at ``tolerance`` x the series'
    median level and at ``min_mw``. A spike exceeds ``threshold`` and both neighbours'
    residuals (so the hours around a spike are not spikes themselves).
    """
    import numpy as np

    out = Outcome(evaluated=_evaluated("spike", scope, 1, 2))
    enabled = {ds for ds in frame["ds"].unique() if resolver.get("spike", ds).enabled} | {
        ds for ds in frame["ds"].unique() for ba in scope if resolver.get("spike", ds, ba).enabled
    }
    f = frame[frame["ds"].isin(enabled)]
    if f.empty:
        return out
    sid = f["sid"].to_numpy()
    h = f["h"].to_numpy()
    v = f["v"].to_numpy()
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
    f = f.assign(r=resid, a=np.abs(resid), level=np.abs(v))
    window = max(resolver.get("spike", ds).window_hours for ds in enabled)
    g = f.groupby("sid", sort=False)
    mad = g["a"].transform(lambda s: s.shift().rolling(window, min_periods=6).median())
    level = g["level"].transform(lambda s: s.rolling(window, min_periods=1).median())
    f = f.assign(mad=mad, lvl=level)
    a_prev = np.r_[np.nan, f["a"].to_numpy()[:-1]]
    a_next = np.r_[f["a"].to_numpy()[1:], np.nan]
    local_max = (np.nan_to_num(a_prev) < f["a"].to_numpy()) & (
        np.nan_to_num(a_next) < f["a"].to_numpy()
    )
    local_max &= same_prev & (~same_next | np.r_[same_prev[1:], False])
    cand = f[local_max & _in_scope(f, scope, 1, 2).to_numpy() & f["mad"].notna().to_numpy()]
    for r in cand.itertuples(index=False):
        s = resolver.get("spike", r.ds, r.ba)
        if not s.enabled:
            continue
        scale = max(1.4826 * r.mad, s.tolerance * r.lvl, s.min_mw)
        z = r.a / scale
        if z <= s.threshold:
            continue
        text = (
            f"{r.v:g} MW, {r.r:+g} MW from its neighbours: robust z {z:.1f} "
            f"(threshold {s.threshold:g}, scale {scale:.0f} MW over {s.window_hours} h)"
        )
        out.findings.append(
            Finding(
                "spike",
                r.ba,
                r.sid,
                int(r.h),
                int(r.h),
                s.severity,
                s.action,
                round(float(r.v), 3),
                round(float(r.v - r.r), 3),
                text,
                (r.sid,),
            )
        )
    return out


FRAME_RULES: dict[str, Callable[[pd.DataFrame, Scope, Resolver], Outcome]] = {
    "balance": balance,
    "interchange_sum": interchange_sum,
    "antisymmetry": antisymmetry,
    "fuel_sum": fuel_sum,
    "repeated_day": repeated_day,
    "flat_line": flat_line,
    "spike": spike,
    "negative_generation": negative_generation,
}


def context_hours(resolver: Resolver) -> tuple[int, int]:
    """Hours of rows (before, after) the written ones that the frame rules need: a
    repeated day's comparisons reach a day back past a run of ``window_hours``, a flat
    line's run its window either way, a spike's scale its window back (and 2 h on)."""
    repeated, flat = _widest(resolver, "repeated_day"), _widest(resolver, "flat_line")
    before = max(repeated + 24, flat, _widest(resolver, "spike") + 3)
    after = max(24, flat, 2)
    return before, after


_FRAME = """
SELECT s.series_id, s.ba, s.type, s.subtype, CAST(strftime('%s', o.ts) AS INTEGER) / 3600, o.value
FROM series s CROSS JOIN observations o
    ON o.series_id = s.series_id AND o.ts >= ?2 AND o.ts <= ?3
WHERE (s.ba = ?1 OR (s.type = 'interchange' AND s.subtype = ?1)) AND o.value IS NOT NULL
"""


def frame(cur: sqlite3.Cursor, scope: Scope, context: tuple[int, int]) -> pd.DataFrame | None:
    """The engine's frame of the rows around ``scope`` (Checker._frame at d66256b)."""
    import pandas as pd

    from outbox.timeutil import hour_ts

    rows = []
    for ba, (lo, hi) in scope.items():
        bounds = (hour_ts(lo - context[0]), hour_ts(hi + context[1]))
        rows.extend(cur.execute(_FRAME, (ba, *bounds)).fetchall())
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["sid", "ba", "type", "sub", "h", "v"])
    frame = frame.drop_duplicates(["sid", "h"])
    ds = frame["type"].where(frame["type"] != "interchange", "interchange")
    ds = ds.mask((frame["type"] == "interchange") & frame["sub"].notna(), "ba_interchange")
    frame = frame.assign(ds=ds.astype("category")).drop(columns="type")
    return frame.sort_values(["sid", "h"], kind="stable").reset_index(drop=True)
