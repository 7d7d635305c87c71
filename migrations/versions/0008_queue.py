"""The send queue in its own table (``queue``); ``observations`` keeps the data only.

Before, every row carried its delivery state (``state``, ``attempts``, ``next_attempt_at``,
``last_error``, ``last_error_code``, ``acked_at``, ``acked_revision``) and a partial index
held the pending ones; an acknowledgement rewrote the ~130-byte row and left the index,
which cost half of a send's CPU. Now ``queue`` holds one narrow entry per row not
delivered yet, keyed ``(ts, series_id)`` (the order a send claims in): ``pending`` or
``dead``, with the revision it is for. A row without an entry is acknowledged, and an
acknowledgement is the delete of its entry. Triggers keep the two tables in step, so no
statement can stage a row without queueing it:

* ``tr_observations_queued``: a new row gets a pending entry;
* ``tr_observations_requeued``: a new revision puts the entry back to pending, attempts 0,
  carrying the new revision (an acknowledgement of the old one then deletes nothing);
* ``tr_observations_forgotten``: a deleted row takes its entry along.

``ack_minutes`` counts the rows acknowledged per minute (the report's backlog over time),
since a row no longer keeps its ack time. The upgrade rebuilds ``observations`` (about
the time and the disk space of a copy of the table); acks a killed send recorded in
``ack_log`` stay there and are applied to the queue by the next send. The downgrade puts
every row's state back (acknowledged rows get ``acked_revision = revision`` and no
``acked_at``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from importlib import import_module

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# What 0001 and 0006 created on `observations`, put back exactly by the downgrade (and the
# revision ledger's trigger re-created with the rebuilt table): their own text, not a copy.
OLD_VIEWS: dict[str, str] = import_module("migrations.versions.0001_initial").VIEWS
REVISED: str = import_module("migrations.versions.0006_quality").TRIGGER

_REQUEUE = """
    INSERT INTO queue (ts, series_id, revision) VALUES (new.ts, new.series_id, new.revision)
    ON CONFLICT (ts, series_id) DO UPDATE SET
        revision = excluded.revision, state = 'pending', attempts = 0, next_attempt_at = NULL,
        last_error = NULL, last_error_code = NULL;"""
TRIGGERS = {
    "tr_observations_queued": f"""
CREATE TRIGGER tr_observations_queued AFTER INSERT ON observations
BEGIN{_REQUEUE}
END""",
    "tr_observations_requeued": f"""
CREATE TRIGGER tr_observations_requeued AFTER UPDATE OF revision ON observations
WHEN old.revision IS NOT new.revision
BEGIN{_REQUEUE}
END""",
    "tr_observations_forgotten": """
CREATE TRIGGER tr_observations_forgotten AFTER DELETE ON observations
BEGIN
    DELETE FROM queue WHERE ts = old.ts AND series_id = old.series_id;
END""",
}
_JOINED = "FROM queue q JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts"
VIEWS = {
    "pending": f"""
        SELECT q.series_id, q.ts, o.value, o.quality_flag, q.revision, q.attempts,
               q.next_attempt_at, q.last_error, o.fetched_at
        {_JOINED} WHERE q.state = 'pending' ORDER BY q.ts, q.series_id""",
    "dead": f"""
        SELECT q.series_id, q.ts, o.value, o.quality_flag, q.revision, q.attempts,
               q.last_error_code, q.last_error, o.fetched_at
        {_JOINED} WHERE q.state = 'dead' ORDER BY q.series_id, q.ts""",
    # Every row with its delivery state: what `sqlite3 outbox.db` users ask first.
    "row_states": """
        SELECT o.series_id, o.ts, o.value, o.units, o.quality_flag, o.revision, o.page_id,
               o.page_row, o.fetched_at, coalesce(q.state, 'acked') AS state,
               coalesce(q.attempts, 0) AS attempts, q.next_attempt_at, q.last_error_code,
               q.last_error
        FROM observations o
        LEFT JOIN queue q ON q.ts = o.ts AND q.series_id = o.series_id""",
    "series_status": """
        SELECT s.series_id, s.ba, s.type, s.subtype,
               (SELECT count(*) FROM queue q
                 WHERE q.series_id = s.series_id AND q.state = 'pending') AS pending,
               (SELECT count(*) FROM observations o WHERE o.series_id = s.series_id
                 AND NOT EXISTS (SELECT 1 FROM queue q
                                 WHERE q.ts = o.ts AND q.series_id = o.series_id)) AS acked,
               (SELECT count(*) FROM queue q
                 WHERE q.series_id = s.series_id AND q.state = 'dead') AS dead,
               (SELECT max(ts) FROM observations o
                 WHERE o.series_id = s.series_id) AS newest_staged,
               (SELECT o.ts FROM observations o WHERE o.series_id = s.series_id
                 AND NOT EXISTS (SELECT 1 FROM queue q
                                 WHERE q.ts = o.ts AND q.series_id = o.series_id)
                 ORDER BY o.ts DESC LIMIT 1) AS newest_acked,
               CASE WHEN NOT EXISTS (SELECT 1 FROM queue q
                      WHERE q.series_id = s.series_id AND q.state = 'pending')
                    THEN (SELECT max(ts) FROM observations o WHERE o.series_id = s.series_id)
                    ELSE (SELECT o.ts FROM observations o WHERE o.series_id = s.series_id
                          AND o.ts < (SELECT min(p.ts) FROM queue p
                                      WHERE p.series_id = s.series_id AND p.state = 'pending')
                          ORDER BY o.ts DESC LIMIT 1)
               END AS delivered_through
        FROM series s ORDER BY s.series_id""",
}
_DATA_COLUMNS = "series_id, ts, value, units, quality_flag, revision, page_id, page_row, fetched_at"


def _observations(delivery: bool) -> None:
    """Create ``observations`` with (the old schema) or without its delivery columns."""
    columns = [
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("ts", sa.Text(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("units", sa.Text(), nullable=False),
        sa.Column("quality_flag", sa.Text(), nullable=False),
        sa.Column("revision", sa.Text(), nullable=False),
        sa.Column("page_id", sa.Integer(), nullable=True),
        sa.Column("page_row", sa.Integer(), nullable=True),
    ]
    if delivery:
        columns += [
            sa.Column("state", sa.Text(), nullable=False),
            sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
            sa.Column("next_attempt_at", sa.Text(), nullable=True),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("last_error_code", sa.Text(), nullable=True),
        ]
    columns.append(sa.Column("fetched_at", sa.Text(), nullable=False))
    if delivery:
        columns += [
            sa.Column("acked_at", sa.Text(), nullable=True),
            sa.Column("acked_revision", sa.Text(), nullable=True),
            sa.CheckConstraint(
                "state IN ('pending', 'acked', 'dead')", name="ck_observations_state"
            ),
        ]
    op.create_table(
        "observations",
        *columns,
        sa.CheckConstraint(
            "quality_flag IN ('good', 'estimated', 'missing')",
            name="ck_observations_quality_flag",
        ),
        sa.CheckConstraint(
            "value IS NOT NULL OR quality_flag = 'missing'",
            name="ck_observations_value_or_missing",
        ),
        sa.ForeignKeyConstraint(
            ["page_id"],
            ["pages.id"],
            name="fk_observations_page_id_pages",
            deferrable=True,
            initially="DEFERRED",
        ),
        sa.PrimaryKeyConstraint("series_id", "ts", name="pk_observations"),
        sqlite_with_rowid=False,
    )


def _drop_views_and_triggers(views: dict[str, str]) -> None:
    for name in views:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name in ("tr_observations_revised", *TRIGGERS):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")


def upgrade() -> None:
    _drop_views_and_triggers(OLD_VIEWS)
    op.create_table(
        "queue",
        sa.Column("ts", sa.Text(), nullable=False),
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("revision", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_code", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'dead')", name="ck_queue_state"),
        sa.PrimaryKeyConstraint("ts", "series_id", name="pk_queue"),
        sqlite_with_rowid=False,
    )
    op.execute(
        "INSERT INTO queue (ts, series_id, revision, state, attempts, next_attempt_at,"
        " last_error, last_error_code)"
        " SELECT ts, series_id, revision, state, attempts, next_attempt_at, last_error,"
        " last_error_code FROM observations WHERE state IN ('pending', 'dead')"
        " ORDER BY ts, series_id"
    )
    op.create_table(
        "ack_minutes",
        sa.Column("minute", sa.Text(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("newest_ts", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("minute", name="pk_ack_minutes"),
    )
    op.execute(
        "INSERT INTO ack_minutes (minute, rows, newest_ts)"
        " SELECT substr(acked_at, 1, 16), count(*), max(ts) FROM observations"
        " WHERE state = 'acked' AND acked_at IS NOT NULL GROUP BY 1"
    )
    op.drop_index("ix_observations_pending_due", table_name="observations")
    op.drop_index("ix_observations_dead", table_name="observations")
    op.rename_table("observations", "observations_0007")
    _observations(delivery=False)
    op.execute(
        f"INSERT INTO observations ({_DATA_COLUMNS})"
        f" SELECT {_DATA_COLUMNS} FROM observations_0007 ORDER BY series_id, ts"
    )
    op.drop_table("observations_0007")
    op.create_index(
        "ix_queue_dead",
        "queue",
        ["series_id", "ts", "state"],
        sqlite_where=sa.text("state = 'dead'"),
    )
    op.create_index(
        "ix_queue_deferred",
        "queue",
        ["next_attempt_at", "last_error_code", "state"],
        sqlite_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.execute(REVISED)
    for sql in TRIGGERS.values():
        op.execute(sql)
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    _drop_views_and_triggers(VIEWS)
    op.rename_table("observations", "observations_0008")
    _observations(delivery=True)
    op.execute(
        f"INSERT INTO observations ({_DATA_COLUMNS}, state, attempts, next_attempt_at,"
        " last_error, last_error_code, acked_revision)"
        f" SELECT {', '.join('o.' + c.strip() for c in _DATA_COLUMNS.split(','))},"
        " coalesce(q.state, 'acked'), coalesce(q.attempts, 0), q.next_attempt_at,"
        " q.last_error, q.last_error_code, CASE WHEN q.ts IS NULL THEN o.revision END"
        " FROM observations_0008 o LEFT JOIN queue q ON q.ts = o.ts AND q.series_id = o.series_id"
        " ORDER BY o.series_id, o.ts"
    )
    op.drop_table("observations_0008")
    op.drop_index("ix_queue_deferred", table_name="queue")
    op.drop_index("ix_queue_dead", table_name="queue")
    op.drop_table("queue")
    op.drop_table("ack_minutes")
    op.create_index(
        "ix_observations_pending_due",
        "observations",
        ["ts", "series_id", "next_attempt_at", "state"],
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_observations_dead",
        "observations",
        ["series_id", "ts", "state"],
        sqlite_where=sa.text("state = 'dead'"),
    )
    op.execute(REVISED)
    for name, sql in OLD_VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
