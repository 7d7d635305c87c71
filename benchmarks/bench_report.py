"""The HTML report: time to write it and its size, for 5 and for 65 BAs over 7 days.

Each case stages synthetic EIA pages (all three routes, every dataset) into a fresh outbox
by replay, then times ``write_report`` (build from the outbox + render + atomic write) and
reports the file's size. Targets (issue: "See it without asking"): 5 BAs x all datasets x
7 days written in under 2 s and under 3 MB; 65 BAs still usable (one BA at a time).
"""

from __future__ import annotations

from pathlib import Path

from _common import (
    START,
    choose_bas,
    config_for,
    emit,
    figure,
    log,
    parser,
    replay_pages,
    rows_per_hour,
    timed,
    workdir,
)

from outbox.report import write_report
from outbox.sources.replay import ReplaySource
from outbox.stages.fetch import run_fetch
from outbox.store import Store
from outbox.testing import synth

CASES = {"smoke": ((5, 48),), "full": ((5, 168), (65, 168))}
ROUNDS = {"smoke": 2, "full": 3}


def main() -> None:
    """Print one JSON object: per case, seconds (median), bytes, series and groups."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    out: dict[str, object] = {"size": args.size, "start": START.isoformat()}
    with workdir(args.workdir) as work:
        for bas, hours in CASES[args.size]:
            out[f"{bas}_bas"] = _case(work, args.cache, bas, hours, ROUNDS[args.size])
    emit(out)


def _pages(cache: Path, bas: int, hours: int) -> tuple[list[str], dict[str, object]]:
    """Pages of the five default BAs (all their fuels and counterparties), or of ``bas``."""
    if bas == len(synth.DEFAULT_RESPONDENTS):
        directory = cache / f"report-default-{hours}h"
        if not directory.is_dir():
            synth.write_sample(directory, start=START, hours=hours)
        rows = sum(len(v) for v in synth.read_rows(directory).values())
        return list(synth.DEFAULT_RESPONDENTS), {"dir": str(directory), "rows": rows}
    codes = choose_bas(bas)
    rows = rows_per_hour(codes, ("region", "fuel", "interchange")) * hours
    return codes, replay_pages(cache, rows, bas=bas)


def _case(work: Path, cache: Path, bas: int, hours: int, rounds: int) -> dict[str, object]:
    codes, pages = _pages(cache, bas, hours)
    db = work / f"report-{bas}.db"
    config = config_for(db).model_copy(update={"balancing_authorities": {c: c for c in codes}})
    with Store.open(db) as store:
        run_fetch(config, store, ReplaySource(Path(pages["dir"])))
    target = work / f"report-{bas}.html"
    runs = []
    for i in range(rounds):
        seconds, _ = timed(lambda: write_report(config, target))
        runs.append(seconds)
        log(f"{bas} BAs: report in {seconds:.3f}s (round {i + 1})")
    size = target.stat().st_size
    return figure(
        pages["rows"],
        runs,
        bas=bas,
        hours=hours,
        bytes=size,
        megabytes=round(size / 1e6, 3),
        under_2s=min(runs) < 2.0,
        under_3mb=size < 3_000_000,
    )


if __name__ == "__main__":
    main()
