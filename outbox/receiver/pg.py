"""The receiver on PostgreSQL: the URL and its driver, TimescaleDB, and the batch upsert.

``postgresql://`` is mapped to the psycopg 3 driver (the ``postgres`` extra); psycopg2 is
not used. On PostgreSQL ``observations.ts`` is ``timestamptz`` and ``value`` is
``numeric(12,3)``, as in GridPulse; when the ``timescaledb`` extension is available the
table becomes a hypertable on ``ts``, and when it is not it stays a plain table (one INFO
line says so). A batch is upserted with ONE statement: ``INSERT ... SELECT FROM unnest(...)
ON CONFLICT (series_id, ts) DO UPDATE ... WHERE`` the stored revision differs.

Nothing here imports the outbox (the receiver is a separate peer), so credentials in a URL
are masked here too: an error names the URL with ``***`` for its password.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'gridpulse-outbox[postgres]'"
DRIVER = "psycopg"

HYPERTABLE_SQL = (
    "CREATE EXTENSION IF NOT EXISTS timescaledb",
    "SELECT create_hypertable('observations', 'ts', if_not_exists => TRUE, migrate_data => TRUE)",
)
AVAILABLE_SQL = "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
PLAIN_TABLES = "timescaledb is not available in this database: observations is a plain table"

# One statement per batch: the rows travel as six arrays (binary through psycopg). The
# WHERE keeps a resent revision from rewriting its row (no dead tuple, no new WAL).
UPSERT_SQL = (
    "INSERT INTO observations"
    " (series_id, ts, value, quality_flag, revision, received_at)"
    " SELECT s, t, v, f, r, %(received_at)s"
    " FROM unnest(%(sid)s::integer[], %(ts)s::timestamptz[], %(value)s::numeric[],"
    " %(flag)s::text[], %(revision)s::text[]) AS u(s, t, v, f, r)"
    " ON CONFLICT (series_id, ts) DO UPDATE SET"
    " value = excluded.value, quality_flag = excluded.quality_flag,"
    " revision = excluded.revision, received_at = excluded.received_at"
    " WHERE observations.revision IS DISTINCT FROM excluded.revision"
)


class ReceiverDatabaseError(RuntimeError):
    """The receiver's database cannot be used: a missing driver, a bad or unreachable URL.

    Its message is one line and never holds the URL's password.
    """


def is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (any driver spelling)."""
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def masked(url: str | URL) -> str:
    """``url`` with its password shown as ``***`` (the text itself when it does not parse)."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError):
        return "<unparsable database URL>"
    return parsed.render_as_string(hide_password=True)


def postgres_url(url: str) -> URL:
    """The SQLAlchemy URL for a PostgreSQL ``url``, on psycopg 3; checks the driver is there.

    ``postgresql://``, ``postgres://`` and ``postgresql+psycopg://`` are accepted; another
    driver (``+psycopg2``, ``+asyncpg``) is refused, since the extra installs psycopg 3.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ReceiverDatabaseError(f"not a database URL: {masked(url)}") from None
    driver = parsed.drivername.partition("+")[2]
    if driver not in ("", DRIVER):
        raise ReceiverDatabaseError(
            f"{masked(parsed)}: the receiver speaks PostgreSQL through psycopg 3;"
            f" write postgresql:// (driver {driver!r} is not supported)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ReceiverDatabaseError(
            f"the PostgreSQL driver (psycopg 3) is not installed: {EXTRA_HINT}"
        ) from None
    return parsed.set(drivername=f"postgresql+{DRIVER}")


def connect_error(url: URL, exc: Exception) -> ReceiverDatabaseError:
    """A one-line error for a database that refused or could not be reached."""
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    if url.password:
        text = text.replace(str(url.password), "***")
    return ReceiverDatabaseError(f"cannot use the receiver database {masked(url)}: {text}")


def hypertable_statements(available: bool) -> tuple[str, ...]:
    """The statements that make ``observations`` a hypertable (none without timescaledb)."""
    return HYPERTABLE_SQL if available else ()


def setup_timescale(conn: Connection, *, announce: bool = True) -> bool:
    """Make ``observations`` a hypertable when timescaledb is available; whether it did."""
    available = conn.exec_driver_sql(AVAILABLE_SQL).first() is not None
    for statement in hypertable_statements(available):
        conn.exec_driver_sql(statement)
    if announce:
        if available:
            log.info("timescaledb: observations is a hypertable on ts")
        else:
            log.info(PLAIN_TABLES)
    return available


def upsert_params(
    rows: Sequence[tuple[str, str, float | None, str, str]],
    ids: Mapping[str, int],
    received_at: str,
) -> dict[str, Any]:
    """The arrays of one batch's upsert; a key repeated in a batch keeps its last row.

    (``ON CONFLICT`` may not touch a row twice in one statement; SQLite's row-by-row
    upsert lets the last one win, and so does this.)
    """
    last: dict[tuple[int, str], tuple[float | None, str, str]] = {}
    for sid, ts, value, flag, revision in rows:
        last[(ids[sid], ts)] = (None if value is None else float(value), flag, revision)
    return {
        "sid": [key[0] for key in last],
        "ts": [key[1] for key in last],
        "value": [item[0] for item in last.values()],
        "flag": [item[1] for item in last.values()],
        "revision": [item[2] for item in last.values()],
        "received_at": received_at,
    }


def rfc3339(value: datetime) -> str:
    """A ``timestamptz`` read back as the wire's ``2025-08-22T14:00:00Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    """The wire's ``...Z`` text as an aware datetime, for a ``timestamptz`` parameter."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
