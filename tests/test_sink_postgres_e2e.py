"""The direct PostgreSQL sink end to end: ``outbox`` subprocesses against a throwaway
cluster holding GridPulse's schema (tests/pgschema.py).

The bundled sample replayed and sent with ``sink: {kind: postgres}`` leaves the database
holding exactly the outbox's acked rows; a resend sends nothing, a revision travels alone
and replaces the value; a closed port defers the rows; the URL's password appears in no
output; 30 SIGKILLed senders converge to the exact set.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
from durability import (
    acked_not_held,
    connect,
    integrity,
    latest_staged,
    outbox,
    outbox_env,
    route_rows,
    spawn,
    states,
    write_replay,
)
from pgschema import create_contract_schema, held, held_revisions

from outbox.sample import sample_dir

pytestmark = pytest.mark.postgres

PASSWORD = "s3cret-db-pass"
KILLS = {"ci": 30, "soak": 300}


def with_password(dsn: str) -> str:
    """The cluster trusts local connections: a password in the URL is carried, unused."""
    return dsn.replace("outbox_test@", f"outbox_test:{PASSWORD}@")


@pytest.fixture
def dsn(pg_cluster) -> str:
    url = pg_cluster.dsn(pg_cluster.database())
    create_contract_schema(url)
    return url


def pg_env(db: Path, url: str, **extra: str) -> dict[str, str]:
    return outbox_env(
        db, OUTBOX__SINK__KIND="postgres", OUTBOX_SINK_URL=with_password(url), **extra
    )


def acked(db: Path) -> dict[tuple[str, str], tuple[float | None, str]]:
    with connect(db) as con:
        found = con.execute(
            "SELECT series_id, ts, value, quality_flag, state FROM row_states"
        ).fetchall()
    assert {r[4] for r in found} == {"acked"}
    return {(r[0], r[1]): (r[2], r[3]) for r in found}


def test_sample_sent_to_postgres_holds_exactly_the_acked_rows(tmp_path: Path, dsn: str) -> None:
    db = tmp_path / "outbox.db"
    env = pg_env(db, dsn)
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    sent = outbox("send", env=env)
    assert sent.returncode == 0, sent.stderr
    assert "2376 rows in 1 batches, 2376 acked, 0 dead" in sent.stdout
    assert held(dsn) == acked(db)

    again = outbox("send", env=env)
    assert again.returncode == 0 and "0 rows in 0 batches" in again.stdout

    # EIA revises one row: it travels alone and replaces the value.
    with connect(db) as con:
        sid, when, value = con.execute(
            "SELECT series_id, ts, value FROM observations WHERE series_id = 'EIA.PJM.demand' "
            "ORDER BY ts LIMIT 1"
        ).fetchone()
    from outbox.normalize import revision_of
    from outbox.store import Store

    new = value + 321.0
    with Store.open(db) as store:
        store.staging.stage([(sid, when, new, "MW", "good", revision_of(new, "good", "MW"), 0)])
    resent = outbox("send", env=env)
    assert "1 rows in 1 batches, 1 acked" in resent.stdout, resent.stdout
    assert held(dsn)[(sid, when)] == (new, "good")
    assert held(dsn) == acked(db)

    # first-start watermarks and status --remote read the database
    remote = outbox("status", "--remote", "--json", env=env)
    assert remote.returncode == 0, remote.stderr
    report = json.loads(remote.stdout)["remote"]
    assert report["disagree"] == 0 and report["checked"] > 0
    from outbox.config import load_config
    from outbox.stages.plan import first_starts
    from outbox.wiring import gridpulse_series

    listing = gridpulse_series(load_config(env={**env, "OUTBOX_CONFIG": ""}))
    assert listing is not None
    starts = first_starts(load_config(env={**env, "OUTBOX_CONFIG": ""}), listing)
    assert starts and all(v.year == 2025 for v in starts.values())


def test_the_password_appears_in_no_output(tmp_path: Path, dsn: str) -> None:
    db = tmp_path / "outbox.db"
    url_file = tmp_path / "sink-url"
    url_file.write_text(with_password(dsn) + "\n")
    env = outbox_env(
        db,
        OUTBOX__SINK__KIND="postgres",
        OUTBOX_SINK_URL_FILE=str(url_file),
        EIA_BASE_URL="http://127.0.0.1:1/v2",  # doctor's EIA check stays on this machine
    )
    outputs = [outbox("-v", "fetch", "--replay", str(sample_dir()), env=env)]
    outputs.append(outbox("-v", "send", env=env))
    outputs.append(outbox("config", env=env))
    outputs.append(outbox("status", "--json", "--remote", env=env))
    outputs.append(outbox("doctor", env=env))
    outputs.append(outbox("-v", "--log-format", "json", "send", env=env))
    down = {k: v for k, v in env.items() if k != "OUTBOX_SINK_URL_FILE"}
    down["OUTBOX_SINK_URL"] = f"postgresql://outbox_test:{PASSWORD}@127.0.0.1:1/none"
    outputs.append(outbox("status", "--remote", env=down))
    outputs.append(outbox("doctor", env=down))
    # doctor fails on EIA (no key, no EIA here); the rest succeed
    assert [o.returncode for o in outputs[:6]] == [0, 0, 0, 0, 1, 0], [o.stderr for o in outputs]
    for done in outputs:
        text = done.stdout + done.stderr
        assert PASSWORD not in text, done.args
        assert "Traceback" not in text, text
    config_shown = outputs[2].stdout
    assert "postgres" in config_shown and "127.0.0.1" in config_shown
    doctor = outputs[4].stdout
    assert "OK    gridpulse postgres" in doctor and "GridPulse schema found" in doctor
    assert "FAIL  gridpulse" in outputs[7].stdout
    assert held(dsn) == acked(db)


def test_a_closed_port_defers_the_rows(tmp_path: Path) -> None:
    from tests.pgcluster import free_port

    db = tmp_path / "outbox.db"
    env = pg_env(db, f"postgresql://outbox_test@127.0.0.1:{free_port()}/gridpulse")
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    failed = outbox("send", env=env)
    assert failed.returncode == 1
    assert "rows stay pending" in failed.stderr and "Traceback" not in failed.stderr
    with connect(db) as con:
        pending = con.execute(
            "SELECT count(*), count(next_attempt_at) FROM row_states WHERE state = 'pending'"
        ).fetchone()
    assert pending[0] == 2376 and pending[1] == 2376, "deferred with a next attempt time"


def test_sigkilled_senders_converge_to_the_exact_set(
    tmp_path: Path, pg_cluster, scale: str
) -> None:
    """Senders SIGKILLed at random moments of their work; after every kill the outbox is
    sound and every acked row is held at its revision; EIA revises rows between rounds;
    a final drain leaves the database holding exactly the staged set."""
    url = pg_cluster.dsn(pg_cluster.database())
    create_contract_schema(url, revision=True)
    db = tmp_path / "outbox.db"
    env = pg_env(db, url, OUTBOX__GRIDPULSE__BATCH_SIZE="100")
    write_replay(tmp_path / "eia", route_rows(48))
    assert outbox("fetch", "--replay", str(tmp_path / "eia"), env=env).returncode == 0
    rng = random.Random(f"pg-sink-{scale}")
    kills = rounds = 0
    rows_per_second = 3000.0
    while kills < KILLS[scale]:
        rounds += 1
        if rounds > 1 and rounds % 10 == 1:
            revise(db, rng)
        work = max(0.05, states(db).get("pending", 0) / rows_per_second)
        proc = spawn("send", env=env)
        await_run(db, proc)
        time.sleep(rng.uniform(0.0, work))
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait(60) == -signal.SIGKILL
        assert integrity(db) == "ok"
        assert acked_not_held(db, held_revisions(url)) == []
        if states(db).get("pending", 0) == 0:
            revise(db, rng)
        assert rounds < KILLS[scale] * 4, f"only {kills} kills in {rounds} rounds"
    done = outbox("send", env=env)
    assert done.returncode == 0, done.stderr
    assert states(db) == {"acked": len(latest_staged(db))}
    assert held_revisions(url) == latest_staged(db)


def revise(db: Path, rng: random.Random) -> None:
    """EIA revises a share of the rows: new values, new revisions, pending again."""
    from outbox.normalize import revision_of
    from outbox.store import Store

    with connect(db) as con:
        found = con.execute("SELECT series_id, ts, value FROM observations").fetchall()
    revised = []
    for sid, when, value in rng.sample(found, len(found) // 3):
        new = (value or 0.0) + rng.choice((-7.0, 1.0, 13.0))
        revised.append((sid, when, new, "MW", "good", revision_of(new, "good", "MW"), 0))
    with Store.open(db) as store:
        store.staging.stage(revised)


def await_run(db: Path, proc) -> None:
    """Until ``proc`` has recorded its send run (imports done, work starting)."""
    import sqlite3

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                if con.execute(
                    "SELECT 1 FROM runs WHERE pid = ? AND stage = 'send'", (proc.pid,)
                ).fetchone():
                    return
            finally:
                con.close()
        except sqlite3.Error:
            pass
        time.sleep(0.01)


@pytest.fixture
def refusing(pg_cluster, dsn: str):
    """URLs the database refuses: a NOLOGIN role, a wrong password (a role that must give
    one: a pg_hba.conf line for it alone), a role without INSERT on observations."""
    import psycopg

    hba = pg_cluster.data / "pg_hba.conf"
    before = hba.read_text()
    hba.write_text("host all outbox_pw 127.0.0.1/32 scram-sha-256\n" + before)
    base = dsn.split("@", 1)[1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        for role in ("outbox_nologin", "outbox_pw", "outbox_noinsert"):
            conn.execute(f"DROP OWNED BY {role}" if _role(conn, role) else "SELECT 1")
            conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute("CREATE ROLE outbox_nologin NOLOGIN")
        conn.execute(f"CREATE ROLE outbox_pw LOGIN PASSWORD '{PASSWORD}'")
        conn.execute("CREATE ROLE outbox_noinsert LOGIN")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO outbox_noinsert")
        conn.execute(
            "GRANT INSERT ON series, balancing_authorities TO outbox_noinsert; "
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO outbox_noinsert"
        )
    yield {
        "nologin": f"postgresql://outbox_nologin:{PASSWORD}@{base}",
        "password": f"postgresql://outbox_pw:wrong-{PASSWORD}@{base}",
        "noinsert": f"postgresql://outbox_noinsert:{PASSWORD}@{base}",
        "nodatabase": f"postgresql://outbox_test:{PASSWORD}@{base.split('/')[0]}/no_such_db",
    }
    hba.write_text(before)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        for role in ("outbox_nologin", "outbox_pw", "outbox_noinsert"):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def _role(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


@pytest.mark.parametrize("case", ["nologin", "password", "noinsert", "nodatabase"])
def test_refused_credentials_stop_the_send_and_defer_nothing(
    tmp_path: Path, refusing: dict[str, str], case: str
) -> None:
    """A role that may not log in, a wrong password, a role without INSERT, a database
    that does not exist: the send
    stops (exit 1) with one line, and no row is deferred as if GridPulse were down."""
    db = tmp_path / "outbox.db"
    env = outbox_env(db, OUTBOX__SINK__KIND="postgres", OUTBOX_SINK_URL=refusing[case])
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    failed = outbox("send", env=env)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr and PASSWORD not in failed.stdout + failed.stderr
    assert "rows stay pending" not in failed.stderr, failed.stderr
    with connect(db) as con:
        found = con.execute(
            "SELECT count(*), count(next_attempt_at), max(attempts) FROM row_states "
            "WHERE state = 'pending'"
        ).fetchone()
    assert found == (2376, 0, 0), (failed.stderr, found)
