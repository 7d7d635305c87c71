"""Build what a command needs from the config: the clients and sinks of the outside world.

The heavy imports (httpx, the clients) live inside the builders, so that ``outbox status``
and the other reading commands start without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from outbox.config import Config

if TYPE_CHECKING:
    import httpx

    from outbox.sinks.gridpulse import GridPulseClient, GridPulseSink


def gridpulse_client(config: Config, http: httpx.Client) -> GridPulseClient:
    """The GridPulse ingest client (needs the key)."""
    from outbox.sinks.gridpulse import GridPulseClient

    g = config.gridpulse
    return GridPulseClient(http, g.base_url, config.require_gridpulse_key(), gzip=g.gzip)


def gridpulse_sink(config: Config, http: httpx.Client) -> GridPulseSink:
    """The sink ``outbox send`` delivers to: GridPulse ingest v1 (needs the key)."""
    from outbox.sinks.gridpulse import GridPulseSink

    return GridPulseSink(gridpulse_client(config, http))
