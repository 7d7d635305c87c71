"""A local stand-in for the EIA Open Data API v2 (EIA-930 routes), for tests and demos.

``FakeEIA(rows_by_route)`` serves ``GET /v2/<route>/data/`` on 127.0.0.1 with the real
query semantics: ``frequency``, ``data[0]=value`` (rows lack ``value`` without it),
``facets[<facet>][]`` filters, inclusive ``start``/``end`` (a date-only bound means T00
of that day), ``sort[i][column|direction]``, ``offset``/``length`` (capped at 5,000),
``response.total`` as a string, the "incomplete return" warning, and the request echo
including the api_key, exactly as the real API leaks it. Errors use EIA's two envelopes.

``GET /v2/<route>/facet/<facet>/`` lists the values of one facet found in the route's
rows (``response.facets``: ``id`` and ``name``; ``response.totalFacets``), plus any
added with :meth:`FakeEIA.add_facet_values` (a respondent EIA knows but has no rows for).

Faults are queued with :meth:`FakeEIA.fail_next` (status, body, headers, delay, or a
dropped connection). Every request path is recorded in :attr:`FakeEIA.requests`.

``delay`` (seconds, default 0) holds every answer that long, as the real API takes about
a second over a 5,000-row page; ``delay_for(target)`` may choose it per request (e.g. to
finish later pages first). Requests are served on their own threads, so delays overlap;
:attr:`FakeEIA.peak_in_flight` is the most requests it held at once, and
:attr:`FakeEIA.answered` lists the request targets in the order they were answered.

``--synth 2023-01-01T00:8760`` (start and hours) serves synthetic rows of the five
default BAs made on demand for each asked window (:func:`outbox.testing.synth.make_rows`),
so a year of data costs no memory up front (benchmarks/bench_backfill.py).

Run standalone: ``python -m outbox.testing.fake_eia --port 8930 --sample``.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from outbox.redact import redact
from outbox.sample import sample_dir
from outbox.testing.synth import (
    DEFAULT_RESPONDENTS,
    MAX_ROWS,
    ROUTES,
    make_rows,
    read_rows,
    response_body,
)

log = logging.getLogger(__name__)

FACETS = {
    "electricity/rto/region-data": ("respondent", "type"),
    "electricity/rto/fuel-type-data": ("respondent", "fueltype"),
    "electricity/rto/interchange-data": ("fromba", "toba"),
}
KEY_INVALID = {
    "error": {
        "code": "API_KEY_INVALID",
        "message": "An invalid api_key was supplied. Get one at https://api.eia.gov:443",
    }
}
KEY_MISSING = {
    "error": {
        "code": "API_KEY_MISSING",
        "message": "No api_key was supplied.  Please register for one at "
        "https://www.eia.gov/opendata/register.php",
    }
}
OVER_RATE_LIMIT = {
    "error": {
        "code": "OVER_RATE_LIMIT",
        "message": "You have exceeded your rate limit. Try again later or contact us at "
        "https://api.eia.gov:443/contact/ for assistance",
    }
}
NOT_FOUND = {"error": "Not found.", "code": 404}
_DATA_PATH = re.compile(r"^/v2/(?P<route>.+?)/data/?$")
_FACET_PATH = re.compile(r"^/v2/(?P<route>.+?)/facet/(?P<facet>[^/]+)/?$")
_FACET_KEY = re.compile(r"^facets\[(?P<name>[^\]]+)\]\[\]$")
_SORT_KEY = re.compile(r"^sort\[(?P<i>\d+)\]\[(?P<part>column|direction)\]$")
_DATA_KEY = re.compile(r"^data\[(?P<i>\d+)\]$")
_BOUND = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2})?$")
_CACHE_SIZE = 16

Reply = tuple[int, dict[str, str], bytes]


class BadQuery(ValueError):
    """A query the real API would answer with HTTP 400."""


@dataclass(frozen=True)
class Fault:
    """One injected failure: the reply to send instead of serving the request."""

    status: int = 500
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass(frozen=True)
class Query:
    """A parsed ``/data/`` query."""

    frequency: str
    columns: tuple[str, ...]
    facets: tuple[tuple[str, tuple[str, ...]], ...]
    start: str
    end: str
    sort: tuple[tuple[str, str], ...]
    offset: int
    length: int
    echo: dict


class FakeEIA:
    """An in-process EIA v2 server over ``rows_by_route`` (route -> EIA rows)."""

    def __init__(
        self,
        rows_by_route: Mapping[str, list[dict]],
        api_key: str | None = None,
        *,
        delay: float = 0.0,
        delay_for: Callable[[str], float] | None = None,
        synth: tuple[datetime, int] | None = None,
    ):
        self.api_key = api_key
        self.delay = delay
        self.delay_for = delay_for
        self.in_flight = self.peak_in_flight = 0
        self.answered: list[str] = []
        self.synth = synth
        self.requests: list[str] = []
        self.base_url: str | None = None
        self._rows = {route: list(rows) for route, rows in rows_by_route.items()}
        self._faults: deque[Fault] = deque()
        self._cache: OrderedDict[tuple, list[dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._extra_facets: dict[tuple[str, str], dict[str, str]] = {}

    def add_facet_values(self, route: str, facet: str, values: Mapping[str, str]) -> None:
        """List ``values`` (id -> name) in ``route``'s ``facet`` endpoint beside the rows'."""
        with self._lock:
            self._extra_facets.setdefault((route, facet), {}).update(values)

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve in a daemon thread; return the v2 base URL (``http://host:port/v2``)."""
        server = ThreadingHTTPServer((host, port), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.base_url = f"http://{host}:{server.server_address[1]}/v2"
        return self.base_url

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeEIA:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        body: bytes | str | dict | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        delay: float = 0.0,
        drop: bool = False,
    ) -> None:
        """Answer the next ``n`` requests with this failure instead of data.

        ``body`` may be bytes, text or a dict (sent as JSON); by default an HTML error
        page (or EIA's rate-limit envelope for 429). ``delay`` waits before answering
        (client timeouts); ``drop`` closes the connection without an answer.
        """
        content = _fault_body(status, body)
        sent = {"Content-Type": _content_type(content), **(headers or {})}
        with self._lock:
            self._faults.extend([Fault(status, content, sent, delay, drop)] * n)

    def set_rows(self, route: str, rows: list[dict]) -> None:
        """Replace the rows of ``route`` (e.g. to publish a revision)."""
        with self._lock:
            self._rows[route] = list(rows)
            self._cache.clear()

    def record(self, target: str) -> Fault | None:
        """Record a request target; return the queued fault it should get, if any."""
        with self._lock:
            self.requests.append(target)
            return self._faults.popleft() if self._faults else None

    def answer_delay(self, target: str) -> float:
        """How long to hold the answer to ``target``."""
        return self.delay_for(target) if self.delay_for is not None else self.delay

    def entered(self, change: int) -> None:
        """Count a request in (+1) or out (-1) of the server."""
        with self._lock:
            self.in_flight += change
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def handle(self, target: str) -> Reply:
        """Answer one GET request target (path and query) as EIA would."""
        parts = urlsplit(target)
        items = parse_qsl(parts.query, keep_blank_values=True)
        denied = self._check_key(items)
        if denied is not None:
            return denied
        facet = _FACET_PATH.match(parts.path)
        if facet is not None:
            return self._facet(facet.group("route"), facet.group("facet"), dict(items))
        match = _DATA_PATH.match(parts.path)
        route = match.group("route") if match else None
        if route not in FACETS:
            return _json(404, NOT_FOUND)
        try:
            query = parse_query(route, items)
        except BadQuery as exc:
            return _json(400, {"error": str(exc), "code": 400})
        return _json(200, self._page(route, query))

    def _check_key(self, items: list[tuple[str, str]]) -> Reply | None:
        if self.api_key is None:
            return None
        given = [value for key, value in items if key == "api_key"]
        if not given or not given[-1]:
            return _json(403, KEY_MISSING)
        return None if given[-1] == self.api_key else _json(403, KEY_INVALID)

    def _facet(self, route: str, facet: str, params: dict[str, str]) -> Reply:
        """``<route>/facet/<facet>/``: the distinct values, with the name the rows carry."""
        if route not in FACETS:
            return _json(404, NOT_FOUND)
        if facet not in FACETS[route]:
            return _json(400, {"error": f"Invalid facet '{facet}' provided.", "code": 400})
        name_key = "type-name" if facet in ("type", "fueltype") else f"{facet}-name"
        with self._lock:
            values = {row.get(facet): row.get(name_key, "") for row in self._rows.get(route, [])}
            values.update(self._extra_facets.get((route, facet), {}))
        facets = [
            {"id": v, "name": name, "alias": f"({v}) {name}"}
            for v, name in sorted((k, n) for k, n in values.items() if isinstance(k, str))
        ]
        doc = {
            "response": {"totalFacets": len(facets), "facets": facets},
            # The real API echoes the key here too.
            "request": {"command": f"/v2/{route}/facet/{facet}/", "params": params},
            "apiVersion": "2.1.8",
        }
        return _json(200, doc)

    def _page(self, route: str, query: Query) -> dict:
        matched = self._matching(route, query)
        page = matched[query.offset : query.offset + query.length]
        if "value" not in query.columns:
            page = [_without_value(row) for row in page]
        return response_body(route, page, len(matched), query.echo)

    def _matching(self, route: str, query: Query) -> list[dict]:
        key = (route, query.facets, query.start, query.end, query.sort)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            rows = self._rows.get(route, [])
        if self.synth is not None:
            rows = synth_rows(route, query, *self.synth)
        matched = sort_rows(filter_rows(rows, query), query.sort)
        with self._lock:
            self._cache[key] = matched
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return matched


def synth_rows(route: str, query: Query, first: datetime, hours: int) -> list[dict]:
    """Synthetic rows of ``route`` for the default BAs over the asked hours that fall
    within ``hours`` hours from ``first``."""
    lo = max(first, _hour(query.start) if query.start else first)
    last = first + timedelta(hours=hours - 1)
    hi = min(last, _hour(query.end) if query.end else last)
    if hi < lo:
        return []
    span = int((hi - lo).total_seconds() // 3600) + 1
    return make_rows(route, DEFAULT_RESPONDENTS, lo, span)


def _hour(bound: str) -> datetime:
    return datetime.strptime(bound, "%Y-%m-%dT%H").replace(tzinfo=UTC)


def parse_query(route: str, items: list[tuple[str, str]]) -> Query:
    """Parse EIA's bracketed query parameters; BadQuery where the real API answers 400."""
    single = {key: value for key, value in items}
    frequency = single.get("frequency", "hourly")
    if frequency != "hourly":
        raise BadQuery(f"Invalid frequency '{frequency}' provided. This fake serves 'hourly'.")
    columns = tuple(v for k, v in items if _DATA_KEY.match(k))
    if any(column != "value" for column in columns):
        raise BadQuery(f"Invalid data column(s) provided: {', '.join(columns)}")
    facets = _facets(route, items)
    sort = _sort(route, items)
    start, end = _bound(single.get("start", "")), _bound(single.get("end", ""))
    offset = _integer(single.get("offset", "0"), "offset")
    length = min(_integer(single.get("length", str(MAX_ROWS)), "length"), MAX_ROWS)
    echo = _echo(items, columns, facets, sort)
    return Query(frequency, columns, facets, start, end, sort, offset, length, echo)


def filter_rows(rows: Iterable[dict], query: Query) -> list[dict]:
    """Rows matching the query's facets and inclusive period bounds."""
    start, end = query.start or "0000", query.end or "9999"
    wanted = [(name, frozenset(values)) for name, values in query.facets]
    return [
        row
        for row in rows
        if start <= row["period"] <= end and all(row.get(n) in vs for n, vs in wanted)
    ]


def sort_rows(rows: list[dict], sort: Iterable[tuple[str, str]]) -> list[dict]:
    """Stable multi-column sort, first column most significant."""
    ordered = list(rows)
    for column, direction in reversed(list(sort)):
        ordered.sort(key=lambda row: str(row.get(column, "")), reverse=direction == "desc")
    return ordered


def _facets(route: str, items: list[tuple[str, str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    facets: dict[str, list[str]] = {}
    for key, value in items:
        match = _FACET_KEY.match(key)
        if match is None:
            continue
        name = match.group("name")
        if name not in FACETS[route]:
            raise BadQuery(f"Invalid facet '{name}' provided for route {route}.")
        facets.setdefault(name, []).append(value)
    return tuple((name, tuple(values)) for name, values in facets.items())


def _sort(route: str, items: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    parts: dict[int, dict[str, str]] = {}
    for key, value in items:
        match = _SORT_KEY.match(key)
        if match:
            parts.setdefault(int(match.group("i")), {})[match.group("part")] = value
    sort = []
    for i in sorted(parts):
        column, direction = parts[i].get("column", ""), parts[i].get("direction", "asc")
        if column not in ("period", *FACETS[route]) or direction not in ("asc", "desc"):
            raise BadQuery(f"Invalid sort column '{column}' or direction '{direction}'.")
        sort.append((column, direction))
    return tuple(sort)


def _bound(value: str) -> str:
    if not value:
        return ""
    if not _BOUND.match(value):
        raise BadQuery(f"Invalid date '{value}': use YYYY-MM-DD or YYYY-MM-DDTHH.")
    return value if "T" in value else f"{value}T00"


def _integer(value: str, name: str) -> int:
    if not value.isdigit():
        raise BadQuery(f"Invalid {name} '{value}'.")
    return int(value)


def _echo(items: list[tuple[str, str]], columns: tuple, facets: tuple, sort: tuple) -> dict:
    """``request.params`` as the API echoes it: scalar params as strings, api_key included."""
    echo: dict[str, Any] = {}
    for key, value in items:
        if _DATA_KEY.match(key):
            echo["data"] = list(columns)
        elif _FACET_KEY.match(key):
            echo["facets"] = {name: list(values) for name, values in facets}
        elif _SORT_KEY.match(key):
            echo["sort"] = [{"column": c, "direction": d} for c, d in sort]
        else:
            echo[key] = value
    api_key = echo.pop("api_key", None)
    if api_key is not None:
        echo["api_key"] = api_key  # EIA echoes it last, in plain text
    return echo


def _without_value(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("value", "value-units")}


def _json(status: int, doc: dict) -> Reply:
    return status, {"Content-Type": "application/json"}, orjson.dumps(doc)


def _fault_body(status: int, body: bytes | str | dict | None) -> bytes:
    if isinstance(body, dict):
        return orjson.dumps(body)
    if isinstance(body, str):
        return body.encode()
    if body is not None:
        return body
    if status == 429:
        return orjson.dumps(OVER_RATE_LIMIT)
    return f"<html><body><h1>{status} Error</h1></body></html>".encode()


def _content_type(body: bytes) -> str:
    return "text/html" if body.lstrip()[:1] == b"<" else "application/json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeEIA/1.0"

    def do_GET(self) -> None:
        fake: FakeEIA = self.server.fake  # type: ignore[attr-defined]
        fake.entered(1)
        try:
            self._answer(fake)
        finally:
            fake.entered(-1)

    def _answer(self, fake: FakeEIA) -> None:
        fault = fake.record(self.path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.drop:
            self.close_connection = True
            return
        status, headers, body = (
            (fault.status, fault.headers, fault.body) if fault else fake.handle(self.path)
        )
        delay = fake.answer_delay(self.path)
        if delay > 0:
            time.sleep(delay)
        with fake._lock:
            fake.answered.append(self.path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("fake EIA: %s", redact(fmt % args))


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m outbox.testing.fake_eia``: serve EIA v2 data until interrupted."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--sample", action="store_true", help="serve the bundled sample")
    parser.add_argument("--dir", type=Path, help="serve the EIA response bodies in DIR")
    parser.add_argument("--api-key", default=None, help="require this api_key")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument(
        "--synth", default=None, help="START:HOURS, e.g. 2023-01-01T00:8760: synthetic rows"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    directory = args.dir or (sample_dir() if args.sample else None)
    rows = read_rows(directory) if directory else {route: [] for route in ROUTES}
    made = None
    if args.synth:
        start, _, hours = args.synth.rpartition(":")
        made = (_hour(start), int(hours))
    fake = FakeEIA(rows, api_key=args.api_key, delay=args.delay, synth=made)
    stopping = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"FakeEIA serving {fake.start(args.port, args.host)}", flush=True)
    stopping.wait()
    fake.stop()


if __name__ == "__main__":
    main()
