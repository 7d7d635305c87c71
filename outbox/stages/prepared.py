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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import orjson

from outbox.normalize import Normalized
from outbox.ports import Page
from outbox.readahead import Elided
from outbox.store import PageRecord, RowBatch
from outbox.store.rows import PAGE_LEVEL

# Pages a replay reads and normalizes ahead of the one being staged (bounds memory).
READ_AHEAD = 2


class Prepared(NamedTuple):
    """A page read ahead: its rows normalized, its record and rows ready to stage."""

    page: Page
    norm: Normalized
    record: PageRecord
    rows: RowBatch


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


def detach(prepared: Prepared) -> Prepared:
    """What staging the page needs, without what only its preparation did: the parsed
    rows, the per-row lists, the raw body once compressed. Only counts of them remain,
    so that the page crosses from a read-ahead process small."""
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
    )


def _record_detached(record: PageRecord) -> PageRecord:
    """The record without ``body`` once it is compressed (all a stage stores)."""
    return record if record.compressed is None else replace(record, body=b"")


def detach_rows(batch: RowBatch) -> RowBatch:
    """The batch without its row tuples when ``json`` carries them, so that it crosses a
    process boundary small; reading its ``rows`` then decodes ``json``."""
    if batch.json is None or isinstance(batch.rows, EncodedRows):
        return batch
    return replace(batch, rows=EncodedRows(batch.json, len(batch.rows)))


class EncodedRows(Sequence[Sequence[Any]]):
    """The rows of a :class:`~outbox.store.RowBatch` kept only as its JSON, decoded on
    first read (a stage reads them only near ``housekeeping.max_rows``)."""

    __slots__ = ("_decoded", "json", "n")

    def __init__(self, encoded: bytes, n: int) -> None:
        self.json = encoded
        self.n = n
        self._decoded: list[Any] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if self._decoded is None:
            self._decoded = orjson.loads(self.json)
        return self._decoded[index]

    def __reduce__(self) -> tuple[type[EncodedRows], tuple[bytes, int]]:
        return (EncodedRows, (self.json, self.n))
