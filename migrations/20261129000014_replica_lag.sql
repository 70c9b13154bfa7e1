-- Replica lag as readers see it (issue 24). Searches may read a streaming standby
-- (search.database_url); an embedding written on the primary is searchable there only once the
-- standby has replayed it. pg_stat_replication shows the replay position and lag only to
-- superusers and members of pg_read_all_stats, so the worker reads it through this function,
-- which runs as its owner (the login that ran `migrate`). Where that login lacks the right, the
-- positions read NULL and the worker exports NaN rather than a reassuring 0.
CREATE OR REPLACE FUNCTION embed_worker.replication_lag()
RETURNS TABLE (application_name text, state text, replay_lag_seconds double precision,
               lag_bytes double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT r.application_name::text,
           r.state::text,
           -- replay_lag keeps its last value once idle: a standby that has replayed all WAL is 0.
           CASE WHEN r.replay_lsn IS NULL THEN NULL
                WHEN r.replay_lsn >= pg_current_wal_lsn() THEN 0
                ELSE coalesce(extract(epoch FROM r.replay_lag)::float8, 0) END,
           pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::float8
      FROM pg_stat_replication r
$$;
REVOKE EXECUTE ON FUNCTION embed_worker.replication_lag() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_worker.replication_lag() TO embed_worker;
