"""Synthetic EIA-930 data in the real EIA API v2 response format.

Rows carry exactly the keys, spellings and types the live API returns (``value`` and
``total`` as strings, ``type-name`` on fuel rows, hour-ending UTC ``period``), so the
client, normalizer, fake server, benchmarks and demo all see realistic input.

Values are deterministic per ``(seed, balancing authority, hour)``: the same hour gets
the same value whatever window it is generated in, and the routes agree (to rounding)
(net generation = demand + total interchange; total interchange = the sum of the BA's
interchange flows; interchange A->B = -(B->A)).

Regenerate the bundled sample with::

    python -m outbox.testing.synth --out outbox/sample/data --start 2025-08-21T00 \
        --hours 24 --seed 0
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from pathlib import Path

import numpy as np
import orjson

from outbox.sample import SAMPLE_HOURS, SAMPLE_START

ROUTE_REGION = "electricity/rto/region-data"
ROUTE_FUEL = "electricity/rto/fuel-type-data"
ROUTE_INTERCHANGE = "electricity/rto/interchange-data"
ROUTES = (ROUTE_REGION, ROUTE_FUEL, ROUTE_INTERCHANGE)

DEFAULT_RESPONDENTS = ("PJM", "CISO", "MISO", "ERCO", "SWPP")
SAMPLE_SEED = 0
MAX_ROWS = 5000
API_VERSION = "2.1.8"
DATE_FORMAT = 'YYYY-MM-DD"T"HH24'
INCOMPLETE_WARNING = {
    "warning": "incomplete return",
    "description": "The API can only return 5000 rows in JSON format.  Please consider "
    "constraining your request with facet, start, or end, or using offset to paginate results.",
}
_SOURCE = "  \n    Source: Form EIA-930\n    Product: Hourly Electric Grid Monitor"
DESCRIPTIONS = {
    ROUTE_REGION: "Hourly demand, day-ahead demand forecast, net generation, and interchange "
    "by balancing authority." + _SOURCE,
    ROUTE_FUEL: "Hourly net generation by balancing authority and energy source." + _SOURCE,
    ROUTE_INTERCHANGE: "Hourly net interchange between balancing authorities." + _SOURCE,
}
# (respondent key, code key) of each route's rows; the name keys follow from them.
ROW_KEYS = {
    ROUTE_REGION: ("respondent", "type"),
    ROUTE_FUEL: ("respondent", "fueltype"),
    ROUTE_INTERCHANGE: ("fromba", "toba"),
}
REGION_TYPE_NAMES = {
    "D": "Demand",
    "DF": "Day-ahead demand forecast",
    "NG": "Net generation",
    "TI": "Total interchange",
}
FUEL_TYPE_NAMES = {
    "BAT": "Battery storage",
    "COL": "Coal",
    "GEO": "Geothermal",
    "NG": "Natural Gas",
    "NUC": "Nuclear",
    "OES": "Other energy storage",
    "OIL": "Petroleum",
    "OTH": "Other",
    "PS": "Pumped storage",
    "SNB": "Solar with integrated battery storage",
    "SUN": "Solar",
    "UES": "Unknown energy storage",
    "UNK": "Unknown",
    "WAT": "Hydro",
    "WNB": "Wind with integrated battery storage",
    "WND": "Wind",
}
BA_NAMES = {
    "AECI": "Associated Electric Cooperative, Inc.",
    "AZPS": "Arizona Public Service Company",
    "BANC": "Balancing Authority of Northern California",
    "BPAT": "Bonneville Power Administration",
    "CEN": "Centro Nacional de Control de Energia",
    "CFE": "Comision Federal de Electricidad",
    "CISO": "California Independent System Operator",
    "CPLE": "Duke Energy Progress East",
    "DUK": "Duke Energy Carolinas",
    "EEI": "Electric Energy, Inc.",
    "EPE": "El Paso Electric Company",
    "ERCO": "Electric Reliability Council of Texas, Inc.",
    "IID": "Imperial Irrigation District",
    "ISNE": "ISO New England",
    "LDWP": "Los Angeles Department of Water and Power",
    "LGEE": "Louisville Gas and Electric Company and Kentucky Utilities Company",
    "MHEB": "Manitoba Hydro",
    "MISO": "Midcontinent Independent System Operator, Inc.",
    "NEVP": "Nevada Power Company",
    "NYIS": "New York Independent System Operator",
    "OVEC": "Ohio Valley Electric Corporation",
    "PACE": "PacifiCorp East",
    "PACW": "PacifiCorp West",
    "PJM": "PJM Interconnection, LLC",
    "PNM": "Public Service Company of New Mexico",
    "PSCO": "Public Service Company of Colorado",
    "SOCO": "Southern Company Services, Inc. - Trans",
    "SPA": "Southwestern Power Administration",
    "SPC": "Saskatchewan Power Corporation",
    "SRP": "Salt River Project Agricultural Improvement and Power District",
    "SWPP": "Southwest Power Pool",
    "TIDC": "Turlock Irrigation District",
    "TVA": "Tennessee Valley Authority",
    "WACM": "Western Area Power Administration - Rocky Mountain Region",
    "WALC": "Western Area Power Administration - Desert Southwest Region",
}
# EIA-930 interchange counterparties of the default five (symmetric where both are listed).
NEIGHBOURS = {
    "PJM": ("CPLE", "DUK", "LGEE", "MISO", "NYIS", "OVEC", "TVA"),
    "CISO": ("AZPS", "BANC", "BPAT", "CFE", "IID", "LDWP", "NEVP", "PACW", "SRP", "TIDC", "WALC"),
    "MISO": ("AECI", "EEI", "LGEE", "MHEB", "PJM", "SOCO", "SPA", "SWPP", "TVA"),
    "ERCO": ("CEN", "SWPP"),
    "SWPP": ("AECI", "EPE", "ERCO", "MISO", "PNM", "PSCO", "SPA", "SPC", "WACM"),
}


@dataclass(frozen=True)
class Profile:
    """Rough shape of one balancing authority: demand band (MW), local UTC offset, mix."""

    low: float
    high: float
    utc_offset: int
    capacity: dict[str, float] = field(default_factory=dict)  # non-dispatchable fuels, MW
    coal_share: float = 0.0  # of the dispatchable remainder; the rest is gas


PROFILES = {
    "PJM": Profile(
        80_000,
        150_000,
        -5,
        {"NUC": 32_000, "SUN": 6_000, "WND": 3_500, "WAT": 1_500, "OTH": 1_500, "OIL": 200},
        0.35,
    ),
    "CISO": Profile(
        20_000,
        40_000,
        -8,
        {
            "NUC": 2_200,
            "SUN": 18_000,
            "WND": 5_000,
            "WAT": 4_000,
            "BAT": 9_000,
            "GEO": 900,
            "OTH": 800,
            "OIL": 20,
        },
    ),
    "MISO": Profile(
        60_000,
        110_000,
        -6,
        {"NUC": 10_000, "SUN": 6_000, "WND": 25_000, "WAT": 1_000, "OTH": 800, "OIL": 100},
        0.5,
    ),
    "ERCO": Profile(
        40_000,
        80_000,
        -6,
        {"NUC": 5_000, "SUN": 20_000, "WND": 38_000, "WAT": 100, "BAT": 6_000, "OTH": 300},
        0.25,
    ),
    "SWPP": Profile(
        25_000,
        50_000,
        -6,
        {"NUC": 1_900, "SUN": 600, "WND": 30_000, "WAT": 1_500, "OTH": 300, "OIL": 50},
        0.45,
    ),
}
_DISPATCHABLE = ("COL", "NG")
_TWO_PI = 2 * math.pi


def make_rows(
    route: str, respondents: Sequence[str], start: datetime, hours: int, *, seed: int = 0
) -> list[dict]:
    """Rows of ``route`` for ``respondents`` over ``hours`` hourly periods from ``start``.

    Sorted by period, then respondent/fromba, then type/fueltype/toba, like the API with
    an explicit sort. Values are integer MWh as strings, as API 2.1.8 returns them.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}")
    epoch_hours = _epoch_hours(start, hours)
    periods = [_period(h) for h in epoch_hours.tolist()]
    series = []
    for ba in sorted(set(respondents)):
        for code, values in sorted(_series_of(route, ba, epoch_hours, seed).items()):
            series.append((ba, code, [str(v) for v in np.rint(values).astype(np.int64).tolist()]))
    return [
        _row(route, periods[i], ba, code, vals[i])
        for i in range(hours)
        for ba, code, vals in series
    ]


def make_pages(
    route: str, rows: Sequence[dict], page_length: int = MAX_ROWS, *, params: dict | None = None
) -> list[dict]:
    """Split ``rows`` into EIA v2 response bodies of at most ``page_length`` rows.

    ``params`` is the echoed ``request.params`` (derived from the rows when omitted,
    never with an api_key); offset and length are filled in per page.
    """
    base = params if params is not None else request_params_for(route, rows)
    total = len(rows)
    offsets = range(0, total, page_length) if total else [0]
    pages = []
    for offset in offsets:
        page_params = {**base, "offset": str(offset), "length": str(page_length)}
        data = list(rows[offset : offset + page_length])
        pages.append(response_body(route, data, total, page_params))
    return pages


def response_body(route: str, data: list[dict], total: int, params: dict) -> dict:
    """One EIA v2 response body, keys in the order the API sends them."""
    response: dict = {
        "total": str(total),
        "dateFormat": DATE_FORMAT,
        "frequency": params.get("frequency", "hourly"),
        "data": data,
        "description": DESCRIPTIONS.get(route, ""),
    }
    if len(data) < total:
        response["warnings"] = [dict(INCOMPLETE_WARNING)]
    return {
        "response": response,
        "request": {"command": f"/v2/{route}/data/", "params": params},
        "apiVersion": API_VERSION,
        "ExcelAddInVersion": "2.1.0",
    }


def request_params_for(route: str, rows: Sequence[dict]) -> dict:
    """The ``request.params`` a client would have sent to get exactly ``rows``."""
    resp_key, code_key = ROW_KEYS[route]
    facets = {resp_key: sorted({r[resp_key] for r in rows})}
    if route == ROUTE_REGION:
        facets[code_key] = sorted({r[code_key] for r in rows})
    periods = [r["period"] for r in rows]
    return {
        "frequency": "hourly",
        "data": ["value"],
        "facets": facets,
        "start": min(periods, default=""),
        "end": max(periods, default=""),
        "sort": [{"column": c, "direction": "asc"} for c in ("period", resp_key, code_key)],
    }


def write_pages(
    directory: Path, route: str, rows: Sequence[dict], page_length: int = MAX_ROWS
) -> list[Path]:
    """Write ``make_pages`` output as ``{route name}-{nnnn}.json`` files (compact JSON)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = route.rsplit("/", 1)[-1]
    paths = []
    for i, page in enumerate(make_pages(route, rows, page_length)):
        path = directory / f"{name}-{i:04d}.json"
        path.write_bytes(orjson.dumps(page))
        paths.append(path)
    return paths


def write_sample(
    directory: Path,
    *,
    start: datetime = SAMPLE_START,
    hours: int = SAMPLE_HOURS,
    respondents: Sequence[str] = DEFAULT_RESPONDENTS,
    seed: int = SAMPLE_SEED,
) -> list[Path]:
    """Write all three routes for ``respondents`` over the window into ``directory``."""
    paths = []
    for route in ROUTES:
        paths += write_pages(
            directory, route, make_rows(route, respondents, start, hours, seed=seed)
        )
    return paths


def read_rows(directory: Path) -> dict[str, list[dict]]:
    """Rows per route from saved response bodies (route from ``request.command``)."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(directory).rglob("*.json")):
        if path.name.endswith(".http-meta.json"):
            continue
        body = orjson.loads(path.read_bytes())
        route = body["request"]["command"].removeprefix("/v2/").removesuffix("/data/")
        rows.setdefault(route, []).extend(body["response"]["data"])
    return rows


def _row(route: str, period: str, ba: str, code: str, value: str) -> dict:
    if route == ROUTE_INTERCHANGE:
        return {
            "period": period,
            "fromba": ba,
            "fromba-name": ba_name(ba),
            "toba": code,
            "toba-name": ba_name(code),
            "value": value,
            "value-units": "megawatthours",
        }
    code_key = ROW_KEYS[route][1]
    names = REGION_TYPE_NAMES if route == ROUTE_REGION else FUEL_TYPE_NAMES
    return {
        "period": period,
        "respondent": ba,
        "respondent-name": ba_name(ba),
        code_key: code,
        "type-name": names.get(code, code),
        "value": value,
        "value-units": "megawatthours",
    }


def ba_name(code: str) -> str:
    """EIA's respondent name for a code (the code itself when unknown here)."""
    return BA_NAMES.get(code, code)


def profile_of(ba: str) -> Profile:
    """The BA's profile; unknown BAs get a stable small one (about 1-20 GW)."""
    if ba in PROFILES:
        return PROFILES[ba]
    unit = _unit_hash(ba)
    low = 1_000 + 12_000 * unit
    capacity = {"WAT": 0.1 * low, "SUN": 0.15 * low, "WND": 0.1 * low, "OTH": 0.02 * low}
    return Profile(low, low * 1.6, -6, capacity)


def _series_of(route: str, ba: str, hours: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    if route == ROUTE_INTERCHANGE:
        return {nb: _flow(ba, nb, hours, seed) for nb in NEIGHBOURS.get(ba, ())}
    region = _region(ba, hours, seed)
    if route == ROUTE_REGION:
        return region
    return _fuels(ba, hours, region["NG"], seed)


def _region(ba: str, hours: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    p = profile_of(ba)
    local = (hours + p.utc_offset) % 24
    shape = 0.5 - 0.5 * np.cos(_TWO_PI * (local - 5) / 24)  # trough 05:00, peak 17:00 local
    demand = (p.low + (p.high - p.low) * shape) * (1 + 0.015 * _noise(seed, ba, "D", hours))
    forecast = demand * (1 + 0.02 * _noise(seed, ba, "DF", hours))
    neighbours = NEIGHBOURS.get(ba, ())
    if neighbours:
        interchange = _flow(ba, neighbours[0], hours, seed)
        for nb in neighbours[1:]:
            interchange = interchange + _flow(ba, nb, hours, seed)
    else:  # no modelled neighbours: a small net flow of its own
        interchange = 0.01 * p.low * _noise(seed, ba, "TI", hours)
    return {"D": demand, "DF": forecast, "NG": demand + interchange, "TI": interchange}


def _flow(a: str, b: str, hours: np.ndarray, seed: int) -> np.ndarray:
    """Flow a -> b in MW (> 0 exports from a); antisymmetric in (a, b)."""
    x, y = sorted((a, b))
    scale = min(max(0.03 * min(profile_of(x).low, profile_of(y).low), 100.0), 3_000.0)
    base = scale * (2 * _unit_hash(f"{seed}:{x}>{y}:base") - 1)
    phase = 24 * _unit_hash(f"{seed}:{x}>{y}:phase")
    wave = 0.4 * scale * np.sin(_TWO_PI * (hours + phase) / 24)
    flow = base + wave + 0.08 * scale * _noise(seed, x, f">{y}", hours)
    return flow if a == x else -flow


def _fuels(ba: str, hours: np.ndarray, net: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    p = profile_of(ba)
    local = (hours + p.utc_offset) % 24
    sun = np.clip(np.sin(np.pi * (local - 6) / 14), 0.0, None)  # 06:00-20:00 local
    out = {code: _fuel(code, cap, ba, hours, local, sun, seed) for code, cap in p.capacity.items()}
    rest = np.maximum(net - sum(out.values(), start=np.zeros(len(hours))), 0.08 * net)
    if p.coal_share:
        out["COL"] = rest * p.coal_share * (0.9 + 0.1 * _noise01(seed, ba, "COL", hours))
    out["NG"] = rest - out.get("COL", 0.0)
    return out


def _fuel(
    code: str,
    capacity: float,
    ba: str,
    hours: np.ndarray,
    local: np.ndarray,
    sun: np.ndarray,
    seed: int,
) -> np.ndarray:
    noise = _noise(seed, ba, code, hours)
    if code == "SUN":
        return capacity * 0.85 * sun * (1 + 0.05 * noise)  # exactly 0 at night
    if code == "WND":
        return _wind(capacity, ba, hours, local, noise, seed)
    if code == "BAT":
        discharge = np.where((local >= 17) & (local <= 21), 0.6, 0.0)
        return capacity * (discharge - 0.5 * sun) + 0.02 * capacity * noise  # < 0 charging
    if code == "WAT":
        return capacity * (0.45 + 0.15 * np.sin(_TWO_PI * (local - 11) / 24) + 0.03 * noise)
    return capacity * (0.9 + 0.02 * noise)  # NUC, GEO, OTH, OIL: near flat


def _wind(
    capacity: float, ba: str, hours: np.ndarray, local: np.ndarray, noise: np.ndarray, seed: int
) -> np.ndarray:
    slow = [_unit_hash(f"{seed}:{ba}:wind:{i}") * _TWO_PI for i in range(2)]
    cf = (
        0.38
        + 0.26 * np.sin(_TWO_PI * hours / 37 + slow[0])
        + 0.16 * np.sin(_TWO_PI * hours / 11 + slow[1])
    )
    cf = cf + 0.04 * noise
    # Calm nights: the plants draw station load, so net generation goes slightly negative.
    station_load = -(0.0005 + 0.001 * np.abs(noise)) * capacity
    night = (local < 6) | (local >= 21)
    return np.where((cf < 0.03) & night, station_load, np.clip(cf, 0.0, 1.0) * capacity)


def _epoch_hours(start: datetime, hours: int) -> np.ndarray:
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    first = int(start.astimezone(UTC).timestamp()) // 3600
    return np.arange(first, first + hours, dtype=np.int64)


def _period(epoch_hour: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(hours=epoch_hour)).strftime("%Y-%m-%dT%H")


_BLOCK = 4096


def _noise(seed: int, ba: str, stream: str, hours: np.ndarray) -> np.ndarray:
    """Standard normal noise fixed per (seed, ba, stream, hour): window-independent."""
    key = _stable_int(f"{ba}:{stream}")
    out = np.empty(len(hours))
    blocks = hours // _BLOCK
    for block in np.unique(blocks).tolist():
        values = np.random.default_rng([seed, key, block]).standard_normal(_BLOCK)
        mask = blocks == block
        out[mask] = values[hours[mask] % _BLOCK]
    return out


def _noise01(seed: int, ba: str, stream: str, hours: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + 0.2 * _noise(seed, ba, stream, hours), 0.0, 1.0)


def _stable_int(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


def _unit_hash(text: str) -> float:
    return _stable_int(text) / 2**64


def _parse_start(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m outbox.testing.synth --out DIR``: write a synthetic sample."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--start", type=_parse_start, default=SAMPLE_START, help="YYYY-MM-DDTHH")
    parser.add_argument("--hours", type=int, default=SAMPLE_HOURS)
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    parser.add_argument("--respondents", default=",".join(DEFAULT_RESPONDENTS))
    args = parser.parse_args(list(argv) if argv is not None else None)
    respondents = [r.strip() for r in args.respondents.split(",") if r.strip()]
    paths = write_sample(
        args.out, start=args.start, hours=args.hours, respondents=respondents, seed=args.seed
    )
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
