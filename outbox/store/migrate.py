"""Apply the Alembic migrations to an outbox: on every open, and by ``outbox db``.

Only :meth:`Store.open <outbox.store.handle.Store.open>` calls in here at run time (and
``outbox db``); this module imports nothing of the store but its lock files and engine
helpers (neither imports the handle), so the two form no import cycle.

Alembic is imported only when it has work to do: an outbox already at head is recognised
with one SELECT and a read of the scripts' revision lines (:func:`head_revision`), so
commands such as ``outbox status`` do not pay Alembic's import (~0.2 s). A new, empty file
is not migrated either: it gets the head schema in one transaction from ``head_schema.sql``
(what the migrations build, written by ``python -m outbox.store.headschema`` and compared
with a migrated file by the tests), stamped with its revision: a few milliseconds where
the migrations one by one take ~0.2 s. When that script is not for the head revision, the
migrations run as before.
"""

from __future__ import annotations

import re
import sqlite3
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from outbox.errors import StoreError
from outbox.store.engine import cursor
from outbox.store.locks import file_lock

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

    from outbox.store.handle import Store

# The head schema as SQL, one statement a line group, for a new file (see the module text).
HEAD_SCHEMA = Path(__file__).with_name("head_schema.sql")
_STAMP = re.compile(r"^INSERT INTO alembic_version \(version_num\) VALUES \('([^']+)'\);$", re.M)
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
        if not create_fresh(store):
            upgrade(store)


def create_fresh(store: Store) -> bool:
    """Give a new file (no table, no view in it) the head schema from
    :data:`HEAD_SCHEMA` in one transaction; False, and nothing done, when the file is not
    empty or the script is not for the head revision (the migrations then run)."""
    script = _head_script()
    if script is None:
        return False
    with store.write() as conn:
        cur = cursor(conn)
        if cur.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            cur.close()
            return False
        for statement in script:
            cur.execute(statement)
        cur.close()
    return True


@cache
def _head_script() -> tuple[str, ...] | None:
    """The statements of :data:`HEAD_SCHEMA` when it is stamped with the head revision."""
    try:
        text = HEAD_SCHEMA.read_text(encoding="utf-8")
    except OSError:
        return None
    stamp = _STAMP.findall(text)
    if stamp != [head_revision()]:
        return None
    return tuple(split_statements(text))


def split_statements(text: str) -> list[str]:
    """The SQL statements of ``text`` (a trigger's body kept whole), comments dropped."""
    statements: list[str] = []
    lines: list[str] = []
    for line in text.splitlines():
        if not lines and (not line.strip() or line.startswith("--")):
            continue
        lines.append(line)
        if sqlite3.complete_statement("\n".join(lines)):
            statements.append("\n".join(lines).strip())
            lines = []
    if lines:
        raise StoreError(f"{HEAD_SCHEMA}: an unfinished statement at the end")
    return statements


def head_schema_sql(path: str | Path) -> str:
    """:data:`HEAD_SCHEMA`'s text for the migrated outbox at ``path``: its tables, indexes,
    views and triggers as SQLite keeps them, then the revision stamp."""
    con = sqlite3.connect(path)
    try:
        objects = con.execute(
            "SELECT type, sql FROM sqlite_master WHERE sql IS NOT NULL"
            " AND name NOT LIKE 'sqlite_%' ORDER BY"
            " CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 WHEN 'view' THEN 2 ELSE 3 END,"
            " rowid"
        ).fetchall()
        (version,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        con.close()
    head = [
        "-- The outbox's schema at its head revision, as the migrations build it: what a new",
        "-- file gets in one transaction (outbox/store/migrate.py). Written by",
        "-- `python -m outbox.store.headschema`; tests/test_migrations.py checks it. Do not edit:",
        "-- every character counts, trailing spaces too (SQLite keeps each statement as written).",
        "",
    ]
    ending_in_a_comment = [sql for _type, sql in objects if "--" in sql.rsplit("\n", 1)[-1]]
    if ending_in_a_comment:  # its `;` would be inside the comment: the script would break
        raise StoreError(
            f"cannot script a statement that ends in a comment: {ending_in_a_comment[0]}"
        )
    body = [f"{sql};" for _type, sql in objects]
    stamp = f"INSERT INTO alembic_version (version_num) VALUES ('{version}');"
    return "\n".join([*head, *body, stamp, ""])


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
