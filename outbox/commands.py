"""Command bodies behind the CLI: build clients, open the store, run a stage, print.

Each function returns the process exit code; errors derive from OutboxError and are
mapped to exit codes by the CLI.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from outbox.config import Config
from outbox.errors import OutboxError
from outbox.pipeline import SendFailed, Window, retry_policy, run_fetch, run_send
from outbox.redact import redact
from outbox.store import Store
from outbox.timeutil import to_ts

log = logging.getLogger(__name__)


def _http(timeout: float, connect: float, verify: bool):
    from outbox.cli import http_client

    return http_client(timeout, connect, verify)


def eia_client(config: Config, http: Any) -> Any:
    """The EIA client for a live fetch (needs the key)."""
    from outbox.eia import EIAClient

    e = config.eia
    return EIAClient(
        http,
        e.base_url,
        config.require_eia_key(),
        page_length=e.page_length,
        retry=retry_policy(e.retry),
        max_per_second=e.max_requests_per_second,
        max_per_hour=e.max_requests_per_hour,
    )


def gridpulse_client(config: Config, http: Any) -> Any:
    """The GridPulse ingest client (needs the key)."""
    from outbox.gridpulse import GridPulseClient

    g = config.gridpulse
    return GridPulseClient(http, g.base_url, config.require_gridpulse_key(), gzip=g.gzip)


def fetch(
    config: Config,
    *,
    replay: Path | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    bas: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    fill_gaps: bool = False,
) -> int:
    """``outbox fetch``: replay, backfill or incremental."""
    if fill_gaps:
        raise OutboxError("fetch --fill-gaps: not available yet")
    with Store.open(config.database) as store:
        if replay is not None:
            result = run_fetch(config, store, replay=replay)
        else:
            e = config.eia
            with _http(e.timeout_seconds, e.connect_timeout_seconds, e.verify_tls) as http:
                client = eia_client(config, http)
                initial = None
                if start is None and not store.watermarks():
                    initial = gridpulse_starts(config, store)
                with _progress(start is not None) as progress:
                    result = run_fetch(
                        config,
                        store,
                        client=client,
                        start=start,
                        end=end,
                        bas=bas,
                        datasets=datasets,
                        initial=initial,
                        progress=progress,
                    )
    if result.skipped:
        typer.echo(f"a fetch is already running (pid {result.holder}); nothing to do")
        return 0
    invalid = result.counts()["invalid"]
    typer.echo(
        f"fetch run {result.run_id}: {result.requests} requests, {result.pages} pages, "
        f"{result.rows} rows, {result.written} written, {invalid} invalid, "
        f"{result.duplicates} duplicates"
    )
    return 0


def gridpulse_starts(config: Config, store: Store) -> dict[str, datetime] | None:
    """For a new outbox: start each stream at GridPulse's latest instead of history start.

    Returns None (history start applies) when GridPulse is not configured or unreachable.
    """
    if config.gridpulse.api_key is None:
        return None
    from outbox.pipeline import plan_streams
    from outbox.timeutil import parse_ts

    g = config.gridpulse
    try:
        with _http(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http:
            listing = gridpulse_client(config, http).list_series()
    except OutboxError as exc:
        log.info("gridpulse latest unavailable, starting at history_start error=%s", exc)
        return None
    latest: dict[str, datetime] = {}
    for stream in plan_streams(config):
        prefix = _series_prefix(config, stream.dataset, stream.respondent)
        found = [
            parse_ts(s["latest_ts"])
            for s in listing
            if s.get("latest_ts") and str(s.get("series_id", "")).startswith(prefix)
        ]
        if found:
            latest[stream.key] = min(found)
    return latest or None


def _series_prefix(config: Config, dataset: str, respondent: str) -> str:
    ba = config.eia_to_gridpulse.get(respondent, respondent)
    kind = {"ba_interchange": "interchange.", "generation": "generation."}.get(dataset)
    return f"EIA.{ba}.{kind}" if kind else f"EIA.{ba}.{dataset}"


class _NullProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(backfill: bool):
    """A rich progress bar on a TTY; periodic log lines otherwise."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        if not backfill:
            yield None
            return
        if sys.stderr.isatty():
            from rich.progress import Progress

            with Progress(transient=False) as prog:
                task = prog.add_task("backfill", total=None)

                def tick(done: int, total: int, window: Window) -> None:
                    prog.update(task, completed=done, total=total, description=_label(window))

                yield tick
            return

        def line(done: int, total: int, window: Window) -> None:
            log.info("backfill progress done=%d total=%d window=%s", done, total, _label(window))

        yield line

    return bar()


def _label(window: Window) -> str:
    return f"{window.route.rsplit('/', 1)[-1]} {to_ts(window.start)[:13]}..{to_ts(window.end)[:13]}"


def send(
    config: Config,
    *,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    dry_run: bool = False,
) -> int:
    """``outbox send``."""
    g = config.gridpulse
    key_needed = not dry_run
    with (
        Store.open(config.database) as store,
        _http(g.timeout_seconds, g.connect_timeout_seconds, g.verify_tls) as http,
    ):
        client = gridpulse_client(config, http) if key_needed else None
        try:
            result = run_send(
                config,
                store,
                client,  # type: ignore[arg-type]
                max_batches=max_batches,
                max_seconds=max_seconds,
                dry_run=dry_run,
            )
        except SendFailed as exc:
            typer.echo(f"error: {redact(str(exc))}; rows stay pending", err=True)
            return 1
    if result.skipped:
        typer.echo(f"a send is already running (pid {result.holder}); exiting")
        return 0
    if dry_run:
        batches = math.ceil(result.due / g.batch_size) if result.due else 0
        typer.echo(f"dry run: {result.due} rows due, {batches} batches to {g.base_url}")
        return 0
    typer.echo(
        f"send run {result.run_id}: {result.sent} rows in {result.batches} batches, "
        f"{result.acked} acked, {result.rejected} dead, {result.bytes} bytes"
    )
    return 0


def status(config: Config, *, as_json: bool, metrics: Path | None, remote: bool) -> int:
    """``outbox status`` (table or JSON)."""
    from outbox import status as status_mod

    if remote:
        raise OutboxError("status --remote: not available yet")
    with Store.open(config.database) as store:
        model = status_mod.collect(config, store)
    if metrics is not None:
        raise OutboxError("status --metrics: not available yet")
    if as_json:
        typer.echo(json.dumps(model.to_dict(), indent=2))
        return 0
    from rich.console import Console

    Console(soft_wrap=True).print(status_mod.render_table(model))
    return 0


def status_check(config_path: Path | None) -> int:
    """``outbox status --check``: never raises; UNKNOWN when the status cannot be read."""
    from outbox import status as status_mod
    from outbox.config import load_config

    try:
        config = load_config(config_path)
        with Store.open(config.database) as store:
            model = status_mod.collect(config, store)
        code, line = status_mod.evaluate(config, model)
    except Exception as exc:  # a probe reports, it does not crash
        code, line = status_mod.UNKNOWN, f"UNKNOWN - {redact(str(exc))}"
    typer.echo(line)
    return code


def show(config: Config, series_id: str, ts: str) -> int:
    """``outbox show SERIES TS``: the row, its states and its raw EIA row."""
    import orjson

    with Store.open(config.database) as store:
        row = store.row(series_id, ts)
        if row is None:
            typer.echo(f"no observation {series_id} at {ts}", err=True)
            return 1
        source = None
        page_info: dict[str, Any] | None = None
        if row.get("page_id") is not None:
            found = store.page_body(row["page_id"])
            if found is not None:
                page_info, body = found
                data = (orjson.loads(body).get("response") or {}).get("data") or []
                index = row.get("page_row")
                if index is not None and 0 <= index < len(data):
                    source = data[index]
    out = {"observation": row, "eia_row": source}
    if page_info is not None:
        out["page"] = {k: page_info[k] for k in ("id", "route", "url", "fetched_at", "run_id")}
    typer.echo(json.dumps(out, indent=2, default=str))
    return 0


def runs(config: Config, *, limit: int, stage: str | None, failed: bool, as_json: bool) -> None:
    """``outbox runs``."""
    from dataclasses import asdict

    with Store.open(config.database) as store:
        records = store.recent_runs(limit=limit, stage=stage, failed=failed)
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in records], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("id", "stage", "started", "seconds", "status", "counts / error"):
        table.add_column(col)
    for r in records:
        detail = r.error or " ".join(
            f"{k}={v}" for k, v in r.counts.items() if not isinstance(v, dict)
        )
        table.add_row(str(r.id), r.stage, r.started_at, _duration(r), r.status, detail)
    Console(soft_wrap=True).print(table)


def _duration(r: Any) -> str:
    from outbox.timeutil import parse_ts

    if not r.finished_at:
        return "-"
    return f"{(parse_ts(r.finished_at) - parse_ts(r.started_at)).total_seconds():.0f}"


def demo(keep: Path | None) -> int:
    """``outbox demo``: fetch the sample, send it to a local receiver, show status."""
    from rich.console import Console

    from outbox import status as status_mod
    from outbox.demo import run_demo

    result = run_demo(keep, say=typer.echo)
    Console(soft_wrap=True).print(status_mod.render_table(result.status))
    typer.echo(
        f"ok: the receiver holds all {result.received} observations; "
        f"{result.acked} acknowledged in the outbox, 0 pending"
    )
    if not result.kept:
        typer.echo("run `outbox demo --keep DIR` to keep the files and look inside with sqlite3")
        return 0
    db = result.workdir / "outbox.db"
    typer.echo("look inside:")
    typer.echo(f"  sqlite3 -header -column {db} 'select * from series_status limit 10'")
    typer.echo(f"  sqlite3 {db} 'select count(*) from pending'")
    typer.echo(f"  OUTBOX_DB={db} outbox show EIA.PJM.demand 2025-08-21T14:00:00Z")
    return 0
