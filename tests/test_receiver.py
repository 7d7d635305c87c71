"""The reference receiver in process (Starlette TestClient) on a SQLite file in tmp_path."""

from __future__ import annotations

import gzip
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from factories import wire_observation
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable
from starlette.exceptions import StarletteDeprecationWarning

from outbox.receiver import Faults, create_app, seed_catalog
from outbox.receiver.app import MAX_DECODED_BYTES
from outbox.receiver.db import compile_upsert, metadata, to_url
from outbox.sample.receiver import receiver_batches
from outbox.sinks.gridpulse import batch_id_of, check_result, encode_batch, parse_ingest_result

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 fork for its TestClient and warns once on import
    # when only httpx is installed; the httpx-based client works the same.
    warnings.filterwarnings(
        "ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning
    )
    from starlette.testclient import TestClient

KEY = "receiver-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INGEST = "/api/v1/data/observations"
SERIES = "/api/v1/data/series"
T0 = datetime(2025, 8, 22, tzinfo=UTC)


def hour(i: int) -> str:
    return (T0 + timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%SZ")


def body_of(rows: Sequence[dict[str, Any]], batch_id: str | None = None) -> tuple[str, bytes]:
    batch_id = batch_id or batch_id_of((r["series_id"], r["ts"], r["revision"]) for r in rows)
    return batch_id, encode_batch(batch_id, rows)


def headers(batch_id: str | None, *, gzipped: bool = True) -> dict[str, str]:
    result = {**AUTH, "Content-Type": "application/json"}
    if batch_id is not None:
        result["Idempotency-Key"] = batch_id
    if gzipped:
        result["Content-Encoding"] = "gzip"
    return result


def post_rows(client: TestClient, rows: Sequence[dict[str, Any]], batch_id: str | None = None):
    batch_id, body = body_of(rows, batch_id)
    return client.post(INGEST, content=gzip.compress(body, 1), headers=headers(batch_id))


def post_raw(client: TestClient, body: bytes, batch_id: str | None = "b1", **kw: Any):
    return client.post(INGEST, content=body, headers=headers(batch_id, gzipped=False), **kw)


def stored(client: TestClient, series_id: str = "EIA.PJM.demand") -> dict[str, tuple]:
    response = client.get(
        f"{SERIES}/{series_id}/observations",
        params={"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    return {
        row["ts"]: (row["value"], row["quality_flag"], row["revision"])
        for row in response.json()["observations"]
    }


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and isinstance(error["details"], dict)
    return error


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "receiver.db"


@pytest.fixture
def make_client(db_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(*, catalog: str = "auto", faults: Sequence[str] = ()) -> TestClient:
        app = create_app(to_url(db_path), KEY, catalog=catalog, faults=Faults.parse(faults))
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


# -- health, auth, routing -------------------------------------------------------------


def test_health_needs_no_key(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", INGEST),
        ("POST", "/api/v1/auth/worker"),
        ("GET", SERIES),
        ("GET", f"{SERIES}/EIA.PJM.demand/latest"),
        ("GET", f"{SERIES}/EIA.PJM.demand/observations"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", "Bearer"])
def test_missing_or_wrong_key_is_401(
    client: TestClient, method: str, path: str, authorization: str | None
) -> None:
    sent = {} if authorization is None else {"Authorization": authorization}
    response = client.request(method, path, headers=sent)
    assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["www-authenticate"] == "Bearer"


def test_auth_worker(client: TestClient) -> None:
    response = client.post("/api/v1/auth/worker", json={"worker_id": "w1"}, headers=AUTH)
    assert response.status_code == 200
    payload = response.json()
    assert payload["worker_id"] == "w1" and payload["authenticated"] is True
    server_time = datetime.fromisoformat(payload["server_time"])
    assert payload["server_time"].endswith("Z")
    assert abs((server_time - datetime.now(UTC)).total_seconds()) < 60


def test_auth_worker_bad_bodies(client: TestClient) -> None:
    assert_error(
        client.post("/api/v1/auth/worker", content=b"{", headers=AUTH), 400, "INVALID_JSON"
    )
    assert_error(
        client.post("/api/v1/auth/worker", json={"worker": "w"}, headers=AUTH), 422, "INVALID_SHAPE"
    )


def test_unknown_route_and_method_have_the_error_body(client: TestClient) -> None:
    assert_error(client.get("/api/v1/nope", headers=AUTH), 404, "NOT_FOUND")
    assert_error(client.get(INGEST, headers=AUTH), 405, "METHOD_NOT_ALLOWED")


# -- ingest: whole-batch statuses ----------------------------------------------------------


def test_ingest_gzip_accepts_and_stores(client: TestClient) -> None:
    rows = [wire_observation(i) for i in range(3)]
    response = post_rows(client, rows)
    assert response.status_code == 200, response.text
    batch_id = response.json()["batch_id"]
    assert response.json() == {"batch_id": batch_id, "accepted": 3, "rejected": []}
    assert stored(client) == {hour(i): (1000.0 + i, "good", f"r{i}") for i in range(3)}


def test_ingest_identity_encoding(client: TestClient) -> None:
    batch_id, body = body_of([wire_observation(0)])
    response = post_raw(client, body, batch_id)
    assert response.status_code == 200 and response.json()["accepted"] == 1


def test_ingest_empty_batch(client: TestClient) -> None:
    response = post_raw(client, encode_batch("empty", []), "empty")
    assert response.json() == {"batch_id": "empty", "accepted": 0, "rejected": []}


@pytest.mark.parametrize(
    ("content", "extra", "status", "code"),
    [
        (b"{not json", {}, 400, "INVALID_JSON"),
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "INVALID_ENCODING"),
        (
            gzip.compress(b'{"batch_id": "b1"}', mtime=0)[:-6],
            {"Content-Encoding": "gzip"},
            400,
            "INVALID_ENCODING",
        ),
        (b"{}", {"Content-Encoding": "br"}, 400, "UNSUPPORTED_ENCODING"),
        (b"{}", {"Content-Type": "text/plain"}, 400, "UNSUPPORTED_MEDIA_TYPE"),
        (b"[]", {}, 422, "INVALID_SHAPE"),
        (b'{"batch_id": "b1", "source": "eia-930"}', {}, 422, "INVALID_SHAPE"),
        (b'{"batch_id": "b1", "source": "eia-930", "observations": {}}', {}, 422, "INVALID_SHAPE"),
        (
            b'{"batch_id": "b1", "source": "eia-930", "observations": [], "x": 1}',
            {},
            422,
            "INVALID_SHAPE",
        ),
        (b'{"batch_id": 1, "source": "eia-930", "observations": []}', {}, 422, "INVALID_SHAPE"),
    ],
)
def test_ingest_bad_bodies(
    client: TestClient, content: bytes, extra: dict[str, str], status: int, code: str
) -> None:
    response = client.post(
        INGEST, content=content, headers={**headers("b1", gzipped=False), **extra}
    )
    assert_error(response, status, code)


@pytest.mark.parametrize(
    ("change", "details"),
    [
        (lambda row: row.pop("revision"), {"missing": ["revision"]}),
        (lambda row: row.update(extra=1), {"unknown": ["extra"]}),
        (lambda row: row.update(value="95321"), {"fields": ["value"]}),
        (lambda row: row.update(value=True), {"fields": ["value"]}),
        (lambda row: row.update(ts=None), {"fields": ["ts"]}),
        (lambda row: row.update(subtype=3), {"fields": ["subtype"]}),
        (lambda row: row.update(source_data=[1]), {"fields": ["source_data"]}),
    ],
    ids=["missing", "unknown", "string-value", "bool-value", "null-ts", "int-subtype", "list-sd"],
)
def test_ingest_row_of_the_wrong_shape_fails_the_batch(
    client: TestClient, change: Callable[[dict], Any], details: dict[str, Any]
) -> None:
    rows = [wire_observation(0), wire_observation(1)]
    change(rows[1])
    body = orjson.dumps({"batch_id": "b-shape", "source": "eia-930", "observations": rows})
    error = assert_error(post_raw(client, body, "b-shape"), 422, "INVALID_OBSERVATION")
    assert error["details"]["index"] == 1
    for key, value in details.items():
        assert error["details"][key] == value
    assert client.get(SERIES, headers=AUTH).json() == {"series": []}


def test_ingest_row_that_is_not_an_object(client: TestClient) -> None:
    body = orjson.dumps(
        {"batch_id": "b", "source": "eia-930", "observations": [wire_observation(), 5]}
    )
    error = assert_error(post_raw(client, body, "b"), 422, "INVALID_OBSERVATION")
    assert error["details"] == {"index": 1}


def test_idempotency_key_missing_or_different(client: TestClient) -> None:
    _, body = body_of([wire_observation(0)])
    assert_error(post_raw(client, body, None), 400, "MISSING_IDEMPOTENCY_KEY")
    assert_error(post_raw(client, body, "another"), 422, "IDEMPOTENCY_KEY_MISMATCH")


def test_more_than_5000_rows_is_413(client: TestClient) -> None:
    rows = [wire_observation(i) for i in range(5001)]
    batch_id, body = body_of(rows)
    error = assert_error(
        client.post(INGEST, content=gzip.compress(body, 1), headers=headers(batch_id)),
        413,
        "BATCH_TOO_LARGE",
    )
    assert error["details"]["max_rows"] == 5000
    assert post_rows(client, rows[:5000]).json()["accepted"] == 5000


def test_more_than_10_mib_decoded_is_413(client: TestClient) -> None:
    padding = {"raw": "x" * 4096}
    rows = [wire_observation(i, source_data=padding) for i in range(2600)]
    batch_id, body = body_of(rows)
    assert len(body) > MAX_DECODED_BYTES
    gzipped = client.post(INGEST, content=gzip.compress(body, 1), headers=headers(batch_id))
    assert_error(gzipped, 413, "BATCH_TOO_LARGE")
    assert_error(post_raw(client, body, batch_id), 413, "BATCH_TOO_LARGE")


# -- ingest: per-row rules and upserts ----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"ts": "2025-08-22T14:30:00Z"}, "INVALID_TS"),
        ({"ts": "2025-08-22 14:00:00"}, "INVALID_TS"),
        ({"ts": "2025-08-22T14:00:00+00:00"}, "INVALID_TS"),
        ({"ts": "2025-02-30T14:00:00Z"}, "INVALID_TS"),
        ({"value": None}, "INVALID_VALUE"),
        ({"quality_flag": "bad"}, "INVALID_QUALITY_FLAG"),
        ({"type": "load"}, "INVALID_TYPE"),
        ({"ba": "MISO"}, "SERIES_MISMATCH"),
        ({"subtype": "gas"}, "SERIES_MISMATCH"),
        ({"value": -5.0}, "VALUE_OUT_OF_RANGE"),
        ({"value": 1e12}, "VALUE_OUT_OF_RANGE"),
    ],
)
def test_per_row_rejections(client: TestClient, overrides: dict[str, Any], code: str) -> None:
    rows = [wire_observation(0), wire_observation(1, **overrides), wire_observation(2)]
    response = post_rows(client, rows)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["accepted"] == 2
    [rejection] = payload["rejected"]
    assert rejection["index"] == 1 and rejection["code"] == code
    assert rejection["series_id"] == rows[1]["series_id"] and rejection["ts"] == rows[1]["ts"]
    assert rejection["message"]
    assert set(stored(client)) == {hour(0), hour(2)}


def test_value_rules_that_are_allowed(client: TestClient) -> None:
    rows = [
        wire_observation(0, value=None, quality_flag="missing"),
        wire_observation(1, value=7.0, quality_flag="missing"),
        wire_observation(2, quality_flag="estimated", value=12),
        wire_observation(3, value=1.23456),
        wire_observation(0, "EIA.PJM.net_generation", value=-40.0),
        wire_observation(0, "EIA.PJM.interchange.MISO", value=-1200.0),
        wire_observation(0, "EIA.CAISO.generation.solar", value=0.0),
    ]
    response = post_rows(client, rows)
    assert response.json()["accepted"] == len(rows), response.text
    assert stored(client)[hour(0)] == (None, "missing", "r0")
    assert stored(client)[hour(2)] == (12.0, "estimated", "r2")
    assert stored(client)[hour(3)][0] == 1.235  # numeric(12,3)
    assert stored(client, "EIA.PJM.interchange.MISO")[hour(0)][0] == -1200.0


def test_rejections_are_sorted_by_index(client: TestClient, db_path: Path) -> None:
    seed_catalog(to_url(db_path), ["EIA.PJM.demand"])
    fixed = TestClient(create_app(to_url(db_path), KEY, catalog="fixed"))
    rows = [
        wire_observation(0, "EIA.SPP.demand"),
        wire_observation(1, value=-1.0),
        wire_observation(2),
    ]
    with fixed:
        payload = post_rows(fixed, rows).json()
    assert [(r["index"], r["code"]) for r in payload["rejected"]] == [
        (0, "UNKNOWN_SERIES"),
        (1, "VALUE_OUT_OF_RANGE"),
    ]


def test_answers_with_rejections_account_for_every_row(db_path: Path) -> None:
    """The receiver's answers satisfy the worker's acknowledgement rule (check_result)."""
    seed_catalog(to_url(db_path), ["EIA.PJM.demand", "EIA.PJM.net_generation"])
    fixed = TestClient(
        create_app(
            to_url(db_path),
            KEY,
            catalog="fixed",
            faults=Faults.parse(["reject:series_id=EIA.PJM.net_generation:BLOCKED"]),
        )
    )
    rows = [wire_observation(i) for i in range(6)]
    rows[1] = wire_observation(1, value=-1.0)  # value rule
    rows[3] = wire_observation(3, "EIA.SPP.demand")  # not in the catalogue
    rows[4] = wire_observation(4, "EIA.PJM.net_generation")  # refused by the fault
    rows.append(wire_observation(7, value=None))  # null without quality_flag "missing"
    with fixed:
        for batch in (rows, rows[:1], [rows[3]], list(reversed(rows))):
            batch_id, _ = body_of(batch)
            response = post_rows(fixed, batch)
            assert response.status_code == 200, response.text
            result = parse_ingest_result(response.json(), batch_id)
            check_result(result, batch_id, [(r["series_id"], r["ts"]) for r in batch])
    assert result.accepted == 3 and len(result.rejected) == 4
    assert {r.code for r in result.rejected} == {
        "VALUE_OUT_OF_RANGE",
        "UNKNOWN_SERIES",
        "BLOCKED",
        "INVALID_VALUE",
    }


def test_upsert_last_write_wins(client: TestClient) -> None:
    post_rows(client, [wire_observation(0, value=1.0, revision="a")])
    post_rows(client, [wire_observation(0, value=2.0, revision="b")])
    assert stored(client) == {hour(0): (2.0, "good", "b")}
    post_rows(client, [wire_observation(0, value=1.0, revision="a")])
    assert stored(client) == {hour(0): (1.0, "good", "a")}


def test_same_row_twice_in_a_batch_keeps_the_last(client: TestClient) -> None:
    rows = [
        wire_observation(0, value=1.0, revision="a"),
        wire_observation(0, value=2.0, revision="b"),
    ]
    assert post_rows(client, rows).json()["accepted"] == 2
    assert stored(client) == {hour(0): (2.0, "good", "b")}


def test_retry_is_idempotent_and_counted(client: TestClient, db_path: Path) -> None:
    rows = [wire_observation(i) for i in range(4)]
    first = post_rows(client, rows)
    again = post_rows(client, rows)
    assert first.json() == again.json()
    assert stored(client) == {hour(i): (1000.0 + i, "good", f"r{i}") for i in range(4)}
    [record] = receiver_batches(db_path).values()
    assert record["batch_id"] == first.json()["batch_id"]
    assert (record["times_seen"], record["rows"], record["accepted"], record["rejected"]) == (
        2,
        4,
        4,
        0,
    )


def test_same_key_different_body_is_409_and_writes_nothing(
    client: TestClient, db_path: Path
) -> None:
    rows = [wire_observation(0), wire_observation(1)]
    batch_id = post_rows(client, rows).json()["batch_id"]
    changed = [wire_observation(0, value=5.0), wire_observation(1)]
    error = assert_error(post_rows(client, changed, batch_id), 409, "IDEMPOTENCY_KEY_REUSED")
    assert error["details"] == {"batch_id": batch_id}
    assert stored(client)[hour(0)] == (1000.0, "good", "r0")
    assert receiver_batches(db_path)[batch_id]["times_seen"] == 1


def test_source_data_does_not_make_a_different_body(client: TestClient) -> None:
    rows = [wire_observation(0)]
    batch_id = post_rows(client, rows).json()["batch_id"]
    with_raw = [wire_observation(0, source_data={"period": "2025-08-22T00"})]
    assert post_rows(client, with_raw, batch_id).status_code == 200


def test_auto_catalogue_creates_series(client: TestClient) -> None:
    rows = [
        wire_observation(0),
        wire_observation(1),
        wire_observation(0, "EIA.CAISO.generation.solar", units="MWh"),
    ]
    post_rows(client, rows)
    response = client.get(SERIES, headers=AUTH)
    assert response.json() == {
        "series": [
            {
                "series_id": "EIA.CAISO.generation.solar",
                "ba": "CAISO",
                "type": "generation",
                "subtype": "solar",
                "units": "MWh",
                "count": 1,
                "latest_ts": hour(0),
            },
            {
                "series_id": "EIA.PJM.demand",
                "ba": "PJM",
                "type": "demand",
                "subtype": None,
                "units": "MW",
                "count": 2,
                "latest_ts": hour(1),
            },
        ]
    }


def test_fixed_catalogue_rejects_unknown_series(
    make_client: Callable[..., TestClient], db_path: Path
) -> None:
    assert seed_catalog(to_url(db_path), ["EIA.PJM.demand", "EIA.PJM.interchange.MISO"]) == 2
    assert seed_catalog(to_url(db_path), ["EIA.PJM.demand"]) == 0
    client = make_client(catalog="fixed")
    rows = [
        wire_observation(0),
        wire_observation(0, "EIA.SPP.demand"),
        wire_observation(1, "EIA.SPP.demand"),
    ]
    payload = post_rows(client, rows).json()
    assert payload["accepted"] == 1
    assert [(r["index"], r["code"]) for r in payload["rejected"]] == [
        (1, "UNKNOWN_SERIES"),
        (2, "UNKNOWN_SERIES"),
    ]
    listed = [s["series_id"] for s in client.get(SERIES, headers=AUTH).json()["series"]]
    assert listed == ["EIA.PJM.demand", "EIA.PJM.interchange.MISO"]
    # a series seeded while the receiver runs is accepted from then on
    seed_catalog(to_url(db_path), ["EIA.SPP.demand"])
    assert post_rows(client, rows).json()["accepted"] == 3


def test_seed_catalog_refuses_malformed_ids(db_path: Path) -> None:
    with pytest.raises(ValueError, match="not a GridPulse series id"):
        seed_catalog(to_url(db_path), ["PJM.demand"])


# -- read endpoints ------------------------------------------------------------------------


def test_latest(make_client: Callable[..., TestClient], db_path: Path) -> None:
    seed_catalog(to_url(db_path), ["EIA.SPP.demand"])
    client = make_client()
    assert_error(client.get(f"{SERIES}/EIA.X.demand/latest", headers=AUTH), 404, "UNKNOWN_SERIES")
    empty = client.get(f"{SERIES}/EIA.SPP.demand/latest", headers=AUTH)
    assert empty.json() == {"series_id": "EIA.SPP.demand", "latest_ts": None, "revision": None}
    post_rows(
        client, [wire_observation(5), wire_observation(2), wire_observation(9, revision="last")]
    )
    latest = client.get(f"{SERIES}/EIA.PJM.demand/latest", headers=AUTH)
    assert latest.json() == {
        "series_id": "EIA.PJM.demand",
        "latest_ts": hour(9),
        "revision": "last",
    }


def test_observations_window_is_start_inclusive_end_exclusive(client: TestClient) -> None:
    post_rows(client, [wire_observation(i) for i in range(6)])
    response = client.get(
        f"{SERIES}/EIA.PJM.demand/observations",
        params={"start": hour(1), "end": hour(4)},
        headers=AUTH,
    )
    payload = response.json()
    assert [row["ts"] for row in payload["observations"]] == [hour(1), hour(2), hour(3)]
    assert payload["next"] is None and payload["series_id"] == "EIA.PJM.demand"
    assert payload["observations"][0] == {
        "ts": hour(1),
        "value": 1001.0,
        "quality_flag": "good",
        "revision": "r1",
    }


def test_observations_accept_offsets_and_fractions(client: TestClient) -> None:
    post_rows(client, [wire_observation(i) for i in range(4)])
    response = client.get(
        f"{SERIES}/EIA.PJM.demand/observations",
        params={"start": "2025-08-22T02:00:00+02:00", "end": "2025-08-22T02:00:00.5Z"},
        headers=AUTH,
    )
    assert [row["ts"] for row in response.json()["observations"]] == [hour(0), hour(1), hour(2)]


def test_observations_page_with_next(client: TestClient) -> None:
    for chunk in range(3):
        post_rows(client, [wire_observation(chunk * 5000 + i) for i in range(5000)])
    params = {"start": hour(0), "end": hour(20_000)}
    first = client.get(f"{SERIES}/EIA.PJM.demand/observations", params=params, headers=AUTH)
    page = first.json()
    assert len(page["observations"]) == 10_000
    assert page["next"] == hour(10_000)
    rest = client.get(
        f"{SERIES}/EIA.PJM.demand/observations",
        params={**params, "start": page["next"]},
        headers=AUTH,
    ).json()
    assert len(rest["observations"]) == 5000 and rest["next"] is None
    assert rest["observations"][0]["ts"] == hour(10_000)


@pytest.mark.parametrize(
    "params",
    [
        {"end": "2025-08-23T00:00:00Z"},
        {"start": "2025-08-22T00:00:00Z"},
        {"start": "yesterday", "end": "2025-08-23T00:00:00Z"},
        {"start": "2025-08-22T00:00:00", "end": "2025-08-23T00:00:00Z"},
    ],
)
def test_observations_bad_parameters(client: TestClient, params: dict[str, str]) -> None:
    post_rows(client, [wire_observation(0)])
    response = client.get(f"{SERIES}/EIA.PJM.demand/observations", params=params, headers=AUTH)
    assert_error(response, 400, "INVALID_PARAMETER")


def test_observations_unknown_series(client: TestClient) -> None:
    response = client.get(
        f"{SERIES}/EIA.X.demand/observations",
        params={"start": hour(0), "end": hour(1)},
        headers=AUTH,
    )
    assert_error(response, 404, "UNKNOWN_SERIES")


# -- faults ----------------------------------------------------------------------------------


def test_fault_503_fraction_is_seeded(make_client: Callable[..., TestClient]) -> None:
    def statuses(spec: str) -> list[int]:
        client = make_client(faults=[spec])
        return [post_rows(client, [wire_observation(i)]).status_code for i in range(40)]

    first = statuses("503:0.5:7")
    assert first == statuses("503:0.5:7")
    assert set(first) == {200, 503} and 8 < first.count(503) < 32
    assert set(statuses("503:1")) == {503} and set(statuses("503:0")) == {200}


def test_fault_503_stores_nothing(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["503:1"])
    assert_error(post_rows(client, [wire_observation(0)]), 503, "UNAVAILABLE")
    assert client.get(SERIES, headers=AUTH).json() == {"series": []}


def test_fault_429(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["429:1"])
    response = post_rows(client, [wire_observation(0)])
    assert_error(response, 429, "RATE_LIMITED")
    assert response.headers["retry-after"] == "1"


def test_fault_latency(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["latency:80ms"])
    started = time.perf_counter()
    assert post_rows(client, [wire_observation(0)]).status_code == 200
    assert time.perf_counter() - started >= 0.08
    assert Faults.parse(["latency:0.5s"]).latency == 0.5
    assert Faults.parse(["latency:20"]).latency == 0.02


def test_fault_reject(make_client: Callable[..., TestClient]) -> None:
    client = make_client(
        faults=[
            "reject:series_id=EIA.PJM.*:VALUE_OUT_OF_RANGE",
            "reject:ts=2025-08-22T03:00:00Z:STALE",
        ]
    )
    rows = [
        wire_observation(0),
        wire_observation(0, "EIA.SPP.demand"),
        wire_observation(3, "EIA.SPP.demand"),
    ]
    payload = post_rows(client, rows).json()
    assert payload["accepted"] == 1
    assert [(r["index"], r["code"]) for r in payload["rejected"]] == [
        (0, "VALUE_OUT_OF_RANGE"),
        (2, "STALE"),
    ]
    assert "reject:series_id=EIA.PJM.*" in payload["rejected"][0]["message"]


def test_fault_poison_fails_the_whole_batch(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["poison:ts=2025-08-22T0[3-4]:00:00Z"])
    rows = [wire_observation(i) for i in range(6)]
    error = assert_error(post_rows(client, rows), 422, "POISONED_ROW")
    assert error["details"] == {"index": 3}
    assert post_rows(client, rows[:3]).json()["accepted"] == 3
    assert post_rows(client, rows[5:]).json()["accepted"] == 1
    assert set(stored(client)) == {hour(0), hour(1), hour(2), hour(5)}


def test_fault_413_above_n_rows(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["413:>2"])
    error = assert_error(
        post_rows(client, [wire_observation(i) for i in range(3)]), 413, "BATCH_TOO_LARGE"
    )
    assert error["details"]["max_rows"] == 2
    assert post_rows(client, [wire_observation(i) for i in range(2)]).status_code == 200


def test_fault_down_then_up(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["down:0.3:2"])
    response = post_rows(client, [wire_observation(0)])
    assert_error(response, 503, "UNAVAILABLE")
    assert response.headers["retry-after"] == "2"
    assert client.get("/api/v1/health").status_code == 200
    time.sleep(0.35)
    assert post_rows(client, [wire_observation(0)]).status_code == 200


def test_fault_down_without_retry_after(make_client: Callable[..., TestClient]) -> None:
    response = post_rows(make_client(faults=["down:60"]), [wire_observation(0)])
    assert response.status_code == 503 and "retry-after" not in response.headers


def test_fault_auth_403_only_for_ingest(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["auth:403"])
    assert_error(post_rows(client, [wire_observation(0)]), 403, "FORBIDDEN")
    assert client.get(SERIES, headers=AUTH).status_code == 200
    assert client.post("/api/v1/auth/worker", json={"worker_id": "w"}, headers=AUTH).is_success
    wrong = client.post(INGEST, content=b"{}", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "UNAUTHORIZED")


def test_fault_lost_response_still_stores(
    make_client: Callable[..., TestClient], db_path: Path
) -> None:
    client = make_client(faults=["lost:1"])
    response = post_rows(client, [wire_observation(0)])
    assert_error(response, 503, "UNAVAILABLE")
    assert set(stored(client)) == {hour(0)}
    assert [b["times_seen"] for b in receiver_batches(db_path).values()] == [1]


def test_faults_leave_read_endpoints_alone(make_client: Callable[..., TestClient]) -> None:
    client = make_client(faults=["503:1", "429:1", "down:60", "auth:403"])
    assert client.get(SERIES, headers=AUTH).status_code == 200
    assert client.get("/api/v1/health").status_code == 200


@pytest.mark.parametrize(
    "spec",
    [
        "teapot:1",
        "503:2",
        "503:x",
        "reject:series_id=EIA.*",
        "reject:value=1:CODE",
        "poison:series_id",
        "auth:500",
        "413:>many",
        "latency:fast",
    ],
)
def test_bad_fault_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="bad --fault"):
        Faults.parse([spec])


# -- logging and speed -------------------------------------------------------------------------


def test_one_log_line_per_request_without_the_key(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="outbox.receiver"):
        post_rows(client, [wire_observation(i) for i in range(3)])
        client.get("/api/v1/health")
        client.get(SERIES, headers={"Authorization": "Bearer wrong-key-xyz"})
    lines = [r.getMessage() for r in caplog.records if r.name == "outbox.receiver.app"]
    assert len(lines) == 3
    assert lines[0].startswith("POST /api/v1/data/observations 200 rows=3 ")
    assert lines[0].endswith("ms")
    assert lines[1].startswith("GET /api/v1/health 200 rows=- ")
    assert lines[2].startswith("GET /api/v1/data/series 401 ")
    assert KEY not in caplog.text and "wrong-key-xyz" not in caplog.text


def test_upsert_is_one_executemany_per_request(client: TestClient) -> None:
    statements: list[tuple[str, bool]] = []
    engine = client.app.state.db.engine  # type: ignore[attr-defined]

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append((statement, executemany))

    event.listen(engine, "before_cursor_execute", record)
    try:
        post_rows(client, [wire_observation(i) for i in range(500)])
    finally:
        event.remove(engine, "before_cursor_execute", record)
    upserts = [many for sql, many in statements if sql.startswith("INSERT INTO observations")]
    assert upserts == [True]
    assert len(statements) < 12


def test_5000_row_gzip_batch_is_fast(client: TestClient) -> None:
    series = ["EIA.PJM.demand", "EIA.MISO.demand", "EIA.SPP.net_generation", "EIA.ERCOT.demand"]
    timings = []
    for run in range(4):
        rows = [wire_observation(run * 1250 + i // 4, series[i % 4]) for i in range(5000)]
        batch_id, body = body_of(rows)
        payload = gzip.compress(body, 1)
        started = time.perf_counter()
        response = client.post(INGEST, content=payload, headers=headers(batch_id))
        timings.append(time.perf_counter() - started)
        assert response.json()["accepted"] == 5000
    # ~40-70 ms here; the bound catches per-row SQL, not a noisy neighbour
    assert statistics.median(timings[1:]) < 0.5


def test_statements_compile_for_postgresql_too() -> None:
    sql, positional = compile_upsert(postgresql.dialect())
    assert not positional
    assert "ON CONFLICT (series_id, ts) DO UPDATE SET value = excluded.value" in sql
    assert "%(series_id)s" in sql
    ddl = str(CreateTable(metadata.tables["observations"]).compile(dialect=postgresql.dialect()))
    assert "value NUMERIC(12, 3)" in ddl and "PRIMARY KEY (series_id, ts)" in ddl
    assert compile_upsert(sqlite.dialect())[1] is True


def test_to_url() -> None:
    assert to_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert to_url(Path("/tmp/x/../r.db")) == "sqlite:////tmp/r.db"
