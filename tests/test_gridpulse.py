"""GridPulseClient against respx with strict routing: every status, header and shape."""

from __future__ import annotations

import gzip
import hashlib
import statistics
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from types import MappingProxyType
from typing import Any

import httpx
import orjson
import pytest
import respx
from factories import wire_observation

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
    TerminalError,
    TransientError,
)
from outbox.ports import Batch
from outbox.sinks.gridpulse import (
    WIRE_FIELDS,
    GridPulseClient,
    GridPulseSink,
    IngestResult,
    Rejection,
    batch_id_of,
    check_result,
    encode_batch,
)
from outbox.store import Claimed

BASE = "https://gridpulse.test"
KEY = "gp-secret-key-123456"
INGEST = "/api/v1/data/observations"


def batch(n: int = 3) -> tuple[str, bytes, list[dict[str, Any]]]:
    rows = [wire_observation(i) for i in range(n)]
    batch_id = batch_id_of((r["series_id"], r["ts"], r["revision"]) for r in rows)
    return batch_id, encode_batch(batch_id, rows), rows


def error_json(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": {}}}


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=True, assert_all_mocked=True) as mock:
        yield mock


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as client:
        yield client


@pytest.fixture
def client(http: httpx.Client) -> GridPulseClient:
    return GridPulseClient(http, BASE + "/", KEY)


# -- batch ids and encoding ------------------------------------------------------------


def test_batch_id_is_stable_for_the_same_keys() -> None:
    keys = [("EIA.PJM.demand", "2025-08-22T14:00:00Z", "r1"), ("EIA.SPP.demand", "x", "r2")]
    first = batch_id_of(keys)
    assert first == batch_id_of(iter(list(keys)))
    assert len(first) == 32 and int(first, 16) >= 0


def test_batch_id_is_sha256_of_separated_keys() -> None:
    # The id is part of the wire contract (a retry's Idempotency-Key): pinned to its bytes.
    keys = [("EIA.PJM.demand", "2025-08-22T14:00:00Z", "r1"), ("EIA.SPP.demand", "x", "r2")]
    raw = b"EIA.PJM.demand\x1f2025-08-22T14:00:00Z\x1fr1\x1eEIA.SPP.demand\x1fx\x1fr2\x1e"
    assert batch_id_of(keys) == hashlib.sha256(raw).hexdigest()[:32]


def test_batch_id_changes_with_revision_and_order() -> None:
    keys = [("EIA.PJM.demand", "2025-08-22T14:00:00Z", "r1"), ("EIA.SPP.demand", "x", "r2")]
    revised = [keys[0], ("EIA.SPP.demand", "x", "r3")]
    assert batch_id_of(keys) != batch_id_of(revised)
    assert batch_id_of(keys) != batch_id_of(reversed(keys))
    # no ambiguity from concatenation
    assert batch_id_of([("a.b", "c", "d")]) != batch_id_of([("a", "b.c", "d")])


def test_encode_batch_has_the_exact_contract_shape() -> None:
    rows = [wire_observation(0), wire_observation(1, source_data={"period": "2025-08-22T01"})]
    rows[0]["internal_id"] = 7  # not a wire field: dropped
    body = orjson.loads(encode_batch("b1", rows))
    assert list(body) == ["batch_id", "source", "observations"]
    assert body["batch_id"] == "b1" and body["source"] == "eia-930"
    first, second = body["observations"]
    assert list(first) == list(WIRE_FIELDS)
    assert first == {k: wire_observation(0)[k] for k in WIRE_FIELDS}
    assert second["source_data"] == {"period": "2025-08-22T01"}


def test_encode_batch_accepts_any_mapping_and_decimal() -> None:
    row = MappingProxyType(wire_observation(0, value=Decimal("12.5"), source_data=None))
    body = orjson.loads(encode_batch("b", [row], source="replay"))
    assert body["source"] == "replay"
    assert body["observations"][0]["value"] == 12.5
    assert "source_data" not in body["observations"][0]


def test_encode_batch_refuses_a_row_without_a_wire_field() -> None:
    row = wire_observation(0)
    del row["revision"]
    with pytest.raises(ValueError, match="revision"):
        encode_batch("b", [row])


def test_encode_and_gzip_5000_rows_is_fast() -> None:
    rows = [wire_observation(i) for i in range(5000)]
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        body = encode_batch("b", rows)
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        compressor.compress(body) + compressor.flush()
        timings.append(time.perf_counter() - started)
    # a few ms on a 2-core machine; the bound leaves room for a noisy CI neighbour
    assert statistics.median(timings) < 0.1


# -- post_batch ----------------------------------------------------------------------------


def test_post_batch_sends_gzip_json_with_headers(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, rows = batch(3)
    route = router.post(INGEST).respond(
        200, json={"batch_id": batch_id, "accepted": 3, "rejected": []}
    )
    result = client.post_batch(batch_id, body)
    assert result == IngestResult(batch_id, 3, ())
    request = route.calls.last.request
    assert request.headers["content-type"] == "application/json"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["idempotency-key"] == batch_id
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["user-agent"] == USER_AGENT
    decoded = orjson.loads(gzip.decompress(request.content))
    assert decoded == {"batch_id": batch_id, "source": "eia-930", "observations": rows}
    assert client.bytes_sent == len(request.content) < len(body)


def test_post_batch_without_gzip(router: respx.MockRouter, http: httpx.Client) -> None:
    batch_id, body, _ = batch(1)
    route = router.post(INGEST).respond(
        200, json={"batch_id": batch_id, "accepted": 1, "rejected": []}
    )
    GridPulseClient(http, BASE, KEY, gzip=False).post_batch(batch_id, body)
    request = route.calls.last.request
    assert "content-encoding" not in request.headers
    assert request.content == body


def test_post_batch_returns_rejections(router: respx.MockRouter, client: GridPulseClient) -> None:
    batch_id, body, _ = batch(3)
    rejected = {
        "index": 1,
        "series_id": "EIA.PJM.demand",
        "ts": "2025-08-22T01:00:00Z",
        "code": "VALUE_OUT_OF_RANGE",
        "message": "value -5 below 0 for demand",
    }
    router.post(INGEST).respond(
        200, json={"batch_id": batch_id, "accepted": 2, "rejected": [rejected]}
    )
    result = client.post_batch(batch_id, body)
    assert result.accepted == 2
    assert result.rejected == (Rejection(**rejected),)


@pytest.mark.parametrize(
    ("status", "error", "marker"),
    [
        (400, BatchRejectedError, TerminalError),
        (422, BatchRejectedError, TerminalError),
        (401, SinkAuthError, TerminalError),
        (403, SinkAuthError, TerminalError),
        (409, SinkConflictError, TerminalError),
        (413, PayloadTooLargeError, TerminalError),
        (429, RateLimitedError, TransientError),
        (500, SinkTransientError, TransientError),
        (502, SinkTransientError, TransientError),
        (503, SinkTransientError, TransientError),
    ],
)
def test_post_batch_maps_status_to_error(
    router: respx.MockRouter,
    client: GridPulseClient,
    status: int,
    error: type[Exception],
    marker: type[Exception],
) -> None:
    batch_id, body, _ = batch(2)
    # a server that echoes the key must not make it leak into our messages
    router.post(INGEST).respond(
        status, json=error_json("SOME_CODE", f"told {KEY} and Bearer {KEY}")
    )
    with pytest.raises(error) as caught:
        client.post_batch(batch_id, body)
    assert isinstance(caught.value, marker)
    assert getattr(caught.value, "status", status) == status
    text = str(caught.value)
    assert str(status) in text and "SOME_CODE" in text and "told" in text
    assert KEY not in text and KEY not in repr(caught.value)


def test_batch_rejected_error_carries_status_and_code(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(2)
    router.post(INGEST).respond(422, json=error_json("INVALID_OBSERVATION", "row 1 lacks ts"))
    with pytest.raises(BatchRejectedError) as caught:
        client.post_batch(batch_id, body)
    assert (caught.value.status, caught.value.code) == (422, "INVALID_OBSERVATION")
    assert "row 1 lacks ts" in str(caught.value)


def test_auth_error_has_the_server_message(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).respond(401, json=error_json("UNAUTHORIZED", "missing or wrong key"))
    with pytest.raises(SinkAuthError, match="missing or wrong key"):
        client.post_batch(batch_id, body)


def test_429_with_retry_after_seconds(router: respx.MockRouter, client: GridPulseClient) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).respond(
        429, headers={"Retry-After": "7"}, json=error_json("RATE_LIMITED", "slow down")
    )
    with pytest.raises(RateLimitedError) as caught:
        client.post_batch(batch_id, body)
    assert caught.value.retry_after == 7.0


def test_429_with_retry_after_http_date(router: respx.MockRouter, client: GridPulseClient) -> None:
    batch_id, body, _ = batch(1)
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    router.post(INGEST).respond(429, headers={"Retry-After": when}, text="slow down")
    with pytest.raises(RateLimitedError) as caught:
        client.post_batch(batch_id, body)
    assert 20.0 < caught.value.retry_after <= 30.0


def test_503_carries_retry_after(router: respx.MockRouter, client: GridPulseClient) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).respond(
        503, headers={"Retry-After": "5"}, json=error_json("UNAVAILABLE", "down")
    )
    with pytest.raises(SinkTransientError) as caught:
        client.post_batch(batch_id, body)
    assert type(caught.value) is SinkTransientError and caught.value.retry_after == 5.0


def test_500_without_envelope_is_transient(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).respond(500, text="<html>Internal Server Error</html>")
    with pytest.raises(SinkTransientError, match="500") as caught:
        client.post_batch(batch_id, body)
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.ConnectError(f"refused; Authorization: Bearer {KEY}"),
        httpx.RemoteProtocolError(f"peer closed connection ({KEY})"),
    ],
)
def test_transport_failures_are_transient(
    router: respx.MockRouter, client: GridPulseClient, failure: Exception
) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).mock(side_effect=failure)
    with pytest.raises(SinkTransientError) as caught:
        client.post_batch(batch_id, body)
    assert caught.value.status is None
    assert KEY not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_timeout_message_names_the_request(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(SinkTransientError, match="timed out on POST /api/v1/data/observations"):
        client.post_batch(batch_id, body)


def test_non_json_200_is_a_protocol_error(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).respond(200, text="<html>captive portal</html>")
    with pytest.raises(ProtocolError, match="is inconsistent: it is not JSON") as caught:
        client.post_batch(batch_id, body)
    assert not isinstance(caught.value, TransientError)
    assert isinstance(caught.value, TerminalError) and caught.value.exit_code == 1


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ([], "it is not a JSON object ([])"),
        ({"batch_id": "x", "accepted": 1}, "rejected is null, not an array"),
        ({"batch_id": "x", "rejected": []}, "accepted is missing"),
        ({"batch_id": "x", "accepted": -1, "rejected": []}, "accepted is -1, not a count"),
        ({"batch_id": "x", "accepted": True, "rejected": []}, "accepted is true, not a count"),
        ({"batch_id": "x", "accepted": "1", "rejected": []}, 'accepted is "1", not a count'),
        ({"batch_id": "x", "accepted": 1.0, "rejected": []}, "accepted is 1.0, not a count"),
        (
            {"batch_id": "x", "accepted": 1, "rejected": [{"index": 0}]},
            'a rejection has the wrong shape: {"index":0}',
        ),
        ({"batch_id": "other", "accepted": 1, "rejected": []}, 'it names batch "other"'),
    ],
)
def test_200_with_wrong_shape_is_a_protocol_error(
    router: respx.MockRouter, client: GridPulseClient, payload: Any, named: str
) -> None:
    router.post(INGEST).respond(200, json=payload)
    with pytest.raises(ProtocolError) as caught:
        client.post_batch("x", encode_batch("x", [wire_observation(0)]))
    assert str(caught.value) == (
        f"GridPulse's answer to batch x is inconsistent: {named}; "
        "no row changed, the next send retries"
    )


def test_protocol_error_never_shows_the_key(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    router.post(INGEST).respond(200, json={"batch_id": KEY, "accepted": 1, "rejected": []})
    with pytest.raises(ProtocolError) as caught:
        client.post_batch("x", encode_batch("x", [wire_observation(0)]), keys=[("s", "t")])
    assert KEY not in str(caught.value) and "it names batch" in str(caught.value)


def test_post_batch_with_keys_checks_the_answer_against_them(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, rows = batch(3)
    keys = [(r["series_id"], r["ts"]) for r in rows]
    router.post(INGEST).respond(200, json={"batch_id": batch_id, "accepted": 0, "rejected": []})
    with pytest.raises(ProtocolError, match=r"accepted 0 \+ rejected 0 != 3 rows sent"):
        client.post_batch(batch_id, body, keys=keys)
    assert client.post_batch(batch_id, body).accepted == 0  # without keys: the shape only


# -- check_result: the acknowledgement rule ------------------------------------------------


KEYS = [("EIA.PJM.demand", "2025-08-22T00:00:00Z"), ("EIA.PJM.demand", "2025-08-22T01:00:00Z")]


def rejection(index: int, series_id: str = "EIA.PJM.demand", ts: str | None = None) -> Rejection:
    return Rejection(index, series_id, ts or KEYS[index % 2][1], "BAD", "bad")


@pytest.mark.parametrize(
    "result",
    [
        IngestResult("b", 2, ()),
        IngestResult("b", 1, (rejection(1),)),
        IngestResult("b", 0, (rejection(1), rejection(0))),
    ],
)
def test_check_result_accepts_an_answer_that_accounts_for_every_row(
    result: IngestResult,
) -> None:
    check_result(result, "b", KEYS)


@pytest.mark.parametrize(
    ("result", "named"),
    [
        (IngestResult("c", 2, ()), 'it names batch "c"'),
        (IngestResult("b", 0, ()), "accepted 0 + rejected 0 != 2 rows sent"),
        (IngestResult("b", 3, ()), "accepted 3 + rejected 0 != 2 rows sent"),
        (IngestResult("b", 2, (rejection(1),)), "accepted 2 + rejected 1 != 2 rows sent"),
        (IngestResult("b", 1, (rejection(2),)), "rejection index 2 is outside the 2 rows sent"),
        (IngestResult("b", 0, (rejection(1), rejection(1))), "index 1 is rejected twice"),
        (
            IngestResult("b", 1, (rejection(1, "EIA.SPP.demand"),)),
            'rejection 1 names series "EIA.SPP.demand", row 1 sent is EIA.PJM.demand',
        ),
        (
            IngestResult("b", 1, (rejection(1, ts=KEYS[0][1]),)),
            'rejection 1 names ts "2025-08-22T00:00:00Z", row 1 sent has ts 2025-08-22T01:00:00Z',
        ),
    ],
)
def test_check_result_refuses_an_inconsistent_answer(result: IngestResult, named: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_result(result, "b", KEYS)
    assert str(caught.value) == (
        f"GridPulse's answer to batch b is inconsistent: {named}; "
        "no row changed, the next send retries"
    )


def test_check_result_takes_claimed_rows_as_keys() -> None:
    rows = [(sid, ts, "rev", 0) for sid, ts in KEYS]  # a store row: series_id, ts, ...
    check_result(IngestResult("b", 1, (rejection(0),)), "b", rows)
    with pytest.raises(ProtocolError):
        check_result(IngestResult("b", 2, (rejection(0),)), "b", rows)


def test_unexpected_status_is_an_unmarked_sink_error(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(1)
    router.post(INGEST).respond(404, json=error_json("NOT_FOUND", "no such route"))
    with pytest.raises(SinkError) as caught:
        client.post_batch(batch_id, body)
    assert not isinstance(caught.value, TransientError | TerminalError)


def test_bytes_sent_counts_failed_attempts(
    router: respx.MockRouter, client: GridPulseClient
) -> None:
    batch_id, body, _ = batch(2)
    router.post(INGEST).mock(
        side_effect=[
            httpx.Response(503, json=error_json("UNAVAILABLE", "down")),
            httpx.Response(200, json={"batch_id": batch_id, "accepted": 2, "rejected": []}),
        ]
    )
    with pytest.raises(SinkTransientError):
        client.post_batch(batch_id, body)
    client.post_batch(batch_id, body)
    assert client.bytes_sent == 2 * len(gzip.compress(body, 1, mtime=0))


# -- read endpoints ------------------------------------------------------------------------


def test_auth_worker(router: respx.MockRouter, client: GridPulseClient) -> None:
    answer = {"worker_id": "w1", "authenticated": True, "server_time": "2025-08-22T14:00:01Z"}
    route = router.post("/api/v1/auth/worker").respond(200, json=answer)
    assert client.auth_worker("w1") == answer
    request = route.calls.last.request
    assert orjson.loads(request.content) == {"worker_id": "w1"}
    assert request.headers["authorization"] == f"Bearer {KEY}"


def test_auth_worker_refused(router: respx.MockRouter, client: GridPulseClient) -> None:
    router.post("/api/v1/auth/worker").respond(401, json=error_json("UNAUTHORIZED", "bad key"))
    with pytest.raises(SinkAuthError, match="bad key"):
        client.auth_worker("w1")


def test_latest(router: respx.MockRouter, client: GridPulseClient) -> None:
    router.get("/api/v1/data/series/EIA.PJM.demand/latest").respond(
        200,
        json={"series_id": "EIA.PJM.demand", "latest_ts": "2025-08-22T14:00:00Z", "revision": "r"},
    )
    router.get("/api/v1/data/series/EIA.SPP.demand/latest").respond(
        200, json={"series_id": "EIA.SPP.demand", "latest_ts": None, "revision": None}
    )
    router.get("/api/v1/data/series/EIA.X.demand/latest").respond(
        404, json=error_json("UNKNOWN_SERIES", "unknown")
    )
    assert client.latest("EIA.PJM.demand") == ("2025-08-22T14:00:00Z", "r")
    assert client.latest("EIA.SPP.demand") == (None, None)
    assert client.latest("EIA.X.demand") is None


def test_latest_transient(router: respx.MockRouter, client: GridPulseClient) -> None:
    router.get("/api/v1/data/series/EIA.PJM.demand/latest").respond(503)
    with pytest.raises(SinkTransientError):
        client.latest("EIA.PJM.demand")


def test_list_series(router: respx.MockRouter, client: GridPulseClient) -> None:
    series = [{"series_id": "EIA.PJM.demand", "count": 2, "latest_ts": "2025-08-22T01:00:00Z"}]
    router.get("/api/v1/data/series").respond(200, json={"series": series})
    assert client.list_series() == series


def test_observations_follow_next(router: respx.MockRouter, client: GridPulseClient) -> None:
    path = "/api/v1/data/series/EIA.PJM.demand/observations"
    first = {"ts": "2025-08-22T00:00:00Z", "value": 1.0, "quality_flag": "good", "revision": "a"}
    second = {**first, "ts": "2025-08-22T01:00:00Z"}
    route = router.get(path).mock(
        side_effect=[
            httpx.Response(
                200,
                json={
                    "series_id": "EIA.PJM.demand",
                    "observations": [first],
                    "next": second["ts"],
                },
            ),
            httpx.Response(
                200, json={"series_id": "EIA.PJM.demand", "observations": [second], "next": None}
            ),
        ]
    )
    rows = list(
        client.observations("EIA.PJM.demand", "2025-08-22T00:00:00Z", "2025-08-23T00:00:00Z")
    )
    assert rows == [first, second]
    starts = [call.request.url.params["start"] for call in route.calls]
    assert starts == ["2025-08-22T00:00:00Z", "2025-08-22T01:00:00Z"]
    assert {call.request.url.params["end"] for call in route.calls} == {"2025-08-23T00:00:00Z"}


def test_health(router: respx.MockRouter, client: GridPulseClient) -> None:
    route = router.get("/api/v1/health").mock(
        side_effect=[
            httpx.Response(200, json={"status": "ok"}),
            httpx.Response(503),
            httpx.Response(200, text="ok"),
            httpx.ConnectError("refused"),
        ]
    )
    assert [client.health() for _ in range(4)] == [True, False, False, False]
    assert "authorization" not in route.calls[0].request.headers


def test_the_sink_prepares_claimed_rows_as_encode_batch_does() -> None:
    """The send path builds each body from claimed rows directly: the same bytes and the
    same batch id as encode_batch over the wire dicts, with and without source_data."""
    wire = [
        wire_observation(0),
        wire_observation(1, "EIA.PJM.generation.gas", value=None, quality_flag="missing"),
        wire_observation(2, "EIA.PJM.interchange.MISO", value=-12.375),
    ]
    claimed = [
        Claimed(**{k: w[k] for k in WIRE_FIELDS}, attempts=0, page_id=None, page_row=None)
        for w in wire
    ]

    class Packer:
        def pack(self, body: bytes) -> bytes:
            return b"packed:" + body

    sink = GridPulseSink(Packer())  # type: ignore[arg-type]
    keys = [(w["series_id"], w["ts"], w["revision"]) for w in wire]
    batch_id = batch_id_of(keys)
    plain = sink.prepare(Batch(claimed))
    assert plain.payload.body == encode_batch(batch_id, wire)
    assert plain.payload.batch_id == batch_id and plain.payload.keys == keys
    assert plain.payload.packed == b"packed:" + plain.payload.body
    assert plain.size == len(plain.payload.body)
    sources = [{"period": "2025-08-22T00"}, None, {"period": "2025-08-22T02"}]
    with_sources = sink.prepare(Batch(claimed, sources))
    expected = [{**w, "source_data": s} for w, s in zip(wire, sources, strict=True)]
    assert with_sources.payload.body == encode_batch(batch_id, expected)
