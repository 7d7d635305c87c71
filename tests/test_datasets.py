"""The dataset table: every lookup agrees with it, and a new row is all a new dataset needs."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from outbox import datasets, ports
from outbox.cli import app
from outbox.config import Config
from outbox.datasets import Dataset
from outbox.normalize import normalize_page, stream_key
from outbox.sources import eia as eia_mod
from outbox.stages.plan import Stream, Window, asked_cutoffs, latest_hours, plan_streams
from outbox.testing import fake_eia, synth
from outbox.testing.fake_eia import FakeEIA
from outbox.timeutil import floor_hour, to_ts, utcnow

KEY = "eia-datasets-test-key-0123456789"
REGION, FUEL, INTERCHANGE = synth.ROUTES
runner = CliRunner()

# What the table held when it was written: the names in canonical order, and per dataset
# (route, type code, series type, non-negative, publication lag, look-back, horizon).
EXPECTED = {
    "demand": (REGION, "D", "demand", True, 2, 72, "now"),
    "demand_forecast": (REGION, "DF", "demand_forecast", True, 0, 72, "forecast"),
    "net_generation": (REGION, "NG", "net_generation", False, 30, 72, "now"),
    "interchange": (REGION, "TI", "interchange", False, 30, 72, "now"),
    "generation": (FUEL, None, "generation", False, 30, 96, "now"),
    "ba_interchange": (INTERCHANGE, None, "interchange", False, 54, 96, "now"),
}


def _row(ds: Dataset) -> tuple:
    return (
        ds.route,
        ds.code,
        ds.series_type,
        ds.non_negative,
        ds.publication_lag_hours,
        ds.lookback_hours,
        ds.horizon,
    )


# -- the table and its lookups -------------------------------------------------------


def test_table_holds_the_six_datasets_in_canonical_order() -> None:
    assert datasets.names() == tuple(EXPECTED)
    assert {ds.name: _row(ds) for ds in datasets.TABLE} == EXPECTED
    assert [datasets.order(n) for n in datasets.names()] == list(range(6))
    assert datasets.order("nope") == 6
    assert datasets.title("generation") == "Generation by fuel" and datasets.title("x") == "x"


def test_every_lookup_agrees_with_the_table() -> None:
    for i, ds in enumerate(datasets.TABLE):
        assert datasets.by_name(ds.name) is ds and datasets.order(ds.name) == i
        assert ds in datasets.for_route(ds.route) and ds.route in datasets.routes()
        if ds.code is not None:
            assert datasets.of_row(ds.route, ds.code) == ds.name
            assert datasets.facet_codes(ds.route, {ds.name}) == (ds.code,)
        else:
            assert datasets.of_row(ds.route, "ANY") == ds.name
            assert datasets.facet_codes(ds.route, {ds.name}) == ()
        subtype = None if ds.subtype is None else "x"
        assert datasets.of_series(ds.series_type, subtype) == ds.name
        sid = datasets.series_id("PJM", ds.series_type, subtype)
        assert sid.startswith(datasets.series_prefix(ds.name, "PJM"))
    assert datasets.of_series("mystery", None) == "mystery"
    with pytest.raises(KeyError):
        datasets.by_name("nope")
    with pytest.raises(ValueError, match="unknown EIA route"):
        datasets.route("electricity/rto/nope")
    with pytest.raises(ValueError, match="unknown region-data type 'CO2'"):
        datasets.of_row(REGION, "CO2")


def test_series_prefixes_are_the_ones_gridpulse_latest_is_matched_by() -> None:
    prefixes = {name: datasets.series_prefix(name, "CAISO") for name in datasets.names()}
    assert prefixes == {
        "demand": "EIA.CAISO.demand",
        "demand_forecast": "EIA.CAISO.demand_forecast",
        "net_generation": "EIA.CAISO.net_generation",
        "interchange": "EIA.CAISO.interchange",
        "generation": "EIA.CAISO.generation.",
        "ba_interchange": "EIA.CAISO.interchange.",
    }


def test_the_eia_client_and_the_test_peers_know_the_tables_routes() -> None:
    """eia.py (a source, below the table) keeps its own copy of the routes: they agree."""
    paths = tuple(r.path for r in datasets.ROUTES)
    assert paths == datasets.routes() == ports.ROUTES == synth.ROUTES
    for r in datasets.ROUTES:
        assert r.columns == (ports.RESPONDENT_FACET[r.path], eia_mod.VALUE_FACET[r.path])
        assert r.columns == fake_eia.FACETS[r.path] == synth.ROW_KEYS[r.path]
    region_codes = datasets.facet_codes(REGION, set(datasets.names()))
    assert region_codes == eia_mod.REGION_TYPE_CODES == tuple(synth.REGION_TYPE_NAMES)


def test_config_defaults_and_planning_come_from_the_table() -> None:
    config = Config()
    now = datetime(2025, 8, 22, 14, 30, tzinfo=UTC)
    latest, cutoffs = latest_hours(config, now), asked_cutoffs(config, now)
    for ds in datasets.TABLE:
        assert config.datasets[ds.name].lookback_hours == ds.lookback_hours
        assert config.publication_lag(ds.name) == ds.publication_lag_hours
        ahead = config.eia.forecast_horizon_hours if ds.horizon == "forecast" else 0
        assert latest[ds.name] == datetime(2025, 8, 22, 15, tzinfo=UTC) + timedelta(hours=ahead)
        lag = timedelta(hours=ds.publication_lag_hours)
        assert cutoffs[ds.name] == to_ts(datetime(2025, 8, 22, 14, tzinfo=UTC) - lag)
    assert config.enabled_datasets() == list(datasets.names())
    streams = plan_streams(config, bas=["PJM"])
    assert [(s.dataset, s.route) for s in streams] == [
        (ds.name, ds.route) for r in datasets.routes() for ds in datasets.for_route(r)
    ]
    with pytest.raises(ValidationError, match="unknown dataset 'solar'; known: demand, demand_f"):
        Config.model_validate({"datasets": {"solar": {}}})


def test_requests_ask_for_the_type_codes_of_their_streams_in_table_order() -> None:
    t = datetime(2025, 8, 1, tzinfo=UTC)
    streams = (Stream("interchange", "PJM", REGION), Stream("demand", "PJM", REGION))
    assert Window(REGION, streams, t, t).request().facet_values == ("D", "TI")
    fuel = Window(FUEL, (Stream("generation", "PJM", FUEL),), t, t)
    assert fuel.request().facet_values == ()


def test_normalized_series_follow_the_table() -> None:
    start = datetime(2025, 8, 21, tzinfo=UTC)
    for route in datasets.routes():
        rows = synth.make_rows(route, ["PJM"], start, 1)
        norm = normalize_page(route, rows, ba_codes={"PJM": "PJM"})
        assert norm.series and not norm.invalid
        for info in norm.series:
            name = datasets.of_series(info.type, info.subtype)
            ds = datasets.by_name(name)
            assert ds.route == route and info.type == ds.series_type
            assert info.series_id.startswith(datasets.series_prefix(name, "PJM"))
            assert (info.subtype is None) == (ds.subtype is None)
            assert stream_key(name, "PJM") in norm.stream_max
        negative = [{**r, "value": "-5"} for r in rows]
        refused = normalize_page(route, negative, ba_codes={}).invalid.get("negative_demand", 0)
        expected = {
            ds.name: ds.non_negative for ds in datasets.for_route(route) if ds.code is not None
        }
        code_col = datasets.route(route).code_facet
        assert refused == sum(
            1 for r in negative if expected.get(datasets.of_row(route, r[code_col]), False)
        )


# -- adding a dataset touches only datasets.py ---------------------------------------

NEW = Dataset(
    name="net_generation_forecast",
    route=REGION,
    code="NGF",
    series_type="net_generation_forecast",
    subtype=None,
    non_negative=True,
    publication_lag_hours=0,
    lookback_hours=24,
    horizon="forecast",
    title="Day-ahead net generation forecast",
)


def _region_rows(start: datetime, hours: int) -> list[dict]:
    """What the stand-in EIA serves: the four region types, plus NGF rows that copy NG
    (over the same hours and three hours ahead for PJM, one of them negative)."""
    rows = synth.make_rows(REGION, ["PJM", "CISO"], start, hours)
    extra = [{**r, "type": "NGF", "type-name": NEW.title} for r in rows if r["type"] == "NG"]
    ahead = start + timedelta(hours=hours)
    for h in range(3):
        period = (ahead + timedelta(hours=h)).strftime("%Y-%m-%dT%H")
        value = "-1" if h == 2 else "100"
        extra.append({**extra[0], "period": period, "respondent": "PJM", "value": value})
    return rows + extra


def _config(tmp_path: Path, start: datetime) -> Path:
    path = tmp_path / "outbox.yaml"
    path.write_text(
        f"""
database: {tmp_path / "outbox.db"}
balancing_authorities: {{PJM: PJM, CAISO: CISO}}
datasets:
  generation: {{enabled: false}}
  ba_interchange: {{enabled: false}}
  net_generation_forecast: {{lookback_hours: 12}}
eia:
  history_start: {start.isoformat()}
  max_requests_per_second: 5
housekeeping:
  retention_days: 36500
"""
    )
    return path


def _invoke(cfg: Path, base_url: str, *args: str):
    env = {"EIA_BASE_URL": base_url, "EIA_API_KEY": KEY}
    return runner.invoke(app, ["-c", str(cfg), *args], env=env)


def test_a_dataset_added_to_the_table_is_fetched_staged_and_grouped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = floor_hour(utcnow())
    hours = 24
    start = now - timedelta(hours=hours - 1)
    cfg = _config(tmp_path, start)
    with FakeEIA({REGION: _region_rows(start, hours)}, api_key=KEY) as fake:
        assert fake.base_url is not None
        refused = _invoke(cfg, fake.base_url, "fetch")
        assert refused.exit_code == 2 and "unknown dataset 'net_generation_forecast'" in (
            refused.output
        )

        monkeypatch.setattr(datasets, "TABLE", (*datasets.TABLE, NEW))
        fetched = _invoke(cfg, fake.base_url, "fetch")
        assert fetched.exit_code == 0, fetched.output
        (asked,) = [parse_qsl(urlsplit(t).query) for t in fake.requests]
        assert [v for k, v in asked if k == "facets[type][]"] == ["D", "DF", "NG", "TI", "NGF"]
        # Through the forecast horizon, since the new dataset reaches it.
        horizon = now + timedelta(hours=Config().eia.forecast_horizon_hours)
        assert dict(asked)["end"] == horizon.strftime("%Y-%m-%dT%H")

        con = sqlite3.connect(tmp_path / "outbox.db")
        staged = dict(
            con.execute(
                "SELECT series_id, count(*) FROM observations"
                " WHERE series_id LIKE '%.net_generation_forecast' GROUP BY series_id"
            ).fetchall()
        )
        series = con.execute(
            "SELECT series_id, ba, type, subtype, route, facets FROM series"
            " WHERE type = 'net_generation_forecast' ORDER BY series_id"
        ).fetchall()
        marks = dict(con.execute("SELECT stream, last_ts FROM watermarks").fetchall())
        con.close()
        # PJM's two hours ahead are in (a forecast), the negative third is refused.
        assert staged == {
            "EIA.CAISO.net_generation_forecast": hours,
            "EIA.PJM.net_generation_forecast": hours + 2,
        }
        assert series == [
            ("EIA.CAISO.net_generation_forecast", "CAISO", NEW.name, None, REGION,
             '{"respondent":"CISO","type":"NGF"}'),
            ("EIA.PJM.net_generation_forecast", "PJM", NEW.name, None, REGION,
             '{"respondent":"PJM","type":"NGF"}'),
        ]  # fmt: skip
        assert marks["net_generation_forecast:PJM"] == to_ts(now + timedelta(hours=2))
        assert marks["net_generation_forecast:CISO"] == to_ts(now)

        status = _invoke(cfg, fake.base_url, "status", "--json")
        assert status.exit_code in (0, 1), status.output
        groups = json.loads(status.stdout)["groups"]
        assert [(g["dataset"], g["ba"]) for g in groups][-2:] == [
            ("net_generation_forecast", "CAISO"),
            ("net_generation_forecast", "PJM"),
        ]
        pjm = next(g for g in groups if g["dataset"] == NEW.name and g["ba"] == "PJM")
        assert pjm["series"] == 1 and pjm["pending"] == hours + 2


def test_a_new_outbox_starts_each_stream_at_its_own_series_in_gridpulse() -> None:
    """GridPulse's listing names the series; a stream starts at its own dataset's series,
    never at one whose id merely begins with it (demand_forecast begins with demand, a
    counterparty's interchange with total interchange)."""
    from outbox.stages.plan import first_starts

    config = Config()
    gp = config.eia_to_gridpulse.get("PJM", "PJM")
    listing = [
        # the forecast reaches a day ahead; PJM's demand series is not in GridPulse yet
        {"series_id": f"EIA.{gp}.demand_forecast", "latest_ts": "2025-08-22T23:00:00Z"},
        {"series_id": f"EIA.{gp}.interchange", "latest_ts": "2025-08-20T05:00:00Z"},
        {"series_id": f"EIA.{gp}.interchange.MISO", "latest_ts": "2025-08-19T05:00:00Z"},
        {"series_id": f"EIA.{gp}.generation.NG", "latest_ts": "2025-08-21T07:00:00Z"},
    ]
    starts = first_starts(config, listing)
    assert starts is not None
    key = {name: stream_key(name, "PJM") for name in datasets.names()}
    assert key["demand"] not in starts  # history start applies, not the forecast's hour
    assert starts[key["demand_forecast"]] == datetime(2025, 8, 22, 23, tzinfo=UTC)
    # total interchange from its own series, not the counterparty's older one
    assert starts[key["interchange"]] == datetime(2025, 8, 20, 5, tzinfo=UTC)
    assert starts[key["ba_interchange"]] == datetime(2025, 8, 19, 5, tzinfo=UTC)
    assert starts[key["generation"]] == datetime(2025, 8, 21, 7, tzinfo=UTC)
    for name in ("demand", "demand_forecast", "interchange"):
        assert datasets.is_series_of(name, gp, f"EIA.{gp}.{by_type(name)}")
    assert not datasets.is_series_of("demand", gp, f"EIA.{gp}.demand_forecast")
    assert not datasets.is_series_of("interchange", gp, f"EIA.{gp}.interchange.MISO")
    assert datasets.is_series_of("ba_interchange", gp, f"EIA.{gp}.interchange.MISO")
    assert not datasets.is_series_of("ba_interchange", gp, f"EIA.{gp}.interchange")


def by_type(name: str) -> str:
    return datasets.by_name(name).series_type
