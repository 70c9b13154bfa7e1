//! The worker's coordination across replicas, on rows only the worker role can lock.
//!
//! Why not advisory locks: their key space is shared with every role, `pg_locks` shows every
//! held key to every role, and the keys followed from this project's public code, so the app's
//! role could stall writes (a source's key), index builds and the Batch API lane (their keys)
//! by holding them. Row locks need UPDATE on the row's table, which only the worker role and
//! the owner hold on `embed_worker.source_locks` and `embed_worker.leases` (migration 24).
//!
//! Two shapes:
//! - [`lock_sources`]: transaction-scoped, for the write of a batch: the stripes of its sources,
//!   locked in stripe order (no deadlocks), released at commit;
//! - [`Lease`]: a named lease for work that outlives a transaction (the batch lane's leader, an
//!   index build). Held while its holder renews it; taken over once it expires or, when it
//!   names a backend, once that backend is gone. A lease holds no connection and no transaction,
//!   so a leader of hours neither spends one of a small pool nor holds back vacuum.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;

use crate::source::EmbedSource;

/// Stripes in `embed_worker.source_locks`.
const STRIPES: u64 = 4096;

/// A source's stripe: a stable hash (FNV-1a) of its type and id.
pub fn stripe(s: &EmbedSource) -> i32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s
        .source_type
        .as_str()
        .as_bytes()
        .iter()
        .chain(b":")
        .chain(s.source_id.as_bytes())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % STRIPES) as i32
}

/// Locks the stripes of `sources` until the transaction ends, in stripe order (the lock is
/// taken as rows are returned, after the sort), so two writers of one source serialize and
/// two writers never deadlock.
pub async fn lock_sources(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sources: impl IntoIterator<Item = EmbedSource>,
) -> sqlx::Result<()> {
    let mut stripes: Vec<i32> = sources.into_iter().map(|s| stripe(&s)).collect();
    stripes.sort_unstable();
    stripes.dedup();
    sqlx::query(
        "SELECT stripe FROM embed_worker.source_locks WHERE stripe = ANY($1)
          ORDER BY stripe FOR NO KEY UPDATE",
    )
    .bind(&stripes)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Takes the named lease's row for the rest of the transaction, unless another transaction
/// holds it (`false`): one of the replicas runs a chore that fits in one transaction.
pub async fn try_lock_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    name: &str,
) -> sqlx::Result<bool> {
    let got: Option<String> = sqlx::query_scalar(
        "SELECT name FROM embed_worker.leases WHERE name = $1 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(got.is_some())
}

/// A named lease in `embed_worker.leases`, held by this process.
#[derive(Debug)]
pub struct Lease {
    name: &'static str,
    holder: String,
    ttl: Duration,
    held: AtomicBool,
}

impl Lease {
    /// A lease on `name` (a row of `embed_worker.leases`) for this process, lasting `ttl` past
    /// each renewal.
    pub fn new(name: &'static str, ttl: Duration) -> Arc<Lease> {
        Arc::new(Lease {
            name,
            holder: crate::telemetry::worker_name(),
            ttl,
            held: AtomicBool::new(false),
        })
    }

    /// Takes or renews the lease; `pid` names the backend doing the work, when one does (the
    /// lease is free as soon as that backend is gone). `false`: another holder has it.
    pub async fn hold(&self, pool: &PgPool, pid: Option<i32>) -> sqlx::Result<bool> {
        let got: Option<String> = sqlx::query_scalar(
            "UPDATE embed_worker.leases l
                SET holder = $2, pid = coalesce($4, CASE WHEN l.holder = $2 THEN l.pid END),
                    expires_at = clock_timestamp() + make_interval(secs => $3)
              WHERE l.name = $1
                AND (l.holder IS NULL OR l.holder = $2 OR l.expires_at < clock_timestamp()
                     OR (l.pid IS NOT NULL AND NOT EXISTS
                           (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid)))
             RETURNING l.name",
        )
        .bind(self.name)
        .bind(&self.holder)
        .bind(self.ttl.as_secs_f64())
        .bind(pid)
        .fetch_optional(pool)
        .await?;
        self.held.store(got.is_some(), Ordering::Relaxed);
        Ok(got.is_some())
    }

    /// Renews the lease only while this process still holds it (the keep-alive: a renewal in
    /// flight at a release must not take the lease back for a holder that is done with it).
    async fn renew(&self, pool: &PgPool) -> sqlx::Result<bool> {
        let got: Option<String> = sqlx::query_scalar(
            "UPDATE embed_worker.leases
                SET expires_at = clock_timestamp() + make_interval(secs => $3)
              WHERE name = $1 AND holder = $2
             RETURNING name",
        )
        .bind(self.name)
        .bind(&self.holder)
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        self.held.store(got.is_some(), Ordering::Relaxed);
        Ok(got.is_some())
    }

    /// Whether the last [`hold`](Self::hold) took or renewed it.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// Keeps the lease while this process lives, however long one round of the work takes:
    /// renews every third of its time to live while held. Ends when the returned handle drops.
    pub fn keep(self: &Arc<Self>, pool: &PgPool) -> KeepAlive {
        let (lease, pool) = (self.clone(), pool.clone());
        let every = self.ttl / 3;
        KeepAlive(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if lease.is_held()
                    && let Err(e) = lease.renew(&pool).await
                {
                    tracing::warn!(lease = lease.name, error = %e, "lease renewal failed; trying again");
                }
            }
        }))
    }

    /// Gives the lease up (best effort: an unreleased lease expires).
    pub async fn release(&self, pool: &PgPool) {
        self.held.store(false, Ordering::Relaxed);
        let _ = sqlx::query(
            "UPDATE embed_worker.leases SET holder = NULL, pid = NULL, expires_at = '-infinity'
              WHERE name = $1 AND holder = $2",
        )
        .bind(self.name)
        .bind(&self.holder)
        .execute(pool)
        .await;
    }
}

/// The renewal task of a [`Lease`]; stops renewing when dropped.
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}
