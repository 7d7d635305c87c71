"""The receiver as a subprocess: start, ingest, read back, SIGKILL, restart, stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from factories import wire_observation

from outbox.errors import SinkTransientError
from outbox.sample.receiver import receiver_batches, receiver_rows, running_receiver
from outbox.sinks.gridpulse import GridPulseClient, batch_id_of, encode_batch


def send(client: GridPulseClient, rows: list[dict]):
    batch_id = batch_id_of((r["series_id"], r["ts"], r["revision"]) for r in rows)
    return client.post_batch(batch_id, encode_batch(batch_id, rows))


def test_running_receiver_survives_kill_and_restart(tmp_path: Path) -> None:
    with (
        running_receiver(tmp_path, api_key="proc-key") as receiver,
        httpx.Client(timeout=10.0) as http,
    ):
        assert receiver.base_url.startswith("http://127.0.0.1:") and receiver.port > 0
        assert receiver.db_path == tmp_path / "receiver.db"
        client = GridPulseClient(http, receiver.base_url, "proc-key")
        assert client.health()
        assert (
            send(client, [wire_observation(0), wire_observation(1, "EIA.SPP.demand")]).accepted == 2
        )

        port, pid = receiver.port, receiver.pid
        receiver.kill()
        assert not receiver.running and receiver.proc.returncode == -signal.SIGKILL
        with pytest.raises(SinkTransientError):
            send(client, [wire_observation(2)])

        receiver.restart()
        assert receiver.running and receiver.pid != pid
        assert receiver.port == port  # the port was free again
        assert (
            send(
                client, [wire_observation(2), wire_observation(0, value=9.0, revision="r0-9.0")]
            ).accepted
            == 2
        )

        assert receiver_rows(receiver.base_url, "proc-key") == {
            ("EIA.PJM.demand", "2025-08-22T00:00:00Z"): (9.0, "good", "r0-9.0"),
            ("EIA.PJM.demand", "2025-08-22T02:00:00Z"): (1002.0, "good", "r2"),
            ("EIA.SPP.demand", "2025-08-22T01:00:00Z"): (1001.0, "good", "r1"),
        }
        batches = receiver_batches(receiver.db_path)
        assert len(batches) == 2
        assert all(b["times_seen"] == 1 and b["rows"] == 2 for b in batches.values())
        assert "POST /api/v1/data/observations 200 rows=2" in receiver.output()
        assert "proc-key" not in receiver.output()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it
    assert not receiver.running and receiver.proc.returncode in (0, -signal.SIGTERM)


def test_running_receiver_passes_faults_and_catalogue(tmp_path: Path) -> None:
    with (
        running_receiver(
            tmp_path,
            faults=["reject:ts=*T01:00:00Z:STALE"],
            catalog="fixed",
            seed_series=["EIA.PJM.demand"],
        ) as receiver,
        httpx.Client(timeout=10.0) as http,
    ):
        client = GridPulseClient(http, receiver.base_url, receiver.api_key)
        result = send(
            client,
            [wire_observation(0), wire_observation(1), wire_observation(2, "EIA.SPP.demand")],
        )
        assert result.accepted == 1
        assert [(r.index, r.code) for r in result.rejected] == [(1, "STALE"), (2, "UNKNOWN_SERIES")]
        assert list(receiver_rows(receiver.base_url, "test-key")) == [
            ("EIA.PJM.demand", "2025-08-22T00:00:00Z")
        ]


@pytest.mark.parametrize("entry", ["cli", "module"])
def test_a_taken_port_or_foreign_address_is_one_line_and_exit_1(tmp_path: Path, entry: str) -> None:
    command = (
        [sys.executable, "-m", "outbox", "receiver"]
        if entry == "cli"
        else [sys.executable, "-m", "outbox.receiver"]
    )
    with running_receiver(tmp_path, api_key="proc-key") as receiver:
        for host, port, why in (
            ("127.0.0.1", receiver.port, "address already in use"),
            ("192.0.2.1", receiver.port, "cannot assign requested address"),  # TEST-NET-1
        ):
            args = ["--db", str(tmp_path / "other.db"), "--host", host, "--port", str(port)]
            done = subprocess.run(
                [*command, *args, "--api-key", "proc-key"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            (line,) = done.stderr.splitlines()
            assert line.endswith(f"receiver: cannot listen on {host}:{port}: {why}"), line
            assert "proc-key" not in done.stdout + done.stderr
        assert receiver.running  # the first receiver serves on, untouched
    assert not (tmp_path / "other.db").exists()  # nothing created


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_listening_on_every_interface_is_said_in_a_warning(
    tmp_path: Path, host: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning comes from serve() itself; the socket is bound on 127.0.0.1 here so
    that no test listens beyond this host, and the server is not run."""
    from outbox.receiver import server

    bound: list[tuple[str, int]] = []

    def loopback(asked: str, port: int):  # type: ignore[no-untyped-def]
        bound.append((asked, port))
        return real_bind("127.0.0.1", 0)

    real_bind = server.bind
    monkeypatch.setattr(server, "bind", loopback)
    monkeypatch.setattr(server._Server, "run", lambda self, sockets=None: None)
    with caplog.at_level("WARNING", logger="outbox.receiver"):
        server.serve(str(tmp_path / "r.db"), host=host, port=0, api_key="proc-key")
    assert bound == [(host, 0)]
    (record,) = [r for r in caplog.records if r.name == "outbox.receiver"]
    assert record.levelname == "WARNING"
    assert f"receiver listening on every interface ({host})" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="outbox.receiver"):
        server.serve(str(tmp_path / "r.db"), host="127.0.0.1", port=0, api_key="proc-key")
    assert [r for r in caplog.records if r.name == "outbox.receiver"] == []
