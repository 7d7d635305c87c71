"""The seams between the stages and the outside world, and the plain values they hand over.

A fetch stage asks a :class:`Source` for the pages of a :class:`Request`; a source of
saved pages (a replay directory) holds its pages already and is asked for all of them.
``outbox.sources.eia`` (EIA v2 over HTTP) and ``outbox.sources.replay`` (saved response
bodies) implement it. The send stage hands batches to a :class:`Sink`
(``outbox.sinks.gridpulse``).

Nothing here does I/O. What only one source needs (the facet listing ``outbox doctor``
reads from EIA, the rate limit) stays on that source.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

# ---------------------------------------------------------------------------------
# Source: where the fetch stage gets pages (outbox.sources.eia, outbox.sources.replay)
# ---------------------------------------------------------------------------------

# The EIA-930 routes a Request may name (the sources' own copy: outbox.datasets, above
# them, maps each to its datasets).
ROUTE_REGION = "electricity/rto/region-data"
ROUTE_FUEL = "electricity/rto/fuel-type-data"
ROUTE_INTERCHANGE = "electricity/rto/interchange-data"
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
    rows: Sequence[dict]
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


def iter_requests(source: Source, requests: Sequence[Request]) -> Generator[tuple[int, Page]]:
    """``(index into requests, page)`` for every page of ``requests``, request after
    request, each request's pages in order.

    A source may answer several requests at once (``EIAClient.iter_requests``: pages in
    flight together, handed over in this same order); any other is asked one request
    after another with ``iter_pages``.
    """
    many = getattr(source, "iter_requests", None)
    if many is not None:
        yield from many(requests)
        return
    for index, request in enumerate(requests):
        for page in source.iter_pages(request):
            yield index, page


# ---------------------------------------------------------------------------------
# Sink: where the send stage delivers rows (outbox.sinks.gridpulse: GridPulse ingest v1)
# ---------------------------------------------------------------------------------
#
# The send stage (outbox.stages.send) claims rows, hands them to a sink in batches and
# settles each row by the sink's answer. It knows nothing of the sink's wire format or
# transport; what it does on each answer is decided by the value or error the sink gives:
#
#   Outcome                 every row accounted for: rejected rows are dead with their
#                           code, the others acknowledged
#   SinkTransientError      retried with backoff inside the run's budget, then the rows
#                           are deferred; ``retry_after`` is honoured, ``rows_suspect``
#                           says the sink was up and failed on these rows
#   PayloadTooLargeError    the batch is halved (a single row too large is dead)
#   BatchRejectedError      the batch is bisected to the rows refused (``reason``)
#   ProtocolError           an answer that does not account for the batch: no row
#                           changes state and the run stops
#   any other SinkError     the run stops, no row changes state


class SendRow(Protocol):
    """One claimed row as the send stage hands it to a sink (the store's claimed rows
    have these fields)."""

    @property
    def series_id(self) -> str: ...
    @property
    def ts(self) -> str: ...
    @property
    def value(self) -> float | None: ...
    @property
    def units(self) -> str: ...
    @property
    def quality_flag(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def ba(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def subtype(self) -> str | None: ...


@dataclass(frozen=True)
class Batch:
    """Rows to deliver in one request, oldest first.

    ``source_data`` (when the run sends it) holds each row's EIA source row, in the
    order of ``rows``; ``None`` where a row has none.
    """

    rows: Sequence[SendRow]
    source_data: Sequence[Mapping[str, Any] | None] | None = None


@dataclass(frozen=True)
class Prepared:
    """A batch as a sink encoded it ahead of sending (:meth:`Sink.prepare`).

    ``size`` is what the run counts as its ``bytes`` for each attempt; ``payload`` is
    the sink's own encoding, opaque to the stage.
    """

    batch: Batch
    size: int = 0
    payload: Any = None


@dataclass(frozen=True)
class Refusal:
    """One row of a batch the sink refused for good: its position in the batch, why."""

    index: int
    code: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """A sink's answer that accounts for every row of its batch: ``accepted`` rows taken,
    the ``rejected`` ones (distinct indexes) refused; together, the rows sent."""

    accepted: int
    rejected: tuple[Refusal, ...] = ()


class Sink(Protocol):
    """Where the send stage delivers rows; one implementation per destination.

    A sink never retries (the stage retries by the errors' markers) and never touches the
    store. Each method raises only :class:`~outbox.errors.SinkError` subclasses.
    """

    def prepare(self, batch: Batch) -> Prepared:
        """Encode ``batch`` for :meth:`send` (may run on another thread than send)."""
        ...

    def send(self, prepared: Prepared) -> Outcome:
        """Deliver one prepared batch, one attempt; an answer that does not account for
        the batch raises :class:`~outbox.errors.ProtocolError`."""
        ...

    def health(self) -> bool:
        """Whether the sink says it is up (rows deferred while it was down go again)."""
        ...
