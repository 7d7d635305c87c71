"""The quality rules: pure functions from a frame of observations to findings.

The frame holds the rows around the hours a stage wrote (``Checker`` reads them), one row
per non-missing observation: ``sid`` (series id), ``ba``, ``ds`` (dataset), ``sub``
(subtype: fuel or counterparty), ``h`` (hours since the epoch, hour-ending), ``v`` (MW).
Each rule looks only at the hours of ``scope`` (per BA, the hours written, widened by
what the rule needs) and says which hours it evaluated, so that the engine resolves the
open findings there that it did not find again. docs/quality.md defines each rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from outbox import datasets
from outbox.quality.arrays import group_starts, neighbour_residuals, rolling_median
from outbox.quality.frame import Frame, Scope, in_scope
from outbox.quality.settings import Resolver, Settings
from outbox.timeutil import hour_ts

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


def _ts(h: int) -> str:
    return hour_ts(h)


_in_scope = in_scope


def _evaluated(rule: str, scope: Scope, before: int = 0, after: int = 0) -> list[Evaluated]:
    return [Evaluated(rule, ba, lo - before, hi + after) for ba, (lo, hi) in scope.items()]


def _enabled_bas(rule: str, resolver: Resolver, bas: Iterable[str]) -> dict[str, Settings]:
    out: dict[str, Settings] = {}
    for ba in bas:
        s = resolver.get(rule, None, ba)
        if s.enabled:
            out[ba] = s
    return out


def _by_hour(data: Frame, ds: str) -> pd.Series:
    """One value per (ba, h) in the scope of the BA-level series of dataset ``ds``, on
    :meth:`Frame.key` (an integer per BA and hour, in the order of (ba, h))."""
    import pandas as pd

    part = data.at_hours(ds)
    return pd.Series(part["v"].to_numpy(), index=pd.Index(data.key(part)), name="v")


def _sum_by_hour(data: Frame, part: pd.DataFrame, values: pd.Series) -> pd.Series:
    """``values`` of the rows of ``part`` summed per BA and hour, on :meth:`Frame.key`."""
    return values.groupby(data.key(part)).sum()


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
    data: Frame,
) -> Outcome:
    """Shared body of the identity rules: |measured - expected| beyond a per-BA limit.

    The series are on :meth:`Frame.key` (BA and hour)."""
    import numpy as np

    out = Outcome(evaluated=_evaluated(rule, scope))
    both = measured.to_frame("m").join(expected.to_frame("e"), how="inner")
    if both.empty:
        return out
    both["scale"] = scale.reindex(both.index).abs().fillna(0.0)
    keys = both.index.to_numpy()
    codes, hours = data.split_key(keys)
    present = np.unique(codes)
    bas = _enabled_bas(rule, resolver, [data.bas[c] for c in present])
    if not bas:
        return out
    nan = float("nan")
    tol = np.full(len(data.bas), nan)
    floor = np.full(len(data.bas), nan)
    for i, ba in enumerate(data.bas):
        if ba in bas:
            tol[i], floor[i] = bas[ba].tolerance, bas[ba].min_mw
    limit = (both["scale"].to_numpy() * tol[codes]).clip(min=floor[codes])
    diff = (both["m"] - both["e"]).abs().to_numpy()
    hit = np.flatnonzero(diff > limit)
    m, e = both["m"].to_numpy(), both["e"].to_numpy()
    for i in hit.tolist():
        ba, h = data.bas[codes[i]], int(hours[i])
        row = {"m": m[i], "e": e[i]}
        lo, hi = scope.get(ba, (h + 1, h))
        if not lo <= h <= hi:
            continue
        s = bas[ba]
        text = describe(ba, h, float(row["m"]), float(row["e"]), float(limit[i]))
        out.findings.append(
            _hourly_finding(rule, ba, int(h), s, row["m"], row["e"], text, judged(ba, int(h)))
        )
    return out


class _SeriesOf:
    """(ba, ds) -> its series ids in the frame, read only when a finding needs them."""

    def __init__(self, data: Frame) -> None:
        self.data = data
        self._map: dict[tuple[str, str], list[str]] | None = None

    def get(self, key: tuple[str, str], default: list[str]) -> list[str]:
        if self._map is None:
            first = self.data.firsts()  # one row per series
            rows = self.data.rows
            found: dict[tuple[str, str], list[str]] = {}
            for ba, ds, sid in zip(
                rows["ba"].to_numpy()[first].tolist(),
                rows["ds"].to_numpy()[first].tolist(),
                rows["sid"].to_numpy()[first].tolist(),
                strict=True,
            ):
                found.setdefault((ba, str(ds)), []).append(sid)
            self._map = {k: sorted(v) for k, v in found.items()}
        return self._map.get(key, default)


def balance(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """|NG - D - TI| beyond ``max(min_mw, tolerance * D)`` for a BA and hour."""
    d, ng, ti = (_by_hour(data, ds) for ds in ("demand", "net_generation", "interchange"))
    measured = (ng - d).dropna()
    series = _SeriesOf(data)

    def judged(ba: str, _h: int) -> tuple[str, ...]:
        return tuple(
            sid
            for ds in ("demand", "net_generation", "interchange")
            for sid in series.get((ba, ds), [])
        )

    def describe(ba: str, h: int, m: float, e: float, limit: float) -> str:
        return f"NG - D = {m:g} MW but TI = {e:g} MW (imbalance {m - e:+g} MW, limit {limit:g})"

    return _compare("balance", measured, ti, d, resolver, scope, describe, judged, data)


def interchange_sum(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """TI vs the sum of the BA's BA-to-BA rows, where those rows were staged for the hour."""
    ti = _by_hour(data, "interchange")
    flows = data.at_hours("ba_interchange")
    total = _sum_by_hour(data, flows, flows["v"])
    gross = _sum_by_hour(data, flows, flows["v"].abs())
    series = _SeriesOf(data)

    def judged(ba: str, _h: int) -> tuple[str, ...]:
        return tuple(series.get((ba, "interchange"), []) + series.get((ba, "ba_interchange"), []))

    def describe(ba: str, h: int, m: float, e: float, limit: float) -> str:
        n = int(((flows["ba"] == ba) & (flows["h"] == h)).sum())
        return f"sum of {n} BA-to-BA flows = {m:g} MW but TI = {e:g} MW (limit {limit:g})"

    return _compare("interchange_sum", total, ti, gross, resolver, scope, describe, judged, data)


def fuel_sum(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """Sum of fuel-type generation vs NG, beyond ``max(min_mw, tolerance * NG)``."""
    ng = _by_hour(data, "net_generation")
    fuels = data.at_hours("generation")
    total = _sum_by_hour(data, fuels, fuels["v"])
    series = _SeriesOf(data)

    def judged(ba: str, _h: int) -> tuple[str, ...]:
        return tuple(series.get((ba, "net_generation"), []) + series.get((ba, "generation"), []))

    def describe(ba: str, h: int, m: float, e: float, limit: float) -> str:
        return f"sum of fuels = {m:g} MW but NG = {e:g} MW (limit {limit:g})"

    return _compare("fuel_sum", total, ng, ng, resolver, scope, describe, judged, data)


def antisymmetry(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """A -> B vs -(B -> A) for the same hour when both directions are staged.

    Reported once per pair, at the BA whose code sorts first, on its A -> B series.
    """
    out = Outcome(evaluated=_evaluated("antisymmetry", scope))
    flows = data.at_hours("ba_interchange", either_side=True)[["sid", "ba", "sub", "h", "v"]]
    if flows.empty:
        return out
    back = flows.rename(columns={"ba": "sub", "sub": "ba", "v": "back", "sid": "back_sid"})
    pairs = flows.merge(back, on=["ba", "sub", "h"], how="inner")
    pairs = pairs[(pairs["ba"] < pairs["sub"]) & _pair_in_scope(pairs, scope)]
    if pairs.empty:
        return out
    out.findings.extend(_antisymmetric(pairs, resolver))
    # The pair may have been written from either side: the BA reported holds both.
    others: dict[str, dict[str, None]] = {}
    for sub, ba in zip(pairs["sub"].tolist(), pairs["ba"].tolist(), strict=True):
        others.setdefault(sub, {})[ba] = None
    for ba, (lo, hi) in scope.items():
        for other in others.get(ba, {}):
            out.evaluated.append(Evaluated("antisymmetry", other, lo, hi))
    return out


def _antisymmetric(pairs: pd.DataFrame, resolver: Resolver) -> list[Finding]:
    """The pairs beyond their BA's limit, BA by BA in order of appearance."""
    import numpy as np
    import pandas as pd

    codes, bas = pd.factorize(pairs["ba"])
    settings = [resolver.get("antisymmetry", None, ba) for ba in bas]
    v, back = pairs["v"].to_numpy(), pairs["back"].to_numpy()
    scale = np.maximum(np.abs(v), np.abs(back))
    tol = np.array([s.tolerance for s in settings])[codes]
    floor = np.array([s.min_mw for s in settings])[codes]
    on = np.array([s.enabled for s in settings], dtype=bool)[codes]
    limit = np.maximum(scale * tol, floor)
    hit = np.flatnonzero(on & (np.abs(v + back) > limit))
    hit = hit[np.argsort(codes[hit], kind="stable")]
    sid, bsid = pairs["sid"].to_numpy(), pairs["back_sid"].to_numpy()
    sub, hours = pairs["sub"].to_numpy(), pairs["h"].to_numpy()
    found = []
    for i in hit.tolist():
        ba, s = bas[codes[i]], settings[codes[i]]
        text = (
            f"{ba} -> {sub[i]} = {v[i]:g} MW but {sub[i]} -> {ba} = "
            f"{back[i]:g} MW (expected {-back[i]:g}, limit {limit[i]:g})"
        )
        found.append(
            _hourly_finding(
                "antisymmetry",
                ba,
                int(hours[i]),
                s,
                float(v[i]),
                float(-back[i]),
                text,
                (sid[i], bsid[i]),
                series_id=sid[i],
            )
        )
    return found


def _pair_in_scope(pairs: pd.DataFrame, scope: Scope) -> pd.Series:
    a = _in_scope(pairs, scope)
    b = _in_scope(pairs.assign(ba=pairs["sub"]), scope)
    return a.fillna(False) | b.fillna(False)


def negative_generation(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """A fuel's generation below ``-threshold`` MW (storage and pumped hydro exempt)."""
    out = Outcome(evaluated=_evaluated("negative_generation", scope))
    exempt = resolver.exempt_fuels()
    fuels = data.at_hours("generation")
    rows = fuels[(fuels["v"] < 0) & ~fuels["sub"].isin(exempt)]
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
    describe: Callable[[dict[str, Any], object], str | None],
    before: int,
    after: int,
) -> Outcome:
    out = Outcome(evaluated=_evaluated(rule, scope, before, after))
    shortest = min(resolver.get(rule, ds).window_hours for ds in datasets.names())
    shortest = min([shortest, *(resolver.get(rule, None, ba).window_hours for ba in scope)])
    runs = runs[runs["n"] >= shortest]
    if not runs.empty:  # only the runs that reach the scope's hours, read row by row below
        ends = in_scope(runs.assign(h=runs["end"]), scope, before, 10**9).to_numpy(bool)
        starts = in_scope(runs.assign(h=runs["start"]), scope, 10**9, after).to_numpy(bool)
        runs = runs[ends & starts]
    for r in runs.to_dict("records"):  # plain dicts: iterrows builds a Series a row
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


def repeated_day(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """At least ``window_hours`` (24) consecutive hours each equal to the hour a day before.

    A block that is one constant value is left to flat_line (an idle unit at 0 repeats).
    """
    import numpy as np

    frame = data.rows
    # The row of the same series a day before, by binary search on (series, hour).
    h = frame["h"].to_numpy()
    key = data.starts().astype(np.int64) * (1 << 32) + (h - h.min() if len(h) else h)
    at = np.clip(np.searchsorted(key, key - 24), 0, max(len(key) - 1, 0))
    v = frame["v"].to_numpy()
    flag = (key[at] == key - 24) & (v[at] == v) if len(key) else np.zeros(0, bool)
    runs = _runs(frame, flag)

    def describe(r: dict[str, Any], s: object) -> str | None:
        if r["n"] < s.window_hours or r["distinct"] < 2:  # type: ignore[attr-defined]
            return None
        return (
            f"{int(r['n'])} consecutive hours identical to the same hours a day before"
            f" ({_ts(int(r['start']) - 24)} .. {_ts(int(r['end']) - 24)})"
        )

    # A changed hour changes its own comparison and the one a day later.
    return _series_rule("repeated_day", runs, scope, resolver, describe, 0, 24)


def flat_line(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """The same non-zero value for at least ``window_hours`` consecutive hours."""
    import numpy as np

    frame = data.rows
    starts, h, v = data.starts(), frame["h"].to_numpy(), frame["v"].to_numpy()
    same = np.r_[False, (starts[1:] == starts[:-1]) & (h[1:] == h[:-1] + 1) & (v[1:] == v[:-1])]
    # A run's first hour equals nothing before it; flag it from the hour after it.
    flag = (same | np.r_[same[1:], False]) & (v != 0)
    runs = _runs(frame, flag)

    def describe(r: dict[str, Any], s: object) -> str | None:
        if r["n"] < s.window_hours:  # type: ignore[attr-defined]
            return None
        return f"{r['v']:g} MW for {int(r['n'])} consecutive hours"

    return _series_rule("flat_line", runs, scope, resolver, describe, 1, 1)


def _widest(resolver: Resolver, rule: str) -> int:
    windows = [resolver.get(rule, ds).window_hours for ds in datasets.names()]
    return max(windows)


def spike(data: Frame, scope: Scope, resolver: Resolver) -> Outcome:
    """A single-hour outlier: its residual against its neighbours, as a robust z-score.

    The residual is ``v - (prev + next) / 2`` (``v - (2 prev - prev2)`` for the newest
    hour, re-judged when the next hour arrives); the scale is 1.4826 x the median absolute
    residual over the previous ``window_hours``, floored at ``tolerance`` x the series'
    median level and at ``min_mw``. A spike exceeds ``threshold`` and both neighbours'
    residuals (so the hours around a spike are not spikes themselves).
    """
    import numpy as np
    import pandas as pd

    out = Outcome(evaluated=_evaluated("spike", scope, 1, 2))
    present = [str(ds) for ds in data.rows["ds"].unique()]
    enabled = {ds for ds in present if resolver.get("spike", ds).enabled} | {
        ds for ds in present for ba in scope if resolver.get("spike", ds, ba).enabled
    }
    parts = [data.of(ds) for ds in sorted(enabled)]
    f = pd.concat(parts).sort_index() if len(parts) > 1 else data.rows.iloc[:0]
    f = parts[0] if len(parts) == 1 else f
    if f.empty:
        return out
    sid, v = f["sid"].to_numpy(), f["v"].to_numpy()
    resid, same_prev, same_next = neighbour_residuals(sid, f["h"].to_numpy(), v)
    a = np.abs(resid)
    a_prev, a_next = np.r_[np.nan, a[:-1]], np.r_[a[1:], np.nan]
    local_max = (np.nan_to_num(a_prev) < a) & (np.nan_to_num(a_next) < a)
    local_max &= same_prev & (~same_next | np.r_[same_prev[1:], False])
    local_max &= _in_scope(f, scope, 1, 2).to_numpy()
    # The scale is at least min_mw, so a row whose residual is not above threshold x
    # min_mw (the smallest over the settings in play) cannot be an outlier: the rolling
    # medians are taken only at the rows that can.
    bas = f["ba"].unique()
    settings = (resolver.get("spike", ds, str(ba)) for ds in enabled for ba in bas)
    floor = min((s.threshold * s.min_mw for s in settings if s.enabled), default=0.0)
    if floor > 0:
        local_max &= a > floor * (1 - 1e-9)
    at = np.flatnonzero(local_max)
    window = max(resolver.get("spike", ds).window_hours for ds in enabled)
    starts = group_starts(sid)
    mad = rolling_median(a, starts, window, 6, lag=1, at=at)
    level = rolling_median(np.abs(v), starts, window, 1, lag=0, at=at)
    f = f.assign(r=resid, a=a, mad=mad, lvl=level)
    cand = f[local_max & ~np.isnan(mad)]
    for r, s, scale, z in _outliers(cand, resolver):
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


class _Candidate(Protocol):
    """A spike candidate: one row of the candidate frame (``itertuples``)."""

    ba: str
    sid: str
    h: int
    v: float
    r: float


def _outliers(
    cand: pd.DataFrame, resolver: Resolver
) -> list[tuple[_Candidate, Settings, float, float]]:
    """(row, settings, scale, z) of the spike candidates beyond their threshold, in order."""
    import numpy as np

    if cand.empty:
        return []
    mad, lvl, a = (cand[c].to_numpy() for c in ("mad", "lvl", "a"))
    groups = cand.groupby(["ds", "ba"], observed=True, sort=False).indices
    scale, z = np.full(len(cand), np.nan), np.full(len(cand), np.nan)
    keep = np.zeros(len(cand), dtype=bool)
    settings: dict[int, Settings] = {}
    for (ds, ba), where in groups.items():
        s = resolver.get("spike", str(ds), ba)
        if not s.enabled:
            continue
        sc = np.maximum(np.maximum(1.4826 * mad[where], s.tolerance * lvl[where]), s.min_mw)
        scale[where], z[where] = sc, a[where] / sc
        keep[where] = z[where] > s.threshold
        settings.update(dict.fromkeys(where[keep[where]].tolist(), s))
    hits = np.flatnonzero(keep).tolist()
    rows = list(cand.iloc[hits].itertuples(index=False))
    return [(r, settings[i], float(scale[i]), float(z[i])) for r, i in zip(rows, hits, strict=True)]


FRAME_RULES: dict[str, Callable[[Frame, Scope, Resolver], Outcome]] = {
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
