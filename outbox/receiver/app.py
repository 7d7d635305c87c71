"""The reference GridPulse receiver: an ASGI app implementing ingest API v1.

This is a reference implementation and a test peer, not production GridPulse. It
implements every endpoint and status of ``shared/contracts/gridpulse-ingest-v1.md`` (and
``outbox/openapi.yaml``) so that the worker can be demonstrated, tested end to end and
crash-tested against it, and so that the GridPulse team has an executable spec.

Ingest (``POST /api/v1/data/observations``) checks, in order: bearer key (401), faults
(see :mod:`outbox.receiver.faults`), ``Content-Type`` (400), ``Content-Encoding`` gzip
or identity (400), decoded size (413), JSON (400), batch shape (422),
``Idempotency-Key`` present (400) and equal to ``batch_id`` (422), row count (413), row
shapes (422: a row that is not an object, lacks or adds a key, or has a field of the
wrong JSON type), then per-row rules, each a ``rejected`` entry:

================================  ===================================================
code                              when
================================  ===================================================
``INVALID_TS``                    ts is not an RFC 3339 UTC hour (``...T14:00:00Z``)
``INVALID_QUALITY_FLAG``          quality_flag is not good, estimated or missing
``INVALID_VALUE``                 value is null but quality_flag is not missing
``INVALID_TYPE``                  type is not one of GridPulse's series types
``SERIES_MISMATCH``               series_id is not ``EIA.{ba}.{type}[.{subtype}]``
``VALUE_OUT_OF_RANGE``            negative demand/demand_forecast, or too large for
                                  numeric(12,3)
``UNKNOWN_SERIES``                ``catalog="fixed"`` and the series is not in it
================================  ===================================================

Accepted rows are upserted on ``(series_id, ts)``: the last write wins. A batch id seen
before with the same content (``source_data`` aside) is processed again and counted in
``batches.times_seen``; with different content it is a 409 and nothing is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import operator
import re
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox.receiver.db import SERIES_TYPES, ObservationRow, ReceiverDB, SeriesSpec
from outbox.receiver.faults import Faults

log = logging.getLogger(__name__)

MAX_ROWS = 5_000
MAX_DECODED_BYTES = 10 * 1024 * 1024
PAGE_ROWS = 10_000
VALUE_LIMIT = 1e9  # numeric(12,3) holds |value| < 10**9
QUALITY_FLAGS = frozenset({"good", "estimated", "missing"})
NON_NEGATIVE_TYPES = frozenset({"demand", "demand_forecast"})
CATALOGS = ("auto", "fixed")
OBSERVATION_FIELDS = (
    "series_id",
    "ba",
    "type",
    "subtype",
    "units",
    "ts",
    "value",
    "quality_flag",
    "revision",
)
_REQUIRED_KEYS = frozenset(OBSERVATION_FIELDS)
_ALL_KEYS = _REQUIRED_KEYS | {"source_data"}
_FIELDS_OF = operator.itemgetter(*OBSERVATION_FIELDS)
_SOURCE_DATA = (dict, type(None))
_STRING_FIELDS = ("series_id", "ba", "type", "units", "ts", "quality_flag", "revision")
_TS_HOUR = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):00:00Z")
_TS_CACHE_LIMIT = 100_000
_API = "/api/v1"


class ApiError(Exception):
    """An answer with the contract's error body ``{"error": {code, message, details}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.headers = dict(headers or {})


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    """The contract's error envelope as JSON bytes."""
    return orjson.dumps({"error": {"code": code, "message": message, "details": details or {}}})


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def _error(exc: ApiError) -> Response:
    return Response(
        error_body(exc.code, exc.message, exc.details),
        exc.status,
        exc.headers,
        media_type="application/json",
    )


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, rows, ms).

    Headers are never logged, so the bearer key cannot leak here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request and log its outcome."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            log.info(
                "%s %s %d rows=%s %.1fms",
                scope["method"],
                scope["path"],
                status,
                state.get("rows", "-"),
                (time.perf_counter() - started) * 1000,
            )


class _Receiver:
    """Request handlers sharing one database, key, catalogue mode and fault set."""

    def __init__(self, db: ReceiverDB, api_key: str, catalog: str, faults: Faults) -> None:
        self.db = db
        self.api_key = api_key
        self.fixed_catalog = catalog == "fixed"
        self.faults = faults
        self._good_ts: set[str] = set()

    # -- endpoints -------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """``GET /api/v1/health``: no authentication."""
        return _json({"status": "ok"})

    async def auth_worker(self, request: Request) -> Response:
        """``POST /api/v1/auth/worker``: confirm the key and tell the server time."""
        self._authorize(request)
        payload = _parse_json(await request.body())
        worker_id = payload.get("worker_id") if isinstance(payload, dict) else None
        if not isinstance(worker_id, str) or not worker_id:
            raise ApiError(422, "INVALID_SHAPE", 'body must be {"worker_id": "<name>"}')
        return _json({"worker_id": worker_id, "authenticated": True, "server_time": _utc_now()})

    async def ingest(self, request: Request) -> Response:
        """``POST /api/v1/data/observations``: validate, upsert, report rejections."""
        self._authorize(request)
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        gate = self.faults.gate()
        if gate is not None:
            raise ApiError(gate.status, gate.code, gate.message, headers=gate.headers)
        request.state.rows = 0
        raw = await request.body()
        headers = request.headers
        result = await run_in_threadpool(
            self._ingest,
            raw,
            headers.get("content-type", ""),
            headers.get("content-encoding", ""),
            headers.get("idempotency-key"),
            request.state,
        )
        return _json(result)

    async def latest(self, request: Request) -> Response:
        """``GET /api/v1/data/series/{series_id}/latest``."""
        self._authorize(request)
        series_id = request.path_params["series_id"]
        found = await run_in_threadpool(self.db.latest, series_id)
        if found is None:
            raise ApiError(404, "UNKNOWN_SERIES", f"series {series_id} is unknown")
        latest_ts, revision = found
        return _json({"series_id": series_id, "latest_ts": latest_ts, "revision": revision})

    async def series(self, request: Request) -> Response:
        """``GET /api/v1/data/series``: every series with count and latest ts."""
        self._authorize(request)
        return _json({"series": await run_in_threadpool(self.db.list_series)})

    async def observations(self, request: Request) -> Response:
        """``GET /api/v1/data/series/{series_id}/observations?start&end``: one page."""
        self._authorize(request)
        series_id = request.path_params["series_id"]
        start = _query_time(request, "start")
        end = _query_time(request, "end")
        page = await run_in_threadpool(self.db.observations, series_id, start, end, PAGE_ROWS)
        if page is None:
            raise ApiError(404, "UNKNOWN_SERIES", f"series {series_id} is unknown")
        rows, following = page
        request.state.rows = len(rows)
        return _json({"series_id": series_id, "observations": rows, "next": following})

    # -- ingest steps ----------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "UNAUTHORIZED",
                "missing or wrong API key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _ingest(
        self,
        raw: bytes,
        content_type: str,
        encoding: str,
        idempotency_key: str | None,
        state: Any,
    ) -> dict[str, Any]:
        payload = _parse_json(_decode(raw, content_type, encoding))
        batch_id, observations = _batch_shape(payload)
        state.rows = len(observations)
        _check_key(idempotency_key, batch_id)
        limit = MAX_ROWS if self.faults.max_rows is None else min(MAX_ROWS, self.faults.max_rows)
        if len(observations) > limit:
            raise ApiError(
                413,
                "BATCH_TOO_LARGE",
                f"{len(observations)} observations exceed the limit of {limit}",
                {"max_rows": limit, "rows": len(observations)},
            )
        poisoned = self.faults.poisoned(observations)
        if poisoned is not None:
            raise ApiError(
                422, "POISONED_ROW", f"observation {poisoned} is poisoned", {"index": poisoned}
            )
        rows, indexes, rejected = self._validate(observations)
        rows, new_series = self._resolve_series(observations, rows, indexes, rejected)
        outcome = self.db.ingest(
            batch_id,
            _content_digest(observations),
            rows,
            new_series,
            (len(observations), len(rows), len(rejected)),
            _utc_now(),
        )
        if outcome.conflict:
            raise ApiError(
                409,
                "IDEMPOTENCY_KEY_REUSED",
                f"batch {batch_id} was already received with a different body",
                {"batch_id": batch_id},
            )
        if self.faults.lose_response():
            raise ApiError(503, "UNAVAILABLE", "fault: response lost after storing")
        rejected.sort(key=lambda item: item["index"])
        return {"batch_id": batch_id, "accepted": len(rows), "rejected": rejected}

    def _validate(
        self, observations: list[Any]
    ) -> tuple[list[ObservationRow], list[int], list[dict[str, Any]]]:
        """Rows that pass the per-row rules, their indexes, and rejections for the others.

        One inlined pass: it runs 5,000 times per request and dominates the request's cost.
        A row that is not in the wire shape at all fails the whole batch (422).
        """
        rows: list[ObservationRow] = []
        indexes: list[int] = []
        rejected: list[dict[str, Any]] = []
        good_ts = self._good_ts
        for index, obs in enumerate(observations):
            if type(obs) is not dict or (obs.keys() != _REQUIRED_KEYS and obs.keys() != _ALL_KEYS):
                raise _shape_error(index, obs)
            sid, ba, kind, subtype, units, ts, value, flag, revision = _FIELDS_OF(obs)
            if not (
                type(sid) is str
                and type(ba) is str
                and type(kind) is str
                and type(units) is str
                and type(ts) is str
                and type(flag) is str
                and type(revision) is str
                and (subtype is None or type(subtype) is str)
                and (value is None or type(value) is float or type(value) is int)
                and (len(obs) == len(_REQUIRED_KEYS) or type(obs["source_data"]) in _SOURCE_DATA)
            ):
                raise _shape_error(index, obs)
            problem: tuple[str, str] | None
            if ts not in good_ts and not self._remember_ts(ts):
                problem = _ts_problem(ts)
            elif flag not in QUALITY_FLAGS or kind not in SERIES_TYPES:
                problem = _enum_problem(flag, kind)
            elif value is None and flag != "missing":
                problem = ("INVALID_VALUE", f"value is null but quality_flag is {flag!r}")
            elif sid != (f"EIA.{ba}.{kind}" if subtype is None else f"EIA.{ba}.{kind}.{subtype}"):
                problem = _mismatch_problem(sid, ba, kind, subtype)
            elif value is not None and (
                (value < 0 and kind in NON_NEGATIVE_TYPES) or not -VALUE_LIMIT < value < VALUE_LIMIT
            ):
                problem = _range_problem(value, kind)
            elif self.faults.rejects:
                problem = self._fault_problem(obs)
            else:
                problem = None
            if problem is None:
                if type(value) is float:
                    value = round(value, 3)
                rows.append((sid, ts, value, flag, revision))
                indexes.append(index)
            else:
                rejected.append(_rejection(index, obs, *problem))
        return rows, indexes, rejected

    def _fault_problem(self, obs: dict[str, Any]) -> tuple[str, str] | None:
        rule = self.faults.rejection(obs)
        if rule is None or rule.code is None:
            return None
        return rule.code, f"rejected by fault {rule.spec}"

    def _remember_ts(self, ts: str) -> bool:
        if not _is_utc_hour(ts):
            return False
        if len(self._good_ts) >= _TS_CACHE_LIMIT:
            self._good_ts.clear()
        self._good_ts.add(ts)
        return True

    def _resolve_series(
        self,
        observations: list[dict[str, Any]],
        rows: list[ObservationRow],
        indexes: list[int],
        rejected: list[dict[str, Any]],
    ) -> tuple[list[ObservationRow], dict[str, SeriesSpec]]:
        """Rows to store and series to create (auto), or unknown-series rejections (fixed)."""
        wanted = {row[0] for row in rows}
        unknown = wanted - self.db.known_series(wanted).keys()
        if not unknown:
            return rows, {}
        if not self.fixed_catalog:
            new_series: dict[str, SeriesSpec] = {}
            for row, index in zip(rows, indexes, strict=True):
                if row[0] in unknown and row[0] not in new_series:
                    new_series[row[0]] = _series_spec(observations[index])
            return rows, new_series
        kept: list[ObservationRow] = []
        for row, index in zip(rows, indexes, strict=True):
            if row[0] in unknown:
                message = f"series {row[0]} is not in the catalogue"
                rejected.append(_rejection(index, observations[index], "UNKNOWN_SERIES", message))
            else:
                kept.append(row)
        return kept, {}


def _decode(raw: bytes, content_type: str, encoding: str) -> bytes:
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            400,
            "UNSUPPORTED_MEDIA_TYPE",
            f"Content-Type must be application/json, not {content_type!r}",
        )
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        if len(raw) > MAX_DECODED_BYTES:
            raise _too_big()
        return raw
    if encoding not in ("gzip", "x-gzip"):
        raise ApiError(
            400, "UNSUPPORTED_ENCODING", f"Content-Encoding {encoding!r} is not gzip or identity"
        )
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        body = decompressor.decompress(raw, MAX_DECODED_BYTES + 1)
    except zlib.error as exc:
        raise ApiError(400, "INVALID_ENCODING", f"body is not valid gzip: {exc}") from None
    if len(body) > MAX_DECODED_BYTES:
        raise _too_big()
    if not decompressor.eof:
        raise ApiError(400, "INVALID_ENCODING", "gzip body is truncated")
    return body


def _too_big() -> ApiError:
    return ApiError(
        413,
        "BATCH_TOO_LARGE",
        f"decoded body exceeds {MAX_DECODED_BYTES} bytes",
        {"max_bytes": MAX_DECODED_BYTES},
    )


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", f"body is not valid JSON: {exc}") from None


def _batch_shape(payload: Any) -> tuple[str, list[Any]]:
    if not isinstance(payload, dict):
        raise ApiError(422, "INVALID_SHAPE", "body must be a JSON object")
    batch_id, source = payload.get("batch_id"), payload.get("source")
    observations = payload.get("observations")
    problems = {
        "batch_id": not isinstance(batch_id, str) or not batch_id,
        "source": not isinstance(source, str) or not source,
        "observations": not isinstance(observations, list),
    }
    unknown = sorted(set(payload) - set(problems))
    bad = [name for name, wrong in problems.items() if wrong]
    if bad or unknown:
        raise ApiError(
            422,
            "INVALID_SHAPE",
            "body must be {batch_id: string, source: string, observations: array}",
            {"fields": bad, "unknown": unknown},
        )
    return batch_id, observations  # type: ignore[return-value]


def _check_key(idempotency_key: str | None, batch_id: str) -> None:
    if not idempotency_key:
        raise ApiError(400, "MISSING_IDEMPOTENCY_KEY", "Idempotency-Key header is required")
    if idempotency_key != batch_id:
        raise ApiError(
            422,
            "IDEMPOTENCY_KEY_MISMATCH",
            "Idempotency-Key must equal the body's batch_id",
            {"batch_id": batch_id},
        )


def _shape_error(index: int, obs: Any) -> ApiError:
    """The 422 for a row that is not in the wire shape, naming what is wrong."""
    details: dict[str, Any] = {"index": index}
    if type(obs) is not dict:
        return ApiError(
            422, "INVALID_OBSERVATION", f"observation {index} is not an object", details
        )
    details["missing"] = sorted(_REQUIRED_KEYS - obs.keys())
    details["unknown"] = sorted(obs.keys() - _ALL_KEYS)
    if details["missing"] or details["unknown"]:
        return ApiError(
            422, "INVALID_OBSERVATION", f"observation {index} lacks or adds fields", details
        )
    wrong = [name for name in _STRING_FIELDS if type(obs[name]) is not str]
    if obs["subtype"] is not None and type(obs["subtype"]) is not str:
        wrong.append("subtype")
    if obs["value"] is not None and type(obs["value"]) not in (float, int):
        wrong.append("value")
    if type(obs.get("source_data")) not in _SOURCE_DATA:
        wrong.append("source_data")
    details["fields"] = wrong
    return ApiError(
        422,
        "INVALID_OBSERVATION",
        f"observation {index} has fields of the wrong type: {', '.join(wrong)}",
        details,
    )


def _ts_problem(ts: str) -> tuple[str, str]:
    return "INVALID_TS", f"ts {ts!r} is not an RFC 3339 UTC hour like 2025-08-22T14:00:00Z"


def _enum_problem(flag: str, kind: str) -> tuple[str, str]:
    if flag not in QUALITY_FLAGS:
        return "INVALID_QUALITY_FLAG", f"quality_flag {flag!r} is not good/estimated/missing"
    return "INVALID_TYPE", f"type {kind!r} is not a GridPulse series type"


def _mismatch_problem(sid: str, ba: str, kind: str, subtype: str | None) -> tuple[str, str]:
    expected = f"EIA.{ba}.{kind}" + ("" if subtype is None else f".{subtype}")
    return "SERIES_MISMATCH", f"series_id {sid!r} does not match ba/type/subtype {expected!r}"


def _range_problem(value: float, kind: str) -> tuple[str, str]:
    if value < 0 and kind in NON_NEGATIVE_TYPES:
        return "VALUE_OUT_OF_RANGE", f"value {value:g} below 0 for {kind}"
    return "VALUE_OUT_OF_RANGE", f"value {value:g} does not fit numeric(12,3)"


def _is_utc_hour(ts: str) -> bool:
    match = _TS_HOUR.fullmatch(ts)
    if match is None:
        return False
    try:
        year, month, day, hour = (int(part) for part in match.groups())
        datetime(year, month, day, hour)
    except ValueError:
        return False
    return True


def _rejection(index: int, obs: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    return {
        "index": index,
        "series_id": obs["series_id"],
        "ts": obs["ts"],
        "code": code,
        "message": message,
    }


def _series_spec(obs: Mapping[str, Any]) -> SeriesSpec:
    return SeriesSpec(obs["series_id"], obs["ba"], obs["type"], obs["subtype"], obs["units"])


def _content_digest(observations: list[dict[str, Any]]) -> str:
    """Digest of what a batch means (every field but ``source_data``), for 409 checks."""
    canonical = orjson.dumps(list(map(_FIELDS_OF, observations)))
    return hashlib.sha256(canonical).hexdigest()


def _query_time(request: Request, name: str) -> str:
    """An RFC 3339 query parameter as canonical UTC text, rounded up to the second."""
    text = request.query_params.get(name)
    if not text:
        raise ApiError(400, "INVALID_PARAMETER", f"query parameter {name} is required")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ApiError(
            400, "INVALID_PARAMETER", f"{name} must be RFC 3339 with an offset, e.g. ...Z"
        )
    when = when.astimezone(UTC)
    if when.microsecond and when < datetime.max.replace(tzinfo=UTC) - timedelta(seconds=1):
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z"
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return _error(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return _error(ApiError(500, "INTERNAL", "internal error in the reference receiver"))


def create_app(
    db_url: str, api_key: str, *, catalog: str = "auto", faults: Faults | None = None
) -> Starlette:
    """The receiver as a Starlette app over the database at ``db_url``.

    ``catalog="fixed"`` accepts only series already in the ``series`` table (see
    :func:`outbox.receiver.db.seed_catalog`); ``"auto"`` creates unknown ones.
    """
    if catalog not in CATALOGS:
        raise ValueError(f"catalog must be one of {CATALOGS}, not {catalog!r}")
    if not api_key:
        raise ValueError("the receiver needs an API key")
    faults = faults if faults is not None else Faults()
    faults.start()
    db = ReceiverDB(db_url)
    receiver = _Receiver(db, api_key, catalog, faults)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        faults.start()
        try:
            yield
        finally:
            db.close()

    series_path = _API + "/data/series/{series_id}"
    app = Starlette(
        routes=[
            Route(_API + "/health", receiver.health, methods=["GET"]),
            Route(_API + "/auth/worker", receiver.auth_worker, methods=["POST"]),
            Route(_API + "/data/observations", receiver.ingest, methods=["POST"]),
            Route(_API + "/data/series", receiver.series, methods=["GET"]),
            Route(series_path + "/latest", receiver.latest, methods=["GET"]),
            Route(series_path + "/observations", receiver.observations, methods=["GET"]),
        ],
        middleware=[Middleware(RequestLog)],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.state.db = db
    app.state.faults = faults
    return app
