"""UTC time as the outbox writes it: RFC 3339 text with ``Z`` that sorts as it reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
HOUR = timedelta(hours=1)


def utcnow() -> datetime:
    """The current time, aware, in UTC (freezegun-friendly)."""
    return datetime.now(UTC)


def to_ts(value: datetime) -> str:
    """``2025-08-22T14:00:00Z`` for an aware (or naive-as-UTC) datetime."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime(TS_FORMAT)


def parse_ts(text: str) -> datetime:
    """An aware UTC datetime from RFC 3339 text (``Z`` or an offset), or ValueError."""
    value = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_bound(text: str) -> datetime:
    """A CLI time bound: a date (``2024-01-01``, midnight UTC) or an RFC 3339 time."""
    text = text.strip()
    if len(text) == 10:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    return parse_ts(text)


def floor_hour(value: datetime) -> datetime:
    """The whole hour at or before ``value``."""
    return value.replace(minute=0, second=0, microsecond=0)


def now_ts() -> str:
    """The current time as outbox text."""
    return to_ts(utcnow())


def hour_ts(h: int) -> str:
    """RFC 3339 of an hour counted from the epoch (the data-quality checks count hours)."""
    return datetime.fromtimestamp(h * 3600, tz=UTC).strftime(TS_FORMAT)


@lru_cache(maxsize=1 << 16)
def ts_hour(ts: str) -> int:
    """Hours since the epoch of an RFC 3339 ``...Z`` timestamp."""
    when = datetime.strptime(ts, TS_FORMAT).replace(tzinfo=UTC)
    return int(when.timestamp()) // 3600
