"""``outbox demo``: the whole job end to end on the bundled sample, offline.

In ``./outbox-demo/`` (or ``--keep DIR``): start the reference receiver on a free
127.0.0.1 port, fetch the bundled day of EIA-930 data by replay, send it (with the cheap
prune every ``outbox send`` ends with), check that the receiver holds exactly what the
outbox acknowledged, and show the status. The directory is kept for a look inside: the
outbox, the receiver's database and a ``config.yaml`` for ``outbox -c DIR/config.yaml``,
whose retention covers the sample day, so that no prune removes the sample.

Run again, the demo starts afresh in a directory it made (it replaces its own files
there); it refuses a directory that is not empty and was not made by the demo.
"""

from __future__ import annotations

import math
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from outbox.config import Config
from outbox.errors import OutboxError, UsageError
from outbox.sample import SAMPLE_HOURS, SAMPLE_START, sample_dir
from outbox.sample.receiver import ReceiverStartError, receiver_rows, running_receiver
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.stages.fetcher import FetchResult
from outbox.stages.send import SendResult, run_send
from outbox.status import Status, collect
from outbox.store import Store
from outbox.timeutil import utcnow

SAMPLE_NOW = SAMPLE_START + timedelta(hours=SAMPLE_HOURS + 2)
DEMO_DIR = Path("outbox-demo")
MARKER = ".outbox-demo"
REPORT = "report.html"
# The files a demo writes into its directory; a new run removes them, and nothing else.
DEMO_FILES = (
    "outbox.db*",
    "receiver.db*",
    "receiver-*.out",
    "receiver-*.err",
    "config.yaml",
    "report.html",
)
# How long the kept outbox stays explorable: retention reaches back past the sample day
# by this much more, so a prune (after the demo's send, or `outbox -c DIR/config.yaml
# prune`) keeps the sample for years.
RETENTION_MARGIN_DAYS = 3650


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and where its files are."""

    workdir: Path
    fetch: FetchResult
    send: SendResult
    acked: int
    received: int
    status: Status


def run_demo(
    keep: Path = DEMO_DIR, say: Callable[[str], None] = print, config: Config | None = None
) -> DemoResult:
    """Run the demo in ``keep``; raise OutboxError when the receiver does not hold every
    acked row, UsageError when ``keep`` is a directory the demo did not make."""
    prepare_dir(keep)
    workdir = keep.absolute()  # the receiver runs in it: its paths must not be relative
    key = secrets.token_urlsafe(16)
    cfg = demo_config(config or Config(), workdir)
    write_config(keep, cfg)
    try:
        with running_receiver(workdir, api_key=key) as receiver:
            say(f"receiver: {receiver.base_url} (database {keep / 'receiver.db'})")
            cfg = cfg.model_copy(
                update={
                    "gridpulse": cfg.gridpulse.model_copy(
                        update={"base_url": receiver.base_url, "api_key": _secret(key)}
                    )
                }
            )
            fetched, sent, acked, status = _run(cfg, receiver.base_url, key, say)
            received = len(receiver_rows(receiver.base_url, key))
    except ReceiverStartError as exc:
        first = str(exc).splitlines()[0].rstrip(":")
        raise OutboxError(
            f"demo: the reference receiver did not start ({first}; see {keep}/receiver-*.err)"
        ) from None
    if received != acked or fetched.rows != acked:
        raise OutboxError(
            f"demo: {fetched.rows} staged, {acked} acked, but the receiver holds {received}"
        )
    from outbox.report import write_report

    # As the status: of the hours after the sample day, not of today.
    write_report(cfg, workdir / REPORT, now=SAMPLE_NOW)
    return DemoResult(keep, fetched, sent, acked, received, status)


def status_heading(result: DemoResult) -> str:
    """The line above the demo's status table."""
    return f"status as of {result.status.generated_at} (the hours after the sample day):"


def closing_lines(result: DemoResult) -> list[str]:
    """The lines under the status table: the check, where the files are, what to try."""
    db = shlex.quote(str(result.workdir / "outbox.db"))
    cfg = shlex.quote(str(result.workdir / "config.yaml"))
    return [
        f"ok: the receiver holds all {result.received} observations; "
        f"{result.acked} acknowledged in the outbox, 0 pending",
        f"kept in {result.workdir}/ (outbox.db, receiver.db, config.yaml, report.html); "
        "`outbox demo` again starts afresh there",
        f"report: {result.workdir / REPORT} (open it in a browser)",
        "look inside:",
        f"  sqlite3 {db} 'select count(*) from observations'",
        f"  sqlite3 -header -column {db} 'select * from series_status limit 10'",
        f"  outbox -c {cfg} status      # as of today: the 2025 sample day shows as stale (CRIT)",
        f"  outbox -c {cfg} show EIA.PJM.demand 2025-08-21T14:00:00Z",
    ]


def prepare_dir(keep: Path) -> None:
    """Create ``keep``, or empty it of a previous demo's files; refuse any other directory."""
    if keep.exists() and not keep.is_dir():
        raise UsageError(f"--keep {keep}: not a directory")
    if keep.is_dir() and not (keep / MARKER).is_file() and any(keep.iterdir()):
        raise UsageError(
            f"--keep {keep}: not empty and not made by `outbox demo`; name a new or empty directory"
        )
    try:
        keep.mkdir(parents=True, exist_ok=True)
        for pattern in DEMO_FILES:
            for path in keep.glob(pattern):
                if path.is_file() or path.is_symlink():
                    path.unlink()
        (keep / MARKER).write_text(
            "made by `outbox demo`: a new demo run replaces its files in this directory\n"
        )
    except OSError as exc:
        raise UsageError(f"--keep {keep}: {exc.strerror or exc}") from None


def demo_config(base: Config, workdir: Path) -> Config:
    """``base`` with the outbox in ``workdir`` and a retention that covers the sample day."""
    age_days = (utcnow() - SAMPLE_START) / timedelta(days=1)
    retention = float(math.ceil(age_days) + RETENTION_MARGIN_DAYS)
    return base.model_copy(
        update={
            "database": str(workdir / "outbox.db"),
            "housekeeping": base.housekeeping.model_copy(update={"retention_days": retention}),
        }
    )


def write_config(keep: Path, cfg: Config) -> None:
    """``keep/config.yaml``: the kept outbox for ``outbox -c``, with the demo's retention."""
    (keep / "config.yaml").write_text(
        "# Written by `outbox demo`: its outbox, for a look around, e.g.\n"
        f"#   outbox -c {keep}/config.yaml status\n"
        "# The demo's receiver stopped when the demo ended: `send` has nowhere to go.\n"
        "database: outbox.db                 # next to this file\n"
        "housekeeping:\n"
        f"  retention_days: {cfg.housekeeping.retention_days:g}"
        f"             # covers the sample day ({SAMPLE_START:%Y-%m-%d}): prune keeps it\n"
    )


def _secret(value: str):
    from pydantic import SecretStr

    return SecretStr(value)


def _run(
    cfg: Config, base_url: str, key: str, say: Callable[[str], None]
) -> tuple[FetchResult, SendResult, int, Status]:
    import httpx

    from outbox.sinks.gridpulse import GridPulseClient, GridPulseSink
    from outbox.stages import housekeeping

    with Store.open(cfg.database) as store:
        fetched = run_fetch(cfg, store, ReplaySource(sample_dir()))
        say(
            f"fetch: {fetched.pages} EIA pages, {fetched.rows} observations staged "
            f"({fetched.written} written)"
        )
        with httpx.Client(timeout=30) as http:
            client = GridPulseClient(http, base_url, key)
            sent = run_send(cfg, store, GridPulseSink(client))
        say(f"send: {sent.sent} rows in {sent.batches} batches, {sent.acked} acknowledged")
        housekeeping.prune(cfg, store)  # as every `outbox send` ends
        acked = store.reads.count_state("acked")
        # The sample is a past day: show status as of the hour after it, not as of today.
        status = collect(cfg, store, now=SAMPLE_NOW)
    return fetched, sent, acked, status
