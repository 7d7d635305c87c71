"""Named crash points for durability tests (a test hook, inert unless asked for).

With ``OUTBOX_CRASH_AT=<name>`` in the environment the process SIGKILLs itself the
``OUTBOX_CRASH_AFTER``-th time (default 1st) it reaches :func:`crashpoint` ``name``,
so tests can kill at exact places (after the 2xx, before the ack commit, ...)
rather than only at random times. With ``OUTBOX_CRASH_DELAY=<seconds>`` the kill comes
that long after the point is reached, from a timer thread, while the process goes on:
``send.before_post`` plus a delay shorter than the receiver's latency kills mid-request.
Points:

* ``fetch.page_fetched``        a page is in memory, nothing of it staged
* ``stage.rows_written``        rows upserted inside the open transaction
* ``stage.checked``             the quality checks of the staged rows ran (findings and
                               quarantined rows written, or, with no rule quarantining,
                               the hours to judge marked), not committed
* ``stage.before_commit``       rows, page and watermark written, not committed
* ``quality.pending``           every page of a fetch run committed, with the hours the
                               deferred (warn-only) checks are to judge marked; not judged
* ``quality.judged``            the deferred checks ran (findings written, markers
                               deleted), not committed
* ``send.after_claim``          a batch is claimed, nothing posted
* ``send.before_post``          a batch is encoded and about to be posted
* ``send.after_post``           GridPulse answered 2xx, nothing recorded
* ``settle.before_commit``      a batch outcome (its acks, its dead rows) written inside
                               the open transaction
* ``acks.before_commit``        recorded acks applied to their rows, not committed
"""

from __future__ import annotations

import os
import signal
import threading

_POINT = os.environ.get("OUTBOX_CRASH_AT") or None
_AFTER = int(os.environ.get("OUTBOX_CRASH_AFTER", "1") or 1)
_DELAY = float(os.environ.get("OUTBOX_CRASH_DELAY", "0") or 0)
_seen = 0


def crashpoint(name: str) -> None:
    """SIGKILL this process if the environment asked for a crash at ``name``."""
    global _seen
    if name != _POINT:
        return
    _seen += 1
    if _seen != _AFTER:
        return
    if _DELAY > 0:
        timer = threading.Timer(_DELAY, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
        return
    os.kill(os.getpid(), signal.SIGKILL)
