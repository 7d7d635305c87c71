"""Run the reference receiver under uvicorn (one process, httptools, our own access log)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence

import uvicorn

from outbox.receiver.app import create_app
from outbox.receiver.db import to_url
from outbox.receiver.faults import Faults

DEFAULT_PORT = 8700
LISTENING = "receiver listening on http://{host}:{port}"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("outbox.receiver")


class ReceiverStartError(Exception):
    """The receiver could not start serving (the address is taken or not this host's)."""


class _Server(uvicorn.Server):
    """A uvicorn server that prints the bound address once it accepts connections."""

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        print(LISTENING.format(host=host, port=port), flush=True)


def serve(
    db: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str = "",
    catalog: str = "auto",
    faults: Sequence[str] = (),
    log_level: str = "info",
) -> None:
    """Serve the receiver until interrupted.

    ``db`` is a SQLite file path or a SQLAlchemy URL; ``api_key`` defaults to
    ``$GRIDPULSE_API_KEY``; ``faults`` are ``--fault`` specs (see
    :mod:`outbox.receiver.faults`). Port 0 picks a free port; either way the line
    ``receiver listening on http://HOST:PORT`` is printed to stdout once ready.
    """
    api_key = api_key or os.environ.get("GRIDPULSE_API_KEY", "")
    if not api_key:
        raise ValueError("the receiver needs an API key (--api-key or GRIDPULSE_API_KEY)")
    _configure_logging(log_level)
    parsed = Faults.parse(faults)
    sock = bind(host, port)  # first: a receiver that cannot listen creates no database
    try:
        app = create_app(to_url(db), api_key, catalog=catalog, faults=parsed)
    except BaseException:
        sock.close()
        raise
    if host in ("0.0.0.0", "::", ""):
        log.warning(
            "receiver listening on every interface (%s): anyone who can reach this host "
            "and holds the key can write to its database",
            host or "all",
        )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        workers=1,
        access_log=False,
        log_level=log_level,
        lifespan="on",
        log_config=None,
    )
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (SO_REUSEADDR, so a restarted
    receiver gets its port back); a taken or foreign address is one ReceiverStartError."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ReceiverStartError(
            f"cannot listen on {host}:{port}: {str(exc.strerror).lower()}"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ReceiverStartError(
            f"cannot listen on {host}:{port}: {(exc.strerror or str(exc)).lower()}"
        ) from None
    sock.set_inheritable(True)
    return sock


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
