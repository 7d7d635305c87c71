"""Shared fixtures: real SQLite files in tmp_path, created by the real migrations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
