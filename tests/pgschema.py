"""GridPulse's tables on PostgreSQL, as the contract draws them (gridpulse-ingest-v1.md),
for the direct sink's tests: the sink speaks SQL to this schema on its own."""

from __future__ import annotations

from typing import Any

CONTRACT_DDL = """
CREATE TABLE balancing_authorities (
    id serial PRIMARY KEY,
    code varchar(16) NOT NULL UNIQUE,
    name varchar(200),
    timezone varchar(64),
    region varchar(64)
);
CREATE TABLE series (
    id serial PRIMARY KEY,
    ba_id integer NOT NULL REFERENCES balancing_authorities(id),
    type varchar(32) NOT NULL,
    subtype varchar(64),
    units varchar(16) NOT NULL,
    eia_series_id varchar(128) NOT NULL UNIQUE,
    UNIQUE (ba_id, type, subtype)
);
CREATE TABLE observations (
    series_id integer NOT NULL REFERENCES series(id),
    ts timestamptz NOT NULL,
    value numeric(12,3),
    quality_flag varchar(16) NOT NULL
        CHECK (quality_flag IN ('good', 'estimated', 'missing')),
    PRIMARY KEY (series_id, ts)
);
"""


def create_contract_schema(dsn: str, *, revision: bool = False) -> None:
    """The contract's three tables in the database at ``dsn`` (libpq form); with
    ``revision`` also a revision column on observations (as the reference receiver has)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CONTRACT_DDL)
        if revision:
            conn.execute("ALTER TABLE observations ADD COLUMN revision varchar(128)")


def held(dsn: str) -> dict[tuple[str, str], tuple[Any, str]]:
    """``(series_id, ts) -> (value, quality_flag)`` of every observation in the database,
    ts as RFC 3339 ``Z`` text and value as a float (or None)."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT s.eia_series_id, to_char(o.ts AT TIME ZONE 'UTC', "
            '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), o.value, o.quality_flag '
            "FROM observations o JOIN series s ON s.id = o.series_id"
        ).fetchall()
    return {(sid, ts): (None if v is None else float(v), flag) for sid, ts, v, flag in found}


def held_revisions(dsn: str) -> dict[tuple[str, str], str]:
    """``(series_id, ts) -> revision`` (for a schema made with ``revision=True``); empty
    when the database cannot be read."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT s.eia_series_id, to_char(o.ts AT TIME ZONE 'UTC', "
            '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), o.revision '
            "FROM observations o JOIN series s ON s.id = o.series_id"
        ).fetchall()
    return {(sid, ts): rev for sid, ts, rev in found}
