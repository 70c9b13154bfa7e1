-- Chunks of long sources already paid for, kept until their source is written.
--
-- A source of many chunks is written all or nothing (one transaction per batch), so when one of
-- its requests failed, or the worker stopped mid-way, a retry used to pay again for every chunk
-- (2.55 M tokens billed twice for one transcript). Each request's vectors for multi-chunk
-- sources are now staged here by content hash as soon as they arrive; a retry takes them from
-- here instead of the API, and the write removes them. `run`'s retention deletes rows older
-- than retention.failed_after_hours (their source never completed).
CREATE TABLE IF NOT EXISTS embed_worker.chunk_stage (
    embedding_model varchar(100) NOT NULL,
    content_hash    text NOT NULL,
    embedding       vector NOT NULL,
    token_count     integer NOT NULL CHECK (token_count >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (embedding_model, content_hash)
);
CREATE INDEX IF NOT EXISTS idx_chunk_stage_created_at ON embed_worker.chunk_stage (created_at);
ALTER TABLE embed_worker.chunk_stage ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS chunk_stage_worker_all ON embed_worker.chunk_stage;
CREATE POLICY chunk_stage_worker_all ON embed_worker.chunk_stage FOR ALL TO embed_worker
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, DELETE ON embed_worker.chunk_stage TO embed_worker;
