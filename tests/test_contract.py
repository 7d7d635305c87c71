"""Worker, receiver and outbox/openapi.yaml agree: the document is the contract."""

from __future__ import annotations

import gzip
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from factories import wire_observation
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.exceptions import StarletteDeprecationWarning
from starlette.routing import Route

import outbox
from outbox.receiver import Faults, create_app, seed_catalog
from outbox.receiver import app as receiver_app
from outbox.receiver.db import to_url
from outbox.sinks.gridpulse import GridPulseClient, batch_id_of, encode_batch

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 fork for its TestClient and warns once on import
    # when only httpx is installed; the httpx-based client works the same.
    warnings.filterwarnings(
        "ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning
    )
    from starlette.testclient import TestClient

SPEC_PATH = Path(outbox.__file__).parent / "openapi.yaml"
SPEC_URI = "urn:gridpulse:openapi"
KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INGEST = "/api/v1/data/observations"
SERIES = "/api/v1/data/series"
REJECTION_CODES = (
    "INVALID_TS",
    "INVALID_QUALITY_FLAG",
    "INVALID_VALUE",
    "INVALID_TYPE",
    "SERIES_MISMATCH",
    "VALUE_OUT_OF_RANGE",
    "UNKNOWN_SERIES",
)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


@pytest.fixture(scope="module")
def registry(spec: dict[str, Any]) -> Registry:
    return Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )


def validator(registry: Registry, pointer: str) -> Draft202012Validator:
    """A validator for the schema at a JSON pointer into the document."""
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"}, registry=registry, format_checker=FormatChecker()
    )


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def response_pointer(spec: dict[str, Any], path: str, method: str, status: int) -> str:
    """The JSON pointer of the documented response body schema; fails if undocumented."""
    responses = spec["paths"][path][method.lower()]["responses"]
    key = str(status) if str(status) in responses else f"{str(status)[0]}XX"
    assert key in responses, f"{method} {path} -> {status} is not documented"
    response = responses[key]
    base = f"/paths/{_escape(path)}/{method.lower()}/responses/{key}"
    if "$ref" in response:
        base = response["$ref"].removeprefix("#")
    return f"{base}/content/application~1json/schema"


def documented_response(spec: dict[str, Any], path: str, method: str, status: int) -> Any:
    """The response object documented for a status, with a ``$ref`` followed."""
    response = spec["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return response


def ingest_headers(batch_id: str | None) -> dict[str, str]:
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    if batch_id is not None:
        headers["Idempotency-Key"] = batch_id
    return headers


def post(client: TestClient, rows: list[dict[str, Any]], batch_id: str | None = None) -> Any:
    batch_id = batch_id or batch_id_of((r["series_id"], r["ts"], r["revision"]) for r in rows)
    body = gzip.compress(encode_batch(batch_id, rows))
    return client.post(INGEST, content=body, headers=ingest_headers(batch_id))


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(faults: tuple[str, ...] = (), catalog: str = "auto") -> TestClient:
        app = create_app(
            to_url(tmp_path / "r.db"), KEY, catalog=catalog, faults=Faults.parse(faults)
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# -- the document itself -------------------------------------------------------------------


def test_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_document_states_hour_ending_and_error_body(spec: dict[str, Any]) -> None:
    description = spec["info"]["description"]
    assert "hour ending" in description.lower()
    assert "13:00 to 14:00 UTC" in description
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["code", "message", "details"]


def test_document_lists_every_contract_status(spec: dict[str, Any]) -> None:
    ingest = spec["paths"][INGEST]["post"]
    assert {"200", "400", "401", "403", "409", "413", "422", "429", "503", "5XX"} <= set(
        ingest["responses"]
    )
    names = {p.get("name") or p["$ref"].rsplit("/", 1)[-1] for p in ingest.get("parameters", [])}
    assert {"IdempotencyKey", "ContentEncoding"} <= names
    assert spec["paths"]["/api/v1/health"]["get"]["security"] == []
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "404" in spec["paths"][SERIES + "/{series_id}/latest"]["get"]["responses"]
    assert "WWW-Authenticate" in documented_response(spec, INGEST, "post", 401)["headers"]


def test_document_and_receiver_share_limits_and_codes(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["IngestRequest"]["properties"]["observations"]["maxItems"] == (
        receiver_app.MAX_ROWS
    )
    assert schemas["ObservationsPage"]["properties"]["observations"]["maxItems"] == (
        receiver_app.PAGE_ROWS
    )
    assert set(schemas["QualityFlag"]["enum"]) == receiver_app.QUALITY_FLAGS
    described = schemas["Rejection"]["properties"]["code"]["description"]
    for code in REJECTION_CODES:
        assert code in described and code in (receiver_app.__doc__ or "")


def test_receiver_routes_are_the_documented_paths(spec: dict[str, Any]) -> None:
    app = create_app("sqlite://", KEY)
    routes = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented


# -- the worker's requests -------------------------------------------------------------------


def test_encode_batch_body_validates_against_the_request_schema(registry: Registry) -> None:
    rows = [
        wire_observation(0),
        wire_observation(1, value=None, quality_flag="missing"),
        wire_observation(2, source_data={"period": "2025-08-22T02", "value": "102"}),
        {
            **wire_observation(3, "EIA.PJM.interchange"),
            "series_id": "EIA.PJM.interchange.MISO",
            "subtype": "MISO",
        },
    ]
    body = orjson.loads(encode_batch("batch-1", rows))
    pointer = f"/paths/{_escape(INGEST)}/post/requestBody/content/application~1json/schema"
    errors = list(validator(registry, pointer).iter_errors(body))
    assert errors == []


def test_request_schema_refuses_what_the_receiver_refuses_as_a_batch(registry: Registry) -> None:
    pointer = "/components/schemas/IngestRequest"
    row = wire_observation(0)
    del row["revision"]
    bad = [
        {"batch_id": "b", "source": "eia-930", "observations": [row]},
        {"batch_id": "b", "source": "eia-930", "observations": [{**wire_observation(0), "x": 1}]},
        {"batch_id": "b", "source": "eia-930", "observations": [wire_observation(0, value="1")]},
        {"batch_id": "b", "observations": []},
    ]
    check = validator(registry, pointer)
    assert all(not check.is_valid(body) for body in bad)


def test_client_request_matches_the_documented_headers(spec: dict[str, Any]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"batch_id": "b1", "accepted": 1, "rejected": []})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        GridPulseClient(http, "http://gp.test", KEY).post_batch(
            "b1", encode_batch("b1", [wire_observation(0)])
        )
    [request] = seen
    parameters = spec["components"]["parameters"]
    assert request.headers[parameters["IdempotencyKey"]["name"]] == "b1"
    assert (
        request.headers[parameters["ContentEncoding"]["name"]]
        in (parameters["ContentEncoding"]["schema"]["enum"])
    )
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.url.path == INGEST


# -- the receiver's responses ------------------------------------------------------------------


def check(spec: dict[str, Any], registry: Registry, method: str, path: str, response: Any) -> None:
    """The response's status is documented for the operation and its body fits the schema."""
    pointer = response_pointer(spec, path, method, response.status_code)
    errors = [error.message for error in validator(registry, pointer).iter_errors(response.json())]
    assert errors == [], (method, path, response.status_code, response.text)


def _template(path: str) -> str:
    return re.sub(r"/data/series/[^/]+/", "/data/series/{series_id}/", path)


def test_receiver_responses_validate(
    spec: dict[str, Any], registry: Registry, make_client: Any, tmp_path: Path
) -> None:
    seed_catalog(to_url(tmp_path / "r.db"), ["EIA.SPP.demand"])
    client = make_client()
    calls: list[tuple[str, str, Any]] = []

    def send(method: str, path: str, **kwargs: Any) -> Any:
        response = client.request(method, path, **kwargs)
        calls.append((method, _template(path), response))
        return response

    def ingest(rows: list[dict[str, Any]], batch_id: str | None = None, **kwargs: Any) -> Any:
        batch_id = batch_id or batch_id_of((r["series_id"], r["ts"], r["revision"]) for r in rows)
        body = gzip.compress(encode_batch(batch_id, rows))
        return send("POST", INGEST, content=body, headers=ingest_headers(batch_id), **kwargs)

    def raw(content: bytes, headers: dict[str, str] | None = None) -> Any:
        return send("POST", INGEST, content=content, headers=headers or ingest_headers("b"))

    rows = [wire_observation(i) for i in range(4)] + [
        wire_observation(4, value=-3.0),
        wire_observation(5, value=None, quality_flag="missing"),
        wire_observation(6, ts="2025-08-22T06:30:00Z"),
    ]
    window = {"start": "2025-08-22T00:00:00Z", "end": "2025-08-23T00:00:00Z"}
    worker = "/api/v1/auth/worker"
    send("GET", "/api/v1/health")
    first = ingest(rows)
    ingest(rows)  # an idempotent retry
    ingest([wire_observation(0, value=1.0)], first.json()["batch_id"])  # 409
    raw(b"{")
    raw(gzip.compress(b"{"))
    raw(gzip.compress(b"[]"))
    raw(b"{}", {"Authorization": "Bearer wrong"})
    ingest([wire_observation(0)], "not-the-batch-id")
    ingest([wire_observation(i % 24, revision=str(i)) for i in range(5001)])
    send("POST", worker, json={"worker_id": "w"}, headers=AUTH)
    send("POST", worker, content=b"{", headers=AUTH)
    send("POST", worker, json={}, headers=AUTH)
    send("POST", worker, json={})
    send("GET", SERIES, headers=AUTH)
    send("GET", SERIES)
    for series_id in ("EIA.PJM.demand", "EIA.SPP.demand", "EIA.X.demand"):
        send("GET", f"{SERIES}/{series_id}/latest", headers=AUTH)
        send("GET", f"{SERIES}/{series_id}/observations", params=window, headers=AUTH)
    send("GET", f"{SERIES}/EIA.PJM.demand/observations", params={"start": "x"}, headers=AUTH)
    send("GET", f"{SERIES}/EIA.PJM.demand/observations", params=window)

    statuses = {(path, response.status_code) for _, path, response in calls}
    assert {(INGEST, s) for s in (200, 400, 401, 409, 413, 422)} <= statuses
    for method, path, response in calls:
        check(spec, registry, method, path, response)
    assert first.json()["accepted"] == 5 and len(first.json()["rejected"]) == 2


@pytest.mark.parametrize(
    ("faults", "status"),
    [
        (("auth:403",), 403),
        (("429:1",), 429),
        (("503:1",), 503),
        (("down:60:5",), 503),
        (("poison:series_id=EIA.*",), 422),
        (("413:>0",), 413),
    ],
)
def test_fault_responses_validate(
    spec: dict[str, Any],
    registry: Registry,
    make_client: Any,
    faults: tuple[str, ...],
    status: int,
) -> None:
    response = post(make_client(faults), [wire_observation(0)])
    assert response.status_code == status
    check(spec, registry, "POST", INGEST, response)
    if "retry-after" in response.headers:
        assert "Retry-After" in documented_response(spec, INGEST, "post", status)["headers"]


def test_fixed_catalogue_rejection_validates(
    spec: dict[str, Any], registry: Registry, make_client: Any
) -> None:
    response = post(make_client(catalog="fixed"), [wire_observation(0)])
    assert response.json()["rejected"][0]["code"] == "UNKNOWN_SERIES"
    check(spec, registry, "POST", INGEST, response)
