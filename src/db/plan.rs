//! What `migrate` will do to this database, read from its catalog before anything changes.
//!
//! Why: the database is usually the app's, not a fresh one. Its `sessions`, `question_templates`
//! and `rag_embeddings` may already exist in the app's shape (the reviewed design is the app's
//! own migrations 0012–0014), its ENUMs may carry other labels, and the role `migrate` runs as
//! may not own the app's tables. Run blind, the migrations got through twelve files, added
//! policies, triggers and a second HNSW index to the app's tables, then stopped on a column
//! the app does not have: a half-migrated database with no way forward or back. So `migrate`
//! first reads the catalog (tables, columns and types, ENUM labels, the extension, the schema,
//! the roles, ownership, what is already applied), says what it will do (`migrate --plan`
//! prints it and stops), and refuses with every conflict listed before it changes anything.
//!
//! What is applied after the plan passes: each migration in its own transaction (sqlx's
//! bookkeeping), so a run killed at any point leaves the database at a migration boundary and
//! the next `migrate` resumes after the last one recorded. Where the app's own `rag_embeddings`
//! is adopted ([`super::adopt`]), the migrations and the attach are one transaction instead.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sqlx::PgConnection;

use super::render::{Column, columns_of};
use crate::config::{RenderSettings, render_fields};
use crate::source::SourceType;

/// The first migration's version: recorded once the worker's own schema exists.
const FIRST_VERSION: i64 = 20261126000001;

/// One column of a table the worker reads or writes, and what its type must be.
struct Need {
    column: &'static str,
    kind: Kind,
    why: &'static str,
}

/// The types the worker can use for a column.
#[derive(Clone, Copy)]
enum Kind {
    Uuid,
    /// text, varchar or any ENUM (read as `::text`).
    Label,
    Bool,
    /// timestamptz or timestamp.
    Time,
}

impl Kind {
    fn accepts(self, c: &Column) -> bool {
        match self {
            Kind::Uuid => c.type_name == "uuid",
            Kind::Label => matches!(c.type_name.as_str(), "text" | "varchar") || c.type_type == "e",
            Kind::Bool => c.type_name == "bool",
            Kind::Time => matches!(c.type_name.as_str(), "timestamptz" | "timestamp"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Uuid => "uuid",
            Kind::Label => "text, varchar or an ENUM",
            Kind::Bool => "boolean",
            Kind::Time => "timestamptz",
        }
    }
}

const SESSIONS: &[Need] = &[
    Need {
        column: "id",
        kind: Kind::Uuid,
        why: "the source id in jobs and in rag_embeddings.source_id",
    },
    Need {
        column: "updated_at",
        kind: Kind::Time,
        why: "when the text last changed: staleness and change capture",
    },
];

const TEMPLATES: &[Need] = &[
    Need {
        column: "id",
        kind: Kind::Uuid,
        why: "the source id in jobs and in rag_embeddings.source_id",
    },
    Need {
        column: "focus",
        kind: Kind::Label,
        why: "indexed for the app's lookups by focus (idx_question_templates_focus)",
    },
    Need {
        column: "enabled",
        kind: Kind::Bool,
        why: "only enabled templates are readable by the app's role",
    },
    Need {
        column: "updated_at",
        kind: Kind::Time,
        why: "when the text last changed: staleness and change capture",
    },
];

/// The ENUMs the worker uses, and the labels each must have when the app made it.
const ENUMS: &[(&str, &[&str])] = &[
    ("interview_focus", &[]),
    ("interview_depth", &[]),
    ("template_category", &[]),
    ("embedding_source", &["session", "template"]),
];

#[derive(sqlx::FromRow)]
struct Table {
    kind: String,
    owner: String,
    owned: bool,
    /// Row-level security on.
    rls: bool,
    /// The planner's estimate; `None` before the first ANALYZE.
    rows: Option<i64>,
}

pub use super::conflict::Conflict;

/// What `migrate` will do, step by step, and why it would refuse.
#[derive(Debug, Default)]
pub struct Plan {
    /// Who `migrate` runs as, and where.
    pub login: String,
    /// What will be created, kept or changed, one line each.
    pub steps: Vec<String>,
    /// Why `migrate` refuses; empty when it may proceed.
    pub conflicts: Vec<Conflict>,
    /// Migrations not yet recorded, `version description`.
    pub pending: Vec<String>,
    /// The app's own `rag_embeddings`, to be attached in place ([`super::adopt`]).
    pub adopt: Option<super::adopt::AppTable>,
}

impl Plan {
    /// The refusal `migrate` prints, or `None` when it may proceed.
    pub fn refusal(&self) -> Option<String> {
        if self.conflicts.is_empty() {
            return None;
        }
        let mut s = format!(
            "migrate refused: {} conflict{} between this database and what embed-worker needs; \
             nothing was changed.\n",
            self.conflicts.len(),
            if self.conflicts.len() == 1 { "" } else { "s" }
        );
        for c in &self.conflicts {
            s.push_str(&format!("  - {c}\n"));
        }
        s.push_str(
            "`embed-worker migrate --plan` prints the whole plan without changing anything.",
        );
        Some(s)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan for {}:", self.login)?;
        for s in &self.steps {
            writeln!(f, "  {s}")?;
        }
        if self.pending.is_empty() {
            writeln!(
                f,
                "  migrations: all {} applied",
                super::MIGRATOR.iter().count()
            )?;
        } else {
            let how = if self.adopt.is_some() {
                "in one transaction with the attach (the app reads its table until the commit; \
                 a run stopped before it leaves the table as it was, its preparation kept and \
                 repeated)"
            } else {
                "each in its own transaction (a run stopped at any point resumes after the last \
                 one recorded)"
            };
            writeln!(
                f,
                "  migrations: {} of {} to apply, {how}:",
                self.pending.len(),
                super::MIGRATOR.iter().count()
            )?;
            for p in &self.pending {
                writeln!(f, "    {p}")?;
            }
        }
        if self.conflicts.is_empty() {
            writeln!(f, "  conflicts: none")
        } else {
            writeln!(
                f,
                "  conflicts ({}), so `migrate` refuses:",
                self.conflicts.len()
            )?;
            for c in &self.conflicts {
                writeln!(f, "    - {c}")?;
            }
            Ok(())
        }
    }
}

/// Reads the catalog and decides. Changes nothing (only SELECTs).
pub async fn plan(
    conn: &mut PgConnection,
    render: &RenderSettings,
    model: &str,
    dimensions: usize,
) -> anyhow::Result<Plan> {
    let mut plan = Plan::default();
    let (user, db, superuser, createrole, can_create): (String, String, bool, bool, bool) =
        sqlx::query_as(
            "SELECT current_user::text, current_database()::text, r.rolsuper, r.rolcreaterole,
                    has_database_privilege(current_database(), 'CREATE')
               FROM pg_roles r WHERE r.rolname = current_user",
        )
        .fetch_one(&mut *conn)
        .await?;
    plan.login = format!(
        "database {db} as {user} (superuser {}, createrole {})",
        yes(superuser),
        yes(createrole)
    );

    // The extension.
    let (installed, available, trusted): (Option<String>, Option<String>, Option<bool>) =
        sqlx::query_as(
            "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
                    a.default_version, v.trusted
               FROM (SELECT 1) one
               LEFT JOIN pg_available_extensions a ON a.name = 'vector'
               LEFT JOIN pg_available_extension_versions v
                      ON v.name = 'vector' AND v.version = a.default_version",
        )
        .fetch_one(&mut *conn)
        .await?;
    match (installed, available) {
        (Some(v), _) => plan.steps.push(format!("extension vector {v}: present")),
        (None, None) => plan.conflicts.push(Conflict {
            place: "extension vector".into(),
            found: "not installed on this server".into(),
            needed: "pgvector (on a managed PostgreSQL it is listed as `vector`)".into(),
        }),
        (None, Some(v)) if superuser || (trusted == Some(true) && can_create) => plan
            .steps
            .push(format!("extension vector {v}: CREATE EXTENSION")),
        (None, Some(_)) => plan.conflicts.push(Conflict {
            place: "extension vector".into(),
            found: format!("not created in {db}, and {user} may not create it"),
            needed: "a superuser runs `CREATE EXTENSION vector;` in this database first".into(),
        }),
    }

    // The schema and the roles.
    let schema: bool = sqlx::query_scalar("SELECT to_regnamespace('embed_worker') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if schema {
        plan.steps.push("schema embed_worker: present".into());
    } else if can_create {
        plan.steps.push("schema embed_worker: create".into());
    } else {
        plan.conflicts.push(Conflict {
            place: "schema embed_worker".into(),
            found: format!("absent, and {user} has no CREATE on database {db}"),
            needed: format!("`GRANT CREATE ON DATABASE {db} TO {user};`"),
        });
    }
    let apalis: bool = sqlx::query_scalar("SELECT to_regnamespace('apalis') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    plan.steps.push(format!(
        "schema apalis (apalis-postgres's queue, its own migrations): {}",
        if apalis {
            "present, migrations it lacks applied"
        } else {
            "create"
        }
    ));
    let missing_roles: Vec<String> = sqlx::query_scalar(
        "SELECT r FROM unnest(ARRAY['embed_worker', 'app_user']) r
          WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)",
    )
    .fetch_all(&mut *conn)
    .await?;
    if missing_roles.is_empty() {
        plan.steps
            .push("roles embed_worker, app_user: present".into());
    } else if superuser || createrole {
        plan.steps.push(format!(
            "roles {}: create (NOLOGIN)",
            missing_roles.join(", ")
        ));
    } else {
        plan.conflicts.push(Conflict {
            place: format!("roles {}", missing_roles.join(", ")),
            found: format!("absent, and {user} has no CREATEROLE"),
            needed: "a role with CREATEROLE runs `migrate`, or creates them first (NOLOGIN)".into(),
        });
    }

    // ENUMs.
    let types: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT t.typname::text, t.typtype::text,
                coalesce(array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                         FILTER (WHERE e.enumlabel IS NOT NULL), '{}')
           FROM pg_type t LEFT JOIN pg_enum e ON e.enumtypid = t.oid
          WHERE t.typnamespace = 'public'::regnamespace AND t.typname = ANY($1)
          GROUP BY 1, 2",
    )
    .bind(ENUMS.iter().map(|(n, _)| *n).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let types: BTreeMap<String, (String, Vec<String>)> =
        types.into_iter().map(|(n, t, l)| (n, (t, l))).collect();
    for (name, labels) in ENUMS {
        match types.get(*name) {
            None => plan.steps.push(format!("type {name}: create")),
            Some((t, _)) if t != "e" => plan.conflicts.push(Conflict {
                place: format!("type {name}"),
                found: "exists and is not an ENUM".into(),
                needed: "an ENUM of that name, or none (the worker creates it)".into(),
            }),
            Some((_, have)) => {
                let missing: Vec<&str> = labels
                    .iter()
                    .copied()
                    .filter(|l| !have.iter().any(|h| h == l))
                    .collect();
                if missing.is_empty() {
                    plan.steps
                        .push(format!("type {name}: present ({}), kept", have.join(", ")));
                } else {
                    plan.conflicts.push(Conflict {
                        place: format!("type {name}"),
                        found: format!("an ENUM with labels {}", have.join(", ")),
                        needed: format!(
                            "the labels {} too (`ALTER TYPE {name} ADD VALUE '…'`, by the app)",
                            missing.join(", ")
                        ),
                    });
                }
            }
        }
    }

    // What the worker has already applied.
    let applied: BTreeSet<i64> = sqlx::query_scalar(
        "SELECT version FROM public._sqlx_migrations
          WHERE to_regclass('public._sqlx_migrations') IS NOT NULL AND success",
    )
    .fetch_all(&mut *conn)
    .await
    .or_else(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        _ => Err(e),
    })?
    .into_iter()
    .collect();
    let ours = applied.contains(&FIRST_VERSION);
    plan.pending = super::MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();

    // The app's tables.
    for (ty, needs, kept) in [
        (
            SourceType::Session,
            SESSIONS,
            "kept; adds triggers (updated_at, change capture, deleting its embeddings) and \
             SELECT for embed_worker; row-level security left as it is",
        ),
        (
            SourceType::Template,
            TEMPLATES,
            "kept; adds triggers (updated_at, change capture, deleting its embeddings), \
             SELECT for embed_worker and app_user, and turns row-level security on with \
             policies for app_user (enabled templates) and embed_worker",
        ),
    ] {
        let table = ty.table();
        let (key, format) = super::render::format_of(render, ty);
        let fields = render_fields(format);
        let Some(t) = table_of(conn, table).await? else {
            plan.steps.push(format!("table {table}: create"));
            plan.steps.push(format!(
                "change capture on {table}: fires when {} change ({key})",
                fields.join(", ")
            ));
            continue;
        };
        let columns = columns_of(conn, table).await?;
        check_columns(&mut plan, table, &columns, needs);
        if ty == SourceType::Session {
            let owner = &render.session_owner;
            check_owner_column(&mut plan, &columns, owner);
            if owner != "user_id"
                && !columns.iter().any(|c| c.name == "user_id")
                && super::render::needs_owner_alias(conn).await?
            {
                plan.steps.push(format!(
                    "  adds sessions.user_id, a placeholder (nullable: catalog only, no \
                     rewrite) for migrations 1, 2 and 13, which read that column; the worker's \
                     checks are then pointed at {owner}, the placeholder dropped, and \
                     idx_sessions_user_id built on ({owner}) CONCURRENTLY"
                ));
            }
        }
        for f in &fields {
            if !columns.iter().any(|c| c.name == *f) {
                plan.conflicts.push(Conflict {
                    place: format!("{table}.{f}"),
                    found: "no such column".into(),
                    needed: format!(
                        "{key} names {{{f}}}: set it to the app's columns (EMBED_WORKER__{}; \
                         this table has {})",
                        key.replace('.', "__").to_uppercase(),
                        columns
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        check_owner(&mut plan, table, &t, &user);
        plan.steps.push(format!(
            "table {table}: present ({}, owner {}), {kept}",
            rows(&t),
            t.owner
        ));
        if ty == SourceType::Session && !t.rls {
            plan.steps.push(
                "  note: row-level security is off on sessions, and app_user is granted SELECT \
                 on it: that role would read every user's sessions. `verify` fails until the \
                 owner turns it on, and prints the statements"
                    .into(),
            );
        }
        plan.steps.push(format!(
            "change capture on {table}: fires when {} change ({key})",
            fields.join(", ")
        ));
    }

    match table_of(conn, "rag_embeddings").await? {
        None => plan
            .steps
            .push("table rag_embeddings: create, LIST-partitioned by embedding_model".into()),
        Some(t) if ours => {
            check_owner(&mut plan, "rag_embeddings", &t, &user);
            plan.steps.push(format!(
                "table rag_embeddings: the worker's ({})",
                if t.kind == "p" {
                    "partitioned by model"
                } else {
                    "one table; migration 13 moves it into one partition per model"
                }
            ));
        }
        Some(t) if t.kind == "r" => {
            check_owner(&mut plan, "rag_embeddings", &t, &user);
            let (app, conflicts) = super::adopt::inspect(conn, model, dimensions).await?;
            plan.conflicts.extend(conflicts);
            plan.steps.extend(super::adopt::steps(&app));
            plan.adopt = Some(app);
        }
        Some(t) => {
            let columns = columns_of(conn, "rag_embeddings").await?;
            check_app_embeddings(&mut plan, &columns, &t);
        }
    }
    Ok(plan)
}

/// The app's own partitioned `rag_embeddings`: every column the worker would need, then the
/// step this version cannot take (a plain table is adopted; a partitioned one is not).
fn check_app_embeddings(plan: &mut Plan, columns: &[Column], t: &Table) {
    let needs = [
        Need {
            column: "source_type",
            kind: Kind::Label,
            why: "which table the source is in ('session' or 'template')",
        },
        Need {
            column: "source_id",
            kind: Kind::Uuid,
            why: "the source row's id",
        },
    ];
    check_columns(plan, "rag_embeddings", columns, &needs);
    match columns.iter().find(|c| c.name == "embedding") {
        None => plan.conflicts.push(Conflict {
            place: "rag_embeddings.embedding".into(),
            found: "no such column".into(),
            needed: "vector (pgvector), the embedding".into(),
        }),
        Some(c) if c.type_name != "vector" => plan.conflicts.push(Conflict {
            place: "rag_embeddings.embedding".into(),
            found: format!("of type {}", c.shown),
            needed: "vector (pgvector): another type cannot be searched by its index".into(),
        }),
        Some(_) => {}
    }
    plan.conflicts.push(Conflict {
        place: "table rag_embeddings".into(),
        found: format!(
            "the app's own ({}, {}, not made by embed-worker)",
            if t.kind == "p" {
                "partitioned"
            } else {
                "one table"
            },
            rows(t)
        ),
        needed: "a plain table (adopted in place as its model's partition); a partitioned one \
                 of the app's own is not adopted: embed-worker needs a database without it or \
                 with its own"
            .into(),
    });
}

/// `render.session_owner`: a uuid column of the app's sessions.
fn check_owner_column(plan: &mut Plan, columns: &[Column], owner: &str) {
    let found = match columns.iter().find(|c| c.name == owner) {
        None => "no such column".to_string(),
        Some(c) if c.type_name == "uuid" => return,
        Some(c) => format!("of type {}", c.shown),
    };
    plan.conflicts.push(Conflict {
        place: format!("sessions.{owner}"),
        found,
        needed: format!(
            "uuid, the owner (auth.uid()), named by render.session_owner \
             (EMBED_WORKER__RENDER__SESSION_OWNER; this table has {})",
            columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    });
}

fn check_columns(plan: &mut Plan, table: &str, columns: &[Column], needs: &[Need]) {
    for n in needs {
        match columns.iter().find(|c| c.name == n.column) {
            None => plan.conflicts.push(Conflict {
                place: format!("{table}.{}", n.column),
                found: "no such column".into(),
                needed: format!("{}, {}", n.kind.describe(), n.why),
            }),
            Some(c) if !n.kind.accepts(c) => plan.conflicts.push(Conflict {
                place: format!("{table}.{}", n.column),
                found: format!("of type {}", c.shown),
                needed: format!("{}, {}", n.kind.describe(), n.why),
            }),
            Some(_) => {}
        }
    }
}

fn check_owner(plan: &mut Plan, table: &str, t: &Table, user: &str) {
    if !t.owned {
        plan.conflicts.push(Conflict {
            place: format!("table {table}"),
            found: format!(
                "owned by {}, and {user} is not a member of that role",
                t.owner
            ),
            needed: format!(
                "its owner: triggers and row-level security are changed only by the owner \
                 (run `migrate` as {}, or `GRANT {} TO {user};`)",
                t.owner, t.owner
            ),
        });
    }
}

async fn table_of(conn: &mut PgConnection, table: &str) -> sqlx::Result<Option<Table>> {
    sqlx::query_as(
        "SELECT c.relkind::text AS kind, pg_get_userbyid(c.relowner)::text AS owner,
                pg_has_role(c.relowner, 'MEMBER') AS owned, c.relrowsecurity AS rls,
                CASE WHEN c.relkind = 'p'
                     THEN (SELECT coalesce(sum(greatest(p.reltuples, 0)), 0)::bigint
                             FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
                            WHERE i.inhparent = c.oid)
                     WHEN c.reltuples >= 0 THEN c.reltuples::bigint END AS rows
           FROM pg_class c
          WHERE c.relnamespace = 'public'::regnamespace AND c.relname = $1",
    )
    .bind(table)
    .fetch_optional(&mut *conn)
    .await
}

fn rows(t: &Table) -> String {
    match t.rows {
        Some(n) => format!("about {n} rows"),
        None => "rows not yet counted by ANALYZE".into(),
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
