"""The cheap quality rules and frame find exactly what the reference ones found.

``quality_reference`` is the rules module and the engine's frame query as they were before
they were made cheap; each test runs both on the same random data (gaps, missing values,
repeated days, flat runs, spikes, broken identities, negative fuels) and compares every
finding and every evaluated scope, field by field.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import astuple

import pandas as pd
import pytest
import quality_reference as ref

from outbox.config import Config
from outbox.quality import rules
from outbox.quality.engine import Checker, dataset_of
from outbox.quality.frame import Frame, SeriesInfo, read_frame
from outbox.quality.settings import Resolver
from outbox.timeutil import hour_ts

BAS = ("AAA", "BBB", "CCC", "DDD")
FUELS = ("COL", "NG", "SUN", "WND", "BAT", "WAT")
H0 = 465_000  # an hour in 2023


def series_table(rng: random.Random) -> list[tuple[str, str, str, str | None]]:
    """(series_id, ba, type, subtype) of a random set of BAs' series."""
    out = []
    for ba in BAS:
        for code, type_ in (("D", "demand"), ("NG", "net_generation"), ("TI", "interchange")):
            out.append((f"r.{ba}.{code}", ba, type_, None))
        out.append((f"r.{ba}.DF", ba, "demand_forecast", None))
        for fuel in rng.sample(FUELS, rng.randint(2, len(FUELS))):
            out.append((f"f.{ba}.{fuel}", ba, "generation", fuel))
        for other in BAS:
            if other != ba and rng.random() < 0.7:
                out.append((f"i.{ba}.{other}", ba, "interchange", other))
    return out


def values(rng: random.Random, n: int, kind: str) -> list[float | None]:
    """A series of ``n`` hours with the defects the rules look for, now and then."""
    base = rng.choice([800.0, 5000.0, 20000.0]) if kind != "flow" else rng.uniform(-900, 900)
    v: list[float | None] = [
        round(base * (1 + 0.2 * ((h % 24) - 12) / 12) + rng.gauss(0, base * 0.02)) for h in range(n)
    ]
    if rng.random() < 0.3:
        v = [float(round(x)) if x is not None else None for x in v]
    else:
        v = [x + rng.choice([0.0, 0.25, 0.5]) if x is not None else None for x in v]
    for _ in range(rng.randint(0, 3)):  # defects
        at = rng.randrange(n)
        what = rng.random()
        if what < 0.25:  # spike
            v[at] = (v[at] or 0.0) * rng.choice([3.0, -2.0, 0.2])
        elif what < 0.45 and at >= 24:  # a repeated day
            for k in range(at, min(n, at + rng.randint(20, 40))):
                v[k] = v[k - 24]
        elif what < 0.65:  # a flat line
            level = rng.choice([0.0, v[at] or 1.0])
            for k in range(at, min(n, at + rng.randint(3, 30))):
                v[k] = level
        elif what < 0.8:  # negative
            v[at] = -rng.uniform(0, 400)
        elif what < 0.9:  # missing
            v[at] = None
    return v


def random_frame(seed: int) -> tuple[pd.DataFrame, rules.Scope]:
    rng = random.Random(seed)
    rows = []
    n = rng.randint(30, 150)
    for sid, ba, type_, sub in series_table(rng):
        kind = "flow" if type_ == "interchange" else "level"
        gap = rng.randrange(n) if rng.random() < 0.3 else None
        for k, v in enumerate(values(rng, n, kind)):
            if v is None or (gap is not None and gap <= k < gap + rng.randint(1, 5)):
                continue
            rows.append((sid, ba, type_, sub, H0 + k, v))
    frame = pd.DataFrame(rows, columns=["sid", "ba", "type", "sub", "h", "v"])
    ds = frame["type"].where(frame["type"] != "interchange", "interchange")
    ds = ds.mask((frame["type"] == "interchange") & frame["sub"].notna(), "ba_interchange")
    frame = frame.assign(ds=ds.astype("category")).drop(columns="type")
    frame = frame.sort_values(["sid", "h"], kind="stable").reset_index(drop=True)
    scope = {}
    for ba in rng.sample(BAS, rng.randint(1, len(BAS))):
        lo = H0 + rng.randrange(n)
        scope[ba] = (lo, min(H0 + n - 1, lo + rng.randint(0, 60)))
    return frame, scope


def config(seed: int) -> Config:
    """The defaults, or now and then tighter thresholds (more findings to compare)."""
    if seed % 3:
        return Config()
    tight = {
        "spike": {"threshold": 2, "datasets": {"generation": {"enabled": True}}},
        "balance": {"tolerance": 0.01, "min_mw": 5},
        "fuel_sum": {"tolerance": 0.01, "min_mw": 5},
        "interchange_sum": {"tolerance": 0.01, "min_mw": 5},
        "antisymmetry": {"tolerance": 0.01, "min_mw": 1},
        "flat_line": {"window_hours": 3},
        "negative_generation": {"threshold": 10},
    }
    return Config(quality={"rules": tight})


def outcome(o: object) -> tuple[list[tuple], list[tuple]]:
    return [astuple(f) for f in o.findings], [astuple(e) for e in o.evaluated]  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("rule", sorted(rules.FRAME_RULES))
def test_each_rule_finds_what_the_reference_found(rule: str, seed: int) -> None:
    frame, scope = random_frame(seed)
    resolver = Resolver(config(seed).quality)
    new = outcome(rules.FRAME_RULES[rule](Frame(frame.copy(), scope), scope, resolver))
    old = outcome(ref.FRAME_RULES[rule](frame.copy(), scope, resolver))
    assert new == old


def test_the_random_data_gives_each_rule_findings() -> None:
    """The comparison above is not of empty lists."""
    seen: dict[str, int] = dict.fromkeys(rules.FRAME_RULES, 0)
    for seed in range(40):
        frame, scope = random_frame(seed)
        resolver = Resolver(config(seed).quality)
        for rule, judge in ref.FRAME_RULES.items():
            seen[rule] += len(judge(frame, scope, resolver).findings)
    assert all(seen.values()), seen


@pytest.mark.parametrize("seed", range(12))
def test_the_frame_holds_what_the_reference_query_read(seed: int) -> None:
    frame, scope = random_frame(seed)
    rng = random.Random(seed)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE series (series_id TEXT PRIMARY KEY, ba, type, subtype)")
    con.execute(
        "CREATE TABLE observations (series_id TEXT, ts TEXT, value REAL,"
        " PRIMARY KEY (series_id, ts)) WITHOUT ROWID"
    )
    kinds = {"demand": "demand", "net_generation": "net_generation", "generation": "generation"}
    table = {}
    for sid, ba, sub, ds in (
        frame[["sid", "ba", "sub", "ds"]].drop_duplicates().itertuples(index=False)
    ):
        type_ = kinds.get(ds, "interchange" if ds in ("interchange", "ba_interchange") else ds)
        sub = None if pd.isna(sub) else sub
        table[sid] = (ba, type_, sub)
        con.execute("INSERT INTO series VALUES (?, ?, ?, ?)", (sid, ba, type_, sub))
    rows = [(r.sid, hour_ts(int(r.h)), float(r.v)) for r in frame.itertuples(index=False)]
    # missing values (value NULL) are never read
    rows += [(sid, hour_ts(H0 - 3 - k), None) for k, sid in enumerate(sorted(table)[:5])]
    con.executemany("INSERT INTO observations VALUES (?, ?, ?)", rows)
    context = (rng.randint(0, 50), rng.randint(0, 30))
    cur = con.cursor()
    info = {s: SeriesInfo(b, t, sub, dataset_of(t, sub)) for s, (b, t, sub) in table.items()}
    new = read_frame(cur, info, scope, context)
    old = ref.frame(cur, scope, context)
    assert old is not None and new is not None
    pd.testing.assert_frame_equal(new, old, check_categorical=False)
    assert list(new["ds"].cat.categories) == list(old["ds"].cat.categories)


def test_the_checker_reads_the_frame_with_its_context() -> None:
    assert Checker(Config()).context == rules.context_hours(Resolver(Config().quality))
