-- The worker's coordination on rows only the worker can lock (issue 34, item 6).
--
-- Why not advisory locks: pg_advisory_lock is PUBLIC, its key space is shared by every role,
-- pg_locks shows every held key to every role, and this project's keys follow from its public
-- code. The app role held eight per-source keys of its own sessions and 128, then 256 jobs
-- stalled; it held the index-build key and no index was built; it held the leader key and the
-- Batch API lane stopped. A managed database's owner cannot REVOKE EXECUTE on pg_catalog, so
-- the keys cannot be taken away; rows can: `SELECT ... FOR UPDATE` needs UPDATE on the table,
-- and only the worker role (and the owner) holds it on these two.

-- Per-source write serialization: a write transaction locks the stripes of its sources, in
-- stripe order (no deadlocks). 4,096 stripes: two 128-source batches share ~4 stripes, so two
-- replicas rarely wait on each other, and the table stays 18 pages.
CREATE TABLE IF NOT EXISTS embed_worker.source_locks (
    stripe integer PRIMARY KEY CHECK (stripe >= 0 AND stripe < 4096)
);
INSERT INTO embed_worker.source_locks SELECT generate_series(0, 4095) ON CONFLICT DO NOTHING;

-- Named leases: one holder at a time across replicas, for as long as it renews (expires_at)
-- and, where a backend does the work, that backend lives (pid). A lease rather than a lock
-- held in an open transaction: the batch lane's leader holds its lease for hours, and an open
-- transaction that long would hold back vacuum; a lease also holds no connection.
CREATE TABLE IF NOT EXISTS embed_worker.leases (
    name       text PRIMARY KEY,
    holder     text,
    pid        integer,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO embed_worker.leases (name)
VALUES ('batch-leader'), ('index-build'), ('stale-scan')
ON CONFLICT DO NOTHING;

GRANT SELECT, UPDATE ON embed_worker.source_locks, embed_worker.leases TO embed_worker;
