"""EIA v2 client and replay source, against recorded EIA bodies served by respx."""

from __future__ import annotations

import itertools
import logging
import shutil
import traceback
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import respx
from freezegun import freeze_time

from outbox.errors import SourceFatalError, SourceTransientError
from outbox.ports import ROUTE_FUEL, ROUTE_INTERCHANGE, ROUTE_REGION, Request
from outbox.retry import RetryPolicy
from outbox.sources.eia import EIAClient, RateLimiter
from outbox.sources.replay import iter_replay_pages

SAMPLES = Path(__file__).parent / "data" / "eia-samples"
BASE = "https://api.eia.gov/v2"
KEY = "K3yK3yK3y0123456789abcdefghijklmnopqrstu"
REGION_PATH = "/electricity/rto/region-data/data/"
FUEL_PATH = "/electricity/rto/fuel-type-data/data/"
T0 = datetime(2024, 1, 1, 0, tzinfo=UTC)
T1 = datetime(2024, 1, 2, 0, tzinfo=UTC)


class FakeTime:
    """A clock and a sleep that advances it, recording every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_doc(name: str) -> dict:
    return orjson.loads(sample(name))


def respond(doc: dict | bytes, status: int = 200, **headers: str) -> httpx.Response:
    content = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return httpx.Response(
        status, content=content, headers={"Content-Type": "application/json"} | headers
    )


def paged(doc: dict, *, total: object = None, echo_key: str | None = None):
    """A respx side effect serving ``doc``'s rows by the request's offset/length."""
    rows = doc["response"]["data"]

    def serve(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        length = int(request.url.params["length"])
        body = orjson.loads(orjson.dumps(doc))
        body["response"]["data"] = rows[offset : offset + length]
        body["response"]["total"] = str(len(rows)) if total is None else total
        body["request"]["params"]["offset"] = str(offset)
        if echo_key is not None:
            body["request"]["params"]["api_key"] = echo_key
        return respond(body)

    return serve


def region_request(*respondents: str) -> Request:
    return Request(ROUTE_REGION, respondents or ("PACW",), ("D",), T0, T1)


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def http():
    with httpx.Client(trust_env=False) as client:
        yield client


@pytest.fixture
def eia():
    with respx.mock(base_url=BASE, assert_all_called=True, assert_all_mocked=True) as mock:
        yield mock


def make_client(http: httpx.Client, fake_time: FakeTime, **kwargs) -> EIAClient:
    options = {
        "retry": RetryPolicy.no_wait(attempts=3),
        "max_per_second": 0,
        "sleep": fake_time.sleep,
        "clock": fake_time.clock,
    } | kwargs
    return EIAClient(http, BASE, options.pop("api_key", KEY), **options)


# --- paging -------------------------------------------------------------------------


@pytest.mark.parametrize("total", [None, 25], ids=["total-string", "total-int"])
def test_pages_until_total(http, eia, fake_time, total) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    route = eia.get(REGION_PATH).mock(side_effect=paged(doc, total=total))
    client = make_client(http, fake_time, page_length=10)

    pages = list(client.iter_pages(region_request()))

    assert [(p.page_no, p.offset, p.total, len(p.rows), p.last) for p in pages] == [
        (0, 0, 25, 10, False),
        (1, 10, 25, 10, False),
        (2, 20, 25, 5, True),
    ]
    assert [c.request.url.params["offset"] for c in route.calls] == ["0", "10", "20"]
    assert [r for p in pages for r in p.rows] == doc["response"]["data"]
    assert client.requests_made == 3
    assert pages[0].params["offset"] == "0" and pages[2].params["offset"] == "20"


def test_short_page_continues_from_rows_received(http, eia, fake_time) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    rows = doc["response"]["data"]

    def serve(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        body = {**doc, "response": {**doc["response"], "data": rows[offset : offset + 7]}}
        return respond(body)  # the API returns fewer rows than asked for

    route = eia.get(REGION_PATH).mock(side_effect=serve)
    pages = list(make_client(http, fake_time, page_length=10).iter_pages(region_request()))

    assert [c.request.url.params["offset"] for c in route.calls] == ["0", "7", "14", "21"]
    assert sum(len(p.rows) for p in pages) == 25 and pages[-1].last


def test_empty_page_before_total_is_fatal(http, eia, fake_time) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    doc["response"]["total"] = "30"
    empty = {**doc, "response": {**doc["response"], "data": []}}
    eia.get(REGION_PATH).mock(side_effect=[respond(doc), respond(empty)])
    client = make_client(http, fake_time, page_length=25)

    with pytest.raises(SourceFatalError) as info:
        list(client.iter_pages(region_request()))

    message = str(info.value)
    assert "electricity/rto/region-data page 1 (offset 25)" in message
    assert "empty page before total 30" in message


def test_more_rows_than_total_is_fatal(http, eia, fake_time) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    doc["response"]["total"] = "20"
    eia.get(REGION_PATH).mock(return_value=respond(doc))

    with pytest.raises(SourceFatalError, match=r"page 0 \(offset 0\).*25 rows.*total 20"):
        list(make_client(http, fake_time).iter_pages(region_request()))


def test_zero_rows_is_one_empty_last_page(http, eia, fake_time, caplog) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    doc["response"] |= {"total": "0", "data": []}
    eia.get(REGION_PATH).mock(return_value=respond(doc))

    with caplog.at_level(logging.WARNING, logger="outbox.sources.eia"):
        pages = list(make_client(http, fake_time).iter_pages(region_request("NOPE")))

    assert [(p.total, p.rows, p.last) for p in pages] == [(0, [], True)]
    assert "no rows for respondents" in caplog.text and "respondents=NOPE" in caplog.text


def test_incomplete_return_warning_is_not_an_error(http, eia, fake_time, caplog) -> None:
    doc = sample_doc("fuel-type-pacw-hourly-2024-01-01_07.json")
    doc["response"]["warnings"] = [{"warning": "incomplete return", "description": "5000 rows"}]
    eia.get(FUEL_PATH).mock(side_effect=paged(doc))
    req = Request(ROUTE_FUEL, ("PACW",), (), T0, datetime(2024, 1, 7, tzinfo=UTC))

    with caplog.at_level(logging.WARNING, logger="outbox.sources.eia"):
        pages = list(make_client(http, fake_time, page_length=500).iter_pages(req))

    assert [len(p.rows) for p in pages] == [500, 225]
    assert "incomplete return" not in caplog.text


# --- request shape ------------------------------------------------------------------


def test_region_query_shape_multi_respondent(http, eia, fake_time) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    route = eia.get(REGION_PATH).mock(return_value=respond(doc))
    req = Request(ROUTE_REGION, ("PJM", "CISO"), (), T0, datetime(2024, 6, 2, 5, tzinfo=UTC))

    list(make_client(http, fake_time).iter_pages(req))

    assert route.calls.last.request.url.params.multi_items() == [
        ("api_key", KEY),
        ("frequency", "hourly"),
        ("data[0]", "value"),
        ("facets[respondent][]", "PJM"),
        ("facets[respondent][]", "CISO"),
        ("facets[type][]", "D"),
        ("facets[type][]", "DF"),
        ("facets[type][]", "NG"),
        ("facets[type][]", "TI"),
        ("start", "2024-01-01T00"),
        ("end", "2024-06-02T05"),
        ("sort[0][column]", "period"),
        ("sort[0][direction]", "asc"),
        ("sort[1][column]", "respondent"),
        ("sort[1][direction]", "asc"),
        ("sort[2][column]", "type"),
        ("sort[2][direction]", "asc"),
        ("offset", "0"),
        ("length", "5000"),
    ]
    assert route.calls.last.request.url.path == "/v2/electricity/rto/region-data/data/"


@pytest.mark.parametrize(
    ("route_name", "values", "expected_facets", "sort_columns"),
    [
        (
            ROUTE_FUEL,
            (),
            [("facets[respondent][]", "ERCO"), ("facets[respondent][]", "SWPP")],
            ["period", "respondent", "fueltype"],
        ),
        (
            ROUTE_FUEL,
            ("SUN", "WND"),
            [
                ("facets[respondent][]", "ERCO"),
                ("facets[respondent][]", "SWPP"),
                ("facets[fueltype][]", "SUN"),
                ("facets[fueltype][]", "WND"),
            ],
            ["period", "respondent", "fueltype"],
        ),
        (
            ROUTE_INTERCHANGE,
            (),
            [("facets[fromba][]", "ERCO"), ("facets[fromba][]", "SWPP")],
            ["period", "fromba", "toba"],
        ),
    ],
)
def test_fuel_and_interchange_query_shape(
    http, eia, fake_time, route_name, values, expected_facets, sort_columns
) -> None:
    body = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    body["response"] |= {"total": "0", "data": []}
    route = eia.get(f"/{route_name}/data/").mock(return_value=respond(body))
    req = Request(route_name, ("ERCO", "SWPP"), values, T0, T1)

    list(make_client(http, fake_time).iter_pages(req))

    params = route.calls.last.request.url.params.multi_items()
    assert [p for p in params if p[0].startswith("facets")] == expected_facets
    assert [v for k, v in params if k.endswith("[column]")] == sort_columns
    assert ("start", "2024-01-01T00") in params and ("end", "2024-01-02T00") in params


def test_request_is_validated() -> None:
    with pytest.raises(ValueError, match="aware"):
        Request(ROUTE_REGION, ("PJM",), (), datetime(2024, 1, 1), T1)
    with pytest.raises(ValueError, match="whole hour"):
        Request(ROUTE_REGION, ("PJM",), (), T0.replace(minute=30), T1)
    with pytest.raises(ValueError, match="unknown EIA route"):
        Request("electricity/rto/nope", ("PJM",), (), T0, T1)
    with pytest.raises(ValueError, match="after end"):
        Request(ROUTE_REGION, ("PJM",), (), T1, T0)


# --- retries and errors -------------------------------------------------------------


def test_429_retry_after_seconds_then_success(http, eia, fake_time) -> None:
    ok = sample("region-data-pacw-d-hourly-2024-01-01_02.json")
    route = eia.get(REGION_PATH).mock(
        side_effect=[respond(b"", 429, **{"Retry-After": "7"}), respond(ok)]
    )
    client = make_client(http, fake_time, retry=RetryPolicy(attempts=3, initial=0, maximum=0))

    pages = list(client.iter_pages(region_request()))

    assert fake_time.sleeps == [7.0]
    assert route.call_count == 2 and len(pages[0].rows) == 25


@freeze_time("2025-07-06 01:49:00")
def test_429_retry_after_http_date(http, eia, fake_time) -> None:
    ok = sample("region-data-pacw-d-hourly-2024-01-01_02.json")
    when = "Sun, 06 Jul 2025 01:49:30 GMT"
    eia.get(REGION_PATH).mock(side_effect=[respond(b"", 429, **{"Retry-After": when}), respond(ok)])
    client = make_client(http, fake_time, retry=RetryPolicy(attempts=3, initial=0, maximum=0))

    list(client.iter_pages(region_request()))

    assert fake_time.sleeps == [30.0]


def test_500_three_times_then_success(http, eia, fake_time) -> None:
    ok = sample("region-data-pacw-d-hourly-2024-01-01_02.json")
    fail = respond(b'{"error": "Internal error", "code": 500}', 500)
    route = eia.get(REGION_PATH).mock(side_effect=[fail, fail, fail, respond(ok)])
    client = make_client(http, fake_time, retry=RetryPolicy.no_wait(attempts=4))

    pages = list(client.iter_pages(region_request()))

    assert route.call_count == 4 and client.requests_made == 4 and pages[0].last


def test_html_502_retried_then_clear_error(http, eia, fake_time) -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    html = httpx.Response(502, content=page, headers={"Content-Type": "text/html"})
    route = eia.get(REGION_PATH).mock(return_value=html)

    with pytest.raises(SourceTransientError) as info:
        list(make_client(http, fake_time).iter_pages(region_request()))

    message = str(info.value)
    assert route.call_count == 3
    assert "EIA electricity/rto/region-data page 0 (offset 0): HTTP 502" in message
    assert "502 Bad Gateway" in message and "api_key=***" in message and KEY not in message


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed connection"),
    ],
    ids=["timeout", "connect", "protocol"],
)
def test_network_errors_are_transient(http, eia, fake_time, failure) -> None:
    ok = sample("region-data-pacw-d-hourly-2024-01-01_02.json")
    route = eia.get(REGION_PATH).mock(side_effect=[failure, respond(ok)])

    pages = list(make_client(http, fake_time).iter_pages(region_request()))

    assert route.call_count == 2 and pages[0].last


@pytest.mark.parametrize(
    "body",
    [b'{"response": {"total": "25", "data": [{"period"', b"<html>maintenance</html>", b""],
    ids=["truncated-json", "html-200", "empty"],
)
def test_unparseable_200_is_transient(http, eia, fake_time, body) -> None:
    route = eia.get(REGION_PATH).mock(return_value=httpx.Response(200, content=body))

    with pytest.raises(SourceTransientError, match=r"page 0 \(offset 0\).*not JSON"):
        list(make_client(http, fake_time).iter_pages(region_request()))
    assert route.call_count == 3


@pytest.mark.parametrize(
    ("name", "api_key", "message"),
    [
        ("error-api-key-invalid-http403.json", KEY, "An invalid api_key was supplied"),
        ("error-api-key-missing-http403.json", None, "No api_key was supplied"),
    ],
)
def test_bad_key_is_fatal_after_one_request(http, eia, fake_time, name, api_key, message) -> None:
    route = eia.get(REGION_PATH).mock(return_value=respond(sample(name), 403))
    client = make_client(http, fake_time, api_key=api_key)

    with pytest.raises(SourceFatalError) as info:
        list(client.iter_pages(region_request()))

    assert route.call_count == 1
    assert message in str(info.value) and "region-data page 0" in str(info.value)
    assert ("api_key" in route.calls.last.request.url.params) is (api_key is not None)


def test_other_403_is_transient(http, eia, fake_time) -> None:
    route = eia.get(REGION_PATH).mock(return_value=httpx.Response(403, content=b"Forbidden"))

    with pytest.raises(SourceTransientError, match="HTTP 403"):
        list(make_client(http, fake_time).iter_pages(region_request()))
    assert route.call_count == 3


@pytest.mark.parametrize("status", [500, 404, 200])
def test_not_found_envelope_is_fatal(http, eia, fake_time, status) -> None:
    meta = orjson.loads(sample("error-unknown-route-not-found-http500.http-meta.json"))
    assert meta["response_status"]["code"] == 500  # as recorded; EIA moved to 404 later
    body = sample("error-unknown-route-not-found-http500.json")
    route = eia.get(REGION_PATH).mock(return_value=respond(body, status))

    with pytest.raises(SourceFatalError, match=r"region-data page 0 .*EIA error 404: Not found\."):
        list(make_client(http, fake_time).iter_pages(region_request()))
    assert route.call_count == 1


def test_bad_parameter_is_fatal(http, eia, fake_time) -> None:
    body = b'{"error": "Invalid frequency \'hourlyy\' provided.", "code": 400}'
    route = eia.get(REGION_PATH).mock(return_value=respond(body, 400))

    with pytest.raises(SourceFatalError, match="Invalid frequency"):
        list(make_client(http, fake_time).iter_pages(region_request()))
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("mutate", "cause"),
    [
        (lambda d: d.pop("response"), "no 'response' object"),
        (lambda d: d["response"].pop("data"), "response.data is missing or not a list"),
        (lambda d: d["response"].update(data={"rows": []}), "response.data is missing"),
        (lambda d: d["response"].update(total="many"), "'many' is not an integer"),
        (lambda d: d["response"].update(total=25.5), "25.5 is not an integer"),
        (lambda d: d["response"].pop("total"), "None is not an integer"),
    ],
)
def test_malformed_200_is_fatal(http, eia, fake_time, mutate, cause) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    mutate(doc)
    route = eia.get(REGION_PATH).mock(return_value=respond(doc))

    with pytest.raises(SourceFatalError) as info:
        list(make_client(http, fake_time).iter_pages(region_request()))

    assert route.call_count == 1
    assert "EIA electricity/rto/region-data page 0 (offset 0)" in str(info.value)
    assert cause in str(info.value)


# --- secrets ------------------------------------------------------------------------


def test_key_never_leaks(http, eia, fake_time, caplog) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    eia.get(REGION_PATH).mock(side_effect=paged(doc, echo_key=KEY))
    failures = [
        httpx.ConnectError(f"failed for ?api_key={KEY}"),
        respond(b"<html>", 502),
        respond(sample("error-api-key-invalid-http403.json"), 403),
    ]
    eia.get(FUEL_PATH).mock(side_effect=failures)
    client = make_client(http, fake_time, page_length=10)

    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="httpx"):
        pages = list(client.iter_pages(region_request()))
        with pytest.raises(SourceFatalError) as info:
            list(client.iter_pages(Request(ROUTE_FUEL, ("PACW",), (), T0, T1)))

    assert len(pages) == 3 and "eia request GET" in caplog.text and "api_key=***" in caplog.text
    assert "HTTP Request: GET" in caplog.text  # httpx's own line, redacted too
    assert KEY not in caplog.text
    assert KEY not in "".join(traceback.format_exception(info.value))
    for page in pages:
        assert KEY.encode() not in page.body and b"api_key" not in page.body
        assert "api_key" not in page.params
        assert KEY not in page.url and "api_key=***" in page.url
        assert KEY not in repr(page)


def test_pages_are_stored_without_the_echoed_key(http, eia, fake_time) -> None:
    raw = sample_doc("fuel-type-pacw-hourly-2024-01-01_02.json")
    raw["request"]["params"]["api_key"] = KEY
    eia.get(FUEL_PATH).mock(return_value=respond(raw))

    (page,) = make_client(http, fake_time).iter_pages(Request(ROUTE_FUEL, ("PACW",), (), T0, T1))

    stored = orjson.loads(page.body)
    del raw["request"]["params"]["api_key"]
    assert stored == raw  # everything else kept as EIA sent it
    assert page.params["facets"] == {"respondent": ["PACW"]}


# --- rate limiting ------------------------------------------------------------------


def test_rate_limiter_spaces_requests(http, eia, fake_time) -> None:
    doc = sample_doc("region-data-pacw-d-hourly-2024-01-01_02.json")
    sent_at: list[float] = []
    serve = paged(doc)

    def record(request: httpx.Request) -> httpx.Response:
        sent_at.append(fake_time.now)
        return serve(request)

    eia.get(REGION_PATH).mock(side_effect=record)
    client = make_client(http, fake_time, page_length=10, max_per_second=2.0)

    list(client.iter_pages(region_request()))

    assert fake_time.sleeps == [0.5, 0.5]
    assert [b - a for a, b in itertools.pairwise(sent_at)] == [0.5, 0.5]


def test_rate_limiter_hourly_window() -> None:
    fake = FakeTime()
    limiter = RateLimiter(100.0, 3, sleep=fake.sleep, clock=fake.clock)

    waits = [limiter.acquire() for _ in range(4)]

    assert waits == pytest.approx([0.0, 0.01, 0.01, 3600.0 - 0.02])


def test_rate_limiter_with_a_sleep_that_does_not_advance_the_clock() -> None:
    slept: list[float] = []
    limiter = RateLimiter(1.0, 0, sleep=slept.append, clock=lambda: 0.0)

    for _ in range(3):
        limiter.acquire()

    assert slept == [1.0, 2.0]


# --- replay -------------------------------------------------------------------------


def test_replay_route_from_command_not_file_name(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "fuel-type-pacw-hourly-2024-01-01_02.json", tmp_path / "a-region.json")
    shutil.copy(SAMPLES / "region-data-pacw-d-hourly-2024-01-01_03.json", tmp_path / "b.json")
    meta = "region-data-pacw-d-hourly-2024-01-01_03.http-meta.json"
    shutil.copy(SAMPLES / meta, tmp_path / "b.http-meta.json")

    pages = list(iter_replay_pages(tmp_path))

    assert [(p.route, p.page_no, p.offset, p.total, len(p.rows), p.last) for p in pages] == [
        (ROUTE_FUEL, 0, 0, 125, 125, True),
        (ROUTE_REGION, 1, 0, 49, 49, True),
    ]
    for page in pages:
        assert b"api_key" not in page.body and b"XXXXXXXX" not in page.body
        assert "api_key" not in page.params
        assert page.url.startswith("file://")


def test_replay_recurses_and_sorts(tmp_path: Path) -> None:
    (tmp_path / "2").mkdir()
    (tmp_path / "1").mkdir()
    shutil.copy(SAMPLES / "fuel-type-pacw-hourly-2024-01-01_02.json", tmp_path / "2" / "x.json")
    shutil.copy(SAMPLES / "region-data-pacw-d-hourly-2024-01-01_02.json", tmp_path / "1" / "y.json")

    assert [p.route for p in iter_replay_pages(tmp_path)] == [ROUTE_REGION, ROUTE_FUEL]


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (sample("error-api-key-invalid-http403.json"), "no request.command"),
        (b'{"response": {"total": "1", "data": [', "not valid JSON"),
        (
            b'{"request": {"command": "/v2/electricity/rto/region-data/data/"}, "x": "\xff"}',
            "UTF-8",
        ),
        (b'{"request": {"command": "/v2/electricity/rto/region-data/data/"}}', "'response'"),
        (b'{"request": {"command": "/v2/natural-gas/pri/data/"}, "response": {}}', "command"),
    ],
    ids=["error-body", "truncated", "bad-utf8", "no-response", "other-route"],
)
def test_replay_bad_file_names_the_file(tmp_path: Path, content: bytes, cause: str) -> None:
    bad = tmp_path / "bad-page.json"
    bad.write_bytes(content)

    with pytest.raises(SourceFatalError) as info:
        list(iter_replay_pages(tmp_path))

    assert str(bad) in str(info.value) and cause in str(info.value)


def test_replay_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceFatalError, match="does not exist"):
        list(iter_replay_pages(tmp_path / "nope"))


def test_rate_limiter_burst_then_the_average_rate() -> None:
    fake = FakeTime()
    limiter = RateLimiter(2.0, 0, burst=3, sleep=fake.sleep, clock=fake.clock)

    slots = [limiter.reserve()[0] - fake.now for _ in range(6)]

    # Three at once, then one every 1/2 s: the bucket refills at the average rate.
    assert slots == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.5])


def test_rate_limiter_bucket_refills_after_a_pause() -> None:
    fake = FakeTime()
    limiter = RateLimiter(1.0, 0, burst=2, sleep=fake.sleep, clock=fake.clock)
    assert [limiter.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 1.0])
    fake.sleep(10.0)  # idle: the bucket is full again, but holds no more than the burst
    assert [limiter.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 1.0])


def test_rate_limiter_never_starts_more_than_eia_allows_in_a_second() -> None:
    fake = FakeTime()
    limiter = RateLimiter(5.0, 0, burst=5, sleep=fake.sleep, clock=fake.clock)

    slots = [limiter.reserve()[0] for _ in range(40)]

    for i in range(len(slots) - 5):
        assert slots[i + 5] - slots[i] >= 1.0 - 1e-9  # at most 5 in any second


def test_rate_limiter_refuses_a_burst_below_one() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1.0, 0, burst=0)
