"""``outbox doctor``: check the installation, one line per check, OK / FAIL / SKIP.

Checks in order: the configuration (shown redacted), the database (``PRAGMA
quick_check``), its schema version against the code's head, the fetch/send locks, the
free space on the outbox's file system against ``housekeeping.min_free_bytes``,
GridPulse (``POST /api/v1/auth/worker``: reachability and credentials; with ``sink: {kind:
postgres}`` the database instead: reachable, GridPulse's tables in it), the clock against
GridPulse's ``server_time`` (the database's ``now()``), EIA (one request for one row:
reachability and key), and
the configured balancing authorities against EIA's list of respondents (an unknown code
is WARN, with the closest known codes: EIA answers an unknown code with no rows, not an
error). A check that cannot run because an earlier one failed is SKIP, with the reason.

An unreadable database (not SQLite, or ``quick_check`` not ``ok``) is only reported,
unless ``--reset`` is given: then it is set aside - renamed to
``<name>.broken-YYYYmmddTHHMMSSZ`` together with its ``-wal``/``-shm`` files, never
deleted - and a fresh outbox is created in its place. The doctor never changes a
sound database.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from outbox.config import Config, load_config
from outbox.errors import (
    ConfigError,
    OutboxError,
    SinkAuthError,
    SinkError,
    SinkTransientError,
    SourceError,
    SourceTransientError,
    StoreError,
)
from outbox.redact import redact
from outbox.store import (
    Store,
    disk_free_bytes,
    lock_file,
    lock_held,
    lock_pid,
    readonly_reason,
    write_problem,
)
from outbox.timeutil import floor_hour, parse_ts, utcnow

OK, FAIL, SKIP, WARN = "OK", "FAIL", "SKIP", "WARN"
MAX_CLOCK_SKEW_SECONDS = 60.0
BROKEN_SUFFIX = ".broken-"
DB_COMPANIONS = ("", "-wal", "-shm")
STAGES = ("fetch", "send")


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    name: str
    outcome: str
    detail: str
    hint: str = ""

    def line(self) -> str:
        """``OK    database  quick_check ok (1.2 MB)``, with ``; hint: ...`` when there is one."""
        text = f"{self.outcome:<5} {self.name:<9} {self.detail}"
        if self.hint:
            text += f"; hint: {self.hint}"
        return redact(text)


# Builds the HTTP client for one service, given that service's ``verify_tls``.
HttpFactory = Callable[[bool], httpx.Client]
CHECKS = ("config", "database", "schema", "locks", "disk", "gridpulse", "clock", "eia", "eia codes")


def run(
    config_path: str | os.PathLike[str] | None,
    *,
    reset: bool = False,
    http: HttpFactory,
    now: Callable[[], datetime] = utcnow,
) -> list[Finding]:
    """Run every check of :data:`CHECKS` in order; ``http`` builds the HTTP clients."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        found = [Finding("config", FAIL, str(exc), "fix the named key, then run doctor again")]
        return found + [Finding(name, SKIP, "needs a valid config") for name in CHECKS[1:]]
    findings = [check_config(config, config_path)]
    findings.extend(check_database(config, reset=reset, now=now))
    findings.append(check_disk(config))
    if config.sink.kind == "postgres":
        findings.extend(check_postgres(config, now=now))
    else:
        with http(config.gridpulse.verify_tls) as client:
            findings.extend(check_gridpulse(config, client, now=now))
    with http(config.eia.verify_tls) as client:
        findings.append(check_eia(config, client, now=now))
        findings.append(check_eia_codes(config, client, findings[-1]))
    return findings


def exit_code(findings: list[Finding]) -> int:
    """0 when every check is OK, WARN or SKIP, else 1."""
    return 1 if any(f.outcome == FAIL for f in findings) else 0


# -- config ---------------------------------------------------------------------------


def check_config(config: Config, config_path: str | os.PathLike[str] | None) -> Finding:
    """Where the config came from and what matters in it, secrets shown as set/missing."""
    source = config_path or os.environ.get("OUTBOX_CONFIG") or "defaults and environment"
    data = config.redacted()
    keys = ", ".join(
        f"{section} key {'***' if data[section].get('api_key') else 'missing'}"
        for section in ("eia", "gridpulse")
    )
    if config.sink.kind == "postgres":
        keys += f", sink postgres {data['sink']['url']}"
    detail = (
        f"{source}: database {config.database}, {len(config.balancing_authorities)} BAs, "
        f"{len(config.enabled_datasets())} datasets, {keys}"
    )
    return Finding("config", OK, detail)


# -- database ----------------------------------------------------------------------------


def check_database(
    config: Config, *, reset: bool = False, now: Callable[[], datetime] = utcnow
) -> list[Finding]:
    """quick_check, schema and locks; a broken file is set aside only with ``reset``."""
    path = Path(config.database)
    locks = check_locks(path)
    if not path.exists():
        hint = "the first fetch (or `outbox db upgrade`) creates it"
        return [
            Finding("database", SKIP, f"no outbox at {path} yet", hint),
            Finding("schema", SKIP, "no database yet"),
            locks,
        ]
    unwritable = write_problem(path)
    problem, store = _open_sound(path)
    if store is not None:
        with store:
            detail = f"{path}: quick_check ok ({_size_text(path)})"
            if unwritable is not None:
                found = Finding(
                    "database", FAIL, f"{detail}, but {unwritable.cause}", unwritable.hint
                )
                return [found, _schema(store), locks]
            return [Finding("database", OK, detail), _schema(store), locks]
    if unwritable is None and problem is not None:
        unwritable = readonly_reason(path, Exception(problem))
    if unwritable is not None:
        # A file this user may not write is not broken: never offer to set it aside.
        found = Finding("database", FAIL, f"cannot open it: {unwritable.cause}", unwritable.hint)
        return [found, Finding("schema", SKIP, "database cannot be opened"), locks]
    if not reset:
        hint = (
            "run `outbox doctor --reset` to set it aside (renamed, never deleted) "
            "and start a fresh outbox"
        )
        return [
            Finding("database", FAIL, f"{path}: unreadable: {problem}", hint),
            Finding("schema", SKIP, "database unreadable"),
            locks,
        ]
    return [*_reset(path, problem or "unreadable", now()), locks]


def _open_sound(path: Path) -> tuple[str | None, Store | None]:
    """(None, store) for a sound file, else (what is wrong, None)."""
    try:
        store = Store.open_readonly(path)
    except StoreError as exc:
        return _reason(exc), None
    try:
        lines = store.upkeep.quick_check()
    except StoreError as exc:
        store.close()
        return _reason(exc), None
    if lines != ["ok"]:
        store.close()
        return "quick_check: " + "; ".join(lines[:3]), None
    return None, store


def _reason(exc: Exception) -> str:
    return str(exc).split(": not a usable outbox database: ")[-1]


def _schema(store: Store) -> Finding:
    from outbox.store.migrate import head_revision

    current, head = store.schema_version(), head_revision()
    if current == head:
        return Finding("schema", OK, f"{current} (head)")
    if current is None:
        hint = "check `database` in the config; `outbox db upgrade` initialises an empty file"
        return Finding("schema", FAIL, "no schema version: not an outbox", hint)
    if _known_revision(current):
        return Finding("schema", OK, f"{current}, head {head}: upgraded by the next fetch or send")
    hint = "a newer gridpulse-outbox wrote this file: install that version again"
    return Finding("schema", FAIL, f"{current} is unknown to this version (head {head})", hint)


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from outbox.store.migrate import alembic_config

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def check_locks(path: Path) -> Finding:
    """Which stages hold their lock now (a running fetch or send is normal).

    A held lock whose pid cannot be read is ``held (pid unknown)``, never idle. A lock
    file this user cannot open at all (mode 0600 under the units' ``UMask=0077``, owned
    by the service's user) counts as held, as :func:`lock_held` has it: whether it is
    cannot be told from here, and the hint says so.
    """
    states, unreadable = [], []
    for stage in STAGES:
        lock = lock_file(path, stage)
        if not lock_held(lock):
            states.append(f"{stage} idle")
            continue
        pid = lock_pid(lock)
        states.append(f"{stage} {'held (pid unknown)' if pid is None else f'running (pid {pid})'}")
        if pid is None and not os.access(lock, os.R_OK):
            unreadable.append(lock.name)
    hint = ""
    if unreadable:
        hint = (
            f"{', '.join(unreadable)} not readable by this user, so counted as held: run "
            "doctor as the services' user (or root) to see whether a stage runs"
        )
    return Finding("locks", OK, ", ".join(states), hint)


def check_disk(config: Config) -> Finding:
    """Free space on the file system of the outbox, against ``housekeeping.min_free_bytes``."""
    from outbox.status.table import size_text

    path = Path(config.database)
    free = disk_free_bytes(path)
    if free is None:
        return Finding("disk", SKIP, f"directory {path.absolute().parent} does not exist")
    floor = config.housekeeping.min_free_bytes
    limit = f"floor {size_text(floor)}" if floor else "no floor"
    detail = f"{size_text(free)} free ({free} bytes) on the file system of {path}; {limit}"
    if floor and free < floor:
        hint = (
            "free space on that disk or lower housekeeping.min_free_bytes: "
            "fetch stages nothing below the floor (exit 4)"
        )
        return Finding("disk", FAIL, detail, hint)
    return Finding("disk", OK, detail)


def _reset(path: Path, problem: str, when: datetime) -> list[Finding]:
    if any(lock_held(lock_file(path, stage)) for stage in STAGES):
        hint = "stop the fetch/send timers first, then run `outbox doctor --reset` again"
        return [
            Finding("database", FAIL, f"{path}: unreadable ({problem}) and in use", hint),
            Finding("schema", SKIP, "database unreadable"),
        ]
    moved = set_aside(path, when)
    with Store.open(path) as store:
        detail = (
            f"{path}: was unreadable ({problem}); set aside as {moved.name}; started a fresh outbox"
        )
        return [Finding("database", OK, detail), _schema(store)]


def set_aside(path: Path, when: datetime) -> Path:
    """Rename ``path`` and its ``-wal``/``-shm`` to ``<name>.broken-<UTC stamp>[-wal|-shm]``.

    The companions keep SQLite's naming, so the set-aside trio still opens as one
    database for salvage (``sqlite3 <name>.broken-... .recover``). Nothing is deleted.
    """
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}{BROKEN_SUFFIX}{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{BROKEN_SUFFIX}{stamp}-{n}")
    for suffix in DB_COMPANIONS:
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{target}{suffix}")
    return target


def _size_text(path: Path) -> str:
    size = sum(
        Path(f"{path}{suffix}").stat().st_size
        for suffix in ("", "-wal")
        if Path(f"{path}{suffix}").exists()
    )
    return f"{size / 1e6:.1f} MB"


# -- GridPulse ------------------------------------------------------------------------------


def check_gridpulse(
    config: Config, http: httpx.Client, *, now: Callable[[], datetime] = utcnow
) -> list[Finding]:
    """Credentials via ``POST /api/v1/auth/worker``, then the clock against its server_time."""
    from outbox.sinks.gridpulse import GridPulseClient

    g = config.gridpulse
    key = g.api_key.get_secret_value() if g.api_key else ""
    if not key:
        hint = "set GRIDPULSE_API_KEY or GRIDPULSE_API_KEY_FILE"
        return [
            Finding("gridpulse", FAIL, "gridpulse.api_key is missing", hint),
            Finding("clock", SKIP, "needs an answer from GridPulse"),
        ]
    client = GridPulseClient(http, g.base_url, key, gzip=g.gzip)
    before = now()
    try:
        answer = client.auth_worker(g.worker_id)
    except SinkError as exc:
        return [_gridpulse_failure(g.base_url, exc), Finding("clock", SKIP, "needs GridPulse")]
    after = now()
    if answer.get("authenticated") is not True:
        found = Finding("gridpulse", FAIL, f"{g.base_url}: not authenticated: {answer!r:.200}")
        return [found, Finding("clock", SKIP, "needs GridPulse")]
    ok = Finding("gridpulse", OK, f"{g.base_url}: credentials accepted (worker {g.worker_id})")
    return [ok, check_clock(answer.get("server_time"), before + (after - before) / 2)]


def _gridpulse_failure(base_url: str, exc: SinkError) -> Finding:
    if isinstance(exc, SinkAuthError):
        hint = "check GRIDPULSE_API_KEY / GRIDPULSE_API_KEY_FILE (403: the key may not ingest)"
        return Finding("gridpulse", FAIL, f"{base_url}: credentials refused: {exc}", hint)
    if isinstance(exc, SinkTransientError) and exc.status is None:
        hint = "check gridpulse.base_url, DNS and the network; is GridPulse up?"
        return Finding("gridpulse", FAIL, f"{base_url}: unreachable: {exc}", hint)
    hint = "check gridpulse.base_url and GridPulse's health"
    return Finding("gridpulse", FAIL, f"{base_url}: {exc}", hint)


def check_postgres(config: Config, *, now: Callable[[], datetime] = utcnow) -> list[Finding]:
    """The direct sink (``sink: {kind: postgres}``): the database reachable, GridPulse's
    schema in it, then the clock against the server's ``now()``."""
    from outbox.wiring import postgres_sink

    sink = postgres_sink(config)
    where = sink.where
    try:
        before = now()
        detail, server_time = sink.check()
        after = now()
    except SinkError as exc:
        if isinstance(exc, SinkAuthError):
            hint = "check the user and password in sink.url / OUTBOX_SINK_URL(_FILE)"
        elif isinstance(exc, SinkTransientError):
            hint = "check sink.url's host and port and the network; is PostgreSQL up?"
        else:
            hint = "the sink writes into GridPulse's tables: check the database named"
        return [
            Finding("gridpulse", FAIL, str(exc), hint),
            Finding("clock", SKIP, "needs the database"),
        ]
    finally:
        sink.close()
    ok = Finding("gridpulse", OK, f"postgres {where}: {detail}")
    return [ok, check_clock(server_time, before + (after - before) / 2)]


def check_clock(server_time: Any, local: datetime) -> Finding:
    """Our clock against GridPulse's ``server_time`` (taken mid-request)."""
    if not isinstance(server_time, str):
        return Finding("clock", SKIP, "GridPulse sent no server_time")
    try:
        skew = (local - parse_ts(server_time)).total_seconds()
    except ValueError:
        return Finding("clock", SKIP, f"GridPulse's server_time {server_time!r} is not RFC 3339")
    detail = f"{skew:+.1f}s against GridPulse"
    if abs(skew) <= MAX_CLOCK_SKEW_SECONDS:
        return Finding("clock", OK, detail)
    hint = "synchronise the clock (e.g. `timedatectl set-ntp true`): freshness and retries use it"
    return Finding("clock", FAIL, f"{detail} (limit {MAX_CLOCK_SKEW_SECONDS:g}s)", hint)


# -- EIA ------------------------------------------------------------------------------------


def check_eia(
    config: Config, http: httpx.Client, *, now: Callable[[], datetime] = utcnow
) -> Finding:
    """One region-data request for one row of the first BA's demand (the key rides along)."""
    from outbox.ports import ROUTE_REGION, Request
    from outbox.retry import RetryPolicy
    from outbox.sources.eia import KEY_ERROR_CODES, EIAClient

    e = config.eia
    key = e.api_key.get_secret_value() if e.api_key else ""
    if not key:
        hint = "set EIA_API_KEY or EIA_API_KEY_FILE (free: https://www.eia.gov/opendata/)"
        return Finding("eia", FAIL, "eia.api_key is missing", hint)
    respondent = next(iter(config.balancing_authorities.values()))
    end = floor_hour(now())
    request = Request(ROUTE_REGION, (respondent,), ("D",), end - timedelta(hours=48), end)
    client = EIAClient(http, e.base_url, key, page_length=1, retry=RetryPolicy(attempts=1))
    try:
        page = next(iter(client.iter_pages(request)))
    except SourceError as exc:
        text = str(exc)
        if any(code in text for code in KEY_ERROR_CODES):
            hint = "check EIA_API_KEY / EIA_API_KEY_FILE (free: https://www.eia.gov/opendata/)"
            return Finding("eia", FAIL, f"{e.base_url}: key refused: {text}", hint)
        if isinstance(exc, SourceTransientError):
            hint = "check eia.base_url and the network; EIA itself is down now and then"
            return Finding("eia", FAIL, f"{e.base_url}: unreachable: {text}", hint)
        return Finding("eia", FAIL, f"{e.base_url}: {text}", "check eia.base_url")
    except OutboxError as exc:  # anything else the client raises on purpose
        return Finding("eia", FAIL, f"{e.base_url}: {exc}")
    detail = (
        f"{e.base_url}: key accepted; {page.total} demand rows for {respondent} in the last 48 h"
    )
    return Finding("eia", OK, detail)


def check_eia_codes(config: Config, http: httpx.Client, eia: Finding) -> Finding:
    """Every configured EIA code against region-data's respondent facet (needs ``eia`` OK)."""
    from outbox.ports import ROUTE_REGION
    from outbox.retry import RetryPolicy
    from outbox.sources.eia import EIAClient

    if eia.outcome != OK:
        return Finding("eia codes", SKIP, "needs an answer from EIA (see the eia check)")
    e = config.eia
    key = e.api_key.get_secret_value() if e.api_key else ""
    client = EIAClient(http, e.base_url, key, retry=RetryPolicy(attempts=1))
    try:
        known = client.facet_values(ROUTE_REGION, "respondent")
    except OutboxError as exc:
        return Finding("eia codes", SKIP, f"could not list EIA's respondents: {exc}")
    unknown = {ba: code for ba, code in config.balancing_authorities.items() if code not in known}
    if not unknown:
        count = len(config.balancing_authorities)
        return Finding("eia codes", OK, f"{count} BA codes known to EIA ({len(known)} respondents)")
    parts = [f"{ba}: {code}" + _closest(code, known) for ba, code in unknown.items()]
    hint = "fix balancing_authorities (EIA answers an unknown code with no rows, not an error)"
    return Finding("eia codes", WARN, f"unknown to EIA: {'; '.join(parts)}", hint)


def _closest(code: str, known: dict[str, str]) -> str:
    """`` (closest: CISO California ISO, ...)`` or `` (no close match)``."""
    from difflib import get_close_matches

    near = get_close_matches(code, list(known), n=3, cutoff=0.5)
    if not near:
        return " (no close match)"
    return " (closest: " + ", ".join(f"{c} {known[c]}".strip() for c in near) + ")"
