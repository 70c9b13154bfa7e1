-- Change capture: enqueue an embed job in the writer's own transaction when the text that is
-- embedded changes. INSERT always; UPDATE only when an embedded column changes (a change of
-- usage_count or last_used_at queues nothing). Deletes are handled by the cascade triggers.
-- Statement-level with transition tables: one enqueue per statement, however many rows.
-- `embed-worker migrate` enables or disables these per source from config (capture.*).

-- updated_at moves when embedded text changes, even if the app forgets: the worker's
-- newest-wins check and enqueue-stale's "outdated" reason rely on it.
CREATE OR REPLACE FUNCTION embed_worker.touch_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.title, NEW.focus, NEW.depth, NEW.notes, NEW.transcript)
       IS DISTINCT FROM (OLD.title, OLD.focus, OLD.depth, OLD.notes, OLD.transcript)
       AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.touch_template() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.body, NEW.focus, NEW.depth, NEW.category, NEW.placeholders)
       IS DISTINCT FROM (OLD.body, OLD.focus, OLD.depth, OLD.category, OLD.placeholders)
       AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS trg_sessions_touch ON sessions;
CREATE TRIGGER trg_sessions_touch BEFORE UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION embed_worker.touch_session();
DROP TRIGGER IF EXISTS trg_question_templates_touch ON question_templates;
CREATE TRIGGER trg_question_templates_touch BEFORE UPDATE ON question_templates
    FOR EACH ROW EXECUTE FUNCTION embed_worker.touch_template();

CREATE OR REPLACE FUNCTION embed_worker.capture_session_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_many(array_agg('session'::embedding_source), array_agg(n.id))
       FROM new_rows n HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_session_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_many(array_agg('session'::embedding_source), array_agg(n.id))
       FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE (n.title, n.focus, n.depth, n.notes, n.transcript)
            IS DISTINCT FROM (o.title, o.focus, o.depth, o.notes, o.transcript)
     HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_many(array_agg('template'::embedding_source), array_agg(n.id))
       FROM new_rows n HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.capture_template_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_many(array_agg('template'::embedding_source), array_agg(n.id))
       FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE (n.body, n.focus, n.depth, n.category, n.placeholders)
            IS DISTINCT FROM (o.body, o.focus, o.depth, o.category, o.placeholders)
     HAVING count(*) > 0;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS trg_sessions_capture_insert ON sessions;
CREATE TRIGGER trg_sessions_capture_insert AFTER INSERT ON sessions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.capture_session_insert();
DROP TRIGGER IF EXISTS trg_sessions_capture_update ON sessions;
CREATE TRIGGER trg_sessions_capture_update AFTER UPDATE ON sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.capture_session_update();
DROP TRIGGER IF EXISTS trg_question_templates_capture_insert ON question_templates;
CREATE TRIGGER trg_question_templates_capture_insert AFTER INSERT ON question_templates
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.capture_template_insert();
DROP TRIGGER IF EXISTS trg_question_templates_capture_update ON question_templates;
CREATE TRIGGER trg_question_templates_capture_update AFTER UPDATE ON question_templates
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.capture_template_update();
