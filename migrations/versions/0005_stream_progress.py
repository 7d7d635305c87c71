"""stream_progress: per stream, how far EIA has been asked and has answered completely.

A watermark moves only when rows arrive; a stream EIA has no rows for (a generation-only
BA has no demand) would start at ``eia.history_start`` on every incremental run. This
table records, in the transaction of a window's last page, the newest hour a completed
request covered (never past now - the dataset's publication lag), so that the next run
starts there minus the look-back.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stream_progress",
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("respondent", sa.Text(), nullable=False),
        sa.Column("asked_through", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("stream", name=op.f("pk_stream_progress")),
    )


def downgrade() -> None:
    # Without it an incremental run starts an empty stream at eia.history_start again:
    # slower, nothing lost.
    op.drop_table("stream_progress")
