"""The one table of datasets: what each is at EIA, how its series are named, how it is fetched.

A dataset is a row of :data:`TABLE`; config validation, request planning, normalization,
gaps, status grouping and series naming all read it through the lookups below, so that
adding a dataset is adding a row (and a normalizer case only if its rows have a new shape).
The table's order is the canonical one: config listings, request facets, status and report
groups follow it. Pure: no I/O, and nothing of the package is imported.

Series naming follows the GridPulse ingest contract: ``EIA.{BA}.{type}`` or
``EIA.{BA}.{type}.{subtype}`` with the GridPulse BA code. A dataset's ``subtype`` says
where the subtype comes from: nowhere (region-data types), the fuel (``generation.solar``)
or the counterparty (``interchange.MISO``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Subtype = Literal["fuel", "counterparty"]
Horizon = Literal["now", "forecast"]


@dataclass(frozen=True)
class Route:
    """One EIA v2 route: the facet naming each row's respondent and the one naming its code."""

    path: str
    respondent_facet: str
    code_facet: str

    @property
    def columns(self) -> tuple[str, str]:
        """(respondent column, code column) of the route's rows."""
        return self.respondent_facet, self.code_facet


@dataclass(frozen=True)
class Dataset:
    """One dataset: where it lives at EIA and how its rows become GridPulse series."""

    name: str
    route: str
    code: str | None
    """The route's code facet value of this dataset (region-data ``type``: D, DF, ...);
    None: every code of the route (each fuel, each counterparty) is this dataset."""
    series_type: str
    """GridPulse series type (``EIA.{BA}.{series_type}...``)."""
    subtype: Subtype | None
    """Where a series' subtype comes from: the fuel code, the counterparty, or none."""
    non_negative: bool
    """Sign rule: a negative value is refused as ``negative_demand``."""
    publication_lag_hours: int
    """Hours after which EIA usually has published an hour (eia-v2.md "Publication lag")."""
    lookback_hours: int
    """Default hours re-fetched behind the watermark, for revisions."""
    horizon: Horizon
    """"now": rows reach the current hour; "forecast": up to ``eia.forecast_horizon_hours``."""
    title: str
    """What EIA and the report call it."""


REGION = Route("electricity/rto/region-data", "respondent", "type")
FUEL = Route("electricity/rto/fuel-type-data", "respondent", "fueltype")
INTERCHANGE = Route("electricity/rto/interchange-data", "fromba", "toba")
ROUTES: tuple[Route, ...] = (REGION, FUEL, INTERCHANGE)

# fmt: off
TABLE: tuple[Dataset, ...] = (
    Dataset("demand", REGION.path, "D", "demand", None, True, 2, 72, "now", "Demand"),
    Dataset("demand_forecast", REGION.path, "DF", "demand_forecast", None, True, 0, 72,
            "forecast", "Day-ahead demand forecast"),
    Dataset("net_generation", REGION.path, "NG", "net_generation", None, False, 30, 72, "now",
            "Net generation"),
    Dataset("interchange", REGION.path, "TI", "interchange", None, False, 30, 72, "now",
            "Total interchange"),
    Dataset("generation", FUEL.path, None, "generation", "fuel", False, 30, 96, "now",
            "Generation by fuel"),
    Dataset("ba_interchange", INTERCHANGE.path, None, "interchange", "counterparty", False, 54,
            96, "now", "Interchange by counterparty"),
)
# fmt: on


@dataclass(frozen=True)
class _Index:
    names: tuple[str, ...]
    by_name: dict[str, Dataset]
    routes: dict[str, Route]
    by_route: dict[str, tuple[Dataset, ...]]
    by_type: dict[str, tuple[Dataset, ...]]


_cache: list[tuple[tuple[Dataset, ...], tuple[Route, ...], _Index]] = []


def _index() -> _Index:
    """The table's lookups, rebuilt when :data:`TABLE` or :data:`ROUTES` is replaced."""
    if _cache and _cache[0][0] is TABLE and _cache[0][1] is ROUTES:
        return _cache[0][2]
    by_route: dict[str, list[Dataset]] = {r.path: [] for r in ROUTES}
    by_type: dict[str, list[Dataset]] = {}
    for ds in TABLE:
        by_route.setdefault(ds.route, []).append(ds)
        by_type.setdefault(ds.series_type, []).append(ds)
    index = _Index(
        names=tuple(ds.name for ds in TABLE),
        by_name={ds.name: ds for ds in TABLE},
        routes={r.path: r for r in ROUTES},
        by_route={k: tuple(v) for k, v in by_route.items()},
        by_type={k: tuple(v) for k, v in by_type.items()},
    )
    _cache[:] = [(TABLE, ROUTES, index)]
    return index


def names() -> tuple[str, ...]:
    """Every dataset name, in canonical order."""
    return _index().names


def by_name(name: str) -> Dataset:
    """The dataset called ``name``; KeyError if there is none."""
    return _index().by_name[name]


def order(name: str) -> int:
    """Sort key of a dataset name: its place in the table, unknown names last."""
    known = _index().names
    return known.index(name) if name in known else len(known)


def routes() -> tuple[str, ...]:
    """Every EIA route path, in the order requests are planned."""
    return tuple(_index().by_route)


def route(path: str) -> Route:
    """The route at ``path``; ValueError for an unknown one."""
    found = _index().routes.get(path)
    if found is None:
        raise ValueError(f"unknown EIA route {path!r}")
    return found


def for_route(path: str) -> tuple[Dataset, ...]:
    """The datasets of one route, in table order."""
    return _index().by_route.get(path, ())


def is_known_code(path: str, code: str) -> bool:
    """Whether a row of ``path`` with code ``code`` belongs to some dataset."""
    return any(ds.code in (None, code) for ds in for_route(path))


def of_row(path: str, code: str | None) -> str:
    """The dataset a row of ``path`` with code ``code`` belongs to; ValueError for an
    unknown route or code."""
    found = route(path)
    members = for_route(path)
    for ds in members:
        if ds.code is not None and ds.code == code:
            return ds.name
    for ds in members:
        if ds.code is None:
            return ds.name
    short = found.path.rsplit("/", 1)[-1]
    raise ValueError(f"unknown {short} {found.code_facet} {code!r}")


def facet_codes(path: str, chosen: set[str] | frozenset[str]) -> tuple[str, ...]:
    """The code facet values asking EIA for the ``chosen`` datasets of ``path``, in table
    order (a dataset of every code adds none: the facet is left open)."""
    return tuple(ds.code for ds in for_route(path) if ds.name in chosen and ds.code is not None)


def of_series(series_type: str, subtype: str | None) -> str:
    """The dataset of a GridPulse series from its type and subtype (an unknown type is
    taken as its own dataset name)."""
    members = _index().by_type.get(series_type, ())
    if len(members) == 1:
        return members[0].name
    for ds in members:
        if (ds.subtype is None) == (subtype is None):
            return ds.name
    return members[0].name if members else series_type


def series_id(ba: str, series_type: str, subtype: str | None) -> str:
    """``EIA.{BA}.{type}`` or ``EIA.{BA}.{type}.{subtype}``."""
    return f"EIA.{ba}.{series_type}" if subtype is None else f"EIA.{ba}.{series_type}.{subtype}"


def series_prefix(name: str, ba: str) -> str:
    """What the ids of a dataset's series of one BA start with (``EIA.PJM.interchange.``
    for BA-to-BA interchange; ``EIA.PJM.demand`` for demand)."""
    ds = by_name(name)
    base = f"EIA.{ba}.{ds.series_type}"
    return base if ds.subtype is None else base + "."


def is_series_of(name: str, ba: str, series_id: str) -> bool:
    """Whether ``series_id`` is one of the dataset's series of ``ba``: the one id of a
    dataset without subtypes (``EIA.PJM.demand``, not ``EIA.PJM.demand_forecast``; total
    interchange ``EIA.PJM.interchange``, not a counterparty's), or any id under the prefix
    of one with subtypes."""
    prefix = series_prefix(name, ba)
    return series_id.startswith(prefix) if prefix.endswith(".") else series_id == prefix


def title(name: str) -> str:
    """The dataset's title; an unknown name is its own title."""
    ds = _index().by_name.get(name)
    return name if ds is None else ds.title
