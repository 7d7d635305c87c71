"""The ``outbox revisions`` and ``outbox quality`` listings (text and ``--json``)."""

from __future__ import annotations

import json
from typing import Any

import typer

from outbox.config import Config
from outbox.quality import ledger


def _open(config: Config) -> Any:
    from outbox.status import open_store

    return open_store(config)


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:g}"


def revisions(
    config: Config,
    *,
    since: str | None,
    series: str | None,
    min_change: float | None,
    as_json: bool,
) -> None:
    """Print the ledger rows that match, oldest first."""
    with _open(config) as store:
        rows = ledger.revisions(store, since=since, series=series, min_change_pct=min_change)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        pct = "" if r["change_pct"] is None else f" ({r['change_pct']:+g}%)"
        flags = ""
        if r["old_quality_flag"] != r["new_quality_flag"]:
            flags = f" [{r['old_quality_flag']} -> {r['new_quality_flag']}]"
        typer.echo(
            f"{r['seen_at']}  run {r['run_id'] if r['run_id'] is not None else '-':>4}  "
            f"{r['series_id']} {r['ts']}: {_number(r['old_value'])} -> "
            f"{_number(r['new_value'])}{pct}{flags}"
        )
    series_n = len({(r["series_id"], r["ts"]) for r in rows})
    typer.echo(f"{len(rows)} revisions of {series_n} rows")


def findings(
    config: Config,
    *,
    since: str | None,
    rule: str | None,
    ba: str | None,
    open_only: bool,
    as_json: bool,
) -> None:
    """Print the findings that match, newest hours first, and what was not checked."""
    with _open(config) as store:
        rows = ledger.findings(store, since=since, rule=rule, ba=ba, open_only=open_only)
    notes = _not_checked(config, rule)
    if as_json:
        typer.echo(json.dumps({"findings": rows, "not_checked": notes}, indent=2))
        return
    for f in rows:
        state = "open" if f["resolved_at"] is None else f"resolved {f['resolved_at']}"
        hours = f["start"] if f["start"] == f["end"] else f"{f['start']} .. {f['end']}"
        typer.echo(
            f"{f['severity']:<4}  {f['rule']:<19} {f['ba']:<6} {f['series_id'] or '-'}  "
            f"{hours}  {f['detail']}  ({state})"
        )
    n_open = sum(1 for f in rows if f["resolved_at"] is None)
    typer.echo(f"{len(rows)} findings, {n_open} open")
    for note in notes:
        typer.echo(f"not checked: {note}")


def _not_checked(config: Config, rule: str | None) -> list[str]:
    """Rules that cannot run with this configuration, and why."""
    notes = []
    if not config.quality.enabled:
        notes.append("quality checks are off (quality.enabled: false)")
    enabled = set(config.enabled_datasets())
    if rule in (None, "interchange_sum") and "ba_interchange" not in enabled:
        notes.append(
            "interchange_sum: ba_interchange is not fetched, so no BA's counterparties are known"
        )
    if rule in (None, "fuel_sum") and "generation" not in enabled:
        notes.append("fuel_sum: generation is not fetched")
    if rule in (None, "balance") and not {"demand", "net_generation", "interchange"} <= enabled:
        notes.append("balance: needs demand, net_generation and interchange")
    return notes
