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

REPORT_HEAD = "<!doctype html>"
METRICS_HEAD = "#"  # a textfile starts with a comment (ours: # HELP)


def write_atomic(
    path: str | os.PathLike[str], text: str, *, prefix: str, replaces: str, what: str
) -> Path:
    """Write ``text`` to ``path`` atomically (mode 0644); raise a one-line error on failure.

    ``prefix`` names the temporary file (``.outbox-metrics-``: node_exporter collects only
    ``*.prom`` files, so it never reads the temporary one). An existing file is replaced
    only if it is a regular file that starts with ``replaces`` (an earlier ``what``) or is
    empty: a mistyped path never overwrites the outbox, its config or a device.
    """
    target = Path(path)
    check_target(target, replaces, what)
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


def check_target(target: Path, replaces: str, what: str) -> None:
    """Refuse (one line, exit 2) a target that is not a file an earlier ``what`` wrote."""
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise UsageError(f"{target}: not a regular file; name a file for the {what}")
    if not target.exists():
        return
    try:
        with target.open("rb") as existing:
            head = existing.read(len(replaces.encode()))
    except OSError as exc:
        raise _error(target, exc) from None
    if head and head != replaces.encode():
        raise UsageError(f"{target}: exists and is not an earlier {what}; not overwriting it")


def _error(target: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(target)
    return UsageError(f"cannot write {target}: {exc.strerror or type(exc).__name__}")
