"""Where a send's time goes: CPU seconds per phase and thread, and the receiver's CPU.

Used by ``bench_send.py --profile``: one extra run of :func:`outbox.stages.send.run_send`
with each phase wrapped in an accumulator of ``time.thread_time()`` (the CPU of the
calling thread only) and wall time. The phases:

* ``claim``: :meth:`Delivery.claim` (read-ahead thread): the pending-index range, each
  table row, the series map;
* ``encode``: the batch id and the JSON body (:meth:`GridPulseSink.prepare` less gzip);
* ``gzip``: :meth:`GridPulseClient.pack`;
* ``post``: :meth:`GridPulseClient.post_batch` on the main thread (its CPU is httpx's;
  the rest of its wall time is waiting for the receiver);
* ``record``: :meth:`Delivery.record_outcome` (the outcome's commit, before the next POST);
* ``apply_acks``: :meth:`Delivery.apply_acks` (ack thread, overlapping the next POST);
* ``wait_acks``: the main thread waiting for the previous batch's acks before recording.

The receiver's CPU is read from ``/proc/<pid>/stat`` (Linux), ``None`` elsewhere.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from outbox.sinks import gridpulse
from outbox.stages import send
from outbox.store import deliver

_lock = threading.Lock()


class Phases:
    """CPU and wall seconds per phase, summed over calls from any thread."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` counted under ``name``."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with _lock:
                    self.cpu[name] += time.thread_time() - cpu
                    self.wall[name] += time.perf_counter() - wall
                    self.calls[name] += 1

        return counted

    def report(self, rows: int) -> dict[str, Any]:
        """Per phase: CPU and wall seconds, and CPU microseconds a row."""
        cpu, wall = dict(self.cpu), dict(self.wall)
        if "prepare" in cpu:  # prepare includes the gzip it calls
            cpu["encode"] = cpu.pop("prepare") - cpu.get("gzip", 0.0)
            wall["encode"] = wall.pop("prepare") - wall.get("gzip", 0.0)
        return {
            name: {
                "cpu_s": round(seconds, 3),
                "wall_s": round(wall[name], 3),
                "cpu_us_per_row": round(seconds / rows * 1e6, 2),
            }
            for name, seconds in sorted(cpu.items())
        }


@contextmanager
def profiled() -> Iterator[Phases]:
    """Wrap the send path's phases for the duration of the block."""
    phases = Phases()
    targets = [
        (deliver.Delivery, "claim", "claim"),
        (deliver.Delivery, "record_outcome", "record"),
        (deliver.Delivery, "apply_acks", "apply_acks"),
        (gridpulse.GridPulseSink, "prepare", "prepare"),
        (gridpulse.GridPulseClient, "pack", "gzip"),
        (gridpulse.GridPulseClient, "post_batch", "post"),
        (send.Sender, "wait_acks", "wait_acks"),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    for owner, attr, name in targets:
        setattr(owner, attr, phases.wrap(name, getattr(owner, attr)))
    try:
        yield phases
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
