-- Row-level security and roles.
--   embed_worker: what the worker needs (read sources, write rag_embeddings, the apalis queue).
--   app_user:     an example application role; reads under RLS as the user in auth.uid().
-- Both are NOLOGIN group roles: grant them to the login roles of a deployment
-- (GRANT embed_worker TO my_worker_login).

DO $$ BEGIN
    CREATE ROLE embed_worker NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;

DO $$ BEGIN
    CREATE ROLE app_user NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;

-- auth.uid() exists on Supabase. Elsewhere, create a compatible one reading the JWT subject
-- from the `request.jwt.claim.sub` setting (or `request.jwt.claims` ->> 'sub').
DO $$ BEGIN
    IF to_regprocedure('auth.uid()') IS NULL THEN
        CREATE SCHEMA IF NOT EXISTS auth;
        CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $f$
            SELECT coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
            )::uuid
        $f$;
    END IF;
END $$;
GRANT USAGE ON SCHEMA auth TO app_user, embed_worker;

GRANT USAGE ON SCHEMA embed_worker TO embed_worker, app_user;

-- The worker: read sources, own the embeddings.
GRANT SELECT ON sessions, question_templates TO embed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON rag_embeddings TO embed_worker;

-- The app: reads under RLS.
GRANT SELECT ON sessions, question_templates, rag_embeddings TO app_user;

ALTER TABLE rag_embeddings ENABLE ROW LEVEL SECURITY;
ALTER TABLE question_templates ENABLE ROW LEVEL SECURITY;

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

DROP POLICY IF EXISTS question_templates_read_enabled ON question_templates;
CREATE POLICY question_templates_read_enabled ON question_templates FOR SELECT TO app_user
    USING (enabled AND auth.uid() IS NOT NULL);

DROP POLICY IF EXISTS question_templates_worker_read ON question_templates;
CREATE POLICY question_templates_worker_read ON question_templates FOR SELECT TO embed_worker
    USING (true);
