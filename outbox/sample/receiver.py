"""Run the reference receiver as a real subprocess for end-to-end and crash tests.

Usage::

    from outbox.sample.receiver import receiver_batches, receiver_rows, running_receiver

    with running_receiver(tmp_path, faults=["503:0.2"]) as receiver:
        ...  # point the worker at receiver.base_url with receiver.api_key
        receiver.kill()      # SIGKILL, as a crash
        receiver.restart()   # same database, same port when it is free
        rows = receiver_rows(receiver.base_url, receiver.api_key)
    batches = receiver_batches(receiver.db_path)

``running_receiver(tmp_path, db="postgresql://...")`` runs it on that PostgreSQL database
instead of ``tmp_path/receiver.db``; ``receiver.db_path`` is then that URL.

The receiver is ``python -m outbox.receiver`` on 127.0.0.1, port 0 at first start. Its
stdout and stderr go to files in ``tmp_path`` (``receiver-N.out``/``.err``) so that a
failing test can show them and no pipe can fill up and stall the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_LISTENING = re.compile(r"receiver listening on (http://[^\s:]+:(\d+))")
_EVER = ("0001-01-01T00:00:00Z", "9999-12-31T23:00:00Z")

RowKey = tuple[str, str]
RowValue = tuple[float | None, str, str]


class ReceiverStartError(RuntimeError):
    """The receiver process exited or stayed silent instead of listening."""


class Receiver:
    """A receiver subprocess: ``base_url``, ``db_path``, ``kill()``, ``restart()``, ``stop()``."""

    def __init__(
        self,
        workdir: Path,
        *,
        api_key: str,
        faults: Sequence[str],
        catalog: str,
        seed_series: Sequence[str] = (),
        db_path: Path | str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.api_key = api_key
        self.faults = tuple(faults)
        self.catalog = catalog
        self.seed_series = tuple(seed_series)
        self.db_path: Path | str = db_path or self.workdir / "receiver.db"
        self.port = 0
        self.base_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._out: Path | None = None
        self._err: Path | None = None

    def start(self) -> None:
        """Start the process and wait for its listening line; prefers the previous port."""
        if self.port:
            try:
                self._launch(self.port)
                return
            except ReceiverStartError:
                pass  # the port was taken meanwhile: take any free one
        self._launch(0)

    def kill(self) -> None:
        """SIGKILL the process (a crash: no shutdown, no flush) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (graceful uvicorn shutdown), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        """Stop (if still running) and start again on the same database."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The current process id, if started."""
        return None if self.proc is None else self.proc.pid

    def url(self, path: str) -> str:
        """An absolute URL on the receiver."""
        return self.base_url + path

    def output(self) -> str:
        """Everything the current process wrote to stdout and stderr so far."""
        parts = [path.read_text(errors="replace") for path in (self._out, self._err) if path]
        return "\n".join(parts)

    def _command(self, port: int) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "outbox.receiver",
            "--db",
            str(self.db_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--catalog",
            self.catalog,
        ]
        for spec in self.faults:
            command += ["--fault", spec]
        if self.seed_series and self.starts == 1:  # the catalogue persists in the database
            command += ["--seed-series", ",".join(self.seed_series)]
        return command

    def _launch(self, port: int) -> None:
        self.starts += 1
        self._out = self.workdir / f"receiver-{self.starts}.out"
        self._err = self.workdir / f"receiver-{self.starts}.err"
        # The key goes through the environment, not argv, so `ps` does not show it.
        env = {**os.environ, "GRIDPULSE_API_KEY": self.api_key, "PYTHONUNBUFFERED": "1"}
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                self._command(port),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )
        self._await_listening()

    def _await_listening(self) -> None:
        assert self.proc is not None and self._out is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = _LISTENING.search(self._out.read_text(errors="replace"))
            if match:
                self.base_url, self.port = match.group(1), int(match.group(2))
                return
            if self.proc.poll() is not None:
                raise ReceiverStartError(
                    f"receiver exited with {self.proc.returncode}:\n{self.output()}"
                )
            time.sleep(0.02)
        self.kill()
        raise ReceiverStartError(
            f"receiver did not listen within {START_TIMEOUT}s:\n{self.output()}"
        )


@contextlib.contextmanager
def running_receiver(
    tmp_path: Path,
    *,
    api_key: str = "test-key",
    faults: Sequence[str] = (),
    catalog: str = "auto",
    seed_series: Sequence[str] = (),
    db: str | None = None,
) -> Iterator[Receiver]:
    """A started receiver subprocess on 127.0.0.1, stopped when the block exits.

    ``db`` is a database URL (PostgreSQL); by default a SQLite file in ``tmp_path``.
    """
    receiver = Receiver(
        tmp_path,
        api_key=api_key,
        faults=faults,
        catalog=catalog,
        seed_series=seed_series,
        db_path=db,
    )
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def receiver_rows(base_url: str, api_key: str) -> dict[RowKey, RowValue]:
    """Every stored observation, read through the API: ``(series_id, ts) -> (value, flag, rev)``."""
    headers = {"Authorization": f"Bearer {api_key}"}
    rows: dict[RowKey, RowValue] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as http:
        listing = http.get("/api/v1/data/series")
        listing.raise_for_status()
        for series in listing.json()["series"]:
            series_id = series["series_id"]
            for obs in _pages(http, series_id):
                rows[(series_id, obs["ts"])] = (obs["value"], obs["quality_flag"], obs["revision"])
    return rows


def _pages(http: httpx.Client, series_id: str) -> Iterator[dict[str, Any]]:
    start: str | None = _EVER[0]
    while start is not None:
        response = http.get(
            f"/api/v1/data/series/{series_id}/observations",
            params={"start": start, "end": _EVER[1]},
        )
        response.raise_for_status()
        page = response.json()
        yield from page["observations"]
        start = page["next"]


def receiver_batches(db_path: Path | str) -> dict[str, dict[str, Any]]:
    """The receiver's ``batches`` table: ``batch_id -> {body_digest, times_seen, rows, ...}``.

    ``db_path`` is the receiver's SQLite file or its database URL.
    """
    query = "SELECT * FROM batches ORDER BY first_seen, batch_id"
    return {row["batch_id"]: row for row in receiver_query(db_path, query)}


def receiver_query(db_path: Path | str, query: str) -> list[dict[str, Any]]:
    """The rows of one read-only ``query`` on the receiver's database (a file or a URL)."""
    if "://" not in str(db_path):
        with contextlib.closing(sqlite3.connect(db_path, timeout=30.0)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(query)]
    from sqlalchemy import create_engine, text

    from outbox.receiver.db import to_url

    engine = create_engine(to_url(str(db_path)))
    try:
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(text(query)).mappings()]
    finally:
        engine.dispose()
