-- embed-worker schema: enums, the app's source tables (created only where absent), and
-- rag_embeddings with one HNSW partial index per model. Follows the reviewed design:
-- HNSW (never IVFFlat), ENUMs instead of free text, cost/model columns, structured placeholders.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE SCHEMA IF NOT EXISTS embed_worker;

-- ENUMs: created only where the app has not created them already. Values are lower case.
DO $$ BEGIN
    CREATE TYPE interview_focus AS ENUM (
        'harmony', 'rhythm', 'technique', 'repertoire', 'ear_training',
        'improvisation', 'sight_reading', 'theory', 'performance', 'composition');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

DO $$ BEGIN
    CREATE TYPE interview_depth AS ENUM ('quick', 'standard', 'deep');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

DO $$ BEGIN
    CREATE TYPE template_category AS ENUM ('technical', 'creative', 'reflective');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

DO $$ BEGIN
    CREATE TYPE embedding_source AS ENUM ('session', 'template');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

-- The app owns `sessions`; we create it only for a fresh database (dev, tests, demo).
CREATE TABLE IF NOT EXISTS sessions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL,
    focus       interview_focus,
    depth       interview_depth,
    title       text,
    notes       text,
    transcript  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_sessions_user_id ON sessions (user_id);

-- Structured placeholders: {"placeholders":[{"key","description","type","required","example"}]}.
-- Raises a descriptive error (used from a CHECK constraint, so bad rows never land).
CREATE OR REPLACE FUNCTION embed_worker.check_placeholders(body text, doc jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    p jsonb;
    k text;
    known_types constant text[] := ARRAY['text', 'number', 'integer', 'boolean', 'enum',
        'duration', 'tempo', 'chord', 'scale', 'key', 'note', 'piece', 'technique'];
BEGIN
    IF doc IS NULL THEN
        RETURN true;
    END IF;
    IF jsonb_typeof(doc) <> 'object' OR jsonb_typeof(doc -> 'placeholders') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'Invalid placeholders: expected {"placeholders": [...]}'
            USING ERRCODE = 'check_violation';
    END IF;
    FOR p IN SELECT * FROM jsonb_array_elements(doc -> 'placeholders') LOOP
        IF jsonb_typeof(p) <> 'object' THEN
            RAISE EXCEPTION 'Invalid placeholders: each placeholder must be an object'
                USING ERRCODE = 'check_violation';
        END IF;
        k := p ->> 'key';
        IF k IS NULL OR k !~ '^[a-z][a-z0-9_]*$' THEN
            RAISE EXCEPTION 'Invalid placeholder key %: lower-case snake_case required', coalesce(k, 'null')
                USING ERRCODE = 'check_violation';
        END IF;
        IF NOT (p ->> 'type') = ANY (known_types) THEN
            RAISE EXCEPTION 'Invalid placeholder %: unknown type %', k, coalesce(p ->> 'type', 'null')
                USING ERRCODE = 'check_violation';
        END IF;
        IF jsonb_typeof(p -> 'description') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'Invalid placeholder %: description must be a string', k
                USING ERRCODE = 'check_violation';
        END IF;
        IF p ? 'required' AND jsonb_typeof(p -> 'required') <> 'boolean' THEN
            RAISE EXCEPTION 'Invalid placeholder %: required must be a boolean', k
                USING ERRCODE = 'check_violation';
        END IF;
        IF position('{' || k || '}' IN coalesce(body, '')) = 0 THEN
            RAISE EXCEPTION 'Invalid placeholder %: {%} does not appear in the body', k, k
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN true;
END $$;

CREATE TABLE IF NOT EXISTS question_templates (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug          text UNIQUE,
    focus         interview_focus NOT NULL,
    depth         interview_depth NOT NULL,
    body          text NOT NULL,
    placeholders  jsonb NOT NULL DEFAULT '{"placeholders": []}'::jsonb,
    usage_count   integer NOT NULL DEFAULT 0,
    last_used_at  timestamptz,
    enabled       boolean NOT NULL DEFAULT true,
    category      template_category,
    language      text NOT NULL DEFAULT 'en',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT question_templates_placeholders_valid
        CHECK (embed_worker.check_placeholders(body, placeholders))
);
CREATE INDEX IF NOT EXISTS idx_question_templates_focus ON question_templates (focus) WHERE enabled;

CREATE TABLE IF NOT EXISTS rag_embeddings (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    CONSTRAINT rag_embeddings_dimensions_match CHECK (dimensions = vector_dims(embedding)),
    CONSTRAINT rag_embeddings_source_chunk_key
        UNIQUE (source_type, source_id, embedding_model, chunk_index)
);

-- HNSW, one partial expression index per model (pgvector's documented way to index several
-- dimensions in one column). The default model's index ships here; `ensure_model_index` adds others.
CREATE INDEX IF NOT EXISTS idx_rag_embeddings_vector_text_embedding_ada_002
    ON rag_embeddings USING hnsw ((embedding::vector(1536)) vector_cosine_ops)
    WITH (m = 16, ef_construction = 64)
    WHERE embedding_model = 'text-embedding-ada-002';

-- No orphans (1): an embedding must point at an existing session or template. FOR KEY SHARE
-- holds the source row until this transaction ends, so a concurrent DELETE of the source waits
-- and its cascade (below) then sees and removes this row.
CREATE OR REPLACE FUNCTION embed_worker.check_embedding_source()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF NEW.source_type = 'session' THEN
        PERFORM 1 FROM sessions WHERE id = NEW.source_id FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'Invalid source_id: session % does not exist', NEW.source_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    ELSIF NEW.source_type = 'template' THEN
        PERFORM 1 FROM question_templates WHERE id = NEW.source_id FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'Invalid source_id: template % does not exist', NEW.source_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS trg_rag_embeddings_check_source ON rag_embeddings;
CREATE TRIGGER trg_rag_embeddings_check_source
    BEFORE INSERT OR UPDATE OF source_type, source_id ON rag_embeddings
    FOR EACH ROW EXECUTE FUNCTION embed_worker.check_embedding_source();

-- No orphans (2): deleting a source deletes its embeddings (statement level, one DELETE per statement).
CREATE OR REPLACE FUNCTION embed_worker.delete_session_embeddings()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM rag_embeddings e USING old_rows o
     WHERE e.source_type = 'session' AND e.source_id = o.id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION embed_worker.delete_template_embeddings()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM rag_embeddings e USING old_rows o
     WHERE e.source_type = 'template' AND e.source_id = o.id;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS trg_sessions_delete_embeddings ON sessions;
CREATE TRIGGER trg_sessions_delete_embeddings
    AFTER DELETE ON sessions REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.delete_session_embeddings();

DROP TRIGGER IF EXISTS trg_question_templates_delete_embeddings ON question_templates;
CREATE TRIGGER trg_question_templates_delete_embeddings
    AFTER DELETE ON question_templates REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION embed_worker.delete_template_embeddings();
