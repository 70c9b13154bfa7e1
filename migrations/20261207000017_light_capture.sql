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

CREATE OR REPLACE FUNCTION embed_worker.capture_session_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO embed_worker.captured (source_type, source_id)
    SELECT 'session', n.id
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE (n.title, n.focus, n.depth, n.notes, n.transcript)
           IS DISTINCT FROM (o.title, o.focus, o.depth, o.notes, o.transcript);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO embed_worker.captured (source_type, source_id)
    SELECT 'template', n.id FROM new_rows n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO embed_worker.captured (source_type, source_id)
    SELECT 'template', n.id
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE (n.body, n.focus, n.depth, n.category, n.placeholders)
           IS DISTINCT FROM (o.body, o.focus, o.depth, o.category, o.placeholders);
    RETURN NULL;
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
    WITH taken AS (
        DELETE FROM embed_worker.captured c
         WHERE c.ctid = ANY (ARRAY(SELECT x.ctid FROM embed_worker.captured x
                                    LIMIT max_rows FOR UPDATE SKIP LOCKED))
        RETURNING c.source_type, c.source_id
    )
    SELECT array_agg(t.source_type), array_agg(t.source_id), count(*)
      INTO types, ids, changes
      FROM taken t;
    queued := 0;
    IF changes > 0 THEN
        queued := embed_worker.enqueue_jobs(types, ids, queue, max_attempts, 0);
    END IF;
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.drain_captured(text, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.drain_captured(text, integer, integer) TO embed_worker;
