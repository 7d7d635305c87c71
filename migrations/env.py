"""Alembic environment: target outbox.store.schema.metadata; the URL comes from our config."""

from __future__ import annotations

from alembic import context

from outbox.store.engine import make_engine
from outbox.store.schema import metadata

config = context.config


def _connectable():
    existing = config.attributes.get("connection")
    if existing is not None:
        return existing
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from outbox.config import load_config

        return make_engine(load_config().database)
    return make_engine(url.removeprefix("sqlite:///"))


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "sqlite:///outbox.db",
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a live connection (ours when the worker calls, else a new one)."""
    connectable = _connectable()
    if hasattr(connectable, "connect"):
        with connectable.connect() as connection:
            _run(connection)
        connectable.dispose()
    else:
        _run(connectable)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
