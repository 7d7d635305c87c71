"""The tests' throwaway PostgreSQL cluster: started on 127.0.0.1, fresh databases."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.postgres


def test_each_test_gets_a_fresh_empty_database(pg_cluster, pg_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            assert (
                conn.execute(sa.text("select current_setting('listen_addresses')")).scalar()
                == "127.0.0.1"
            )
            tables = conn.execute(
                sa.text(
                    "select count(*) from information_schema.tables where table_schema='public'"
                )
            ).scalar()
            assert tables == 0
            conn.execute(sa.text("create table t (x int)"))
    finally:
        engine.dispose()
    other = pg_cluster.url(pg_cluster.database())
    engine = sa.create_engine(other)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select to_regclass('public.t')")).scalar() is None
    finally:
        engine.dispose()
