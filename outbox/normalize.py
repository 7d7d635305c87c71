"""Pure transform: one page of EIA-930 rows -> GridPulse observations (no I/O here).

Identity follows the GridPulse ingest contract: ``series_id`` is ``EIA.{BA}.{type}`` or
``EIA.{BA}.{type}.{subtype}`` with GridPulse BA codes, ``ts`` is EIA's hour-ending UTC
``period`` as RFC 3339 (``2025-08-22T14`` -> ``2025-08-22T14:00:00Z``: the hour 13:00-14:00).

Every row becomes exactly one of: an observation, an ``invalid[reason]`` count, or a
``duplicates`` count. The work is vectorized: repeated keys (periods, respondent/code
pairs, units) are factorized and decided once per distinct value, values are parsed with
``pandas.to_numeric``; only the revision digest is computed per observation.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from hashlib import blake2b
from operator import itemgetter
from types import ModuleType
from typing import TYPE_CHECKING, Any

from outbox import datasets as table

log = logging.getLogger(__name__)


class _OnFirstUse:
    """A module imported when first used. Every command imports this module (through the
    pipeline), but only fetch normalizes: ``outbox status`` would otherwise spend about
    half a second importing numpy and pandas."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:  # imported once; a page reads dozens of attributes
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)


if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:
    np = _OnFirstUse("numpy")
    pd = _OnFirstUse("pandas")

FUEL_CODES = {
    "COL": "coal",
    "NG": "gas",
    "NUC": "nuclear",
    "OIL": "oil",
    "WAT": "hydro",
    "SUN": "solar",
    "WND": "wind",
    "OTH": "other",
    "UNK": "unknown",
    "BAT": "battery",
    "PS": "pumped_storage",
    "SNB": "solar_battery",
    "WNB": "wind_battery",
    "UES": "unknown_storage",
    "OES": "other_storage",
    "GEO": "geothermal",
}
# EIA-930 codes (respondents, counterparties, types, fuels) are short upper-case
# alphanumerics (PJM, CISO, US48, SNB); "-", "_" and "." (region-data CO2 types) pass too.
EIA_CODE_PATTERN = r"[A-Z0-9][A-Z0-9._-]{0,9}"
UNITS = "MW"
MWH_UNITS = frozenset({"megawatthours", "mwh"})
MAX_ABS_MW = 1e7

# Reasons in priority order: a row failing several checks counts under the first one.
REASONS = (
    "missing_field",
    "bad_code",
    "unknown_type",
    "dataset_not_requested",
    "bad_period",
    "unexpected_respondent",
    "unconfigured_ba",
    "outside_window",
    "unknown_units",
    "non_numeric_value",
    "non_finite_value",
    "negative_demand",
    "out_of_range",
    "future_period",
)
SKIP_REASONS = frozenset({"dataset_not_requested", "unconfigured_ba"})
"""Reasons in ``Normalized.invalid`` that are a deliberate skip, not bad data."""

_PERIOD_PATTERN = r"\d{4}-\d{2}-\d{2}T\d{2}"
_EIA_CODE = re.compile(EIA_CODE_PATTERN)
_NAN_WORDS = frozenset({"nan", "+nan", "-nan"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_HOUR = -1
_NO_LIMIT = 2**63 - 1  # numpy.iinfo(numpy.int64).max
_warned_fuel_codes: set[str] = set()


@dataclass(frozen=True)
class SeriesInfo:
    """What GridPulse needs to create a series, plus where it came from at EIA."""

    series_id: str
    ba: str
    type: str
    subtype: str | None
    units: str
    route: str
    facets: str


@dataclass(frozen=True)
class Normalized:
    """Observations of one page as parallel lists, plus what was dropped and why."""

    series_id: Sequence[str]
    ts: Sequence[str]
    value: Sequence[float | None]
    units: Sequence[str]
    quality_flag: Sequence[str]
    revision: Sequence[str]
    row: Sequence[int]
    series: list[SeriesInfo]
    stream_max: dict[str, str]
    page_max_ts: str | None
    invalid: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    stream_min: dict[str, str] = field(default_factory=dict)
    """stream_key -> oldest valid ts on this page (the counterpart of ``stream_max``)."""
    unconfigured: dict[str, int] = field(default_factory=dict)
    """EIA respondent -> rows skipped as ``unconfigured_ba``."""

    @property
    def count(self) -> int:
        """Number of observations."""
        return len(self.series_id)


def stream_key(dataset: str, respondent: str) -> str:
    """The watermark key of one dataset of one EIA respondent, e.g. ``demand:CISO``."""
    return f"{dataset}:{respondent}"


def revision_of(value: float | None, quality_flag: str, units: str) -> str:
    """Digest of an observation's content; changes exactly when EIA revises it."""
    return _digest(f"{value!r}|{quality_flag}|{units}")


def _digest(text: str) -> str:
    return blake2b(text.encode(), digest_size=8).hexdigest()


@lru_cache(maxsize=1 << 16, typed=True)
def _number_revision(value: float) -> str:
    # Only called with Python floats already normalized (no -0.0, no NaN): safe to cache.
    return _digest(f"{value!r}|good|{UNITS}")


_MISSING_REVISION = _digest(f"{None!r}|missing|{UNITS}")


def fuel_name(code: str) -> str:
    """GridPulse subtype of an EIA fuel code; an unknown code is lower-cased (logged once)."""
    name = FUEL_CODES.get(code)
    if name is not None:
        return name
    if code not in _warned_fuel_codes:
        _warned_fuel_codes.add(code)
        log.warning("unknown EIA fuel code code=%s subtype=%s", code, code.lower())
    return code.lower()


def normalize_page(
    route: str,
    rows: Sequence[dict],
    *,
    ba_codes: Mapping[str, str],
    window: tuple[datetime, datetime] | None = None,
    respondents: Collection[str] | None = None,
    datasets: Collection[str] | None = None,
    latest: Mapping[str, datetime] | None = None,
    configured: Collection[str] | None = None,
) -> Normalized:
    """Turn one page of EIA rows into observations.

    ``ba_codes`` maps EIA codes to GridPulse codes (unmapped codes are kept);
    ``window`` (inclusive, aware), ``respondents`` and ``datasets`` restrict what is
    accepted; ``latest`` maps a dataset to the newest hour a row of it may have (a later
    one is a ``future_period``). With ``configured`` (EIA respondent codes), rows of any
    other respondent are skipped as ``unconfigured_ba`` (for BA-to-BA interchange the
    ``fromba``; the counterparty need not be configured). A respondent, counterparty,
    type or fuel code not shaped like an EIA code (:data:`EIA_CODE_PATTERN`) is a
    ``bad_code``. Within the page, the last row for a ``(series_id, ts)`` wins.
    """
    table.route(route)  # ValueError for an unknown route
    if not rows:
        return _empty()
    frame = _Frame(route, rows)
    allowed = None if respondents is None else frozenset(respondents)
    kept = None if configured is None else frozenset(configured)
    keys = _series_keys(route, frame, ba_codes, datasets, (allowed, kept), latest or {})
    periods = _periods(frame.period)
    reason = _reasons(frame, keys, periods, window)
    norm = _build(keys, periods, reason)
    return _with_unconfigured(norm, frame, reason[0])


class _Frame:
    """The columns of a page, each factorized where values repeat."""

    def __init__(self, route: str, rows: Sequence[dict]) -> None:
        resp_col, code_col = table.route(route).columns
        (period, resp, code, value, units), complete = _columns(
            rows, ("period", resp_col, code_col, "value", "value-units")
        )
        self.size = len(rows)
        self.pair, self.pairs = _factorize_pairs(resp, code)
        self.period = pd.factorize(period)
        self.units = pd.factorize(units)
        self.no_value = (
            np.zeros(self.size, bool)
            if complete
            else np.fromiter(("value" not in r for r in rows), bool, self.size)
        )
        self.raw_value = value


def _columns(rows: Sequence[dict], names: tuple[str, ...]) -> tuple[list[np.ndarray], bool]:
    """Object arrays of the named keys (None where a row lacks one); True if none lacked."""
    try:
        # One list per key (no per-row tuples: those would wake the garbage collector).
        columns = [list(map(itemgetter(name), rows)) for name in names]
        complete = True
    except KeyError:
        columns = [[r.get(name) for r in rows] for name in names]
        complete = False
    return [_objects(column) for column in columns], complete


@dataclass
class _Keys:
    """Per row: series index (-1 = no series) and masks; per series: info, stream."""

    series: np.ndarray
    missing: np.ndarray
    unknown_type: np.ndarray
    not_requested: np.ndarray
    unexpected: np.ndarray
    non_negative: np.ndarray
    bad_code: np.ndarray
    unconfigured: np.ndarray
    info: list[SeriesInfo]
    stream: list[str]
    latest_hour: np.ndarray


@dataclass
class _Periods:
    """Per row: hours since the epoch (-1 = unparseable) and the RFC 3339 ts."""

    hour: np.ndarray
    ts: np.ndarray
    page_max_ts: str | None


def _objects(values: Sequence[object]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _factorize_pairs(
    resp: np.ndarray, code: np.ndarray
) -> tuple[np.ndarray, list[tuple[str, str] | None]]:
    """Index of each row's (respondent, code) pair; -1 where either is missing or empty."""
    r_idx, r_uniq = pd.factorize(resp)
    c_idx, c_uniq = pd.factorize(code)
    r_ok = np.append(np.array([_is_text(v) for v in r_uniq], bool), False)[r_idx]
    c_ok = np.append(np.array([_is_text(v) for v in c_uniq], bool), False)[c_idx]
    combined = np.where(r_ok & c_ok, r_idx.astype(np.int64) * max(len(c_uniq), 1) + c_idx, -1)
    pair, uniq = pd.factorize(combined, use_na_sentinel=False)
    names = [
        None if u < 0 else (r_uniq[u // max(len(c_uniq), 1)], c_uniq[u % max(len(c_uniq), 1)])
        for u in uniq.tolist()
    ]
    return pair, names


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _series_keys(
    route: str,
    frame: _Frame,
    ba_codes: Mapping[str, str],
    datasets: Collection[str] | None,
    allowed: tuple[Collection[str] | None, Collection[str] | None],
    latest: Mapping[str, datetime],
) -> _Keys:
    """Decide series, dataset, stream and filters once per distinct (respondent, code) pair.

    ``allowed`` is (respondents requested, respondents configured); None allows any.
    """
    respondents, configured = allowed
    n = len(frame.pairs)
    info: list[SeriesInfo | None] = [None] * n
    stream = [""] * n
    # missing, unknown type, skipped, unexpected, non-negative, bad code, unconfigured
    flags = np.zeros((7, n), bool)
    limit = np.full(n, _NO_LIMIT, dtype=np.int64)
    for i, pair in enumerate(frame.pairs):
        if pair is None:
            flags[0, i] = True
            continue
        resp, code = pair
        if not (_EIA_CODE.fullmatch(resp) and _EIA_CODE.fullmatch(code)):
            flags[5, i] = True
            continue
        if not table.is_known_code(route, code):
            flags[1, i] = True
            continue
        dataset = table.of_row(route, code)
        flags[2, i] = datasets is not None and dataset not in datasets
        flags[3, i] = respondents is not None and resp not in respondents
        flags[4, i] = table.by_name(dataset).non_negative
        if configured is not None and resp not in configured:
            flags[6, i] = True
            continue
        stream[i] = stream_key(dataset, resp)
        info[i] = _series_info(route, resp, code, dataset, ba_codes)
        if dataset in latest:
            limit[i] = int(latest[dataset].timestamp()) // 3600
    missing, unknown, skipped, unexpected, non_negative, bad, unconfigured = flags[:, frame.pair]
    return _Keys(
        series=np.where(missing | unknown | bad | unconfigured, -1, frame.pair),
        missing=missing,
        unknown_type=unknown,
        not_requested=skipped,
        unexpected=unexpected,
        non_negative=non_negative,
        bad_code=bad,
        unconfigured=unconfigured,
        info=info,  # type: ignore[arg-type]
        stream=stream,
        latest_hour=limit[frame.pair],
    )


def _series_info(
    route: str, resp: str, code: str, dataset: str, ba_codes: Mapping[str, str]
) -> SeriesInfo:
    ba = ba_codes.get(resp, resp)
    by_peer = table.by_name(dataset).subtype == "counterparty"
    peer = ba_codes.get(code, code) if by_peer else code
    return _series_info_of(route, resp, code, dataset, ba, peer)


@lru_cache(maxsize=4096)
def _series_info_of(
    route: str, resp: str, code: str, dataset: str, ba: str, peer: str
) -> SeriesInfo:
    # Cached: every page repeats the same few hundred series (SeriesInfo is immutable).
    ds = table.by_name(dataset)
    respondent_facet, code_facet = table.route(route).columns
    subtype = fuel_name(code) if ds.subtype == "fuel" else peer if ds.subtype else None
    return SeriesInfo(
        series_id=table.series_id(ba, ds.series_type, subtype),
        ba=ba,
        type=ds.series_type,
        subtype=subtype,
        units=UNITS,
        route=route,
        facets=json.dumps({respondent_facet: resp, code_facet: code}, separators=(",", ":")),
    )


def _periods(factorized: tuple[np.ndarray, np.ndarray]) -> _Periods:
    """Parse each distinct period once: exact ``YYYY-MM-DDTHH`` in UTC, else invalid."""
    idx, uniq = factorized
    text = _strings(uniq)
    exact = text.str.fullmatch(_PERIOD_PATTERN, na=False).to_numpy(bool)
    candidates = text.where(exact, "").to_numpy(object)
    when = pd.to_datetime(candidates, format="%Y-%m-%dT%H", errors="coerce", utc=True)
    ok = exact & ~when.isna()
    hours = np.where(ok, when.as_unit("s").asi8 // 3600, -1)
    no_ts = np.array(None, dtype=np.object_)  # numpy's stubs take no bare None as an array
    ts = np.where(ok, candidates + ":00:00Z", no_ts)
    page_max = _format_hour(hours.max()) if ok.any() else None
    hour_of_row = np.append(hours, _NO_HOUR)[idx]
    ts_of_row = np.append(ts, no_ts)[idx]
    return _Periods(hour=hour_of_row, ts=ts_of_row, page_max_ts=page_max)


def _strings(values: Sequence[object] | np.ndarray) -> pd.Series:
    """Object Series of the strings in ``values``, None elsewhere (safe for ``.str``)."""
    return pd.Series([v if isinstance(v, str) else None for v in values], dtype=object)


def _format_hour(hour: int) -> str:
    return (_EPOCH + timedelta(hours=int(hour))).strftime("%Y-%m-%dT%H:00:00Z")


@dataclass
class _Values:
    number: np.ndarray
    missing: np.ndarray
    non_numeric: np.ndarray
    non_finite: np.ndarray


def _values(raw: np.ndarray) -> _Values:
    """Numbers from strings or numbers; None/""/blank is missing, "0" is a real zero.

    JSON ``true``/``false`` are not numbers (pandas would read them as 1 and 0).
    """
    number = pd.to_numeric(raw, errors="coerce").astype(np.float64) + 0.0  # -0.0 -> 0.0
    if bool in set(map(type, raw)):  # rare: look at each row only when there is one
        truth = np.fromiter((v is True or v is False for v in raw), bool, len(raw))
        number[truth] = np.nan
    failed = np.isnan(number)
    missing = np.zeros(len(raw), bool)
    nan_word = np.zeros(len(raw), bool)
    if failed.any():
        odd = pd.Series(raw[failed], dtype=object)
        text = _strings(odd).str.strip().str.lower()
        missing[failed] = (odd.isna() | text.eq("")).to_numpy(bool)
        nan_word[failed] = text.isin(_NAN_WORDS).to_numpy(bool)
    non_finite = np.isinf(number) | nan_word
    non_numeric = failed & ~missing & ~nan_word
    return _Values(number, missing, non_numeric, non_finite)


def _reasons(
    frame: _Frame,
    keys: _Keys,
    periods: _Periods,
    window: tuple[datetime, datetime] | None,
) -> tuple[np.ndarray, _Values]:
    """Per row: 0 for a valid observation, else 1 + the index of its reason in REASONS."""
    values = _values(frame.raw_value)
    unit_idx, unit_uniq = frame.units
    units_ok = np.append([_is_mwh(u) for u in unit_uniq], False).astype(bool)[unit_idx]
    checks = [
        ("missing_field", keys.missing),
        ("bad_code", keys.bad_code),
        ("unknown_type", keys.unknown_type),
        ("dataset_not_requested", keys.not_requested),
        ("missing_field", frame.no_value | (frame.period[0] < 0)),
        ("bad_period", periods.hour < 0),
        ("unexpected_respondent", keys.unexpected),
        ("unconfigured_ba", keys.unconfigured),
        ("outside_window", _outside(periods.hour, window)),
        ("future_period", periods.hour > keys.latest_hour),
        ("unknown_units", ~units_ok),
        ("non_numeric_value", values.non_numeric),
        ("non_finite_value", values.non_finite),
        ("negative_demand", keys.non_negative & (values.number < 0)),
        ("out_of_range", np.abs(values.number) > MAX_ABS_MW),
    ]
    conditions = [mask for _, mask in checks]
    codes = [REASONS.index(name) + 1 for name, _ in checks]
    return np.select(conditions, codes, default=0), values


def _is_mwh(units: object) -> bool:
    return isinstance(units, str) and units.strip().lower() in MWH_UNITS


def _outside(hour: np.ndarray, window: tuple[datetime, datetime] | None) -> np.ndarray:
    if window is None:
        return np.zeros(len(hour), bool)
    start, end = (w.timestamp() for w in window)
    seconds = hour * 3600
    return (hour >= 0) & ((seconds < start) | (seconds > end))


def _build(keys: _Keys, periods: _Periods, reasoned: tuple[np.ndarray, _Values]) -> Normalized:
    """Drop invalid rows and earlier duplicates (last wins); assemble the output lists."""
    reason, values = reasoned
    valid = np.flatnonzero(reason == 0)
    series, hour = keys.series[valid], periods.hour[valid]
    later = pd.Series(series * (1 << 32) + hour).duplicated(keep="last").to_numpy(bool)
    keep = valid[~later]
    return _observations(keys, periods, values, keep, reason, int(later.sum()))


def _observations(
    keys: _Keys,
    periods: _Periods,
    values: _Values,
    keep: np.ndarray,
    reason: np.ndarray,
    duplicates: int,
) -> Normalized:
    series = keys.series[keep]
    ids = np.array([i.series_id if i else "" for i in keys.info], dtype=np.object_)
    missing = values.missing[keep]
    number = values.number[keep].tolist()
    if missing.any():
        value = [None if m else v for v, m in zip(number, missing.tolist(), strict=True)]
        quality = np.where(missing, "missing", "good").tolist()
    else:
        value, quality = number, ["good"] * len(number)
    counts = np.bincount(reason, minlength=len(REASONS) + 1)
    stream_min, stream_max = _stream_bounds(keys, series, periods.hour[keep])
    return Normalized(
        series_id=ids[series].tolist(),
        ts=periods.ts[keep].tolist(),
        value=value,
        units=[UNITS] * len(keep),
        quality_flag=quality,
        revision=_revisions(value),
        row=keep.tolist(),
        series=[keys.info[s] for s in pd.unique(series)],
        stream_max=stream_max,
        page_max_ts=periods.page_max_ts,
        invalid={name: int(c) for name, c in zip(REASONS, counts[1:], strict=True) if c},
        duplicates=duplicates,
        stream_min=stream_min,
    )


def _with_unconfigured(norm: Normalized, frame: _Frame, reason: np.ndarray) -> Normalized:
    """``norm`` with the rows skipped as ``unconfigured_ba`` counted per respondent."""
    if not norm.invalid.get("unconfigured_ba"):
        return norm
    skipped = reason == REASONS.index("unconfigured_ba") + 1
    per_pair = np.bincount(frame.pair[skipped], minlength=len(frame.pairs))
    counts: dict[str, int] = {}
    for i in np.flatnonzero(per_pair).tolist():
        resp = frame.pairs[i][0]  # type: ignore[index]
        counts[resp] = counts.get(resp, 0) + int(per_pair[i])
    return replace(norm, unconfigured=counts)


def _revisions(values: list[float | None]) -> list[str]:
    if None in values:
        return [_MISSING_REVISION if v is None else _number_revision(v) for v in values]
    return list(map(_number_revision, values))  # no missing value: the loop stays in C


def _stream_bounds(
    keys: _Keys, series: np.ndarray, hour: np.ndarray
) -> tuple[dict[str, str], dict[str, str]]:
    """(oldest, newest) valid ts per stream, from per-series extremes."""
    newest = np.full(len(keys.info), -1, dtype=np.int64)
    oldest = np.full(len(keys.info), np.iinfo(np.int64).max, dtype=np.int64)
    np.maximum.at(newest, series, hour)
    np.minimum.at(oldest, series, hour)
    low: dict[str, int] = {}
    high: dict[str, int] = {}
    for s in np.flatnonzero(newest >= 0).tolist():
        key = keys.stream[s]
        high[key] = max(high.get(key, -1), int(newest[s]))
        low[key] = min(low.get(key, int(oldest[s])), int(oldest[s]))
    as_ts = {key: _format_hour(h) for key, h in low.items()}
    return as_ts, {key: _format_hour(h) for key, h in high.items()}


def _empty() -> Normalized:
    return Normalized([], [], [], [], [], [], [], series=[], stream_max={}, page_max_ts=None)
