"""A GridPulse stand-in on 127.0.0.1 whose answer to each ingest is a test's function.

For answers the reference receiver never gives (an inconsistent acknowledgement, a 400
to everything, a long ``Retry-After``)::

    def answer(batch: dict) -> Reply:
        return Reply(200, {"batch_id": batch["batch_id"], "accepted": 0, "rejected": []})

    with scripted_gridpulse(answer) as gp:
        ...  # point the worker at gp.base_url; gp.batches holds every decoded request body

``GET /api/v1/health`` answers ``{"status": "ok"}``; every other path 404. The server runs
on a thread of the test process; the worker under test is usually a subprocess.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

INGEST_PATH = "/api/v1/data/observations"
HEALTH_PATH = "/api/v1/health"


@dataclass(frozen=True)
class Reply:
    """One answer: status, JSON body (or raw bytes), extra headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


Answer = Callable[[dict[str, Any]], Reply]


class ScriptedGridPulse:
    """The running server: ``base_url``, and ``batches``, the decoded ingest bodies in order."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.batches: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> None:
        """Serve on the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def ingest(self, raw: bytes, encoding: str) -> Reply:
        """Record one ingest body and compute its reply."""
        batch = json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
        with self._lock:
            self.batches.append(batch)
        return self.answer(batch)


def _handler(gp: ScriptedGridPulse) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != INGEST_PATH:
                self._reply(Reply(404, {"error": {"code": "NOT_FOUND", "message": "no"}}))
                return
            self._reply(gp.ingest(raw, self.headers.get("Content-Encoding", "")))

        def do_GET(self) -> None:
            if self.path == HEALTH_PATH:
                self._reply(Reply(200, {"status": "ok"}))
            else:
                self._reply(Reply(404, {"error": {"code": "NOT_FOUND", "message": "no"}}))

        def _reply(self, reply: Reply) -> None:
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


@contextlib.contextmanager
def scripted_gridpulse(answer: Answer) -> Iterator[ScriptedGridPulse]:
    """A started :class:`ScriptedGridPulse`, stopped when the block exits."""
    gp = ScriptedGridPulse(answer)
    gp.start()
    try:
        yield gp
    finally:
        gp.stop()
