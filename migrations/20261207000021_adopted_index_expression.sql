-- The expression an app writes its search on (embed_worker.serving_model(), migration 13):
-- where the serving model's partition is the app's adopted table (migration 20, db::adopt),
-- its HNSW index is the app's own, on the plain column, so the expression is `embedding`; the
-- cast migration 13 gives (`embedding::vector(1536)`) matches no index there, and a query
-- written on it scans every row.
CREATE OR REPLACE FUNCTION embed_worker.serving_model()
RETURNS TABLE (model text, dimensions integer, index_type text, index_expression text,
               serving_since timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.name::text, m.dimensions, m.index_type,
           CASE WHEN EXISTS (SELECT 1 FROM embed_worker.adoptions a
                              WHERE a.model = m.name AND a.index_name IS NOT NULL
                                AND to_regclass(format('public.%I', a.index_name)) IS NOT NULL)
                THEN 'embedding'
                ELSE format('embedding::%s(%s)', m.index_type, m.dimensions) END,
           m.serving_since
      FROM embed_worker.models m
     WHERE m.serving
$$;
REVOKE EXECUTE ON FUNCTION embed_worker.serving_model() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.serving_model() TO app_user, embed_worker;
