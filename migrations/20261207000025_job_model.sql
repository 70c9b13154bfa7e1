-- The model is part of the job (issue 34, item 4).
--
-- Why: a job said only which source to embed, and each worker embedded it for its own
-- configured model. In a rolling deploy two workers still on the old config took the new
-- model's backfill jobs, found the old model's rows current and ended 2,973 of 3,011 of them
-- as no-ops (the new model reached 140 of 3,024); a third model's backfill was deduplicated
-- against the second's open jobs and stopped at 2,197 of 3,020. Now a backfill or stale job
-- names its model ("model" in the payload): a worker that does not write that model gives it
-- back untouched, and a backfill meeting another model's pending job of the same source makes
-- it its own (the dedup key stays the source's: one pending job per source). Jobs without a
-- model (change capture, the app's enqueue) are for whatever the handling worker writes.

DROP FUNCTION IF EXISTS embed_worker.enqueue_jobs(embedding_source[], uuid[], text, integer, integer);

CREATE OR REPLACE FUNCTION embed_worker.enqueue_jobs(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10,
    priority integer DEFAULT 0,
    model text DEFAULT NULL
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
    IF model IS NOT NULL AND (length(model) NOT BETWEEN 1 AND 100) THEN
        RAISE EXCEPTION 'enqueue: model names are 1..100 characters, got %', length(model)
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
               convert_to(CASE WHEN enqueue_jobs.model IS NULL
                               THEN json_build_object('source_type', s.t, 'source_id', s.id)
                               ELSE json_build_object('source_type', s.t, 'source_id', s.id,
                                                      'model', enqueue_jobs.model) END::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), enqueue_jobs.priority, s.t::text || ':' || s.id::text
          FROM s
         ORDER BY s.n
        ON CONFLICT (job_type, idempotency_key) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM s) INTO n, asked;
    -- The sources that already had a pending job (the conflicts): raise the lower-priority
    -- ones, and make those for another model this model's (a job for a model no longer written
    -- is worth nothing; the newest backfill's model is the one being written).
    -- SKIP LOCKED: never wait on a row apalis is claiming (it is about to run anyway), so this
    -- cannot deadlock with the claim; a job so claimed for another model leaves its source to
    -- the next stale scan.
    IF n < asked THEN
        UPDATE apalis.jobs j
           SET priority = greatest(j.priority, enqueue_jobs.priority),
               run_at = CASE WHEN j.priority < enqueue_jobs.priority THEN least(j.run_at, now())
                             ELSE j.run_at END,
               job = CASE WHEN enqueue_jobs.model IS NULL THEN j.job
                          ELSE convert_to(jsonb_set(embed_worker.job_payload(j.job), '{model}',
                                                    to_jsonb(enqueue_jobs.model))::text, 'UTF8') END
          FROM (SELECT x.id FROM apalis.jobs x
                 WHERE x.job_type = queue AND x.status = 'Pending'
                   AND x.idempotency_key IN (SELECT u.t::text || ':' || u.id::text
                                               FROM unnest(source_types, source_ids) AS u(t, id))
                   AND (x.priority < enqueue_jobs.priority
                        OR (enqueue_jobs.model IS NOT NULL
                            AND embed_worker.job_payload(x.job) ->> 'model' IS DISTINCT FROM enqueue_jobs.model))
                 ORDER BY x.id FOR UPDATE SKIP LOCKED) l
         WHERE j.id = l.id;
    END IF;
    RETURN n;
END $$;

REVOKE EXECUTE ON FUNCTION embed_worker.enqueue_jobs(embedding_source[], uuid[], text, integer, integer, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.enqueue_jobs(embedding_source[], uuid[], text, integer, integer, text)
   TO embed_worker;
