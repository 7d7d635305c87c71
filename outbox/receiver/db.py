"""Storage of the reference GridPulse receiver: tables that mirror GridPulse, and all its SQL.

The receiver is a test peer, not our outbox: its schema is created with
``metadata.create_all`` (no Alembic). SQLite is the default (WAL, ``synchronous=NORMAL``,
``busy_timeout``); PostgreSQL (``postgresql://``, psycopg 3, the ``postgres`` extra) is
the database GridPulse runs (see :mod:`outbox.receiver.pg`). On SQLite a request's upsert
is one ``executemany`` of ``INSERT ... ON CONFLICT DO UPDATE``; on PostgreSQL it is one
statement over arrays.

On PostgreSQL the types are GridPulse's: ``ts timestamptz``, ``value numeric(12,3)``
(a hypertable when timescaledb is available). On SQLite ``ts`` is canonical RFC 3339 text
(``2025-08-22T14:00:00Z``, fixed width, so it sorts chronologically) and ``value`` REAL.
Either way the code above this module sees ``ts`` as that text. ``received_at`` and
``batches`` are receiver-only accounting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    TIMESTAMP,
    Column,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    event,
    func,
    make_url,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator, TypeEngine

from outbox.receiver.pg import (
    UPSERT_SQL,
    ReceiverDatabaseError,
    connect_error,
    is_postgres,
    masked,
    parse_rfc3339,
    postgres_url,
    rfc3339,
    setup_timescale,
    upsert_params,
)

SERIES_TYPES = frozenset(
    {"demand", "demand_forecast", "net_generation", "interchange", "generation"}
)
BUSY_TIMEOUT_MS = 10_000


class Timestamp(TypeDecorator[str]):
    """An hour as RFC 3339 text in Python: ``timestamptz`` on PostgreSQL, text on SQLite."""

    impl = String(20)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(TIMESTAMP(timezone=True))
        return dialect.type_descriptor(String(20))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "postgresql" and isinstance(value, str):
            return parse_rfc3339(value)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "postgresql" and value is not None:
            return rfc3339(value)
        return value


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

balancing_authorities = Table(
    "balancing_authorities",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("code", String(16), nullable=False, unique=True),
    Column("name", String(200)),
    Column("timezone", String(64)),
    Column("region", String(64)),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ba_id", Integer, ForeignKey("balancing_authorities.id"), nullable=False),
    Column("type", String(32), nullable=False),
    Column("subtype", String(64)),
    Column("units", String(16), nullable=False),
    Column("eia_series_id", String(128), nullable=False, unique=True),
    UniqueConstraint("ba_id", "type", "subtype", name="uq_series_ba_type_subtype"),
)

observations = Table(
    "observations",
    metadata,
    Column("series_id", Integer, ForeignKey("series.id"), primary_key=True),
    Column("ts", Timestamp(), primary_key=True),
    # numeric(12,3) as in GridPulse; REAL on SQLite so that values read back as floats.
    Column("value", Numeric(12, 3, asdecimal=False).with_variant(Float(), "sqlite")),
    Column("quality_flag", String(16), nullable=False),
    Column("revision", String(128), nullable=False),
    Column("received_at", String(32), nullable=False),
    # Clustered on the primary key, like a hypertable chunk: one B-tree write per row.
    sqlite_with_rowid=False,
)

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("body_digest", String(64), nullable=False),
    Column("first_seen", String(32), nullable=False),
    Column("times_seen", Integer, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("accepted", Integer, nullable=False),
    Column("rejected", Integer, nullable=False),
)


ObservationRow = tuple[str, str, float | None, str, str]
"""``(series_id, ts, value, quality_flag, revision)`` as the receiver stores it."""


_OBSERVATION_COLUMNS = ("series_id", "ts", "value", "quality_flag", "revision", "received_at")


@dataclass(frozen=True)
class SeriesSpec:
    """What the receiver needs to create a series it has not seen."""

    series_id: str
    ba: str
    type: str
    subtype: str | None
    units: str


@dataclass(frozen=True)
class BatchOutcome:
    """What one ingest stored: ``conflict`` means the batch id was seen with another body."""

    conflict: bool
    times_seen: int


def to_url(db: str | Path) -> str:
    """A SQLAlchemy URL for ``db``: a URL is kept, anything else is a SQLite file path.

    A PostgreSQL URL is put on the psycopg 3 driver (``postgresql://`` would otherwise
    mean psycopg2); :class:`~outbox.receiver.pg.ReceiverDatabaseError` if that driver is
    missing.
    """
    text = str(db)
    if is_postgres(text):
        return postgres_url(text).render_as_string(hide_password=False)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def make_engine(db_url: str, *, announce: bool = True) -> Engine:
    """An engine for the receiver's database, with its tables created if missing.

    On PostgreSQL ``observations`` becomes a hypertable when timescaledb is available
    (``announce`` logs which, once per receiver). A database that cannot be reached or
    used raises :class:`~outbox.receiver.pg.ReceiverDatabaseError` (password masked).
    """
    if is_postgres(db_url):
        return _postgres_engine(db_url, announce=announce)
    try:
        url = make_url(db_url)
        backend = url.get_backend_name()
    except (ArgumentError, ValueError):
        raise ReceiverDatabaseError(f"not a database URL: {masked(db_url)}") from None
    if backend != "sqlite":  # checked before SQLAlchemy imports the dialect or its driver
        raise ReceiverDatabaseError(
            f"{masked(url)}: the receiver supports sqlite and postgresql, not {backend}"
        )
    try:
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        metadata.create_all(engine)
    except (SQLAlchemyError, ImportError) as exc:  # a file it cannot open, a driver missing
        raise connect_error(url, exc) from None
    return engine


def _postgres_engine(db_url: str, *, announce: bool) -> Engine:
    url = postgres_url(db_url)
    engine = create_engine(url, pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            # Two receivers starting on one empty database must not race on CREATE TABLE.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(8700)")
            metadata.create_all(conn)
            setup_timescale(conn, announce=announce)
    except DBAPIError as exc:
        engine.dispose()
        raise connect_error(url, exc) from None
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A batch touches a leaf of every series it holds: with SQLite's default 2 MB cache
    # those leaves are read back from the OS on every batch (~30% of ingest time at 1M
    # rows). A larger WAL between checkpoints rewrites hot leaves less often.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.close()


def parse_series_id(series_id: str, units: str = "MW") -> SeriesSpec:
    """``EIA.{BA}.{type}[.{subtype}]`` as a :class:`SeriesSpec`; ``ValueError`` if malformed."""
    parts = series_id.split(".", 3)
    if len(parts) < 3 or parts[0] != "EIA" or not parts[1] or parts[2] not in SERIES_TYPES:
        raise ValueError(f"not a GridPulse series id: {series_id!r}")
    subtype = parts[3] if len(parts) == 4 else None
    if subtype == "":
        raise ValueError(f"empty subtype in series id {series_id!r}")
    return SeriesSpec(series_id, parts[1], parts[2], subtype, units)


def seed_catalog(db_url: str, series_ids: Iterable[str]) -> int:
    """Create the named series (units MW) for ``--catalog fixed``; returns how many are new."""
    specs = [parse_series_id(series_id) for series_id in series_ids]
    engine = make_engine(db_url, announce=False)
    try:
        with engine.begin() as conn:
            known = _lookup_series(conn, [spec.series_id for spec in specs])
            fresh = {spec.series_id: spec for spec in specs if spec.series_id not in known}
            _create_series(conn, fresh.values())
        return len(fresh)
    finally:
        engine.dispose()


def _insert(dialect: Dialect, table: Table) -> Any:
    module = postgresql if dialect.name == "postgresql" else sqlite
    return module.insert(table)


def _lookup_series(conn: Connection, series_ids: Sequence[str]) -> dict[str, int]:
    if not series_ids:
        return {}
    query = select(series.c.eia_series_id, series.c.id).where(
        series.c.eia_series_id.in_(series_ids)
    )
    return {eia_id: row_id for eia_id, row_id in conn.execute(query)}


def _create_series(conn: Connection, specs: Iterable[SeriesSpec]) -> None:
    specs = list(specs)
    if not specs:
        return
    codes = sorted({spec.ba for spec in specs})
    conn.execute(
        _insert(conn.dialect, balancing_authorities).on_conflict_do_nothing(
            index_elements=["code"]
        ),
        [{"code": code, "name": code} for code in codes],
    )
    ba_ids = dict(
        conn.execute(
            select(balancing_authorities.c.code, balancing_authorities.c.id).where(
                balancing_authorities.c.code.in_(codes)
            )
        ).all()
    )
    conn.execute(
        _insert(conn.dialect, series).on_conflict_do_nothing(index_elements=["eia_series_id"]),
        [
            {
                "ba_id": ba_ids[spec.ba],
                "type": spec.type,
                "subtype": spec.subtype,
                "units": spec.units,
                "eia_series_id": spec.series_id,
            }
            for spec in specs
        ],
    )


class ReceiverDB:
    """The receiver's storage: a thread-safe facade over one engine.

    Writes are serialised by a lock (the receiver runs one process), reads run
    concurrently. Known series ids are cached; the cache only ever grows.
    """

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        self._write_lock = threading.Lock()
        self._series_cache: dict[str, int] = {}
        self._upsert_sql: tuple[str, bool] | None = None

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def known_series(self, series_ids: Iterable[str]) -> dict[str, int]:
        """The row ids of those of ``series_ids`` the database holds."""
        wanted = set(series_ids)
        missing = [series_id for series_id in wanted if series_id not in self._series_cache]
        if missing:
            with self.engine.connect() as conn:
                self._series_cache.update(_lookup_series(conn, missing))
        return {sid: self._series_cache[sid] for sid in wanted if sid in self._series_cache}

    def ingest(
        self,
        batch_id: str,
        body_digest: str,
        rows: Sequence[ObservationRow],
        new_series: Mapping[str, SeriesSpec],
        counts: tuple[int, int, int],
        received_at: str,
    ) -> BatchOutcome:
        """Record a batch and upsert its accepted rows in one transaction.

        ``rows`` are ``(series_id, ts, value, quality_flag, revision)`` with GridPulse
        series ids; ``new_series`` are created first. ``counts`` is ``(rows, accepted,
        rejected)``. Nothing is written when the batch id is known with a different
        ``body_digest``.
        """
        with self._write_lock, self.engine.begin() as conn:
            seen = conn.execute(
                select(batches.c.body_digest, batches.c.times_seen).where(
                    batches.c.batch_id == batch_id
                )
            ).first()
            if seen is not None and seen.body_digest != body_digest:
                return BatchOutcome(conflict=True, times_seen=seen.times_seen)
            ids = self._series_ids(conn, new_series, {row[0] for row in rows})
            if rows:
                self._upsert(conn, rows, ids, received_at)
            times_seen = self._record_batch(conn, batch_id, body_digest, seen, counts, received_at)
        # Cached only after the commit: a rolled-back create must not look known.
        self._series_cache.update(ids)
        return BatchOutcome(conflict=False, times_seen=times_seen)

    def _series_ids(
        self, conn: Connection, new_series: Mapping[str, SeriesSpec], wanted: set[str]
    ) -> dict[str, int]:
        if new_series:
            _create_series(conn, new_series.values())
        missing = [series_id for series_id in wanted if series_id not in self._series_cache]
        ids = {sid: self._series_cache[sid] for sid in wanted if sid in self._series_cache}
        ids.update(_lookup_series(conn, missing))
        return ids

    def _upsert(
        self,
        conn: Connection,
        rows: Sequence[ObservationRow],
        ids: Mapping[str, int],
        received_at: str,
    ) -> None:
        if conn.dialect.name == "postgresql":  # one statement over arrays
            conn.exec_driver_sql(UPSERT_SQL, upsert_params(rows, ids, received_at))
            return
        # Compiled once and run through the driver's executemany: SQLAlchemy's per-row
        # parameter processing would otherwise cost as much as SQLite's own work.
        if self._upsert_sql is None:
            self._upsert_sql = compile_upsert(conn.dialect)
        sql, positional = self._upsert_sql
        if positional:
            params: list[Any] = [
                (ids[sid], ts, value, flag, revision, received_at)
                for sid, ts, value, flag, revision in rows
            ]
        else:
            params = [
                dict(
                    zip(
                        _OBSERVATION_COLUMNS,
                        (ids[sid], ts, value, flag, revision, received_at),
                        strict=True,
                    )
                )
                for sid, ts, value, flag, revision in rows
            ]
        conn.exec_driver_sql(sql, params)

    def _record_batch(
        self,
        conn: Connection,
        batch_id: str,
        body_digest: str,
        seen: Any,
        counts: tuple[int, int, int],
        received_at: str,
    ) -> int:
        rows, accepted, rejected = counts
        values = {"rows": rows, "accepted": accepted, "rejected": rejected}
        if seen is None:
            conn.execute(
                batches.insert().values(
                    batch_id=batch_id,
                    body_digest=body_digest,
                    first_seen=received_at,
                    times_seen=1,
                    **values,
                )
            )
            return 1
        conn.execute(
            batches.update()
            .where(batches.c.batch_id == batch_id)
            .values(times_seen=batches.c.times_seen + 1, **values)
        )
        times_seen: int = seen.times_seen + 1
        return times_seen

    def latest(self, series_id: str) -> tuple[str | None, str | None] | None:
        """``(latest_ts, revision)`` of a series, ``(None, None)`` if empty, ``None`` if unknown."""
        row_id = self.known_series([series_id]).get(series_id)
        if row_id is None:
            return None
        query = (
            select(observations.c.ts, observations.c.revision)
            .where(observations.c.series_id == row_id)
            .order_by(observations.c.ts.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (None, None) if row is None else (row.ts, row.revision)

    def list_series(self) -> list[dict[str, Any]]:
        """Every series with its BA, type, subtype, units, row count and latest ts."""
        stats = (
            select(
                observations.c.series_id,
                func.count().label("count"),
                func.max(observations.c.ts).label("latest_ts"),
            )
            .group_by(observations.c.series_id)
            .subquery()
        )
        query = (
            select(
                series.c.eia_series_id,
                balancing_authorities.c.code,
                series.c.type,
                series.c.subtype,
                series.c.units,
                func.coalesce(stats.c.count, 0),
                stats.c.latest_ts,
            )
            .join(balancing_authorities, series.c.ba_id == balancing_authorities.c.id)
            .outerjoin(stats, stats.c.series_id == series.c.id)
            .order_by(series.c.eia_series_id)
        )
        keys = ("series_id", "ba", "type", "subtype", "units", "count", "latest_ts")
        with self.engine.connect() as conn:
            return [dict(zip(keys, row, strict=True)) for row in conn.execute(query)]

    def observations(
        self, series_id: str, start: str, end: str, limit: int
    ) -> tuple[list[dict[str, Any]], str | None] | None:
        """One page of ``[start, end)`` ordered by ts and the next start, or ``None`` if unknown."""
        row_id = self.known_series([series_id]).get(series_id)
        if row_id is None:
            return None
        query = (
            select(
                observations.c.ts,
                observations.c.value,
                observations.c.quality_flag,
                observations.c.revision,
            )
            .where(
                observations.c.series_id == row_id,
                observations.c.ts >= start,
                observations.c.ts < end,
            )
            .order_by(observations.c.ts)
            .limit(limit + 1)
        )
        keys = ("ts", "value", "quality_flag", "revision")
        with self.engine.connect() as conn:
            rows = [dict(zip(keys, row, strict=True)) for row in conn.execute(query)]
        following = rows[limit]["ts"] if len(rows) > limit else None
        return rows[:limit], following


def compile_upsert(dialect: Dialect) -> tuple[str, bool]:
    """The observations upsert as driver SQL, and whether its parameters are positional.

    Positional parameters come in the order of the table's columns.
    """
    stmt = _insert(dialect, observations)
    stmt = stmt.on_conflict_do_update(
        index_elements=["series_id", "ts"],
        set_={name: stmt.excluded[name] for name in _OBSERVATION_COLUMNS[2:]},
        # A resent revision leaves its row alone (as the PostgreSQL statement does).
        where=observations.c.revision.is_distinct_from(stmt.excluded.revision),
    )
    compiled = stmt.compile(dialect=dialect)
    if compiled.positional:
        if tuple(compiled.positiontup or ()) != _OBSERVATION_COLUMNS:
            raise RuntimeError(f"unexpected upsert parameter order: {compiled.positiontup}")
        return str(compiled), True
    return str(compiled), False
