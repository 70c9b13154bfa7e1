-- Least privilege. PostgreSQL grants EXECUTE on every new function to PUBLIC, so until now any
-- role that could connect could call embed_worker.reserve_spend / settle_spend (SECURITY
-- DEFINER: as app_user, reserve_spend(model, 1000000) stopped every worker, and a negative
-- settle_spend switched the budget off). Now nothing in our schema is executable by PUBLIC;
-- each role gets exactly what it calls:
--   embed_worker: enqueue, enqueue_many, reserve_spend, settle_spend, current_month, job_payload
--   app_user:     enqueue, enqueue_many (as the README says: enqueue from the app's transaction)
--   PUBLIC:       check_placeholders (an IMMUTABLE validator that question_templates' CHECK
--                 constraint calls as whoever writes a template; it reads nothing)
-- Trigger functions need no grant: PostgreSQL checks EXECUTE when a trigger is created, not
-- when it fires, and a trigger function cannot be called directly.

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA embed_worker FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA embed_worker REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.check_placeholders(text, jsonb) TO PUBLIC;

-- Enqueue runs as the owner (SECURITY DEFINER): the app may queue embed jobs without any right
-- on the apalis schema (before, app_user got "permission denied for schema apalis"). It builds
-- the payload itself, so a caller can only ask for a source to be embedded. Rows are inserted
-- in (type, id) order: two transactions enqueueing overlapping sources in different orders
-- otherwise wait on each other's unique-index entries and deadlock.
CREATE OR REPLACE FUNCTION embed_worker.enqueue_many(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10
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
    WITH ins AS (
        INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                 priority, idempotency_key)
        SELECT apalis.generate_ulid(), queue,
               convert_to(json_build_object('source_type', s.t, 'source_id', s.id)::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), 0, s.t::text || ':' || s.id::text
          FROM (SELECT DISTINCT t, id FROM unnest(source_types, source_ids) AS u(t, id)
                 WHERE t IS NOT NULL AND id IS NOT NULL) s
         ORDER BY s.t, s.id
        ON CONFLICT (job_type, idempotency_key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer INTO n FROM ins;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.enqueue(
    source_type embedding_source,
    source_id uuid,
    queue text DEFAULT 'embed'
) RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT embed_worker.enqueue_many(ARRAY[source_type], ARRAY[source_id], queue) = 1
$$;

REVOKE EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer),
                           embed_worker.enqueue(embedding_source, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer),
                          embed_worker.enqueue(embedding_source, uuid, text)
   TO embed_worker, app_user;

-- Spend: amounts are finite and never negative, whoever calls.
ALTER TABLE embed_worker.budget DROP CONSTRAINT IF EXISTS budget_monthly_usd_finite;
ALTER TABLE embed_worker.budget ADD CONSTRAINT budget_monthly_usd_finite
    CHECK (monthly_usd >= 0 AND monthly_usd < 'Infinity'::numeric);

CREATE OR REPLACE FUNCTION embed_worker.reserve_spend(p_model text, p_usd numeric)
RETURNS TABLE (ok boolean, spent numeric, budget numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = embed_worker, pg_temp AS $$
DECLARE
    b numeric;
    s numeric;
    m date := embed_worker.current_month();
BEGIN
    IF p_usd IS NULL OR p_usd < 0 OR p_usd >= 'Infinity'::numeric THEN
        RAISE EXCEPTION 'reserve_spend: amount must be finite and >= 0, got %', p_usd
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT monthly_usd INTO b FROM embed_worker.budget FOR UPDATE;
    SELECT coalesce(sum(x.usd), 0) INTO s FROM embed_worker.spend x WHERE x.month = m;
    IF b > 0 AND s + p_usd > b THEN
        RETURN QUERY SELECT false, s, b;
        RETURN;
    END IF;
    INSERT INTO embed_worker.spend AS x (month, model, usd) VALUES (m, p_model, p_usd)
    ON CONFLICT (month, model) DO UPDATE SET usd = x.usd + EXCLUDED.usd, updated_at = now();
    RETURN QUERY SELECT true, s + p_usd, b;
END $$;

-- Settles a reservation made in `p_month` to what was billed, and returns the month's spend
-- and the budget after it, so the caller stops when a provider billed more than reserved (a
-- provider whose tokenizer counts more than cl100k: before, 2 workers spent $3.05 on $1.00).
DROP FUNCTION IF EXISTS embed_worker.settle_spend(date, text, numeric, numeric, bigint);
CREATE FUNCTION embed_worker.settle_spend(p_month date, p_model text, p_reserved numeric,
                                          p_usd numeric, p_tokens bigint)
RETURNS TABLE (spent numeric, budget numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = embed_worker, pg_temp AS $$
BEGIN
    IF p_reserved IS NULL OR p_reserved < 0 OR p_reserved >= 'Infinity'::numeric
       OR p_usd IS NULL OR p_usd < 0 OR p_usd >= 'Infinity'::numeric
       OR p_tokens IS NULL OR p_tokens < 0 THEN
        RAISE EXCEPTION 'settle_spend: amounts must be finite and >= 0 (reserved %, usd %, tokens %)',
            p_reserved, p_usd, p_tokens USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE embed_worker.spend
       SET usd = greatest(usd - p_reserved, 0) + p_usd, tokens = tokens + p_tokens,
           updated_at = now()
     WHERE month = p_month AND model = p_model;
    RETURN QUERY
        SELECT coalesce((SELECT sum(x.usd) FROM embed_worker.spend x
                          WHERE x.month = embed_worker.current_month()), 0),
               (SELECT monthly_usd FROM embed_worker.budget);
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.settle_spend(date, text, numeric, numeric, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.settle_spend(date, text, numeric, numeric, bigint) TO embed_worker;
