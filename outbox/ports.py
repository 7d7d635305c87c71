"""The seams between the stages and the outside world, and the plain values they hand over.

A fetch stage asks a :class:`Source` for the pages of a :class:`Request`; a source of
saved pages (a replay directory) holds its pages already and is asked for all of them.
``outbox.sources.eia`` (EIA v2 over HTTP) and ``outbox.sources.replay`` (saved response
bodies) implement it; tests implement it with a list.

Nothing here does I/O. What only one source needs (the facet listing ``outbox doctor``
reads from EIA, the rate limit) stays on that source.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from outbox.normalize import ROUTE_FUEL, ROUTE_INTERCHANGE, ROUTE_REGION

ROUTES = (ROUTE_REGION, ROUTE_FUEL, ROUTE_INTERCHANGE)
# Facet holding the balancing authority, per route.
RESPONDENT_FACET = {
    ROUTE_REGION: "respondent",
    ROUTE_FUEL: "respondent",
    ROUTE_INTERCHANGE: "fromba",
}


@dataclass(frozen=True)
class Request:
    """One logical EIA query: a route, its respondents and an inclusive UTC hour window.

    ``facet_values`` are region-data ``type`` codes (empty means D, DF, NG, TI: the CO2
    series share that facet, so types are always sent explicitly), fuel-type-data
    ``fueltype`` codes (empty = all) or interchange-data ``toba`` codes (empty = all).
    """

    route: str
    respondents: tuple[str, ...]
    facet_values: tuple[str, ...]
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"unknown EIA route {self.route!r}; expected one of {ROUTES}")
        if not self.respondents:
            raise ValueError("EIARequest needs at least one respondent")
        for name in ("start", "end"):
            when = getattr(self, name)
            if when.tzinfo is None or when.utcoffset() is None:
                raise ValueError(f"EIARequest.{name} must be timezone-aware, got {when!r}")
            if (when.minute, when.second, when.microsecond) != (0, 0, 0):
                raise ValueError(f"EIARequest.{name} must be a whole hour, got {when!r}")
        if self.start > self.end:
            raise ValueError(f"EIARequest start {self.start} is after end {self.end}")


@dataclass(frozen=True)
class Page:
    """One EIA response page, safe to store: no api_key in ``body``, ``params`` or ``url``.

    ``last`` is true on the final page of its request: its offset plus its rows reach
    ``total``.
    """

    route: str
    page_no: int
    offset: int
    total: int
    rows: list[dict]
    body: bytes
    params: dict
    url: str
    last: bool


@runtime_checkable
class Source(Protocol):
    """Where a fetch gets its pages.

    ``saved`` says which way the fetch stage asks: False for a source that answers
    requests (the stage plans the requests and their watermarks), True for one that
    holds its pages already (the stage stages all of them, in the source's order, and
    the pages themselves say which streams they continue).
    """

    saved: bool

    def iter_pages(self, request: Request | None) -> Iterator[Page]:
        """Every page answering ``request`` in order, the final one with ``last=True``.

        A saved source is asked with None and yields every page it holds; a source that
        answers requests raises ValueError for None.
        """
        ...
