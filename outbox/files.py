"""Writing a whole file atomically: the metrics textfile and the HTML report.

A reader (node_exporter, a browser, a static web server) sees the old file or the new
one, never half of one: the text goes to a temporary file beside the target, is synced,
and is renamed over it. A failure is one line naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from outbox.errors import DiskFullError, UsageError


def write_atomic(path: str | os.PathLike[str], text: str, *, prefix: str) -> Path:
    """Write ``text`` to ``path`` atomically (mode 0644); raise a one-line error on failure.

    ``prefix`` names the temporary file (``.outbox-metrics-``: node_exporter collects only
    ``*.prom`` files, so it never reads the temporary one).
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
    except OSError as exc:
        raise _error(target, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _error(target, exc) from None
        raise
    return target


def _error(target: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(target)
    return UsageError(f"cannot write {target}: {exc.strerror or type(exc).__name__}")
