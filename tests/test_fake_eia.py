"""FakeEIA: a local EIA v2 stand-in that EIAClient reads end to end (127.0.0.1 only)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from outbox.errors import SourceFatalError, SourceTransientError
from outbox.normalize import normalize_page
from outbox.ports import ROUTE_FUEL, ROUTE_INTERCHANGE, ROUTE_REGION, Request
from outbox.retry import RetryPolicy
from outbox.sample import sample_dir
from outbox.sources.eia import EIAClient
from outbox.sources.replay import iter_replay_pages
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import DEFAULT_RESPONDENTS, make_rows, read_rows

KEY = "fake-eia-key-0123456789abcdef0123456789ab"
START = datetime(2025, 8, 21, tzinfo=UTC)
END = datetime(2025, 8, 22, 23, tzinfo=UTC)


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {
        route: make_rows(route, DEFAULT_RESPONDENTS, START, 48)
        for route in (
            ROUTE_REGION,
            ROUTE_FUEL,
            ROUTE_INTERCHANGE,
        )
    }


@pytest.fixture
def fake(rows):
    with FakeEIA(rows, api_key=KEY) as server:
        yield server


@pytest.fixture
def http():
    with httpx.Client(trust_env=False, timeout=5) as client:
        yield client


def client_for(http: httpx.Client, fake: FakeEIA, key: str | None = KEY, **kwargs) -> EIAClient:
    options = {"retry": RetryPolicy.no_wait(attempts=3), "max_per_second": 0} | kwargs
    assert fake.base_url is not None
    return EIAClient(http, fake.base_url, key, **options)


def raw_get(http: httpx.Client, fake: FakeEIA, route: str, params: list[tuple[str, str]]) -> dict:
    response = http.get(f"{fake.base_url}/{route}/data/", params=[("api_key", KEY), *params])
    return {"status": response.status_code, "doc": orjson.loads(response.content)}


def test_client_reads_every_page(http, fake, rows) -> None:
    client = client_for(http, fake, page_length=100)
    req = Request(ROUTE_REGION, DEFAULT_RESPONDENTS, (), START, END)

    pages = list(client.iter_pages(req))

    assert len(pages) == 10 and [p.last for p in pages] == [False] * 9 + [True]
    assert {p.total for p in pages} == {960}
    assert [r for p in pages for r in p.rows] == rows[ROUTE_REGION]  # synth order = API order
    assert client.requests_made == 10
    assert orjson.loads(pages[0].body)["response"]["total"] == "960"  # a string, as EIA sends


def test_facets_filter_and_sort(http, fake) -> None:
    client = client_for(http, fake)
    req = Request(ROUTE_FUEL, ("CISO", "ERCO"), ("SUN", "BAT"), START, START)

    (page,) = client.iter_pages(req)

    assert [(r["respondent"], r["fueltype"]) for r in page.rows] == [
        ("CISO", "BAT"),
        ("CISO", "SUN"),
        ("ERCO", "BAT"),
        ("ERCO", "SUN"),
    ]
    norm = normalize_page(ROUTE_FUEL, page.rows, ba_codes={"CISO": "CAISO", "ERCO": "ERCOT"})
    assert norm.series_id[0] == "EIA.CAISO.generation.battery"


def test_interchange_fromba_facet(http, fake) -> None:
    req = Request(ROUTE_INTERCHANGE, ("ERCO",), (), START, START)

    (page,) = client_for(http, fake).iter_pages(req)

    assert [(r["fromba"], r["toba"]) for r in page.rows] == [("ERCO", "CEN"), ("ERCO", "SWPP")]


def test_query_semantics(http, fake) -> None:
    base = [("frequency", "hourly"), ("facets[respondent][]", "PJM"), ("facets[type][]", "D")]

    no_value = raw_get(http, fake, ROUTE_REGION, [*base, ("start", "2025-08-21T22")])
    assert "value" not in no_value["doc"]["response"]["data"][0]

    date_only = raw_get(
        http, fake, ROUTE_REGION, [*base, ("data[0]", "value"), ("end", "2025-08-22")]
    )
    periods = [r["period"] for r in date_only["doc"]["response"]["data"]]
    assert periods[-1] == "2025-08-22T00" and len(periods) == 25  # date-only end = its T00

    desc = [*base, ("sort[0][column]", "period"), ("sort[0][direction]", "desc"), ("length", "2")]
    page = raw_get(http, fake, ROUTE_REGION, desc)["doc"]
    assert [r["period"] for r in page["response"]["data"]] == ["2025-08-22T23", "2025-08-22T22"]
    assert page["response"]["total"] == "48"
    assert page["response"]["warnings"][0]["warning"] == "incomplete return"
    assert page["request"]["params"]["api_key"] == KEY  # echoed, like the real API
    assert page["request"]["command"] == "/v2/electricity/rto/region-data/data/"


def test_length_is_capped_at_5000(http) -> None:
    many = make_rows(ROUTE_FUEL, ("PJM", "MISO", "SWPP"), START, 250)
    with FakeEIA({ROUTE_FUEL: many}) as server:
        doc = raw_get(http, server, ROUTE_FUEL, [("length", "9000")])["doc"]
        pages = list(
            client_for(http, server, key=None).iter_pages(
                Request(ROUTE_FUEL, ("PJM", "MISO", "SWPP"), (), START, END.replace(day=31))
            )
        )

    assert len(doc["response"]["data"]) == 5000 and doc["response"]["total"] == str(len(many))
    assert [len(p.rows) for p in pages] == [5000, len(many) - 5000]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ([("frequency", "daily")], 400),
        ([("facets[fueltype][]", "SUN")], 400),
        ([("sort[0][column]", "value")], 400),
        ([("offset", "-1")], 400),
        ([("start", "yesterday")], 400),
    ],
)
def test_bad_queries_are_400(http, fake, params, status) -> None:
    reply = raw_get(http, fake, ROUTE_REGION, params)

    assert reply["status"] == status and reply["doc"]["code"] == 400


def test_bad_or_missing_key_is_fatal_after_one_request(http, fake) -> None:
    req = Request(ROUTE_REGION, ("PJM",), (), START, END)

    with pytest.raises(SourceFatalError, match="API_KEY_INVALID"):
        list(client_for(http, fake, key="wrong-key-wrong-key").iter_pages(req))
    with pytest.raises(SourceFatalError, match="API_KEY_MISSING"):
        list(client_for(http, fake, key=None).iter_pages(req))

    assert len(fake.requests) == 2
    assert "api_key=wrong-key-wrong-key" in fake.requests[0]  # recorded as received


def test_unknown_route_is_fatal(http, fake) -> None:
    reply = http.get(f"{fake.base_url}/electricity/wholesale-prices/data/", params={"api_key": KEY})
    assert reply.status_code == 404 and reply.json() == {"error": "Not found.", "code": 404}

    client = EIAClient(http, f"{fake.base_url}/x", KEY, max_per_second=0)
    with pytest.raises(SourceFatalError, match="Not found"):
        list(client.iter_pages(Request(ROUTE_REGION, ("PJM",), (), START, END)))


def test_faults_are_retried(http, fake) -> None:
    slept: list[float] = []
    client = client_for(
        http, fake, retry=RetryPolicy(attempts=6, initial=0, maximum=0), sleep=slept.append
    )
    fake.fail_next(1, 429, headers={"Retry-After": "3"})
    fake.fail_next(1, 502)  # an HTML error page
    fake.fail_next(1, 200, body='{"response": {"total": "960", "data": [{"per')
    fake.fail_next(1, drop=True)
    fake.fail_next(1, 500, body={"error": "Internal error", "code": 500})

    pages = list(client.iter_pages(Request(ROUTE_REGION, ("PJM",), ("D",), START, END)))

    assert len(pages[0].rows) == 48 and client.requests_made == 6
    assert slept == [3.0, 0.0, 0.0, 0.0, 0.0]


def test_fault_budget_exhausted(http, fake) -> None:
    fake.fail_next(3, 503)

    with pytest.raises(SourceTransientError, match=r"region-data page 0 \(offset 0\): HTTP 503"):
        list(client_for(http, fake).iter_pages(Request(ROUTE_REGION, ("PJM",), (), START, END)))


def test_set_rows_publishes_a_revision(http, fake, rows) -> None:
    req = Request(ROUTE_REGION, ("CISO",), ("D",), START, START)
    client = client_for(http, fake)
    (before,) = client.iter_pages(req)

    revised = [dict(r) for r in rows[ROUTE_REGION]]
    target = next(r for r in revised if r["respondent"] == "CISO" and r["type"] == "D")
    target["value"] = str(int(target["value"]) + 1)
    fake.set_rows(ROUTE_REGION, revised)
    (after,) = client.iter_pages(req)

    norm_before = normalize_page(ROUTE_REGION, before.rows, ba_codes={})
    norm_after = normalize_page(ROUTE_REGION, after.rows, ba_codes={})
    assert norm_before.value[0] + 1 == norm_after.value[0]
    assert norm_before.revision != norm_after.revision


def test_sample_is_small_and_replayable() -> None:
    files = sorted(p.name for p in sample_dir().glob("*.json"))
    assert files == [
        "fuel-type-data-0000.json",
        "interchange-data-0000.json",
        "region-data-0000.json",
    ]
    assert sum(p.stat().st_size for p in sample_dir().iterdir()) < 1_000_000

    pages = list(iter_replay_pages(sample_dir()))

    assert [p.route for p in pages] == [ROUTE_FUEL, ROUTE_INTERCHANGE, ROUTE_REGION]
    region = normalize_page(ROUTE_REGION, pages[2].rows, ba_codes={"CISO": "CAISO"})
    assert region.count == 480 and region.invalid == {}
    assert region.page_max_ts == "2025-08-21T23:00:00Z"


def test_runs_as_a_module_serving_the_sample(http) -> None:
    command = [sys.executable, "-m", "outbox.testing.fake_eia", "--port", "0", "--sample"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("FakeEIA serving http://127.0.0.1:")
            client = EIAClient(http, line.split()[-1], None, max_per_second=0)
            req = Request(ROUTE_INTERCHANGE, ("PJM",), (), START, START.replace(hour=23))
            (page,) = client.iter_pages(req)
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert process.returncode == 0
    assert page.total == 24 * 7 and page.rows[0]["fromba"] == "PJM"
    assert read_rows(sample_dir())[ROUTE_INTERCHANGE][0]["fromba"] == "CISO"


def test_synth_routes_agree_and_look_real() -> None:
    region = make_rows(ROUTE_REGION, ("PJM", "MISO"), START, 24)
    flows = make_rows(ROUTE_INTERCHANGE, ("PJM", "MISO"), START, 24)
    fuels = make_rows(ROUTE_FUEL, ("CISO",), START, 24)
    value = {(r["period"], r["respondent"], r["type"]): int(r["value"]) for r in region}
    flow = {(r["period"], r["fromba"], r["toba"]): int(r["value"]) for r in flows}

    for (period, ba, kind), mw in value.items():
        if kind == "NG":
            assert abs(mw - value[period, ba, "D"] - value[period, ba, "TI"]) <= 1
        if kind == "D" and ba == "PJM":
            assert 80_000 <= mw <= 150_000
    assert all(
        abs(mw + flow[p, "MISO", "PJM"]) <= 1 for (p, a, b), mw in flow.items() if b == "MISO"
    )
    solar = [int(r["value"]) for r in fuels if r["fueltype"] == "SUN"]
    battery = [int(r["value"]) for r in fuels if r["fueltype"] == "BAT"]
    assert min(solar) == 0 and max(solar) > 5_000 and min(battery) < 0 < max(battery)
    assert list(region[0]) == [
        "period",
        "respondent",
        "respondent-name",
        "type",
        "type-name",
        "value",
        "value-units",
    ]
    assert region == sorted(region, key=lambda r: (r["period"], r["respondent"], r["type"]))
    assert make_rows(ROUTE_REGION, ("PJM",), START.replace(hour=5), 2) == [
        r
        for r in region
        if r["respondent"] == "PJM" and r["period"] in ("2025-08-21T05", "2025-08-21T06")
    ]  # the same hour has the same value whatever the window
