-- Performance, round 3: queueing 20,000 jobs in one statement in about half a second.
--
-- Measured on the 2-core machine, 20,000 rows into apalis.jobs in one INSERT … SELECT: 0.53 s,
-- of which apalis.generate_ulid() (PL/pgSQL, ~25 statements a row) 0.25 s, and the
-- quarantine trigger's embed_worker.job_payload() a subtransaction per row (its EXCEPTION
-- block) besides. Now:
--   - ids are ULIDs built by one SQL expression: the statement's time prefix (10 characters,
--     from one apalis.generate_ulid() call) and 16 characters of which 8 are one random draw
--     per statement and 8 the row's number: unique (a collision needs two statements in the
--     same millisecond drawing the same 40 random bits), increasing within a statement, and
--     what apalis parses;
--   - job_payload() decodes a payload of printable ASCII (every payload the worker, the app's
--     functions and apalis write) without a subtransaction, checking it with
--     pg_input_is_valid; only other bytes take the EXCEPTION path.

-- v's low 40 bits in 8 Crockford base-32 characters.
CREATE OR REPLACE FUNCTION embed_worker.crockford40(v bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 35) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 30) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 25) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 20) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 15) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 10) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 5) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 0) & 31)::int + 1, 1)
$$;
REVOKE EXECUTE ON FUNCTION embed_worker.crockford40(bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION embed_worker.job_payload(job bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := encode(job, 'escape');
BEGIN
    -- 'escape' doubles backslashes and writes zero and high bytes as \nnn: no backslash
    -- means the bytes were ASCII and t is the payload itself.
    IF strpos(t, E'\\') = 0 THEN
        RETURN CASE WHEN pg_input_is_valid(t, 'jsonb') THEN t::jsonb END;
    END IF;
    BEGIN
        RETURN convert_from(job, 'UTF8')::jsonb;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.enqueue_jobs(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10,
    priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    n integer;
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
    WITH ins AS (
        INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                 priority, idempotency_key)
        SELECT prefix || draw || embed_worker.crockford40(s.n), queue,
               convert_to(json_build_object('source_type', s.t, 'source_id', s.id)::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), enqueue_jobs.priority, s.t::text || ':' || s.id::text
          FROM (SELECT t, id, row_number() OVER (ORDER BY t, id) AS n
                  FROM (SELECT DISTINCT t, id FROM unnest(source_types, source_ids) AS u(t, id)
                         WHERE t IS NOT NULL AND id IS NOT NULL) d) s
         ORDER BY s.n
        ON CONFLICT (job_type, idempotency_key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer INTO n FROM ins;
    -- Raise pending lower-priority jobs of these sources. SKIP LOCKED: never wait on a row
    -- apalis is claiming (it is about to run anyway), so this cannot deadlock with the claim.
    UPDATE apalis.jobs j SET priority = enqueue_jobs.priority, run_at = least(j.run_at, now())
      FROM (SELECT x.id FROM apalis.jobs x
             WHERE x.job_type = queue AND x.status = 'Pending' AND x.priority < enqueue_jobs.priority
               AND x.idempotency_key IN (SELECT u.t::text || ':' || u.id::text
                                           FROM unnest(source_types, source_ids) AS u(t, id))
             ORDER BY x.id FOR UPDATE SKIP LOCKED) l
     WHERE j.id = l.id;
    RETURN n;
END $$;

-- The quarantine trigger runs its function only for a payload that is not printable-ASCII JSON
-- (the WHEN clause is evaluated without a PL/pgSQL call; the function checks fully).
DROP TRIGGER IF EXISTS embed_worker_quarantine_unreadable ON apalis.jobs;
CREATE TRIGGER embed_worker_quarantine_unreadable
    BEFORE INSERT ON apalis.jobs
    FOR EACH ROW
    WHEN (strpos(encode(NEW.job, 'escape'), E'\\') > 0
          OR NOT pg_input_is_valid(encode(NEW.job, 'escape'), 'jsonb'))
    EXECUTE FUNCTION embed_worker.quarantine_unreadable_job();

-- apalis-postgres 1.0 leaves two duplicate indexes on apalis.jobs, each an entry more for every
-- insert and claim: unique_job_id (the primary key's twin since its "include primary keys"
-- migration) and lidx (idx_apalis_jobs_lock_by's, which "streamline indices" created beside it
-- while dropping its siblings). apalis's own migrations name indexes with IF [NOT] EXISTS.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE i.indrelid = 'apalis.jobs'::regclass AND i.indisprimary) THEN
        DROP INDEX IF EXISTS apalis.unique_job_id;
    END IF;
    IF to_regclass('apalis.idx_apalis_jobs_lock_by') IS NOT NULL THEN
        DROP INDEX IF EXISTS apalis.lidx;
    END IF;
END $$;
