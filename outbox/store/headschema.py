"""``python -m outbox.store.headschema``: rewrite ``head_schema.sql`` after a migration is
added (a new file gets that schema without running the migrations; see
:mod:`outbox.store.migrate`)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from outbox.store.handle import Store
from outbox.store.migrate import HEAD_SCHEMA, head_schema_sql, upgrade


def write_head_schema() -> Path:
    """Migrate a scratch outbox to head, one migration at a time, and write
    :data:`~outbox.store.migrate.HEAD_SCHEMA` from it."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "outbox.db"
        store = Store.open(path, migrate=False)
        try:
            upgrade(store)
        finally:
            store.close()
        HEAD_SCHEMA.write_text(head_schema_sql(path), encoding="utf-8")
    return HEAD_SCHEMA


if __name__ == "__main__":
    sys.stdout.write(f"wrote {write_head_schema()}\n")
