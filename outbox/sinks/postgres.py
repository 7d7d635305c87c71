"""The direct sink: batches written straight into GridPulse's PostgreSQL database.

GridPulse's tables (``gridpulse-ingest-v1.md``, top): ``balancing_authorities(code
UNIQUE, name, ...)``, ``series(id, ba_id, type, subtype, units, eia_series_id UNIQUE)``
and ``observations(series_id, ts timestamptz, value numeric(12,3), quality_flag,
PRIMARY KEY(series_id, ts))``. :class:`PostgresSink` speaks SQL to that schema on its
own (it shares no code with the reference receiver). A ``revision`` column and a
``received_at`` column on ``observations`` (the reference receiver's tables have them)
are written when present.

One batch is one transaction, and its commit is the acknowledgement:

* series ids are resolved by ``eia_series_id``; a missing series (and its BA) is created
  from the row's ``ba``/``type``/``subtype``/``units`` under an open catalogue
  (``sink.catalog: open``), or its rows are refused (``UNKNOWN_SERIES``) under a fixed
  one; a series the database will not create (a privilege, a constraint) has its rows
  refused with the database's reason;
* observations are upserted on ``(series_id, ts)``: the sent row wins, and a row that is
  already there unchanged is not rewritten (``... DO UPDATE ... WHERE ... IS DISTINCT
  FROM``), so a re-delivered batch is harmless;
* rows the database refuses (a check constraint, a value out of ``numeric(12,3)``) are
  found by bisecting inside the transaction with savepoints and refused with the
  database's reason (code from its SQLSTATE, e.g. ``CHECK_VIOLATION``);
* a lost connection, a failed connect, a serialization failure or a timeout is a
  :class:`~outbox.errors.SinkTransientError` (deferred like a 503); refused credentials
  or privileges are a :class:`~outbox.errors.SinkAuthError`; anything else (a missing
  table) stops the run with no row changed.

psycopg 3 is imported on first use: without it the sink names the
``gridpulse-outbox[postgres]`` extra. The URL's credentials are masked in every message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from outbox.errors import (
    BatchRejectedError,
    SinkAuthError,
    SinkError,
    SinkTransientError,
)
from outbox.ports import Batch, Outcome, Prepared, Refusal
from outbox.redact import database_url_secrets, redact
from outbox.timeutil import to_ts

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

EXTRA_HINT = "install the PostgreSQL driver: pip install 'gridpulse-outbox[postgres]'"
UNKNOWN_SERIES = "UNKNOWN_SERIES"
_MAX_MESSAGE = 300
_STAGING = "outbox_staged_batch"
# SQLSTATE classes of a row the database refuses: data exception, integrity constraint.
_ROW_CLASSES = ("22", "23")
# Credentials and privileges: invalid authorization, unknown database, insufficient privilege.
_AUTH_STATES = ("28", "3D000", "42501")
# A refused connect carries no SQLSTATE (psycopg: None): the server's FATAL message of the
# same classes (28xxx, 3D000, 42501), or libpq's own when no password was given.
_REFUSED_AT_CONNECT = re.compile(
    r"authentication failed|is not permitted to log in|role \".*\" does not exist|"
    r"database \".*\" does not exist|permission denied for database|no pg_hba\.conf entry|"
    r"no password supplied"
)
# Transaction rollback (serialization failure, deadlock), connection, resources, operator.
_TRANSIENT_CLASSES = ("40", "08", "53", "57")


class _Row(NamedTuple):
    """One row as the sink writes it (the claimed row's fields it needs)."""

    series_id: str
    ts: str
    value: float | None
    quality_flag: str
    revision: str
    ba: str
    type: str
    subtype: str | None
    units: str


@dataclass(frozen=True)
class _Schema:
    """What the sink found of ``observations``: its optional columns, ``ts``'s type."""

    revision: bool
    received_at: bool
    ts_is_timestamp: bool
    received_at_is_timestamp: bool = False


def load_driver() -> Any:
    """The psycopg module, or a one-line SinkError naming the extra."""
    try:
        import psycopg
    except ImportError:
        raise SinkError(f"the postgres sink needs psycopg 3: {EXTRA_HINT}") from None
    return psycopg


class PostgresSink:
    """The :class:`~outbox.ports.Sink` that writes into GridPulse's PostgreSQL tables.

    One connection (autocommit, each batch in an explicit transaction), opened on first
    use and again after it is lost. Also answers what ``status --remote`` and the
    first-start watermarks ask (:meth:`latest`, :meth:`list_series`).
    """

    def __init__(
        self,
        url: str,
        *,
        catalog: str = "open",
        connect_timeout_seconds: float = 10.0,
        statement_timeout_seconds: float = 60.0,
    ) -> None:
        self._url = url
        self._secrets = database_url_secrets(url)  # the host and database stay readable
        self._fixed = catalog == "fixed"
        self._connect_timeout = max(1, round(connect_timeout_seconds))
        self._statement_ms = max(1, round(statement_timeout_seconds * 1000))  # 0 is "none"
        self._conn: psycopg.Connection[Any] | None = None
        self._staging_on: psycopg.Connection[Any] | None = None
        self._schema: _Schema | None = None
        self._upsert_sql = self._copy_sql = self._bulk_sql = ""
        self._series_ids: dict[str, int] = {}

    # -- the port -------------------------------------------------------------------

    def prepare(self, batch: Batch) -> Prepared:
        """The rows as tuples (touches no connection; ``source_data`` is not stored)."""
        rows = [
            _Row(
                r.series_id,
                r.ts,
                r.value,
                r.quality_flag,
                r.revision,
                r.ba,
                r.type,
                r.subtype,
                r.units,
            )
            for r in batch.rows
        ]
        return Prepared(batch, 0, rows)

    def send(self, prepared: Prepared) -> Outcome:
        """Write one batch in one transaction; its commit is the acknowledgement."""
        rows: list[_Row] = prepared.payload
        conn = self._connection()
        self._staging(conn, self._schema_of(conn))
        try:
            with conn.transaction():
                ids, refused = self._resolve(conn, rows)
                refused.update(self._upsert(conn, rows, ids, refused))
        except Exception as exc:
            raise self._error(exc, "writing a batch") from None
        self._series_ids.update(ids)  # only after the commit: a rolled-back create is gone
        rejected = tuple(Refusal(i, code, msg) for i, (code, msg) in sorted(refused.items()))
        return Outcome(len(rows) - len(rejected), rejected)

    def health(self) -> bool:
        """Whether the database answers ``SELECT 1``."""
        try:
            self._connection().execute("SELECT 1")
        except Exception as exc:  # a health probe reports, it does not raise
            log.debug("postgres health check failed: %s", self._clean(str(exc)))
            self._drop()
            return False
        return True

    # -- reads: status --remote, first-start watermarks, doctor ---------------------

    def latest(self, series_id: str) -> tuple[str | None, str | None] | None:
        """``(latest_ts, revision)`` the database holds for a series, None if unknown."""
        conn = self._connection()
        schema = self._schema_of(conn)
        revision = "o.revision" if schema.revision else "NULL"
        try:
            found = conn.execute(
                "SELECT id FROM series WHERE eia_series_id = %s", (series_id,)
            ).fetchone()
            if found is None:
                return None
            row = conn.execute(
                f"SELECT o.ts, {revision} FROM observations o WHERE o.series_id = %s "
                "ORDER BY o.ts DESC LIMIT 1",
                (found[0],),
            ).fetchone()
        except Exception as exc:
            raise self._error(exc, "reading the latest row") from None
        return (None, None) if row is None else (_ts_text(row[0]), row[1])

    def list_series(self) -> list[Mapping[str, object]]:
        """Every series the database holds, with its latest ``ts`` (one index seek per
        series on the primary key ``(series_id, ts)``, not a scan of every observation)."""
        conn = self._connection()
        try:
            found = conn.execute(
                "SELECT s.eia_series_id, b.code, s.type, s.subtype, s.units, "
                "(SELECT max(o.ts) FROM observations o WHERE o.series_id = s.id) FROM series s "
                "JOIN balancing_authorities b ON b.id = s.ba_id "
                "ORDER BY s.eia_series_id"
            ).fetchall()
        except Exception as exc:
            raise self._error(exc, "listing the series") from None
        keys = ("series_id", "ba", "type", "subtype", "units", "latest_ts")
        return [
            dict(zip(keys, (*row[:5], None if row[5] is None else _ts_text(row[5])), strict=True))
            for row in found
        ]

    def check(self) -> tuple[str, str]:
        """For ``outbox doctor``: what was found (server version, schema, series) and the
        server's clock (RFC 3339); a SinkError when it cannot be reached or lacks the schema."""
        conn = self._connection()
        schema = self._schema_of(conn)
        try:
            found = conn.execute(
                "SELECT current_setting('server_version'), now(), count(*) FROM series"
            ).fetchone()
        except Exception as exc:
            raise self._error(exc, "checking the schema") from None
        version, server_time, count = found if found is not None else ("?", None, 0)
        extra = [name for name in ("revision", "received_at") if getattr(schema, name)]
        columns = f" (with {', '.join(extra)})" if extra else ""
        detail = f"PostgreSQL {version}, GridPulse schema found{columns}, {count} series"
        return detail, _ts_text(server_time) if server_time is not None else ""

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        self._drop()

    @property
    def where(self) -> str:
        """The database's URL with its credentials masked."""
        return self._clean(self._url)

    # -- the transaction's steps ----------------------------------------------------

    def _resolve(
        self, conn: psycopg.Connection[Any], rows: Sequence[_Row]
    ) -> tuple[dict[str, int], dict[int, tuple[str, str]]]:
        """Series ids of the batch, creating missing series (open catalogue); the rows of
        series that cannot be had are refused, by index."""
        wanted = {r.series_id for r in rows}
        ids = {s: self._series_ids[s] for s in wanted if s in self._series_ids}
        missing = sorted(wanted - ids.keys())
        if missing:
            ids.update(_lookup(conn, missing))
        reasons: dict[str, tuple[str, str]] = {}
        for series_id in (s for s in missing if s not in ids):
            if self._fixed:
                reasons[series_id] = (
                    UNKNOWN_SERIES,
                    f"series {series_id} is not in the database's catalogue (sink.catalog: fixed)",
                )
                continue
            spec = next(r for r in rows if r.series_id == series_id)
            found, reason = self._create_series(conn, spec)
            if found is not None:
                ids[series_id] = found
            else:
                reasons[series_id] = reason
        refused = {i: reasons[r.series_id] for i, r in enumerate(rows) if r.series_id in reasons}
        return ids, refused

    def _create_series(
        self, conn: psycopg.Connection[Any], row: _Row
    ) -> tuple[int | None, tuple[str, str]]:
        """Create a series and its BA in a savepoint: its id, or why the database refused."""
        try:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO balancing_authorities (code, name) VALUES (%s, %s) "
                    "ON CONFLICT (code) DO NOTHING",
                    (row.ba, row.ba),
                )
                conn.execute(
                    "INSERT INTO series (ba_id, type, subtype, units, eia_series_id) "
                    "SELECT id, %s, %s, %s, %s FROM balancing_authorities WHERE code = %s "
                    "ON CONFLICT DO NOTHING",
                    (row.type, row.subtype, row.units, row.series_id, row.ba),
                )
        except Exception as exc:
            if not _refusable(exc, creating=True):
                raise
            return None, self._reason(exc)
        found = _lookup(conn, [row.series_id]).get(row.series_id)
        if found is None:
            return None, (
                "SERIES_CONFLICT",
                f"series {row.series_id}: the database holds another series for "
                f"{row.ba}/{row.type}/{row.subtype}",
            )
        return found, ("", "")

    def _upsert(
        self,
        conn: psycopg.Connection[Any],
        rows: Sequence[_Row],
        ids: Mapping[str, int],
        refused: Mapping[int, object],
    ) -> dict[int, tuple[str, str]]:
        """Upsert the rows not refused yet; those the database refuses, by index."""
        schema = self._schema_of(conn)
        params = [
            (i, self._params(schema, ids[r.series_id], r))
            for i, r in enumerate(rows)
            if i not in refused
        ]
        found: dict[int, tuple[str, str]] = {}
        with conn.cursor() as cur:
            try:
                with conn.transaction():
                    self._bulk(cur, [p for _, p in params])
                return found
            except Exception as exc:
                if not _refusable(exc):
                    raise
            self._write(conn, cur, params, found)  # some row is refused: find which
        return found

    def _bulk(self, cur: psycopg.Cursor[Any], params: Sequence[tuple[Any, ...]]) -> None:
        """All rows at once: COPY into a temporary table, one upsert from it."""
        with cur.copy(self._copy_sql) as copy:
            for values in params:
                copy.write_row(values)
        cur.execute(self._bulk_sql)

    def _write(
        self,
        conn: psycopg.Connection[Any],
        cur: psycopg.Cursor[Any],
        params: Sequence[tuple[int, tuple[Any, ...]]],
        refused: dict[int, tuple[str, str]],
    ) -> None:
        """Write ``params`` in a savepoint; on a refusal, bisect down to the refused rows."""
        if not params:
            return
        try:
            with conn.transaction():
                cur.executemany(self._upsert_sql, [p for _, p in params])
        except Exception as exc:
            if not _refusable(exc):
                raise
            if len(params) == 1:
                refused[params[0][0]] = self._reason(exc)
                return
            half = len(params) // 2
            self._write(conn, cur, params[:half], refused)
            self._write(conn, cur, params[half:], refused)

    @staticmethod
    def _params(schema: _Schema, series_id: int, r: _Row) -> tuple[Any, ...]:
        values: tuple[Any, ...] = (series_id, r.ts, r.value, r.quality_flag)
        if schema.revision:
            values += (r.revision,)
        return values

    # -- connection, schema, errors -------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        driver = load_driver()
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = driver.connect(
                self._url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name="gridpulse-outbox",
                options=f"-c statement_timeout={self._statement_ms}",
            )
        except Exception as exc:
            if conn is not None:
                conn.close()
            raise self._error(exc, "connecting") from None
        assert conn is not None
        self._conn, self._staging_on = conn, None
        return conn

    def _staging(self, conn: psycopg.Connection[Any], schema: _Schema) -> None:
        """The temporary table a batch's rows are copied into (emptied at every commit),
        made once a connection of the target's own column types (an enum or a domain
        ``quality_flag`` too), so the one upsert from it type-checks."""
        if self._staging_on is conn:
            return
        try:
            conn.execute(
                f"CREATE TEMPORARY TABLE {_STAGING} ON COMMIT DELETE ROWS AS "
                f"SELECT {', '.join(_columns(schema))} FROM observations WITH NO DATA"
            )
        except Exception as exc:
            raise self._error(exc, "preparing the batch table") from None
        self._staging_on = conn

    def _schema_of(self, conn: psycopg.Connection[Any]) -> _Schema:
        if self._schema is not None:
            return self._schema
        try:
            found = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = 'observations'"
                ).fetchall()
            )
        except Exception as exc:
            raise self._error(exc, "reading the schema") from None
        needed = ("series_id", "ts", "value", "quality_flag")
        lacking = [name for name in needed if name not in found]
        if lacking:
            what = "no observations table" if not found else f"observations lacks {lacking}"
            raise SinkError(
                f"PostgreSQL at {self.where}: {what}: the sink writes into GridPulse's schema "
                "(gridpulse-ingest-v1), which must exist"
            )
        schema = _Schema(
            revision="revision" in found,
            received_at="received_at" in found,
            ts_is_timestamp=str(found["ts"]).startswith("timestamp"),
            received_at_is_timestamp=str(found.get("received_at", "")).startswith("timestamp"),
        )
        self._schema, self._upsert_sql = schema, _upsert_sql(schema)
        columns = _columns(schema)
        self._copy_sql = f"COPY {_STAGING} ({', '.join(columns)}) FROM STDIN"
        self._bulk_sql = _upsert_sql(schema, source=_STAGING)
        return schema

    def _drop(self) -> None:
        conn, self._conn, self._staging_on = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a dead connection may fail; it is gone
                log.debug("closing the postgres connection: %s", self._clean(str(exc)))

    def _error(self, exc: Exception, doing: str) -> SinkError:
        """``exc`` as the SinkError the send stage acts on (the connection is dropped
        when it may be unusable)."""
        if isinstance(exc, SinkError):
            return exc
        state = _sqlstate(exc)
        text = f"PostgreSQL at {self.where}: {doing} failed: {self._clean(_first_line(exc))}"
        psycopg = load_driver()
        if state.startswith(_AUTH_STATES) or (not state and _REFUSED_AT_CONNECT.search(str(exc))):
            self._drop()
            return SinkAuthError(text)
        if state.startswith(_ROW_CLASSES):
            # Refused at commit (a deferred constraint): the stage bisects by batch.
            return BatchRejectedError(text, code=_code_of(exc))
        if (
            isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
            or state.startswith(_TRANSIENT_CLASSES)
            or self._conn is None
            or self._conn.closed
        ):
            self._drop()
            return SinkTransientError(text)
        self._drop()
        return SinkError(text)

    def _reason(self, exc: Exception) -> tuple[str, str]:
        """``(code, message)`` of a refusal: the SQLSTATE's name and the database's words."""
        return _code_of(exc), self._clean(_first_line(exc))[:_MAX_MESSAGE]

    def _clean(self, text: str) -> str:
        return redact(text, self._secrets)


def _columns(schema: _Schema) -> list[str]:
    """The observations columns a row sets (in the order of the sink's parameters)."""
    return ["series_id", "ts", "value", "quality_flag"] + (["revision"] if schema.revision else [])


def _upsert_sql(schema: _Schema, source: str | None = None) -> str:
    """The upsert, of one row of parameters, or of every row of the table ``source``."""
    columns = _columns(schema)
    values = ["%s", "%s::timestamptz" if schema.ts_is_timestamp else "%s", "%s", "%s"]
    if source is not None:
        values = [c if c != "ts" else values[1].replace("%s", "ts") for c in columns]
    elif schema.revision:
        values.append("%s")
    updated = columns[2:]
    if schema.received_at:
        columns.append("received_at")
        values.append(
            "now()"
            if schema.received_at_is_timestamp
            else "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        )
    sets = [*updated, *(["received_at"] if schema.received_at else [])]
    rows = f"VALUES ({', '.join(values)})"
    if source is not None:
        rows = f"SELECT {', '.join(values)} FROM {source}"
    return (
        f"INSERT INTO observations ({', '.join(columns)}) {rows} "
        f"ON CONFLICT (series_id, ts) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in sets)
        + f" WHERE ({', '.join('observations.' + c for c in updated)}) IS DISTINCT FROM "
        f"({', '.join('EXCLUDED.' + c for c in updated)})"
    )


def _lookup(conn: psycopg.Connection[Any], series_ids: Sequence[str]) -> dict[str, int]:
    found = conn.execute(
        "SELECT eia_series_id, id FROM series WHERE eia_series_id = ANY(%s)", (list(series_ids),)
    ).fetchall()
    return {eia_id: row_id for eia_id, row_id in found}


def _refusable(exc: Exception, *, creating: bool = False) -> bool:
    """Whether the database refused these rows (not the connection or the whole batch)."""
    state = _sqlstate(exc)
    if state.startswith(_ROW_CLASSES):
        return True
    # Under an open catalogue a role that may not create series refuses those rows alone.
    return creating and state == "42501"


def _sqlstate(exc: Exception) -> str:
    return str(getattr(exc, "sqlstate", None) or "")


def _code_of(exc: Exception) -> str:
    """``CheckViolation`` -> ``CHECK_VIOLATION``; ``PG_<sqlstate>`` for an unnamed one."""
    name = type(exc).__name__
    if name in ("Error", "DatabaseError", "DataError", "IntegrityError", "ProgrammingError"):
        return f"PG_{_sqlstate(exc) or 'ERROR'}"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _ts_text(value: object) -> str:
    return to_ts(value) if isinstance(value, datetime) else str(value)
