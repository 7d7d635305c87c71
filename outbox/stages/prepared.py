"""A page made ready to stage ahead of its transaction, and what crosses from a read-ahead.

A replay reads and normalizes the next pages while the current one is staged
(:mod:`outbox.readahead`); in a forked read-ahead process the prepared page comes back
pickled, so :func:`detach` drops what only its preparation needed (the parsed rows, the
per-row lists, the raw body once compressed) and leaves :class:`~outbox.readahead.Elided`
counts in their place. This is the only module that knows about that hand-over: the
values it carries (:class:`~outbox.ports.Page`, :class:`~outbox.normalize.Normalized`)
stay plain. (The store's ``PageRecord.detached``/``precompress`` and
``RowBatch.detached``/``EncodedRows`` belong here too; they live with the store's values
until the store package has its own value module.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from outbox.normalize import Normalized
from outbox.ports import Page
from outbox.readahead import Elided
from outbox.store import PageRecord, RowBatch

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
    return (record.precompress() if precompress else record), RowBatch.of(rows)


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
        prepared.record.detached(),
        prepared.rows.detached(),
    )
