"""Logging, configured once by the CLI: one line per event on stderr, secrets redacted.

``logfmt`` (default) is journald- and grep-friendly; ``json`` suits log shippers (one
object per line). Modules log ``"event k=v k=v"`` messages; both formatters lift the
``k=v`` pairs into fields (JSON: numbers become numbers, quoted values are unquoted).

Context: :func:`bind` adds fields to every later line of the current context (the
pipeline binds ``stage`` and ``run`` when a run starts) and :func:`log_scope` undoes
whatever was bound inside it: the stage functions are :func:`scoped`, and the CLI wraps
each stage command in a scope naming the stage. So every line of a run carries its run
id and stage, and nothing of it outlives the run.

Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts with a ``<N>``
syslog priority prefix, which journald strips and records as the entry's priority.
Secrets are masked by a handler filter, so nothing a module logs can leak a key.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import ParamSpec, TextIO, TypeVar

from outbox.redact import RedactingFilter, redact

P = ParamSpec("P")
R = TypeVar("R")
FORMATS = ("logfmt", "json")
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_CONTEXT: ContextVar[dict[str, str]] = ContextVar("outbox_log_context", default={})  # noqa: B039
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
_state = {"format": "logfmt"}


def bind(**fields: object) -> None:
    """Add ``fields`` (e.g. ``stage="send", run=12``) to every later line of this context."""
    _CONTEXT.set({**_CONTEXT.get(), **{k: str(v) for k, v in fields.items() if v is not None}})


@contextmanager
def log_scope(**fields: object) -> Iterator[None]:
    """Bind ``fields`` for the duration of the block; anything bound inside ends with it."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: str(v) for k, v in fields.items()}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def scoped(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` in a :func:`log_scope`: what it binds (a run id) ends with the call."""

    @functools.wraps(function)
    def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        with log_scope():
            return function(*args, **kwargs)

    return inner


def quote(text: str) -> str:
    """A value for ``key=value`` messages: JSON-quoted and redacted."""
    return json.dumps(redact(text))


def _split(message: str) -> tuple[str, dict[str, str]]:
    first = _PAIR.search(message)
    if first is None:
        return message, {}
    event = message[: first.start()].strip()
    return event, dict(_PAIR.findall(message[first.start() :]))


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, str]]:
    event, pairs = _split(record.getMessage())
    context = {k: v for k, v in _CONTEXT.get().items() if k not in pairs}
    return event, {**context, **pairs}


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            return str(json.loads(raw))
        except ValueError:
            return raw[1:-1]
    return raw


def _typed(raw: str) -> object:
    if raw.startswith('"'):
        return _unquote(raw)
    if _NUMBER.fullmatch(raw):
        return float(raw) if "." in raw else int(raw)
    return raw


def _when(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=outbox.stages.runs msg="send done" stage=send run=3 sent=48``."""

    def format(self, record: logging.LogRecord) -> str:
        """One logfmt line; values with spaces, quotes or control characters are quoted."""
        event, fields = _fields(record)
        parts = [f"ts={_when(record)}", f"level={record.levelname.lower()}"]
        parts.append(f"logger={record.name}")
        parts.append(f"msg={json.dumps(event)}")
        parts.extend(f"{k}={_quote(_unquote(v))}" for k, v in fields.items())
        if record.exc_text:
            parts.append(f"error={json.dumps(record.exc_text.splitlines()[-1])}")
        return " ".join(parts)


def _quote(value: str) -> str:
    plain = value and value.isprintable() and not any(c in value for c in ' "=\\')
    return value if plain else json.dumps(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the context and the pairs."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line (never spans lines: json.dumps escapes control characters)."""
        event, fields = _fields(record)
        data: dict[str, object] = {
            "ts": _when(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": event,
        }
        data.update({k: _typed(v) for k, v in fields.items() if k not in data})
        if record.exc_text:
            data["error"] = record.exc_text.splitlines()[-1]
        return json.dumps(data)


class _JournalPrefix(logging.Formatter):
    """Prefix each line with ``<N>`` so journald records the syslog priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        """``<6>`` + the inner formatter's line."""
        level = max((lvl for lvl in _PRIORITY if lvl <= record.levelno), default=logging.DEBUG)
        priority = 2 if record.levelno >= logging.CRITICAL else _PRIORITY[level]
        return f"<{priority}>{self.inner.format(record)}"


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (systemd sets ``JOURNAL_STREAM=dev:ino``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _Threshold(logging.Filter):
    """Our lines from INFO (DEBUG with -v); other libraries' from WARNING (DEBUG with -vv).

    Thresholds live on our handler, not on the ``outbox`` logger, so configuring logging
    leaves no logger level behind that would hide records from other handlers (pytest's
    caplog in a later test, an embedding application).
    """

    def __init__(self, verbose: int) -> None:
        super().__init__()
        self.ours = logging.DEBUG if verbose else logging.INFO
        self.theirs = logging.DEBUG if verbose > 1 else logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the record is at or above its logger's threshold."""
        ours = record.name == "outbox" or record.name.startswith("outbox.")
        return record.levelno >= (self.ours if ours else self.theirs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when configured.

    An embedding program (or a test runner) may swap and close stderr streams; a handler
    holding the old one would fail on every later record.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        """The current ``sys.stderr``."""
        return sys.stderr


def setup_logging(verbose: int = 0, fmt: str = "logfmt") -> None:
    """Send our logs to stderr at INFO (DEBUG with -v), formatted and redacted."""
    _state["format"] = fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_outbox", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._outbox = True  # type: ignore[attr-defined]
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else LogfmtFormatter()
    handler.setFormatter(_JournalPrefix(formatter) if stderr_is_journal() else formatter)
    handler.addFilter(_Threshold(verbose))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("outbox").setLevel(logging.NOTSET)
    for noisy in ("httpx", "httpcore", "alembic", "sqlalchemy"):
        # Spares the cost of building their debug records when nobody shows them.
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def print_error(text: str) -> None:
    """The final error of a command on stderr: ``error: ...`` or, in JSON mode, a JSON line."""
    text = redact(text)
    if _state["format"] == "json":
        line = json.dumps(
            {
                "ts": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "level": "error",
                "logger": "outbox.cli",
                "msg": text,
                **_CONTEXT.get(),
            }
        )
    else:
        line = f"error: {text}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
