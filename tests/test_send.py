"""The send stage against respx: every status path of the ingest contract."""

from __future__ import annotations

import gc
import gzip
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import respx
from factories import obs, series_row, ts
from freezegun import freeze_time

from outbox.config import Config
from outbox.errors import RejectsEverythingError, SinkAuthError, SinkConflictError
from outbox.sinks.gridpulse import GridPulseClient, GridPulseSink
from outbox.stages.send import SendFailed, run_send
from outbox.store import Key, Store, file_lock

BASE = "http://gp.test"
INGEST = f"{BASE}/api/v1/data/observations"
KEY = "gp-test-key-123"


def make_config(**gridpulse: Any) -> Config:
    """A config whose retries never sleep."""
    gp = {
        "base_url": BASE,
        "api_key": KEY,
        "batch_size": 5000,
        "retry": {"attempts": 3, "initial_backoff_seconds": 0, "max_backoff_seconds": 0},
        **gridpulse,
    }
    return Config.model_validate({"gridpulse": gp})


def stage(store: Store, n: int, sids: tuple[str, ...] = ("EIA.PJM.demand",)) -> list[tuple]:
    rows = [obs(sid, h, 100.0 + h) for h in range(n) for sid in sids]
    store.staging.stage(rows, series_rows=[series_row(s) for s in sids])
    return rows


def body_of(request: httpx.Request) -> dict[str, Any]:
    raw = request.content
    if request.headers.get("content-encoding") == "gzip":
        raw = gzip.decompress(raw)
    return orjson.loads(raw)


def accept_all(request: httpx.Request) -> httpx.Response:
    body = body_of(request)
    return httpx.Response(
        200,
        json={"batch_id": body["batch_id"], "accepted": len(body["observations"]), "rejected": []},
    )


def states(store: Store) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.exec_driver_sql("SELECT state, count(*) FROM row_states GROUP BY state").all()
    return {r[0]: r[1] for r in rows}


def send(store: Store, config: Config, waits: list[float] | None = None, **kw: Any):
    with httpx.Client() as http:
        sink = GridPulseSink(GridPulseClient(http, BASE, KEY))
        sleep: Callable[[float], None] = waits.append if waits is not None else lambda s: None
        return run_send(config, store, sink, sleep=sleep, **kw)


@respx.mock(assert_all_called=False)
def test_drains_in_batches_oldest_first(store: Store, respx_mock: respx.MockRouter) -> None:
    stage(store, 12, ("EIA.PJM.demand", "EIA.MISO.demand"))
    route = respx_mock.post(INGEST).mock(side_effect=accept_all)
    result = send(store, make_config(batch_size=10))
    assert (result.batches, result.sent, result.acked, result.rejected) == (3, 24, 24, 0)
    first = body_of(route.calls[0].request)
    assert [o["ts"] for o in first["observations"]][:4] == [ts(0), ts(0), ts(1), ts(1)]
    req = route.calls[0].request
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["idempotency-key"] == first["batch_id"]
    assert req.headers["content-encoding"] == "gzip"
    obs0 = first["observations"][0]
    assert obs0 == {
        "series_id": "EIA.MISO.demand",
        "ba": "MISO",
        "type": "demand",
        "subtype": None,
        "units": "MW",
        "ts": ts(0),
        "value": 100.0,
        "quality_flag": "good",
        "revision": obs("EIA.MISO.demand", 0, 100.0)[5],
    }
    assert states(store) == {"acked": 24}
    (run,) = store.runs.recent_runs(stage="send")
    assert run.status == "ok" and run.counts["acked"] == 24 and run.counts["bytes"] > 0
    again = send(store, make_config())
    assert again.requests == 0 and route.call_count == 3


@respx.mock
def test_per_row_rejections_go_dead(store: Store, respx_mock: respx.MockRouter) -> None:
    stage(store, 5)

    def reject_two(request: httpx.Request) -> httpx.Response:
        body = body_of(request)
        rejected = [
            {
                "index": i,
                "series_id": o["series_id"],
                "ts": o["ts"],
                "code": "VALUE_OUT_OF_RANGE",
                "message": f"bad {i}",
            }
            for i, o in enumerate(body["observations"])
            if i in (1, 3)
        ]
        return httpx.Response(
            200, json={"batch_id": body["batch_id"], "accepted": 3, "rejected": rejected}
        )

    respx_mock.post(INGEST).mock(side_effect=reject_two)
    result = send(store, make_config())
    assert (result.acked, result.rejected) == (3, 2)
    dead = store.reads.row("EIA.PJM.demand", ts(1))
    assert dead["state"] == "dead"
    assert (dead["last_error_code"], dead["last_error"]) == ("VALUE_OUT_OF_RANGE", "bad 1")


@pytest.mark.parametrize("status", [400, 422])
def test_bisection_isolates_three_bad_rows_among_5000(store: Store, status: int) -> None:
    rows = stage(store, 1000, tuple(f"EIA.B{i}.demand" for i in range(5)))
    bad = {(rows[i][0], rows[i][1]) for i in (17, 2500, 4999)}
    requests: list[int] = []

    def poison(request: httpx.Request) -> httpx.Response:
        body = body_of(request)
        requests.append(len(body["observations"]))
        hits = [o for o in body["observations"] if (o["series_id"], o["ts"]) in bad]
        if hits:
            return httpx.Response(
                status,
                json={
                    "error": {
                        "code": "VALIDATION_FAILED",
                        "message": f"value rejected for {hits[0]['series_id']} {hits[0]['ts']}",
                        "details": {},
                    }
                },
            )
        return accept_all(request)

    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=poison)
        result = send(store, make_config())
    assert states(store) == {"acked": 4997, "dead": 3}
    for sid, when in bad:
        row = store.reads.row(sid, when)
        assert row["state"] == "dead" and row["last_error_code"] == "VALIDATION_FAILED"
        assert row["last_error"]
    # One halving request per level for each bad row, plus the batches the carried rows ride in.
    assert len(requests) <= 1 + 3 * math.ceil(math.log2(5000)) + 3
    assert result.acked == 4997 and result.rejected == 3


def test_413_halves_and_remembers(store: Store) -> None:
    stage(store, 3000)
    sizes: list[int] = []

    def limited(request: httpx.Request) -> httpx.Response:
        n = len(body_of(request)["observations"])
        sizes.append(n)
        if n > 800:
            return httpx.Response(
                413,
                json={"error": {"code": "PAYLOAD_TOO_LARGE", "message": "max 800", "details": {}}},
            )
        return accept_all(request)

    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=limited)
        send(store, make_config())
    assert states(store) == {"acked": 3000}
    assert sizes[:4] == [3000, 1500, 750, 750]
    # Once halved, later batches start at the remembered size, not at 5000 again.
    assert max(sizes[4:]) <= 750


@pytest.mark.parametrize(
    ("status", "error"), [(401, SinkAuthError), (403, SinkAuthError), (409, SinkConflictError)]
)
def test_credentials_and_conflict_touch_no_row(store: Store, status: int, error: type) -> None:
    stage(store, 10)
    with respx.mock() as mock:
        mock.post(INGEST).mock(
            return_value=httpx.Response(
                status, json={"error": {"code": "X", "message": "no way", "details": {}}}
            )
        )
        with pytest.raises(error) as info:
            send(store, make_config())
    assert KEY not in str(info.value)
    assert states(store) == {"pending": 10}
    assert all(c.attempts == 0 for c in store.delivery.claim(100))
    (run,) = store.runs.recent_runs()
    assert run.status == "failed" and run.error


def test_429_honours_retry_after(store: Store) -> None:
    stage(store, 3)
    waits: list[float] = []
    with respx.mock() as mock:
        mock.post(INGEST).mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "7"}),
                accept_all,
            ]
        )
        result = send(store, make_config(), waits)
    assert waits == [7.0] and result.acked == 3


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(503),
        httpx.Response(500),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
)
def test_transient_then_success(store: Store, failure: Any) -> None:
    stage(store, 3)
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=[failure, failure, accept_all])
        result = send(store, make_config())
    assert result.acked == 3 and result.requests == 3
    assert gc.get_freeze_count() == 0  # the drain loop gave the heap back (outbox.heap)


def test_retry_budget_exhausted_defers_and_fails(store: Store) -> None:
    stage(store, 7)
    cfg = make_config(batch_size=5, defer_initial_seconds=60, defer_max_seconds=600)
    with respx.mock() as mock:
        route = mock.post(INGEST).mock(return_value=httpx.Response(503))
        with pytest.raises(SendFailed):
            send(store, cfg)
        assert route.call_count == 3  # the configured attempts, then give up
    assert gc.get_freeze_count() == 0  # given back on the failure too
    assert states(store) == {"pending": 7}
    deferred = store.reads.row("EIA.PJM.demand", ts(0))
    assert deferred["attempts"] == 1 and deferred["next_attempt_at"] is not None
    assert deferred["last_error_code"] == "SINK_UNAVAILABLE"
    untouched = store.reads.row("EIA.PJM.demand", ts(6))
    assert untouched["attempts"] == 0 and untouched["next_attempt_at"] is None
    (run,) = store.runs.recent_runs()
    assert run.status == "failed" and "GridPulse unavailable" in run.error

    # GridPulse is back: the deferred (oldest) rows go first, not behind newer ones.
    with respx.mock() as mock:
        mock.get(f"{BASE}/api/v1/health").mock(
            return_value=httpx.Response(200, json={"status": "ok"})
        )
        route = mock.post(INGEST).mock(side_effect=accept_all)
        result = send(store, cfg)
    assert result.acked == 7
    assert [o["ts"] for o in body_of(route.calls[0].request)["observations"]] == [
        ts(h) for h in range(5)
    ]


def test_the_heap_is_frozen_while_batches_are_sent_and_given_back_after(store: Store) -> None:
    stage(store, 3)
    frozen_during: list[int] = []

    def count_then_accept(request: httpx.Request) -> httpx.Response:
        frozen_during.append(gc.get_freeze_count())
        return accept_all(request)

    assert gc.get_freeze_count() == 0
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=count_then_accept)
        assert send(store, make_config()).acked == 3
    assert len(frozen_during) == 1 and frozen_during[0] > 0  # outbox.heap, the drain loop
    assert gc.get_freeze_count() == 0


def test_revision_staged_meanwhile_stays_pending(store: Store) -> None:
    stage(store, 2)

    def revise_then_accept(request: httpx.Request) -> httpx.Response:
        store.staging.stage([obs("EIA.PJM.demand", 0, 999.0)])
        return accept_all(request)

    with respx.mock() as mock:
        route = mock.post(INGEST).mock(side_effect=revise_then_accept)
        send(store, make_config(), max_batches=1)
        row = store.reads.row("EIA.PJM.demand", ts(0))
        assert row["state"] == "pending" and row["value"] == 999.0
        send(store, make_config())
        resent = body_of(route.calls[1].request)["observations"]
    assert [(o["ts"], o["value"]) for o in resent] == [(ts(0), 999.0)]
    assert states(store) == {"acked": 2}


def test_dry_run_and_lock(store: Store) -> None:
    stage(store, 4)
    with respx.mock() as mock:  # strict: any request would fail the test
        result = send(store, make_config(), dry_run=True)
        assert result.due == 4 and result.requests == 0
        with file_lock(store.lock_path("send"), blocking=False) as got:
            assert got
            skipped = send(store, make_config())
        assert skipped.skipped and mock.calls.call_count == 0
    assert states(store) == {"pending": 4}


def test_failed_send_counts_only_what_it_recorded(store: Store) -> None:
    """A run that fails counts the batch it settled, not the one GridPulse never answered."""
    stage(store, 7)
    answers = iter([accept_all] + [lambda request: httpx.Response(503)] * 3)
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=lambda request: next(answers)(request))
        with pytest.raises(SendFailed):
            send(store, make_config(batch_size=5))
    (run,) = store.runs.recent_runs(stage="send")
    assert run.status == "failed"
    assert {k: run.counts[k] for k in ("batches", "sent", "acked", "deferred", "requests")} == {
        "batches": 1,
        "sent": 5,
        "acked": 5,
        "deferred": 2,
        "requests": 4,
    }


def test_dry_run_counts_deferred_rows_with_the_earliest_retry(store: Store, db_path) -> None:
    from typer.testing import CliRunner

    from outbox.cli import app

    rows = stage(store, 6)
    store.delivery.defer([Key(*r[:2], r[5]) for r in rows[4:]], "2099-03-01T00:00:00Z", "x", "X")
    store.delivery.defer([Key(*rows[3][:2], rows[3][5])], "2099-01-01T00:00:00Z", "x", "X")
    store.delivery.defer(
        [Key(*rows[2][:2], rows[2][5])], "2000-01-01T00:00:00Z", "x", "X"
    )  # due again
    env = {"OUTBOX_DB": str(db_path), "GRIDPULSE_BASE_URL": BASE}
    with respx.mock() as mock:  # strict: a dry run sends nothing
        said = CliRunner().invoke(app, ["send", "--dry-run"], env=env)
        assert mock.calls.call_count == 0
    assert said.exit_code == 0, said.output
    assert said.stdout == (
        f"dry run: 3 due now, 3 deferred until 2099-01-01T00:00:00Z; 1 batches to {BASE}\n"
    )
    store.delivery.defer([Key(*r[:2], r[5]) for r in rows[3:]], "2000-01-01T00:00:00Z", "x", "X")
    said = CliRunner().invoke(app, ["send", "--dry-run"], env=env)
    assert said.stdout == f"dry run: 6 due now, 0 deferred; 1 batches to {BASE}\n"
    assert states(store) == {"pending": 6}


NOW = "2025-09-01T12:00:00Z"


def rate_limited(seconds: int) -> httpx.Response:
    return httpx.Response(
        429,
        headers={"Retry-After": str(seconds)},
        json={"error": {"code": "RATE_LIMITED", "message": "slow down", "details": {}}},
    )


@freeze_time(NOW)
def test_retry_after_past_the_budget_sleeps_nothing_and_defers_until_asked(store: Store) -> None:
    stage(store, 3)
    waits: list[float] = []
    cfg = make_config(retry_budget_seconds=300)
    with respx.mock() as mock:
        route = mock.post(INGEST).mock(return_value=rate_limited(3600))
        with pytest.raises(SendFailed) as failed:
            send(store, cfg, waits)
    assert waits == [] and route.call_count == 1  # gave up at once: 3600 s > 300 s left
    assert "Retry-After 3600s, the run's budget had 300s left" in str(failed.value)
    assert "deferred until 2025-09-01T13:00:00Z" in str(failed.value)
    for h in range(3):
        row = store.reads.row("EIA.PJM.demand", ts(h))
        assert (row["state"], row["next_attempt_at"]) == ("pending", "2025-09-01T13:00:00Z")
        assert row["last_error_code"] == "SINK_RETRY_AFTER"
    # GridPulse's health check answering makes rows deferred because it was down due again,
    # not those waiting for the time it asked for.
    (down,) = stage(store, 1, ("EIA.MISO.demand",))
    store.delivery.defer(
        [Key(*down[:2], down[5])], "2025-09-01T12:30:00Z", "down", "SINK_UNAVAILABLE"
    )
    with respx.mock() as mock:
        mock.get(f"{BASE}/api/v1/health").respond(200, json={"status": "ok"})
        route = mock.post(INGEST).mock(side_effect=accept_all)
        result = send(store, cfg, waits)
    assert [o["series_id"] for o in body_of(route.calls[0].request)["observations"]] == [
        "EIA.MISO.demand"
    ]
    assert result.acked == 1 and states(store) == {"pending": 3, "acked": 1}


def test_retry_after_past_max_seconds_is_past_the_budget(store: Store) -> None:
    stage(store, 3)
    waits: list[float] = []
    cfg = make_config(retry_budget_seconds=300)
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=[rate_limited(150)])
        with pytest.raises(SendFailed, match="budget had 100s left"):
            send(store, cfg, waits, max_seconds=100, clock=lambda: 0.0)
    assert waits == []
    store.delivery.clear_deferred("SINK_RETRY_AFTER")
    with respx.mock() as mock:  # within what is left it is honoured
        mock.post(INGEST).mock(side_effect=[rate_limited(50), accept_all])
        result = send(store, cfg, waits, max_seconds=100, clock=lambda: 0.0)
    assert waits == [50.0] and result.acked == 3


def test_retry_after_past_the_budget_is_one_line_exit_1(store: Store, db_path) -> None:
    from typer.testing import CliRunner

    from outbox.cli import app

    stage(store, 3)
    env = {
        "OUTBOX_DB": str(db_path),
        "GRIDPULSE_BASE_URL": BASE,
        "GRIDPULSE_API_KEY": KEY,
        # Were the budget not kept, each wait would last this long (not 3600 s).
        "OUTBOX__GRIDPULSE__RETRY__MAX_RETRY_AFTER_SECONDS": "3",
    }
    started = time.monotonic()
    with respx.mock() as mock:
        mock.post(INGEST).mock(return_value=rate_limited(3600))
        said = CliRunner().invoke(app, ["send"], env=env)
    assert time.monotonic() - started < 3
    assert said.exit_code == 1, said.output
    errors = [line for line in said.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in said.output + said.stderr
    assert "429 RATE_LIMITED" in errors[0] and "Retry-After 3600s" in errors[0]
    assert errors[0].endswith("; rows stay pending") and KEY not in said.stderr
    assert store.delivery.count_due() == 0 and states(store) == {"pending": 3}


def refusing(
    refused: Callable[[dict[str, Any]], str | None], requests: list[list[int]], hours: list[str]
) -> Callable[[httpx.Request], httpx.Response]:
    """A GridPulse answering 422 with the code ``refused`` gives for any row of the batch
    (None: the row is fine); ``requests`` gets each batch's rows as hour indexes."""

    def answer(request: httpx.Request) -> httpx.Response:
        observations = body_of(request)["observations"]
        requests.append([hours.index(o["ts"]) for o in observations])
        codes = [c for o in observations if (c := refused(o)) is not None]
        if codes:
            return httpx.Response(
                422, json={"error": {"code": codes[0], "message": "no", "details": {}}}
            )
        return accept_all(request)

    return answer


def sizes(requests: list[list[int]]) -> list[int]:
    return [len(r) for r in requests]


@pytest.mark.parametrize("bad", [2, 3, 4])
def test_k_bad_rows_at_the_head_are_dead_and_the_rest_delivered(store: Store, bad: int) -> None:
    """K adjacent bad rows (one bad hour of one BA) are not a GridPulse refusing everything."""
    rows = stage(store, 20)
    hours = [r[1] for r in rows]
    poisoned = set(hours[:bad])  # the oldest rows, adjacent
    requests: list[list[int]] = []
    answer = refusing(lambda o: "POISONED" if o["ts"] in poisoned else None, requests, hours)
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=answer)
        result = send(store, make_config())
    assert (result.acked, result.rejected) == (20 - bad, bad)
    assert states(store) == {"acked": 20 - bad, "dead": bad}
    with store.read() as conn:
        dead = conn.exec_driver_sql("SELECT ts FROM row_states WHERE state = 'dead'").scalars()
        assert sorted(dead) == hours[:bad]
    # The first bisection: 20 -> 10 -> 5 -> 3 -> 2 -> 1; then each next row in its batch
    # and alone.
    head = [20, 10, 5, 3, 2, 1, 19, 1]
    if bad == 2:
        assert sizes(requests) == [*head, 18]
        return
    # The third refused row reaches K = 3: the batch's last row (hour 19) goes alone,
    # is accepted, the count starts again and the rest is delivered.
    assert sizes(requests[:11]) == [*head, 18, 1, 1] and requests[10] == [19]
    assert result.requests == len(requests)
    if bad == 3:
        assert requests[11:] == [list(range(3, 19))]
        return
    # The fourth bad row is found by a bisection of its own (16 -> 8 -> 4 -> 2 -> 1).
    assert sizes(requests[11:]) == [16, 8, 4, 2, 1, 15] and requests[-1] == list(range(4, 19))


def test_circuit_breaker_trips_when_a_row_from_outside_the_run_is_refused_too(
    store: Store,
) -> None:
    rows = stage(store, 20)
    hours = [r[1] for r in rows]
    requests: list[list[int]] = []
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=refusing(lambda o: "POISONED", requests, hours))
        with pytest.raises(RejectsEverythingError) as raised:
            send(store, make_config())
    message = str(raised.value)
    assert message.startswith("GridPulse rejects everything (code POISONED): 3 rows in a row")
    assert f"EIA.PJM.demand {hours[19]}" in message and "--code POISONED" in message
    # 20 -> 10 -> 5 -> 3 -> 2 -> 1, then 19 and 1 alone, 18 and 1 alone, then the probe:
    # the batch's last row alone, refused with the same code, dead like any row refused
    # alone (K + 1 = 4 dead).
    assert sizes(requests) == [20, 10, 5, 3, 2, 1, 19, 1, 18, 1, 1]
    assert requests[-1] == [19]
    assert states(store) == {"dead": 4, "pending": 16}
    with store.read() as conn:
        dead = conn.exec_driver_sql("SELECT ts FROM row_states WHERE state = 'dead'").scalars()
        assert sorted(dead) == [*hours[:3], hours[19]]


def test_a_probe_refused_with_another_code_restarts_the_count(store: Store) -> None:
    rows = stage(store, 20)
    hours = [r[1] for r in rows]

    def code(o: dict[str, Any]) -> str | None:
        i = hours.index(o["ts"])
        return "POISONED" if i < 3 else "OTHER" if i == 19 else None

    requests: list[list[int]] = []
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=refusing(code, requests, hours))
        result = send(store, make_config())
    assert sizes(requests) == [20, 10, 5, 3, 2, 1, 19, 1, 18, 1, 1, 16]
    assert requests[10] == [19] and requests[11] == list(range(3, 19))
    assert (result.acked, result.rejected) == (16, 4)
    with store.read() as conn:
        codes = dict(
            conn.exec_driver_sql(
                "SELECT ts, last_error_code FROM row_states WHERE state = 'dead'"
            ).all()
        )
    assert codes == {**{h: "POISONED" for h in hours[:3]}, hours[19]: "OTHER"}


@pytest.mark.parametrize("everything", [False, True])
def test_one_row_batches_probe_the_newest_due_row(store: Store, everything: bool) -> None:
    """A batch of one row holds no other row: the probe is the newest due row."""
    rows = stage(store, 20)
    hours = [r[1] for r in rows]
    poisoned = set(hours if everything else hours[:3])
    requests: list[list[int]] = []
    answer = refusing(lambda o: "POISONED" if o["ts"] in poisoned else None, requests, hours)
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=answer)
        if everything:
            with pytest.raises(RejectsEverythingError, match=r"rejects everything \(code"):
                send(store, make_config(batch_size=1))
            assert requests == [[0], [1], [2], [19]]
            assert states(store) == {"dead": 4, "pending": 16}
            return
        result = send(store, make_config(batch_size=1))
    assert requests == [[0], [1], [2], [19], *([i] for i in range(3, 19))]
    assert (result.acked, result.rejected) == (17, 3)


def test_a_probe_too_large_alone_is_dead_and_the_run_goes_on(store: Store) -> None:
    rows = stage(store, 20)
    hours = [r[1] for r in rows]
    requests: list[list[int]] = []
    refuse = refusing(lambda o: "POISONED" if o["ts"] in hours[:3] else None, requests, hours)

    def answer(request: httpx.Request) -> httpx.Response:
        if [o["ts"] for o in body_of(request)["observations"]] == [hours[19]]:
            requests.append([19])
            return httpx.Response(413, json={"error": {"code": "TOO_LARGE", "message": "big"}})
        return refuse(request)

    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=answer)
        result = send(store, make_config())
    assert sizes(requests) == [20, 10, 5, 3, 2, 1, 19, 1, 18, 1, 1, 16]
    assert (result.acked, result.rejected) == (16, 4)
    with store.read() as conn:
        code = conn.exec_driver_sql(
            "SELECT last_error_code FROM row_states WHERE ts = ?", (hours[19],)
        ).scalar()
    assert code == "PAYLOAD_TOO_LARGE"


def test_no_row_left_to_probe_ends_the_run_without_tripping(store: Store) -> None:
    rows = stage(store, 3)
    hours = [r[1] for r in rows]
    requests: list[list[int]] = []
    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=refusing(lambda o: "POISONED", requests, hours))
        result = send(store, make_config())
    # 3 -> 2 -> 1, then 2 and 1 alone, then the last row alone: nothing else is due.
    assert requests == [[0, 1, 2], [0, 1], [0], [1, 2], [1], [2]]
    assert result.rejected == 3 and states(store) == {"dead": 3}


def test_an_accepted_row_resets_the_circuit_breaker(store: Store) -> None:
    rows = stage(store, 12)
    poisoned = {rows[i][1] for i in (0, 1, 3, 4, 6, 7)}  # never three in a row

    def refuse_poisoned(request: httpx.Request) -> httpx.Response:
        if any(o["ts"] in poisoned for o in body_of(request)["observations"]):
            return httpx.Response(
                422, json={"error": {"code": "POISONED", "message": "no", "details": {}}}
            )
        return accept_all(request)

    with respx.mock() as mock:
        mock.post(INGEST).mock(side_effect=refuse_poisoned)
        result = send(store, make_config())
    assert (result.acked, result.rejected) == (6, 6)


def test_a_backoff_past_the_budget_stops_without_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff draws of 5 s then 40 s against a 30 s budget: one sleep of 5 s, then the
    loop gives up rather than sleep past it."""
    from outbox.errors import SinkTransientError
    from outbox.retry import RetryPolicy, call_with_retry

    draws = iter([5.0, 40.0])
    monkeypatch.setattr("outbox.retry.random.uniform", lambda low, high: next(draws))
    calls: list[int] = []
    sleeps: list[float] = []

    def fail() -> None:
        calls.append(1)
        raise SinkTransientError("GridPulse unavailable")

    policy = RetryPolicy(attempts=5, initial=64.0, maximum=64.0, deadline=30.0)
    with pytest.raises(SinkTransientError):
        call_with_retry(policy, fail, sleep=sleeps.append)
    assert (len(calls), sleeps) == (2, [5.0])


@pytest.mark.parametrize("stop_first", [True, False])
def test_the_budget_check_and_the_sleep_see_one_draw_in_either_order(
    monkeypatch: pytest.MonkeyPatch, stop_first: bool
) -> None:
    """tenacity before 8.3 asks the stop before it computes the wait (and has no
    ``upcoming_sleep``): the deadline check draws the wait itself, and the sleep gets that
    same jittered value, not a second draw."""
    import sys

    import tenacity

    from outbox.errors import SinkTransientError
    from outbox.retry import RetryPolicy, make_retrying

    draws = iter([40.0, 5.0])
    monkeypatch.setattr("outbox.retry.random.uniform", lambda low, high: next(draws))
    policy = RetryPolicy(attempts=5, initial=64.0, maximum=64.0, deadline=30.0)
    retrying = make_retrying(policy, sleep=lambda seconds: None)
    state = tenacity.RetryCallState(retrying, fn=None, args=(), kwargs={})
    try:
        raise SinkTransientError("GridPulse unavailable")
    except SinkTransientError:
        state.set_exception(sys.exc_info())  # type: ignore[arg-type]
    if stop_first:
        stopped, wait = retrying.stop(state), retrying.wait(state)
    else:
        wait = retrying.wait(state)
        state.upcoming_sleep = wait  # as tenacity 8.3 and later do before the stop
        stopped = retrying.stop(state)
    assert (stopped, wait) == (True, 40.0)  # 40 s > the 30 s budget, drawn once
