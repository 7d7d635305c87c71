"""The ``outbox`` command line: parse, call one library function, print, map errors to exits.

Exit codes: 0 ok; 1 the run failed (EIA or GridPulse unreachable, rows deferred, the
output's file system full; also an internal error, a bug: one line, and with ``-v`` a log
line saying where it was raised);
2 usage or configuration error; 4 the outbox is full (fetch refuses to grow it);
143 stopped by SIGTERM (130: SIGINT), the run recorded as failed.
``status --check`` uses the monitoring convention instead: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN.

A package, not one module, only because twenty commands' option declarations outgrow one
file: :mod:`~outbox.cli.app` (the app, global options, errors to exits),
:mod:`~outbox.cli.options` (every check of an option's value), and the commands in
:mod:`~outbox.cli.stages`, :mod:`~outbox.cli.reads` and :mod:`~outbox.cli.ops`. The work
is in the library; :mod:`outbox.wiring` builds what a command needs from the config.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn

from outbox.cli.app import app
from outbox.logsetup import print_error
from outbox.stages.runs import interrupt_on_signals
from outbox.store.engine import is_disk_full

# The commands register on the app as their modules load: this order is `outbox --help`'s.
# isort: off
from outbox.cli import stages  # noqa: F401
from outbox.cli import reads  # noqa: F401
from outbox.cli import ops  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    # systemd stops a service with SIGTERM, a terminal with SIGINT (Ctrl-C): turn each into
    # an exception naming it, so the stage rolls back its open transaction, records the run
    # as failed and the last line says why (exit 143 / 130).
    with interrupt_on_signals():
        try:
            _main()
            code: int | str | None = 0
        except SystemExit as done:
            code = done.code
    _exit(code)


def _exit(code: int | str | None) -> NoReturn:
    """Leave the process with ``code`` as ``sys.exit`` would, without the interpreter's
    teardown when nothing needs it.

    By now the command has closed the outbox (and checkpointed it) and printed its last
    line; what a normal exit still does is tear the interpreter down object by object:
    0.4-0.5 s after a stage of a million rows, for nothing. So: the exit handlers run
    (logging's flush, multiprocessing's joins, whatever a library registered), the
    standard streams are flushed, and the process ends. The normal exit does it all
    instead when someone still needs the interpreter: a thread that is not a daemon (its
    work still running), a profiler or tracer (``python -m cProfile``, coverage: they
    write their output after ``main`` returns), or a code that is not a number
    (``sys.exit("...")`` prints it).
    """
    others = (t for t in threading.enumerate() if t is not threading.main_thread())
    if (
        not (code is None or isinstance(code, int))
        or sys.getprofile() is not None
        or sys.gettrace() is not None
        or any(not t.daemon for t in others)
    ):
        sys.exit(code)
    atexit._run_exitfuncs()
    unwritten = False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError, AttributeError):
            pass  # a closed pipe (`outbox status | head`) or stream: nothing more to say
        except OSError:  # e.g. a full disk under `> file`: as CPython, exit 120 for a 0
            unwritten = True
    os._exit(120 if unwritten and not code else code or 0)


def _main() -> None:
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort

    try:
        code = app(standalone_mode=False)
    except BrokenPipeError:  # `outbox status | head`
        sys.stderr.close()
        return
    except ClickException as exc:
        # Click's usage errors are a box of lines: one line here, as for every failure.
        if exc.format_message().strip():  # (none when no_args_is_help printed the help)
            print_error(_usage_line(exc))
        sys.exit(exc.exit_code)
    except Abort:
        print_error("aborted")
        sys.exit(1)
    except Exception as exc:  # a bug: still one line; -v logs where it was raised
        if (unwritable := _unwritable(exc)) is not None:  # not a bug: a full file system
            print_error(unwritable)
            sys.exit(1)
        frames = traceback.extract_tb(exc.__traceback__)[-4:]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1])
        logging.getLogger("outbox.cli").debug("internal error where=%s", json.dumps(where))
        said = " ".join(str(exc).split())
        said = f": {said[:300]}{'...' if len(said) > 300 else ''}" if said else ""
        print_error(f"internal error: {type(exc).__name__}{said} (a bug; -v logs where)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _unwritable(exc: BaseException) -> str | None:
    """The one line for a write that found its file system full (``outbox status > file``
    on a full disk, ``> /dev/full``, a unit file of ``timers print --out``), or None for
    any other error. The outbox's own writes say so themselves (a disk-full error naming
    the file, exit 1, as this)."""
    if not isinstance(exc, OSError) or not is_disk_full(exc):
        return None
    why = exc.strerror or os.strerror(exc.errno or 0)
    if exc.filename is not None:
        return f"cannot write {exc.filename}: {why}"
    # A buffered write names no file: it was the output when it was raised writing to a
    # standard stream (a frame holding one, or the printers of Click and rich, which write
    # only there for us), else it was a file the command wrote.
    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    for frame, _line in traceback.walk_tb(exc.__traceback__):
        printer = str(frame.f_globals.get("__name__", "")).endswith(("click.utils", "rich.console"))
        if printer or any(id(v) in streams for v in frame.f_locals.values()):
            return f"cannot write the output: {why}"
    return f"cannot write a file: {why}"


def _usage_line(exc: Any) -> str:
    """A Click usage error as one line: what was wrong, and where the help is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see `{ctx.command_path} --help`)"
