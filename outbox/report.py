"""The HTML report: one self-contained file an operator opens from disk.

``outbox report [PATH]`` (and, with ``report_path`` set, every fetch and send run) writes
one HTML file with everything inside it: the ``--check`` verdict, small multiples of the
last days of values per dataset x BA with missing hours marked, the fuel mix stacked per
BA, interchange per counterparty, the backlog and the newest delivered hour over time, a
run timeline, freshness against each dataset's publication lag, and, when the outbox has
them, open quality findings and recent revisions.

Charts are drawn in the browser by uPlot (MIT, ~50 KB, vendored in
``outbox/report_assets``): a canvas time-series library fast enough for thousands of
series, and small enough to inline, so the file needs no network to view and any static
web server can serve it. Everything else (verdict, tables) is plain HTML rendered here,
readable without JavaScript.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from outbox import datasets as dataset_table
from outbox.config import Config
from outbox.store import RunRecord, Store
from outbox.timeutil import parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

DEFAULT_DAYS = 7
# Above this many balancing authorities the charts collapse to one per dataset with a
# BA selector: 65 BAs x 6 datasets of small multiples is no longer a page to read.
SELECTOR_ABOVE_BAS = 8
# How each dataset is drawn: one line, areas stacked (the fuel mix), or one line a series.
CHART_KINDS = {"generation": "stack", "ba_interchange": "multi"}
# Each BA's local time on hover (the five defaults and their neighbours; others show UTC).
BA_TIMEZONES = {
    "PJM": "America/New_York",
    "CAISO": "America/Los_Angeles",
    "CISO": "America/Los_Angeles",
    "MISO": "America/Chicago",
    "ERCOT": "America/Chicago",
    "ERCO": "America/Chicago",
    "SPP": "America/Chicago",
    "SWPP": "America/Chicago",
    "NYISO": "America/New_York",
    "NYIS": "America/New_York",
    "ISNE": "America/New_York",
    "BPAT": "America/Los_Angeles",
    "PACW": "America/Los_Angeles",
    "PACE": "America/Denver",
    "AZPS": "America/Phoenix",
    "TVA": "America/Chicago",
    "SOCO": "America/Chicago",
    "DUK": "America/New_York",
    "FPL": "America/New_York",
}
RECENT_RUNS = 200
RECENT_REVISIONS = 50


def build(config: Config, *, days: int = DEFAULT_DAYS, now: datetime | None = None) -> dict:
    """Everything the report shows, as plain data (embedded in the page as JSON)."""
    from outbox import status as status_mod

    now = now or utcnow()
    model = status_mod.read(config, now)
    code, line = status_mod.evaluate(config, model)
    with status_mod.open_store(config) as store:
        oldest, newest = store.reads.ts_range()
        end = parse_ts(newest) if newest else now.replace(minute=0, second=0, microsecond=0)
        # The last ``days`` of staged data, not of the calendar: an outbox behind (or a
        # replayed past day) still shows its newest values; no wider than the data.
        start = end - timedelta(days=days)
        if oldest is not None:
            start = max(start, parse_ts(oldest))
        since, until = to_ts(start), to_ts(end)
        values = store.reads.values_between(since, until)
        absent = store.reads.missing_hours(since, until)
        staged, acked = store.reads.flow_by_minute()
        runs = store.runs.recent_runs(limit=RECENT_RUNS)
        findings = _findings(store)
        revisions = _revisions(store, since)
    dataset_of = {s.series_id: (s.dataset, s.ba) for s in model.series}
    groups = _groups(values, absent, dataset_of, start, end, findings, revisions)
    bas = sorted({g["ba"] for g in groups})
    label = status_mod.LABELS[code]
    return {
        "generated_at": to_ts(now),
        "database": str(config.database),
        "window": {"start": since, "end": until, "days": days},
        "t0": int(start.timestamp()),
        "step": 3600,
        "n": int((end - start).total_seconds() // 3600) + 1,
        "verdict": {
            "code": code,
            "label": label,
            "summary": line,
            "reasons": [text for _, text in status_mod.problems(config, model)],
        },
        "totals": model.totals,
        "groups": groups,
        "bas": bas,
        "selector": len(bas) > SELECTOR_ABOVE_BAS,
        "backlog": _backlog(staged, acked, model.totals["pending"]),
        "runs": [_run(r) for r in reversed(runs)],
        "freshness": [_freshness(g) for g in model.groups if g.enabled],
        "findings": findings,
        "revisions": revisions,
        "tz": {ba: tz for ba, tz in BA_TIMEZONES.items() if ba in bas},
    }


def _groups(
    values: Iterable[tuple[str, str, float | None]],
    absent: Iterable[tuple[str, str]],
    dataset_of: dict[str, tuple[str, str]],
    start: datetime,
    end: datetime,
    findings: Sequence[dict[str, Any]],
    revisions: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    n = int((end - start).total_seconds() // 3600) + 1
    # The outbox's ts text is canonical (to_ts): each hour of the window by its text.
    hour_of = {to_ts(start + timedelta(hours=i)): i for i in range(n)}
    series: dict[str, list[float | None]] = {}
    gaps: dict[str, set[str]] = {}
    for sid, ts, value in values:
        row = series.get(sid)
        if row is None:
            row = series[sid] = [None] * n
        i = hour_of.get(ts)
        if i is not None:
            row[i] = value
        if value is None:
            gaps.setdefault(sid, set()).add(ts)
    for sid, ts in absent:
        gaps.setdefault(sid, set()).add(ts)
    grouped: dict[tuple[str, str], list[str]] = {}
    for sid in series:
        dataset, ba = dataset_of.get(sid) or _guess(sid)
        grouped.setdefault((dataset, ba), []).append(sid)
    out = []
    for (dataset, ba), sids in sorted(grouped.items(), key=lambda kv: (_rank(kv[0][0]), kv[0][1])):
        sids.sort()
        group_gaps = sorted({ts for sid in sids for ts in gaps.get(sid, ())})
        out.append(
            {
                "id": f"{dataset}-{ba}",
                "dataset": dataset,
                "ba": ba,
                "title": f"{dataset_table.title(dataset)} · {ba}",
                "kind": CHART_KINDS.get(dataset, "line"),
                "series": [
                    {"id": sid, "label": _label(sid), "values": series[sid]} for sid in sids
                ],
                "gaps": group_gaps,
                "gap_series": {sid: sorted(gaps[sid]) for sid in sids if gaps.get(sid)},
                "marks": _marks(ba, set(sids), findings, revisions),
            }
        )
    return out


def _rank(dataset: str) -> int:
    return dataset_table.order(dataset)


def _guess(series_id: str) -> tuple[str, str]:
    parts = series_id.split(".")
    return (parts[2] if len(parts) > 2 else series_id), (parts[1] if len(parts) > 1 else "")


def _label(series_id: str) -> str:
    parts = series_id.split(".")
    return parts[3] if len(parts) > 3 else parts[-1]


def _marks(
    ba: str,
    sids: set[str],
    findings: Sequence[dict[str, Any]],
    revisions: Sequence[dict[str, Any]],
) -> list[dict[str, str]]:
    marks = [
        {"ts": f["start"], "kind": "finding", "text": f"{f['rule']} ({f['severity']})"}
        for f in findings
        if f.get("resolved_at") is None
        and (f.get("series_id") in sids or (f.get("series_id") is None and f.get("ba") == ba))
    ]
    marks += [
        {"ts": r["ts"], "kind": "revision", "text": f"revised {r['old_value']} → {r['new_value']}"}
        for r in revisions
        if r["series_id"] in sids
    ]
    return marks


def _backlog(
    staged: Sequence[tuple[str, int]], acked: Sequence[tuple[str, int, str]], pending_now: int
) -> dict[str, list[Any]]:
    """Pending rows and the newest acknowledged hour after each minute anything happened.

    The backlog is counted back from ``pending_now``: rows pruned since (staged minutes
    lose them, acknowledged minutes do not) and revisions (a row staged once, acknowledged
    twice) then shift only the oldest minutes, never today's figure.
    """
    events: dict[str, list[Any]] = {}
    for minute, n in staged:
        events.setdefault(minute, [0, 0, None])[0] += n
    for minute, n, newest in acked:
        slot = events.setdefault(minute, [0, 0, None])
        slot[1] += n
        slot[2] = newest
    t, pending, delivered = [], [], []
    total_staged = total_acked = 0
    newest_acked: str | None = None
    for minute in sorted(events):
        s, a, newest = events[minute]
        total_staged += s
        total_acked += a
        if newest is not None and (newest_acked is None or newest > newest_acked):
            newest_acked = newest
        t.append(int(parse_ts(minute + ":00Z").timestamp()))
        pending.append(total_staged - total_acked)
        delivered.append(int(parse_ts(newest_acked).timestamp()) if newest_acked else None)
    shift = pending_now - (total_staged - total_acked)
    return {"t": t, "pending": [max(0, p + shift) for p in pending], "delivered": delivered}


def _run(run: RunRecord) -> dict[str, Any]:
    from outbox.status.model import run_seconds

    counts = run.counts or {}
    rows = counts.get("staged", counts.get("acked", counts.get("rows", 0)))
    return {
        "id": run.id,
        "stage": run.stage,
        "started_at": run.started_at,
        "t": int(parse_ts(run.started_at).timestamp()),
        "seconds": run_seconds(run),
        "status": run.status,
        "rows": rows if isinstance(rows, int) else 0,
        "error": run.error,
    }


def _freshness(g: Any) -> dict[str, Any]:
    return {
        "dataset": g.dataset,
        "ba": g.ba,
        "newest": g.newest_staged,
        "age_seconds": g.freshness_seconds,
        "warning_seconds": g.stale_warning_seconds,
        "critical_seconds": g.stale_critical_seconds,
        "state": g.freshness_state,
    }


def _findings(store: Store) -> list[dict[str, Any]]:
    """Open data-quality findings (none on an outbox from before the ledger)."""
    from outbox.quality.ledger import findings

    return findings(store, open_only=True)


def _revisions(store: Store, since: str) -> list[dict[str, Any]]:
    """The newest revisions of hours in the window, newest last."""
    from outbox.quality.ledger import revisions

    # A revision of an hour in the window is seen after that hour: seen_at >= since.
    return [r for r in revisions(store, since=since) if r["ts"] >= since][-RECENT_REVISIONS:]


# -- rendering -----------------------------------------------------------------------


def _asset(name: str) -> str:
    return resources.files("outbox").joinpath("report_assets", name).read_text("utf-8")


def render(data: dict) -> str:
    """The whole page: scripts, styles and data inline, nothing fetched at view time."""
    payload = orjson.dumps(data).decode()
    # Inside <script>, "</" would end the element early; JSON allows "\/" for "/".
    payload = payload.replace("</", "<\\/")
    verdict = data["verdict"]
    parts = {
        "TITLE": html.escape(f"GridPulse outbox report · {verdict['label']}"),
        "CSS": _asset("uPlot.min.css") + _asset("report.css"),
        "HEADER": _header(data),
        "TABLES": _tables(data),
        "DATA": payload,
        "UPLOT": _asset("uPlot.iife.min.js"),
        "APP": _asset("report.js"),
    }
    page = _asset("report.html")
    for key, value in parts.items():
        page = page.replace("{{" + key + "}}", value)
    return page


def _header(data: dict) -> str:
    v, w = data["verdict"], data["window"]
    label = html.escape(v["label"])
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in v["reasons"])
    return (
        f'<div id="verdict" class="verdict v{v["code"]}">'
        f'<span class="label">{label}</span> <span id="summary">{html.escape(_short(v))}</span>'
        f"{f'<ul id=reasons>{reasons}</ul>' if reasons else ''}</div>"
        f'<p class="meta">Outbox <code>{html.escape(data["database"])}</code>, written '
        f"{html.escape(data['generated_at'])}. Values from {html.escape(w['start'])} to "
        f"{html.escape(w['end'])} (the newest staged hours, at most {w['days']} days). "
        "Times are UTC; EIA hours are <b>hour-ending</b>: 14:00 covers 13:00–14:00 UTC. "
        "Hover a chart for the BA's local time.</p>"
    )


def _short(verdict: dict) -> str:
    """The summary line, or a count when the reasons follow as a list."""
    n = len(verdict["reasons"])
    if n <= 1:
        summary: str = verdict["summary"]
        return summary.partition(" - ")[2] or summary
    return f"{n} problems:"


def _tables(data: dict) -> str:
    return _freshness_table(data["freshness"]) + _findings_table(data) + _revisions_table(data)


def _freshness_table(rows: Sequence[dict[str, Any]]) -> str:
    """Dataset rows x BA columns: the age of the newest hour, coloured by its state."""
    bas = sorted({r["ba"] for r in rows})
    cells: dict[tuple[str, str], dict[str, Any]] = {(r["dataset"], r["ba"]): r for r in rows}
    datasets = sorted({r["dataset"] for r in rows}, key=_rank)
    head = "".join(f"<th>{html.escape(ba)}</th>" for ba in bas)
    body = []
    for dataset in datasets:
        tds = []
        for ba in bas:
            r = cells.get((dataset, ba))
            if r is None:
                tds.append("<td>-</td>")
                continue
            title = (
                f"newest {r['newest'] or 'none'}; warn after {_hours(r['warning_seconds'])}, "
                f"critical after {_hours(r['critical_seconds'])}"
            )
            tds.append(
                f'<td class="f-{html.escape(r["state"])}" title="{html.escape(title)}">'
                f"{_hours(r['age_seconds'])} <small>{html.escape(r['state'])}</small></td>"
            )
        lag = cells.get((dataset, bas[0])) if bas else None
        limits = (
            f"warn {_hours(lag['warning_seconds'])} / crit {_hours(lag['critical_seconds'])}"
            if lag
            else ""
        )
        body.append(
            f"<tr><th>{html.escape(dataset)} <small>{limits}</small></th>{''.join(tds)}</tr>"
        )
    return (
        '<section id="freshness"><h2>Freshness: age of the newest hour against the '
        "dataset's publication lag</h2>"
        f"<table><thead><tr><th>dataset</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


FINDING_COLUMNS = (
    ("rule", "rule"),
    ("ba", "BA"),
    ("series_id", "series"),
    ("start", "from"),
    ("end", "to"),
    ("severity", "severity"),
    ("detail", "detail"),
)
REVISION_COLUMNS = (
    ("series_id", "series"),
    ("ts", "hour"),
    ("old_value", "old"),
    ("new_value", "new"),
    ("seen_at", "seen"),
)


def _findings_table(data: dict) -> str:
    return _table("findings", "Open quality findings", FINDING_COLUMNS, data["findings"])


def _revisions_table(data: dict) -> str:
    return _table("revisions", "Recent revisions", REVISION_COLUMNS, data["revisions"])


def _table(
    section: str, title: str, columns: Sequence[tuple[str, str]], rows: Sequence[dict]
) -> str:
    """A section with a plain HTML table of ``rows`` (none: no section at all)."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_cell(row.get(key)))}</td>" for key, _ in columns)
        + "</tr>"
        for row in rows
    )
    return (
        f'<section id="{section}"><h2>{html.escape(title)}</h2><table><thead><tr>{head}'
        f"</tr></thead><tbody>{body}</tbody></table></section>"
    )


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _hours(seconds: int | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.1f} h"


# -- writing -------------------------------------------------------------------------


def write_report(
    config: Config,
    path: str | os.PathLike[str],
    *,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
) -> Path:
    """Build, render and write the report for ``config``'s outbox (as of ``now``)."""
    from outbox.files import REPORT_HEAD, write_atomic

    page = render(build(config, days=days, now=now))
    return write_atomic(
        path, page, prefix=f".{Path(path).name}.", replaces=REPORT_HEAD, what="report"
    )


def write_run_report(config: Config) -> None:
    """After a fetch or send run: rewrite ``report_path`` if configured; never raises."""
    if not config.report_path:
        return
    try:
        write_report(config, config.report_path)
    except Exception as exc:  # the report must never fail the run it describes
        log.warning("report not written path=%s error=%s", config.report_path, str(exc)[:300])
