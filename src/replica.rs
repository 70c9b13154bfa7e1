//! Streaming replicas as readers see them: how far behind the primary each one is, and which
//! server answered a search.
//!
//! Why: searches may read a standby (`search.database_url`) while the worker writes on the
//! primary. An embedding written there is searchable on the standby only once replayed, so "due
//! → searchable" is job latency plus replica lag; the worker samples the lag on the primary
//! (`embed_worker.replication_lag()`, migration 14) with the queue gauges, and a search says
//! which server answered and how far behind it was.

use sqlx::PgPool;

/// One streaming replica, from the primary's `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ReplicaLag {
    /// The standby's `application_name` (its `primary_conninfo`).
    pub application_name: String,
    /// `streaming`, `catchup`, …
    pub state: String,
    /// Replay lag in seconds (0 when it has replayed everything; `None` without the right to
    /// read it).
    pub replay_lag_seconds: Option<f64>,
    /// WAL bytes the primary has written that the standby has not replayed.
    pub lag_bytes: Option<f64>,
}

/// Every replica streaming from the server `pool` is connected to (none on a standby).
pub async fn lag(pool: &PgPool) -> anyhow::Result<Vec<ReplicaLag>> {
    let primary: bool = sqlx::query_scalar("SELECT NOT pg_is_in_recovery()")
        .fetch_one(pool)
        .await?;
    if !primary {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as::<_, ReplicaLag>(
        "SELECT application_name, state, replay_lag_seconds, lag_bytes
           FROM embed_worker.replication_lag() ORDER BY 1",
    )
    .fetch_all(pool)
    .await?)
}

/// Which server a connection reads: `primary`, or `standby (replay lag X s)`, measured there:
/// 0 when it has replayed all it received and is receiving, else the age of the last
/// transaction it replayed. A standby with no WAL receiver streaming (cut off from the primary)
/// says so: what it received it has replayed, but it receives nothing, so "0" would be false.
pub async fn describe(pool: &PgPool) -> anyhow::Result<String> {
    let (standby, streaming, caught_up, age): (bool, bool, bool, Option<f64>) = sqlx::query_as(
        "SELECT pg_is_in_recovery(),
                -- Without pg_read_all_stats only the receiver's pid is visible: a receiver
                -- running counts as receiving then.
                coalesce((SELECT pid IS NOT NULL AND coalesce(status = 'streaming', true)
                            FROM pg_stat_wal_receiver), false),
                coalesce(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), false),
                extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
    )
    .fetch_one(pool)
    .await?;
    let secs = |s: Option<f64>| s.map_or("unknown".to_string(), |s| format!("{s:.2} s"));
    Ok(match (standby, streaming, caught_up) {
        (false, ..) => "primary".to_string(),
        (true, true, true) => "standby (replay lag 0.00 s)".to_string(),
        (true, true, false) => format!("standby (replay lag {})", secs(age)),
        (true, false, _) => format!(
            "standby NOT RECEIVING from the primary (its last replayed transaction is {} old; \
             it answers as of then)",
            secs(age)
        ),
    })
}
