"""EIA Open Data API v2 source: the EIA-930 hourly routes, paged.

:class:`EIAClient` turns one :class:`Request` (a route, the respondents, a UTC window)
into a sequence of :class:`Page` objects, following ``offset`` until the API's
``response.total`` is reached. Each HTTP attempt is rate limited client-side and retried
under the one :class:`~outbox.retry.RetryPolicy`; errors are classified into
:class:`~outbox.errors.SourceTransientError` (retried) and
:class:`~outbox.errors.SourceFatalError` (never retried):

* fatal: 403 ``API_KEY_INVALID``/``API_KEY_MISSING``, 400 bad parameter, the not-found
  envelope ``{"error": "Not found.", "code": 404}`` (served as HTTP 500 until late 2025,
  404 since), and a 200 whose JSON has no ``response.data`` list or integer ``total``;
* transient: 429 (``Retry-After`` honoured), other 403s, 5xx, timeouts, connection
  errors, and bodies that are not JSON (HTML error pages, truncated responses).

The ``error`` key is checked on every status, 200 included.

EIA echoes the api_key in every response body, so a page's ``body`` and ``params`` are
re-serialized with ``request.params.api_key`` removed, its ``url`` is redacted, and every
message and log line passes through :func:`~outbox.redact.redact`.

The body checks (:func:`parse_body`, :func:`error_of`, :func:`strip_api_key`) are shared
with :mod:`outbox.sources.replay`, which reads saved response bodies instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import tenacity

from outbox import USER_AGENT
from outbox.errors import SourceFatalError, SourceTransientError
from outbox.ports import (
    RESPONDENT_FACET,
    ROUTE_FUEL,
    ROUTE_INTERCHANGE,
    ROUTE_REGION,
    Page,
    Request,
)
from outbox.redact import MASK, RedactingFilter, redact, register_secret
from outbox.retry import RetryPolicy, call_with_retry, parse_retry_after
from outbox.sources.inflight import Abandoned, iter_in_order

log = logging.getLogger(__name__)


MAX_PAGE_LENGTH = 5000
# A full EIA page (5,000 rows) is about 1.5 MB; a body far beyond that is not a page.
MAX_PAGE_BYTES = 16 * 1024 * 1024
PERIOD_FORMAT = "%Y-%m-%dT%H"
REGION_TYPE_CODES = ("D", "DF", "NG", "TI")
INCOMPLETE_RETURN = "incomplete return"

# Facet holding the series code, per route (RESPONDENT_FACET: the balancing authority).
VALUE_FACET = {ROUTE_REGION: "type", ROUTE_FUEL: "fueltype", ROUTE_INTERCHANGE: "toba"}

# api-umbrella (EIA's gateway) key errors: configuration problems, retrying cannot help.
KEY_ERROR_CODES = frozenset(
    {"API_KEY_INVALID", "API_KEY_MISSING", "API_KEY_DISABLED", "API_KEY_UNAUTHORIZED"}
)
_TRANSIENT_STATUS = frozenset({403, 408, 425, 429})
_SNIPPET = 160
NOT_JSON = object()


# EIA suspends a key that makes more than about 5 requests in a second (eia-v2 contract).
EIA_MAX_PER_SECOND = 5


class RateLimiter:
    """Client-side limit: on average ``max_per_second`` requests a second, up to ``burst``
    of them at once after a pause, never more than EIA's 5 in any sliding second (for a
    rate of at most 5; 0 is no limit), and at most ``max_per_hour`` in any sliding hour.
    ``sleep`` and ``clock`` are injectable.

    The average and the burst are a token bucket, kept as its theoretical arrival time
    (GCRA): a request may start ``(burst - 1)`` intervals before its turn in an even
    spacing. ``burst=1`` spaces every request by ``1/max_per_second``. The hourly run's
    three requests (one per route) go out together under the default burst of 3.

    Thread-safe: each caller reserves the next free slot under a lock and waits for it
    outside the lock, so concurrent callers never start closer than the limits allow.
    """

    def __init__(
        self,
        max_per_second: float,
        max_per_hour: int,
        *,
        burst: int = 1,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self._interval = 1.0 / max_per_second if max_per_second > 0 else 0.0
        self._tolerance = (burst - 1) * self._interval
        # No limit at all (0) or a rate above EIA's (a stand-in's tests) is not capped.
        self._capped = 0 < max_per_second <= EIA_MAX_PER_SECOND
        self._per_hour = max_per_hour
        self._sleep = sleep
        self._clock = clock
        self._recent: deque[float] = deque()
        self._tat: float | None = None
        self._lock = threading.Lock()

    def acquire(self, sleep: Callable[[float], None] | None = None) -> float:
        """Wait until one more request is allowed; return the seconds waited."""
        wait = self.reserve()[1]
        if wait > 0:
            (sleep or self._sleep)(wait)
        return wait

    def reserve(self) -> tuple[float, float]:
        """Take the next free slot: ``(its clock time, seconds from now until it)``."""
        with self._lock:
            now = self._clock()
            slot = self._next_slot(now)
            self._recent.append(slot)
            self._tat = max(self._tat if self._tat is not None else slot, slot) + self._interval
            return slot, slot - now

    def _next_slot(self, now: float) -> float:
        while self._recent and self._recent[0] <= now - 3600.0:
            self._recent.popleft()
        slot = now
        if self._tat is not None:
            slot = max(slot, self._tat - self._tolerance)
        if self._recent:
            # A fake sleep may not advance a fake clock: never grant a slot before the last.
            slot = max(slot, self._recent[-1])
        if self._capped and len(self._recent) >= EIA_MAX_PER_SECOND:
            slot = max(slot, self._recent[-EIA_MAX_PER_SECOND] + 1.0)
        if self._per_hour > 0 and len(self._recent) >= self._per_hour:
            slot = max(slot, self._recent[-self._per_hour] + 3600.0)
        return slot


@dataclass(frozen=True)
class _Call:
    """One page request in flight: what error messages must name."""

    req: Request | None
    page_no: int
    offset: int
    params: dict
    where: str
    shown: str

    def say(self, cause: str) -> str:
        """``EIA <route> page N (offset M): <cause> [<redacted url>]``."""
        return f"{self.where}: {cause} [{self.shown}]" if cause else f"{self.where} [{self.shown}]"


class EIAClient:
    """Pages through the EIA v2 ``<route>/data/`` endpoint for one :class:`Request`.

    ``base_url`` is the v2 root (``https://api.eia.gov/v2``). The client does its own
    retries (per page, under ``retry``) and rate limiting; ``requests_made`` counts HTTP
    attempts.
    """

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        api_key: str | None,
        *,
        page_length: int = MAX_PAGE_LENGTH,
        retry: RetryPolicy = RetryPolicy(),
        max_per_second: float = 1.0,
        max_per_hour: int = 2000,
        burst: int = 1,
        max_in_flight: int = 1,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= page_length <= MAX_PAGE_LENGTH:
            raise ValueError(f"page_length must be 1..{MAX_PAGE_LENGTH}, got {page_length}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._http = http
        self._base = base_url.rstrip("/")
        self._key = api_key or None
        register_secret(self._key)
        guard_http_logs()
        self._page_length = page_length
        self._retry = retry
        # None: real waits, which a stopped concurrent walk can cut short (an injected
        # sleep, a test's fake, is called as it is).
        self._real_sleep = sleep is None
        self._sleep = sleep or time.sleep
        self._clock = clock
        self._limiter = RateLimiter(
            max_per_second, max_per_hour, burst=burst, sleep=self._sleep, clock=clock
        )
        self.max_in_flight = max_in_flight
        self._count_lock = threading.Lock()
        self.requests_made = 0

    saved = False  # a Source that answers requests

    def iter_pages(self, req: Request | None) -> Iterator[Page]:
        """Yield every page of ``req`` in order; the final one has ``last=True``."""
        if req is None:
            raise ValueError("the EIA API answers requests: iter_pages needs one")
        offset = page_no = 0
        seen: set[str | None] = set()
        while True:
            page = self._fetch_page(req, page_no, offset)
            facet = RESPONDENT_FACET[req.route]
            seen.update(row.get(facet) for row in page.rows)
            yield page
            if page.last:
                break
            offset += len(page.rows)
            page_no += 1
        _warn_silent_respondents(req, seen)

    def iter_requests(self, requests: Iterable[Request]) -> Generator[tuple[int, Page]]:
        """``(index, page)`` for every page of ``requests``, in the order of
        :meth:`iter_pages` over each request in turn, with up to ``max_in_flight``
        requests in flight at once (:mod:`outbox.sources.inflight`). An error is raised
        in its page's turn, after every page before it; pages in flight are abandoned."""
        if self.max_in_flight == 1:
            for index, req in enumerate(requests):
                for page in self.iter_pages(req):
                    yield index, page
            return
        reqs = list(requests)
        stop = threading.Event()
        seen: dict[int, set[str | None]] = {}
        pages = iter_in_order(
            reqs,
            lambda req, page_no, offset: self._fetch_page(req, page_no, offset, stop),
            page_length=self._page_length,
            max_in_flight=self.max_in_flight,
            stop=stop,
        )
        try:
            for index, page in pages:
                facet = RESPONDENT_FACET[page.route]
                seen.setdefault(index, set()).update(row.get(facet) for row in page.rows)
                yield index, page
                if page.last:
                    _warn_silent_respondents(reqs[index], seen.pop(index))
        finally:
            pages.close()

    def facet_values(self, route: str, facet: str) -> dict[str, str]:
        """The values EIA lists for one facet of ``route`` (``<route>/facet/<facet>/``),
        id -> name, e.g. every respondent code of region-data."""
        return call_with_retry(
            self._retry,
            lambda: self._facet_attempt(route, facet),
            sleep=self._sleep,
            before_sleep=_log_retry,
        )

    def _facet_attempt(self, route: str, facet: str) -> dict[str, str]:
        items = [("api_key", self._key)] if self._key else []
        url = httpx.URL(f"{self._base}/{route}/facet/{facet}/", params=items)
        shown = self._redact(unquote(self._redact(str(url))))
        call = _Call(None, 0, 0, {}, f"EIA {route} facet {facet}", shown)
        self._limiter.acquire()
        self._counted()
        response = self._get(url, call)
        check_size(len(response.content), call.say)
        doc = _loads(response.content)
        self._raise_for_error(response, doc, call)
        facets = doc.get("response", {}).get("facets") if isinstance(doc, dict) else None
        if not isinstance(facets, list):
            raise SourceFatalError(call.say("response.facets is missing or not a list"))
        return {
            str(f["id"]): str(f.get("name") or "")
            for f in facets
            if isinstance(f, dict) and f.get("id") is not None
        }

    def _fetch_page(
        self, req: Request, page_no: int, offset: int, stop: threading.Event | None = None
    ) -> Page:
        params = request_params(req, offset, self._page_length)
        pause = self._sleep if stop is None else self._pause(stop)
        return call_with_retry(
            self._retry,
            lambda: self._attempt(req, page_no, offset, params, pause, stop),
            sleep=pause,
            before_sleep=_log_retry if stop is None else _quiet_once_stopped(stop),
        )

    def _pause(self, stop: threading.Event) -> Callable[[float], None]:
        """A wait that ends (raising :class:`Abandoned`) once ``stop`` is set."""

        def pause(seconds: float) -> None:
            if self._real_sleep:
                stop.wait(seconds)
            else:
                self._sleep(seconds)
            if stop.is_set():
                raise Abandoned("the fetch stopped")

        return pause

    def _attempt(
        self,
        req: Request,
        page_no: int,
        offset: int,
        params: dict,
        pause: Callable[[float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Page:
        items = query_items(params)
        if self._key:
            items.insert(0, ("api_key", self._key))
        url = httpx.URL(f"{self._base}/{req.route}/data/", params=items)
        shown = self._redact(unquote(self._redact(str(url))))
        call = _Call(
            req, page_no, offset, params, f"EIA {req.route} page {page_no} (offset {offset})", shown
        )
        self._limiter.acquire(pause)
        if stop is not None and stop.is_set():
            raise Abandoned("the fetch stopped")
        self._counted()
        started = self._clock()
        response = self._get(url, call)
        check_size(len(response.content), call.say)
        doc = _loads(response.content)
        log.debug(
            "eia request GET status=%d rows=%s elapsed=%.3fs page=%d offset=%d url=%s",
            response.status_code,
            _row_count(doc),
            self._clock() - started,
            page_no,
            offset,
            shown,
        )
        self._raise_for_error(response, doc, call)
        return self._page(req, call, doc)

    def _counted(self) -> None:
        with self._count_lock:
            self.requests_made += 1

    def _get(self, url: httpx.URL, call: _Call) -> httpx.Response:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        try:
            return self._http.get(url, headers=headers)
        except httpx.UnsupportedProtocol as exc:
            raise SourceFatalError(self._redact(call.say(str(exc)))) from None
        except httpx.TimeoutException as exc:
            raise SourceTransientError(self._redact(call.say(type(exc).__name__))) from None
        except httpx.RequestError as exc:
            text = call.say(f"{type(exc).__name__}: {exc}")
            raise SourceTransientError(self._redact(text)) from None

    def _raise_for_error(self, response: httpx.Response, doc: Any, call: _Call) -> None:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        error = error_of(doc)
        if error is not None:
            code, message = error
            label = f"HTTP {status}" if code is None else f"HTTP {status}, EIA error {code}"
            text = self._redact(call.say(f"{label}: {message}"))
            if is_fatal_error(status, code):
                raise SourceFatalError(text)
            raise SourceTransientError(text, retry_after)
        snippet = _snippet(response.content)
        if status >= 500 or status in _TRANSIENT_STATUS:
            raise SourceTransientError(
                self._redact(call.say(f"HTTP {status} {snippet}")), retry_after
            )
        if status >= 300:
            raise SourceFatalError(self._redact(call.say(f"unexpected HTTP {status} {snippet}")))
        if doc is NOT_JSON:
            text = call.say(
                f"HTTP {status} body is not JSON (truncated or an HTML page): {snippet}"
            )
            raise SourceTransientError(self._redact(text))

    def _page(self, req: Request, call: _Call, doc: Any) -> Page:
        rows, total = parse_body(doc, call.say(""))
        _log_warnings(doc, call.where)
        length = as_int(call.params.get("length")) or MAX_PAGE_LENGTH
        if len(rows) > length:
            raise SourceFatalError(call.say(f"{len(rows)} rows on a page of at most {length}"))
        received = call.offset + len(rows)
        if not rows and call.offset < total:
            raise SourceFatalError(call.say(f"empty page before total {total} was reached"))
        if received > total:
            raise SourceFatalError(
                call.say(f"received {received} rows in all, more than total {total}")
            )
        strip_api_key(doc)
        return Page(
            route=req.route,
            page_no=call.page_no,
            offset=call.offset,
            total=total,
            rows=rows,
            body=self._scrub(orjson.dumps(doc)),
            params=call.params,
            url=call.shown,
            last=received >= total,
        )

    def _scrub(self, body: bytes) -> bytes:
        """Mask the key anywhere else it might hide in a body (a belt to strip_api_key's braces)."""
        if self._key and self._key.encode() in body:
            return body.replace(self._key.encode(), MASK.encode())
        return body

    def _redact(self, text: str) -> str:
        return redact(text, [self._key] if self._key else [])


def request_params(req: Request, offset: int, length: int) -> dict:
    """The query of one page as EIA echoes it in ``request.params`` (without api_key)."""
    respondent, value = RESPONDENT_FACET[req.route], VALUE_FACET[req.route]
    values = req.facet_values or (REGION_TYPE_CODES if req.route == ROUTE_REGION else ())
    facets: dict[str, list[str]] = {respondent: list(req.respondents)}
    if values:
        facets[value] = list(values)
    return {
        "frequency": "hourly",
        "data": ["value"],
        "facets": facets,
        "start": format_period(req.start),
        "end": format_period(req.end),
        "sort": [{"column": col, "direction": "asc"} for col in ("period", respondent, value)],
        "offset": str(offset),
        "length": str(length),
    }


def query_items(params: dict) -> list[tuple[str, str]]:
    """Flatten :func:`request_params` into EIA's bracketed query parameters, in order."""
    items = [("frequency", params["frequency"])]
    items += [(f"data[{i}]", col) for i, col in enumerate(params["data"])]
    for facet, values in params["facets"].items():
        items += [(f"facets[{facet}][]", v) for v in values]
    items += [("start", params["start"]), ("end", params["end"])]
    for i, sort in enumerate(params["sort"]):
        items += [
            (f"sort[{i}][column]", sort["column"]),
            (f"sort[{i}][direction]", sort["direction"]),
        ]
    items += [("offset", params["offset"]), ("length", params["length"])]
    return items


def format_period(when: datetime) -> str:
    """An aware datetime as EIA's hourly UTC period, ``YYYY-MM-DDTHH``."""
    return when.astimezone(UTC).strftime(PERIOD_FORMAT)


def error_of(doc: Any) -> tuple[str | int | None, str] | None:
    """``(code, message)`` from either EIA error envelope, or None when there is no error."""
    if not isinstance(doc, dict) or not doc.get("error"):
        return None
    error = doc["error"]
    if isinstance(error, dict):
        return error.get("code"), str(error.get("message") or error)
    return doc.get("code"), str(error)


def is_fatal_error(status: int, code: str | int | None) -> bool:
    """Whether an error envelope means "stop": bad key, bad parameter, unknown route."""
    if isinstance(code, str) and code in KEY_ERROR_CODES:
        return True
    number = as_int(code)
    if number is not None and 400 <= number < 600:
        return 400 <= number < 500 and number not in _TRANSIENT_STATUS
    return not (status >= 500 or status in _TRANSIENT_STATUS)


def parse_body(doc: Any, where: str) -> tuple[list[dict], int]:
    """``(response.data, int(response.total))`` of a 200 body; SourceFatalError if malformed."""
    response = doc.get("response") if isinstance(doc, dict) else None
    if not isinstance(response, dict):
        raise SourceFatalError(f"{where}: body has no 'response' object")
    rows = response.get("data")
    if not isinstance(rows, list):
        raise SourceFatalError(f"{where}: response.data is missing or not a list")
    total = as_int(response.get("total"))
    if total is None or total < 0:
        raise SourceFatalError(
            f"{where}: response.total {response.get('total')!r} is not an integer"
        )
    if not all(map(isinstance, rows, repeat(dict))):  # map: no Python frame per row
        raise SourceFatalError(f"{where}: response.data holds a row that is not an object")
    return rows, total


def strip_api_key(doc: Any) -> dict:
    """Remove the echoed ``request.params.api_key`` in place; return the remaining params."""
    request = doc.get("request") if isinstance(doc, dict) else None
    params = request.get("params") if isinstance(request, dict) else None
    if not isinstance(params, dict):
        return {}
    params.pop("api_key", None)
    return params


def check_size(size: int, say: Callable[[str], str]) -> None:
    """SourceFatalError (worded by ``say``) for a body larger than any page can be."""
    if size > MAX_PAGE_BYTES:
        raise SourceFatalError(
            say(f"body of {size} bytes is larger than the {MAX_PAGE_BYTES}-byte page limit")
        )


def _loads(content: bytes) -> Any:
    """The parsed body, or :data:`NOT_JSON` (a JSON ``null`` is JSON, just not a page)."""
    try:
        return orjson.loads(content) if content else NOT_JSON
    except orjson.JSONDecodeError:
        return NOT_JSON


def as_int(value: Any) -> int | None:
    """An int, or a string of digits, as an int; anything else (a bool too) as None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _row_count(doc: Any) -> int | None:
    response = doc.get("response") if isinstance(doc, dict) else None
    data = response.get("data") if isinstance(response, dict) else None
    return len(data) if isinstance(data, list) else None


def _snippet(content: bytes) -> str:
    text = " ".join(content[:_SNIPPET].decode("utf-8", "replace").split())
    return repr(text + ("..." if len(content) > _SNIPPET else ""))


def _log_warnings(doc: dict, where: str) -> None:
    warnings = doc["response"].get("warnings") or []
    for warning in warnings if isinstance(warnings, list) else [warnings]:
        name = warning.get("warning") if isinstance(warning, dict) else warning
        if name != INCOMPLETE_RETURN:
            log.warning("eia warning where=%s warning=%s", _quoted(where), _quoted(str(warning)))


def _quiet_once_stopped(stop: threading.Event) -> Callable[[tenacity.RetryCallState], None]:
    """The retry log line, unless the walk has stopped: an abandoned request's error
    (its connection closed under it) is no retry anyone will wait for."""

    def log_retry(state: tenacity.RetryCallState) -> None:
        if not stop.is_set():
            _log_retry(state)

    return log_retry


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "eia retry attempt=%d wait=%.1fs error=%s", state.attempt_number, wait, _quoted(str(exc))
    )


def _warn_silent_respondents(req: Request, seen: set[str | None]) -> None:
    silent = sorted(set(req.respondents) - seen)
    if silent:
        log.warning(
            "eia no rows for respondents (wrong code, or not published yet) "
            "route=%s start=%s end=%s respondents=%s",
            req.route,
            format_period(req.start),
            format_period(req.end),
            ",".join(silent),
        )


def _quoted(text: str) -> str:
    """A value for ``key=value`` log lines: JSON-quoted, secrets redacted."""
    return json.dumps(redact(text))


def guard_http_logs() -> None:
    """Redact httpx's own request log lines, which carry the full URL (and so the key)."""
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
