"""Fault injection for the reference receiver, one ``--fault SPEC`` at a time.

Faults apply to ``POST /api/v1/data/observations`` only. Random faults draw from their
own ``random.Random`` seeded with ``:seed`` (default 0), so a run is reproducible.

=====================================  ===================================================
SPEC                                   effect on ingest requests
=====================================  ===================================================
``503:0.2[:seed]``                     that fraction answers 503 (batch not stored)
``429:0.1[:seed]``                     that fraction answers 429 with ``Retry-After: 1``
``lost:0.1[:seed]``                    that fraction is stored, then answers 503, as if
                                       the response were lost (at-least-once tests)
``latency:50ms``                       every request waits first (``ms`` or ``s``; a bare
                                       number is milliseconds)
``down:<seconds>[:<retry_after>]``     503 for that long after the receiver started,
                                       with ``Retry-After`` when given
``auth:403`` (or ``auth:401``)         answer that status to a valid key
``413:>N``                             413 when a batch has more than N rows
``reject:<field>=<glob>:<CODE>``       a row whose ``series_id`` or ``ts`` matches the
                                       glob is rejected with that per-row code, e.g.
                                       ``reject:series_id=EIA.PJM.*:VALUE_OUT_OF_RANGE``
``poison:<field>=<glob>``              a matching row makes the whole batch 422
                                       (``POISONED_ROW``), for bisection tests
=====================================  ===================================================

Checks run in this order: latency, down, auth, 503, 429, then the body is read;
``413:>N`` and ``poison`` come after parsing, ``reject`` with per-row validation, and
``lost`` after the batch is stored.
"""

from __future__ import annotations

import fnmatch
import math
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

ROW_FIELDS = ("series_id", "ts")


@dataclass(frozen=True)
class RowRule:
    """A glob over one row field; ``code`` is the per-row rejection code (None for poison)."""

    spec: str
    field: str
    pattern: re.Pattern[str]
    code: str | None = None

    def matches(self, row: dict) -> bool:
        """Whether the row's field matches the glob."""
        value = row.get(self.field)
        return isinstance(value, str) and self.pattern.match(value) is not None


@dataclass
class Chance:
    """A seeded coin: ``hit()`` is true for about ``fraction`` of the calls."""

    spec: str
    fraction: float
    rng: random.Random

    def hit(self) -> bool:
        """Draw once."""
        return self.rng.random() < self.fraction


@dataclass(frozen=True)
class Gate:
    """An answer given before the body is read: status, error code, message, headers."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Faults:
    """The parsed set of faults one receiver applies (empty means none)."""

    unavailable: list[Chance] = field(default_factory=list)
    rate_limited: list[Chance] = field(default_factory=list)
    lost: list[Chance] = field(default_factory=list)
    latency: float = 0.0
    down_for: float = 0.0
    down_retry_after: int | None = None
    auth_status: int | None = None
    max_rows: int | None = None
    rejects: list[RowRule] = field(default_factory=list)
    poisons: list[RowRule] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> Faults:
        """Faults from CLI strings; ``ValueError`` names the spec that is wrong."""
        faults = cls()
        for spec in specs:
            try:
                faults._add(spec.strip())
            except (ValueError, IndexError, re.error) as exc:
                raise ValueError(f"bad --fault {spec!r}: {exc}") from None
        return faults

    def start(self) -> None:
        """Restart the ``down`` clock (called when the app is created)."""
        self.started = time.monotonic()

    def gate(self) -> Gate | None:
        """The answer to give before reading the body, if a fault fires."""
        remaining = self.down_for - (time.monotonic() - self.started)
        if remaining > 0:
            headers = {}
            if self.down_retry_after is not None:
                headers["Retry-After"] = str(self.down_retry_after)
            return Gate(503, "UNAVAILABLE", "fault: receiver is down", headers)
        if self.auth_status == 401:
            return Gate(401, "UNAUTHORIZED", "fault: key refused", {"WWW-Authenticate": "Bearer"})
        if self.auth_status == 403:
            return Gate(403, "FORBIDDEN", "fault: key may not ingest")
        if any(chance.hit() for chance in self.unavailable):
            return Gate(503, "UNAVAILABLE", "fault: random 503")
        if any(chance.hit() for chance in self.rate_limited):
            return Gate(429, "RATE_LIMITED", "fault: slow down", {"Retry-After": "1"})
        return None

    def too_many(self, rows: int) -> bool:
        """Whether ``413:>N`` refuses a batch of ``rows``."""
        return self.max_rows is not None and rows > self.max_rows

    def poisoned(self, rows: list) -> int | None:
        """Index of the first row a ``poison`` rule matches."""
        if not self.poisons:
            return None
        for index, row in enumerate(rows):
            if isinstance(row, dict) and any(rule.matches(row) for rule in self.poisons):
                return index
        return None

    def rejection(self, row: dict) -> RowRule | None:
        """The first ``reject`` rule that matches the row."""
        for rule in self.rejects:
            if rule.matches(row):
                return rule
        return None

    def lose_response(self) -> bool:
        """Whether to answer 503 after storing the batch."""
        return any(chance.hit() for chance in self.lost)

    def _add(self, spec: str) -> None:
        kind, _, rest = spec.partition(":")
        if kind in ("503", "429", "lost"):
            target = {"503": self.unavailable, "429": self.rate_limited, "lost": self.lost}[kind]
            target.append(_chance(spec, rest))
        elif kind == "latency":
            self.latency = _duration(rest)
        elif kind == "down":
            seconds, _, retry_after = rest.partition(":")
            self.down_for = float(seconds)
            self.down_retry_after = int(retry_after) if retry_after else None
        elif kind == "auth":
            if rest not in ("401", "403"):
                raise ValueError("auth takes 401 or 403")
            self.auth_status = int(rest)
        elif kind == "413":
            self.max_rows = int(rest.removeprefix(">"))
        elif kind == "reject":
            match, _, code = rest.rpartition(":")
            if not code or not match:
                raise ValueError("reject takes <field>=<glob>:<CODE>")
            self.rejects.append(_rule(spec, match, code))
        elif kind == "poison":
            self.poisons.append(_rule(spec, rest, None))
        else:
            raise ValueError(f"unknown fault kind {kind!r}")


def _chance(spec: str, rest: str) -> Chance:
    fraction, _, seed = rest.partition(":")
    value = float(fraction)
    if not 0.0 <= value <= 1.0:
        raise ValueError("fraction must be between 0 and 1")
    return Chance(spec, value, random.Random(int(seed) if seed else 0))


def _duration(text: str) -> float:
    text = text.strip().lower()
    if text.endswith("ms"):
        seconds = float(text[:-2]) / 1000
    elif text.endswith("s"):
        seconds = float(text[:-1])
    else:
        seconds = float(text) / 1000
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text}: a duration is a finite number >= 0 (ms or s)")
    return seconds


def _rule(spec: str, match: str, code: str | None) -> RowRule:
    name, sep, glob = match.partition("=")
    if not sep or name not in ROW_FIELDS:
        raise ValueError(f"field must be one of {', '.join(ROW_FIELDS)}")
    return RowRule(spec, name, re.compile(fnmatch.translate(glob)), code)
