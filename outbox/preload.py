"""numpy and pandas imported on a daemon thread while the process would only wait.

Importing them takes ~0.4 s (more on a slow box). A fetch needs them once the first
answer is in (normalize) or for the checks' end-of-run pass, and it spends that long
waiting first: on EIA's first answers (~1 s each), or on its read-ahead process's first
page. :func:`preload` starts the import then; the first real use waits for it under the
import lock, or imports itself if the thread failed (the error is raised there, where
it is handled). Measured on the hourly run (3 requests, the stand-in answering after
1 s): the first page's normalize went from ~0.45 s to ~0.02 s (docs/performance.md).

A fork while the thread imports would leave the child a module lock no thread of it
holds (an import of pandas there would wait forever): :func:`settle` waits for the
thread, and :func:`outbox.readahead.forked_read_ahead` calls it before forking.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading

log = logging.getLogger(__name__)

MODULES = ("numpy", "pandas")
_thread: threading.Thread | None = None
_lock = threading.Lock()


def preload() -> None:
    """Start importing :data:`MODULES` on a daemon thread (once; not when imported)."""
    global _thread
    with _lock:
        if _thread is not None or all(name in sys.modules for name in MODULES):
            return
        _thread = threading.Thread(target=_import, name="outbox-preload", daemon=True)
        _thread.start()


def settle() -> None:
    """Wait until no preload import is running (before a fork)."""
    thread = _thread
    if thread is not None:
        thread.join()


def _import() -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # the first real use imports again and raises it there
            log.debug("preload of %s failed", name, exc_info=True)
            return
