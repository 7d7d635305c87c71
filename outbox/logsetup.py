"""Logging, configured once by the CLI: one line per event on stderr, secrets redacted.

``logfmt`` (default) is journald- and grep-friendly; ``json`` suits log shippers.
Modules log ``"event k=v k=v"`` messages; the JSON formatter lifts the ``k=v`` pairs
into fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from outbox.redact import RedactingFilter

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def _split(message: str) -> tuple[str, dict[str, str]]:
    first = _PAIR.search(message)
    if first is None:
        return message, {}
    event = message[: first.start()].strip()
    fields = {k: v.strip('"') for k, v in _PAIR.findall(message[first.start() :])}
    return event, fields


def _when(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=outbox.pipeline msg="fetch done" run=3 rows=480``."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _split(record.getMessage())
        parts = [f"ts={_when(record)}", f"level={record.levelname.lower()}"]
        parts.append(f"logger={record.name}")
        parts.append(f"msg={json.dumps(event)}")
        parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_text:
            parts.append(f"error={json.dumps(record.exc_text.splitlines()[-1])}")
        return " ".join(parts)


def _quote(value: str) -> str:
    return json.dumps(value) if (not value or any(c in value for c in ' "=')) else value


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _split(record.getMessage())
        data = {"ts": _when(record), "level": record.levelname.lower(), "logger": record.name}
        data["msg"] = event
        data.update(fields)
        if record.exc_text:
            data["error"] = record.exc_text.splitlines()[-1]
        return json.dumps(data)


def setup_logging(verbose: int = 0, fmt: str = "logfmt") -> None:
    """Send our logs to stderr at INFO (DEBUG with -v), formatted and redacted."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_outbox", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._outbox = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("outbox").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
