-- Hardening, round 2: what app_user may enqueue, and settlements only of reservations that exist.
--
-- Before, app_user could call embed_worker.enqueue_many with another user's session ids, any
-- queue name, ids that do not exist, and any count (200,000 jobs at priority 0, ahead of every
-- real change); the worker role could zero the month's spend with settle_spend(…, 1e12, 0, 0).
--
-- Now there are two ways in:
--   embed_worker.enqueue_jobs  the server-side path (the worker, the operator's commands, the
--                              change-capture triggers): any number of sources, any queue,
--                              either lane. Granted to embed_worker only.
--   embed_worker.enqueue_many  the app's path (and enqueue, one source): only the worker's own
--   embed_worker.enqueue       queue (not its batch lane, which is for backfills), only sources
--                              that exist and that auth.uid() owns (templates: any enabled
--                              one), at most 1,000 per call.

-- The worker's queues the app may enqueue into: `migrate` registers the configured one.
CREATE TABLE IF NOT EXISTS embed_worker.queues (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:-]{1,70}$')
);
INSERT INTO embed_worker.queues (name) VALUES ('embed') ON CONFLICT DO NOTHING;
GRANT SELECT ON embed_worker.queues TO embed_worker;

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
        SELECT apalis.generate_ulid(), queue,
               convert_to(json_build_object('source_type', s.t, 'source_id', s.id)::text, 'UTF8'),
               'Pending', 0, max_attempts, now(), enqueue_jobs.priority, s.t::text || ':' || s.id::text
          FROM (SELECT DISTINCT t, id FROM unnest(source_types, source_ids) AS u(t, id)
                 WHERE t IS NOT NULL AND id IS NOT NULL) s
         ORDER BY s.t, s.id
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
REVOKE EXECUTE ON FUNCTION embed_worker.enqueue_jobs(embedding_source[], uuid[], text, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.enqueue_jobs(embedding_source[], uuid[], text, integer, integer)
   TO embed_worker;

CREATE OR REPLACE FUNCTION embed_worker.enqueue_many(
    source_types embedding_source[],
    source_ids uuid[],
    queue text DEFAULT 'embed',
    max_attempts integer DEFAULT 10,
    priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    uid uuid := auth.uid();
    n integer := coalesce(cardinality(source_ids), 0);
    refused integer;
BEGIN
    IF queue IS NULL OR NOT EXISTS (SELECT 1 FROM embed_worker.queues q WHERE q.name = queue) THEN
        RAISE EXCEPTION 'enqueue: % is not a queue of embed-worker', coalesce(quote_literal(queue), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(cardinality(source_types), 0) <> n THEN
        RAISE EXCEPTION 'enqueue: % source types for % source ids', coalesce(cardinality(source_types), 0), n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF n > 1000 THEN
        RAISE EXCEPTION 'enqueue: at most 1000 sources per call, got %', n
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT count(*) INTO refused
      FROM unnest(source_types, source_ids) AS u(t, id)
     WHERE u.t IS NULL OR u.id IS NULL
        OR (u.t = 'session' AND NOT EXISTS (SELECT 1 FROM sessions s
                                             WHERE s.id = u.id AND s.user_id = uid))
        OR (u.t = 'template' AND NOT EXISTS (SELECT 1 FROM question_templates q
                                              WHERE q.id = u.id AND q.enabled));
    IF refused > 0 THEN
        RAISE EXCEPTION 'enqueue: % of % sources do not exist or are not yours (sessions: auth.uid() must own them; templates: enabled)', refused, n
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN embed_worker.enqueue_jobs(source_types, source_ids, queue, max_attempts, priority);
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.enqueue_many(embedding_source[], uuid[], text, integer, integer)
   TO embed_worker, app_user;

-- Change capture is the server's own path: a statement of 5,000 rows queues 5,000 jobs.
CREATE OR REPLACE FUNCTION embed_worker.capture_session_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_jobs(array_agg('session'::embedding_source), array_agg(n.id))
       FROM new_rows n HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_session_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_jobs(array_agg('session'::embedding_source), array_agg(n.id))
       FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE (n.title, n.focus, n.depth, n.notes, n.transcript)
            IS DISTINCT FROM (o.title, o.focus, o.depth, o.notes, o.transcript)
     HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_jobs(array_agg('template'::embedding_source), array_agg(n.id))
       FROM new_rows n HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_jobs(array_agg('template'::embedding_source), array_agg(n.id))
       FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE (n.body, n.focus, n.depth, n.category, n.placeholders)
            IS DISTINCT FROM (o.body, o.focus, o.depth, o.category, o.placeholders)
     HAVING count(*) > 0;
    RETURN NULL;
END $$;

-- Spend: what is reserved and not yet settled, per month and model. A settlement releases at
-- most what is open, so no role can settle a reservation that was never made (before,
-- settle_spend(…, 1e12, 0, 0) zeroed the month).
ALTER TABLE embed_worker.spend ADD COLUMN IF NOT EXISTS reserved numeric NOT NULL DEFAULT 0
    CHECK (reserved >= 0);
-- Open batches hold their reservations across this migration.
UPDATE embed_worker.spend s SET reserved = b.usd
  FROM (SELECT spend_month, model || ' (batch)' AS model, sum(usd_reserved) AS usd
          FROM embed_worker.batches WHERE finished_at IS NULL GROUP BY 1, 2) b
 WHERE s.month = b.spend_month AND s.model = b.model;

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
    INSERT INTO embed_worker.spend AS x (month, model, usd, reserved) VALUES (m, p_model, p_usd, p_usd)
    ON CONFLICT (month, model) DO UPDATE
        SET usd = x.usd + EXCLUDED.usd, reserved = x.reserved + EXCLUDED.reserved, updated_at = now();
    RETURN QUERY SELECT true, s + p_usd, b;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.settle_spend(p_month date, p_model text, p_reserved numeric,
                                                     p_usd numeric, p_tokens bigint)
RETURNS TABLE (spent numeric, budget numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = embed_worker, pg_temp AS $$
DECLARE
    open_usd numeric;
BEGIN
    IF p_reserved IS NULL OR p_reserved < 0 OR p_reserved >= 'Infinity'::numeric
       OR p_usd IS NULL OR p_usd < 0 OR p_usd >= 'Infinity'::numeric
       OR p_tokens IS NULL OR p_tokens < 0 THEN
        RAISE EXCEPTION 'settle_spend: amounts must be finite and >= 0 (reserved %, usd %, tokens %)',
            p_reserved, p_usd, p_tokens USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT x.reserved INTO open_usd FROM embed_worker.spend x
     WHERE x.month = p_month AND x.model = p_model FOR UPDATE;
    -- 1e-9: the reservation travelled as float8 both ways; anything more is not a reservation.
    IF p_reserved > 0 AND (open_usd IS NULL OR p_reserved > open_usd + 1e-9) THEN
        RAISE EXCEPTION 'settle_spend: no open reservation of % for % in % (open: %)',
            p_reserved, p_model, p_month, coalesce(open_usd, 0)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE embed_worker.spend
       SET usd = greatest(usd - least(p_reserved, reserved), 0) + p_usd,
           reserved = reserved - least(p_reserved, reserved),
           tokens = tokens + p_tokens, updated_at = now()
     WHERE month = p_month AND model = p_model;
    IF NOT FOUND AND (p_usd > 0 OR p_tokens > 0) THEN
        INSERT INTO embed_worker.spend (month, model, usd, tokens) VALUES (p_month, p_model, p_usd, p_tokens);
    END IF;
    RETURN QUERY
        SELECT coalesce((SELECT sum(x.usd) FROM embed_worker.spend x
                          WHERE x.month = embed_worker.current_month()), 0),
               (SELECT monthly_usd FROM embed_worker.budget);
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.reserve_spend(text, numeric),
                           embed_worker.settle_spend(date, text, numeric, numeric, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.reserve_spend(text, numeric),
                          embed_worker.settle_spend(date, text, numeric, numeric, bigint) TO embed_worker;
