"""ack_log keeps each batch's keys as one string each, with the batch's span of hours.

A recorded batch was ``[[series_id, ts, revision], ...]``; applying it took three JSON
extracts per key and a primary-key seek per key into ``queue``. Now it is
``{"from": ts, "to": ts, "keys": ["ts\\x1fseries_id\\x1frevision", ...]}``: the send
deletes the queue entries of ``from``..``to`` (one range of the queue, which is ordered by
``ts``) whose ``ts``, ``series_id`` and ``revision`` joined that way are among the keys
(about a third less CPU a row). The upgrade and the downgrade rewrite the batches a killed
send left unapplied, so none is lost either way; the schema does not change.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The key string of one [series_id, ts, revision] array element, and the pieces of one.
_JOINED = (
    "json_extract(value, '$[1]') || char(31) || json_extract(value, '$[0]')"
    " || char(31) || json_extract(value, '$[2]')"
)
_TS = "substr(value, 1, instr(value, char(31)) - 1)"
_REST = "substr(value, instr(value, char(31)) + 1)"
_SERIES = f"substr({_REST}, 1, instr({_REST}, char(31)) - 1)"
_REVISION = f"substr({_REST}, instr({_REST}, char(31)) + 1)"


def upgrade() -> None:
    op.execute(
        "UPDATE ack_log SET keys = (SELECT json_object("
        " 'from', min(json_extract(value, '$[1]')), 'to', max(json_extract(value, '$[1]')),"
        f" 'keys', json_group_array({_JOINED})) FROM json_each(ack_log.keys))"
        " WHERE json_type(keys) = 'array'"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE ack_log SET keys = (SELECT"
        f" json_group_array(json_array({_SERIES}, {_TS}, {_REVISION}))"
        " FROM json_each(ack_log.keys, '$.keys'))"
        " WHERE json_type(keys) = 'object'"
    )
