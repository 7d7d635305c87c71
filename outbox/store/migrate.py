"""Apply the Alembic migrations to an outbox: on every open, and by ``outbox db``.

Only :meth:`Store.open <outbox.store.handle.Store.open>` calls in here at run time (and
``outbox db``); this module imports nothing of the store but its lock files, so the two
form no import cycle.

Alembic is imported only when it has work to do: an outbox already at head is recognised
with one SELECT and a read of the scripts' revision lines (:func:`head_revision`), so
commands such as ``outbox status`` do not pay Alembic's import (~0.2 s).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from outbox.errors import StoreError
from outbox.store.locks import file_lock

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

    from outbox.store.handle import Store

# The revision lines of a script as Alembic's template writes them, annotated or not:
# `revision = "0002"`, `down_revision = "0001"` (or None, or a tuple of parents).
_REVISION = re.compile(r"^revision\b[^=\n]*=\s*[\"']([^\"'\n]+)[\"']\s*$", re.M)
_DOWN_REVISION = re.compile(r"^down_revision\b[^=\n]*=(.*)$", re.M)
_QUOTED = re.compile(r"[\"']([^\"'\n]+)[\"']")


def migrations_dir() -> Path:
    """Where the migration scripts live (the top-level ``migrations`` package)."""
    import migrations

    location = getattr(migrations, "__file__", None)
    if location:
        return Path(location).parent
    return Path(next(iter(migrations.__path__)))


def alembic_config(store: Store | None = None) -> AlembicConfig:
    """An Alembic config pointing at our scripts and, when given, the store's file."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if store is not None:
        cfg.set_main_option("sqlalchemy.url", f"sqlite:///{store.path}")
    return cfg


@cache
def head_revision() -> str:
    """The newest migration's revision id.

    Read from the ``revision``/``down_revision`` lines of the scripts, without importing
    Alembic; when a script does not spell them that plainly, or the scripts do not form
    exactly one head, Alembic's own reading decides.
    """
    return scanned_head(migrations_dir() / "versions") or alembic_head()


def alembic_head() -> str:
    """The newest migration's revision id as Alembic reads the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError("no migrations found")
    return head


def scanned_head(versions: Path) -> str | None:
    """The single head of the scripts in ``versions``, by their text; None when unsure."""
    revisions: set[str] = set()
    parents: set[str] = set()
    try:
        for script in versions.glob("*.py"):
            if script.name.startswith(("__init__", ".#")):  # as Alembic skips them
                continue
            text = script.read_text(encoding="utf-8")
            found, down = _REVISION.findall(text), _DOWN_REVISION.findall(text)
            if len(found) != 1 or len(down) != 1:
                return None
            revisions.add(found[0])
            parents.update(_QUOTED.findall(down[0]))
    except (OSError, UnicodeDecodeError):
        return None
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def ensure_schema(store: Store) -> None:
    """Upgrade the outbox to head if it is behind; a no-op (one SELECT) when current.

    A file lock serialises concurrent first opens, so two commands started together
    on a new path do not both try to create the tables.
    """
    if store.schema_version() == head_revision():
        return
    with file_lock(store.lock_path("migrate"), blocking=True):
        if store.schema_version() == head_revision():
            return
        upgrade(store)


def upgrade(store: Store, revision: str = "head") -> None:
    """Run ``alembic upgrade`` on the store's own engine (our pragmas apply).

    A file stamped with a revision this version does not know (a newer gridpulse-outbox
    wrote it) is a StoreError in one line, and is left as it is.
    """
    from alembic import command
    from alembic.util.exc import CommandError

    cfg = alembic_config(store)
    with store.engine.connect() as conn:
        conn.execution_options(outbox_write=True)
        cfg.attributes["connection"] = conn
        try:
            command.upgrade(cfg, revision)
        except CommandError as exc:
            conn.rollback()
            current = store.schema_version()
            raise StoreError(
                f"{store.path}: schema {current} is unknown to this version (head "
                f"{head_revision()}): a newer gridpulse-outbox wrote it; install that version "
                f"again ({str(exc).splitlines()[0][:120]})"
            ) from None
        conn.commit()


def downgrade(store: Store, revision: str) -> None:
    """Run ``alembic downgrade`` (for tests and emergencies)."""
    from alembic import command

    cfg = alembic_config(store)
    with store.engine.connect() as conn:
        conn.execution_options(outbox_write=True)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()
