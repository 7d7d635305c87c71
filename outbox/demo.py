"""``outbox demo``: the whole job end to end on the bundled sample, offline.

In a temporary directory (or ``--keep DIR``): start the reference receiver on a free
127.0.0.1 port, fetch the bundled day of EIA-930 data by replay, send it, check that the
receiver holds exactly what the outbox acknowledged, and show the status.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from outbox.config import Config
from outbox.errors import OutboxError
from outbox.pipeline import FetchResult, SendResult, run_fetch, run_send
from outbox.status import Status, collect
from outbox.store import Store
from outbox.testing import sample_dir
from outbox.testing.receiver_proc import receiver_rows, running_receiver
from outbox.testing.synth import SAMPLE_HOURS, SAMPLE_START

SAMPLE_NOW = SAMPLE_START + timedelta(hours=SAMPLE_HOURS + 2)


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and where its files are."""

    workdir: Path
    fetch: FetchResult
    send: SendResult
    acked: int
    received: int
    kept: bool
    status: Status


def run_demo(
    keep: Path | None = None, say: Callable[[str], None] = print, config: Config | None = None
) -> DemoResult:
    """Run the demo; raise OutboxError when the receiver does not hold every acked row."""
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(16)
    try:
        with running_receiver(workdir, api_key=key) as receiver:
            say(f"receiver: {receiver.base_url} (database {receiver.db_path})")
            base = config or Config()
            cfg = base.model_copy(
                update={
                    "database": str(workdir / "outbox.db"),
                    "gridpulse": base.gridpulse.model_copy(
                        update={"base_url": receiver.base_url, "api_key": _secret(key)}
                    ),
                }
            )
            result = _run(cfg, receiver.base_url, key, say)
            received = len(receiver_rows(receiver.base_url, key))
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    fetched, sent, acked, status = result
    if received != acked or fetched.rows != acked:
        raise OutboxError(
            f"demo: {fetched.rows} staged, {acked} acked, but the receiver holds {received}"
        )
    return DemoResult(workdir, fetched, sent, acked, received, keep is not None, status)


def _secret(value: str):
    from pydantic import SecretStr

    return SecretStr(value)


def _run(
    cfg: Config, base_url: str, key: str, say: Callable[[str], None]
) -> tuple[FetchResult, SendResult, int, Status]:
    import httpx

    from outbox.gridpulse import GridPulseClient

    with Store.open(cfg.database) as store:
        fetched = run_fetch(cfg, store, replay=sample_dir())
        say(
            f"fetch: {fetched.pages} EIA pages, {fetched.rows} observations staged "
            f"({fetched.written} written)"
        )
        with httpx.Client(timeout=30) as http:
            client = GridPulseClient(http, base_url, key)
            sent = run_send(cfg, store, client)
        say(f"send: {sent.sent} rows in {sent.batches} batches, {sent.acked} acknowledged")
        acked = store.count_state("acked")
        # The sample is a past day: show status as of the hour after it, not as of today.
        status = collect(cfg, store, now=SAMPLE_NOW)
    return fetched, sent, acked, status
