-- A batch belongs to the installation and the model that made it (issue 34, items 1, 2, 9).
--
-- Why an installation id: two databases on one provider account (staging and production, a
-- restored copy) number their batch records from 1 alike, so a record id in the provider's
-- metadata alone let each adopt, collect and delete the other's batches. The id is made once,
-- here, and travels in every batch's metadata; a batch is adopted only when its installation,
-- its record id and its input file (unique per upload, so a restored copy's record cannot
-- claim the original's batch) all match.
CREATE TABLE IF NOT EXISTS embed_worker.installation (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO embed_worker.installation DEFAULT VALUES ON CONFLICT DO NOTHING;
GRANT SELECT ON embed_worker.installation TO embed_worker;

-- Why prices in the registry: a batch of the old model collected after a switch, and the
-- serving model's dual-write, are charged at that model's price, not the configured one's.
-- NULL (a model registered before this migration): the known list price, else the config's.
ALTER TABLE embed_worker.models
    ADD COLUMN IF NOT EXISTS usd_per_million_tokens double precision
        CHECK (usd_per_million_tokens >= 0),
    ADD COLUMN IF NOT EXISTS batch_usd_per_million_tokens double precision
        CHECK (batch_usd_per_million_tokens >= 0);
