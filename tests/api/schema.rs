//! The reviewed schema on a real PostgreSQL 18 + pgvector: orphans, cascades, enums,
//! placeholders, RLS, idempotent migrations and `verify`.

use crate::helpers::*;
use uuid::Uuid;

/// A migrated database where the tests' 3-dimensional `test-model` has its partition.
async fn migrated_with_test_model() -> TestDb {
    let t = TestDb::migrated().await;
    embed_worker::model_index::lifecycle::ensure(&t.admin, &spec("test-model", 3))
        .await
        .unwrap();
    t
}

async fn insert_embedding(
    pool: &sqlx::PgPool,
    source_type: &str,
    source_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
         VALUES ($1::embedding_source, $2, 0, 'h', '{}', 'test-model', 3, 5)",
        vector_literal(3)
    )))
    .bind(source_type)
    .bind(source_id)
    .execute(pool)
    .await
    .map(|_| ())
}

async fn insert_template(
    pool: &sqlx::PgPool,
    body: &str,
    placeholders: serde_json::Value,
    enabled: bool,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO question_templates (focus, depth, category, body, placeholders, enabled)
         VALUES ('harmony', 'deep', 'technical', $1, $2, $3) RETURNING id",
    )
    .bind(body)
    .bind(placeholders)
    .bind(enabled)
    .fetch_one(pool)
    .await
}

#[tokio::test]
async fn orphan_embeddings_are_rejected_and_valid_ones_accepted() {
    let t = migrated_with_test_model().await;
    let worker = t.worker_pool().await;
    let ghost = Uuid::new_v4();
    let err = insert_embedding(&worker, "session", ghost)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "Invalid source_id: session {ghost} does not exist"
        )),
        "{err}"
    );
    let err = insert_embedding(&worker, "template", ghost)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "Invalid source_id: template {ghost} does not exist"
        )),
        "{err}"
    );

    let session = insert_session(&t.admin, Uuid::new_v4(), "t", "n").await;
    insert_embedding(&worker, "session", session).await.unwrap();
    let template = insert_template(
        &t.admin,
        "plain",
        serde_json::json!({"placeholders": []}),
        true,
    )
    .await
    .unwrap();
    insert_embedding(&worker, "template", template)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn deleting_a_source_deletes_its_embeddings() {
    let t = migrated_with_test_model().await;
    let worker = t.worker_pool().await;
    let s1 = insert_session(&t.admin, Uuid::new_v4(), "a", "n").await;
    let s2 = insert_session(&t.admin, Uuid::new_v4(), "b", "n").await;
    let tpl = insert_template(
        &t.admin,
        "plain",
        serde_json::json!({"placeholders": []}),
        true,
    )
    .await
    .unwrap();
    for (ty, id) in [("session", s1), ("session", s2), ("template", tpl)] {
        insert_embedding(&worker, ty, id).await.unwrap();
    }
    sqlx::query("DELETE FROM sessions WHERE id = $1")
        .bind(s1)
        .execute(&t.admin)
        .await
        .unwrap();
    sqlx::query("DELETE FROM question_templates WHERE id = $1")
        .bind(tpl)
        .execute(&t.admin)
        .await
        .unwrap();
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT source_id FROM rag_embeddings")
        .fetch_all(&t.admin)
        .await
        .unwrap();
    assert_eq!(left, vec![s2]);
}

#[tokio::test]
async fn enums_reject_capitalised_values() {
    let t = migrated_with_test_model().await;
    let err = sqlx::query("INSERT INTO sessions (user_id, focus) VALUES ($1, 'Harmony')")
        .bind(Uuid::new_v4())
        .execute(&t.admin)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid input value for enum interview_focus"),
        "{err}"
    );
    sqlx::query("INSERT INTO sessions (user_id, focus) VALUES ($1, 'harmony')")
        .bind(Uuid::new_v4())
        .execute(&t.admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn placeholders_are_validated_in_the_database() {
    let t = migrated_with_test_model().await;
    let ok = serde_json::json!({"placeholders": [
        {"key": "chord", "description": "A chord", "type": "chord", "required": true, "example": "G7"}]});
    insert_template(&t.admin, "Voice {chord} three ways", ok, true)
        .await
        .unwrap();

    let unknown_type = serde_json::json!({"placeholders": [
        {"key": "chord", "description": "A chord", "type": "colour", "required": true}]});
    let err = insert_template(&t.admin, "Voice {chord}", unknown_type, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown type colour"), "{err}");

    let missing_key = serde_json::json!({"placeholders": [
        {"key": "scale", "description": "A scale", "type": "scale", "required": true}]});
    let err = insert_template(&t.admin, "Voice {chord}", missing_key, true)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("{scale} does not appear in the body"),
        "{err}"
    );

    let not_structured = serde_json::json!(["chord"]);
    let err = insert_template(&t.admin, "Voice {chord}", not_structured, true)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("expected {\"placeholders\""),
        "{err}"
    );
}

/// Runs `sql` as `app_user` with `auth.uid()` = `user`, returning source ids.
async fn as_app_user(t: &TestDb, user: Option<Uuid>, sql: &'static str) -> Vec<Uuid> {
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE app_user")
        .execute(&mut *tx)
        .await
        .unwrap();
    if let Some(u) = user {
        sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, true)")
            .bind(u.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let mut ids: Vec<Uuid> = sqlx::query_scalar(sql).fetch_all(&mut *tx).await.unwrap();
    ids.sort();
    ids
}

#[tokio::test]
async fn rls_users_see_only_their_own_session_embeddings() {
    let t = migrated_with_test_model().await;
    let worker = t.worker_pool().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let sa = insert_session(&t.admin, a, "a", "n").await;
    let sb = insert_session(&t.admin, b, "b", "n").await;
    let on = insert_template(
        &t.admin,
        "on",
        serde_json::json!({"placeholders": []}),
        true,
    )
    .await
    .unwrap();
    let off = insert_template(
        &t.admin,
        "off",
        serde_json::json!({"placeholders": []}),
        false,
    )
    .await
    .unwrap();
    for (ty, id) in [
        ("session", sa),
        ("session", sb),
        ("template", on),
        ("template", off),
    ] {
        insert_embedding(&worker, ty, id).await.unwrap();
    }

    let emb = "SELECT source_id FROM rag_embeddings";
    let mut want_a = vec![sa, on, off];
    want_a.sort();
    assert_eq!(
        as_app_user(&t, Some(a), emb).await,
        want_a,
        "A sees A's sessions and all template embeddings"
    );
    assert!(
        !as_app_user(&t, Some(a), emb).await.contains(&sb),
        "never B's"
    );
    let mut want_b = vec![sb, on, off];
    want_b.sort();
    assert_eq!(as_app_user(&t, Some(b), emb).await, want_b);

    let tpl = "SELECT id FROM question_templates";
    assert_eq!(
        as_app_user(&t, None, tpl).await,
        Vec::<Uuid>::new(),
        "no user, no templates"
    );
    assert_eq!(
        as_app_user(&t, Some(a), tpl).await,
        vec![on],
        "disabled templates hidden"
    );
    let no_user_sessions: Vec<Uuid> = as_app_user(
        &t,
        None,
        "SELECT source_id FROM rag_embeddings WHERE source_type = 'session'",
    )
    .await;
    assert!(no_user_sessions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op() {
    let t = TestDb::empty().await;
    let migrate = || {
        let out = worker_command(&t, "http://127.0.0.1:9/v1")
            .arg("migrate")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    migrate();
    let first = catalog(&t).await;
    assert!(first.len() > 100, "{first:?}");
    migrate();
    let second = catalog(&t).await;
    let changed: Vec<_> = first
        .iter()
        .filter(|l| !second.contains(l))
        .chain(second.iter().filter(|l| !first.contains(l)))
        .collect();
    assert!(
        changed.is_empty(),
        "the second migrate changed: {changed:#?}"
    );
}

/// What `migrate` makes, one line each: functions (body, settings, rights), triggers (and
/// whether enabled), relations (options, rights), columns, indexes, policies, and the rows of
/// the registry, queues and budget.
async fn catalog(t: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname IN ('public', 'embed_worker', 'apalis'))
         SELECT 'fn ' || p.oid::regprocedure || ' ' || md5(p.prosrc) || ' ' || p.prosecdef
                || ' ' || coalesce(p.proconfig::text, '') || ' ' || coalesce(p.proacl::text, '')
           FROM pg_proc p WHERE p.pronamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'trigger ' || pg_get_triggerdef(g.oid) || ' ' || g.tgenabled::text
           FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
          WHERE NOT g.tgisinternal AND c.relnamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'rel ' || c.oid::regclass || ' ' || c.relkind::text || ' ' || c.relrowsecurity
                || ' ' || coalesce(c.reloptions::text, '') || ' ' || coalesce(c.relacl::text, '')
           FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'col ' || a.attrelid::regclass || '.' || a.attname || ' '
                || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          WHERE c.relnamespace IN (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
         UNION ALL
         SELECT 'index ' || pg_get_indexdef(i.indexrelid) || ' ' || i.indisvalid
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
          WHERE c.relnamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'policy ' || pol.polrelid::regclass || ' ' || pol.polname || ' '
                || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '') || ' '
                || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), '') || ' ' || pol.polroles::text
           FROM pg_policy pol
         UNION ALL
         SELECT 'model ' || m::text FROM embed_worker.models m
         UNION ALL
         SELECT 'queue ' || q::text FROM embed_worker.queues q
         UNION ALL
         SELECT 'budget ' || b::text FROM embed_worker.budget b
         ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrate_works_where_the_app_already_has_sessions_and_enums() {
    let t = TestDb::empty().await;
    sqlx::raw_sql(
        "CREATE TYPE interview_focus AS ENUM ('harmony', 'rhythm', 'technique');
         CREATE TYPE interview_depth AS ENUM ('quick', 'standard', 'deep');
         CREATE TABLE sessions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
             focus interview_focus, depth interview_depth, title text, notes text, transcript text,
             mood text, created_at timestamptz NOT NULL DEFAULT now(),
             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO sessions (user_id, focus, title, mood)
             VALUES ('00000000-0000-0000-0000-000000000001', 'rhythm', 'existing', 'good');",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    migrate_as_the_cli(&t).await;
    let (title, mood): (String, String) = sqlx::query_as("SELECT title, mood FROM sessions")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(
        (title.as_str(), mood.as_str()),
        ("existing", "good"),
        "the app's table and data are kept"
    );
    let rls: bool =
        sqlx::query_scalar("SELECT relrowsecurity FROM pg_class WHERE oid = 'sessions'::regclass")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert!(!rls, "the app's table is left alone");
    let settings = embed_worker::config::Settings::load(None).unwrap();
    let report = embed_worker::verify::verify(&t.admin, &settings)
        .await
        .unwrap();
    assert_eq!(
        report.problems.len(),
        1,
        "only the app's open sessions table: {:?}",
        report.problems
    );
    let problem = &report.problems[0];
    assert!(
        problem.contains("row-level security is off on sessions")
            && problem.contains("ENABLE ROW LEVEL SECURITY"),
        "names the table and the fix: {problem}"
    );

    // The fix the message gives makes verify clean, and the app's rows stay readable by the worker.
    let fix = problem
        .split_once("Fix (as the table's owner): ")
        .unwrap()
        .1;
    sqlx::raw_sql(sqlx::AssertSqlSafe(fix.to_string()))
        .execute(&t.admin)
        .await
        .unwrap();
    let report = embed_worker::verify::verify(&t.admin, &settings)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let worker = t.worker_pool().await;
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&worker)
        .await
        .unwrap();
    assert_eq!(seen, 1);
}

#[tokio::test]
async fn a_user_reads_only_their_own_sessions_and_the_app_role_cannot_write_or_see_the_queue() {
    let t = migrated_with_test_model().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let sa = insert_session(&t.admin, a, "a", "a's private notes").await;
    let sb1 = insert_session(&t.admin, b, "b1", "b's private notes").await;
    let sb2 = insert_session(&t.admin, b, "b2", "more of b's notes").await;
    let worker = t.worker_pool().await;
    for id in [sa, sb1, sb2] {
        insert_embedding(&worker, "session", id).await.unwrap();
    }

    assert_eq!(
        as_app_user(&t, Some(a), "SELECT id FROM sessions").await,
        vec![sa]
    );
    let mut want_b = vec![sb1, sb2];
    want_b.sort();
    assert_eq!(
        as_app_user(&t, Some(b), "SELECT id FROM sessions").await,
        want_b
    );
    assert!(
        as_app_user(&t, None, "SELECT id FROM sessions")
            .await
            .is_empty(),
        "no user, no sessions"
    );
    assert_eq!(
        as_app_user(
            &t,
            Some(a),
            "SELECT source_id FROM rag_embeddings WHERE source_type = 'session'"
        )
        .await,
        vec![sa],
        "none of B's embeddings"
    );

    // The worker's role still reads every session it must embed.
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&worker)
        .await
        .unwrap();
    assert_eq!(seen, 3);

    for (sql, what) in [
        (
            "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                         embedding_model, dimensions, token_count)
             SELECT 'session', id, 9, 'h', '[1,0,0]', 'test-model', 3, 1 FROM sessions",
            "write rag_embeddings",
        ),
        ("UPDATE rag_embeddings SET token_count = 0", "update rag_embeddings"),
        ("DELETE FROM rag_embeddings", "delete rag_embeddings"),
        ("SELECT count(*) FROM apalis.jobs", "read apalis.jobs"),
        ("UPDATE sessions SET notes = 'x'", "write sessions"),
    ] {
        let err = app_user_statement(&t, a, sql).await.unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "app_user must not {what}: {err}"
        );
    }
}

#[tokio::test]
async fn verify_passes_on_the_schema_and_fails_on_ivfflat() {
    let t = migrated_with_test_model().await;
    migrate_as_the_cli(&t).await;
    let settings = embed_worker::config::Settings::load(None).unwrap();
    let default_index = spec("text-embedding-ada-002", 1536);
    let report = embed_worker::verify::verify(&t.admin, &settings)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let ix = report
        .indexes
        .iter()
        .find(|i| default_index.matches(i))
        .expect("default index listed");
    assert_eq!(ix.access_method, "hnsw");
    assert!(
        ix.options.contains(&"m=16".to_string())
            && ix.options.contains(&"ef_construction=64".to_string())
    );

    sqlx::raw_sql(
        "CREATE INDEX bad_ivf ON rag_embeddings USING ivfflat ((embedding::vector(3)) vector_cosine_ops)
         WITH (lists = 1) WHERE embedding_model = 'x'",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    let report = embed_worker::verify::verify(&t.admin, &settings)
        .await
        .unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("bad_ivf") && p.contains("IVFFlat")),
        "{:?}",
        report.problems
    );

    sqlx::raw_sql("DROP INDEX bad_ivf; ALTER TABLE rag_embeddings DISABLE ROW LEVEL SECURITY")
        .execute(&t.admin)
        .await
        .unwrap();
    let report = embed_worker::verify::verify(&t.admin, &settings)
        .await
        .unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("row-level security is off")),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn seeding_templates_twice_changes_nothing() {
    let t = migrated_with_test_model().await;
    let seeds = embed_worker::seed::read_templates(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/templates.toml"
    )))
    .unwrap();
    assert_eq!(seeds.len(), 20);
    assert_eq!(
        embed_worker::seed::seed_templates(&t.admin, &seeds)
            .await
            .unwrap(),
        (20, 0)
    );
    let stamp: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(updated_at) FROM question_templates")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(
        embed_worker::seed::seed_templates(&t.admin, &seeds)
            .await
            .unwrap(),
        (0, 0)
    );
    let stamp2: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(updated_at) FROM question_templates")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(stamp, stamp2);
}
