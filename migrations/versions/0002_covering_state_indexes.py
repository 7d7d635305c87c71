"""The partial indexes on observations carry `state` as their last column.

SQLite (3.40 at least) does not count a partial index ``... WHERE state = 'pending'`` as
covering a query that names ``state``, although every entry has that state: each entry
then costs a read of its table row. With ``state`` in the index, the scans of pending rows
(status counts, ``count_due``, ``next_retry_at``) and of dead rows read the index only.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# name -> (columns before this revision, the partial index's WHERE)
INDEXES = {
    "ix_observations_pending_due": (["ts", "series_id", "next_attempt_at"], "state = 'pending'"),
    "ix_observations_dead": (["series_id", "ts"], "state = 'dead'"),
}


def _recreate(with_state: bool) -> None:
    for name, (columns, where) in INDEXES.items():
        op.drop_index(name, table_name="observations")
        op.create_index(
            name,
            "observations",
            [*columns, "state"] if with_state else columns,
            sqlite_where=sa.text(where),
        )


def upgrade() -> None:
    _recreate(with_state=True)


def downgrade() -> None:
    _recreate(with_state=False)
