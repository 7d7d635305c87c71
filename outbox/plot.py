"""``outbox plot``: series as line charts in the terminal, for an SSH session on the box.

Drawn by plotext. A missing hour (absent, or EIA's null) breaks the line, so gaps show.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from outbox.config import Config
from outbox.timeutil import parse_ts, to_ts

MAX_SERIES = 8
_DATE_FORM = "Y-m-d H:M"


def segments(
    rows: Iterable[tuple[str, str, float | None]],
) -> dict[str, list[list[tuple[str, float]]]]:
    """Per series, its runs of consecutive hours with a value (a gap starts a new run)."""
    out: dict[str, list[list[tuple[str, float]]]] = {}
    last: dict[str, str] = {}
    for sid, ts, value in rows:
        runs = out.setdefault(sid, [])
        if value is None:
            last.pop(sid, None)
            continue
        before = last.get(sid)
        if before is None or parse_ts(ts) - parse_ts(before) != timedelta(hours=1) or not runs:
            runs.append([])
        runs[-1].append((ts, value))
        last[sid] = ts
    return out


def render(
    rows: Iterable[tuple[str, str, float | None]], *, title: str, width: int, height: int
) -> str:
    """The chart as text (no colour codes), one line a series in the legend."""
    import plotext as plt

    found = segments(rows)
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    plt.date_form(_DATE_FORM)
    colors = ["blue", "red", "green", "orange", "magenta", "cyan", "gray", "black"]
    for i, (sid, runs) in enumerate(sorted(found.items())):
        for j, run in enumerate(runs):
            xs = [_date(ts) for ts, _ in run]
            ys = [v for _, v in run]
            plt.plot(xs, ys, label=sid if j == 0 else None, color=colors[i % len(colors)])
    plt.title(title)
    chart: str = plt.uncolorize(plt.build())
    return chart


def _date(ts: str) -> str:
    return to_ts(parse_ts(ts))[:16].replace("T", " ")


_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None]) -> str:
    """One character an hour: eight heights between the window's min and max; a gap is a space."""
    present = [v for v in values if v is not None]
    if not present:
        return " " * len(values)
    lo, hi = min(present), max(present)
    scale = (len(_BLOCKS) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join(" " if v is None else _BLOCKS[round((v - lo) * scale)] for v in values)


def literal_glob(text: str) -> str:
    """``text`` as a GLOB pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def plot_series(config: Config, pattern: str, *, days: int, width: int, height: int) -> str:
    """``outbox plot GLOB``: the matching series of the last ``days`` staged, as a chart
    under a line that says which hours it spans."""
    from outbox.errors import UsageError
    from outbox.status import open_store

    with open_store(config) as store:
        _, newest = store.reads.ts_range()
        if newest is None:
            raise UsageError("the outbox holds no rows yet: nothing to plot")
        since = to_ts(parse_ts(newest) - timedelta(days=days))
        rows = store.reads.values_between(since, newest, pattern)
    names = sorted({r[0] for r in rows})
    if not names:
        raise UsageError(f"no series matches {pattern!r} (series ids look like EIA.PJM.demand)")
    if len(names) > MAX_SERIES:
        raise UsageError(
            f"{pattern!r} matches {len(names)} series; at most {MAX_SERIES} fit one chart "
            f"(e.g. {names[0]}, {names[1]}, ...): narrow the glob"
        )
    head = f"{pattern}: {since[:13]}h .. {newest[:13]}h UTC, hour-ending; gaps break the line"
    return f"{head}\n{render(rows, title='', width=width, height=height)}"
