"""ack_log: batch acknowledgements recorded before they are applied to their rows.

A send records each accepted batch's keys in one row (cheap to commit) before its next
POST, and marks the rows acked while that POST is in flight.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ack_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("acked_at", sa.Text(), nullable=False),
        # As released; 0004 drops it (the count is derived from ``keys``).
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ack_log")),
    )


def downgrade() -> None:
    # Acks recorded and not applied yet are applied first: dropping them would send
    # those rows again.
    op.execute(
        """
        UPDATE observations SET state = 'acked', acked_revision = revision,
               acked_at = (SELECT a.acked_at FROM ack_log a, json_each(a.keys) k
                           WHERE json_extract(k.value, '$[0]') = observations.series_id
                             AND json_extract(k.value, '$[1]') = observations.ts
                             AND json_extract(k.value, '$[2]') = observations.revision
                           ORDER BY a.id LIMIT 1),
               last_error = NULL, last_error_code = NULL, next_attempt_at = NULL
        WHERE state = 'pending' AND EXISTS (
            SELECT 1 FROM ack_log a, json_each(a.keys) k
            WHERE json_extract(k.value, '$[0]') = observations.series_id
              AND json_extract(k.value, '$[1]') = observations.ts
              AND json_extract(k.value, '$[2]') = observations.revision)
        """
    )
    op.drop_table("ack_log")
