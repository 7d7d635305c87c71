"""Logging: one line per event in logfmt or JSON on stderr, run context, keys never shown."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from durability import outbox

from outbox import logsetup
from outbox.logsetup import bind, log_scope, print_error, setup_logging
from outbox.sample import sample_dir
from outbox.sample.receiver import running_receiver
from outbox.testing.fake_eia import FakeEIA
from outbox.testing.synth import read_rows

EIA_KEY = "eia-live-key-0123456789"
GP_KEY = "gp-live-key-9876543210"
WRONG_EIA_KEY = "eia-wrong-key-abcdefgh"
WRONG_GP_KEY = "gp-wrong-key-zyxwvuts"
SECRETS = (EIA_KEY, GP_KEY, WRONG_EIA_KEY, WRONG_GP_KEY)
LOGFMT_LINE = re.compile(r'^ts=\S+Z level=(debug|info|warning|error) logger=\S+ msg="[^\n]*$')


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A stand-in EIA that echoes the key in its bodies, as EIA does, and a receiver."""
    tmp = tmp_path_factory.mktemp("services")
    with (
        FakeEIA(read_rows(sample_dir()), api_key=EIA_KEY) as eia,
        running_receiver(tmp, api_key=GP_KEY) as receiver,
    ):
        yield eia.start(), receiver.base_url


def run_all(fmt: str, tmp_path: Path, services: tuple[str, str]) -> list[tuple[str, int, str]]:
    """Fetch and send, good keys and bad ones, at -v: (what, exit code, stdout + stderr)."""
    eia_url, gp_url = services
    env = {
        "OUTBOX_DB": str(tmp_path / "o.db"),
        "EIA_BASE_URL": eia_url,
        "EIA_API_KEY": EIA_KEY,
        "GRIDPULSE_BASE_URL": gp_url,
        "GRIDPULSE_API_KEY": GP_KEY,
        "OUTBOX__EIA__HISTORY_START": "2025-08-20T00:00:00Z",
        "OUTBOX__EIA__BACKFILL_CHUNK_HOURS": "20000",
        "OUTBOX__EIA__MAX_REQUESTS_PER_SECOND": "5",
        "OUTBOX__EIA__RETRY__ATTEMPTS": "1",
        "OUTBOX__GRIDPULSE__RETRY__ATTEMPTS": "1",
        "OUTBOX__GRIDPULSE__BATCH_SIZE": "1000",
    }
    steps = [
        ("fetch, wrong EIA key", ["fetch"], {"EIA_API_KEY": WRONG_EIA_KEY}),
        ("fetch", ["fetch"], {}),
        ("send, wrong GridPulse key", ["send"], {"GRIDPULSE_API_KEY": WRONG_GP_KEY}),
        ("send, GridPulse down", ["send"], {"GRIDPULSE_BASE_URL": "http://127.0.0.1:9"}),
        ("send", ["send"], {}),
        ("status", ["status", "--json"], {}),
        (
            "doctor, wrong keys",
            ["doctor"],
            {"EIA_API_KEY": WRONG_EIA_KEY, "GRIDPULSE_API_KEY": WRONG_GP_KEY},
        ),
    ]
    out = []
    for what, args, changed in steps:
        env_now = {**os.environ, **env, **changed}
        done = outbox("-v", "--log-format", fmt, *args, env=env_now, timeout=120)
        out.append((what, done.returncode, done.stdout, done.stderr))
    return [(what, code, stdout + stderr) for what, code, stdout, stderr in out] + [
        (what + " (stderr)", code, stderr) for what, code, _, stderr in out
    ]


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_keys_never_appear_and_every_line_is_one_event(
    fmt: str, tmp_path: Path, services: tuple[str, str]
) -> None:
    results = run_all(fmt, tmp_path, services)
    codes = {what: code for what, code, _ in results if not what.endswith("(stderr)")}
    assert codes == {
        "fetch, wrong EIA key": 1,
        "fetch": 0,
        "send, wrong GridPulse key": 1,
        "send, GridPulse down": 1,
        "send": 0,
        "status": 0,
        "doctor, wrong keys": 1,
    }
    everything = "\n".join(text for _, _, text in results)
    for secret in SECRETS:
        assert secret not in everything
    assert "api_key=***" in everything  # the URLs were logged (at -v), masked
    db = (tmp_path / "o.db").read_bytes()
    assert not any(secret.encode() in db for secret in SECRETS)

    stderr = {what.removesuffix(" (stderr)"): t for what, _, t in results if "(stderr)" in what}
    for what, text in stderr.items():
        for line in text.splitlines():
            if fmt == "json":
                event = json.loads(line)  # every line parses on its own
                assert {"ts", "level", "logger", "msg"} <= event.keys(), (what, line)
            else:
                assert LOGFMT_LINE.match(line) or line.startswith("error: "), (what, line)

    fetch_done = _event(stderr["fetch"], fmt, "fetch done")
    assert fetch_done["stage"] == "fetch" and fetch_done["run"] == 2
    assert fetch_done["rows"] == 2376 and float(fetch_done["seconds"]) >= 0
    send_done = _event(stderr["send"], fmt, "send done")
    assert send_done["stage"] == "send" and send_done["acked"] == 2376
    failed = _event(stderr["send, GridPulse down"], fmt, "send failed")
    assert failed["stage"] == "send" and failed["level"] == "error"
    assert "GridPulse unavailable" in failed["error"] and "seconds" in failed
    refused = _event(stderr["fetch, wrong EIA key"], fmt, "fetch failed")
    assert "API_KEY_INVALID" in refused["error"] and refused["run"] == 1
    # Every line of the run carries its stage and run id, debug lines included (the prune
    # after the send is no part of the run).
    run_lines = [
        e
        for e in _events(stderr["send"], fmt)
        if e.get("logger", "").startswith("outbox.stages")
        and e["logger"] != "outbox.stages.housekeeping"
    ]
    assert run_lines and all(e.get("run") == send_done["run"] for e in run_lines)


def _events(text: str, fmt: str) -> list[dict]:
    if fmt == "json":
        return [json.loads(line) for line in text.splitlines()]
    events = []
    for line in text.splitlines():
        if line.startswith("error: "):
            continue
        fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))
        events.append({k: _logfmt_value(v) for k, v in fields.items()})
    return events


def _logfmt_value(raw: str) -> object:
    if raw.startswith('"'):
        return json.loads(raw)
    return int(raw) if raw.isdigit() else raw


def _event(text: str, fmt: str, msg: str) -> dict:
    found = [e for e in _events(text, fmt) if e.get("msg") == msg]
    assert len(found) == 1, (msg, text)
    return found[0]


# -- the formatters, in process --------------------------------------------------------


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What our handler wrote to stderr (set up inside the test, on pytest's stream)."""
    yield lambda: capsys.readouterr().err
    logging.getLogger().handlers = [
        h for h in logging.getLogger().handlers if not getattr(h, "_outbox", False)
    ]


def test_context_fields_scope_and_quoting(stderr: Callable[[], str]) -> None:
    setup_logging(1, "logfmt")
    log = logging.getLogger("outbox.test")

    def run() -> None:
        with log_scope(stage="send"):
            bind(run=7)
            log.info("batch posted rows=%d note=%s", 5, logsetup.quote('two words "quoted"\nline'))
        log.info("after the run")

    # A fresh context: an earlier in-process pipeline run may have bound its own run id.
    contextvars.Context().run(run)
    first, second = stderr().splitlines()
    assert first.endswith(
        'msg="batch posted" stage=send run=7 rows=5 note="two words \\"quoted\\"\\nline"'
    )
    assert second.endswith('msg="after the run"')  # the scope ended, the run id with it


def test_json_fields_are_typed(stderr: Callable[[], str]) -> None:
    setup_logging(0, "json")
    with log_scope(stage="fetch", run=3):
        logging.getLogger("outbox.test").info(
            "fetch done rows=%d seconds=%.3f url=%s", 480, 1.25, "https://x/?api_key=SECRET"
        )
    event = json.loads(stderr())
    assert event["msg"] == "fetch done" and event["stage"] == "fetch" and event["run"] == 3
    assert event["rows"] == 480 and event["seconds"] == 1.25
    assert event["url"] == "https://x/?api_key=***"


def test_print_error_follows_the_format(stderr: Callable[[], str]) -> None:
    setup_logging(0, "logfmt")
    print_error("gridpulse.api_key: missing")
    setup_logging(0, "json")
    with log_scope(stage="send"):
        print_error("GridPulse answered 401 for Bearer abcdef123456")
    plain, structured = stderr().splitlines()
    assert plain == "error: gridpulse.api_key: missing"
    event = json.loads(structured)
    assert event["level"] == "error" and event["stage"] == "send"
    assert event["msg"] == "GridPulse answered 401 for Bearer ***"


def test_journald_gets_priority_prefixes(
    stderr: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = (tmp_path / "journal").open("w")
    st = os.fstat(journal.fileno())
    monkeypatch.setattr(sys, "stderr", journal)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging(0, "logfmt")
    log = logging.getLogger("outbox.test")
    log.info("fine")
    log.warning("hmm")
    log.error("bad")
    journal.flush()
    lines = (tmp_path / "journal").read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream: no prefixes
    assert not logsetup.stderr_is_journal()
    journal.close()


def test_levels_live_on_our_handler(stderr: Callable[[], str]) -> None:
    setup_logging(0, "logfmt")
    logging.getLogger("outbox.test").debug("hidden")
    logging.getLogger("outbox.test").info("shown")
    logging.getLogger("somelib").info("hidden too")
    logging.getLogger("somelib").warning("library warning")
    assert [line.split("msg=")[1] for line in stderr().splitlines()] == [
        '"shown"',
        '"library warning"',
    ]
    # No logger level is left behind to hide debug records from other handlers (caplog).
    assert logging.getLogger("outbox").level == logging.NOTSET


def test_a_run_context_ends_with_the_run(stderr: Callable[[], str], tmp_path: Path) -> None:
    from outbox.config import Config
    from outbox.sources.replay import ReplaySource
    from outbox.stages.fetch import run_fetch
    from outbox.store import Store

    setup_logging(0, "json")
    with Store.open(tmp_path / "o.db") as store:
        run_fetch(Config(), store, ReplaySource(sample_dir()))
    logging.getLogger("outbox.test").info("afterwards")
    done, after = (json.loads(line) for line in stderr().splitlines()[-2:])
    assert (done["msg"], done["stage"], done["run"]) == ("fetch done", "fetch", 1)
    assert after == {k: after[k] for k in ("ts", "level", "logger", "msg")}  # no stage, no run


def test_the_handler_follows_stderr_when_it_is_swapped(
    stderr: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An embedding program or test runner configures logging on one stderr, then closes
    # it and installs another: later records go to the stream that is current.
    import io

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging(0, "logfmt")
    logging.getLogger("outbox.test").info("on the first")
    assert 'msg="on the first"' in first.getvalue()
    first.close()
    monkeypatch.undo()
    monkeypatch.setattr(logging, "raiseExceptions", True)
    logging.getLogger("outbox.test").info("on the second")
    err = stderr()
    assert 'msg="on the second"' in err
    assert "Logging error" not in err
