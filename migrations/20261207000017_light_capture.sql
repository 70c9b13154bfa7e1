-- Change capture the app does not pay for (issue 31).
--
-- Measured before (pgbench, 8 clients, single-row UPDATEs of a session's text): 70-78% of the
-- throughput without capture. Each app statement ran embed_worker.enqueue_jobs in its own
-- transaction (ULIDs, an INSERT ... ON CONFLICT into apalis.jobs with its indexes and
-- triggers) and apalis's NOTIFY, which takes a database-wide lock at commit.
--
-- Now an app write appends one row per changed source to embed_worker.captured (no index, no
-- key, no NOTIFY), and the workers move those rows into the queue every capture.drain_ms with
-- embed_worker.drain_captured: DELETE and enqueue in one transaction, so a change is either
-- still recorded or has its job (none is lost), and SKIP LOCKED lets every replica drain.

CREATE TABLE IF NOT EXISTS embed_worker.captured (
    source_type  embedding_source NOT NULL,
    source_id    uuid NOT NULL
);
-- Rows live for a fraction of a second: vacuum the table by count, not by its (tiny) size.
ALTER TABLE embed_worker.captured SET (autovacuum_vacuum_scale_factor = 0,
                                       autovacuum_vacuum_threshold = 1000);
GRANT SELECT ON embed_worker.captured TO embed_worker;

CREATE OR REPLACE FUNCTION embed_worker.capture_session_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO embed_worker.captured (source_type, source_id)
    SELECT 'session', n.id FROM new_rows n;
    RETURN NULL;
END $$;

-- An UPDATE is captured per row, before it is written, by one trigger that also does the
-- touch (updated_at moves with the text): the WHEN clause is evaluated by the executor itself,
-- so an update that leaves the text alone (usage counters) runs no function at all, and one
-- that changes it runs one PL/pgSQL call with one single-row INSERT. (Measured: a statement
-- trigger with transition tables plus the separate touch trigger cost the app more.) While
-- capture is on, `embed-worker migrate` disables the touch trigger, which this one replaces;
-- with capture off the touch trigger runs alone (db::apply_capture).
-- No `SET search_path` on these two, unlike every other SECURITY DEFINER function here: the
-- clause cost the app's single-row UPDATE 4-5% more (it re-plans the body's INSERT at every
-- call). Nothing in them is looked up by the caller's path: the one relation is qualified, the
-- function is pg_catalog's, the operator is pg_catalog's (searched first when the path does not
-- name it; exact matches there win) and the literal takes the column's type.
CREATE OR REPLACE FUNCTION embed_worker.capture_session_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := pg_catalog.clock_timestamp();
    END IF;
    INSERT INTO embed_worker.captured (source_type, source_id) VALUES ('session', NEW.id);
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO embed_worker.captured (source_type, source_id)
    SELECT 'template', n.id FROM new_rows n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := pg_catalog.clock_timestamp();
    END IF;
    INSERT INTO embed_worker.captured (source_type, source_id) VALUES ('template', NEW.id);
    RETURN NEW;
END $$;

-- The touch functions without their column lists: which columns are embedded is the render
-- settings' decision, and the triggers' WHEN clauses say it.
CREATE OR REPLACE FUNCTION embed_worker.touch_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION embed_worker.touch_template() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END $$;

-- The per-row triggers, WHEN the default render's columns change. The statement triggers they
-- replace go in any case. Where the app's table has other columns, none is made here:
-- `embed-worker migrate` makes them from render.* (db::follow_render), and re-makes them
-- whenever the render settings name other columns.
DROP TRIGGER IF EXISTS trg_sessions_capture_update ON sessions;
DROP TRIGGER IF EXISTS trg_question_templates_capture_update ON question_templates;
DROP TRIGGER IF EXISTS trg_sessions_touch ON sessions;
DROP TRIGGER IF EXISTS trg_question_templates_touch ON question_templates;
DO $$
BEGIN
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.sessions'::regclass
           AND attname IN ('title', 'focus', 'depth', 'notes', 'transcript') AND NOT attisdropped) = 5 THEN
        CREATE TRIGGER trg_sessions_capture_update BEFORE UPDATE ON sessions FOR EACH ROW
            WHEN ((NEW.title, NEW.focus, NEW.depth, NEW.notes, NEW.transcript)
                  IS DISTINCT FROM (OLD.title, OLD.focus, OLD.depth, OLD.notes, OLD.transcript))
            EXECUTE FUNCTION embed_worker.capture_session_update();
        CREATE TRIGGER trg_sessions_touch BEFORE UPDATE ON sessions FOR EACH ROW
            WHEN ((NEW.title, NEW.focus, NEW.depth, NEW.notes, NEW.transcript)
                  IS DISTINCT FROM (OLD.title, OLD.focus, OLD.depth, OLD.notes, OLD.transcript))
            EXECUTE FUNCTION embed_worker.touch_session();
        -- The columns it fires on, sorted, as db::render records them.
        COMMENT ON TRIGGER trg_sessions_capture_update ON sessions
            IS 'embed-worker render columns: depth, focus, notes, title, transcript';
    END IF;
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.question_templates'::regclass
           AND attname IN ('body', 'focus', 'depth', 'category', 'placeholders') AND NOT attisdropped) = 5 THEN
        CREATE TRIGGER trg_question_templates_capture_update BEFORE UPDATE ON question_templates FOR EACH ROW
            WHEN ((NEW.body, NEW.focus, NEW.depth, NEW.category, NEW.placeholders)
                  IS DISTINCT FROM (OLD.body, OLD.focus, OLD.depth, OLD.category, OLD.placeholders))
            EXECUTE FUNCTION embed_worker.capture_template_update();
        CREATE TRIGGER trg_question_templates_touch BEFORE UPDATE ON question_templates FOR EACH ROW
            WHEN ((NEW.body, NEW.focus, NEW.depth, NEW.category, NEW.placeholders)
                  IS DISTINCT FROM (OLD.body, OLD.focus, OLD.depth, OLD.category, OLD.placeholders))
            EXECUTE FUNCTION embed_worker.touch_template();
        COMMENT ON TRIGGER trg_question_templates_capture_update ON question_templates
            IS 'embed-worker render columns: body, category, depth, focus, placeholders';
    END IF;
END $$;

-- Moves up to max_rows recorded changes into the queue: the rows are deleted and their jobs
-- inserted by one transaction (enqueue_jobs dedups sources and skips those with a pending job).
-- Returns the changes taken and the jobs made.
CREATE OR REPLACE FUNCTION embed_worker.drain_captured(
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10,
    max_rows integer DEFAULT 10000,
    OUT changes bigint,
    OUT queued integer
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    types embedding_source[];
    ids uuid[];
BEGIN
    IF max_rows IS NULL OR max_rows NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'drain_captured: max_rows must be 1..100000, got %', coalesce(max_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A source edited again while its job waits (an app's autosave) needs no second job: those
    -- are dropped here by one index probe each, before enqueue_jobs makes ids for them.
    WITH taken AS (
        DELETE FROM embed_worker.captured c
         WHERE c.ctid = ANY (ARRAY(SELECT x.ctid FROM embed_worker.captured x
                                    LIMIT max_rows FOR UPDATE SKIP LOCKED))
        RETURNING c.source_type, c.source_id
    ), fresh AS (
        SELECT DISTINCT t.source_type, t.source_id FROM taken t
         WHERE NOT EXISTS (SELECT 1 FROM apalis.jobs j
                            WHERE j.job_type = queue
                              AND j.idempotency_key = t.source_type::text || ':' || t.source_id::text
                              AND j.status = 'Pending' AND j.priority >= 0)
    )
    SELECT (SELECT count(*) FROM taken), array_agg(f.source_type), array_agg(f.source_id)
      INTO changes, types, ids
      FROM fresh f;
    queued := 0;
    IF types IS NOT NULL THEN
        queued := embed_worker.enqueue_jobs(types, ids, queue, max_attempts, 0);
    END IF;
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.drain_captured(text, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.drain_captured(text, integer, integer) TO embed_worker;
