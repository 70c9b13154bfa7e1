//! The connection budget: what this process's pool holds, what the live workers' pools add up
//! to, and what the server allows.
//!
//! Why: a managed PostgreSQL allows few connections (Neon at 0.25 CU: 104; Supabase's smallest
//! plans: 60 direct) and the app needs most of them. Replicas are counted from
//! `pg_stat_activity`, where every connection of ours is named `embed-worker/<kind> pool=<n>
//! <id>` ([`super::application_name`]): nothing to register, and a dead process's entry goes
//! with its connections. `application_name` is visible to every role, unlike `state`.

use sqlx::PgPool;

/// One process of ours seen on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// `run` for a worker, else the command (`cli` when unnamed).
    pub kind: String,
    /// Its pool size, as it announced it.
    pub pool: i64,
    /// Its connections open now.
    pub open: i64,
    /// Its random id.
    pub id: String,
}

/// The server's connections and ours.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// `max_connections`.
    pub max: i64,
    /// `superuser_reserved_connections` + `reserved_connections`.
    pub reserved: i64,
    /// What ordinary roles may open: `max - reserved`.
    pub usable: i64,
    /// Client connections open now, every application's.
    pub open: i64,
    /// Our processes, workers first.
    pub processes: Vec<Process>,
}

impl Usage {
    /// The live workers' pools added up: what they may open at once.
    pub fn worker_pools(&self) -> i64 {
        self.processes
            .iter()
            .filter(|p| p.kind == "run")
            .map(|p| p.pool)
            .sum()
    }
}

/// Parses `embed-worker/<kind> pool=<n> <id>`.
fn parse(name: &str) -> Option<(String, i64, String)> {
    let rest = name.strip_prefix("embed-worker/")?;
    let mut parts = rest.split(' ');
    let kind = parts.next()?.to_string();
    let pool = parts.next()?.strip_prefix("pool=")?.parse().ok()?;
    let id = parts.next()?.to_string();
    Some((kind, pool, id))
}

/// max, reserved, open, and one name of ours with its connections.
type UsageRow = (i64, i64, i64, Option<String>, Option<i64>);

/// Reads the server's limits and who holds its connections.
pub async fn usage(pool: &PgPool) -> sqlx::Result<Usage> {
    // One round trip (every replica samples this every few seconds): the server's figures
    // on every row, one row per name of ours (a single row with no name when there is none).
    let rows: Vec<UsageRow> = sqlx::query_as(
        "SELECT current_setting('max_connections')::int8,
                current_setting('superuser_reserved_connections')::int8
                  + coalesce(current_setting('reserved_connections', true)::int8, 0),
                (SELECT count(*) FROM pg_stat_activity
                  WHERE usesysid IS NOT NULL
                    AND coalesce(backend_type, 'client backend') = 'client backend'),
                ours.application_name, ours.n
           FROM (SELECT 1) one
           LEFT JOIN (SELECT application_name, count(*) AS n FROM pg_stat_activity
                       WHERE application_name LIKE 'embed-worker/%' GROUP BY 1) ours ON true",
    )
    .fetch_all(pool)
    .await?;
    let (max, reserved, open) = rows.first().map_or((0, 0, 0), |r| (r.0, r.1, r.2));
    let mut processes: Vec<Process> = rows
        .into_iter()
        .filter_map(|(_, _, _, name, open)| {
            let (kind, pool, id) = parse(&name?)?;
            Some(Process {
                kind,
                pool,
                open: open?,
                id,
            })
        })
        .collect();
    processes.sort_by(|a, b| (a.kind != "run", &a.id).cmp(&(b.kind != "run", &b.id)));
    Ok(Usage {
        max,
        reserved,
        usable: max - reserved,
        open,
        processes,
    })
}

/// What the workers may open at once beside the server's usable connections: the live
/// workers' pools and one index build (`None` when it fits).
pub fn overcommitted(usage: &Usage) -> Option<String> {
    let pools = usage.worker_pools();
    let workers = usage.processes.iter().filter(|p| p.kind == "run").count();
    (pools + 1 > usage.usable).then(|| {
        format!(
            "{workers} live workers' pools ({pools} connections) and one index build need {} \
             connections; the server allows {} (max_connections {} less {} reserved), and the \
             app needs its own: lower database.max_connections or the replicas",
            pools + 1,
            usage.usable,
            usage.max,
            usage.reserved
        )
    })
}

/// At start: a warning when the live workers' pools (this one's included) could pass what the
/// server allows. A warning, not a refusal: pools open connections only as they need them.
pub async fn warn_at_start(pool: &PgPool, settings: &crate::config::Settings) {
    match usage(pool).await {
        Ok(usage) => {
            if let Some(why) = overcommitted(&usage) {
                tracing::warn!(
                    pool = settings.database.max_connections,
                    usable = usage.usable,
                    "connection budget: {why}"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "connection budget not read"),
    }
}

/// The connection gauges, from this pool's own counts and the server's.
pub async fn sample(pool: &PgPool) -> sqlx::Result<Usage> {
    let usage = usage(pool).await?;
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
    let in_use = pool.size().saturating_sub(idle);
    let server = (usage.usable, usage.open, usage.worker_pools());
    crate::meter::connections(in_use, idle, pool.options().get_max_connections(), server);
    Ok(usage)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_parse_and_others_do_not() {
        assert_eq!(
            super::parse("embed-worker/run pool=16 0a1b2c3d"),
            Some(("run".into(), 16, "0a1b2c3d".into()))
        );
        assert_eq!(super::parse("embed-worker index build"), None);
        assert_eq!(super::parse("embed-worker/run pool=x 0a1b2c3d"), None);
        assert_eq!(super::parse("psql"), None);
    }
}
