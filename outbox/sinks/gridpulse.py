"""GridPulse ingest API v1 (see ``outbox/openapi.yaml``): the client and the sink.

:class:`GridPulseSink` is the :class:`~outbox.ports.Sink` the send stage delivers to: it
builds the wire format (:func:`encode_batch`, the batch id, gzip ahead of the POST) and
takes an answer as an acknowledgement only if it passes :func:`check_result`.
:class:`GridPulseClient` speaks HTTP and maps every outcome onto the exception tree in
:mod:`outbox.errors`; it never retries. The caller (``stages.send.run_send``) retries
by marker: :class:`~outbox.errors.TransientError` subclasses are retried with backoff,
terminal ones are not. Status mapping for :meth:`GridPulseClient.post_batch`:

====================================  ==============================================
200 that accounts for the batch       :class:`IngestResult`
200 that does not (see                :class:`~outbox.errors.ProtocolError`
:func:`check_result`)                 (no row changes state; not retried)
400, 422                              :class:`~outbox.errors.BatchRejectedError`
401, 403                              :class:`~outbox.errors.SinkAuthError`
409                                   :class:`~outbox.errors.SinkConflictError`
413                                   :class:`~outbox.errors.PayloadTooLargeError`
429                                   :class:`~outbox.errors.RateLimitedError`
5xx, timeout, connection error        :class:`~outbox.errors.SinkTransientError`
                                      (``status`` set when an HTTP status came;
                                      ``rows_suspect`` on 500, 501, 505)
any other status                      :class:`~outbox.errors.SinkError` (unmarked)
====================================  ==============================================

The API key travels only in the ``Authorization`` header and is masked in every
message this module builds.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from operator import attrgetter
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import httpx
import orjson

from outbox import USER_AGENT
from outbox.errors import (
    BatchRejectedError,
    PayloadTooLargeError,
    ProtocolError,
    RateLimitedError,
    SinkAuthError,
    SinkConflictError,
    SinkError,
    SinkTransientError,
)
from outbox.ports import Batch, Outcome, Prepared, Refusal, SendRow
from outbox.redact import redact
from outbox.retry import parse_retry_after

log = logging.getLogger(__name__)

INGEST_PATH = "/api/v1/data/observations"
AUTH_PATH = "/api/v1/auth/worker"
SERIES_PATH = "/api/v1/data/series"
HEALTH_PATH = "/api/v1/health"
SOURCE = "eia-930"
WIRE_FIELDS = (
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
OPTIONAL_WIRE_FIELDS = ("source_data",)
# A row's wire fields, and its (series_id, ts, revision) key, read in one C call each.
_WIRE_OF = attrgetter(*WIRE_FIELDS)
_KEY_OF = attrgetter("series_id", "ts", "revision")
_PLAIN_KEYS = frozenset(WIRE_FIELDS)
_FULL_KEYS = frozenset(WIRE_FIELDS + OPTIONAL_WIRE_FIELDS)
_GZIP_WBITS = 31  # zlib's "gzip container" window setting
_MAX_MESSAGE = 500
_MAX_SHOWN = 80  # characters of an answer's value quoted in a protocol error
# 5xx answers that come from a live GridPulse failing on the batch it was sent.
ROWS_SUSPECT = frozenset({500, 501, 505})


@dataclass(frozen=True)
class Rejection:
    """One observation GridPulse refused; permanent for that revision of that row."""

    index: int
    series_id: str
    ts: str
    code: str
    message: str


@dataclass(frozen=True)
class IngestResult:
    """GridPulse's answer to an accepted batch: counts and per-row rejections."""

    batch_id: str
    accepted: int
    rejected: tuple[Rejection, ...]


def batch_id_of(keys: Iterable[tuple[str, str, str]]) -> str:
    """A stable id for an ordered list of ``(series_id, ts, revision)`` keys.

    The same rows with the same revisions in the same order give the same id, so a
    retry reuses its ``Idempotency-Key``; a changed revision gives a new id. The
    result is the first 32 hex digits of a SHA-256 over unit/record-separated keys.
    """
    # One update over the joined keys: the same digest as one update per key, at 2/3 the cost.
    joined = "".join([f"{series_id}\x1f{ts}\x1f{revision}\x1e" for series_id, ts, revision in keys])
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def encode_batch(
    batch_id: str, observations: Sequence[Mapping[str, Any]], *, source: str = SOURCE
) -> bytes:
    """The JSON request body for ``POST /api/v1/data/observations`` (not compressed).

    Each mapping must carry the keys in :data:`WIRE_FIELDS`; ``source_data`` is sent
    only when present and not ``None``. Other keys are dropped. ``Decimal`` values are
    sent as JSON numbers.
    """
    rows = [_wire_row(obs) for obs in observations]
    return orjson.dumps(
        {"batch_id": batch_id, "source": source, "observations": rows},
        default=_encode_default,
    )


def _wire_row(obs: Mapping[str, Any]) -> Mapping[str, Any]:
    # Fast path: a plain dict already in wire shape is serialised as it is.
    if type(obs) is dict:
        keys = obs.keys()
        if keys == _PLAIN_KEYS or (keys == _FULL_KEYS and obs["source_data"] is not None):
            return obs
    try:
        row = {field: obs[field] for field in WIRE_FIELDS}
    except KeyError as exc:
        raise ValueError(f"observation lacks wire field {exc.args[0]!r}") from None
    source_data = obs.get("source_data")
    if source_data is not None:
        row["source_data"] = source_data
    return row


def _encode_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


class GridPulseClient:
    """Client for the GridPulse ingest API v1 over a caller-owned ``httpx.Client``.

    ``bytes_sent`` counts the request body bytes (compressed when ``gzip``) of every
    :meth:`post_batch` attempt, successful or not.
    """

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        api_key: str,
        *,
        gzip: bool = True,
        gzip_level: int = 1,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._gzip = gzip
        self._gzip_level = gzip_level
        self.bytes_sent = 0

    def pack(self, body: bytes) -> bytes:
        """``body`` as :meth:`post_batch` sends it (gzip-compressed when enabled).

        Lets a caller compress a batch ahead, e.g. on another thread (zlib releases the GIL).
        """
        return self._compress(body) if self._gzip else body

    def post_batch(
        self,
        batch_id: str,
        body: bytes,
        *,
        packed: bytes | None = None,
        keys: Sequence[Sequence[Any]] | None = None,
    ) -> IngestResult:
        """Send one encoded batch (from :func:`encode_batch`) and return GridPulse's result.

        ``packed`` is ``pack(body)`` when the caller computed it ahead. ``keys`` are the
        rows sent, in order (each item's first two fields ``series_id`` and ``ts``): with
        them the answer must pass :func:`check_result`, without them only its shape and
        batch id are checked. Raises the error of the module's status table; never retries.
        """
        headers = self._headers()
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = batch_id
        if self._gzip:
            body = packed if packed is not None else self._compress(body)
            headers["Content-Encoding"] = "gzip"
        self.bytes_sent += len(body)
        response = self._send("POST", INGEST_PATH, content=body, headers=headers)
        if response.status_code != 200:
            raise self._ingest_error(response)
        try:
            result = parse_ingest_result(_ingest_json(response, batch_id), batch_id)
            if keys is not None:
                check_result(result, batch_id, keys)
        except ProtocolError as exc:
            raise ProtocolError(self._clean(str(exc))) from None
        log.debug(
            "batch %s: %d accepted, %d rejected", batch_id, result.accepted, len(result.rejected)
        )
        return result

    def auth_worker(self, worker_id: str) -> dict:
        """Check the credentials; the answer carries GridPulse's ``server_time``."""
        response = self._send(
            "POST", AUTH_PATH, content=orjson.dumps({"worker_id": worker_id}), json_body=True
        )
        self._raise_for_read(response)
        return _expect_object(self._json(response), "auth answer")

    def latest(self, series_id: str) -> tuple[str | None, str | None] | None:
        """``(latest_ts, revision)`` GridPulse holds for a series, or ``None`` if unknown."""
        response = self._send("GET", f"{SERIES_PATH}/{quote(series_id, safe='')}/latest")
        if response.status_code == 404:
            return None
        self._raise_for_read(response)
        payload = _expect_object(self._json(response), "latest answer")
        return payload.get("latest_ts"), payload.get("revision")

    def list_series(self) -> list[Mapping[str, object]]:
        """Every series GridPulse holds, with its row count and latest ``ts``."""
        response = self._send("GET", SERIES_PATH)
        self._raise_for_read(response)
        series = _expect_object(self._json(response), "series list").get("series")
        if not isinstance(series, list):
            raise SinkTransientError("GridPulse series list has no 'series' array", status=200)
        return series

    def observations(self, series_id: str, start: str, end: str) -> Iterator[dict]:
        """The stored observations of a series in ``[start, end)``, following ``next``."""
        path = f"{SERIES_PATH}/{quote(series_id, safe='')}/observations"
        cursor: str | None = start
        while cursor is not None:
            response = self._send("GET", path, params={"start": cursor, "end": end})
            self._raise_for_read(response)
            page = _expect_object(self._json(response), "observations page")
            rows = page.get("observations")
            if not isinstance(rows, list):
                raise SinkTransientError(
                    "GridPulse observations page has no 'observations'", status=200
                )
            yield from rows
            following = page.get("next")
            if following is not None and following == cursor:
                raise SinkTransientError(
                    f"GridPulse paging does not advance past {cursor}", status=200
                )
            cursor = following

    def health(self) -> bool:
        """Whether GridPulse answers its health check with ``{"status": "ok"}``."""
        try:
            response = self._http.get(self._base_url + HEALTH_PATH, headers=self._base_headers())
        except httpx.HTTPError as exc:
            log.debug("health check failed: %s", self._clean(repr(exc)))
            return False
        if response.status_code != 200:
            return False
        try:
            ok: bool = orjson.loads(response.content).get("status") == "ok"
            return ok
        except (orjson.JSONDecodeError, AttributeError):
            return False

    def _compress(self, body: bytes) -> bytes:
        compressor = zlib.compressobj(self._gzip_level, zlib.DEFLATED, _GZIP_WBITS)
        return compressor.compress(body) + compressor.flush()

    def _base_headers(self) -> dict[str, str]:
        return {"User-Agent": USER_AGENT, "Accept": "application/json"}

    def _headers(self) -> dict[str, str]:
        headers = self._base_headers()
        headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        json_body: bool = False,
    ) -> httpx.Response:
        if headers is None:
            headers = self._headers()
        if json_body:
            headers["Content-Type"] = "application/json"
        try:
            return self._http.request(
                method, self._base_url + path, content=content, headers=headers, params=params
            )
        except httpx.TimeoutException as exc:
            raise SinkTransientError(
                f"GridPulse timed out on {method} {path} ({type(exc).__name__})"
            ) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise SinkTransientError(
                f"GridPulse connection failed on {method} {path}: "
                f"{type(exc).__name__}: {self._clean(str(exc))}"
            ) from None

    def _json(self, response: httpx.Response) -> Any:
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            snippet = self._clean(response.text[:200])
            raise SinkTransientError(
                f"GridPulse answered {response.status_code} with a body that is not JSON: "
                f"{snippet!r}",
                status=response.status_code,
            ) from None

    def _ingest_error(self, response: httpx.Response) -> SinkError:
        status = response.status_code
        code, message = self._error_of(response)
        text = f"GridPulse answered {status} {code}: {message}"
        if status in (400, 422):
            return BatchRejectedError(text, status, code)
        if status == 409:
            return SinkConflictError(text)
        if status == 413:
            return PayloadTooLargeError(text)
        return self._common_error(response, text)

    def _raise_for_read(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        code, message = self._error_of(response)
        text = f"GridPulse answered {response.status_code} {code}: {message}"
        raise self._common_error(response, text)

    def _common_error(self, response: httpx.Response, text: str) -> SinkError:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status in (401, 403):
            return SinkAuthError(text)
        if status == 429:
            return RateLimitedError(text, retry_after, status=status)
        if status >= 500:
            # A live server failing on these rows, not one down or overloaded (503 etc.).
            suspect = status in ROWS_SUSPECT
            return SinkTransientError(text, retry_after, status=status, rows_suspect=suspect)
        return SinkError(text)

    def _error_of(self, response: httpx.Response) -> tuple[str, str]:
        """``(code, message)`` from the error envelope, or a stand-in for other bodies."""
        try:
            error = orjson.loads(response.content)["error"]
            code, message = str(error.get("code", "")), str(error.get("message", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            code, message = "", response.text[:200].strip() or response.reason_phrase
        return self._clean(code or "NO_CODE"), self._clean(message)[:_MAX_MESSAGE]

    def _clean(self, text: str) -> str:
        return redact(text, (self._api_key,))


class _Encoded(NamedTuple):
    """A batch in GridPulse's wire format: its keys, batch id, body and body as sent."""

    keys: list[tuple[str, str, str]]
    batch_id: str
    body: bytes
    packed: bytes


class IngestClient(Protocol):
    """What :class:`GridPulseSink` needs of a client: :class:`GridPulseClient` (tests
    stand in for it at the wire level)."""

    def pack(self, body: bytes) -> bytes:
        """``body`` as :meth:`post_batch` sends it."""
        ...

    def post_batch(
        self,
        batch_id: str,
        body: bytes,
        *,
        packed: bytes | None = None,
        keys: Sequence[Sequence[Any]] | None = None,
    ) -> IngestResult:
        """One POST; with ``keys`` the answer must pass :func:`check_result`."""
        ...

    def health(self) -> bool:
        """Whether GridPulse answers its health check."""
        ...


class GridPulseSink:
    """The :class:`~outbox.ports.Sink` of GridPulse ingest v1, over a :class:`GridPulseClient`.

    :meth:`prepare` builds the batch id and the JSON body and compresses it ahead (on the
    send stage's read-ahead thread); :meth:`send` posts it once and takes the answer only
    if it accounts for the batch (:func:`check_result`). A prepared batch counts its
    uncompressed body as its size.
    """

    def __init__(self, client: IngestClient) -> None:
        self.client = client

    def prepare(self, batch: Batch) -> Prepared:
        """The wire form of ``batch`` (thread-safe: touches no connection)."""
        rows, sources = batch.rows, batch.source_data
        keys = list(map(_KEY_OF, rows))
        batch_id = batch_id_of(keys)
        observations = _wire_rows(rows)
        if sources is not None:
            for obs, source in zip(observations, sources, strict=True):
                if source is not None:
                    obs["source_data"] = source
        # Already in wire shape: serialised as they are (the same bytes as encode_batch).
        body = orjson.dumps(
            {"batch_id": batch_id, "source": SOURCE, "observations": observations},
            default=_encode_default,
        )
        packed = self.client.pack(body)
        return Prepared(batch, len(body), _Encoded(keys, batch_id, body, packed))

    def send(self, prepared: Prepared) -> Outcome:
        """POST one prepared batch; raises the errors of the module's status table."""
        wire: _Encoded = prepared.payload
        answer = self.client.post_batch(
            wire.batch_id, wire.body, packed=wire.packed, keys=wire.keys
        )
        return Outcome(
            answer.accepted, tuple(Refusal(r.index, r.code, r.message) for r in answer.rejected)
        )

    def health(self) -> bool:
        """Whether GridPulse answers its health check."""
        return self.client.health()


def _wire_rows(rows: Sequence[SendRow]) -> list[dict[str, Any]]:
    """Every row in wire shape, without ``source_data``: the fields in one C call a row,
    unpacked into a dict literal (half the cost of an attribute read per field)."""
    return [
        {
            "series_id": sid,
            "ba": ba,
            "type": kind,
            "subtype": sub,
            "units": units,
            "ts": ts,
            "value": value,
            "quality_flag": flag,
            "revision": rev,
        }
        for sid, ba, kind, sub, units, ts, value, flag, rev in map(_WIRE_OF, rows)
    ]


def _expect_object(payload: Any, what: str) -> dict:
    if not isinstance(payload, dict):
        raise SinkTransientError(f"GridPulse {what} is not a JSON object", status=200)
    return payload


def _inconsistent(batch_id: str, what: str) -> ProtocolError:
    return ProtocolError(
        f"GridPulse's answer to batch {batch_id} is inconsistent: {what}; "
        "no row changed, the next send retries"
    )


def _shown(value: Any) -> str:
    """A value of the answer as JSON, cut short (it is quoted in a one-line error)."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _ingest_json(response: httpx.Response, batch_id: str) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise _inconsistent(batch_id, f"it is not JSON ({_shown(response.text)})") from None


def parse_ingest_result(payload: Any, batch_id: str) -> IngestResult:
    """GridPulse's 200 answer to batch ``batch_id`` as an :class:`IngestResult`.

    Raises :class:`~outbox.errors.ProtocolError` when the answer is not the contract's
    shape (``accepted`` a non-negative integer, not a boolean; ``rejected`` an array of
    rejections) or names another batch.
    """
    if not isinstance(payload, dict):
        raise _inconsistent(batch_id, f"it is not a JSON object ({_shown(payload)})")
    if payload.get("batch_id") != batch_id:
        raise _inconsistent(batch_id, f"it names batch {_shown(payload.get('batch_id'))}")
    if "accepted" not in payload:
        raise _inconsistent(batch_id, "accepted is missing")
    accepted, rejected = payload["accepted"], payload.get("rejected")
    if not _is_count(accepted):
        raise _inconsistent(batch_id, f"accepted is {_shown(accepted)}, not a count")
    if not isinstance(rejected, list):
        raise _inconsistent(batch_id, f"rejected is {_shown(rejected)}, not an array")
    return IngestResult(
        batch_id, accepted, tuple(_parse_rejection(item, batch_id) for item in rejected)
    )


def check_result(result: IngestResult, batch_id: str, keys: Sequence[Sequence[Any]]) -> None:
    """Raise :class:`~outbox.errors.ProtocolError` unless ``result`` accounts for the batch.

    ``keys`` are the rows sent, in order; each item's first two fields are ``series_id``
    and ``ts`` (a ``(series_id, ts)`` pair or a claimed store row). The answer is an
    acknowledgement only if it names this batch, every rejection's index is in range,
    distinct, and names the ``series_id`` and ``ts`` of the row at that index, and
    ``accepted`` + the rejections = the rows sent. The work is per rejection, not per row.
    """
    if result.batch_id != batch_id:
        raise _inconsistent(batch_id, f"it names batch {_shown(result.batch_id)}")
    sent = len(keys)
    seen: set[int] = set()
    for rej in result.rejected:
        index = rej.index
        if not 0 <= index < sent:
            raise _inconsistent(
                batch_id, f"rejection index {index} is outside the {sent} rows sent"
            )
        if index in seen:
            raise _inconsistent(batch_id, f"index {index} is rejected twice")
        seen.add(index)
        row = keys[index]
        if rej.series_id != row[0]:
            raise _inconsistent(
                batch_id,
                f"rejection {index} names series {_shown(rej.series_id)}, "
                f"row {index} sent is {row[0]}",
            )
        if rej.ts != row[1]:
            raise _inconsistent(
                batch_id,
                f"rejection {index} names ts {_shown(rej.ts)}, row {index} sent has ts {row[1]}",
            )
    if result.accepted + len(seen) != sent:
        raise _inconsistent(
            batch_id, f"accepted {result.accepted} + rejected {len(seen)} != {sent} rows sent"
        )


def _parse_rejection(item: Any, batch_id: str) -> Rejection:
    if (
        isinstance(item, dict)
        and _is_count(item.get("index"))
        and all(isinstance(item.get(key), str) for key in ("series_id", "ts", "code"))
    ):
        message = item.get("message")
        return Rejection(
            item["index"],
            item["series_id"],
            item["ts"],
            item["code"],
            message if isinstance(message, str) else "",
        )
    raise _inconsistent(batch_id, f"a rejection has the wrong shape: {_shown(item)}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
