"""Security: keys never leak; the receiver demands its bearer key; TLS is verified unless
the config explicitly says otherwise, and status warns when it does.

Known keys (the right ones and wrong ones) go through successful and failing fetches and
sends with debug logging, in logfmt and JSON; then every output of ``runs``, ``status``
(table, ``--json``, ``--check``, ``--metrics``), ``config`` and ``show``, the metrics file,
and the bytes of the database, its WAL and its index are scanned for them.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from durability import KEY_EIA, KEY_GP, outbox, outbox_env
from typer.testing import CliRunner

from outbox.cli import app
from outbox.config import Config
from outbox.sample import sample_dir
from outbox.sample.receiver import Receiver, running_receiver
from outbox.store import Store
from outbox.testing import fake_eia as fake_eia_mod
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import read_rows

WRONG_EIA = "wrong-eia-key-77c1f0a9e3"
WRONG_GP = "wrong-gridpulse-key-5d2b8e41"
KEYS = (KEY_EIA, KEY_GP, WRONG_EIA, WRONG_GP)
BACKFILL = ("fetch", "--start", "2025-08-21", "--end", "2025-08-21T23")


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with running_receiver(tmp_path_factory.mktemp("receiver"), api_key=KEY_GP) as r:
        yield r


def invoke(args: list[str], env: dict[str, str | None]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def leaks(text: str | bytes) -> list[str]:
    """The known keys found in ``text``."""
    data = text.encode() if isinstance(text, str) else text
    return [k for k in KEYS if k.encode() in data]


def test_no_key_in_any_output_run_history_metrics_or_database(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = tmp_path / "outbox.db"
    outputs: dict[str, str] = {}
    with FakeEIA(read_rows(sample_dir()), api_key=KEY_EIA) as fake:
        env = outbox_env(db, receiver=receiver, eia_base=fake.base_url)

        def run(name: str, *args: str, expect: int, **extra: str) -> None:
            done = outbox(*args, env={**env, **extra})
            outputs[name] = done.stdout + done.stderr
            assert done.returncode == expect, outputs[name]

        run("fetch", "-v", *BACKFILL, expect=0)
        run("send", "-v", "send", expect=0)
        # incremental fetches (a repeated backfill would resume past its finished chunks)
        run("fetch-wrong-key", "-v", "fetch", expect=1, EIA_API_KEY=WRONG_EIA)
        fake.fail_next(
            3, status=500, body={"error": f"api_key {KEY_EIA} is over its limit", "code": 500}
        )
        # One request at a time: the three failures all fall on one request and exhaust
        # its retries (with requests in flight each route would take one and recover).
        run(
            "fetch-echoed-key",
            "-v",
            "--log-format",
            "json",
            "fetch",
            expect=1,
            OUTBOX__EIA__MAX_IN_FLIGHT="1",
        )
        # a revision so that the failing send has something to send
        revised = tmp_path / "revised"
        shutil.copytree(sample_dir(), revised)
        page = next(revised.glob("*region*"))
        page.write_bytes(page.read_bytes().replace(b'"value":"', b'"value":"1', 1))
        run("replay", "fetch", "--replay", str(revised), expect=0)
        run("send-wrong-key", "-v", "send", expect=1, GRIDPULSE_API_KEY=WRONG_GP)
        assert "401" in outputs["send-wrong-key"]
        assert "API_KEY_INVALID" in outputs["fetch-wrong-key"]

    metrics = tmp_path / "outbox.prom"
    cli_env: dict[str, str | None] = {
        "OUTBOX_DB": str(db),
        "EIA_API_KEY": KEY_EIA,
        "GRIDPULSE_API_KEY": KEY_GP,
        "OUTBOX__HOUSEKEEPING__RETENTION_DAYS": "36500",
    }
    for args in (
        ["runs"],
        ["runs", "--json"],
        ["runs", "--failed", "--json"],
        ["status"],
        ["status", "--json"],
        ["status", "--check"],
        ["status", "--metrics", str(metrics)],
        ["config"],
        ["show", "EIA.PJM.demand", "2025-08-21T14:00:00Z"],
    ):
        code, said = invoke(args, cli_env)
        outputs[" ".join(args)] = said
        assert code in (0, 1, 2), said
    assert "***" in outputs["config"]
    assert "api_key=***" in outputs["fetch"]  # the URLs are logged, redacted
    found = {name: leaks(text) for name, text in outputs.items()}
    assert {k: v for k, v in found.items() if v} == {}
    assert leaks(metrics.read_bytes()) == []
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{db}{suffix}")
        if part.exists():
            assert leaks(part.read_bytes()) == [], part.name


ENDPOINTS = [
    ("POST", "/api/v1/data/observations"),
    ("POST", "/api/v1/auth/worker"),
    ("GET", "/api/v1/data/series"),
    ("GET", "/api/v1/data/series/EIA.PJM.demand/latest"),
    ("GET", "/api/v1/data/series/EIA.PJM.demand/observations"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_receiver_rejects_missing_and_wrong_bearer_keys(
    receiver: Receiver, method: str, path: str
) -> None:
    params = {"start": "2025-01-01T00:00:00Z", "end": "2025-01-02T00:00:00Z"}
    body = b'{"worker_id": "test"}' if path.endswith("worker") else b"{}"
    with httpx.Client(base_url=receiver.base_url) as http:
        for auth in (None, "Bearer", f"Bearer {WRONG_GP}", f"Basic {KEY_GP}", f"bearer {KEY_GP}x"):
            headers = {"Content-Type": "application/json"}
            if auth is not None:
                headers["Authorization"] = auth
            answer = http.request(method, path, headers=headers, content=body, params=params)
            assert answer.status_code == 401, (auth, answer.text)
            assert answer.headers.get("WWW-Authenticate") == "Bearer"
            assert leaks(answer.text) == []
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY_GP}"}
        answer = http.request(method, path, headers=headers, content=body, params=params)
        assert answer.status_code != 401
        assert http.get("/api/v1/health").status_code == 200  # the one open endpoint


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (no CA anyone trusts)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    out = tmp_path_factory.mktemp("tls")
    cert, key = out / "cert.pem", out / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


@pytest.fixture
def https_eia(certificate: tuple[Path, Path]) -> Iterator[str]:
    """The stand-in EIA server behind TLS with the self-signed certificate; its v2 URL."""
    fake = FakeEIA(read_rows(sample_dir()), api_key=KEY_EIA)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake_eia_mod._Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/v2"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def tls_env(db: Path, base: str, **extra: str | None) -> dict[str, str | None]:
    return {
        "OUTBOX_DB": str(db),
        "EIA_BASE_URL": base,
        "EIA_API_KEY": KEY_EIA,
        "GRIDPULSE_BASE_URL": base.removesuffix("/v2"),
        "GRIDPULSE_API_KEY": KEY_GP,
        "OUTBOX__EIA__RETRY__ATTEMPTS": "1",
        "OUTBOX__GRIDPULSE__RETRY__ATTEMPTS": "1",
        "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
        "OUTBOX__HOUSEKEEPING__RETENTION_DAYS": "36500",
        **extra,
    }


def test_tls_is_verified_by_default(https_eia: str, tmp_path: Path) -> None:
    assert Config().eia.verify_tls is True and Config().gridpulse.verify_tls is True
    db = tmp_path / "outbox.db"
    # Variables other tools read to relax verification change nothing here.
    relaxed = {"PYTHONHTTPSVERIFY": "0", "CURL_CA_BUNDLE": "", "REQUESTS_CA_BUNDLE": ""}
    code, said = invoke(list(BACKFILL), tls_env(db, https_eia, **relaxed))
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in said, said
    with Store.open(db) as store:
        assert store.staging.count_rows() == 0
    invoke(["fetch", "--replay", str(sample_dir())], tls_env(db, https_eia))
    code, said = invoke(["send"], tls_env(db, https_eia, **relaxed))
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in said and "rows stay pending" in said
    assert leaks(said) == []
    code, said = invoke(["status", "--json"], tls_env(db, https_eia))
    assert "TLS verification is turned off" not in said


def test_tls_off_only_by_explicit_flag_and_status_warns(https_eia: str, tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    off = tls_env(db, https_eia, OUTBOX__EIA__VERIFY_TLS="false")
    code, said = invoke(list(BACKFILL), off)
    assert code == 0, said
    code, table = invoke(["status"], off)
    assert "TLS verification is turned off" in table
    code, as_json = invoke(["status", "--json"], off)
    assert "TLS verification is turned off in the config" in as_json
    config = tmp_path / "outbox.yaml"
    config.write_text("gridpulse:\n  verify_tls: false\n")
    code, said = invoke(["-c", str(config), "status", "--json"], tls_env(db, https_eia))
    assert "TLS verification is turned off in the config" in said
    code, said = invoke(["-c", str(config), "send"], tls_env(db, https_eia))
    assert "CERTIFICATE_VERIFY_FAILED" not in said  # it got past TLS: the fake is no GridPulse


def test_clients_are_built_with_the_configured_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import outbox.wiring as wiring_mod

    seen: list[bool] = []
    real = wiring_mod.http_client

    def spy(timeout: float, connect: float, verify: bool) -> Any:
        seen.append(verify)
        return real(timeout, connect, verify)

    monkeypatch.setattr(wiring_mod, "http_client", spy)
    db = tmp_path / "outbox.db"
    base = {"OUTBOX_DB": str(db), "GRIDPULSE_API_KEY": KEY_GP, "EIA_API_KEY": KEY_EIA}
    base["GRIDPULSE_BASE_URL"] = base["EIA_BASE_URL"] = "https://127.0.0.1:9"
    base["OUTBOX__GRIDPULSE__RETRY__ATTEMPTS"] = base["OUTBOX__EIA__RETRY__ATTEMPTS"] = "1"
    Store.open(db).close()  # send builds no client before an outbox exists
    for extra, want in (({}, True), ({"OUTBOX__GRIDPULSE__VERIFY_TLS": "false"}, False)):
        seen.clear()
        invoke(["send"], {**base, **extra})
        assert seen == [want]
    for extra, want in (({}, True), ({"OUTBOX__EIA__VERIFY_TLS": "false"}, False)):
        seen.clear()
        invoke([*BACKFILL, "--dataset", "demand"], {**base, **extra})
        assert seen and set(seen) == {want}


def test_a_password_in_the_gridpulse_url_is_never_printed(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    env = outbox_env(db)
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    env.update(
        GRIDPULSE_BASE_URL="http://user:s3cretTokenXYZ@127.0.0.1:9", GRIDPULSE_API_KEY=KEY_GP
    )
    for args in (("send", "--dry-run"), ("status", "--remote"), ("send",), ("config",)):
        done = outbox(*args, env=env)
        assert "s3cretTokenXYZ" not in done.stdout + done.stderr, args
        assert "Traceback" not in done.stderr, args
