-- Tenant isolation on `sessions` where this project created the table (dev, tests, demo, a
-- fresh install): row-level security on, app_user sees its own rows (user_id = auth.uid()),
-- the worker role reads every row it must embed. The design's rule is RLS on every new table
-- (defence in depth: rag_embeddings' policy alone keeps embeddings apart, not the text).
--
-- Where the app already owned `sessions`, migration 1 left it alone and so does this one: the
-- app's table, the app's policies. `embed-worker verify` then reports `sessions` when RLS is off
-- while app_user can select it, with the statements to fix it.
--
-- How we know who created it: `embed-worker migrate` looks before running migration 1 and, when
-- `public.sessions` did not exist, sets `embed_worker.creating_sessions = on` for the migration
-- connection; this migration marks the table by its comment, which later runs (and `verify`) read.

DO $$
BEGIN
    IF current_setting('embed_worker.creating_sessions', true) = 'on'
       AND obj_description('public.sessions'::regclass, 'pg_class') IS NULL THEN
        COMMENT ON TABLE sessions IS
            'embed-worker: created by embed-worker migrate (no app table existed); RLS: own rows for app_user';
    END IF;

    IF coalesce(obj_description('public.sessions'::regclass, 'pg_class'), '') LIKE 'embed-worker: created%' THEN
        ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;

        DROP POLICY IF EXISTS sessions_read_own ON sessions;
        CREATE POLICY sessions_read_own ON sessions FOR SELECT TO app_user
            USING (user_id = auth.uid());

        DROP POLICY IF EXISTS sessions_worker_read ON sessions;
        CREATE POLICY sessions_worker_read ON sessions FOR SELECT TO embed_worker
            USING (true);
    END IF;
END $$;
