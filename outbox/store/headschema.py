"""``python -m outbox.store.headschema``: rewrite ``head_schema.sql`` after a migration is
added (a new file gets that schema without running the migrations; see
:mod:`outbox.store.migrate`)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from outbox.store.handle import Store
from outbox.store.migrate import HEAD_SCHEMA, head_schema_sql, upgrade


def migrated(path: Path) -> Path:
    """A new outbox at ``path`` built by the migrations one at a time (never by the head
    script): what the script is written from and compared with."""
    store = Store.open(path, migrate=False)
    try:
        upgrade(store)
    finally:
        store.close()
    return path


def write_head_schema() -> Path:
    """Write :data:`~outbox.store.migrate.HEAD_SCHEMA` from a scratch outbox migrated to
    head."""
    with tempfile.TemporaryDirectory() as scratch:
        path = migrated(Path(scratch) / "outbox.db")
        HEAD_SCHEMA.write_text(head_schema_sql(path), encoding="utf-8")
    return HEAD_SCHEMA


if __name__ == "__main__":
    sys.stdout.write(f"wrote {write_head_schema()}\n")
