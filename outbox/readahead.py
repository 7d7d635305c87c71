"""Work on the next items of a stream while the caller handles the current one.

:func:`read_ahead` runs the worker on a thread: right for work that waits (a socket, a
database) and for short streams. :func:`forked_read_ahead` runs it in a forked child
process: right for CPU-bound Python work next to a caller that is busy itself, where a
thread would hold the GIL each time the caller's SQLite call returns and wants it back
(on two cores that costs a replay of a million rows about 1.5 s; see docs/performance.md).

Both hand items (and an exception of the worker) over in order, compute at most
``depth`` items ahead (the forked one, plus what fits in a pipe's 64 KiB buffer), and
stop the worker when the caller closes the generator.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from queue import Full, Queue
from typing import Any, TypeVar, overload

from outbox.preload import settle

_T = TypeVar("_T")
_U = TypeVar("_U")


def read_ahead(
    source: Iterator[_T], prepare: Callable[[_T], _U], depth: int
) -> Generator[_U, None, None]:
    """``prepare(item)`` for each item of ``source``, in order, computed up to ``depth``
    items ahead by a worker thread.

    While the caller works on one item (a page staged, a batch posted: SQLite and the
    socket release the GIL), the worker reads and prepares the next ones; it writes
    nothing. An exception from ``source`` or ``prepare`` is raised here at its place in
    the order, after every item before it; closing the generator stops the worker.
    """
    queue: Queue[tuple[bool, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if not offer((True, prepare(item))):
                    return
        except BaseException as exc:  # handed over in order, raised by the consumer
            offer((False, exc))
            return
        offer((False, None))

    worker = threading.Thread(target=work, name="outbox-read-ahead", daemon=True)
    worker.start()
    try:
        yield from _handed_over(queue.get)
    finally:
        stop.set()
        worker.join()


def _handed_over(receive: Callable[[], tuple[bool, Any]]) -> Iterator[Any]:
    """The items a worker hands over as ``(True, item)``, until its ``(False, None)``;
    its ``(False, exception)`` is raised here, in its place."""
    while True:
        ok, value = receive()
        if ok:
            yield value
        elif value is None:
            return
        else:
            raise value


def can_fork() -> bool:
    """Whether :func:`forked_read_ahead` can run here (Linux: fork is safe and cheap)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class WorkerDied(RuntimeError):
    """The read-ahead process ended without handing over its end of the stream."""


def forked_read_ahead(
    source: Iterator[_T],
    prepare: Callable[[_T], _U],
    depth: int,
    *,
    meanwhile: Callable[[], object] | None = None,
) -> Generator[_U, None, None]:
    """:func:`read_ahead` with the worker in a forked child process.

    ``meanwhile`` runs here once the child has started, before the first item is awaited:
    work the caller needs later started while it would only wait (:func:`outbox.preload`).

    The child iterates ``source`` and calls ``prepare`` on its copy of this process
    (nothing is imported or pickled to start it), and sends each result back pickled
    through a pipe, so results must pickle and should be small: drop what the caller
    does not need before returning them. The child writes no file and owns no lock. It
    ignores SIGTERM and SIGINT (the caller decides when to stop, and kills it when the
    generator closes), and exits as soon as the caller is gone: a write to a pipe
    nobody reads fails at once.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_child,
        args=(source, prepare, sender, receiver, depth),
        name="outbox-read-ahead",
        daemon=True,
    )
    settle()  # no import half done on another thread: the child could never finish it
    child.start()
    sender.close()

    def receive() -> tuple[bool, Any]:
        try:
            item: tuple[bool, Any] = pickle.loads(receiver.recv_bytes())
            return item
        except EOFError:
            child.join(5)
            raise WorkerDied(
                f"the read-ahead process ended early (exit code {child.exitcode})"
            ) from None

    try:
        if meanwhile is not None:
            meanwhile()
        yield from _handed_over(receive)
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()


def _child(
    source: Iterator[Any],
    prepare: Callable[[Any], Any],
    sender: Any,
    receiver: Any,
    depth: int,
) -> None:
    # Objects inherited from the parent (its SQLite connections among them) are never
    # collected, so never finalized, here.
    gc.freeze()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    receiver.close()  # the only reader is the parent: once it is gone, a send fails
    _close_inherited(keep=sender.fileno())
    queue: Queue[tuple[bool, Any]] = Queue(maxsize=max(depth - 1, 1))

    def send() -> None:
        try:
            _send_all()
        finally:
            os._exit(0)  # the end, an error handed over, or the parent gone

    def _send_all() -> None:
        # Pickles and writes while the main thread of the child prepares the next item.
        while True:
            item = queue.get()
            ok, value = item
            try:
                data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # handed over as what it was, in words
                what = f"{type(value).__name__}: {value}" if not ok else f"cannot hand over: {exc}"
                data = pickle.dumps((False, WorkerDied(what)))
                ok = False
            try:
                sender.send_bytes(data)
            except OSError:
                return  # the parent is gone: stop preparing for nobody
            if not ok:
                return  # the end, or an error: nothing follows it

    thread = threading.Thread(target=send, name="outbox-read-ahead-send", daemon=True)
    thread.start()
    try:
        for item in source:
            queue.put((True, prepare(item)))
    except BaseException as exc:
        queue.put((False, exc))
    else:
        queue.put((False, None))
    thread.join()  # the sender ends the process once the last item is written


def _close_inherited(keep: int) -> None:
    """Close every descriptor but stdio and ``keep``: above all the parent's lock files.

    An ``flock`` belongs to the open file, which a fork shares: a child still holding
    the descriptor would hold the run's lock after the parent died.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
                os.close(fd)


class SharedFlag:
    """A boolean the parent sets and a forked child reads (one byte of shared memory)."""

    def __init__(self, value: bool) -> None:
        self._byte = mmap.mmap(-1, 1)
        self.set(value)

    def set(self, value: bool) -> None:
        """Set the flag (seen by a child forked before or after)."""
        self._byte[0] = 1 if value else 0

    def __bool__(self) -> bool:
        return self._byte[0] == 1


class Elided(Sequence[Any]):
    """Stands for a sequence of ``n`` items dropped once used: only its length is left.

    What a worker hands over from another process is pickled; the rows it has already
    encoded need not be. Reading an item is a bug and raises LookupError.
    """

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        raise LookupError("these items were dropped after the read-ahead worker used them")

    def __reduce__(self) -> tuple[type[Elided], tuple[int]]:
        return (Elided, (self.n,))

    def __repr__(self) -> str:
        return f"Elided({self.n})"
