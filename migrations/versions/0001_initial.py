"""The outbox: observations, pages, series, watermarks, runs, checked_gaps, meta, views.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

VIEWS = {
    "pending": """
        SELECT series_id, ts, value, quality_flag, revision, attempts, next_attempt_at,
               last_error, fetched_at
        FROM observations WHERE state = 'pending' ORDER BY ts, series_id""",
    "dead": """
        SELECT series_id, ts, value, quality_flag, revision, attempts, last_error_code,
               last_error, fetched_at
        FROM observations WHERE state = 'dead' ORDER BY series_id, ts""",
    "series_status": """
        SELECT s.series_id, s.ba, s.type, s.subtype,
               (SELECT count(*) FROM observations o
                 WHERE o.series_id = s.series_id AND o.state = 'pending') AS pending,
               (SELECT count(*) FROM observations o
                 WHERE o.series_id = s.series_id AND o.state = 'acked') AS acked,
               (SELECT count(*) FROM observations o
                 WHERE o.series_id = s.series_id AND o.state = 'dead') AS dead,
               (SELECT max(ts) FROM observations o
                 WHERE o.series_id = s.series_id) AS newest_staged,
               (SELECT ts FROM observations o WHERE o.series_id = s.series_id
                 AND o.state = 'acked' ORDER BY ts DESC LIMIT 1) AS newest_acked,
               CASE WHEN NOT EXISTS (SELECT 1 FROM observations o
                      WHERE o.series_id = s.series_id AND o.state = 'pending')
                    THEN (SELECT max(ts) FROM observations o WHERE o.series_id = s.series_id)
                    ELSE (SELECT o.ts FROM observations o WHERE o.series_id = s.series_id
                          AND o.ts < (SELECT min(p.ts) FROM observations p
                                      WHERE p.series_id = s.series_id AND p.state = 'pending')
                          ORDER BY o.ts DESC LIMIT 1)
               END AS delivered_through
        FROM series s ORDER BY s.series_id""",
}


def upgrade() -> None:
    op.create_table(
        "pages",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("page_no", sa.Integer(), nullable=False),
        sa.Column("page_offset", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("fetched_at", sa.Text(), nullable=False),
        sa.Column("encoding", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pages"),
    )
    op.create_table(
        "series",
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("ba", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("subtype", sa.Text(), nullable=True),
        sa.Column("units", sa.Text(), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("facets", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", name="pk_series"),
    )
    op.create_table(
        "observations",
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("ts", sa.Text(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("units", sa.Text(), nullable=False),
        sa.Column("quality_flag", sa.Text(), nullable=False),
        sa.Column("revision", sa.Text(), nullable=False),
        sa.Column("page_id", sa.Integer(), nullable=True),
        sa.Column("page_row", sa.Integer(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_code", sa.Text(), nullable=True),
        sa.Column("fetched_at", sa.Text(), nullable=False),
        sa.Column("acked_at", sa.Text(), nullable=True),
        sa.Column("acked_revision", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'acked', 'dead')", name="ck_observations_state"),
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
    op.create_index(
        "ix_observations_pending_due",
        "observations",
        ["ts", "series_id", "next_attempt_at"],
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_observations_dead",
        "observations",
        ["series_id", "ts"],
        sqlite_where=sa.text("state = 'dead'"),
    )
    op.create_table(
        "watermarks",
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("respondent", sa.Text(), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("last_ts", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("stream", name="pk_watermarks"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column("started_at", sa.Text(), nullable=False),
        sa.Column("finished_at", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("counts", sa.Text(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'ok', 'failed')", name="ck_runs_status"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_stage_started_at", "runs", ["stage", "started_at"])
    op.create_table(
        "checked_gaps",
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("ts", sa.Text(), nullable=False),
        sa.Column("checked_at", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "ts", name="pk_checked_gaps"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("meta")
    op.drop_table("checked_gaps")
    op.drop_index("ix_runs_stage_started_at", table_name="runs")
    op.drop_table("runs")
    op.drop_table("watermarks")
    op.drop_index("ix_observations_dead", table_name="observations")
    op.drop_index("ix_observations_pending_due", table_name="observations")
    op.drop_table("observations")
    op.drop_table("series")
    op.drop_table("pages")
