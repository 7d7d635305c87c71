"""ack_log drops its ``rows`` column: the count is derived from ``keys`` where needed.

0003 as first released created ``ack_log.rows`` (NOT NULL); a later build of 0003 left it
out, so an outbox may be stamped 0003 with or without it. This revision brings both to the
same table. Recorded acknowledgements are kept (the table is copied, not emptied).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _has_rows() -> bool:
    columns = sa.inspect(op.get_bind()).get_columns("ack_log")
    return any(c["name"] == "rows" for c in columns)


def upgrade() -> None:
    if _has_rows():
        with op.batch_alter_table("ack_log") as batch:
            batch.drop_column("rows")


def downgrade() -> None:
    if _has_rows():
        return
    with op.batch_alter_table("ack_log") as batch:
        batch.add_column(sa.Column("rows", sa.Integer(), nullable=True))
    op.execute("UPDATE ack_log SET rows = json_array_length(keys)")
    with op.batch_alter_table("ack_log") as batch:
        batch.alter_column("rows", existing_type=sa.Integer(), nullable=False)
