"""Push alerts: one notification when the ``--check`` verdict changes.

After every fetch and send run the verdict is computed; when it differs from the one last
delivered to a URL (OK -> WARNING -> CRITICAL and back, UNKNOWN), one notification goes
to that URL with the summary line, the reasons and the report's path. Nothing is sent
while the state holds, except that ``alerts.repeat_hours`` re-notifies a CRITICAL that
persists. The state is kept per URL in the outbox's ``meta`` table, so a URL that failed
is retried at the next run and one that succeeded is not notified twice. A failing
notification never fails the run: it is logged (URL masked) and counted.

Delivery is apprise's (ntfy, Gotify, Pushover, Discord, Slack, Matrix, email, JSON
webhooks and about a hundred more, each from one URL); it is imported only when
``alerts.urls`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from outbox.config import Config
from outbox.redact import redact
from outbox.status.read import ALERTS_META_KEY as META_KEY
from outbox.status.read import alert_state
from outbox.timeutil import parse_ts, to_ts, utcnow

log = logging.getLogger(__name__)

TITLE = "gridpulse-outbox"
# The state no one needs telling about: a new outbox starts as if OK had been delivered.
BASELINE = "OK"


@dataclass(frozen=True)
class Delivery:
    """What one URL did with one notification."""

    url: str  # masked
    ok: bool
    error: str | None = None


def mask(url: str) -> str:
    """A notification URL with its secrets hidden: apprise's privacy form without its query
    and with its path as ``/***`` (a webhook's token, an ntfy topic ride in the path)."""
    try:
        plugin = _apprise().Apprise.instantiate(url)
    except Exception:  # pragma: no cover - apprise raises only on programming errors
        plugin = None
    scheme = url.split("://", 1)[0] if "://" in url else "?"
    if plugin is None:
        return f"{scheme}://***"
    private = plugin.url(privacy=True).split("?", 1)[0]
    rest = private.split("://", 1)[-1]
    host, slash, path = rest.partition("/")
    return redact(f"{scheme}://{host}" + ("/***" if slash and path.strip("/") else ""))


def _apprise() -> Any:
    import apprise

    # apprise logs a failed delivery with the URL it used: our own line says it, masked.
    logging.getLogger("apprise").setLevel(logging.CRITICAL + 1)
    return apprise


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def notify(url: str, title: str, body: str, level: str, timeout: float) -> Delivery:
    """Send one notification to one URL; never raises."""
    apprise = _apprise()
    masked = mask(url)
    try:
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None:
            return Delivery(masked, False, "not a notification URL apprise knows")
        plugin.socket_connect_timeout = plugin.socket_read_timeout = timeout
        kind = {
            "OK": apprise.NotifyType.SUCCESS,
            "WARNING": apprise.NotifyType.WARNING,
            "CRITICAL": apprise.NotifyType.FAILURE,
        }.get(level, apprise.NotifyType.INFO)
        sent = plugin.notify(body=body, title=title, notify_type=kind)
    except Exception as exc:
        return Delivery(masked, False, redact(f"{type(exc).__name__}: {exc}")[:200])
    return Delivery(masked, bool(sent), None if sent else "not delivered")


def message(label: str, summary: str, reasons: Sequence[str], report: str | None) -> str:
    """The notification body: the summary line, one reason a line, the report's path."""
    lines = [summary, *(f"- {r}" for r in reasons)]
    if report:
        lines.append(f"report: {report}")
    return redact("\n".join(lines))


def after_run(config: Config, *, now: datetime | None = None) -> list[Delivery]:
    """After a fetch or send run: notify every URL whose last delivered state differs.

    Never raises: an alert must not fail the run it reports on.
    """
    urls = [u.get_secret_value() for u in config.alerts.urls]
    if not urls:
        return []
    try:
        return _after_run(config, urls, now or utcnow())
    except Exception as exc:
        log.warning("alerts not evaluated error=%s", json.dumps(redact(str(exc))[:300]))
        return []


def _after_run(config: Config, urls: list[str], now: datetime) -> list[Delivery]:
    from outbox import status as status_mod
    from outbox.store import Store

    reasons: list[str] = []
    try:
        model = status_mod.read(config, now, for_check=True)
        code, line = status_mod.evaluate(config, model)
        reasons = [text for _, text in status_mod.problems(config, model)]
    except Exception as exc:
        code, line = status_mod.UNKNOWN, f"UNKNOWN - {redact(str(exc))}"
    label = status_mod.LABELS[code]
    if not Path(config.database).exists():
        return []  # no outbox yet (a send before the first fetch): no state to keep
    with Store.open(config.database, create=False) as store:
        state = alert_state(store.meta_get(META_KEY))
        due = [u for u in urls if _due(state, _digest(u), label, now, config.alerts.repeat_hours)]
        deliveries = []
        if due:
            body = message(label, line, reasons, config.report_path)
            for url in due:
                done = notify(url, f"{TITLE}: {label}", body, label, config.alerts.timeout_seconds)
                deliveries.append(done)
                _record(state, _digest(url), label, now, done)
            store.meta_set(META_KEY, json.dumps(state, sort_keys=True))
    for d in deliveries:
        if d.ok:
            log.info("alert sent state=%s url=%s", label, json.dumps(d.url))
        else:
            log.warning(
                "alert not sent state=%s url=%s error=%s retry=next_run",
                label,
                json.dumps(d.url),
                json.dumps(d.error),
            )
    return deliveries


def _due(
    state: dict[str, Any], key: str, label: str, now: datetime, repeat_hours: float | None
) -> bool:
    last = state["urls"].get(key) or {}
    delivered = last.get("label", BASELINE)
    if delivered != label:
        return True
    if repeat_hours and label == "CRITICAL" and last.get("at"):
        return now - parse_ts(last["at"]) >= timedelta(hours=repeat_hours)
    return False


def _record(state: dict[str, Any], key: str, label: str, now: datetime, done: Delivery) -> None:
    if done.ok:
        state["urls"][key] = {"label": label, "at": to_ts(now)}
        state["sent"] += 1
    else:
        state["failures"] += 1
        state["last_error"] = done.error
        state["last_error_at"] = to_ts(now)


def test_all(config: Config, say: Callable[[str], None]) -> int:
    """``outbox alerts test``: one test notification to every URL; exit 1 if any failed."""
    urls = [u.get_secret_value() for u in config.alerts.urls]
    if not urls:
        from outbox.errors import UsageError

        raise UsageError("alerts.urls is empty: nothing to test (set it in config.yaml)")
    failed = 0
    for url in urls:
        done = notify(
            url,
            f"{TITLE}: test",
            "A test notification from gridpulse-outbox (outbox alerts test).",
            "INFO",
            config.alerts.timeout_seconds,
        )
        failed += not done.ok
        line = f"{'ok  ' if done.ok else 'FAIL'} {done.url}"
        say(redact(line + (f": {done.error}" if done.error else "")))
    return 1 if failed else 0
