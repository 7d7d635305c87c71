-- The outbox's schema at its head revision, as the migrations build it: what a new
-- file gets in one transaction (outbox/store/migrate.py). Written by
-- `python -m outbox.store.headschema`; tests/test_migrations.py checks it. Do not edit:
-- every character counts, trailing spaces too (SQLite keeps each statement as written).

CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
CREATE TABLE pages (
	id INTEGER NOT NULL, 
	run_id INTEGER, 
	route TEXT NOT NULL, 
	params TEXT NOT NULL, 
	url TEXT NOT NULL, 
	page_no INTEGER NOT NULL, 
	page_offset INTEGER NOT NULL, 
	total INTEGER NOT NULL, 
	row_count INTEGER NOT NULL, 
	fetched_at TEXT NOT NULL, 
	encoding TEXT NOT NULL, 
	body BLOB NOT NULL, 
	CONSTRAINT pk_pages PRIMARY KEY (id)
);
CREATE TABLE series (
	series_id TEXT NOT NULL, 
	ba TEXT NOT NULL, 
	type TEXT NOT NULL, 
	subtype TEXT, 
	units TEXT NOT NULL, 
	route TEXT NOT NULL, 
	facets TEXT NOT NULL, 
	first_seen TEXT NOT NULL, 
	CONSTRAINT pk_series PRIMARY KEY (series_id)
);
CREATE TABLE watermarks (
	stream TEXT NOT NULL, 
	dataset TEXT NOT NULL, 
	respondent TEXT NOT NULL, 
	route TEXT NOT NULL, 
	last_ts TEXT NOT NULL, 
	updated_at TEXT NOT NULL, 
	run_id INTEGER, 
	CONSTRAINT pk_watermarks PRIMARY KEY (stream)
);
CREATE TABLE runs (
	id INTEGER NOT NULL, 
	stage TEXT NOT NULL, 
	started_at TEXT NOT NULL, 
	finished_at TEXT, 
	status TEXT NOT NULL, 
	counts TEXT DEFAULT '{}' NOT NULL, 
	error TEXT, 
	pid INTEGER, 
	CONSTRAINT pk_runs PRIMARY KEY (id), 
	CONSTRAINT ck_runs_ck_runs_status CHECK (status IN ('running', 'ok', 'failed'))
);
CREATE TABLE checked_gaps (
	series_id TEXT NOT NULL, 
	ts TEXT NOT NULL, 
	checked_at TEXT NOT NULL, 
	CONSTRAINT pk_checked_gaps PRIMARY KEY (series_id, ts)
)
 WITHOUT ROWID

;
CREATE TABLE meta (
	"key" TEXT NOT NULL, 
	value TEXT NOT NULL, 
	CONSTRAINT pk_meta PRIMARY KEY ("key")
);
CREATE TABLE "ack_log" (
	id INTEGER NOT NULL, 
	acked_at TEXT NOT NULL, 
	keys TEXT NOT NULL, 
	CONSTRAINT pk_ack_log PRIMARY KEY (id)
);
CREATE TABLE stream_progress (
	stream TEXT NOT NULL, 
	dataset TEXT NOT NULL, 
	respondent TEXT NOT NULL, 
	asked_through TEXT NOT NULL, 
	updated_at TEXT NOT NULL, 
	run_id INTEGER, 
	CONSTRAINT pk_stream_progress PRIMARY KEY (stream)
);
CREATE TABLE revisions (
	id INTEGER NOT NULL, 
	series_id TEXT NOT NULL, 
	ts TEXT NOT NULL, 
	old_value FLOAT, 
	new_value FLOAT, 
	old_revision TEXT NOT NULL, 
	new_revision TEXT NOT NULL, 
	old_quality_flag TEXT NOT NULL, 
	new_quality_flag TEXT NOT NULL, 
	old_units TEXT NOT NULL, 
	new_units TEXT NOT NULL, 
	seen_at TEXT NOT NULL, 
	run_id INTEGER, 
	CONSTRAINT pk_revisions PRIMARY KEY (id)
);
CREATE TABLE findings (
	id INTEGER NOT NULL, 
	"key" TEXT NOT NULL, 
	rule TEXT NOT NULL, 
	ba TEXT NOT NULL, 
	series_id TEXT, 
	start TEXT NOT NULL, 
	"end" TEXT NOT NULL, 
	severity TEXT NOT NULL, 
	measured FLOAT, 
	expected FLOAT, 
	detail TEXT NOT NULL, 
	first_seen TEXT NOT NULL, 
	last_seen TEXT NOT NULL, 
	resolved_at TEXT, 
	CONSTRAINT pk_findings PRIMARY KEY (id), 
	CONSTRAINT ck_findings_severity CHECK (severity IN ('info', 'warn', 'crit')), 
	CONSTRAINT uq_findings_key UNIQUE ("key")
);
CREATE TABLE quality_pending (
	id INTEGER NOT NULL, 
	ba TEXT NOT NULL, 
	lo TEXT NOT NULL, 
	hi TEXT NOT NULL, 
	run_id INTEGER, 
	CONSTRAINT pk_quality_pending PRIMARY KEY (id)
);
CREATE TABLE queue (
	ts TEXT NOT NULL, 
	series_id TEXT NOT NULL, 
	revision TEXT NOT NULL, 
	state TEXT DEFAULT 'pending' NOT NULL, 
	attempts INTEGER DEFAULT 0 NOT NULL, 
	next_attempt_at TEXT, 
	last_error TEXT, 
	last_error_code TEXT, 
	CONSTRAINT pk_queue PRIMARY KEY (ts, series_id), 
	CONSTRAINT ck_queue_ck_queue_state CHECK (state IN ('pending', 'dead'))
)
 WITHOUT ROWID

;
CREATE TABLE ack_minutes (
	minute TEXT NOT NULL, 
	rows INTEGER NOT NULL, 
	newest_ts TEXT NOT NULL, 
	CONSTRAINT pk_ack_minutes PRIMARY KEY (minute)
);
CREATE TABLE observations (
	series_id TEXT NOT NULL, 
	ts TEXT NOT NULL, 
	value FLOAT, 
	units TEXT NOT NULL, 
	quality_flag TEXT NOT NULL, 
	revision TEXT NOT NULL, 
	page_id INTEGER, 
	page_row INTEGER, 
	fetched_at TEXT NOT NULL, 
	CONSTRAINT pk_observations PRIMARY KEY (series_id, ts), 
	CONSTRAINT ck_observations_ck_observations_quality_flag CHECK (quality_flag IN ('good', 'estimated', 'missing')), 
	CONSTRAINT ck_observations_ck_observations_value_or_missing CHECK (value IS NOT NULL OR quality_flag = 'missing'), 
	CONSTRAINT fk_observations_page_id_pages FOREIGN KEY(page_id) REFERENCES pages (id) DEFERRABLE INITIALLY DEFERRED
)
 WITHOUT ROWID

;
CREATE INDEX ix_runs_stage_started_at ON runs (stage, started_at);
CREATE INDEX ix_revisions_series_id_ts ON revisions (series_id, ts);
CREATE INDEX ix_revisions_seen_at ON revisions (seen_at);
CREATE INDEX ix_findings_rule_ba_start ON findings (rule, ba, start);
CREATE INDEX ix_findings_end ON findings ("end");
CREATE INDEX ix_queue_dead ON queue (series_id, ts, state) WHERE state = 'dead';
CREATE INDEX ix_queue_deferred ON queue (next_attempt_at, last_error_code, state) WHERE next_attempt_at IS NOT NULL;
CREATE VIEW pending AS 
        SELECT q.series_id, q.ts, o.value, o.quality_flag, q.revision, q.attempts,
               q.next_attempt_at, q.last_error, o.fetched_at
        FROM queue q JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts WHERE q.state = 'pending' ORDER BY q.ts, q.series_id;
CREATE VIEW dead AS 
        SELECT q.series_id, q.ts, o.value, o.quality_flag, q.revision, q.attempts,
               q.last_error_code, q.last_error, o.fetched_at
        FROM queue q JOIN observations o ON o.series_id = q.series_id AND o.ts = q.ts WHERE q.state = 'dead' ORDER BY q.series_id, q.ts;
CREATE VIEW row_states AS 
        SELECT o.series_id, o.ts, o.value, o.units, o.quality_flag, o.revision, o.page_id,
               o.page_row, o.fetched_at, coalesce(q.state, 'acked') AS state,
               coalesce(q.attempts, 0) AS attempts, q.next_attempt_at, q.last_error_code,
               q.last_error
        FROM observations o
        LEFT JOIN queue q ON q.ts = o.ts AND q.series_id = o.series_id;
CREATE VIEW series_status AS 
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
        FROM series s ORDER BY s.series_id;
CREATE TRIGGER tr_observations_revised AFTER UPDATE OF revision ON observations
WHEN old.revision IS NOT new.revision
BEGIN
    INSERT INTO revisions (series_id, ts, old_value, new_value, old_revision, new_revision,
                           old_quality_flag, new_quality_flag, old_units, new_units,
                           seen_at, run_id)
    VALUES (new.series_id, new.ts, old.value, new.value, old.revision, new.revision,
            old.quality_flag, new.quality_flag, old.units, new.units, new.fetched_at,
            (SELECT p.run_id FROM pages p WHERE p.id = new.page_id));
END;
CREATE TRIGGER tr_observations_queued AFTER INSERT ON observations
BEGIN
    INSERT INTO queue (ts, series_id, revision) VALUES (new.ts, new.series_id, new.revision)
    ON CONFLICT (ts, series_id) DO UPDATE SET
        revision = excluded.revision, state = 'pending', attempts = 0, next_attempt_at = NULL,
        last_error = NULL, last_error_code = NULL;
END;
CREATE TRIGGER tr_observations_requeued AFTER UPDATE OF revision ON observations
WHEN old.revision IS NOT new.revision
BEGIN
    INSERT INTO queue (ts, series_id, revision) VALUES (new.ts, new.series_id, new.revision)
    ON CONFLICT (ts, series_id) DO UPDATE SET
        revision = excluded.revision, state = 'pending', attempts = 0, next_attempt_at = NULL,
        last_error = NULL, last_error_code = NULL;
END;
CREATE TRIGGER tr_observations_forgotten AFTER DELETE ON observations
BEGIN
    DELETE FROM queue WHERE ts = old.ts AND series_id = old.series_id;
END;
INSERT INTO alembic_version (version_num) VALUES ('0009');
