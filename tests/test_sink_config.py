"""``sink:``: the HTTP API by default, or GridPulse's PostgreSQL database with its URL
from the file, ``OUTBOX_SINK_URL`` or ``OUTBOX_SINK_URL_FILE``; the password masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox.config import load_config
from outbox.errors import ConfigError
from outbox.redact import redact

URL = "postgresql://writer:pw-9f8e7d6c@db.internal:5432/gridpulse"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_default_sink_is_the_gridpulse_api() -> None:
    assert load_config(env={}).sink.kind == "gridpulse"


def test_a_postgres_sink_from_the_file_is_masked_everywhere(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"sink:\n  kind: postgres\n  url: {URL}\n"), env={})
    assert config.sink.require_url() == URL
    shown = config.redacted()["sink"]["url"]
    assert "pw-9f8e7d6c" not in shown and "writer" not in shown
    assert "db.internal:5432/gridpulse" in shown
    assert "pw-9f8e7d6c" not in redact("FATAL: password pw-9f8e7d6c refused")


def test_url_file_and_the_variables(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text(URL + "\n")
    config = load_config(
        write(tmp_path, f"sink:\n  kind: postgres\n  url_file: {secret}\n"), env={}
    )
    assert config.sink.require_url() == URL
    other = URL.replace("gridpulse", "other")
    config = load_config(
        write(tmp_path, f"sink:\n  kind: postgres\n  url_file: {secret}\n"),
        env={"OUTBOX_SINK_URL": other},
    )
    assert config.sink.require_url() == other, "the variable replaces the file's url_file"
    config = load_config(
        env={"OUTBOX__SINK__KIND": "postgres", "OUTBOX_SINK_URL_FILE": str(secret)}
    )
    assert config.sink.require_url() == URL
    sqlalchemy_form = URL.replace("postgresql://", "postgresql+psycopg://")
    config = load_config(env={"OUTBOX__SINK__KIND": "postgres", "OUTBOX_SINK_URL": sqlalchemy_form})
    assert config.sink.require_url() == URL


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("sink:\n  kind: postgres\n", {}, "exactly one of sink.url and sink.url_file"),
        (f"sink:\n  kind: postgres\n  url: {URL}\n  url_file: /x\n", {}, "exactly one"),
        (f"sink:\n  url: {URL}\n", {}, "are for kind: postgres"),
        ("sink:\n  kind: postgres\n  url: mysql://a@b/c\n", {}, "not a PostgreSQL URL"),
        ("sink:\n  kind: mongo\n", {}, "sink.kind"),
        ("", {"OUTBOX_SINK_URL": URL}, "OUTBOX_SINK_URL"),
    ],
)
def test_a_wrong_sink_is_a_config_error(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text), env=env)
    assert "pw-9f8e7d6c" not in str(caught.value)


def test_a_missing_url_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sink\.url_file: cannot read secret file"):
        load_config(write(tmp_path, "sink:\n  kind: postgres\n  url_file: /nonexistent\n"), env={})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://writer:pw-9f8e7d6c@db.internal:99999/gridpulse", "port"),
        ("postgresql://writer:pw-9f8e7d6c@db.internal:abc/gridpulse", "port"),
        ("postgresql://writer:pw-9f8e7d6c@db.internal/gridpulse?sslmode=bogus", "sslmode"),
        ("postgresql://writer:pw-9f8e7d6c@db.internal/gridpulse?foo=bar", "foo"),
        ("postgresql://writer:pw-9f8e7d6c%zz@db.internal/gridpulse", "percent"),
        ("postgresql://writer@db.internal/gridpulse?password=pw-9f8e7d6c&foo=1", "foo"),
    ],
)
def test_an_unusable_url_is_a_config_error_with_the_password_masked(
    tmp_path: Path, url: str, message: str
) -> None:
    """A URL the driver cannot use is refused when the configuration is read (exit 2),
    in one line, instead of deferring the whole backlog as "GridPulse unavailable"."""
    pytest.importorskip("psycopg")
    env = {"OUTBOX__SINK__KIND": "postgres", "OUTBOX_SINK_URL": url}
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(env=env)
    text = str(caught.value)
    assert "pw-9f8e7d6c" not in text and "\n" not in text.strip()
    assert "sink.url: not a usable PostgreSQL URL" in text
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, f"sink:\n  kind: postgres\n  url: '{url}'\n"), env={})
    assert "pw-9f8e7d6c" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://db.example/gridpulse", "postgresql://db.example/gridpulse"),
        (
            "postgresql://db.example:5433/gridpulse?sslmode=require&password=pw-9f8e7d6c",
            "postgresql://db.example:5433/gridpulse?sslmode=require&password=***",
        ),
        (
            "postgresql://db.example/gridpulse?sslpassword=pw-9f8e7d6c",
            "postgresql://db.example/gridpulse?sslpassword=***",
        ),
        (
            "postgresql://writer:pw-9f8e7d6c@db.example/gridpulse",
            "postgresql://***@db.example/gridpulse",
        ),
    ],
)
def test_only_the_secrets_of_a_url_are_masked(url: str, shown: str) -> None:
    """A URL without user info (a .pgpass or PGPASSWORD setup) shows its host and
    database; only the password and secret-bearing query parameters are masked."""
    from outbox.sinks.postgres import PostgresSink

    config = load_config(env={"OUTBOX__SINK__KIND": "postgres", "OUTBOX_SINK_URL": url})
    assert config.redacted()["sink"]["url"] == shown
    assert PostgresSink(url).where == shown
    said = redact(f"driver said: {url} and pw-9f8e7d6c", secrets=())
    if "pw-9f8e7d6c" in url:
        # Reading the config registered the password: a driver message that echoes
        # it alone is masked too.
        assert "pw-9f8e7d6c" not in said
    else:
        # Nothing secret in this URL: the text is left as it was said.
        assert url in said


@pytest.mark.parametrize(
    "url",
    [
        "postgresql:///gridpulse?host=/var/run/postgresql",
        "postgresql:///gridpulse",
        "postgres://%2Fvar%2Frun%2Fpostgresql/gridpulse",
    ],
)
def test_a_unix_socket_url_without_a_hostname_is_accepted(url: str) -> None:
    """libpq connects over a Unix socket when the URL names no host (or a directory)."""
    config = load_config(env={"OUTBOX__SINK__KIND": "postgres", "OUTBOX_SINK_URL": url})
    assert config.sink.require_url() == url
    assert config.redacted()["sink"]["url"] == url


def test_send_without_the_driver_is_a_config_error_naming_the_extra(tmp_path: Path) -> None:
    """``outbox send`` to ``sink: {kind: postgres}`` where psycopg cannot be imported:
    one line naming the extra, exit 2 (it was the run failing, exit 1)."""
    import os

    from durability import outbox
    from factories import obs, series_row

    from outbox.store import Store

    with Store.open(tmp_path / "outbox.db") as store:  # a row to send
        store.staging.stage(
            [obs("EIA.PJM.demand", 0, 1.0)], series_rows=[series_row("EIA.PJM.demand")]
        )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX", "GRIDPULSE"))},
        "OUTBOX_DB": str(tmp_path / "outbox.db"),
        "OUTBOX__SINK__KIND": "postgres",
        "OUTBOX_SINK_URL": URL,
    }
    hidden = "import sys\nsys.modules['psycopg'] = None"  # as if it were not installed
    done = outbox("send", env=env, timeout=60, prelude=hidden, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "pip install 'gridpulse-outbox[postgres]'" in lines[0]
    assert "pw-9f8e7d6c" not in done.stdout + done.stderr
