-- Enqueueing embed jobs from SQL, in the caller's own transaction (an app, a trigger, a script).
--
-- Jobs live in apalis-postgres's table apalis.jobs (queue/job_type 'embed'); the payload is the
-- JSON that apalis's JsonCodec reads: {"source_type": ..., "source_id": ...}.
-- A source with a pending job is not queued twice: the job carries idempotency_key
-- '<type>:<id>' (unique per job_type in apalis.jobs) and the worker clears the key when it
-- claims the job, so a change made while a job runs queues a new one.

CREATE OR REPLACE FUNCTION embed_worker.enqueue_many(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10
) RETURNS integer
LANGUAGE sql VOLATILE AS $$
    WITH ins AS (
        INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                 priority, idempotency_key)
        SELECT apalis.generate_ulid(), queue,
               convert_to(json_build_object('source_type', s.t, 'source_id', s.id)::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), 0, s.t::text || ':' || s.id::text
          FROM (SELECT DISTINCT t, id FROM unnest(source_types, source_ids) AS u(t, id)) s
        ON CONFLICT (job_type, idempotency_key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer FROM ins
$$;

CREATE OR REPLACE FUNCTION embed_worker.enqueue(
    source_type embedding_source,
    source_id uuid,
    queue text DEFAULT 'embed'
) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT embed_worker.enqueue_many(ARRAY[source_type], ARRAY[source_id], queue) = 1
$$;

-- Every job of the queue with its source, for status and tests.
CREATE OR REPLACE VIEW embed_worker.jobs AS
SELECT j.id, j.job_type AS queue, j.status, j.attempts, j.max_attempts, j.run_at, j.lock_by,
       j.lock_at, j.done_at, j.last_result,
       (convert_from(j.job, 'UTF8')::jsonb ->> 'source_type') AS source_type,
       (convert_from(j.job, 'UTF8')::jsonb ->> 'source_id') AS source_id
  FROM apalis.jobs j;

GRANT EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer),
                          embed_worker.enqueue(embedding_source, uuid, text)
   TO embed_worker, app_user;
GRANT SELECT ON embed_worker.jobs TO embed_worker;
