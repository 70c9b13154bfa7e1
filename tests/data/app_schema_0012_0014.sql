-- The app's own schema as the design review (../shared/design/schema-review.md) shows it after
-- its fixes: what embed-worker meets in a real deployment. Written from the review; where it is
-- silent, guessed plausibly (marked "guess"). Run by a superuser on an empty database.
--
-- Before 0012 (the app's earlier migrations): auth.uid() as Supabase/Neon auth give it
-- (guess: from the JWT claim), the interview ENUMs and sessions.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS auth;
CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
$$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;

CREATE TYPE interview_focus AS ENUM ('harmony', 'rhythm', 'technique', 'repertoire', 'ear_training');
CREATE TYPE interview_depth AS ENUM ('quick', 'standard', 'deep');

CREATE TABLE sessions (
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
CREATE INDEX idx_sessions_user_id ON sessions (user_id);

-- 0012_add_rag_embeddings.sql, with the review's HNSW fix, its trigger and its added columns.
CREATE TABLE rag_embeddings (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source_type  text NOT NULL,                 -- 'session' | 'template' (the review: polymorphic)
    source_id    uuid NOT NULL,
    content      text NOT NULL,                 -- guess: the text that was embedded
    embedding    vector(1536) NOT NULL,
    metadata     jsonb NOT NULL DEFAULT '{}',   -- guess
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_rag_embeddings_vector
  ON rag_embeddings
  USING hnsw (embedding vector_cosine_ops)
  WITH (m = 16, ef_construction = 64);
CREATE INDEX idx_rag_embeddings_source ON rag_embeddings (source_type, source_id);  -- guess

ALTER TABLE rag_embeddings
  ADD COLUMN embedding_model VARCHAR(100) DEFAULT 'text-embedding-ada-002',
  ADD COLUMN updated_at TIMESTAMPTZ DEFAULT NOW(),
  ADD COLUMN token_count INTEGER;

-- 0013_add_question_templates.sql, with the review's ENUMs and added columns. The text is in
-- question_text and the placeholders in variables ({"{chord}": "placeholder for chord name"}).
CREATE TABLE question_templates (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    focus          interview_focus NOT NULL,
    depth          interview_depth NOT NULL,
    question_text  text NOT NULL,
    variables      jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE question_templates
  ADD COLUMN usage_count INTEGER DEFAULT 0,
  ADD COLUMN last_used_at TIMESTAMPTZ,
  ADD COLUMN enabled BOOLEAN DEFAULT TRUE,
  ADD COLUMN category TEXT;

CREATE OR REPLACE FUNCTION validate_rag_embedding_source()
RETURNS TRIGGER AS $$
BEGIN
  IF NEW.source_type = 'session' THEN
    IF NOT EXISTS (SELECT 1 FROM sessions WHERE id = NEW.source_id) THEN
      RAISE EXCEPTION 'Invalid source_id: session % does not exist', NEW.source_id;
    END IF;
  ELSIF NEW.source_type = 'template' THEN
    IF NOT EXISTS (SELECT 1 FROM question_templates WHERE id = NEW.source_id) THEN
      RAISE EXCEPTION 'Invalid source_id: template % does not exist', NEW.source_id;
    END IF;
  END IF;
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER trg_validate_rag_embedding_source
  BEFORE INSERT OR UPDATE ON rag_embeddings
  FOR EACH ROW
  EXECUTE FUNCTION validate_rag_embedding_source();

-- 0014_add_rag_rls_policies.sql
ALTER TABLE rag_embeddings ENABLE ROW LEVEL SECURITY;
ALTER TABLE question_templates ENABLE ROW LEVEL SECURITY;

CREATE POLICY "Users can read own session embeddings"
  ON rag_embeddings FOR SELECT
  USING (
    source_type = 'session' AND
    source_id IN (SELECT id FROM sessions WHERE user_id = auth.uid())
  );

CREATE POLICY "All users can read template embeddings"
  ON rag_embeddings FOR SELECT
  USING (source_type = 'template');

CREATE POLICY "Authenticated users can read enabled templates"
  ON question_templates FOR SELECT
  USING (enabled = TRUE AND auth.uid() IS NOT NULL);

-- The app's data: 3 users' sessions and 10 templates, and the vectors its old job paid for
-- (ada-002, 1536 dimensions): every template and 30 of the 40 sessions; 10 sessions never
-- embedded. (Guess: the old job wrote neither token_count nor embedding_model's default away.)
INSERT INTO sessions (user_id, focus, depth, title, notes, transcript)
SELECT ('00000000-0000-0000-0000-00000000000' || (i % 3 + 1))::uuid,
       (ARRAY['harmony', 'rhythm', 'technique']::interview_focus[])[i % 3 + 1], 'standard',
       'Session ' || i, 'notes of session ' || i, 'transcript of session ' || i
  FROM generate_series(1, 40) i;
INSERT INTO question_templates (focus, depth, question_text, variables, category)
SELECT 'harmony', 'quick', 'How would you voice {chord} in bar ' || i || '?',
       '{"{chord}": "placeholder for chord name"}', 'technical'
  FROM generate_series(1, 10) i;
INSERT INTO rag_embeddings (source_type, source_id, content, embedding, updated_at)
SELECT 'template', q.id, q.question_text,
       array_fill(0.01::real, ARRAY[1536])::vector, q.updated_at + interval '1 minute'
  FROM question_templates q;
INSERT INTO rag_embeddings (source_type, source_id, content, embedding, updated_at)
SELECT 'session', s.id, s.title, array_fill(0.02::real, ARRAY[1536])::vector,
       s.updated_at + interval '1 minute'
  FROM (SELECT * FROM sessions ORDER BY title LIMIT 30) s;
-- Edited after their vector: 5 embedded sessions.
UPDATE sessions SET notes = notes || ' (edited)', updated_at = now() + interval '1 hour'
 WHERE id IN (SELECT source_id FROM rag_embeddings WHERE source_type = 'session'
               ORDER BY source_id LIMIT 5);
