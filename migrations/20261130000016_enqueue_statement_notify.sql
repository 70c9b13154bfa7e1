-- Queueing, round 3 continued: 20,000 jobs in one statement well under half a second.
--
-- Measured on the 2-core machine (20,000 sessions, none embedded, no open job; the server's
-- auto_explain): the whole enqueue 376 ms, of which embed_worker.enqueue_jobs 318 ms: the
-- INSERT 147 ms, apalis's per-row NOTIFY trigger ~65 ms of it, a sort spilled to disk (4 MB
-- over the default work_mem) ~40 ms, and the priority-raising UPDATE ~100 ms, a scan of every
-- pending job of the queue (the 20,000 just inserted among them) that found nothing to raise.
--
--   - The UPDATE runs only when the INSERT skipped a source: a pending job of a source it raises
--     is exactly a conflict on (job_type, idempotency_key), so no conflict means nothing to raise.
--   - The function sorts in memory (work_mem 32 MB for its own statements).
--   - apalis's trigger sent one notification per inserted row. apalis's listener only wakes a
--     worker's fetch loop with it (the id is not fetched by itself), and a woken loop fetches
--     batch after batch until one comes back empty, so one notification per statement and
--     queue wakes the same workers for the same jobs. This trigger sends that one, naming the
--     statement's first job, for rows due now (apalis's condition).

CREATE OR REPLACE FUNCTION embed_worker.notify_new_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('apalis::job::insert',
                      json_build_object('job_type', job_type, 'id', id, 'run_at', run_at)::text)
       FROM (SELECT DISTINCT ON (job_type) job_type, id, run_at
               FROM inserted WHERE run_at <= now() ORDER BY job_type, id) first_due;
    RETURN NULL;
END $$;

REVOKE EXECUTE ON FUNCTION embed_worker.notify_new_jobs() FROM PUBLIC;

DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs;
CREATE TRIGGER notify_workers AFTER INSERT ON apalis.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.notify_new_jobs();

CREATE OR REPLACE FUNCTION embed_worker.enqueue_jobs(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10,
    priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp SET work_mem = '32MB'
AS $$
DECLARE
    n integer;
    asked integer;
    prefix text := left(apalis.generate_ulid(), 10);
    draw text := embed_worker.crockford40((random() * 1099511627775)::bigint);
BEGIN
    IF queue IS NULL OR queue !~ '^[A-Za-z0-9_.:-]{1,70}$' THEN
        RAISE EXCEPTION 'enqueue: invalid queue name %', coalesce(queue, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts IS NULL OR max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'enqueue: max_attempts must be 1..100, got %', coalesce(max_attempts::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF priority IS NULL OR priority NOT BETWEEN -100 AND 0 THEN
        RAISE EXCEPTION 'enqueue: priority must be -100..0, got %', coalesce(priority::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH s AS MATERIALIZED (
        SELECT t, id, row_number() OVER (ORDER BY t, id) AS n
          FROM (SELECT DISTINCT t, id FROM unnest(source_types, source_ids) AS u(t, id)
                 WHERE t IS NOT NULL AND id IS NOT NULL) d
    ), ins AS (
        INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                 priority, idempotency_key)
        SELECT prefix || draw || embed_worker.crockford40(s.n), queue,
               convert_to(json_build_object('source_type', s.t, 'source_id', s.id)::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), enqueue_jobs.priority, s.t::text || ':' || s.id::text
          FROM s
         ORDER BY s.n
        ON CONFLICT (job_type, idempotency_key) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM s) INTO n, asked;
    -- Raise pending lower-priority jobs of the sources that already had one (the conflicts).
    -- SKIP LOCKED: never wait on a row apalis is claiming (it is about to run anyway), so this
    -- cannot deadlock with the claim.
    IF n < asked THEN
        UPDATE apalis.jobs j SET priority = enqueue_jobs.priority, run_at = least(j.run_at, now())
          FROM (SELECT x.id FROM apalis.jobs x
                 WHERE x.job_type = queue AND x.status = 'Pending' AND x.priority < enqueue_jobs.priority
                   AND x.idempotency_key IN (SELECT u.t::text || ':' || u.id::text
                                               FROM unnest(source_types, source_ids) AS u(t, id))
                 ORDER BY x.id FOR UPDATE SKIP LOCKED) l
         WHERE j.id = l.id;
    END IF;
    RETURN n;
END $$;
