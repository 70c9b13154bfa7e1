-- Model lifecycle (issue 21): a registry of models with their roles, and rag_embeddings
-- LIST-partitioned by embedding_model, one partition per model.
--
-- Why a registry: the worker's config was the only record of "the model", and an app in another
-- process could not read it. Now `writing` is what the worker embeds new and changed text with
-- (the config's model, set at `migrate`), `serving` is what searches read, and the serving model
-- switches in one transaction (`embed-worker models promote`, or by itself at 100% coverage
-- with a valid index). A model that is neither is retired; its rows stay until `models prune`.
--
-- Why partitions: pruning a model was one DELETE writing every row's WAL and leaving bloat in
-- the heap and the other model's index; a model in its own partition is detached and dropped
-- in constant time. Each model's HNSW index is on its own partition, with no predicate.
-- The seed's table name, columns, unique key, RLS policies, orphan trigger and grants are kept.
-- The primary key becomes (id, embedding_model): a partitioned table's unique keys must hold
-- the partition key; `id` stays an identity column and unique in practice.

-- The partition of a model: readable, at most 62 bytes, distinct for distinct names (a hash of
-- the full name). The Rust side computes the same (model_index::partition_name).
CREATE OR REPLACE FUNCTION embed_worker.partition_name(model text)
RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT 'rag_embeddings_'
        || lower(left(regexp_replace(model, '[^A-Za-z0-9]', '_', 'g'), 38))
        || '_' || left(encode(sha256(convert_to(model, 'UTF8')), 'hex'), 8)
$$;

CREATE TABLE IF NOT EXISTS embed_worker.models (
    name           varchar(100) PRIMARY KEY,
    dimensions     integer NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
    index_type     text NOT NULL CHECK (index_type IN ('vector', 'halfvec')),
    partition      text NOT NULL UNIQUE,
    writing        boolean NOT NULL DEFAULT false,
    serving        boolean NOT NULL DEFAULT false,
    added_at       timestamptz NOT NULL DEFAULT now(),
    writing_since  timestamptz,
    serving_since  timestamptz
);
-- At most one writing and one serving model (both may be the same row).
CREATE UNIQUE INDEX IF NOT EXISTS models_one_writing ON embed_worker.models ((true)) WHERE writing;
CREATE UNIQUE INDEX IF NOT EXISTS models_one_serving ON embed_worker.models ((true)) WHERE serving;

-- Every change of the serving model: the record of which model apps were reading, and when.
CREATE TABLE IF NOT EXISTS embed_worker.model_promotions (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    model     varchar(100) NOT NULL,
    previous  varchar(100),
    how       text NOT NULL CHECK (how IN ('install', 'auto', 'manual', 'forced')),
    coverage  double precision,
    by_user   text NOT NULL DEFAULT current_user
);

-- Registers a model and creates its partition (RLS on, no policy: only the owner reads a
-- partition directly; everyone else goes through rag_embeddings and its policies). Run by the
-- table's owner (`migrate`); not executable by PUBLIC (migration 8's default privileges).
CREATE OR REPLACE FUNCTION embed_worker.ensure_model(model text, dims integer, itype text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    part text := embed_worker.partition_name(model);
BEGIN
    INSERT INTO embed_worker.models (name, dimensions, index_type, partition)
    VALUES (model, dims, itype, part)
    ON CONFLICT (name) DO UPDATE SET dimensions = EXCLUDED.dimensions,
                                     index_type = EXCLUDED.index_type;
    IF to_regclass(format('public.%I', part)) IS NULL THEN
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.rag_embeddings FOR VALUES IN (%L)',
                       part, model);
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', part);
    END IF;
    RETURN part;
END $$;

-- What apps read: the serving model, and how to query its index. One row (none before the first
-- `migrate` registers a model). Example (psql, the query vector in :q):
--   SELECT model, index_expression FROM embed_worker.serving_model();
--   -- then, with the model and expression it returned:
--   SELECT source_id, embedding::vector(1536) <=> :'q' AS distance FROM rag_embeddings
--    WHERE embedding_model = 'text-embedding-ada-002' ORDER BY 2 LIMIT 5;
CREATE OR REPLACE FUNCTION embed_worker.serving_model()
RETURNS TABLE (model text, dimensions integer, index_type text, index_expression text,
               serving_since timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.name::text, m.dimensions, m.index_type,
           format('embedding::%s(%s)', m.index_type, m.dimensions), m.serving_since
      FROM embed_worker.models m
     WHERE m.serving
$$;
REVOKE EXECUTE ON FUNCTION embed_worker.serving_model() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.serving_model() TO app_user, embed_worker;
GRANT SELECT ON embed_worker.models, embed_worker.model_promotions TO embed_worker;

-- The move: the single table becomes rag_embeddings_unpartitioned, its rows go to one partition
-- per model, each valid HNSW index is rebuilt on its model's partition without the predicate,
-- then the old table is dropped. A fresh database moves nothing.
DO $$
DECLARE
    r record;
    defs text[] := '{}';
    d text;
    part text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'public.rag_embeddings'::regclass) = 'p' THEN
        RETURN;
    END IF;
    ALTER TABLE public.rag_embeddings RENAME TO rag_embeddings_unpartitioned;
    ALTER INDEX public.rag_embeddings_pkey RENAME TO rag_embeddings_unpartitioned_pkey;
    ALTER INDEX public.rag_embeddings_source_chunk_key RENAME TO rag_embeddings_unpartitioned_source_chunk_key;
    ALTER SEQUENCE public.rag_embeddings_id_seq RENAME TO rag_embeddings_unpartitioned_id_seq;

    CREATE TABLE public.rag_embeddings (
        id               bigint GENERATED ALWAYS AS IDENTITY,
        source_type      embedding_source NOT NULL,
        source_id        uuid NOT NULL,
        chunk_index      integer NOT NULL DEFAULT 0 CHECK (chunk_index >= 0),
        content_hash     text NOT NULL,
        embedding        vector NOT NULL,
        embedding_model  varchar(100) NOT NULL DEFAULT 'text-embedding-ada-002',
        dimensions       integer NOT NULL,
        token_count      integer NOT NULL CHECK (token_count >= 0),
        created_at       timestamptz NOT NULL DEFAULT now(),
        updated_at       timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT rag_embeddings_pkey PRIMARY KEY (id, embedding_model),
        CONSTRAINT rag_embeddings_dimensions_match CHECK (dimensions = vector_dims(embedding)),
        CONSTRAINT rag_embeddings_source_chunk_key
            UNIQUE (source_type, source_id, embedding_model, chunk_index)
    ) PARTITION BY LIST (embedding_model);

    -- One partition per model present; its index type from its valid HNSW index, else by size.
    FOR r IN
        SELECT e.embedding_model AS model, max(e.dimensions) AS dims
          FROM public.rag_embeddings_unpartitioned e GROUP BY 1
    LOOP
        PERFORM embed_worker.ensure_model(r.model, r.dims,
            CASE WHEN r.dims > 2000 OR EXISTS (
                     SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                      WHERE x.indrelid = 'public.rag_embeddings_unpartitioned'::regclass
                        AND x.indisvalid
                        AND pg_get_indexdef(i.oid) LIKE '%::halfvec(%'
                        AND pg_get_indexdef(i.oid) LIKE '%' || quote_literal(r.model) || '::text)')
                 THEN 'halfvec' ELSE 'vector' END);
    END LOOP;

    INSERT INTO public.rag_embeddings OVERRIDING SYSTEM VALUE
    SELECT id, source_type, source_id, chunk_index, content_hash, embedding, embedding_model,
           dimensions, token_count, created_at, updated_at
      FROM public.rag_embeddings_unpartitioned;
    PERFORM setval(pg_get_serial_sequence('public.rag_embeddings', 'id'),
                   coalesce((SELECT max(id) FROM public.rag_embeddings), 0) + 1, false);

    -- The valid HNSW indexes, rewritten for the model's partition (same name, no predicate).
    FOR r IN
        SELECT i.relname AS name, pg_get_indexdef(i.oid) AS def
          FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am am ON am.oid = i.relam
         WHERE x.indrelid = 'public.rag_embeddings_unpartitioned'::regclass
           AND am.amname = 'hnsw' AND x.indisvalid
           AND pg_get_indexdef(i.oid) ~ 'WHERE \(\(embedding_model\)::text = ''.*''::text\)$'
    LOOP
        part := embed_worker.partition_name(replace(substring(r.def
                    FROM 'WHERE \(\(embedding_model\)::text = ''(.*)''::text\)$'), '''''', ''''));
        IF to_regclass(format('public.%I', part)) IS NOT NULL THEN
            defs := defs || regexp_replace(
                replace(r.def, ' ON public.rag_embeddings_unpartitioned ', format(' ON public.%I ', part)),
                ' WHERE \(\(embedding_model\)::text = ''.*''::text\)$', '');
        END IF;
    END LOOP;
    DROP TABLE public.rag_embeddings_unpartitioned;
    FOREACH d IN ARRAY defs LOOP
        EXECUTE d;
    END LOOP;
END $$;

-- No orphans (1), on the new table (the function is migration 1's).
DROP TRIGGER IF EXISTS trg_rag_embeddings_check_source ON rag_embeddings;
CREATE TRIGGER trg_rag_embeddings_check_source
    BEFORE INSERT OR UPDATE OF source_type, source_id ON rag_embeddings
    FOR EACH ROW EXECUTE FUNCTION embed_worker.check_embedding_source();

-- Grants and row-level security as migration 2 set them.
GRANT SELECT, INSERT, UPDATE, DELETE ON rag_embeddings TO embed_worker;
GRANT SELECT ON rag_embeddings TO app_user;
ALTER TABLE rag_embeddings ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS rag_embeddings_read_own_sessions ON rag_embeddings;
CREATE POLICY rag_embeddings_read_own_sessions ON rag_embeddings FOR SELECT TO app_user
    USING (source_type = 'session'
           AND EXISTS (SELECT 1 FROM sessions s WHERE s.id = rag_embeddings.source_id
                                                 AND s.user_id = auth.uid()));

DROP POLICY IF EXISTS rag_embeddings_read_templates ON rag_embeddings;
CREATE POLICY rag_embeddings_read_templates ON rag_embeddings FOR SELECT TO app_user
    USING (source_type = 'template');

DROP POLICY IF EXISTS rag_embeddings_worker_all ON rag_embeddings;
CREATE POLICY rag_embeddings_worker_all ON rag_embeddings FOR ALL TO embed_worker
    USING (true) WITH CHECK (true);

-- Nobody but the owner runs these (PUBLIC gets EXECUTE on new functions; a per-schema default
-- privilege cannot take it away).
REVOKE EXECUTE ON FUNCTION embed_worker.partition_name(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION embed_worker.ensure_model(text, integer, text) FROM PUBLIC;
