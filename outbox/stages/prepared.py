"""A page made ready to stage ahead of its transaction, and what crosses from a read-ahead.

A replay reads and normalizes the next pages while the current one is staged
(:mod:`outbox.readahead`); in a forked read-ahead process the prepared page comes back
pickled, so :func:`detach` drops what only its preparation needed (the parsed rows, the
per-row lists, the raw body once compressed) and leaves :class:`~outbox.readahead.Elided`
counts in their place. This is the only module that knows about that hand-over: the
values it carries (:class:`~outbox.ports.Page`, :class:`~outbox.normalize.Normalized`)
stay plain, and so do the store's (:class:`~outbox.store.PageRecord`,
:class:`~outbox.store.RowBatch`): the compressed body and the rows kept only as their JSON
(:class:`EncodedRows`) are made here.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from hashlib import blake2b
from typing import Any, NamedTuple

import orjson

from outbox.normalize import Normalized
from outbox.ports import Page
from outbox.readahead import Elided
from outbox.store import PageRecord, RowBatch
from outbox.store.rows import PAGE_LEVEL, decode_rows
from outbox.timeutil import to_ts

# Pages a replay reads and normalizes ahead of the one being staged (bounds memory).
READ_AHEAD = 2
# Part of every page digest: bump it when normalizing the same page may yield other rows.
DIGEST_VERSION = 1


class Prepared(NamedTuple):
    """A page read ahead: its rows normalized, its record and rows ready to stage."""

    page: Page
    norm: Normalized
    record: PageRecord
    rows: RowBatch
    digest: str | None = None
    """The page's :func:`page_digest`."""
    known: bool = False
    """Whether the page was staged whole before (``digest`` is known): ``norm`` and
    ``rows`` are then left empty, to be filled from the stored summary (:func:`recalled`)."""


def encode(
    page: Page, norm: Normalized, *, precompress: bool = False
) -> tuple[PageRecord, RowBatch]:
    """The page record and the encoded rows of one page (no database access)."""
    record = PageRecord(
        route=page.route,
        params=page.params,
        url=page.url,
        page_no=page.page_no,
        offset=page.offset,
        total=page.total,
        row_count=len(page.rows),
        body=page.body,
    )
    rows = zip(
        norm.series_id,
        norm.ts,
        norm.value,
        norm.units,
        norm.quality_flag,
        norm.revision,
        norm.row,
        strict=True,
    )
    if precompress:  # zlib releases the GIL: compress here, not in the stage's transaction
        record = replace(record, compressed=zlib.compress(record.body, PAGE_LEVEL))
    return record, RowBatch.of(rows)


def digest_context(
    ba_codes: Mapping[str, str], configured: Collection[str] | None, datasets: Collection[str]
) -> bytes:
    """What normalizing a replayed page depends on besides the page (and the clock)."""
    return orjson.dumps(
        [DIGEST_VERSION, sorted(ba_codes.items()), sorted(configured or ()), sorted(datasets)]
    )


def page_digest(page: Page, context: bytes) -> str:
    """A digest of what a page yields when normalized under ``context``."""
    h = blake2b(context, digest_size=16)
    h.update(b"\0" + page.route.encode() + b"\0")
    h.update(page.body)
    return h.hexdigest()


def known(page: Page, digest: str) -> Prepared:
    """A page staged whole before: only its body is kept (to normalize it after all, if
    a row was revised or pruned since: :func:`unknown`)."""
    empty = RowBatch.of(())
    record = PageRecord(
        page.route,
        page.params,
        page.url,
        page.page_no,
        page.offset,
        page.total,
        len(page.rows),
        b"",
    )
    rows = Elided(len(page.rows))
    return Prepared(replace(page, rows=rows), _EMPTY, record, empty, digest, True)


def unknown(page: Page) -> Page:
    """The page of :func:`known` with its rows again (parsed from its body)."""
    return replace(page, rows=orjson.loads(page.body)["response"]["data"])


def summary_of(norm: Normalized, latest: Mapping[str, datetime]) -> str | None:
    """What staging a page again needs of its normalized rows, as JSON; None for a page
    with rows past ``latest`` (a later run may accept them: it is not remembered)."""
    if norm.invalid.get("future_period"):
        return None
    return orjson.dumps(
        {
            "rows": norm.count,
            "stream_max": norm.stream_max,
            "stream_min": norm.stream_min,
            "page_max_ts": norm.page_max_ts,
            "invalid": norm.invalid,
            "duplicates": norm.duplicates,
            "unconfigured": norm.unconfigured,
            "latest": {k: to_ts(v) for k, v in latest.items()},
        }
    ).decode()


def recalled(summary: str, latest: Mapping[str, datetime]) -> Normalized | None:
    """The normalized page of a :func:`summary_of` (per-row lists elided), or None when
    ``latest`` is earlier than then for a dataset (a row accepted then may not be now)."""
    doc = orjson.loads(summary)
    if any(k in latest and to_ts(latest[k]) < ts for k, ts in doc["latest"].items()):
        return None
    if any(k not in doc["latest"] for k in latest):
        return None
    n = doc["rows"]
    return Normalized(
        series_id=Elided(n),
        ts=Elided(n),
        value=Elided(n),
        units=Elided(n),
        quality_flag=Elided(n),
        revision=Elided(n),
        row=Elided(n),
        series=[],  # staged with the page the first time; never deleted
        stream_max=doc["stream_max"],
        page_max_ts=doc["page_max_ts"],
        invalid=doc["invalid"],
        duplicates=doc["duplicates"],
        stream_min=doc["stream_min"],
        unconfigured=doc["unconfigured"],
    )


def detach(prepared: Prepared) -> Prepared:
    """What staging the page needs, without what only its preparation did: the parsed
    rows, the per-row lists, the raw body once compressed. Only counts of them remain,
    so that the page crosses from a read-ahead process small (a :func:`known` page is
    small already: its body stays)."""
    if prepared.known:
        return prepared
    page, norm = prepared.page, prepared.norm
    n = norm.count
    return Prepared(
        replace(page, rows=Elided(len(page.rows)), body=b""),
        replace(
            norm,
            series_id=Elided(n),
            ts=Elided(n),
            value=Elided(n),
            units=Elided(n),
            quality_flag=Elided(n),
            revision=Elided(n),
            row=Elided(n),
        ),
        _record_detached(prepared.record),
        detach_rows(prepared.rows),
        prepared.digest,
    )


def _record_detached(record: PageRecord) -> PageRecord:
    """The record without ``body`` once it is compressed (all a stage stores)."""
    return record if record.compressed is None else replace(record, body=b"")


def detach_rows(batch: RowBatch) -> RowBatch:
    """The batch without its row tuples when ``json`` carries them, so that it crosses a
    process boundary small; reading its ``rows`` then decodes ``json``."""
    if batch.json is None or isinstance(batch.rows, EncodedRows):
        return batch
    rows = EncodedRows(batch.json, len(batch.rows), batch.units, batch.quality_flag)
    return replace(batch, rows=rows)


class EncodedRows(Sequence[Sequence[Any]]):
    """The rows of a :class:`~outbox.store.RowBatch` kept only as its JSON (with the units
    and quality flag the batch binds once), decoded on first read (a stage reads them
    only near ``housekeeping.max_rows``)."""

    __slots__ = ("_decoded", "json", "n", "quality_flag", "units")

    def __init__(
        self, encoded: bytes, n: int, units: str | None = None, quality_flag: str | None = None
    ) -> None:
        self.json = encoded
        self.n = n
        self.units = units
        self.quality_flag = quality_flag
        self._decoded: list[Any] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if self._decoded is None:
            self._decoded = decode_rows(self.json, self.units, self.quality_flag)
        return self._decoded[index]

    def __reduce__(
        self,
    ) -> tuple[type[EncodedRows], tuple[bytes, int, str | None, str | None]]:
        return (EncodedRows, (self.json, self.n, self.units, self.quality_flag))


_EMPTY = Normalized([], [], [], [], [], [], [], [], {}, None)
