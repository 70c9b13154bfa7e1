-- One search for the app (issue 33): `SELECT * FROM embed_worker.search(:query, 5)` returns the
-- serving model's nearest chunks, whichever model serves, through its partition and its index,
-- with the model's tuned ef_search, iterative scans, and the exact path for a caller who sees
-- few rows. The app never pastes a model literal or an index expression, and a promotion takes
-- effect in the next call.
--
-- Why it runs with the caller's rights (SECURITY INVOKER): row-level security applies, so
-- app_user with auth.uid() set sees its own sessions' chunks and the templates, nothing else.
-- What the caller may not read itself (the registry, the settings, how many rows it owns) comes
-- from embed_worker.search_route(), which is SECURITY DEFINER and returns only that.

-- What `tune` stored for a model: the smallest ef_search (and, for user scopes, the
-- max_scan_tuples) that met its recall target. NULL: the defaults below.
ALTER TABLE embed_worker.models
    ADD COLUMN IF NOT EXISTS ef_search integer CHECK (ef_search BETWEEN 1 AND 1000),
    ADD COLUMN IF NOT EXISTS max_scan_tuples integer CHECK (max_scan_tuples >= 1),
    ADD COLUMN IF NOT EXISTS tuned_recall double precision,
    ADD COLUMN IF NOT EXISTS tuned_at timestamptz;

-- One row: what `migrate` writes from the configuration (render.session_owner), and the
-- search defaults.
CREATE TABLE IF NOT EXISTS embed_worker.search_settings (
    one              boolean PRIMARY KEY DEFAULT true CHECK (one),
    session_owner    text NOT NULL DEFAULT 'user_id',
    exact_below      integer NOT NULL DEFAULT 5000 CHECK (exact_below >= 0),
    ef_search        integer NOT NULL DEFAULT 100 CHECK (ef_search BETWEEN 1 AND 1000),
    max_scan_tuples  integer NOT NULL DEFAULT 20000 CHECK (max_scan_tuples >= 1)
);
INSERT INTO embed_worker.search_settings DEFAULT VALUES ON CONFLICT DO NOTHING;
GRANT SELECT ON embed_worker.search_settings TO embed_worker;

-- The recall probe's results (search::probe): per model and scope (`all`, `small_user`,
-- `large_user`), index top-k against exact top-k on a sample of the model's own vectors. Every
-- replica exports the latest as embed_worker_search_recall; the probe's turn is claimed by one
-- replica at a time through probe_claimed_at (a row update, not an advisory lock the app could
-- take).
CREATE TABLE IF NOT EXISTS embed_worker.search_recall (
    model       varchar(100) NOT NULL,
    scope       text NOT NULL CHECK (scope IN ('all', 'small_user', 'large_user')),
    k           integer NOT NULL,
    queries     integer NOT NULL,
    recall      double precision NOT NULL,
    ef_search   integer NOT NULL,
    p50_ms      double precision NOT NULL,
    p95_ms      double precision NOT NULL,
    visible     bigint,
    probed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, scope)
);
ALTER TABLE embed_worker.search_settings ADD COLUMN IF NOT EXISTS probe_claimed_at timestamptz;
GRANT SELECT, INSERT, UPDATE, DELETE ON embed_worker.search_recall TO embed_worker;
GRANT UPDATE (probe_claimed_at) ON embed_worker.search_settings TO embed_worker;

-- A search's hit.
DO $$ BEGIN
    IF to_regtype('embed_worker.search_hit') IS NULL THEN
        CREATE TYPE embed_worker.search_hit AS (
            source_type text, source_id uuid, chunk_index integer, distance double precision);
    END IF;
END $$;

-- How a search is answered for the caller: the model (the serving one unless named), the
-- statement to run ($1 the query, $2 template ids), the settings, and whether the caller
-- (auth.uid(), when set) sees at most exact_below of the model's rows, who then has them ranked
-- exactly: their sessions' chunks through the owner column, the templates' by id (uuid equality
-- may be an index condition under RLS; enum equality may not). Counting is bounded: at most
-- exact_below + 1 rows each. Otherwise the statement is the index's: the model as a literal (the
-- plan is pruned to its partition when planned), k written in (with a bound LIMIT a generic
-- plan prefers a sort), and the expression the model's index is on.
CREATE OR REPLACE FUNCTION embed_worker.search_route(kind text DEFAULT NULL, k integer DEFAULT 5,
                                                     for_model text DEFAULT NULL)
RETURNS TABLE (model text, dimensions integer, statement text, ef_search integer,
               max_scan_tuples integer, exact boolean, visible bigint, template_ids uuid[])
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m record;
    s embed_worker.search_settings;
    uid uuid := auth.uid();
    sessions bigint := 0;
    parts text[] := '{}';
    expr text;
    param text;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    SELECT * INTO s FROM embed_worker.search_settings;
    SELECT em.name::text AS name, em.dimensions AS dims, em.index_type AS itype,
           em.ef_search AS tuned_ef, em.max_scan_tuples AS tuned_tuples,
           EXISTS (SELECT 1 FROM embed_worker.adoptions a
                    WHERE a.model = em.name AND a.index_name IS NOT NULL
                      AND to_regclass(format('public.%I', a.index_name)) IS NOT NULL) AS plain
      INTO m
      FROM embed_worker.models em
     WHERE CASE WHEN for_model IS NULL THEN em.serving ELSE em.name = for_model END;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%', CASE WHEN for_model IS NULL
                                  THEN 'no serving model: run `embed-worker migrate`'
                                  ELSE format('no model %L in embed_worker.models', for_model) END
            USING ERRCODE = '55000';
    END IF;
    model := m.name;
    dimensions := m.dims;
    ef_search := coalesce(m.tuned_ef, s.ef_search);
    max_scan_tuples := coalesce(m.tuned_tuples, s.max_scan_tuples);
    exact := false;
    template_ids := '{}';
    IF uid IS NOT NULL THEN
        IF kind IS DISTINCT FROM 'template' THEN
            EXECUTE format(
                'SELECT count(*) FROM (SELECT 1 FROM public.sessions s
                   JOIN public.rag_embeddings e ON e.source_type = %L AND e.source_id = s.id
                  WHERE s.%I = $1 AND e.embedding_model = $2 LIMIT $3 + 1) a',
                'session', s.session_owner)
              INTO sessions USING uid, m.name, s.exact_below;
        END IF;
        IF kind IS DISTINCT FROM 'session' THEN
            SELECT coalesce(array_agg(t.source_id), '{}') INTO template_ids
              FROM (SELECT e.source_id FROM public.rag_embeddings e
                     WHERE e.source_type = 'template' AND e.embedding_model = m.name
                     LIMIT s.exact_below + 1) t;
        END IF;
        visible := sessions + cardinality(template_ids);
        exact := visible <= s.exact_below;
    END IF;
    IF exact THEN
        IF kind IS DISTINCT FROM 'template' THEN
            parts := parts || format(
                'SELECT e.source_type, e.source_id, e.chunk_index, e.embedding
                   FROM public.sessions s
                   JOIN public.rag_embeddings e ON e.source_type = %L AND e.source_id = s.id
                  WHERE s.%I = auth.uid() AND e.embedding_model = %L',
                'session', s.session_owner, m.name);
        END IF;
        IF cardinality(template_ids) > 0 THEN
            parts := parts || format(
                'SELECT source_type, source_id, chunk_index, embedding FROM public.rag_embeddings
                  WHERE source_id = ANY($2) AND source_type = %L AND embedding_model = %L',
                'template', m.name);
        END IF;
        statement := CASE WHEN cardinality(parts) = 0 THEN NULL ELSE format(
            'SELECT source_type::text AS source_type, source_id, chunk_index,
                    (embedding::vector(%s) <=> $1)::float8 AS distance
               FROM (%s) visible ORDER BY distance LIMIT %s',
            m.dims, array_to_string(parts, ' UNION ALL '), k) END;
    ELSE
        template_ids := '{}';
        expr := CASE WHEN m.plain THEN 'embedding'
                     ELSE format('embedding::%s(%s)', m.itype, m.dims) END;
        param := CASE WHEN m.itype = 'halfvec' AND NOT m.plain
                      THEN format('$1::halfvec(%s)', m.dims) ELSE '$1' END;
        statement := format(
            'SELECT source_type::text AS source_type, source_id, chunk_index,
                    distance::float8 AS distance FROM (
                 SELECT source_type, source_id, chunk_index, (%1$s <=> %2$s) AS distance
                   FROM public.rag_embeddings
                  WHERE embedding_model = %3$L%4$s
                  ORDER BY %1$s <=> %2$s LIMIT %5$s) hits
              ORDER BY distance',
            expr, param, m.name,
            CASE WHEN kind IS NULL THEN '' ELSE format(' AND source_type = %L', kind) END, k);
    END IF;
    RETURN NEXT;
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.search_route(text, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.search_route(text, integer, text) TO app_user, embed_worker;

-- The search. k: 1 to 1000. source_type: only sessions or only templates. ef_search and
-- max_scan_tuples: this call's, instead of the model's tuned ones (what `tune` sweeps). model:
-- another registered model's rows instead of the serving model's (an A/B read, `tune`).
-- The SET clauses keep every setting made inside to this call: the app's transaction keeps its
-- own hnsw.* settings.
CREATE OR REPLACE FUNCTION embed_worker.search(
    query vector, k integer DEFAULT 5, source_type embedding_source DEFAULT NULL,
    ef_search integer DEFAULT NULL, max_scan_tuples integer DEFAULT NULL,
    model text DEFAULT NULL)
RETURNS SETOF embed_worker.search_hit
LANGUAGE plpgsql VOLATILE
SET hnsw.iterative_scan = 'relaxed_order' SET hnsw.ef_search = '100'
SET hnsw.max_scan_tuples = '20000'
AS $$
DECLARE
    r record;
BEGIN
    IF query IS NULL THEN
        RAISE EXCEPTION 'the query vector is NULL' USING ERRCODE = '22004';
    END IF;
    IF ef_search IS NOT NULL AND ef_search NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'ef_search must be between 1 and 1000, not %', ef_search
            USING ERRCODE = '22023';
    END IF;
    IF max_scan_tuples IS NOT NULL AND max_scan_tuples < 1 THEN
        RAISE EXCEPTION 'max_scan_tuples must be at least 1, not %', max_scan_tuples
            USING ERRCODE = '22023';
    END IF;
    SELECT * INTO r FROM embed_worker.search_route(search.source_type::text, search.k, search.model);
    IF vector_dims(query) <> r.dimensions THEN
        RAISE EXCEPTION 'the query has % dimensions; the model % has %',
            vector_dims(query), r.model, r.dimensions USING ERRCODE = '22000';
    END IF;
    IF r.statement IS NULL THEN
        RETURN;
    END IF;
    PERFORM set_config('hnsw.ef_search', greatest(coalesce(ef_search, r.ef_search), k)::text, true),
            set_config('hnsw.max_scan_tuples',
                       coalesce(max_scan_tuples, r.max_scan_tuples)::text, true);
    RETURN QUERY EXECUTE r.statement USING query, r.template_ids;
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.search(vector, integer, embedding_source, integer, integer, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.search(vector, integer, embedding_source, integer, integer, text)
    TO app_user, embed_worker;

-- The caller's search_path need not hold pgvector's schema (Supabase keeps it in `extensions`):
-- the search resolves its types and operators there, then in public.
DO $$ BEGIN
    EXECUTE format('ALTER FUNCTION embed_worker.search(vector, integer, embedding_source, integer, integer, text)
                    SET search_path = pg_catalog, %I, public, pg_temp',
                   (SELECT n.nspname FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
                     WHERE x.extname = 'vector'));
END $$;
