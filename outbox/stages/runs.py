"""The one run context every stage runs in: its lock, its record in ``runs``, its log.

A stage run looks like this (``outbox.stages.send.run_send`` is the model)::

    with stage_lock(store, "send") as lock:
        if not lock.held:                   # another process runs the stage: do nothing
            return Result(skipped=True, holder=lock.holder)
        with recorded_run(store, "send", result.counts) as run:
            ...                             # the stage's work; result counts as it goes
    run.log_done(batches=result.batches, ...)   # "send done run=7 seconds=0.412 batches=3"

* :func:`stage_lock` takes the stage's lock file without waiting. Holding it is what makes
  a run recorded ``running`` alive: a run of the stage still ``running`` when the next
  one starts belongs to a process that is gone (SIGKILL, out of memory, power loss), and
  :meth:`RunLedger.start_run` records it failed, ``process gone (pid N)``, with a warning.
* :func:`recorded_run` records the run (start, then ``ok`` or ``failed`` with its counts
  and the error), binds ``stage`` and ``run`` to every log line inside, and logs the one
  line of a failed run: ``send failed run=7 seconds=0.4 batches=2 ... error="..."``. Any
  exception, :class:`~outbox.errors.Interrupted` included, records the run failed and
  goes on up; the open transaction it lands in has rolled back.
* :func:`interrupt_on_signals` turns SIGTERM (systemd stop) and SIGINT (Ctrl-C) into
  :class:`~outbox.errors.Interrupted`, so that a stopped run records itself as failed
  and says why; the CLI's entry point wraps every command in it.

What follows a stage command (metrics file, report, alerts) is the CLI's
``wiring.observed``: it reads the store after the run, which the stages never do.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import Interrupted, OutboxError
from outbox.logsetup import bind, quote
from outbox.redact import redact
from outbox.store import Store, file_lock, lock_holder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lock:
    """A stage's lock as :func:`stage_lock` found it: ``held`` by this process, or held by
    another, whose pid is ``holder`` (None when its pid cannot be read)."""

    held: bool
    holder: int | None = None


@contextmanager
def stage_lock(store: Store, stage: str) -> Iterator[Lock]:
    """Hold ``stage``'s lock for the block if no other process holds it (never waits)."""
    path = store.lock_path(stage)
    with file_lock(path, blocking=False) as got:
        yield Lock(True) if got else Lock(False, lock_holder(path))


@dataclass
class Run:
    """One recorded run in progress (:func:`recorded_run`)."""

    stage: str
    id: int
    started: float = field(default_factory=time.monotonic)
    error: str | None = None
    """The error the run was recorded failed with (set when it failed)."""

    def seconds(self) -> float:
        """Seconds since the run started (monotonic clock)."""
        return time.monotonic() - self.started

    def log_done(self, **counts: object) -> None:
        """The one line of a finished run: ``send done run=7 seconds=0.412 acked=3 ...``."""
        pairs = "".join(f" {k}={v}" for k, v in counts.items())
        log.info("%s done run=%d seconds=%.3f%s", self.stage, self.id, self.seconds(), pairs)


def describe(exc: BaseException) -> str:
    """The error a failed run is recorded with: the message of an OutboxError, the type
    and message of anything else, the signal of an interruption; redacted."""
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted"
    text = str(exc) or type(exc).__name__
    return redact(text if isinstance(exc, OutboxError) else f"{type(exc).__name__}: {text}")


@contextmanager
def recorded_run(
    store: Store,
    stage: str,
    counts: Callable[[], Mapping[str, Any]],
    *,
    describe: Callable[[BaseException], str] = describe,
) -> Iterator[Run]:
    """Record one run of ``stage`` in ``runs`` around the block (hold its lock first).

    ``counts`` gives the counts to record when the run ends, as they are then; ``describe``
    turns what stopped a failed run into its recorded error (the default: :func:`describe`).
    The exception itself goes on up.
    """
    run = Run(stage, store.runs.start_run(stage))
    bind(stage=stage, run=run.id)
    run.started = time.monotonic()
    try:
        yield run
    except BaseException as exc:
        run.error = describe(exc)
        store.runs.finish_run(run.id, "failed", counts(), run.error)
        log_failed(run, counts())
        raise
    store.runs.finish_run(run.id, "ok", counts())


def log_failed(run: Run, counts: Mapping[str, Any]) -> None:
    """The one log line of a failed run: run id, duration, counts so far, the error."""
    numbers = " ".join(f"{k}={v}" for k, v in counts.items() if isinstance(v, int))
    log.error(
        "%s failed run=%d seconds=%.3f %s error=%s",
        run.stage,
        run.id,
        run.seconds(),
        numbers,
        quote(run.error or ""),
    )


def _interrupt(signum: int, _frame: object) -> None:
    # Only the first signal interrupts: the run must be able to record itself as failed.
    signal.signal(signum, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`~outbox.errors.Interrupted`
    (the first one; later ones are ignored). Only the main thread can take signals:
    elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
