//! What the app's role can reach: exactly the intended functions and tables, nothing more.

use crate::helpers::*;
use uuid::Uuid;

/// Runs `sql` as `app_user` for a user; returns the error text, if any.
async fn run_as_app_user(t: &TestDb, sql: &str) -> Result<(), String> {
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL ROLE app_user; SELECT set_config('request.jwt.claim.sub', '{}', true);",
        Uuid::new_v4()
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    if r.is_ok() {
        tx.commit().await.unwrap();
    }
    r
}

#[tokio::test]
async fn the_app_role_reaches_exactly_the_intended_functions_and_tables() {
    let t = TestDb::migrated().await;
    // Every function app_user can call (schema USAGE and EXECUTE), extensions' own aside.
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
            AND has_schema_privilege('app_user', n.oid, 'USAGE')
            AND has_function_privilege('app_user', p.oid, 'EXECUTE')
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')
          ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        functions,
        vec![
            "auth.uid()",
            "embed_worker.check_placeholders(text,jsonb)",
            "embed_worker.enqueue(embedding_source,uuid,text)",
            "embed_worker.enqueue_many(embedding_source[],uuid[],text,integer,integer)",
        ],
        "app_user can call exactly these"
    );
    // Every table, view and sequence app_user holds any privilege on.
    let relations: Vec<String> = sqlx::query_scalar(
        "SELECT c.oid::regclass::text || ' ' || p.priv FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) AS p(priv)
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
            AND c.relkind IN ('r', 'v', 'm', 'S', 'p')
            AND has_schema_privilege('app_user', n.oid, 'USAGE')
            AND has_table_privilege('app_user', c.oid, p.priv)
          ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        relations,
        vec![
            "question_templates SELECT",
            "rag_embeddings SELECT",
            "sessions SELECT"
        ]
    );

    // The spend functions that any role could call before.
    for sql in [
        "SELECT * FROM embed_worker.reserve_spend('m', 1000000)",
        "SELECT * FROM embed_worker.settle_spend(current_date, 'm', 0, -5, 0)",
        "SELECT apalis.get_jobs('w', 'embed', 10)",
        "SELECT count(*) FROM apalis.jobs",
    ] {
        let err = run_as_app_user(&t, sql).await.unwrap_err();
        assert!(err.contains("permission denied"), "{sql}: {err}");
    }
    // What the README tells the app to call works, without any right on the apalis schema.
    let id = insert_session(&t.admin, Uuid::new_v4(), "x", "y").await;
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&t.admin)
        .await
        .unwrap();
    run_as_app_user(
        &t,
        &format!("SELECT embed_worker.enqueue('session', '{id}')"),
    )
    .await
    .unwrap();
    run_as_app_user(
        &t,
        &format!(
            "SELECT embed_worker.enqueue_many(ARRAY['session']::embedding_source[], ARRAY['{}']::uuid[])",
            Uuid::new_v4()
        ),
    )
    .await
    .unwrap();
    let queued: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE status = 'Pending'",
    )
    .await;
    assert_eq!(queued, 2);
    let err = run_as_app_user(
        &t,
        &format!("SELECT embed_worker.enqueue_many(ARRAY['session']::embedding_source[], ARRAY['{id}']::uuid[], 'embed', 100000)"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("max_attempts must be 1..100"), "{err}");
    // Even the worker's own role cannot make the month's spend negative.
    let worker = t.worker_pool().await;
    let err = sqlx::query("SELECT * FROM embed_worker.settle_spend(current_date, 'm', 0, -5, 0)")
        .execute(&worker)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must be finite and >= 0"), "{err}");
}
