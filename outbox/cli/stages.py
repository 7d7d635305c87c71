"""``outbox fetch`` and ``outbox send``: the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from outbox.cli.app import (
    app,
    configured,
    mapped_errors,
)
from outbox.cli.options import check_datasets, check_directory, parse_bounds
from outbox.errors import UsageError


@app.command()
def fetch(
    replay: Annotated[
        Path | None,
        typer.Option(help="Stage saved EIA v2 response bodies (*.json) from DIR; no network."),
    ] = None,
    start: Annotated[
        str | None, typer.Option(help="Backfill from this date or RFC 3339 time (UTC).")
    ] = None,
    end: Annotated[
        str | None, typer.Option(help="Backfill through this date or time (inclusive, UTC).")
    ] = None,
    ba: Annotated[
        list[str] | None,
        typer.Option("--ba", metavar="BA", help="Only this balancing authority (repeat)."),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", metavar="DATASET", help="Only this dataset (repeat)."),
    ] = None,
    fill_gaps: Annotated[
        bool, typer.Option("--fill-gaps", help="Re-request exactly the missing hours.")
    ] = False,
    lookback: Annotated[
        int | None,
        typer.Option(
            min=1, metavar="HOURS", help="Re-check at least this many hours back (deep re-check)."
        ),
    ] = None,
) -> None:
    """Pull new and revised hourly observations from EIA into the outbox."""
    from outbox import commands

    with mapped_errors():
        config = configured()
        bounds = parse_bounds(start, end)
        if replay is not None and (bounds[0] or fill_gaps or lookback):
            raise UsageError(
                "--replay cannot be combined with --start/--end, --fill-gaps or --lookback"
            )
        if dataset:
            check_datasets(dataset)
        if replay is not None:
            check_directory("--replay", replay, must_exist=True)
        code = commands.fetch(
            config,
            replay=replay,
            start=bounds[0],
            end=bounds[1],
            bas=ba,
            datasets=dataset,
            fill_gaps=fill_gaps,
            lookback=lookback,
        )
    raise typer.Exit(code)


@app.command()
def send(
    max_batches: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many batches.")
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option(min=0, help="Stop starting new batches after this long.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be sent; send nothing.")
    ] = False,
) -> None:
    """Deliver pending rows to GridPulse in batches and record each acknowledgement."""
    from outbox import commands

    with mapped_errors():
        config = configured()
        code = commands.send(
            config, max_batches=max_batches, max_seconds=max_seconds, dry_run=dry_run
        )
    raise typer.Exit(code)
