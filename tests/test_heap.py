"""What outbox.heap promises: the objects that exist when the block starts are left out of
collections inside it, and are the collector's again after it (nothing leaked)."""

from __future__ import annotations

import gc
import weakref

import pytest

from outbox.heap import frozen_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def _garbage_cycle() -> weakref.ref[_Node]:
    """A cycle nothing refers to, alive until a full collection reaches it."""
    return weakref.ref(_Node())


def test_a_cycle_made_before_the_block_waits_for_the_end_of_it() -> None:
    gc.collect()
    before = _garbage_cycle()
    with frozen_heap():
        gc.collect()
        assert before() is not None  # frozen: the collection inside did not walk it
        inside = _garbage_cycle()
        gc.collect()
        assert inside() is None  # what the block itself makes is still collected
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None  # given back: collected after the block


def test_the_heap_is_given_back_when_the_block_fails() -> None:
    before = _garbage_cycle()
    with pytest.raises(RuntimeError), frozen_heap():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("the send failed")
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None
