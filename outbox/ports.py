"""The seams between the stages and the outside world, and the plain values they hand over.

Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# ---------------------------------------------------------------------------------
# Sink: where the send stage delivers rows (outbox.sinks.gridpulse: GridPulse ingest v1)
# ---------------------------------------------------------------------------------
#
# The send stage (outbox.stages.send) claims rows, hands them to a sink in batches and
# settles each row by the sink's answer. It knows nothing of the sink's wire format or
# transport; what it does on each answer is decided by the value or error the sink gives:
#
#   Outcome                 every row accounted for: rejected rows are dead with their
#                           code, the others acknowledged
#   SinkTransientError      retried with backoff inside the run's budget, then the rows
#                           are deferred; ``retry_after`` is honoured, ``rows_suspect``
#                           says the sink was up and failed on these rows
#   PayloadTooLargeError    the batch is halved (a single row too large is dead)
#   BatchRejectedError      the batch is bisected to the rows refused (``reason``)
#   ProtocolError           an answer that does not account for the batch: no row
#                           changes state and the run stops
#   any other SinkError     the run stops, no row changes state


class SendRow(Protocol):
    """One claimed row as the send stage hands it to a sink (the store's claimed rows
    have these fields)."""

    @property
    def series_id(self) -> str: ...
    @property
    def ts(self) -> str: ...
    @property
    def value(self) -> float | None: ...
    @property
    def units(self) -> str: ...
    @property
    def quality_flag(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def ba(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def subtype(self) -> str | None: ...


@dataclass(frozen=True)
class Batch:
    """Rows to deliver in one request, oldest first.

    ``source_data`` (when the run sends it) holds each row's EIA source row, in the
    order of ``rows``; ``None`` where a row has none.
    """

    rows: Sequence[SendRow]
    source_data: Sequence[Mapping[str, Any] | None] | None = None


@dataclass(frozen=True)
class Prepared:
    """A batch as a sink encoded it ahead of sending (:meth:`Sink.prepare`).

    ``size`` is what the run counts as its ``bytes`` for each attempt; ``payload`` is
    the sink's own encoding, opaque to the stage.
    """

    batch: Batch
    size: int = 0
    payload: Any = None


@dataclass(frozen=True)
class Refusal:
    """One row of a batch the sink refused for good: its position in the batch, why."""

    index: int
    code: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """A sink's answer that accounts for every row of its batch: ``accepted`` rows taken,
    the ``rejected`` ones (distinct indexes) refused; together, the rows sent."""

    accepted: int
    rejected: tuple[Refusal, ...] = ()


class Sink(Protocol):
    """Where the send stage delivers rows; one implementation per destination.

    A sink never retries (the stage retries by the errors' markers) and never touches the
    store. Each method raises only :class:`~outbox.errors.SinkError` subclasses.
    """

    def prepare(self, batch: Batch) -> Prepared:
        """Encode ``batch`` for :meth:`send` (may run on another thread than send)."""
        ...

    def send(self, prepared: Prepared) -> Outcome:
        """Deliver one prepared batch, one attempt; an answer that does not account for
        the batch raises :class:`~outbox.errors.ProtocolError`."""
        ...

    def health(self) -> bool:
        """Whether the sink says it is up (rows deferred while it was down go again)."""
        ...
