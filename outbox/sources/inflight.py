"""Pages of many requests fetched concurrently, handed over strictly in order.

:func:`iter_in_order` runs a page fetch (``fetch(request, page_no, offset)``) on a pool
of ``max_in_flight`` threads and yields ``(request index, page)`` in exactly the order a
one-after-another walk would: every page of request 0, then of request 1, and so on.

* Within a request, the first page ("head") says ``total``: the offsets of the other
  pages follow (``page_length`` rows each) and are fetched together.
* Across requests, the next request's head starts while earlier pages are in flight.
* A page that completes early waits in a bounded buffer (``look_ahead`` pages fetched
  or in flight beyond the one handed over) until its predecessors are handed over.
* A page is used only where the walk would have asked for it: when a handed-over page
  is not the last and the next fetched one does not start where it ended (a short page,
  or a total that grew), the rest of that request is dropped and asked again from there;
  after a request's last page its other pages are dropped. So the pages, their rows and
  everything derived from their order are those of the sequential walk.
* An error is raised when its page's turn comes, after every page before it was handed
  over; pages in flight then are abandoned (``stop`` is set, the threads' waits end).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from outbox.ports import Page, Request

Fetch = Callable[[Request, int, int], Page]


class Abandoned(Exception):
    """A page fetch ended early because the walk it belonged to has stopped."""


class DaemonPool:
    """A fixed pool of daemon threads running submitted calls as futures.

    Unlike ``ThreadPoolExecutor``'s workers, which the interpreter joins at exit, these do
    not keep a stopped process alive: a fetch interrupted by SIGTERM with requests in
    flight exits at once instead of waiting out each abandoned HTTP read (up to
    ``eia.timeout_seconds``). The calls only fetch; nothing they do needs to finish.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple] | None]
        self._queue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn(*args)``; its future may be cancelled until a worker takes it."""
        future: Future[Any] = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let each worker end after its current call; calls still queued are skipped
        when cancelled (the walk cancels them) and run otherwise."""
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the consumer with the future
                future.set_exception(exc)
            else:
                future.set_result(result)


@dataclass
class _Slot:
    """One page to hand over: which request, where, and its fetch once submitted."""

    index: int
    req: Request
    page_no: int
    offset: int
    head: bool
    future: Future[Page] | None = None
    expanded: bool = field(default=False)


class _Walk:
    """The state of one :func:`iter_in_order` walk (main thread only)."""

    def __init__(
        self,
        requests: Iterable[Request],
        fetch: Fetch,
        pool: DaemonPool,
        page_length: int,
        look_ahead: int,
    ) -> None:
        self._requests = enumerate(requests)
        self._fetch = fetch
        self._pool = pool
        self._page_length = page_length
        self._look_ahead = look_ahead
        self.slots: list[_Slot] = []  # in hand-over order

    def next_page(self) -> tuple[int, Page] | None:
        """The next page in order (waiting for it), or None when every request is done."""
        self._fill()
        if not self.slots:
            return None
        front = self.slots[0]
        assert front.future is not None
        while not front.future.done():
            heads = [s.future for s in self.slots if s.head and not s.expanded and s.future]
            wait([front.future, *heads], return_when=FIRST_COMPLETED)
            self._fill()
        self._expand()
        self.slots.pop(0)
        page = front.future.result()  # an error is raised in its turn
        self._after(front, page)
        return front.index, page

    def abandon(self) -> None:
        """Cancel every fetch not started; the running ones finish unheard."""
        for slot in self.slots:
            if slot.future is not None:
                slot.future.cancel()
        self.slots.clear()

    def _fill(self) -> None:
        """Expand finished heads, then submit pages in order up to the look-ahead."""
        self._expand()
        submitted = sum(1 for s in self.slots if s.future is not None)
        while submitted < self._look_ahead:
            slot = next((s for s in self.slots if s.future is None), None)
            if slot is None:
                pulled = next(self._requests, None)
                if pulled is None:
                    return
                slot = _Slot(pulled[0], pulled[1], 0, 0, head=True)
                self.slots.append(slot)
            slot.future = self._pool.submit(self._fetch, slot.req, slot.page_no, slot.offset)
            submitted += 1
        return

    def _expand(self) -> None:
        """After a head page arrives, queue the rest of its request behind it."""
        for at, slot in enumerate(self.slots):
            if not slot.head or slot.expanded or slot.future is None or not slot.future.done():
                continue
            slot.expanded = True
            if slot.future.exception() is not None:
                continue
            page = slot.future.result()
            if page.last or not page.rows:
                continue
            rest = range(page.offset + len(page.rows), page.total, self._page_length)
            more = [
                _Slot(slot.index, slot.req, slot.page_no + 1 + i, offset, head=False)
                for i, offset in enumerate(rest)
            ]
            self.slots[at + 1 : at + 1] = more

    def _after(self, done: _Slot, page: Page) -> None:
        """Keep the rest of the request only where the sequential walk would continue."""
        following = self.slots[0] if self.slots else None
        expected = page.offset + len(page.rows)
        if (
            not page.last
            and following is not None
            and (following.index, following.offset) == (done.index, expected)
        ):
            return
        self._drop(done.index)
        if not page.last:
            self.slots.insert(0, _Slot(done.index, done.req, page.page_no + 1, expected, True))

    def _drop(self, index: int) -> None:
        for slot in [s for s in self.slots if s.index == index]:
            if slot.future is not None:
                slot.future.cancel()
            self.slots.remove(slot)


def iter_in_order(
    requests: Iterable[Request],
    fetch: Fetch,
    *,
    page_length: int,
    max_in_flight: int,
    stop: threading.Event,
    look_ahead: int | None = None,
) -> Generator[tuple[int, Page]]:
    """``(request index, page)`` for every page of ``requests``, in sequential order.

    At most ``max_in_flight`` fetches run at once and at most ``look_ahead`` (default
    twice that) pages are fetched or in flight ahead of the consumer. ``stop`` is set
    when the walk ends for any reason (the fetches it abandons should watch it).
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    pool = DaemonPool(max_in_flight, "eia-fetch")
    walk = _Walk(requests, fetch, pool, page_length, look_ahead or 2 * max_in_flight)
    try:
        while (item := walk.next_page()) is not None:
            yield item
    finally:
        stop.set()
        walk.abandon()
        pool.shutdown()
