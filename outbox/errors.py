"""The one exception tree of gridpulse-outbox.

Every error the package raises on purpose derives from :class:`OutboxError`. Two
markers decide what happens next, in one place (the retry policy in ``retry.py`` and
the CLI's exit-code mapping):

* :class:`TransientError` - may heal by itself (timeouts, 5xx, 429, connection
  errors). Retried with backoff inside the run's budget; then the run fails with
  exit code 1 and the next run goes on.
* :class:`TerminalError` - will not heal by retrying (bad key, bad route, a worker
  bug). Never retried; the run stops.

Tree::

    OutboxError                       exit 1
    +-- ConfigError (Terminal)        exit 2  bad config file, env or missing secret
    +-- UsageError (Terminal)         exit 2  bad command-line input
    +-- OutboxFullError (Terminal)    exit 4  max outbox size reached; nothing evicted
    +-- StoreError (Terminal)                 unreadable or inconsistent outbox
    |   +-- DiskFullError                     SQLITE_FULL or ENOSPC while writing it
    |   +-- NoOutboxError             exit 2  no outbox at the path; only fetch, db upgrade
    |                                         and doctor --reset create one
    +-- SourceError                           EIA v2 / replay source
    |   +-- SourceTransientError (Transient)  timeouts, 5xx, 429, truncated body
    |   +-- SourceFatalError (Terminal)       bad key, bad route/facet, bad shape
    +-- SinkError                             GridPulse ingest API
        +-- SinkTransientError (Transient)    5xx, timeouts, connection errors
        |   +-- RateLimitedError              429, carries retry_after seconds
        +-- SinkAuthError (Terminal)          401/403: stop, touch no row state
        +-- SinkConflictError (Terminal)      409: Idempotency-Key reused (a bug)
        +-- BatchRejectedError (Terminal)     400/422 for a whole batch: bisect
        +-- PayloadTooLargeError (Terminal)   413: halve the batch
        +-- ProtocolError (Terminal)          a 200 that does not account for the batch:
                                              no row changes state, the run stops
        +-- RejectsEverythingError (Terminal) 400/422 for every row tried: the run stops

    KeyboardInterrupt
    +-- Interrupted                   exit 128 + signal  SIGTERM (systemd stop) or SIGINT

:class:`Interrupted` is deliberately not an OutboxError: no ``except Exception`` may
swallow it. A run it stops records itself as failed; the transaction it lands in rolls
back, so every row keeps the state of the last commit.
"""

from __future__ import annotations

import signal


class OutboxError(Exception):
    """Root of every error the package raises on purpose."""

    exit_code: int = 1


class TransientError(OutboxError):
    """Marker: may succeed when retried later."""


class TerminalError(OutboxError):
    """Marker: retrying will not help."""


class ConfigError(TerminalError):
    """The configuration file, environment or a secret file is wrong."""

    exit_code = 2


class UsageError(TerminalError):
    """The command line asks for something impossible."""

    exit_code = 2


class OutboxFullError(TerminalError):
    """The outbox reached its configured maximum size; fetch refuses to grow it."""

    exit_code = 4


class StoreError(TerminalError):
    """The outbox database cannot be used as it is."""


class DiskFullError(StoreError):
    """The file system of the outbox is full (SQLite's SQLITE_FULL, or ENOSPC).

    The transaction that was writing rolled back, so nothing is half-written and every
    row keeps its state; the run fails (exit 1) and the next one, with space, goes on.
    """

    def __init__(self, path: object) -> None:
        super().__init__(f"disk full writing {path}: nothing lost, rerun when there is space")


class NoOutboxError(StoreError):
    """No outbox exists at the configured path, and this command does not create one."""

    exit_code = 2

    def __init__(self, path: object) -> None:
        super().__init__(
            f"no outbox at {path} (run `outbox fetch` or `outbox db upgrade` to create one)"
        )
        self.path = path


class SourceError(OutboxError):
    """Fetching from EIA (or a replay directory) failed."""


class SourceTransientError(SourceError, TransientError):
    """EIA timed out, answered 429/5xx, or sent a truncated body."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceFatalError(SourceError, TerminalError):
    """EIA refused the request for a reason retrying cannot fix, or the body is malformed."""


class SinkError(OutboxError):
    """Delivering to the GridPulse ingest API failed."""


class SinkTransientError(SinkError, TransientError):
    """GridPulse is down, slow or overloaded; ``status`` is the HTTP status if one came.

    ``rows_suspect``: the sink was up and failed on this very batch (GridPulse's 500,
    501, 505), so its rows keep their own backoff; otherwise the sink was unreachable or
    overloaded, and its rows go again as soon as it is healthy.
    """

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        status: int | None = None,
        rows_suspect: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.rows_suspect = rows_suspect


class RateLimitedError(SinkTransientError):
    """GridPulse answered 429; ``retry_after`` holds the seconds it asked for."""


class SinkAuthError(SinkError, TerminalError):
    """GridPulse refused the credentials (401) or the permission (403)."""


class SinkConflictError(SinkError, TerminalError):
    """GridPulse saw the same Idempotency-Key with a different body (409)."""


class BatchRejectedError(SinkError, TerminalError):
    """GridPulse rejected a whole batch as malformed (400) or invalid (422)."""

    def __init__(self, message: str, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def reason(self) -> str:
        """The code the refused rows are recorded dead with: the sink's error code, else
        ``HTTP_<status>``."""
        return self.code or (f"HTTP_{self.status}" if self.status is not None else "REJECTED")


class PayloadTooLargeError(SinkError, TerminalError):
    """GridPulse answered 413: the batch must be smaller."""


class ProtocolError(SinkError, TerminalError):
    """GridPulse answered 200 with something that is not a consistent acknowledgement.

    No row of the batch changes state (not acked, not dead, not deferred); the run stops,
    since a GridPulse that answers wrongly answers the same way again, and the next send
    retries the batch.
    """


class RejectsEverythingError(SinkError, TerminalError):
    """GridPulse refused row after row alone with one code and accepted none, and then a
    row from outside that run alone with the same code: the circuit breaker
    (``gridpulse.circuit_breaker_rows``) stops the run, the rest stays pending."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(KeyboardInterrupt):
    """A signal asked the process to stop; ``signum`` is the signal (exit 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
