"""The HTML report: self-contained, written atomically, and drawn in a real browser.

The browser test opens the file from ``file://`` in Debian's Chromium (``/usr/bin/chromium``)
driven by Playwright; nothing downloads a browser. CI installs Chromium (``.ci/run``); a
developer without it sees the browser tests skipped with the command that installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from outbox.config import Config
from outbox.report import SELECTOR_ABOVE_BAS, _backlog, build, render, write_report
from outbox.sample import sample_dir
from tests.durability import outbox, outbox_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
GAP_SERIES, GAP_TS = "EIA.PJM.demand", "2025-08-21T12:00:00Z"
# One chart per dataset x BA of the bundled sample: 6 datasets x 5 BAs.
SAMPLE_GROUPS = 30

needs_browser = pytest.mark.skipif(
    not HAVE_CHROMIUM and not os.environ.get("CI"),
    reason="no Chromium: `apt-get install chromium` (CI installs it and never skips)",
)


@pytest.fixture(scope="module")
def sample_outbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample day staged into a real outbox, with one hour removed (a gap)."""
    db = tmp_path_factory.mktemp("report") / "outbox.db"
    done = outbox("fetch", "--replay", str(sample_dir()), env=outbox_env(db))
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as conn:
        gone = conn.execute(
            "DELETE FROM observations WHERE series_id = ? AND ts = ?", (GAP_SERIES, GAP_TS)
        ).rowcount
    assert gone == 1
    return db


def _config(db: Path, **extra: object) -> Config:
    return Config(database=str(db), **extra)


def test_the_report_holds_every_group_and_marks_the_gap(sample_outbox: Path) -> None:
    data = build(_config(sample_outbox))
    ids = [g["id"] for g in data["groups"]]
    assert len(ids) == SAMPLE_GROUPS == len(set(ids))
    assert data["window"] == {
        "start": "2025-08-21T00:00:00Z",
        "end": "2025-08-21T23:00:00Z",
        "days": 7,
    }
    by_id = {g["id"]: g for g in data["groups"]}
    assert by_id["demand-PJM"]["gaps"] == [GAP_TS]
    assert by_id["demand-PJM"]["series"][0]["values"][12] is None
    assert all(not g["gaps"] for gid, g in by_id.items() if gid != "demand-PJM")
    assert by_id["generation-PJM"]["kind"] == "stack"
    assert by_id["ba_interchange-PJM"]["kind"] == "multi"
    v = data["verdict"]
    assert v["label"] == "CRITICAL"  # the sample day is old: every dataset is stale
    # The reasons are the verdict's own problems, not a re-parse of its line.
    assert len(v["reasons"]) == 6 and v["summary"] == "CRITICAL - " + "; ".join(v["reasons"])
    assert not data["selector"]


def test_the_backlog_ends_at_the_pending_total_however_much_was_pruned(
    sample_outbox: Path,
) -> None:
    backlog = build(_config(sample_outbox))["backlog"]
    assert backlog["pending"][-1] == 2375  # the sample's rows, one deleted, none sent yet
    staged = [("2026-12-01T00:00", 10), ("2026-12-01T01:00", 5)]
    acked = [("2026-12-01T00:30", 8, "2026-11-30T09:00:00Z")]
    assert _backlog(staged, acked, 7)["pending"] == [10, 2, 7]
    # Three rows of the first minute acknowledged and pruned since: their staging is gone,
    # their ack minute is not; counted back from the 7 pending, today's figures hold.
    pruned = [("2026-12-01T00:00", 7), ("2026-12-01T01:00", 5)]
    got = _backlog(pruned, acked, 7)
    assert got["pending"] == [10, 2, 7]
    assert got["delivered"] == [None, 1796029200, 1796029200]


def test_the_page_is_self_contained(sample_outbox: Path) -> None:
    page = render(build(_config(sample_outbox)))
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page, re.I)
    assert "@import" not in page and "url(http" not in page
    # The embedded data cannot end its <script> element early.
    data_block = page.split('id="report-data" type="application/json">', 1)[1]
    assert data_block.index("</script>") == data_block.index("</script>")
    assert "</" not in data_block[: data_block.index("</script>")]


def test_the_report_is_written_atomically_and_under_its_size(
    sample_outbox: Path, tmp_path: Path
) -> None:
    target = tmp_path / "report.html"
    target.write_text("<!doctype html>an earlier report")
    write_report(_config(sample_outbox), target)
    assert (
        target.read_text().startswith("<!doctype html>") and "an earlier" not in target.read_text()
    )
    assert target.stat().st_size < 3_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left


def test_report_command_writes_and_says_where(sample_outbox: Path, tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    done = outbox("report", str(target), "--days", "2", env=outbox_env(sample_outbox))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"report written: {target} (")
    assert target.stat().st_size > 50_000


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["report", "{tmp}/missing/r.html"], "does not exist"),
        (["report", "{tmp}"], "is a directory"),
        (["report", "{tmp}/r.html", "--days", "0"], "--days"),
        (["report", "/proc/outbox-report.html"], "cannot write /proc/outbox-report.html"),
    ],
)
def test_report_bad_input_is_one_line(
    sample_outbox: Path, tmp_path: Path, argv: list[str], fragment: str
) -> None:
    done = outbox(*[a.format(tmp=tmp_path) for a in argv], env=outbox_env(sample_outbox))
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not list(tmp_path.glob("*.html"))


def test_every_fetch_and_send_run_rewrites_report_path(tmp_path: Path) -> None:
    db, target = tmp_path / "outbox.db", tmp_path / "site" / "index.html"
    target.parent.mkdir()
    env = outbox_env(db, OUTBOX__REPORT_PATH=str(target))
    done = outbox("fetch", "--replay", str(sample_dir()), env=env)
    assert done.returncode == 0, done.stderr
    first = target.read_text()
    assert '"id":"demand-PJM"' in first
    # A failed send (nothing listening) still rewrites it: its run is now in the ledger.
    env["GRIDPULSE_BASE_URL"], env["GRIDPULSE_API_KEY"] = "http://127.0.0.1:9", "k"
    sent = outbox("send", env=env)
    assert sent.returncode == 1
    assert target.read_text() != first
    assert '"stage":"send","started_at"' in target.read_text()


def test_many_bas_collapse_to_a_selector(tmp_path: Path) -> None:
    from outbox.store import Store
    from tests.factories import obs, page, series_row

    sids = [f"EIA.B{i:02d}.demand" for i in range(SELECTOR_ABOVE_BAS + 1)]
    with Store.open(tmp_path / "outbox.db") as store:
        store.staging.stage(
            [obs(sid, h) for sid in sids for h in range(24)],
            series_rows=[series_row(sid) for sid in sids],
            page=page(rows=24 * len(sids)),
        )
    data = build(_config(tmp_path / "outbox.db"))
    assert data["selector"] is True
    assert data["bas"] == sorted(sid.split(".")[1] for sid in sids)


# -- in a real browser -----------------------------------------------------------------


def _open(page_path: Path):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = pw.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_path.as_uri())
    page.wait_for_function("window.__report && window.__report.done", timeout=15_000)
    return pw, browser, page, errors, requests


# Pixels of the gap ticks' red (#d62728) in a chart's canvas.
_RED_PIXELS = """(id) => {
  const c = document.querySelector('#chart-' + id + ' canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let red = 0, ink = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) ink++;
    if (d[i] > 200 && d[i + 1] < 70 && d[i + 2] < 70 && d[i + 3] > 200) red++;
  }
  return [red, ink];
}"""


@needs_browser
def test_the_report_renders_in_chromium(sample_outbox: Path, tmp_path: Path) -> None:
    target = write_report(_config(sample_outbox), tmp_path / "report.html")
    pw, browser, page, errors, requests = _open(target)
    try:
        assert errors == []
        assert all(url.startswith("file://") for url in requests), requests
        charts = page.eval_on_selector_all(
            "#charts .chart",
            "els => els.map(e => [e.dataset.group, +e.dataset.points, +e.dataset.gaps,"
            " e.querySelectorAll('canvas').length])",
        )
        assert len(charts) == SAMPLE_GROUPS
        for group, points, _gaps, canvases in charts:
            assert points > 0 and canvases == 1, group
        assert {g: n for g, _p, n, _c in charts if n} == {"demand-PJM": 1}
        gap_line = page.text_content("#chart-demand-PJM .gaps")
        assert gap_line == "missing 1 h: 08-21 12:00"
        red, ink = page.evaluate(_RED_PIXELS, "demand-PJM")
        assert red > 0 and ink > 1000  # the line is drawn, and the gap is ticked
        assert page.evaluate(_RED_PIXELS, "demand-CAISO")[0] == 0
        verdict = page.text_content("#verdict .label")
        probe = outbox("status", "--check", env=outbox_env(sample_outbox))
        assert verdict == probe.stdout.split(" - ", 1)[0]  # the probe's own verdict
        assert "hour-ending" in page.text_content("header")
        assert page.locator("#freshness table").count() == 1
        assert page.locator("#runs-table tr").count() >= 2
    finally:
        browser.close()
        pw.stop()


@needs_browser
def test_many_bas_show_one_ba_at_a_time(tmp_path: Path) -> None:
    # A hand-made report of 12 BAs x 1 dataset: the layout switches to a BA selector.
    n = 24
    bas = [f"B{i:02d}" for i in range(12)]
    data = {
        "generated_at": "2025-08-22T00:00:00Z",
        "database": "outbox.db",
        "window": {"start": "2025-08-21T00:00:00Z", "end": "2025-08-21T23:00:00Z", "days": 7},
        "t0": 1755734400,
        "step": 3600,
        "n": n,
        "verdict": {"code": 0, "label": "OK", "summary": "OK - 12 series", "reasons": []},
        "totals": {},
        "groups": [
            {
                "id": f"demand-{ba}",
                "dataset": "demand",
                "ba": ba,
                "title": f"Demand · {ba}",
                "kind": "line",
                "series": [{"id": f"EIA.{ba}.demand", "label": "demand", "values": [1.0] * n}],
                "gaps": [],
                "gap_series": {},
                "marks": [],
            }
            for ba in bas
        ],
        "bas": bas,
        "selector": True,
        "backlog": {"t": [], "pending": [], "delivered": []},
        "runs": [],
        "freshness": [],
        "findings": [],
        "revisions": [],
        "tz": {},
    }
    target = tmp_path / "many.html"
    target.write_text(render(data))
    pw, browser, page, errors, _ = _open(target)
    try:
        assert errors == []
        assert page.eval_on_selector_all("#charts .chart", "els => els.map(e => e.dataset.ba)") == [
            "B00"
        ]
        page.select_option("#ba-select", "B07")
        assert page.eval_on_selector_all("#charts .chart", "els => els.map(e => e.dataset.ba)") == [
            "B07"
        ]
        assert page.locator("#ba-select option").count() == 12
    finally:
        browser.close()
        pw.stop()


def test_findings_and_revisions_are_marked_and_listed(tmp_path: Path) -> None:
    from test_quality import at, edit_rows, replay, sample_pages, scale

    db = tmp_path / "o.db"
    replay(db, sample_pages(tmp_path / "clean"))
    raised = edit_rows(
        at("2025-08-21T12", respondent="PJM", type="D"),
        lambda r: r.update(value=scale(r["value"], 1.3)),
    )
    replay(db, sample_pages(tmp_path / "revised", raised))  # EIA revises PJM's 12:00
    data = build(_config(db))
    assert any(f["rule"] == "balance" and f["ba"] == "PJM" for f in data["findings"])
    assert [(r["series_id"], r["ts"]) for r in data["revisions"]] == [
        ("EIA.PJM.demand", "2025-08-21T12:00:00Z")
    ]
    marks = {g["id"]: g["marks"] for g in data["groups"]}
    kinds = {(m["kind"], m["ts"]) for m in marks["demand-PJM"]}
    assert ("revision", "2025-08-21T12:00:00Z") in kinds
    assert ("finding", "2025-08-21T12:00:00Z") in kinds  # balance: the BA's groups
    assert marks["demand-CAISO"] == []
    page = render(data)
    assert '<section id="findings">' in page and '<section id="revisions">' in page
    assert "<td>balance</td><td>PJM</td>" in page
