-- Which model each running worker is configured with (issue 34, item 9).
--
-- Why: `models prune` of a model an old-config worker still wrote dropped the partition under
-- it; that worker's connection desynced (`expected ParseComplete, got CommandComplete`) and 179
-- edits were left stale. Each worker upserts its row every 10 s while it runs and deletes it at
-- a graceful stop; prune refuses a model a worker seen in the last 60 s is configured with.
CREATE TABLE IF NOT EXISTS embed_worker.workers (
    name     text PRIMARY KEY,
    model    text NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE, DELETE ON embed_worker.workers TO embed_worker;
