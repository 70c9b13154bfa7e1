-- The bulk lane (backfill, enqueue-stale, the periodic stale scan) and the Batch API's records.
--
-- Lanes: interactive jobs (change capture, `enqueue`) keep priority 0; bulk jobs are queued
-- with a lower priority, so apalis (ORDER BY priority DESC, run_at) claims every interactive job
-- before them. Enqueueing a source whose bulk job is still pending raises that job to the
-- caller's priority: the change supersedes the backfill instead of waiting behind it. (In batch
-- mode bulk jobs live in the queue `<queue>.batch`; the batch lane drops those whose source has
-- an open interactive job.)
DROP FUNCTION IF EXISTS embed_worker.enqueue_many(embedding_source[], uuid[], text, integer);

CREATE FUNCTION embed_worker.enqueue_many(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10,
    priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    IF queue IS NULL OR queue !~ '^[A-Za-z0-9_.:-]{1,64}$' THEN
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
    WITH ins AS (
        INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                 priority, idempotency_key)
        SELECT apalis.generate_ulid(), queue,
               convert_to(json_build_object('source_type', s.t, 'source_id', s.id)::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), enqueue_many.priority, s.t::text || ':' || s.id::text
          FROM (SELECT DISTINCT t, id FROM unnest(source_types, source_ids) AS u(t, id)
                 WHERE t IS NOT NULL AND id IS NOT NULL) s
         ORDER BY s.t, s.id
        ON CONFLICT (job_type, idempotency_key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer INTO n FROM ins;
    -- Raise pending lower-priority jobs of these sources. SKIP LOCKED: never wait on a row
    -- apalis is claiming (it is about to run anyway), so this cannot deadlock with the claim.
    UPDATE apalis.jobs j SET priority = enqueue_many.priority, run_at = least(j.run_at, now())
      FROM (SELECT x.id FROM apalis.jobs x
             WHERE x.job_type = queue AND x.status = 'Pending' AND x.priority < enqueue_many.priority
               AND x.idempotency_key IN (SELECT u.t::text || ':' || u.id::text
                                           FROM unnest(source_types, source_ids) AS u(t, id))
             ORDER BY x.id FOR UPDATE SKIP LOCKED) l
     WHERE j.id = l.id;
    RETURN n;
END $$;

REVOKE EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer, integer)
   TO embed_worker, app_user;

-- One row per batch submitted to the provider's Batch API, written before the provider hears
-- of it: a restart or another replica resumes polling it and never submits it twice.
-- preparing (recorded, file maybe uploaded) → submitted (the provider has it) → completed |
-- expired | failed | cancelled; `finished_at` once its results are written and its jobs settled.
CREATE TABLE IF NOT EXISTS embed_worker.batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider_id     text UNIQUE,
    state           text NOT NULL DEFAULT 'preparing'
        CHECK (state IN ('preparing', 'submitted', 'completed', 'expired', 'failed', 'cancelled')),
    provider_status text,
    model           text NOT NULL,
    input_file_id   text,
    output_file_id  text,
    error_file_id   text,
    requests        integer NOT NULL,
    inputs          integer NOT NULL,
    tokens_estimate bigint NOT NULL,
    usd_reserved    numeric NOT NULL DEFAULT 0 CHECK (usd_reserved >= 0),
    spend_month     date NOT NULL,
    tokens_billed   bigint,
    usd_billed      numeric,
    request_counts  jsonb,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_batches_open ON embed_worker.batches (id) WHERE finished_at IS NULL;

-- What each batch holds: every chunk of every source (sent or unchanged), so the write after
-- completion needs nothing from the process that submitted it. `custom_id` and `position` name
-- the request line and the input within it; NULL for a chunk whose stored hash already matched.
CREATE TABLE IF NOT EXISTS embed_worker.batch_items (
    batch_id     bigint NOT NULL REFERENCES embed_worker.batches (id) ON DELETE CASCADE,
    job_id       text NOT NULL,
    source_type  embedding_source NOT NULL,
    source_id    uuid NOT NULL,
    read_at      timestamptz NOT NULL,
    chunk_index  integer NOT NULL,
    content_hash text NOT NULL,
    tokens       integer NOT NULL,
    custom_id    text,
    position     integer,
    PRIMARY KEY (batch_id, source_type, source_id, chunk_index)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON embed_worker.batches, embed_worker.batch_items TO embed_worker;
