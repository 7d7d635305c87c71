"""The Grafana dashboard under deploy/ queries only metrics that `status --metrics` writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from outbox.sample import sample_dir
from tests.durability import outbox, outbox_env

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "gridpulse-outbox.json"
# PromQL words that look like metric names but are functions or label values.
_NOT_METRICS = {"time", "max", "sum", "rate", "by", "label_values", "instance"}


def _queried(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        expr = re.sub(r'"[^"]*"', "", expr)
        names |= {w for w in re.findall(r"[a-z_][a-z0-9_]*", expr) if w.startswith("outbox_")}
    return names - _NOT_METRICS


def test_every_metric_the_dashboard_queries_exists(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = _queried(dashboard)
    assert len(queried) >= 12  # freshness, backlog, dead, runs, failures, alerts, size...
    from test_quality import at, edit_rows, sample_pages, scale

    env = outbox_env(tmp_path / "outbox.db")
    assert outbox("fetch", "--replay", str(sample_dir()), env=env).returncode == 0
    # A revision that breaks PJM's balance: a finding and a ledger row to export.
    raised = edit_rows(
        at("2025-08-21T12", respondent="PJM", type="D"),
        lambda r: r.update(value=scale(r["value"], 1.3)),
    )
    revised = sample_pages(tmp_path / "revised", raised)
    assert outbox("fetch", "--replay", str(revised), env=env).returncode == 0
    env.update(GRIDPULSE_BASE_URL="http://127.0.0.1:9", GRIDPULSE_API_KEY="k")
    assert outbox("send", env=env).returncode == 1  # a finished run of each stage
    metrics = tmp_path / "outbox.prom"
    assert outbox("status", "--metrics", str(metrics), env=env).returncode == 0
    written = set(re.findall(r"^# TYPE (\w+) ", metrics.read_text(), re.M))
    assert sorted(queried - written) == []


def test_the_dashboard_is_importable_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
