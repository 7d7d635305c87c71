"""Shared fixtures: real SQLite files in tmp_path, created by the real migrations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# pandas is imported by the product on first use; a first import while freezegun fakes the
# clock fails, so every test session imports it before any test freezes time.
import pandas  # noqa: F401
import pytest

from outbox.store import Store

# No test may pick up a developer's environment or reach a real service.
for _name in list(os.environ):
    if _name.startswith(("OUTBOX", "EIA_", "GRIDPULSE_")):
        del os.environ[_name]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Path of a not-yet-created outbox file."""
    return tmp_path / "outbox.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    """A migrated outbox on a real file."""
    s = Store.open(db_path)
    yield s
    s.close()


# -- durability suites: reduced counts in CI, full counts with `pytest -m soak` ----------

# A full-count variant runs for minutes: it gets its own timeout, not the suite's 300 s.
SOAK_TIMEOUT = 3 * 3600
SCALES = [
    pytest.param("ci", id="ci"),
    pytest.param("soak", id="soak", marks=[pytest.mark.soak, pytest.mark.timeout(SOAK_TIMEOUT)]),
]
_FIGURES = pytest.StashKey[list[dict[str, object]]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``-m``, the full-count (soak) variants are deselected: CI runs the ci ones."""
    if config.option.markexpr:
        return
    keep = [item for item in items if item.get_closest_marker("soak") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(params=SCALES)
def scale(request: pytest.FixtureRequest) -> str:
    """``ci`` (reduced counts, the default run) or ``soak`` (full counts, ``-m soak``)."""
    return request.param


@pytest.fixture
def figures(request: pytest.FixtureRequest):
    """Record a suite's figures (trials, kills, rows, lost, duplicates) for the summary.

    They travel in the test's report (``user_properties``), so a run spread over
    pytest-xdist workers prints them in the controller's summary too.
    """

    def record(**values: object) -> None:
        row = {"test": request.node.name, **values}
        request.node.user_properties.append((_FIGURES_PROPERTY, row))

    return record


_FIGURES_PROPERTY = "durability_figures"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the figures a test recorded, from its report (here or from a worker)."""
    config = _CONFIG.get("config")
    if report.when != "teardown" or config is None:
        return
    found = config.stash.setdefault(_FIGURES, [])
    found.extend(v for k, v in report.user_properties if k == _FIGURES_PROPERTY)


_CONFIG: dict[str, pytest.Config] = {}


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG["config"] = config


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the durability figures; with $DURABILITY_FIGURES also append them as JSON lines."""
    found = config.stash.get(_FIGURES, [])
    if not found:
        return
    terminalreporter.section("durability figures")
    for row in found:
        terminalreporter.write_line(" ".join(f"{k}={v}" for k, v in row.items()))
    target = os.environ.get("DURABILITY_FIGURES")
    if target:
        import json

        with open(target, "a", encoding="utf-8") as out:
            for row in found:
                out.write(json.dumps(row) + "\n")


# -- PostgreSQL: a throwaway cluster of the tests' own (tests/pgcluster.py) ---------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """One throwaway PostgreSQL cluster for the session (started on first use).

    Skipped where PostgreSQL or its driver is missing, except under CI (``CI`` or
    ``REQUIRE_POSTGRES`` set; ``.ci/run`` sets the latter), where a missing PostgreSQL is
    a failure: CI always runs these tests.
    """
    from outbox.testing.pgcluster import Cluster, Unavailable

    try:
        cluster = Cluster.start()
    except Unavailable as exc:
        if os.environ.get("CI") or os.environ.get("REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required under CI: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: object) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) of a fresh empty database."""
    from outbox.testing.pgcluster import Cluster

    assert isinstance(pg_cluster, Cluster)
    return pg_cluster.url(pg_cluster.database())


RECEIVER_DBS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=RECEIVER_DBS)
def receiver_db(request: pytest.FixtureRequest) -> str | None:
    """The database of a receiver subprocess: ``None`` (its SQLite file in tmp_path) or the
    URL of a fresh PostgreSQL database, written as a user does (``postgresql://``)."""
    if request.param == "sqlite":
        return None
    from outbox.testing.pgcluster import Cluster

    cluster = request.getfixturevalue("pg_cluster")
    assert isinstance(cluster, Cluster)
    return cluster.dsn(cluster.database())
