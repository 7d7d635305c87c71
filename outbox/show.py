"""``outbox show SERIES TS``: one observation, its delivery state, the raw EIA row it came
from, its revisions and the series around it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from outbox.config import Config
from outbox.store import Store
from outbox.timeutil import parse_ts, to_ts

SPARK_HOURS = 12


def observation(config: Config, series_id: str, ts: str) -> dict[str, Any] | None:
    """What ``outbox show`` prints as JSON; None when the outbox has no such row."""
    from outbox.quality.ledger import history
    from outbox.status import open_store

    with open_store(config) as store:  # reads only: creates and migrates nothing
        row = store.reads.row(series_id, ts)
        if row is None:
            return None
        page_info, source = _source(store, row)
        revised = history(store, series_id, ts)
        around = _around(store, series_id, row["ts"])
    out: dict[str, Any] = {"observation": row, "eia_row": source, "around": around}
    if page_info is not None:
        out["page"] = {k: page_info[k] for k in ("id", "route", "url", "fetched_at", "run_id")}
    out["revisions"] = revised
    return out


def _source(store: Store, row: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
    """The raw page the row was staged from, and the row's entry in it."""
    import orjson

    if row.get("page_id") is None:
        return None, None
    found = store.reads.page_body(row["page_id"])
    if found is None:
        return None, None
    page_info, body = found
    data = (orjson.loads(body).get("response") or {}).get("data") or []
    index = row.get("page_row")
    if index is not None and 0 <= index < len(data):
        return page_info, data[index]
    return page_info, None


def _around(store: Store, series_id: str, ts: str) -> dict[str, Any]:
    """The series 12 hours either side of ``ts`` as a sparkline (the row's hour bracketed)."""
    from outbox.plot import literal_glob, sparkline

    at = parse_ts(ts)
    hours = [at + timedelta(hours=h) for h in range(-SPARK_HOURS, SPARK_HOURS + 1)]
    found = {
        t: v
        for _, t, v in store.reads.values_between(
            to_ts(hours[0]), to_ts(hours[-1]), literal_glob(series_id)
        )
    }
    values = [found.get(to_ts(h)) for h in hours]
    line = sparkline(values)
    marked = f"{line[:SPARK_HOURS]}[{line[SPARK_HOURS]}]{line[SPARK_HOURS + 1 :]}"
    present = [v for v in values if v is not None]
    return {
        "from": to_ts(hours[0]),
        "to": to_ts(hours[-1]),
        "sparkline": marked,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }
