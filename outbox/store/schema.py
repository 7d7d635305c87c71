"""The outbox's tables as SQLAlchemy Core metadata: Alembic's target (migrations/env.py).

Migrations create and change the tables (never ``create_all``); this metadata is what
``alembic check`` compares a migrated file against, and what the modules of this package
name columns by.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    text,
)

STATES = ("pending", "acked", "dead")  # acked: no queue entry
QUALITY_FLAGS = ("good", "estimated", "missing")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

pages = Table(
    "pages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("run_id", Integer, nullable=True),
    Column("route", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("page_no", Integer, nullable=False),
    Column("page_offset", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("row_count", Integer, nullable=False),
    Column("fetched_at", Text, nullable=False),
    Column("encoding", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("series_id", Text, primary_key=True),
    Column("ba", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("subtype", Text, nullable=True),
    Column("units", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("facets", Text, nullable=False),
    Column("first_seen", Text, nullable=False),
)

observations = Table(
    "observations",
    metadata,
    Column("series_id", Text, primary_key=True),
    Column("ts", Text, primary_key=True),
    Column("value", Float, nullable=True),
    Column("units", Text, nullable=False),
    Column("quality_flag", Text, nullable=False),
    Column("revision", Text, nullable=False),
    Column(
        "page_id",
        Integer,
        ForeignKey("pages.id", deferrable=True, initially="DEFERRED"),
        nullable=True,
    ),
    Column("page_row", Integer, nullable=True),
    Column("fetched_at", Text, nullable=False),
    CheckConstraint("quality_flag IN ('good', 'estimated', 'missing')", name="quality_flag"),
    CheckConstraint("value IS NOT NULL OR quality_flag = 'missing'", name="value_or_missing"),
    sqlite_with_rowid=False,
)

# The rows not delivered yet, in the order a send claims them (migration 0008): an entry
# per staged row that is pending (to be sent) or dead (refused, or quarantined); a row of
# ``observations`` without one is acknowledged. Triggers on ``observations`` keep it: a new
# row or a new revision puts (back) a pending entry carrying that revision, a deleted row
# takes its entry along. An acknowledgement deletes the entry of the revision sent (a
# revision staged meanwhile stays), so an ack costs the delete of a narrow entry, in claim
# order, instead of the rewrite of the wide row in another order.
queue = Table(
    "queue",
    metadata,
    Column("ts", Text, primary_key=True),
    Column("series_id", Text, primary_key=True),
    Column("revision", Text, nullable=False),
    Column("state", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Text, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_error_code", Text, nullable=True),
    CheckConstraint("state IN ('pending', 'dead')", name="state"),
    sqlite_with_rowid=False,
)
# `state` ends both partial indexes so that SQLite counts them as covering (see 0002).
Index(
    "ix_queue_dead",
    queue.c.series_id,
    queue.c.ts,
    queue.c.state,
    sqlite_where=text("state = 'dead'"),
)
Index(
    "ix_queue_deferred",
    queue.c.next_attempt_at,
    queue.c.last_error_code,
    queue.c.state,
    sqlite_where=text("next_attempt_at IS NOT NULL"),
)

# Rows acknowledged per minute (UTC, ``YYYY-MM-DDTHH:MM``) and the newest hour among them:
# the report's backlog over time, now that a row no longer keeps its ack time. One upsert
# per applied batch; housekeeping prunes minutes past retention.
ack_minutes = Table(
    "ack_minutes",
    metadata,
    Column("minute", Text, primary_key=True),
    Column("rows", Integer, nullable=False),
    Column("newest_ts", Text, nullable=False),
)

watermarks = Table(
    "watermarks",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("respondent", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("last_ts", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)

# Per stream, the newest hour EIA has been asked for and answered completely (the last
# page of the request staged, never past now - the dataset's publication lag). A stream
# EIA has no rows for has no watermark; this is where its next incremental run starts.
stream_progress = Table(
    "stream_progress",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("respondent", Text, nullable=False),
    Column("asked_through", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stage", Text, nullable=False),
    Column("started_at", Text, nullable=False),
    Column("finished_at", Text, nullable=True),
    Column("status", Text, nullable=False),
    Column("counts", Text, nullable=False, server_default=text("'{}'")),
    Column("error", Text, nullable=True),
    Column("pid", Integer, nullable=True),
    CheckConstraint("status IN ('running', 'ok', 'failed')", name="status"),
)
Index("ix_runs_stage_started_at", runs.c.stage, runs.c.started_at)

checked_gaps = Table(
    "checked_gaps",
    metadata,
    Column("series_id", Text, primary_key=True),
    Column("ts", Text, primary_key=True),
    Column("checked_at", Text, nullable=False),
    sqlite_with_rowid=False,
)

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

# Batch acknowledgements recorded but not yet applied to their rows (see Delivery.record_outcome):
# a send records a batch's acks in one small row before its next POST, and applies them to
# observations while that POST is in flight. Empty whenever no send is running, unless a
# send was killed; the next send applies what it finds first.
ack_log = Table(
    "ack_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("acked_at", Text, nullable=False),
    # JSON {"from": ts, "to": ts, "keys": ["ts\x1fseries_id\x1frevision", ...]} (0009)
    Column("keys", Text, nullable=False),
)

# The revision ledger: one row per revision that replaced a staged row's value, quality
# flag or units, written by the trigger tr_observations_revised (migration 0006) in the
# upsert's own statement; a new row fires nothing.
revisions = Table(
    "revisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_id", Text, nullable=False),
    Column("ts", Text, nullable=False),
    Column("old_value", Float, nullable=True),
    Column("new_value", Float, nullable=True),
    Column("old_revision", Text, nullable=False),
    Column("new_revision", Text, nullable=False),
    Column("old_quality_flag", Text, nullable=False),
    Column("new_quality_flag", Text, nullable=False),
    Column("old_units", Text, nullable=False),
    Column("new_units", Text, nullable=False),
    Column("seen_at", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)
Index("ix_revisions_series_id_ts", revisions.c.series_id, revisions.c.ts)
Index("ix_revisions_seen_at", revisions.c.seen_at)

# What the data-quality rules found (outbox/quality). ``key`` is rule|ba|series|start, the
# identity a re-check updates (last_seen) instead of adding a row.
findings = Table(
    "findings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, unique=True),
    Column("rule", Text, nullable=False),
    Column("ba", Text, nullable=False),
    Column("series_id", Text, nullable=True),
    Column("start", Text, nullable=False),
    Column("end", Text, nullable=False),
    Column("severity", Text, nullable=False),
    Column("measured", Float, nullable=True),
    Column("expected", Float, nullable=True),
    Column("detail", Text, nullable=False),
    Column("first_seen", Text, nullable=False),
    Column("last_seen", Text, nullable=False),
    Column("resolved_at", Text, nullable=True),
    CheckConstraint("severity IN ('info', 'warn', 'crit')", name="severity"),
)
Index("ix_findings_rule_ba_start", findings.c.rule, findings.c.ba, findings.c.start)
Index("ix_findings_end", findings.c.end)

# Hours a fetch staged that the warn-only quality checks have not judged yet: per BA, a
# run of hours (``lo``..``hi``), written in the staging transaction, deleted by the
# end-of-run pass that judges them (outbox/quality/pending.py).
quality_pending = Table(
    "quality_pending",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ba", Text, nullable=False),
    Column("lo", Text, nullable=False),
    Column("hi", Text, nullable=False),
    Column("run_id", Integer, nullable=True),
)
