"""The cyclic garbage collector during a stage's hot loop.

A send builds tens of thousands of tuples a batch that live until the batch is settled:
they survive the young collections and reach the oldest generation, and every full
collection then walks every object the process holds, the modules of httpx, SQLAlchemy and
pydantic included (a few hundred thousand). Measured in a send of 300,000 rows: the
encoding's CPU went from ~3.4 to ~1.8 us a row with the heap frozen for the run
(docs/performance.md). :func:`frozen_heap` moves what exists at the start to the
collector's permanent generation for the block (``gc.freeze``), so full collections walk
only what the block created, and gives it back at the end (``gc.unfreeze``): nothing is
leaked, cycles made before the block are collected after it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the objects that exist now left out of garbage collections."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
