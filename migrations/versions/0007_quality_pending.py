"""Data quality: hours staged and not judged yet (``quality_pending``).

The warn-only checks run once at the end of a fetch run over every hour it staged,
instead of in each page's transaction. Each staging transaction records here, per BA,
the runs of hours it wrote; the end-of-run pass judges them and deletes them in its own
transaction. A kill between the two leaves the rows here, and the next fetch run judges
them: no finding is lost.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quality_pending",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ba", sa.Text(), nullable=False),
        sa.Column("lo", sa.Text(), nullable=False),
        sa.Column("hi", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quality_pending")),
    )


def downgrade() -> None:
    op.drop_table("quality_pending")
