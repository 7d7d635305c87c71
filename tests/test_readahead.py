"""The read-ahead workers: a thread, or a forked process that hands items over pickled."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox.readahead import (
    Elided,
    SharedFlag,
    WorkerDied,
    can_fork,
    forked_read_ahead,
    read_ahead,
)

pytestmark = pytest.mark.skipif(not can_fork(), reason="the forked read-ahead is Linux only")

BOTH = pytest.mark.parametrize("ahead", [read_ahead, forked_read_ahead], ids=["thread", "fork"])


def _square(n: int) -> tuple[int, int, bytes]:
    return n, n * n, os.urandom(8) * (n % 5)


@BOTH
def test_items_arrive_in_order_and_complete(ahead: Callable[..., Iterator[Any]]) -> None:
    got = list(ahead(iter(range(200)), _square, 3))
    assert [g[:2] for g in got] == [(n, n * n) for n in range(200)]
    assert [len(g[2]) for g in got] == [8 * (n % 5) for n in range(200)]


def _fail_at_7(n: int) -> int:
    if n == 7:
        raise ValueError(f"item {n} is bad")
    return n


@BOTH
def test_an_error_is_raised_in_its_place(ahead: Callable[..., Iterator[Any]]) -> None:
    got = []
    with pytest.raises(ValueError, match="item 7 is bad"):
        for item in ahead(iter(range(20)), _fail_at_7, 2):
            got.append(item)
    assert got == list(range(7))


def _source_fails() -> Iterator[int]:
    yield 1
    yield 2
    raise OSError("disk went away")


@BOTH
def test_an_error_of_the_source_is_raised_in_its_place(
    ahead: Callable[..., Iterator[Any]],
) -> None:
    got = []
    with pytest.raises(OSError, match="disk went away"):
        for item in ahead(_source_fails(), lambda n: n * 10, 2):
            got.append(item)
    assert got == [10, 20]


def test_a_result_that_does_not_pickle_is_named() -> None:
    with pytest.raises(WorkerDied, match="cannot hand over"):
        list(forked_read_ahead(iter(range(3)), lambda n: threading.Lock(), 2))


def _die_at_2(n: int) -> int:
    if n == 2:
        os._exit(3)  # the worker process dies (killed, out of memory) without a word
    return n


def test_a_child_that_dies_is_reported_after_what_it_handed_over() -> None:
    got = []
    with pytest.raises(WorkerDied, match=r"ended early \(exit code 3\)"):
        for item in forked_read_ahead(iter(range(10)), _die_at_2, 2):
            got.append(item)
    # In order, and none past the death (an item not yet written to the pipe dies too).
    assert got == list(range(len(got))) and len(got) <= 2
    assert multiprocessing.active_children() == []


def test_closing_early_stops_the_child() -> None:
    gen = forked_read_ahead(iter(range(10**9)), _square, 2)
    assert next(gen)[0] == 0
    (child,) = multiprocessing.active_children()
    gen.close()
    assert not child.is_alive()
    assert multiprocessing.active_children() == []


def test_the_child_ignores_sigterm() -> None:
    """The parent (a run being stopped) decides when the worker ends, not the signal."""
    got = []
    for item in forked_read_ahead(iter(range(50)), _slow_square, 2):
        if item[0] == 3:
            (child,) = multiprocessing.active_children()
            os.kill(child.pid, signal.SIGTERM)
        got.append(item[0])
    assert got == list(range(50))


def _slow_square(n: int) -> tuple[int, int, bytes]:
    time.sleep(0.005)
    return _square(n)


def test_the_child_reads_the_flag_as_the_parent_sets_it() -> None:
    flag = SharedFlag(True)
    seen = []
    # Items larger than a pipe's buffer: at most ``depth`` plus one in the pipe go ahead.
    for n, value, _pad in forked_read_ahead(
        iter(range(40)), lambda n: (n, bool(flag), b"x" * 70_000), 2
    ):
        seen.append(value)
        if n == 5:
            flag.set(False)
    assert seen[0] is True and seen[-1] is False
    # Only the items computed ahead before the flag changed can still show it set.
    assert seen.index(False) <= 5 + 4


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing, sys, time
            from outbox.readahead import forked_read_ahead

            def work(n):
                time.sleep(0.001)
                return b"x" * 200_000  # a few fill the pipe

            gen = forked_read_ahead(iter(range(10**9)), work, 2)
            next(gen)
            print(multiprocessing.active_children()[0].pid, flush=True)
            time.sleep(60)
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _running(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while _running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    survived = _running(child_pid)
    if survived:
        os.kill(child_pid, signal.SIGKILL)
    assert not survived, "the read-ahead process outlived its parent"


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an orphan's zombie may not be reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


def test_elided_keeps_only_a_length() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(Elided(5000)))
    assert len(e) == 5000 and repr(e) == "Elided(5000)"
    with pytest.raises(LookupError, match="dropped"):
        e[0]
    assert len(pickle.dumps(Elided(5000))) < 64


def _open_files(_n: int) -> list[str]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue
    return out


def test_the_child_holds_none_of_the_parents_files(tmp_path: Path) -> None:
    """A fork shares open files: a child holding the run's flock would keep it after
    its parent died, and the next run would skip itself."""
    from outbox.store import file_lock

    lock = tmp_path / "outbox.db.fetch.lock"
    with file_lock(lock, blocking=True), open(tmp_path / "other.txt", "w"):
        (files,) = list(forked_read_ahead(iter([0]), _open_files, 2))
    assert not [f for f in files if f.startswith(str(tmp_path))], files
    assert any(f.startswith("pipe:") for f in files)  # the one it sends on
