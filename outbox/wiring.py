"""Build what a command needs from the config: HTTP clients, the EIA source, the GridPulse
client and sink, the store, and the refresh after a stage run.

The heavy imports (httpx, the clients, the stages) live inside the builders, so that
``outbox status`` and the other reading commands start without them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol

from outbox import USER_AGENT
from outbox.config import Config
from outbox.errors import ConfigError, OutboxError
from outbox.logsetup import log_scope
from outbox.store import Store

if TYPE_CHECKING:
    import httpx

    from outbox.ports import Sink, Source
    from outbox.sinks.gridpulse import GridPulseClient, GridPulseSink
    from outbox.sinks.postgres import PostgresSink
    from outbox.sources.eia import EIAClient
    from outbox.status.remote import LatestSource

_P = ParamSpec("_P")
log = logging.getLogger(__name__)

DOCTOR_TIMEOUT_SECONDS = 20.0


class _HttpSection(Protocol):
    """A config section that reaches a server (``eia``, ``gridpulse``)."""

    @property
    def timeout_seconds(self) -> float: ...
    @property
    def connect_timeout_seconds(self) -> float: ...
    @property
    def verify_tls(self) -> bool: ...


def http_client(timeout: float, connect: float, verify: bool) -> httpx.Client:
    """One pooled HTTP client for a run."""
    import httpx

    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=connect),
        headers={"User-Agent": USER_AGENT},
        verify=verify,
        follow_redirects=False,
    )


def http_for(section: _HttpSection) -> httpx.Client:
    """The HTTP client with ``section``'s timeouts and TLS verification."""
    return http_client(section.timeout_seconds, section.connect_timeout_seconds, section.verify_tls)


def doctor_http(verify: bool) -> httpx.Client:
    """The HTTP client of ``outbox doctor``'s reachability checks."""
    return http_client(DOCTOR_TIMEOUT_SECONDS, DOCTOR_TIMEOUT_SECONDS / 2, verify)


def gridpulse_client(config: Config, http: httpx.Client) -> GridPulseClient:
    """The GridPulse ingest client (needs the key)."""
    from outbox.sinks.gridpulse import GridPulseClient

    g = config.gridpulse
    return GridPulseClient(http, g.base_url, config.require_gridpulse_key(), gzip=g.gzip)


def open_store(config: Config, *, create: bool) -> Store:
    """The configured outbox, read-write; without ``create`` a missing one is an error
    (exit 2). The reading commands open it read-only (``status.open_store``)."""
    return Store.open(config.database, create=create)


def after_run(config: Config) -> None:
    """Refresh ``metrics_path`` and ``report_path`` and push the alerts, after a stage run."""
    from outbox.report import write_run_report
    from outbox.status import write_run_metrics

    write_run_metrics(config)
    write_run_report(config)
    if config.alerts.urls:
        from outbox.alerts import after_run as alert_after_run

        alert_after_run(config)


def observed(
    stage: str,
) -> Callable[[Callable[Concatenate[Config, _P], int]], Callable[Concatenate[Config, _P], int]]:
    """Wrap a stage command: its log lines carry ``stage`` (and the run id the pipeline
    binds), and :func:`after_run` follows it, whether it succeeded or not."""

    def wrap(
        command: Callable[Concatenate[Config, _P], int],
    ) -> Callable[Concatenate[Config, _P], int]:
        def run(config: Config, /, *args: _P.args, **kwargs: _P.kwargs) -> int:
            with log_scope(stage=stage):
                try:
                    return command(config, *args, **kwargs)
                finally:
                    after_run(config)

        # functools.wraps, kept as the function it is (its _Wrapped type loses Concatenate)
        functools.update_wrapper(run, command)
        return run

    return wrap


def gridpulse_sink(config: Config, http: httpx.Client) -> GridPulseSink:
    """The GridPulse ingest v1 sink (needs the key)."""
    from outbox.sinks.gridpulse import GridPulseSink

    return GridPulseSink(gridpulse_client(config, http))


def postgres_sink(config: Config) -> PostgresSink:
    """The direct sink into GridPulse's PostgreSQL database (``sink: {kind: postgres}``)."""
    from outbox.sinks.postgres import PostgresSink

    s = config.sink
    return PostgresSink(
        s.require_url(),
        catalog=s.catalog,
        connect_timeout_seconds=s.connect_timeout_seconds,
        statement_timeout_seconds=s.statement_timeout_seconds,
    )


def require_sink(config: Config) -> None:
    """The configured sink's credentials, or a ConfigError (exit 2) saying how to set them."""
    if config.sink.kind == "postgres":
        config.sink.require_url()
        from outbox.sinks.postgres import EXTRA_HINT, load_driver

        try:
            load_driver()
        except OutboxError:  # like the receiver: a missing extra is a config error
            raise ConfigError(f"sink.kind: postgres needs psycopg 3: {EXTRA_HINT}") from None
    else:
        config.require_gridpulse_key()


def sink_where(config: Config) -> str:
    """Where the configured sink delivers, credentials masked (for messages)."""
    from outbox.redact import redact

    if config.sink.kind == "postgres":
        return redact(config.sink.require_url())
    return redact(config.gridpulse.base_url)


@contextmanager
def configured_sink(config: Config) -> Iterator[Sink]:
    """The sink ``outbox send`` delivers to, by ``sink.kind``; closed when the block ends."""
    if config.sink.kind == "postgres":
        with closing(postgres_sink(config)) as sink:
            yield sink
        return
    with http_for(config.gridpulse) as http:
        yield gridpulse_sink(config, http)


@contextmanager
def remote_latest(config: Config) -> Iterator[LatestSource]:
    """What ``status --remote`` compares with: the configured sink's latest per series."""
    if config.sink.kind == "postgres":
        with closing(postgres_sink(config)) as sink:
            yield sink
        return
    with http_for(config.gridpulse) as http:
        yield gridpulse_client(config, http)


# ---------------------------------------------------------------------------------
# fetch: sources
# ---------------------------------------------------------------------------------


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
        burst=e.max_burst,
        max_in_flight=e.max_in_flight,
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
    with http_client(e.timeout_seconds, e.connect_timeout_seconds, e.verify_tls) as http:
        yield eia_client(config, http)


def gridpulse_series(config: Config) -> list[Mapping[str, object]] | None:
    """GridPulse's series listing, where a new outbox starts each stream
    (:func:`~outbox.stages.plan.first_starts`), from the configured sink (the ingest API
    or the database); None when it is not configured or cannot be asked (history start
    applies)."""
    if config.sink.kind == "postgres":
        sink = postgres_sink(config)
        try:
            return sink.list_series()
        except OutboxError as exc:
            log.info("gridpulse latest unavailable, starting at history_start error=%s", exc)
            return None
        finally:
            sink.close()
    if config.gridpulse.api_key is None:
        return None
    g = config.gridpulse
    try:
        with http_client(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http:
            return gridpulse_client(config, http).list_series()
    except OutboxError as exc:
        log.info("gridpulse latest unavailable, starting at history_start error=%s", exc)
        return None
