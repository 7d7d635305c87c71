"""Build what a command needs from the config: clients, sources and sinks of the outside world.

The heavy imports (httpx, the clients) live inside the builders, so that ``outbox status``
and the other reading commands start without them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outbox.config import Config
from outbox.errors import OutboxError

if TYPE_CHECKING:
    import httpx

    from outbox.ports import Source
    from outbox.sinks.gridpulse import GridPulseClient, GridPulseSink
    from outbox.sources.eia import EIAClient

log = logging.getLogger(__name__)


def gridpulse_client(config: Config, http: httpx.Client) -> GridPulseClient:
    """The GridPulse ingest client (needs the key)."""
    from outbox.sinks.gridpulse import GridPulseClient

    g = config.gridpulse
    return GridPulseClient(http, g.base_url, config.require_gridpulse_key(), gzip=g.gzip)


def gridpulse_sink(config: Config, http: httpx.Client) -> GridPulseSink:
    """The sink ``outbox send`` delivers to: GridPulse ingest v1 (needs the key)."""
    from outbox.sinks.gridpulse import GridPulseSink

    return GridPulseSink(gridpulse_client(config, http))


# ---------------------------------------------------------------------------------
# fetch: sources
# ---------------------------------------------------------------------------------


def _fetch_http(timeout: float, connect: float, verify: bool) -> httpx.Client:
    """One pooled HTTP client for a fetch run: the CLI's one builder (tests spy on it)."""
    from outbox.cli import http_client  # until the HTTP builder itself lives here

    return http_client(timeout, connect, verify)


def eia_client(config: Config, http: httpx.Client) -> EIAClient:
    """The EIA client for a live fetch (needs the key)."""
    from outbox.retry import retry_policy
    from outbox.sources.eia import EIAClient

    e = config.eia
    return EIAClient(
        http,
        e.base_url,
        config.require_eia_key(),
        page_length=e.page_length,
        retry=retry_policy(e.retry),
        max_per_second=e.max_requests_per_second,
        max_per_hour=e.max_requests_per_hour,
    )


@contextmanager
def fetch_source(config: Config, replay: Path | None = None) -> Iterator[Source]:
    """The source a fetch reads: the saved bodies under ``replay``, else the EIA API
    (its HTTP client closed when the block ends)."""
    if replay is not None:
        from outbox.sources.replay import ReplaySource

        yield ReplaySource(replay)
        return
    e = config.eia
    with _fetch_http(e.timeout_seconds, e.connect_timeout_seconds, e.verify_tls) as http:
        yield eia_client(config, http)


def gridpulse_series(config: Config) -> list[dict[str, Any]] | None:
    """GridPulse's series listing, where a new outbox starts each stream
    (:func:`~outbox.stages.plan.first_starts`); None when GridPulse is not configured or
    cannot be asked (history start applies)."""
    if config.gridpulse.api_key is None:
        return None
    g = config.gridpulse
    try:
        with _fetch_http(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http:
            return gridpulse_client(config, http).list_series()
    except OutboxError as exc:
        log.info("gridpulse latest unavailable, starting at history_start error=%s", exc)
        return None
