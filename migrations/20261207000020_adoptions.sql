-- Adopting the app's own rag_embeddings in place (issue 30): `migrate` attaches the app's table
-- as its model's partition (db::adopt) and records it here. The app's vectors arrive with an
-- empty content_hash (the column's fast default: nothing rewritten); the first run that finds
-- such a row's source unchanged since it (its updated_at at or after the source's) keeps the
-- vector and writes the hash and token count: the vector the app paid for costs nothing.
CREATE TABLE IF NOT EXISTS embed_worker.adoptions (
    model        varchar(100) PRIMARY KEY,
    partition    text NOT NULL,
    -- The app's HNSW index on the plain column, kept as the model's index.
    index_name   text,
    rows         bigint NOT NULL,
    adopted_at   timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON embed_worker.adoptions TO embed_worker;

-- A source type as rag_embeddings.source_type holds it: the worker's ENUM here; the adopted
-- table's own type (text, or the app's ENUM) where `migrate` adopted the app's table, which
-- re-makes this function. The worker binds source types as text and compares through it, so
-- one set of statements serves both. One expression: the planner inlines it.
CREATE OR REPLACE FUNCTION embed_worker.source_label(t text) RETURNS embedding_source
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT t::embedding_source $$;
REVOKE EXECUTE ON FUNCTION embed_worker.source_label(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.source_label(text) TO embed_worker;
