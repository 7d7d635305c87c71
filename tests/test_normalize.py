"""normalize_page: real-format EIA rows in, GridPulse observations out."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.datasets import names
from outbox.datasets import of_row as dataset_of
from outbox.normalize import (
    REASONS,
    Normalized,
    SeriesInfo,
    normalize_page,
    revision_of,
    stream_key,
)
from outbox.testing.synth import make_rows

SAMPLES = Path(__file__).parent / "data" / "eia-samples"
REGION = "electricity/rto/region-data"
FUEL = "electricity/rto/fuel-type-data"
INTERCHANGE = "electricity/rto/interchange-data"
BA_CODES = {"PJM": "PJM", "CISO": "CAISO", "MISO": "MISO", "ERCO": "ERCOT", "SWPP": "SPP"}
FIVE = ("PJM", "CISO", "MISO", "ERCO", "SWPP")


def sample_rows(name: str) -> list[dict]:
    return orjson.loads((SAMPLES / name).read_bytes())["response"]["data"]


def region_row(period="2025-08-21T05", respondent="CISO", type_="D", value="100", **extra):
    row = {
        "period": period,
        "respondent": respondent,
        "respondent-name": "California Independent System Operator",
        "type": type_,
        "type-name": "Demand",
        "value": value,
        "value-units": "megawatthours",
    }
    return row | extra


def run(rows: list[dict], route: str = REGION, **kwargs) -> Normalized:
    return normalize_page(route, rows, ba_codes=BA_CODES, **kwargs)


def accounted(norm: Normalized) -> int:
    return norm.count + sum(norm.invalid.values()) + norm.duplicates


# --- real samples -------------------------------------------------------------------


def test_region_sample_unmapped_ba_keeps_eia_code() -> None:
    rows = sample_rows("region-data-pacw-d-hourly-2024-01-01_02.json")

    norm = run(rows)

    assert norm.count == 25 and norm.invalid == {} and norm.duplicates == 0
    assert set(norm.series_id) == {"EIA.PACW.demand"}
    assert norm.ts[:2] == ["2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z"]
    assert norm.ts[-1] == "2024-01-02T00:00:00Z"
    assert norm.value[0] == 2515.0 and type(norm.value[0]) is float
    assert norm.quality_flag == ["good"] * 25 and norm.units == ["MW"] * 25
    assert norm.row == list(range(25))
    assert norm.series == [
        SeriesInfo(
            series_id="EIA.PACW.demand",
            ba="PACW",
            type="demand",
            subtype=None,
            units="MW",
            route=REGION,
            facets='{"respondent":"PACW","type":"D"}',
        )
    ]
    assert norm.stream_max == {"demand:PACW": "2024-01-02T00:00:00Z"}
    assert norm.stream_min == {"demand:PACW": "2024-01-01T00:00:00Z"}
    assert norm.page_max_ts == "2024-01-02T00:00:00Z"


def test_fuel_sample_series_and_negative_wind() -> None:
    rows = sample_rows("fuel-type-pacw-hourly-2023-01-01_08.json")

    norm = run(rows, FUEL)

    assert norm.count == len(rows) == 845 and norm.invalid == {}
    assert [s.series_id for s in norm.series] == [
        "EIA.PACW.generation.gas",
        "EIA.PACW.generation.other",
        "EIA.PACW.generation.solar",
        "EIA.PACW.generation.hydro",
        "EIA.PACW.generation.wind",
    ]
    assert norm.series[0].facets == '{"respondent":"PACW","fueltype":"NG"}'
    assert norm.series[0].type == "generation" and norm.series[0].subtype == "gas"
    wind = [v for s, v in zip(norm.series_id, norm.value, strict=True) if s.endswith("wind")]
    assert min(wind) < 0  # station load at night is real data, not invalid
    assert 0.0 in norm.value  # "0" is a real zero
    assert norm.stream_max == {"generation:PACW": "2023-01-08T00:00:00Z"}


def test_region_ba_mapping_all_types() -> None:
    rows = make_rows(REGION, FIVE, datetime(2025, 8, 21, tzinfo=UTC), 2)

    norm = run(rows)

    assert norm.count == 40 and norm.invalid == {}
    assert {s.series_id for s in norm.series} == {
        f"EIA.{ba}.{kind}"
        for ba in ("PJM", "CAISO", "MISO", "ERCOT", "SPP")
        for kind in ("demand", "demand_forecast", "net_generation", "interchange")
    }
    assert set(norm.stream_max) == {
        stream_key(d, r)
        for d in ("demand", "demand_forecast", "net_generation", "interchange")
        for r in FIVE
    }
    caiso = next(s for s in norm.series if s.series_id == "EIA.CAISO.demand")
    assert caiso.ba == "CAISO" and caiso.facets == '{"respondent":"CISO","type":"D"}'


def test_interchange_counterparty_mapping() -> None:
    rows = make_rows(INTERCHANGE, ("PJM", "ERCO", "CISO"), datetime(2025, 8, 21, tzinfo=UTC), 1)

    norm = run(rows, INTERCHANGE)

    ids = set(norm.series_id)
    assert {"EIA.PJM.interchange.MISO", "EIA.ERCOT.interchange.SPP"} <= ids
    assert "EIA.CAISO.interchange.BPAT" in ids  # unmapped counterparty keeps its EIA code
    assert "EIA.ERCOT.interchange.CEN" in ids
    info = next(s for s in norm.series if s.series_id == "EIA.ERCOT.interchange.SPP")
    assert (info.ba, info.type, info.subtype) == ("ERCOT", "interchange", "SPP")
    assert info.facets == '{"fromba":"ERCO","toba":"SWPP"}'
    assert set(norm.stream_max) == {
        "ba_interchange:PJM",
        "ba_interchange:ERCO",
        "ba_interchange:CISO",
    }


# --- timestamps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "day", [datetime(2024, 3, 10, tzinfo=UTC), datetime(2024, 11, 3, tzinfo=UTC)]
)
def test_dst_change_days_are_continuous_in_utc(day: datetime) -> None:
    rows = make_rows(REGION, FIVE, day, 24)
    window = (day, day + timedelta(hours=23))

    norm = run(rows, window=window, respondents=set(FIVE))

    assert norm.invalid == {} and norm.duplicates == 0
    expected = [(day + timedelta(hours=h)).strftime("%Y-%m-%dT%H:00:00Z") for h in range(24)]
    for series in {s.series_id for s in norm.series}:
        hours = [t for s, t in zip(norm.series_id, norm.ts, strict=True) if s == series]
        assert hours == expected  # 24 distinct hours, no gap, no repeat


@pytest.mark.parametrize(
    "period",
    [
        "2024-03-10T01-05",  # local-hourly, offset moves with DST
        "2024-03-10T03-04",
        "2024-03-10",
        "2024-03-10T02:00:00Z",
        "2024-3-10T02",
        "2024-03-10T24",
        "2024-02-30T01",
        "garbage",
        "",
        20240310,
    ],
)
def test_anything_but_utc_hourly_period_is_bad(period: object) -> None:
    norm = run([region_row(period=period), region_row()])

    assert norm.invalid == {"bad_period": 1} and norm.count == 1
    assert norm.page_max_ts == "2025-08-21T05:00:00Z"


def test_page_max_counts_invalid_rows_with_parseable_periods() -> None:
    rows = [region_row(), region_row(period="2025-08-22T07", value="N/A")]

    norm = run(rows)

    assert norm.page_max_ts == "2025-08-22T07:00:00Z"
    assert norm.stream_max == {"demand:CISO": "2025-08-21T05:00:00Z"}


# --- values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value", "quality"),
    [
        ("2515", 2515.0, "good"),
        (2515, 2515.0, "good"),
        (2515.5, 2515.5, "good"),
        ("-3.5", None, None),  # negative demand: see the invalid test
        ("0", 0.0, "good"),
        ("-0", 0.0, "good"),
        (" 42 ", 42.0, "good"),
        (None, None, "missing"),
        ("", None, "missing"),
        ("   ", None, "missing"),
    ],
)
def test_values(raw: object, value: float | None, quality: str | None) -> None:
    norm = run([region_row(value=raw)])

    if quality is None:
        assert norm.count == 0
        return
    assert norm.value == [value] and norm.quality_flag == [quality]
    assert norm.revision == [revision_of(value, quality, "MW")]


def test_negative_allowed_except_demand_and_forecast() -> None:
    rows = [region_row(type_=t, value="-5") for t in ("D", "DF", "NG", "TI")]

    norm = run(rows)

    assert norm.series_id == ["EIA.CAISO.net_generation", "EIA.CAISO.interchange"]
    assert norm.value == [-5.0, -5.0] and norm.invalid == {"negative_demand": 2}


def test_values_are_never_nan() -> None:
    rows = [region_row(period=f"2025-08-21T{h:02d}", value=v) for h, v in enumerate([None, "1"])]

    norm = run(rows)

    assert norm.value == [None, 1.0]
    assert not any(isinstance(v, float) and math.isnan(v) for v in norm.value)


# --- fuels --------------------------------------------------------------------------


def test_fuel_codes_and_unknown_code(caplog) -> None:
    codes = ["COL", "NG", "NUC", "OIL", "WAT", "SUN", "WND", "OTH", "UNK", "BAT", "PS"]
    codes += ["SNB", "WNB", "UES", "OES", "GEO", "XQZ"]
    rows = [
        {
            "period": "2025-08-21T05",
            "respondent": "ERCO",
            "respondent-name": "Electric Reliability Council of Texas, Inc.",
            "fueltype": code,
            "type-name": "whatever",
            "value": "10",
            "value-units": "megawatthours",
        }
        for code in codes
    ]

    with caplog.at_level(logging.WARNING, logger="outbox.normalize"):
        norm = run(rows, FUEL)
        run(rows, FUEL)

    assert [s.subtype for s in norm.series] == [
        "coal",
        "gas",
        "nuclear",
        "oil",
        "hydro",
        "solar",
        "wind",
        "other",
        "unknown",
        "battery",
        "pumped_storage",
        "solar_battery",
        "wind_battery",
        "unknown_storage",
        "other_storage",
        "geothermal",
        "xqz",
    ]
    assert norm.series_id[-1] == "EIA.ERCOT.generation.xqz"
    assert caplog.text.count("XQZ") == 1  # logged once per process


# --- duplicates and revisions -------------------------------------------------------


def test_duplicates_last_wins() -> None:
    rows = [
        region_row(value="1"),
        region_row(value="2"),
        region_row(type_="NG"),
        region_row(value="3"),
    ]

    norm = run(rows)

    assert norm.duplicates == 2
    assert list(zip(norm.series_id, norm.value, norm.row, strict=True)) == [
        ("EIA.CAISO.net_generation", 100.0, 2),
        ("EIA.CAISO.demand", 3.0, 3),
    ]


def test_invalid_later_row_does_not_displace_valid_one() -> None:
    norm = run([region_row(value="1"), region_row(value="N/A")])

    assert norm.value == [1.0] and norm.duplicates == 0
    assert norm.invalid == {"non_numeric_value": 1}


def test_revision() -> None:
    expected = blake2b(b"2515.0|good|MW", digest_size=8).hexdigest()
    assert revision_of(2515.0, "good", "MW") == expected
    assert (
        revision_of(None, "missing", "MW") == blake2b(b"None|missing|MW", digest_size=8).hexdigest()
    )

    first = run([region_row(value="2515")]).revision
    assert first == [expected]
    assert run([region_row(value=2515)]).revision == first  # same value, same revision
    assert run([region_row(value="2515.0")]).revision == first
    assert run([region_row(value="2516")]).revision != first  # EIA revised it
    assert run([region_row(value=None)]).revision != first
    assert run([region_row(period="2025-08-21T06", value="2515")]).revision == first


# --- invalid rows -------------------------------------------------------------------


def _without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (region_row(period="2023-03-20T00-07"), "bad_period"),
        (region_row(period="2025-08-23T00"), "outside_window"),
        (region_row(period="2025-08-20T23"), "outside_window"),
        (region_row(respondent="PACW"), "unexpected_respondent"),
        (region_row(value="N/A"), "non_numeric_value"),
        (region_row(value="abc"), "non_numeric_value"),
        (region_row(value=[1]), "non_numeric_value"),
        (region_row(value="inf"), "non_finite_value"),
        (region_row(value="-Infinity"), "non_finite_value"),
        (region_row(value="NaN"), "non_finite_value"),
        (region_row(value="-1"), "negative_demand"),
        (region_row(type_="DF", value="-1"), "negative_demand"),
        (region_row(value="20000000"), "out_of_range"),
        (region_row(type_="TI", value="-10000001"), "out_of_range"),
        (region_row(**{"value-units": "kilowatthours"}), "unknown_units"),
        (region_row(**{"value-units": None}), "unknown_units"),
        (_without(region_row(), "value-units"), "unknown_units"),
        (region_row(type_="CO2.TOT"), "unknown_type"),
        (_without(region_row(), "value"), "missing_field"),
        (_without(region_row(), "period"), "missing_field"),
        (_without(region_row(), "respondent"), "missing_field"),
        (region_row(respondent=""), "missing_field"),
        (region_row(type_=None), "missing_field"),
    ],
)
def test_each_invalid_reason(row: dict, reason: str) -> None:
    window = (datetime(2025, 8, 21, tzinfo=UTC), datetime(2025, 8, 22, 23, tzinfo=UTC))

    norm = run([row, region_row(type_="NG")], window=window, respondents={"CISO"})

    assert reason in REASONS
    assert norm.invalid == {reason: 1}
    assert norm.series_id == ["EIA.CAISO.net_generation"]


def test_units_spellings() -> None:
    rows = [region_row(**{"value-units": u}) for u in ("megawatthours", "MegaWattHours", "MWh")]

    norm = run([dict(r, period=f"2025-08-21T0{i}") for i, r in enumerate(rows)])

    assert norm.count == 3 and norm.units == ["MW"] * 3


def test_dataset_not_requested_is_skipped() -> None:
    rows = [region_row(type_=t) for t in ("D", "DF", "NG", "TI")]

    norm = run(rows, datasets={"demand", "interchange"})

    assert norm.series_id == ["EIA.CAISO.demand", "EIA.CAISO.interchange"]
    assert norm.invalid == {"dataset_not_requested": 2}
    assert set(norm.stream_max) == {"demand:CISO", "interchange:CISO"}


def test_rows_without_value_key_are_missing_field() -> None:
    rows = [
        _without(r, "value") for r in sample_rows("region-data-pacw-d-hourly-2024-01-01_02.json")
    ]

    norm = run(rows)

    assert norm.count == 0 and norm.invalid == {"missing_field": 25}
    assert norm.page_max_ts == "2024-01-02T00:00:00Z" and norm.stream_max == {}


def test_empty_page() -> None:
    norm = run([])

    assert norm.count == 0 and norm.series == [] and norm.page_max_ts is None
    assert norm.invalid == {} and norm.stream_max == {} and norm.stream_min == {}


# --- small helpers ------------------------------------------------------------------


def test_dataset_of_and_stream_key() -> None:
    assert dataset_of(REGION, "DF") == "demand_forecast"
    assert dataset_of(FUEL, "SUN") == "generation"
    assert dataset_of(INTERCHANGE, None) == "ba_interchange"
    assert {dataset_of(REGION, t) for t in ("D", "DF", "NG", "TI")} | {
        "generation",
        "ba_interchange",
    } == set(names())
    with pytest.raises(ValueError):
        dataset_of(REGION, "CO2")
    with pytest.raises(ValueError):
        normalize_page("electricity/rto/nope", [], ba_codes={})
    assert stream_key("ba_interchange", "ERCO") == "ba_interchange:ERCO"


# --- every row is accounted for -----------------------------------------------------

_values = st.one_of(
    st.none(),
    st.integers(-100, 10**8),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["", " ", "0", "-0", "12", "N/A", "inf", "nan", "1e3", "x"]),
)
_rows = st.fixed_dictionaries(
    {
        "period": st.sampled_from(["2025-08-21T00", "2025-08-21T01", "2025-08-21T1", "bad", None]),
        "respondent": st.sampled_from(["CISO", "PJM", "", None]),
        "type": st.sampled_from(["D", "DF", "NG", "TI", "CO2.X", None]),
        "value": _values,
        "value-units": st.sampled_from(["megawatthours", "MWh", "kW"]),
    }
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_rows, max_size=40))
def test_every_row_is_accounted_for(rows: list[dict]) -> None:
    norm = run(rows, respondents={"CISO", "PJM"}, datasets={"demand", "net_generation"})

    assert accounted(norm) == len(rows)
    assert len(set(zip(norm.series_id, norm.ts, strict=True))) == norm.count
    assert all(v is None or math.isfinite(v) for v in norm.value)
    assert all(
        (v is None) == (q == "missing") for v, q in zip(norm.value, norm.quality_flag, strict=True)
    )
    assert norm.row == sorted(norm.row)


# --- codes: shape, and only configured balancing authorities -------------------------

BAD_CODES = ('"PJM"', "P J M", "pjm", "PJM;DROP", "X" * 100_000, "ÆØÅ", "-PJM")


@pytest.mark.parametrize("code", BAD_CODES)
def test_a_respondent_not_shaped_like_an_eia_code_is_bad_code(code: str) -> None:
    rows = sample_rows("region-data-pacw-d-hourly-2024-01-01_02.json")
    rows[3] = dict(rows[3], respondent=code)

    norm = run(rows)

    assert norm.invalid == {"bad_code": 1} and norm.count == 24
    assert {s.series_id for s in norm.series} == {"EIA.PACW.demand"}
    assert not any(code in sid for sid in norm.series_id)


@pytest.mark.parametrize("code", BAD_CODES)
def test_fuel_and_counterparty_codes_are_checked_too(code: str) -> None:
    rows = sample_rows("fuel-type-pacw-hourly-2024-01-01_02.json")
    rows[0] = dict(rows[0], fueltype=code)
    fuel = run(rows, route=FUEL)
    flows = make_rows(INTERCHANGE, ["PJM"], datetime(2025, 8, 21, tzinfo=UTC), 1)
    flows[0] = dict(flows[0], toba=code)
    interchange = run(flows, route=INTERCHANGE)

    assert fuel.invalid == {"bad_code": 1} and fuel.count == len(rows) - 1
    assert interchange.invalid == {"bad_code": 1} and interchange.count == len(flows) - 1
    ids = [s.series_id for s in fuel.series + interchange.series]
    assert not any(code in sid or code.lower() in sid for sid in ids)


def test_rows_of_unconfigured_respondents_are_skipped_and_counted_per_respondent() -> None:
    start = datetime(2025, 8, 21, tzinfo=UTC)
    rows = make_rows(REGION, ["PJM", "PACW", "AVA"], start, 3)

    norm = run(rows, configured={"PJM"})

    per_ba = len(rows) // 3
    assert norm.invalid == {"unconfigured_ba": 2 * per_ba}
    assert norm.unconfigured == {"PACW": per_ba, "AVA": per_ba}
    assert {s.ba for s in norm.series} == {"PJM"} and norm.count == per_ba
    assert set(norm.stream_max) == {f"{d}:PJM" for d in names()[:4]}
    assert run(rows).invalid == {} and run(rows).count == len(rows)


def test_interchange_needs_a_configured_fromba_not_a_configured_counterparty() -> None:
    rows = make_rows(INTERCHANGE, ["CISO", "PJM"], datetime(2025, 8, 21, tzinfo=UTC), 2)

    norm = run(rows, route=INTERCHANGE, configured={"CISO"})

    assert {s.ba for s in norm.series} == {"CAISO"}
    assert {s.subtype for s in norm.series} >= {"BPAT", "PACW"}  # not configured, still kept
    assert norm.unconfigured == {"PJM": sum(r["fromba"] == "PJM" for r in rows)}


def test_a_requested_respondent_outranks_the_configured_filter() -> None:
    """A row of a respondent the page's request did not ask for is bad data, not a skip."""
    norm = run([region_row(respondent="PACW")], respondents={"CISO"}, configured={"CISO"})
    assert norm.invalid == {"unexpected_respondent": 1}
