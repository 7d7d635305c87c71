"""What a stage hands the store: raw pages, rows made ready ahead of the transaction,
watermark and progress advances.

:meth:`RowBatch.of` does the per-row Python work of a stage outside its transaction (the
JSON array SQLite reads the rows from, and the checks that let SQLite skip the CHECK
constraints), so that it can run on another thread while the previous page is staged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import CheckConstraint

from outbox.store.schema import QUALITY_FLAGS, observations

# datetimes, dataclasses and the like must not reach SQLite as orjson spells them.
_JSON_STRICT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
PAGE_LEVEL = 1  # zlib level of stored pages (see docs/performance.md)

ROW_COLUMNS = ("series_id", "ts", "value", "units", "quality_flag", "revision", "page_row")
SERIES_COLUMNS = ("series_id", "ba", "type", "subtype", "units", "route", "facets")
# Each row of RowBatch.json, in this order. The columns after the revision are left out
# when the batch binds them once instead: all of them when every row has the same units
# and quality flag and page_row is the row's position (a page's usual case), all but the
# quality flag when only that varies (a page with missing values). SQLite parses every
# row's array once per row (json_each renders it, json_extract parses it again), so a
# 4-element array instead of 7 makes the stage's upsert ~6% cheaper a row.
JSON_COLUMNS = ("series_id", "ts", "value", "revision", "quality_flag", "units", "page_row")
_JSON_WIDTHS = {
    width: itemgetter(*(ROW_COLUMNS.index(c) for c in JSON_COLUMNS[:width])) for width in (4, 5, 7)
}

# The CHECK constraints of observations that _pass_checks mirrors in Python. When the rows
# of a page pass them there, SQLite is told to skip them (PRAGMA ignore_check_constraints)
# for the page's upsert: evaluating them costs SQLite about a fifth of a staged row. A
# CHECK added to the table but not mirrored here turns that off.
_MIRRORED_CHECKS = frozenset(
    {
        "quality_flag IN ('good', 'estimated', 'missing')",
        "value IS NOT NULL OR quality_flag = 'missing'",
    }
)
_CHECKS_MIRRORED = {
    str(c.sqltext) for c in observations.constraints if isinstance(c, CheckConstraint)
} == set(_MIRRORED_CHECKS)
_QUALITY_FLAG_SET = frozenset(QUALITY_FLAGS)


@dataclass(frozen=True)
class PageRecord:
    """One raw source response, secrets already removed from ``body``/``params``/``url``."""

    route: str
    params: Mapping[str, Any]
    url: str
    page_no: int
    offset: int
    total: int
    row_count: int
    body: bytes
    compressed: bytes | None = field(default=None, repr=False, compare=False)
    """``body`` as stored (zlib at :data:`PAGE_LEVEL`) when the caller compressed it ahead
    of the stage; the stage stores it as given and compresses ``body`` only without it."""


@dataclass(frozen=True)
class RowBatch:
    """Observation rows made ready for :meth:`Staging.stage` ahead of its transaction.

    :meth:`of` does the per-row Python work of a stage (the JSON array SQLite reads the
    rows from, the checks that let SQLite skip the CHECK constraints), so that a caller
    can do it on another thread while the previous page is being staged. Staging a
    RowBatch has exactly the outcome of staging its ``rows``.
    """

    rows: Sequence[Sequence[Any]]
    """The row tuples (any sequence of them: a read-ahead may hand over a lazy one)."""
    json: bytes | None
    """The rows as one JSON array of :data:`JSON_COLUMNS` arrays, cut short when the
    batch binds the columns left out (see there); None when a row does not travel as
    JSON exactly."""
    units: str | None
    """The units of every row when they all have the same, else None."""
    quality_flag: str | None
    """The quality flag of every row when they all have the same, else None."""
    row_is_position: bool
    """Whether every row's ``page_row`` is its position in ``rows``."""
    checked: bool
    """Whether every row passes the CHECK constraints of ``observations`` (checked here)."""
    first: tuple[Any, Any, Any] | None = None
    """The first row's key and revision (series_id, ts, revision); None without rows.
    A stage asks whether that one row is new or revised before it probes every row."""

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]]) -> RowBatch:
        """Encode ``rows`` (tuples in :data:`ROW_COLUMNS` order)."""
        rows = rows if isinstance(rows, list) else list(rows)
        units, quality_flag = _same(rows, 3), _same(rows, 4)
        row_is_position = list(map(itemgetter(6), rows)) == list(range(len(rows)))
        bound = row_is_position and units is not None
        width = 7 if not bound else 5 if quality_flag is None else 4
        encoded = json_rows(list(map(_JSON_WIDTHS[width], rows)), value_at=2)
        return cls(
            rows=rows,
            json=encoded,
            units=units,
            quality_flag=quality_flag,
            row_is_position=row_is_position,
            checked=encoded is not None and _pass_checks(rows),
            first=(rows[0][0], rows[0][1], rows[0][5]) if rows else None,
        )


@dataclass(frozen=True)
class WatermarkUpdate:
    """Advance ``stream`` (``dataset:respondent``) to ``last_ts`` if that is newer."""

    stream: str
    dataset: str
    respondent: str
    route: str
    last_ts: str


@dataclass(frozen=True)
class ProgressUpdate:
    """Record that EIA answered ``stream`` completely through ``asked_through``, if newer."""

    stream: str
    dataset: str
    respondent: str
    asked_through: str


def json_rows(rows: Sequence[Sequence[Any]], value_at: int | None = None) -> bytes | None:
    """``rows`` as one JSON array for the ``json_each`` statements, or None when a row
    holds something JSON would not carry exactly as the DB-API binds it (the caller then
    falls back to executemany): a non-finite float at ``value_at`` (JSON has no inf/NaN),
    or a type orjson refuses.
    """
    if value_at is not None:
        try:
            if not math.isfinite(sum(v for r in rows if (v := r[value_at]) is not None)):
                return None
        except (TypeError, OverflowError):
            return None
    try:
        return orjson.dumps(rows, option=_JSON_STRICT)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None


def decode_rows(
    encoded: bytes, units: str | None, quality_flag: str | None
) -> list[tuple[Any, ...]]:
    """The rows of a :attr:`RowBatch.json` (with the batch's ``units`` and
    ``quality_flag``) as tuples in :data:`ROW_COLUMNS` order again."""
    rows = []
    for i, r in enumerate(orjson.loads(encoded)):
        n = len(r)
        rows.append(
            (
                r[0],
                r[1],
                r[2],
                r[5] if n > 5 else units,
                r[4] if n > 4 else quality_flag,
                r[3],
                r[6] if n > 6 else i,
            )
        )
    return rows


def _same(rows: Sequence[Sequence[Any]], at: int) -> Any:
    """The value every row holds at ``at`` if they all hold the same string, else None."""
    values = set(map(itemgetter(at), rows))
    if len(values) == 1:
        value = values.pop()
        return value if type(value) is str else None
    return None


def _pass_checks(rows: Sequence[Sequence[Any]]) -> bool:
    """Whether every row passes the CHECK constraints of ``observations`` (checked here).

    Rows that fail are left to SQLite, which raises its IntegrityError as it always did.
    (The queue entries the upsert's triggers write are always 'pending', which passes
    ``queue``'s own CHECK.)
    """
    if not _CHECKS_MIRRORED or not set(map(itemgetter(4), rows)) <= _QUALITY_FLAG_SET:
        return False
    return all(r[4] == "missing" for r in rows if r[2] is None)
