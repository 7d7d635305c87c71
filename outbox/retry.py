"""The one retry policy, built from configuration and used by every network stage.

Retry decides by the error's marker (:class:`~outbox.errors.TransientError`), never
by ad-hoc checks at call sites. A ``retry_after`` carried by the error (HTTP 429 or
503 with ``Retry-After``) is honoured, capped by ``max_wait``. With a ``deadline`` the
loop never sleeps past it: a wait (or a ``Retry-After``) that would end after the
deadline gives up at once, and the caller decides when to try again. Tests build
policies with zero waits so nothing sleeps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, TypeVar

import tenacity
from tenacity.stop import stop_base

from outbox.errors import TransientError

if TYPE_CHECKING:
    from outbox.config import RetryConfig

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    ``attempts`` counts the first try; ``initial``/``maximum`` bound the exponential
    backoff (with full jitter); ``max_wait`` caps a server-requested ``Retry-After``;
    ``deadline`` (seconds, 0 = none) bounds the whole retry loop, sleeps included.
    """

    attempts: int = 5
    initial: float = 1.0
    maximum: float = 60.0
    max_wait: float = 300.0
    deadline: float = 0.0

    @classmethod
    def no_wait(cls, attempts: int = 3) -> RetryPolicy:
        """A policy for tests: same attempts, no sleeping."""
        return cls(attempts=attempts, initial=0.0, maximum=0.0, max_wait=0.0)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# Where the wait planned for an attempt is kept on tenacity's RetryCallState.
_PLANNED = "_outbox_planned_wait"


def _wait(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    """The wait before the next try, drawn once per attempt: the stop check
    (:class:`_StopPast`) and tenacity's sleep get the same jittered value whichever asks
    first (tenacity before 8.3 checks the stop before computing the wait)."""

    def draw(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        if asked is not None:
            return min(float(asked), policy.max_wait)
        ceiling = min(policy.maximum, policy.initial * (2 ** (state.attempt_number - 1)))
        return random.uniform(0, ceiling) if ceiling > 0 else 0.0

    def compute(state: tenacity.RetryCallState) -> float:
        planned = getattr(state, _PLANNED, None)
        if planned is not None and planned[0] == state.attempt_number:
            wait: float = planned[1]
            return wait
        wait = draw(state)
        setattr(state, _PLANNED, (state.attempt_number, wait))
        return wait

    return compute


class _StopPast(stop_base):
    """Stop when the next try would start after ``deadline``: the server's ``Retry-After``
    counts in full (the wait may cap it, but the server will not answer sooner).

    The wait is asked for here (the value tenacity then sleeps, see :func:`_wait`) rather
    than read from ``state.upcoming_sleep``, which tenacity sets before the stop check
    only from 8.3 on."""

    def __init__(self, deadline: float, wait: Callable[[tenacity.RetryCallState], float]) -> None:
        self.deadline = deadline
        self.wait = wait

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        upcoming = float(asked) if asked is not None else self.wait(state)
        return (state.seconds_since_start or 0.0) + upcoming > self.deadline


def make_retrying(
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> tenacity.Retrying:
    """A tenacity ``Retrying`` that retries only :class:`TransientError` and re-raises it."""
    wait = _wait(policy)
    stop: stop_base = tenacity.stop_after_attempt(max(1, policy.attempts))
    if policy.deadline > 0:
        stop = stop | _StopPast(policy.deadline, wait)
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        stop=stop,
        wait=wait,
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )


def call_with_retry(policy: RetryPolicy, fn: Callable[[], T], **kwargs: object) -> T:
    """Run ``fn`` under ``policy``; the last transient error propagates when it gives up."""
    return make_retrying(policy, **kwargs)(fn)  # type: ignore[arg-type]


def retry_policy(cfg: RetryConfig, deadline: float = 0.0) -> RetryPolicy:
    """The RetryPolicy for one configured retry section."""
    return RetryPolicy(
        attempts=cfg.attempts,
        initial=cfg.initial_backoff_seconds,
        maximum=cfg.max_backoff_seconds,
        max_wait=cfg.max_retry_after_seconds,
        deadline=deadline,
    )
