"""Push alerts: one notification per change of the verdict, to a real local webhook.

The webhook is apprise's ``json://`` (a plain JSON POST) pointing at an HTTP server on
127.0.0.1 started by the test; the runs are real ``outbox`` processes.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest

from outbox.alerts import META_KEY, _due, mask
from outbox.config import Config, load_config
from outbox.datasets import names
from outbox.errors import ConfigError
from outbox.sample import sample_dir
from outbox.sample.receiver import running_receiver
from outbox.store import Store
from tests.durability import KEY_EIA, outbox, outbox_env

HOOK_TOKEN = "hooktoken-4f1b9c2e77"
GP_KEY = "gp-key-0a9d7c6b5e4f"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict]]]:
    handler = type("Hook", (_Hook,), {"received": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"json://user:{HOOK_TOKEN}@127.0.0.1:{server.server_port}/hook", handler.received
    finally:
        server.shutdown()
        server.server_close()


def _env(db: Path, url: str, **extra: str) -> dict[str, str]:
    env = outbox_env(db, **extra)
    env.update(
        {
            # The sample day is old: only failed runs in a row make the verdict move.
            **{
                f"OUTBOX__DATASETS__{d.upper()}__STALE_{level}_HOURS": "10000000"
                for level in ("WARNING", "CRITICAL")
                for d in names()
            },
            "OUTBOX__STATUS__FAILED_RUNS_WARNING": "1",
            "OUTBOX__STATUS__FAILED_RUNS_CRITICAL": "2",
            "OUTBOX__ALERTS__URLS": json.dumps([url]),
            "GRIDPULSE_BASE_URL": "http://127.0.0.1:9",
            # A failed send leaves its rows due at once, so the next send fails again.
            "OUTBOX__GRIDPULSE__DEFER_INITIAL_SECONDS": "0",
            "GRIDPULSE_API_KEY": GP_KEY,
            "EIA_API_KEY": KEY_EIA,
        }
    )
    env.update(extra)
    return env


def _titles(received: list[dict]) -> list[str]:
    return [json.loads(r["body"])["title"] for r in received]


def test_one_notification_per_change_of_state(tmp_path: Path, hook: tuple[str, list[dict]]) -> None:
    url, received = hook
    db = tmp_path / "outbox.db"
    env = _env(db, url)
    steps = [
        ("fetch", ["fetch", "--replay", str(sample_dir())], 0, []),  # OK: nothing to say
        ("send fails", ["send"], 1, ["WARNING"]),
        ("send fails again", ["send"], 1, ["CRITICAL"]),
        ("still failing", ["send"], 1, []),  # CRITICAL holds: no repeat
    ]
    seen = 0
    for name, argv, code, expect in steps:
        done = outbox(*argv, env=env)
        assert done.returncode == code, (name, done.stderr)
        assert _titles(received[seen:]) == [f"gridpulse-outbox: {s}" for s in expect], name
        seen = len(received)
    (tmp_path / "gp").mkdir()
    with running_receiver(tmp_path / "gp", api_key=GP_KEY) as receiver:
        env["GRIDPULSE_BASE_URL"] = receiver.base_url
        done = outbox("send", env=env)
        assert done.returncode == 0, done.stderr
        assert _titles(received[seen:]) == ["gridpulse-outbox: OK"]  # the recovery
        assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    assert len(received) == 3  # the OK fetch after recovery said nothing
    bodies = [r["body"].decode() for r in received]
    assert "send failed 2 runs in a row" in json.loads(bodies[1])["message"]
    for body in bodies:
        for secret in (GP_KEY, KEY_EIA, HOOK_TOKEN):
            assert secret not in body
    for r in received:
        assert r["path"] == "/hook"
    with Store.open(db) as store:
        state = json.loads(store.meta_get(META_KEY) or "{}")
    assert state["sent"] == 3 and state["failures"] == 0
    metrics = tmp_path / "m.prom"
    assert outbox("status", "--metrics", str(metrics), env=env).returncode == 0
    text = metrics.read_text()
    assert "outbox_alerts_sent_total 3" in text
    assert "outbox_alert_failures_total 0" in text


def test_a_failed_notification_never_fails_the_run_and_is_retried(
    tmp_path: Path, hook: tuple[str, list[dict]]
) -> None:
    url, received = hook
    db = tmp_path / "outbox.db"
    dead_url = "json://user:" + HOOK_TOKEN + "@127.0.0.1:9/hook"
    env = _env(db, dead_url)
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    done = outbox("send", env=env)  # WARNING, but the webhook is down
    assert done.returncode == 1  # the send's own failure, not the alert's
    assert 'msg="alert not sent" stage=send state=WARNING' in done.stderr
    assert HOOK_TOKEN not in done.stderr + done.stdout
    with Store.open(db) as store:
        state = json.loads(store.meta_get(META_KEY) or "{}")
    assert state["failures"] == 1 and state["sent"] == 0
    # The webhook is back (same state): the WARNING is delivered once, at the next run.
    env["OUTBOX__ALERTS__URLS"] = json.dumps([url])
    env["OUTBOX__STATUS__FAILED_RUNS_CRITICAL"] = "5"
    outbox("send", env=env)
    assert _titles(received) == ["gridpulse-outbox: WARNING"]


def test_repeat_hours_renotifies_a_persisting_critical() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    sent = {"urls": {"k": {"label": "CRITICAL", "at": "2026-01-01T00:00:00Z"}}}
    assert not _due(sent, "k", "CRITICAL", now + timedelta(hours=5), 6)
    assert _due(sent, "k", "CRITICAL", now + timedelta(hours=6), 6)
    assert not _due(sent, "k", "CRITICAL", now + timedelta(hours=600), None)
    assert not _due({"urls": {}}, "k", "OK", now, 6)  # a new outbox starts at OK
    assert _due({"urls": {}}, "k", "UNKNOWN", now, None)
    warn = {"urls": {"k": {"label": "WARNING", "at": "2026-01-01T00:00:00Z"}}}
    assert not _due(warn, "k", "WARNING", now + timedelta(hours=600), 6)  # only CRITICAL


def test_alerts_test_reports_each_url(tmp_path: Path, hook: tuple[str, list[dict]]) -> None:
    url, received = hook
    env = _env(tmp_path / "outbox.db", url)
    env["OUTBOX__ALERTS__URLS"] = json.dumps([url, "json://127.0.0.1:9/down"])
    done = outbox("alerts", "test", env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok   json://***@127.0.0.1:") and lines[0].endswith("/***")
    assert lines[1] == "FAIL json://127.0.0.1:9/***: not delivered"  # a path may be a token
    assert HOOK_TOKEN not in done.stdout + done.stderr
    assert _titles(received) == ["gridpulse-outbox: test"]
    assert not (tmp_path / "outbox.db").exists()  # a test notification touches no outbox


def test_alerts_test_against_an_unreachable_url_is_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path / "outbox.db", "json://127.0.0.1:9/down")
    done = outbox("alerts", "test", env=env)
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["FAIL json://127.0.0.1:9/***: not delivered"]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("value", "fragment"),
    [('["not a url"]', "not a notification URL"), ('["no-scheme.example"]', "scheme")],
)
def test_a_bad_alert_url_is_a_config_error(tmp_path: Path, value: str, fragment: str) -> None:
    env = _env(tmp_path / "outbox.db", "json://127.0.0.1:9/x", OUTBOX__ALERTS__URLS=value)
    done = outbox("alerts", "test", env=env)
    assert done.returncode == 2
    assert fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_urls_load_from_a_file_and_stay_masked(tmp_path: Path) -> None:
    secret_file = tmp_path / "urls"
    secret_file.write_text(f"# alerts\nntfy://{HOOK_TOKEN}@ntfy.example.com/grid\n")
    config = load_config(env={"OUTBOX_ALERTS_URLS_FILE": str(secret_file)})
    assert [u.get_secret_value() for u in config.alerts.urls] == [
        f"ntfy://{HOOK_TOKEN}@ntfy.example.com/grid"
    ]
    assert HOOK_TOKEN not in json.dumps(config.redacted())
    assert HOOK_TOKEN not in mask(config.alerts.urls[0].get_secret_value())
    with pytest.raises(ConfigError, match="cannot read secret file"):
        load_config(env={"OUTBOX_ALERTS_URLS_FILE": str(tmp_path / "missing")})
    assert Config().alerts.urls == []


@pytest.mark.parametrize(
    "url",
    [
        "json://127.0.0.1:9/hook/SuperSecretToken123",
        "jsons://hooks.example.com/services/T000/B000/SuperSecretToken123",
        "ntfys://ntfy.sh/SuperSecretToken123",
        "json://user:SuperSecretToken123@127.0.0.1:9/",
    ],
)
def test_a_token_anywhere_in_an_alert_url_is_never_shown(tmp_path: Path, url: str) -> None:
    assert "SuperSecretToken123" not in mask(url)
    env = _env(tmp_path / "outbox.db", url, OUTBOX__ALERTS__TIMEOUT_SECONDS="1")
    done = outbox("alerts", "test", env=env)
    assert "SuperSecretToken123" not in done.stdout + done.stderr
    shown = outbox("config", env=env)
    assert shown.returncode == 0 and "SuperSecretToken123" not in shown.stdout + shown.stderr


def test_a_send_before_the_first_fetch_creates_no_outbox_with_alerts_set(
    tmp_path: Path, hook: tuple[str, list[dict]]
) -> None:
    url, received = hook
    done = outbox("send", env=_env(tmp_path / "outbox.db", url))
    assert done.returncode == 0, done.stderr
    assert "nothing to send: no outbox at" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no lock file
    assert received == []  # and no UNKNOWN notification about an outbox not made yet
