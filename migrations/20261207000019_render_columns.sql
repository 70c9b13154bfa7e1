-- Which columns hold a source's text is the render settings' decision (render.session,
-- render.template may name any column of the app's tables, issue 30). Two things follow the
-- settings, made here for the default columns and re-made by `embed-worker migrate`
-- (db::follow_render) whenever the settings name others: the update triggers' WHEN clauses
-- (migration 17) and these two tests of "has this row any text to embed" (queueing skips rows
-- without). SQL functions of one expression: the planner inlines them, so `has_text(s)` costs
-- what the column tests written out did (each column tested alone, shortest first: issue 23).
-- The worker's role runs them; PUBLIC (so the app's role) does not.
DO $$
BEGIN
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.sessions'::regclass
           AND attname IN ('title', 'notes', 'transcript') AND NOT attisdropped) = 3 THEN
        CREATE OR REPLACE FUNCTION embed_worker.session_has_text(s public.sessions)
        RETURNS boolean LANGUAGE sql STABLE AS $f$
            SELECT btrim(s.title, E' \t\n\r') <> '' OR btrim(s.notes, E' \t\n\r') <> ''
                OR btrim(s.transcript, E' \t\n\r') <> ''
        $f$;
        REVOKE EXECUTE ON FUNCTION embed_worker.session_has_text(public.sessions) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION embed_worker.session_has_text(public.sessions) TO embed_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.question_templates'::regclass
                  AND attname = 'body' AND NOT attisdropped) THEN
        CREATE OR REPLACE FUNCTION embed_worker.template_has_text(q public.question_templates)
        RETURNS boolean LANGUAGE sql STABLE AS $f$
            SELECT btrim(q.body, E' \t\n\r') <> ''
        $f$;
        REVOKE EXECUTE ON FUNCTION embed_worker.template_has_text(public.question_templates) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION embed_worker.template_has_text(public.question_templates) TO embed_worker;
    END IF;
END $$;
