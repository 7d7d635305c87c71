"""Data quality: the revision ledger (``revisions``) and rule findings (``findings``).

``revisions`` is written by a trigger on ``observations``: an upsert that replaces a
row's revision records the old and new value, quality flag, units and revision, the
fetch time of the new one and the run of the page it came from. Inserting a new row
fires nothing, so the ledger costs a stage only for rows that actually change.

``findings`` holds what the quality rules found (outbox/quality); ``key`` is the
identity of one finding (rule, BA, series, first hour), so a re-check updates it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TRIGGER = """
CREATE TRIGGER tr_observations_revised AFTER UPDATE OF revision ON observations
WHEN old.revision IS NOT new.revision
BEGIN
    INSERT INTO revisions (series_id, ts, old_value, new_value, old_revision, new_revision,
                           old_quality_flag, new_quality_flag, old_units, new_units,
                           seen_at, run_id)
    VALUES (new.series_id, new.ts, old.value, new.value, old.revision, new.revision,
            old.quality_flag, new.quality_flag, old.units, new.units, new.fetched_at,
            (SELECT p.run_id FROM pages p WHERE p.id = new.page_id));
END
"""


def upgrade() -> None:
    op.create_table(
        "revisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("ts", sa.Text(), nullable=False),
        sa.Column("old_value", sa.Float(), nullable=True),
        sa.Column("new_value", sa.Float(), nullable=True),
        sa.Column("old_revision", sa.Text(), nullable=False),
        sa.Column("new_revision", sa.Text(), nullable=False),
        sa.Column("old_quality_flag", sa.Text(), nullable=False),
        sa.Column("new_quality_flag", sa.Text(), nullable=False),
        sa.Column("old_units", sa.Text(), nullable=False),
        sa.Column("new_units", sa.Text(), nullable=False),
        sa.Column("seen_at", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revisions")),
    )
    op.create_index("ix_revisions_series_id_ts", "revisions", ["series_id", "ts"])
    op.create_index("ix_revisions_seen_at", "revisions", ["seen_at"])
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("ba", sa.Text(), nullable=False),
        sa.Column("series_id", sa.Text(), nullable=True),
        sa.Column("start", sa.Text(), nullable=False),
        sa.Column("end", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("measured", sa.Float(), nullable=True),
        sa.Column("expected", sa.Float(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.Text(), nullable=False),
        sa.Column("last_seen", sa.Text(), nullable=False),
        sa.Column("resolved_at", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "severity IN ('info', 'warn', 'crit')", name=op.f("ck_findings_severity")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
        sa.UniqueConstraint("key", name=op.f("uq_findings_key")),
    )
    op.create_index("ix_findings_rule_ba_start", "findings", ["rule", "ba", "start"])
    op.create_index("ix_findings_end", "findings", ["end"])
    op.execute(TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS tr_observations_revised")
    op.drop_index("ix_findings_end", table_name="findings")
    op.drop_index("ix_findings_rule_ba_start", table_name="findings")
    op.drop_table("findings")
    op.drop_index("ix_revisions_seen_at", table_name="revisions")
    op.drop_index("ix_revisions_series_id_ts", table_name="revisions")
    op.drop_table("revisions")
