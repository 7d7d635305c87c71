"""Apply the Alembic migrations to an outbox: on every open, and by ``outbox db``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

from outbox.errors import StoreError

if TYPE_CHECKING:
    from outbox.store import Store


def migrations_dir() -> Path:
    """Where the migration scripts live (the top-level ``migrations`` package)."""
    import migrations

    location = getattr(migrations, "__file__", None)
    if location:
        return Path(location).parent
    return Path(next(iter(migrations.__path__)))


def alembic_config(store: Store | None = None) -> AlembicConfig:
    """An Alembic config pointing at our scripts and, when given, the store's file."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if store is not None:
        cfg.set_main_option("sqlalchemy.url", f"sqlite:///{store.path}")
    return cfg


@cache
def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError("no migrations found")
    return head


def ensure_schema(store: Store) -> None:
    """Upgrade the outbox to head if it is behind; a no-op (one SELECT) when current.

    A file lock serialises concurrent first opens, so two commands started together
    on a new path do not both try to create the tables.
    """
    if store.schema_version() == head_revision():
        return
    from outbox.store import file_lock

    with file_lock(store.lock_path("migrate"), blocking=True):
        if store.schema_version() == head_revision():
            return
        upgrade(store)


def upgrade(store: Store, revision: str = "head") -> None:
    """Run ``alembic upgrade`` on the store's own engine (our pragmas apply)."""
    cfg = alembic_config(store)
    with store.engine.connect() as conn:
        conn.execution_options(outbox_write=True)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def downgrade(store: Store, revision: str) -> None:
    """Run ``alembic downgrade`` (for tests and emergencies)."""
    cfg = alembic_config(store)
    with store.engine.connect() as conn:
        conn.execution_options(outbox_write=True)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()
