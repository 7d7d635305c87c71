"""Gaps: listing missing hours, and ``fetch --fill-gaps`` against the stand-in EIA server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from factories import obs, ts
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import load_config
from outbox.gaps import Gap, find_gaps
from outbox.quality import ledger
from outbox.stages.plan import MERGE_HOURS, plan_fill
from outbox.store import Store
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import ROUTE_REGION, make_rows

KEY = "eia-gap-test-key-0123456789"
START = datetime(2025, 8, 1, tzinfo=UTC)
HOURS = 96
runner = CliRunner()


def _period(hour: int) -> str:
    return (START + timedelta(hours=hour)).strftime("%Y-%m-%dT%H")


def _ts(hour: int) -> str:
    return (START + timedelta(hours=hour)).strftime("%Y-%m-%dT%H:00:00Z")


# (respondent, type, hour) rows left out of what EIA first serves
HOLES = {("PJM", "D", 10), ("PJM", "D", 40), ("CISO", "NG", 40), ("CISO", "NG", 60)}


def _rows(
    *, drop: set[tuple[str, str, int]], null: set[tuple[str, str, int]] = frozenset()
) -> list[dict]:
    out = []
    for row in make_rows(ROUTE_REGION, ["PJM", "CISO"], START, HOURS):
        key = (row["respondent"], row["type"], _hour_of(row["period"]))
        if key in drop:
            continue
        out.append({**row, "value": None} if key in null else row)
    return out


def _hour_of(period: str) -> int:
    when = datetime.strptime(period, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    return int((when - START).total_seconds() // 3600)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "outbox.yaml"
    path.write_text(
        f"""
database: {tmp_path / "outbox.db"}
balancing_authorities: {{PJM: PJM, CAISO: CISO}}
datasets:
  generation: {{enabled: false}}
  ba_interchange: {{enabled: false}}
eia:
  history_start: {START.isoformat()}
  max_requests_per_second: 5
housekeeping:
  retention_days: 36500
"""
    )
    return path


def _invoke(cfg: Path, base_url: str, *args: str) -> str:
    env = {"EIA_BASE_URL": base_url, "EIA_API_KEY": KEY}
    result = runner.invoke(app, ["-c", str(cfg), *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def _query(target: str) -> dict[str, list[str] | str]:
    items = parse_qsl(urlsplit(target).query)
    return {
        "start": dict(items)["start"],
        "end": dict(items)["end"],
        "respondent": [v for k, v in items if k == "facets[respondent][]"],
        "type": [v for k, v in items if k == "facets[type][]"],
    }


def test_gaps_listed_then_filled_then_checked(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    with FakeEIA({ROUTE_REGION: _rows(drop=HOLES)}, api_key=KEY) as fake:
        assert fake.base_url is not None
        end = (START + timedelta(hours=HOURS - 1)).isoformat()
        _invoke(cfg, fake.base_url, "fetch", "--start", START.isoformat(), "--end", end)

        assert _invoke(cfg, fake.base_url, "gaps") == (
            "series                    from                  to                    hours\n"
            "EIA.CAISO.net_generation  2025-08-02T16:00:00Z  2025-08-02T16:00:00Z      1\n"
            "EIA.CAISO.net_generation  2025-08-03T12:00:00Z  2025-08-03T12:00:00Z      1\n"
            "EIA.PJM.demand            2025-08-01T10:00:00Z  2025-08-01T10:00:00Z      1\n"
            "EIA.PJM.demand            2025-08-02T16:00:00Z  2025-08-02T16:00:00Z      1\n"
            "4 missing hours in 4 ranges of 2 series\n"
        )
        listed = json.loads(_invoke(cfg, fake.base_url, "gaps", "--json"))
        assert listed["hours"] == 4
        assert listed["gaps"][0] == {
            "series_id": "EIA.CAISO.net_generation",
            "dataset": "net_generation",
            "start": _ts(40),
            "end": _ts(40),
            "hours": 1,
        }
        since = _invoke(cfg, fake.base_url, "gaps", "--since", _ts(41), "--json")
        assert [g["start"] for g in json.loads(since)["gaps"]] == [_ts(60)]

        with Store.open(tmp_path / "outbox.db") as store:
            marks = store.staging.watermarks()
        # EIA now has every hour but CISO NG at hour 60; PJM demand at 40 comes back null.
        fake.set_rows(ROUTE_REGION, _rows(drop={("CISO", "NG", 60)}, null={("PJM", "D", 40)}))
        before = len(fake.requests)
        out = _invoke(cfg, fake.base_url, "fetch", "--fill-gaps")
        assert out == (
            "fill-gaps run 2: 4 missing hours, 3 requests, 3 filled, "
            "1 not at EIA (recorded as checked)\n"
            "quality: 0 findings opened, 0 resolved, 0 rows quarantined\n"
        )
        # Requests are in flight together (eia.max_in_flight), so they reach EIA in any
        # order; each missing hour is asked for exactly once.
        asked = sorted((_query(t) for t in fake.requests[before:]), key=lambda q: q["start"])
        assert asked == [
            {"start": _period(10), "end": _period(10), "respondent": ["PJM"], "type": ["D"]},
            {
                "start": _period(40),
                "end": _period(40),
                "respondent": ["CISO", "PJM"],
                "type": ["D", "NG"],
            },
            {"start": _period(60), "end": _period(60), "respondent": ["CISO"], "type": ["NG"]},
        ]
        assert _invoke(cfg, fake.base_url, "gaps") == "no missing hours\n"

        with Store.open(tmp_path / "outbox.db") as store:
            assert store.staging.watermarks() == marks  # a gap fill never moves a watermark
            filled = store.reads.row("EIA.PJM.demand", _ts(10))
            nulled = store.reads.row("EIA.PJM.demand", _ts(40))
            assert filled is not None and filled["quality_flag"] == "good"
            assert filled["state"] == "pending"
            assert nulled is not None and nulled["quality_flag"] == "missing"
            assert nulled["value"] is None
            assert store.reads.row("EIA.CAISO.net_generation", _ts(60)) is None

        again = len(fake.requests)
        out = _invoke(cfg, fake.base_url, "fetch", "--fill-gaps")
        assert out == (
            "fill-gaps run 3: 0 missing hours, 0 requests, 0 filled, "
            "0 not at EIA (recorded as checked)\n"
            "quality: 0 findings opened, 0 resolved, 0 rows quarantined\n"
        )
        assert len(fake.requests) == again  # the hour EIA lacks is not asked for again


def test_a_filled_hour_is_judged_and_a_quarantining_rule_holds_it_back(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + "quality: {rules: {spike: {action: quarantine}}}\n")
    hole = ("PJM", "D", 70)
    with FakeEIA({ROUTE_REGION: _rows(drop={hole})}, api_key=KEY) as fake:
        assert fake.base_url is not None
        end = (START + timedelta(hours=HOURS - 1)).isoformat()
        _invoke(cfg, fake.base_url, "fetch", "--start", START.isoformat(), "--end", end)
        # EIA now serves the missing hour, at four times the series' level.
        rows = _rows(drop=set())
        for row in rows:
            if (row["respondent"], row["type"], _hour_of(row["period"])) == hole:
                row["value"] = str(float(row["value"]) * 4)
        fake.set_rows(ROUTE_REGION, rows)
        out = _invoke(cfg, fake.base_url, "fetch", "--fill-gaps")
    assert out == (
        "fill-gaps run 2: 1 missing hours, 1 requests, 1 filled, 0 not at EIA "
        "(recorded as checked)\n"
        "quality: 2 findings opened, 0 resolved, 1 rows quarantined\n"
    )
    with Store.open(tmp_path / "outbox.db") as store:
        spiked = store.reads.row("EIA.PJM.demand", _ts(70))
        opened = {(f["rule"], f["ba"], f["start"]) for f in ledger.findings(store)}
    # The spike quarantines; the broken balance of that hour (warn) is a finding only.
    assert opened == {("spike", "PJM", _ts(70)), ("balance", "PJM", _ts(70))}
    assert spiked is not None
    assert (spiked["state"], spiked["last_error_code"]) == ("dead", "QUALITY_SPIKE")


def test_fill_gaps_refuses_other_fetch_options(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    result = runner.invoke(app, ["-c", str(cfg), "fetch", "--fill-gaps", "--ba", "PJM"])
    assert result.exit_code == 2, result.output
    assert "--fill-gaps re-requests every listed gap" in result.output


def test_gaps_respect_publication_lag_and_retention(tmp_path: Path) -> None:
    config = load_config(None, env={"OUTBOX_DB": str(tmp_path / "o.db")})
    facets = '{"respondent":"PJM","type":"D"}'
    pjm = ("EIA.PJM.demand", "PJM", "demand", None, "MW", ROUTE_REGION, facets)
    with Store.open(tmp_path / "o.db") as store:
        store.staging.stage(
            [obs("EIA.PJM.demand", h) for h in (0, 1, 3, 50, 52)], series_rows=[pjm]
        )

        def ranges(now: datetime) -> list[tuple[str, str]]:
            return [(g.start, g.end) for g in find_gaps(config, store, now=now)]

        at_52 = datetime.fromisoformat(ts(52))
        # demand's publication lag is 2 h: hour 51 is not missing yet at hour 52
        assert ranges(at_52) == [(ts(2), ts(2)), (ts(4), ts(49))]
        assert ranges(at_52 + timedelta(hours=1))[-1] == (ts(51), ts(51))
        # hours older than the retention window are not gaps any more
        later = datetime.fromisoformat(ts(10)) + timedelta(days=config.housekeeping.retention_days)
        assert ranges(later) == [(ts(10), ts(49)), (ts(51), ts(51))]


def test_plan_merges_nearby_hours_across_respondents() -> None:
    sources = {
        "EIA.PJM.demand": (ROUTE_REGION, {"respondent": "PJM", "type": "D"}),
        "EIA.MISO.interchange": (ROUTE_REGION, {"respondent": "MISO", "type": "TI"}),
        "EIA.PJM.generation.wind": (
            "electricity/rto/fuel-type-data",
            {"respondent": "PJM", "fueltype": "WND"},
        ),
    }

    def gap(sid: str, hour: int, n: int = 1) -> Gap:
        return Gap(sid, "x", ts(hour), ts(hour + n - 1), n)

    plan = plan_fill(
        [
            gap("EIA.PJM.demand", 0, 2),
            gap("EIA.MISO.interchange", 1 + MERGE_HOURS),  # within reach of hour 1: merged
            gap("EIA.PJM.demand", 2 + 2 * MERGE_HOURS),  # beyond: its own request
            gap("EIA.PJM.generation.wind", 0),
        ],
        sources,
        max_hours=744,
    )
    shapes = [
        (p.window.route.rsplit("/", 1)[-1], ts_of(p.window.start), ts_of(p.window.end), p.hours)
        for p in plan
    ]
    assert shapes == [
        (
            "region-data",
            ts(0),
            ts(1 + MERGE_HOURS),
            (
                ("EIA.PJM.demand", ts(0)),
                ("EIA.PJM.demand", ts(1)),
                ("EIA.MISO.interchange", ts(1 + MERGE_HOURS)),
            ),
        ),
        (
            "region-data",
            ts(2 + 2 * MERGE_HOURS),
            ts(2 + 2 * MERGE_HOURS),
            (("EIA.PJM.demand", ts(14)),),
        ),
        ("fuel-type-data", ts(0), ts(0), (("EIA.PJM.generation.wind", ts(0)),)),
    ]
    first = plan[0].window.request()
    assert first.respondents == ("MISO", "PJM") and first.facet_values == ("D", "TI")
    assert plan[2].window.request().respondents == ("PJM",)


def test_plan_splits_long_ranges() -> None:
    sources = {"EIA.PJM.demand": (ROUTE_REGION, {"respondent": "PJM", "type": "D"})}
    plan = plan_fill([Gap("EIA.PJM.demand", "demand", ts(0), ts(99), 100)], sources, max_hours=40)
    assert [(ts_of(p.window.start), ts_of(p.window.end)) for p in plan] == [
        (ts(0), ts(39)),
        (ts(40), ts(79)),
        (ts(80), ts(99)),
    ]


def ts_of(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
