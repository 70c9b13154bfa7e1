//! `verify`: the design's post-migration check.
//!
//! Why its own module: it reads the catalog, not our migration history, so it also catches an
//! index someone created by hand; and it is the one place that knows both the connection layer
//! ([`crate::db`]) and the models' indexes ([`crate::model_index`]), so neither of those has to
//! know the other's report.

use sqlx::PgPool;

use crate::model_index::{self, VectorIndex};

/// The result of `verify`: what was found and what is wrong.
#[derive(Debug)]
pub struct VerifyReport {
    /// Every vector index found.
    pub indexes: Vec<VectorIndex>,
    /// What is wrong, one sentence each.
    pub problems: Vec<String>,
    /// What is fine but worth knowing (an index deferred until a backfill drains).
    pub notes: Vec<String>,
}

/// The indexes as a table, then `verify: OK` or one `verify: FAIL: …` line per problem.
impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<56} {:<8} {:<14} {:<32} valid",
            "vector index", "method", "type", "options"
        )?;
        for ix in &self.indexes {
            writeln!(
                f,
                "{:<56} {:<8} {:<14} {:<32} {}",
                ix.name,
                ix.access_method,
                model_index::stored_type(ix).unwrap_or_else(|| "?".into()),
                ix.options.join(","),
                ix.valid
            )?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "verify: OK")
        } else {
            self.problems
                .iter()
                .try_for_each(|p| writeln!(f, "verify: FAIL: {p}"))
        }
    }
}

/// The model registry against the table: one serving and one writing model (the configured
/// one), each registered model's partition present, attached and closed to direct reads (RLS
/// on, so only the parent's policies let anyone in), and the serving model's index valid unless
/// it is the writing model whose index is deferred (checked above).
async fn models(
    pool: &PgPool,
    spec: &model_index::IndexSpec,
    indexes: &[VectorIndex],
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let all = model_index::lifecycle::models(pool).await?;
    match all.iter().find(|m| m.serving) {
        None => problems.push("no serving model is registered (run `embed-worker migrate`)".into()),
        Some(m) if m.name != spec.model => {
            let ix = model_index::find(indexes, &model_index::IndexSpec::of(m));
            if !matches!(ix, model_index::IndexState::Ready(_)) {
                problems.push(format!(
                    "the serving model {}'s index is not valid ({ix:?}): searches scan it",
                    m.name
                ));
            }
        }
        Some(_) => {}
    }
    match all.iter().find(|m| m.writing) {
        Some(m) if m.name == spec.model => {}
        other => problems.push(format!(
            "the writing model is {} but model.name is {} (run `embed-worker migrate`)",
            other.map_or("none", |m| m.name.as_str()),
            spec.model
        )),
    }
    let parts: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relrowsecurity FROM pg_inherits h
           JOIN pg_class c ON c.oid = h.inhrelid
          WHERE h.inhparent = to_regclass('public.rag_embeddings')",
    )
    .fetch_all(pool)
    .await?;
    for m in &all {
        match parts.iter().find(|(p, _)| *p == m.partition) {
            Some((_, true)) => {}
            Some((p, false)) => problems.push(format!(
                "row-level security is off on partition {p}: a role granted it reads every \
                 user's rows past rag_embeddings' policies"
            )),
            None => problems.push(format!(
                "model {} is registered but its partition {} is not attached",
                m.name, m.partition
            )),
        }
    }
    Ok(problems)
}

/// The design's post-migration check, against the active model's index as configured
/// (`settings`): HNSW, m = 16, ef_construction = 64, cosine; missing only while deferred.
pub async fn verify(
    pool: &PgPool,
    settings: &crate::config::Settings,
) -> anyhow::Result<VerifyReport> {
    let indexes = model_index::vector_indexes(pool).await?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for ix in &indexes {
        if ix.access_method == "ivfflat" {
            problems.push(format!(
                "index {} uses IVFFlat; the design requires HNSW",
                ix.name
            ));
        }
        if ix.building {
            notes.push(format!(
                "index {} is being built now (not yet valid)",
                ix.name
            ));
        } else if !ix.valid {
            problems.push(format!(
                "index {} is INVALID (a failed CONCURRENTLY build? `embed-worker migrate` or \
                 `models build-index` drops and rebuilds it)",
                ix.name
            ));
        }
    }
    let spec = model_index::IndexSpec::from_settings(settings)?;
    let want = format!(
        "{} index of {} ({})",
        spec.index_type(),
        spec.model,
        spec.name()
    );
    match model_index::find(&indexes, &spec) {
        model_index::IndexState::Ready(name) => {
            let ix = indexes.iter().find(|i| i.name == name).expect("found");
            for opt in ["m=16", "ef_construction=64"] {
                if !ix.options.iter().any(|o| o == opt) {
                    problems.push(format!("{name} lacks {opt}"));
                }
            }
        }
        model_index::IndexState::Invalid(_) | model_index::IndexState::Building(_) => {}
        model_index::IndexState::Missing => {
            match model_index::build::not_due(pool, settings, &spec).await? {
                Some(why) => notes.push(format!("{want} not built yet: {why}")),
                None => problems.push(format!(
                    "{want} is missing (`embed-worker models build-index` builds it)"
                )),
            }
        }
    }
    let rls: Vec<(String, bool)> = sqlx::query_as(
        "SELECT relname::text, relrowsecurity FROM pg_class
          WHERE relname IN ('rag_embeddings', 'question_templates') AND relkind IN ('r', 'p')
            AND relnamespace = 'public'::regnamespace",
    )
    .fetch_all(pool)
    .await?;
    for table in ["rag_embeddings", "question_templates"] {
        match rls.iter().find(|(t, _)| t == table) {
            Some((_, true)) => {}
            Some((_, false)) => problems.push(format!("row-level security is off on {table}")),
            None => problems.push(format!("table {table} is missing")),
        }
    }
    problems.extend(models(pool, &spec, &indexes).await?);
    // `sessions` usually belongs to the app (we leave its table alone), but a user's practice
    // notes readable by every user is the leak the design's RLS exists to prevent.
    let sessions_open: bool = sqlx::query_scalar(
        "SELECT coalesce(NOT c.relrowsecurity
                         AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_user')
                         AND has_table_privilege('app_user', c.oid, 'SELECT'), false)
           FROM pg_class c
          WHERE c.relname = 'sessions' AND c.relkind = 'r'
            AND c.relnamespace = 'public'::regnamespace",
    )
    .fetch_optional(pool)
    .await?
    .unwrap_or(false);
    if sessions_open {
        problems.push(format!(
            "row-level security is off on sessions while app_user can select it: every user \
             reads every user's sessions. Fix (as the table's owner): ALTER TABLE sessions \
             ENABLE ROW LEVEL SECURITY; CREATE POLICY sessions_read_own ON sessions FOR SELECT \
             TO app_user USING ({} = auth.uid()); CREATE POLICY sessions_worker_read ON \
             sessions FOR SELECT TO embed_worker USING (true);",
            settings.render.session_owner
        ));
    }
    let trigger: Option<(bool,)> = sqlx::query_as(
        "SELECT tgenabled <> 'D' FROM pg_trigger
          WHERE tgname = 'trg_rag_embeddings_check_source'
            AND tgrelid = to_regclass('public.rag_embeddings')",
    )
    .fetch_optional(pool)
    .await?;
    match trigger {
        Some((true,)) => {}
        Some((false,)) => {
            problems.push("source trigger trg_rag_embeddings_check_source is disabled".into())
        }
        None => problems.push("source trigger trg_rag_embeddings_check_source is missing".into()),
    }
    let (platform_problems, platform_notes) = platform(pool, settings).await?;
    problems.extend(platform_problems);
    notes.extend(platform_notes);
    Ok(VerifyReport {
        indexes,
        problems,
        notes,
    })
}

/// pgvector 0.8.4 fixed an HNSW graph that vacuum could corrupt and one left unrepaired
/// (0.8.3 and 0.8.4's release notes); older versions still run.
const PGVECTOR_FIXED: (u32, u32, u32) = (0, 8, 4);

/// `x.y.z` as numbers (a suffix such as `-dev` ignored).
fn version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// The platform under the schema: pgvector's version, the login's attributes, and the
/// connection budget. A managed platform is where these differ from the lab.
async fn platform(
    pool: &PgPool,
    settings: &crate::config::Settings,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut problems, mut notes) = (Vec::new(), Vec::new());
    let pgvector: Option<String> =
        sqlx::query_scalar("SELECT extversion::text FROM pg_extension WHERE extname = 'vector'")
            .fetch_optional(pool)
            .await?;
    match pgvector.as_deref() {
        None => problems.push("the vector extension is not installed".into()),
        Some(v) => match version(v) {
            Some(have) if have >= PGVECTOR_FIXED => notes.push(format!("pgvector {v}")),
            _ => notes.push(format!(
                "warning: pgvector {v} is older than 0.8.4, which fixes HNSW index corruption \
                 by vacuum and an unrepaired graph after deletes (0.8.3, 0.8.4); upgrade the \
                 extension (ALTER EXTENSION vector UPDATE, or the platform's upgrade) and \
                 REINDEX the HNSW indexes"
            )),
        },
    }
    let (login, superuser, bypassrls): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = session_user",
    )
    .fetch_one(pool)
    .await?;
    if superuser || bypassrls {
        notes.push(format!(
            "the login {login} has {}: its own queries pass every RLS policy (Neon's owner has \
             BYPASSRLS). The worker's queries run as database.role = {:?}, which has neither, \
             so its checks do not depend on it",
            if superuser { "SUPERUSER" } else { "BYPASSRLS" },
            settings.database.role
        ));
    }
    if !settings.database.role.is_empty() {
        let role: Option<(bool, bool)> =
            sqlx::query_as("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1")
                .bind(&settings.database.role)
                .fetch_optional(pool)
                .await?;
        if let Some((true, _) | (_, true)) = role {
            problems.push(format!(
                "database.role {} has SUPERUSER or BYPASSRLS: the worker's reads would pass \
                 the policies that keep one user's sessions from another",
                settings.database.role
            ));
        }
    }
    let usage = crate::db::connections::usage(pool).await?;
    let budget = i64::from(settings.database.max_connections);
    notes.push(format!(
        "connections: max_connections {} ({} reserved, {} usable), {} open now; \
         database.max_connections {budget} per worker, {} live workers' pools add up to {}",
        usage.max,
        usage.reserved,
        usage.usable,
        usage.open,
        usage.processes.iter().filter(|p| p.kind == "run").count(),
        usage.worker_pools()
    ));
    if budget + 1 > usage.usable {
        problems.push(format!(
            "database.max_connections = {budget} (and one index build) is more than the server              allows ordinary roles ({}): lower it",
            usage.usable
        ));
    } else if let Some(why) = crate::db::connections::overcommitted(&usage) {
        notes.push(format!("warning: {why}"));
    }
    Ok((problems, notes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(super::version("0.8.10"), Some((0, 8, 10)));
        assert!(super::version("0.8.10").unwrap() > super::PGVECTOR_FIXED);
        assert!(super::version("0.8.2").unwrap() < super::PGVECTOR_FIXED);
        assert_eq!(super::version("0.9"), Some((0, 9, 0)));
        assert_eq!(super::version("dev"), None);
    }
}
