"""Keep secrets out of every string a person or a file will see.

EIA puts its key in the query string (``api_key=...``) and echoes it in response
bodies; GridPulse's key rides in ``Authorization``. Everything that is logged,
stored or printed goes through :func:`redact` first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

MASK = "***"
_QUERY_KEY = re.compile(r"(?i)((?:api_key|apikey|api-key|key|token|password|secret)=)[^&#\s\"']+")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_JSON_KEY = re.compile(r"(?i)(\"api_key\"\s*:\s*\")[^\"]*(\")")
# ``scheme://user:password@host``: the whole userinfo (a token often rides as the user).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s\"']+@")

_known_secrets: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Remember a secret so that :func:`redact` masks it wherever it appears."""
    if secret and len(secret) >= 4:
        _known_secrets.add(secret)


def known_secrets() -> frozenset[str]:
    """The secrets registered so far (for tests and scanners)."""
    return frozenset(_known_secrets)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with keys and userinfo in URLs, bearer tokens and known secrets masked."""
    if not text:
        return text
    text = _QUERY_KEY.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    text = _JSON_KEY.sub(rf"\1{MASK}\2", text)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    for secret in (*_known_secrets, *secrets):
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def database_url_secrets(url: str) -> list[str]:
    """The password of a database URL and the secret-bearing libpq parameters of its query
    string (``password=``, ``sslpassword=``), as written and percent-decoded."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    for item in parts.query.split("&") if parts.query else ():
        key, _, value = item.partition("=")
        if key.lower() in ("password", "sslpassword") and value:
            found.append(value)
    return [*found, *(unquote(s) for s in found if unquote(s) != s)]


def redact_url(url: object) -> str:
    """A URL as text with its ``api_key`` (and any other key-like parameter) masked."""
    return redact(str(url))


class RedactingFilter(logging.Filter):
    """Logging filter that masks secrets in the final message and its arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            try:
                record.msg = record.getMessage()
            except (TypeError, ValueError):
                record.msg = str(record.msg)
            record.args = None
        record.msg = redact(str(record.msg))
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
            del exc
        return True
