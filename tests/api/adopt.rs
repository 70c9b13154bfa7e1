//! `migrate` on a database that is not a fresh one: it reads the catalog, prints its plan, and
//! refuses a database it cannot use with every conflict listed and nothing changed. The app's
//! schema is `tests/data/app_schema_0012_0014.sql`, written from the design review.

use std::process::{Command, Stdio};

use crate::helpers::*;

const APP_SCHEMA: &str = include_str!("../data/app_schema_0012_0014.sql");

async fn with_schema(sql: &str) -> TestDb {
    let t = TestDb::empty().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&t.admin)
        .await
        .unwrap();
    t
}

/// `migrate --plan` and `migrate` both refuse, naming each of `expected` (a conflict's place),
/// and the catalog and every table's rows are what they were.
async fn refused_untouched(t: &TestDb, expected: &[&str]) -> String {
    let before = whole_catalog(&t.admin).await;
    let (code, plan, _) = cli(t, &["migrate", "--plan"]);
    assert_eq!(code, 1, "--plan exits 1 on a conflict:\n{plan}");
    assert!(plan.contains("nothing changed (--plan)"), "{plan}");
    let (code, out, err) = cli(t, &["migrate"]);
    assert_ne!(code, 0, "migrate must refuse:\n{out}\n{err}");
    assert!(
        err.contains("nothing was changed"),
        "the refusal says so:\n{err}"
    );
    for place in expected {
        assert!(
            err.contains(&format!("  - {place}: ")),
            "the refusal names {place}:\n{err}"
        );
        assert!(
            plan.contains(&format!("    - {place}: ")),
            "the plan names {place}:\n{plan}"
        );
    }
    let listed = err.lines().filter(|l| l.starts_with("  - ")).count();
    assert_eq!(
        listed,
        expected.len(),
        "exactly the expected conflicts:\n{err}"
    );
    assert_eq!(
        whole_catalog(&t.admin).await,
        before,
        "a refused migrate changed the database"
    );
    err
}

#[tokio::test]
async fn the_reviews_schema_under_the_default_template_columns_is_refused_untouched() {
    // The app's rag_embeddings is adoptable; its templates keep their text in other columns
    // than render.template's default names.
    let t = with_schema(APP_SCHEMA).await;
    let err = refused_untouched(
        &t,
        &["question_templates.body", "question_templates.placeholders"],
    )
    .await;
    // What is there and what is needed, in the app's own terms.
    assert!(
        err.contains(
            "question_templates.body: no such column; needed: render.template names {body}"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn tables_the_worker_cannot_use_are_refused_untouched() {
    // No source_id; the embedding as real[]; a table of another shape altogether.
    let sessions = "CREATE EXTENSION IF NOT EXISTS vector;
        CREATE TABLE sessions (id uuid PRIMARY KEY, user_id uuid NOT NULL, focus text, depth text,
            title text, notes text, transcript text, updated_at timestamptz NOT NULL DEFAULT now());";
    let t = with_schema(&format!(
        "{sessions}
         CREATE TABLE rag_embeddings (id bigint PRIMARY KEY, source_type text NOT NULL,
             embedding vector(1536) NOT NULL);
         INSERT INTO rag_embeddings VALUES (1, 'session', array_fill(0.1::real, ARRAY[1536])::vector);"
    ))
    .await;
    let err = refused_untouched(&t, &["rag_embeddings.source_id"]).await;
    assert!(
        err.contains("rag_embeddings.source_id: no such column; needed: uuid"),
        "{err}"
    );

    let t = with_schema(&format!(
        "{sessions}
         CREATE TABLE rag_embeddings (id uuid PRIMARY KEY, source_type text NOT NULL,
             source_id uuid NOT NULL, embedding real[] NOT NULL);"
    ))
    .await;
    let err = refused_untouched(&t, &["rag_embeddings.embedding"]).await;
    assert!(
        err.contains("rag_embeddings.embedding: of type real[]"),
        "{err}"
    );

    let t = with_schema("CREATE TABLE rag_embeddings (id serial, doc text, vec real[]);").await;
    refused_untouched(
        &t,
        &[
            "rag_embeddings.id",
            "rag_embeddings.source_type",
            "rag_embeddings.source_id",
            "rag_embeddings.embedding",
        ],
    )
    .await;

    // A source_type ENUM of the app's without 'template'; two rows of one source.
    let t = with_schema(&format!(
        "{sessions}
         CREATE TYPE app_source AS ENUM ('session', 'note');
         CREATE TABLE rag_embeddings (id uuid PRIMARY KEY, source_type app_source NOT NULL,
             source_id uuid NOT NULL, embedding vector(3) NOT NULL);
         INSERT INTO rag_embeddings SELECT gen_random_uuid(), 'session', u, '[1,2,3]'
           FROM (SELECT gen_random_uuid() u) x, generate_series(1, 2);"
    ))
    .await;
    let err = refused_untouched(
        &t,
        &[
            "rag_embeddings.source_type",
            "rag_embeddings.embedding",
            "rag_embeddings.source_id",
        ],
    )
    .await;
    assert!(
        err.contains("rag_embeddings.source_type: ENUM app_source without 'template' (has session, note)")
            && err.contains("rag_embeddings.source_id: 1 sources with more than one row")
            && err.contains("rag_embeddings.embedding: vector(3) for text-embedding-ada-002; needed: model.dimensions = 1536"),
        "{err}"
    );
}

#[tokio::test]
async fn an_enum_without_the_workers_labels_and_a_table_of_another_owner_are_refused_untouched() {
    let t = with_schema(
        "CREATE TYPE embedding_source AS ENUM ('session');
         CREATE TABLE sessions (id uuid PRIMARY KEY, user_id uuid NOT NULL, focus text, depth text,
             title text, notes text, transcript text, updated_at timestamptz NOT NULL DEFAULT now());",
    )
    .await;
    let err = refused_untouched(&t, &["type embedding_source"]).await;
    assert!(
        err.contains("an ENUM with labels session; needed: the labels template too"),
        "{err}"
    );

    // The app's sessions belong to the app's role; migrate runs as another login.
    let owner = format!("app_{}", &t.name[2..14]);
    let login = format!("mig_{}", &t.name[2..14]);
    let t = with_schema(&format!(
        "CREATE EXTENSION IF NOT EXISTS vector;
         CREATE ROLE {owner} NOLOGIN;
         CREATE ROLE {login} LOGIN CREATEROLE;
         CREATE TABLE sessions (id uuid PRIMARY KEY, user_id uuid NOT NULL, focus text,
             depth text, title text, notes text, transcript text,
             updated_at timestamptz NOT NULL DEFAULT now());
         ALTER TABLE sessions OWNER TO {owner};"
    ))
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT CREATE ON DATABASE {} TO {login}; GRANT CREATE ON SCHEMA public TO {login};",
        t.name
    )))
    .execute(&t.admin)
    .await
    .unwrap();
    let as_login = TestDb {
        name: t.name.clone(),
        url: t.url.replacen("://postgres@", &format!("://{login}@"), 1),
        admin: t.admin.clone(),
    };
    let err = refused_untouched(&as_login, &["table sessions"]).await;
    assert!(
        err.contains(&format!(
            "table sessions: owned by {owner}, and {login} is not a member of that role"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn the_plan_changes_nothing_and_migrate_follows_it_on_a_fresh_database() {
    let t = TestDb::empty().await;
    let before = whole_catalog(&t.admin).await;
    let (code, plan, err) = cli(&t, &["migrate", "--plan"]);
    assert_eq!(code, 0, "{plan}\n{err}");
    let total = embed_worker::db::MIGRATOR.iter().count();
    assert!(
        plan.contains(&format!("migrations: {total} of {total} to apply")),
        "{plan}"
    );
    assert!(
        plan.contains("table rag_embeddings: create, LIST-partitioned"),
        "{plan}"
    );
    assert!(plan.contains("conflicts: none"), "{plan}");
    assert_eq!(
        whole_catalog(&t.admin).await,
        before,
        "--plan changed the database"
    );

    let (code, out, err) = cli(&t, &["migrate"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.starts_with("plan for database"),
        "migrate prints its plan first:\n{out}"
    );
    let (code, plan, err) = cli(&t, &["migrate", "--plan"]);
    assert_eq!(code, 0, "{plan}\n{err}");
    assert!(
        plan.contains(&format!("migrations: all {total} applied")),
        "{plan}"
    );
    assert!(
        plan.contains("table rag_embeddings: the worker's (partitioned by model)"),
        "{plan}"
    );
}

/// The review's sessions and templates (text in `question_text`, placeholders in `variables`),
/// without its rag_embeddings.
fn app_sources_only() -> String {
    format!(
        "{APP_SCHEMA}
         DROP TABLE rag_embeddings;
         DROP FUNCTION validate_rag_embedding_source();"
    )
}

const APP_TEMPLATE: &str =
    "Question ({category}, {focus}): {question_text}\nVariables: {variables}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_template_columns_are_served_by_configuration() {
    let t = with_schema(&app_sources_only()).await;
    let fake = fake(embed_worker::fake_openai::FakeConfig::default()).await;
    let cli = |args: &[&str], template: &str| {
        output(
            worker_command(&t, &fake.base_url())
                .env("EMBED_WORKER__RENDER__TEMPLATE", template)
                .args(args),
        )
    };

    // A column the table lacks: the plan names it and the table's columns; `run` stops on it.
    let (code, plan, _) = cli(&["migrate", "--plan"], "{question}");
    assert_eq!(code, 1, "{plan}");
    assert!(
        plan.contains("    - question_templates.question: no such column; needed: render.template names {question}")
            && plan.contains("this table has id, focus, depth, question_text, variables"),
        "{plan}"
    );

    let (code, out, err) = cli(&["migrate"], APP_TEMPLATE);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("change capture on question_templates fires on category, focus, question_text, variables"),
        "{out}"
    );

    let (app, worker): (bool, bool) = sqlx::query_as(
        "SELECT has_function_privilege('app_user', 'embed_worker.template_has_text(question_templates)', 'EXECUTE'),
                has_function_privilege('embed_worker', 'embed_worker.template_has_text(question_templates)', 'EXECUTE')",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        (app, worker),
        (false, true),
        "the re-made test is the worker's alone"
    );

    let (code, _, err) = cli(&["run", "--until-empty"], "{question}");
    assert_ne!(code, 0);
    assert!(
        err.contains(
            "render.template names {question}, but table question_templates has no column question"
        ),
        "{err}"
    );

    // Columns that exist but that capture was not made for: `run` asks for `migrate` first.
    let (code, _, err) = cli(&["run", "--until-empty"], "{question_text}");
    assert_ne!(code, 0);
    assert!(
        err.contains(
            "change capture on question_templates fires on category, focus, question_text, \
             variables, but render.template names question_text: run `embed-worker migrate`"
        ),
        "{err}"
    );

    // The text is the app's columns, its variables rendered as `key: description`.
    let mut s = t.settings();
    s.render.template = APP_TEMPLATE.into();
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM question_templates WHERE question_text LIKE '% bar 1?'")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    let source = embed_worker::source::EmbedSource {
        source_type: embed_worker::source::SourceType::Template,
        source_id: id,
    };
    let loaded = embed_worker::pipeline::load::load(&t.admin, &s.render, &[source])
        .await
        .unwrap();
    let text = &loaded[&source].text;
    assert_eq!(
        text,
        "Question (technical, harmony): How would you voice {chord} in bar 1?\nVariables: {chord}: placeholder for chord name"
    );

    // Capture fires on exactly those columns, and moves updated_at with them.
    sqlx::raw_sql(
        "UPDATE question_templates SET usage_count = usage_count + 1, last_used_at = now()",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await,
        0
    );
    let before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT updated_at FROM question_templates WHERE id = $1")
            .bind(id)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    sqlx::query(
        "UPDATE question_templates SET question_text = question_text || ' Why?' WHERE id = $1",
    )
    .bind(id)
    .execute(&t.admin)
    .await
    .unwrap();
    let after: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT updated_at FROM question_templates WHERE id = $1")
            .bind(id)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert!(after > before, "updated_at moved with the text");
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await,
        1
    );

    // Every source embedded, the template's vector made from that text.
    let (code, out, err) = cli(&["enqueue", "--all"], APP_TEMPLATE);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = cli(&["run", "--until-empty"], APP_TEMPLATE);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(
            &t.admin,
            "SELECT count(DISTINCT (source_type, source_id)) FROM rag_embeddings"
        )
        .await,
        50
    );
    let hash: String = sqlx::query_scalar(
        "SELECT content_hash FROM rag_embeddings WHERE source_type = 'template' AND source_id = $1",
    )
    .bind(id)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let now = embed_worker::pipeline::load::load(&t.admin, &s.render, &[source])
        .await
        .unwrap();
    assert!(
        now[&source]
            .text
            .ends_with("bar 1? Why?\nVariables: {chord}: placeholder for chord name")
    );
    assert_eq!(
        hash,
        embed_worker::pipeline::chunk::content_hash(
            &now[&source].text,
            &s.model.name,
            s.model.dimensions
        )
    );
}

#[tokio::test]
async fn migrate_killed_at_any_point_finishes_when_run_again() {
    // A reference: one uninterrupted migrate.
    let clean = TestDb::empty().await;
    let (code, out, err) = cli(&clean, &["migrate"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let want = catalog_shape(&clean.admin).await;

    let t = TestDb::empty().await;
    let total = embed_worker::db::MIGRATOR.iter().count() as i64;
    let applied = || async {
        let table: bool =
            sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
                .fetch_one(&t.admin)
                .await
                .unwrap();
        if table {
            count(
                &t.admin,
                "SELECT count(*) FROM public._sqlx_migrations WHERE success",
            )
            .await
        } else {
            0
        }
    };
    // SIGKILL as soon as `target` migrations are recorded (between two migrations, or in one),
    // the last one in the steps after the migrations (queue, capture, roles, the index).
    let mut partial = Vec::new();
    for target in [1, 3, 6, 9, 12, 15, total] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_embed-worker"))
            .env("DATABASE_URL", &t.url)
            .arg("migrate")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while applied().await < target && child.try_wait().unwrap().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        partial.push(applied().await);
    }
    assert!(
        partial.iter().any(|&n| n > 0 && n < total),
        "no kill landed before the last migration ({partial:?}); nothing was tested"
    );
    let (code, out, err) = cli(&t, &["migrate"]);
    assert_eq!(
        code, 0,
        "after kills at {partial:?} migrations applied:\n{out}\n{err}"
    );
    let got = catalog_shape(&t.admin).await;
    let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
    let lacking: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
    assert!(
        extra.is_empty() && lacking.is_empty(),
        "killed after {partial:?} of {total} migrations, then run again: not the clean \
         result.\nonly after the kills: {extra:#?}\nonly in the clean one: {lacking:#?}"
    );
}

/// The relfilenodes of the app's heap and HNSW index, by the name each has now.
async fn files(t: &TestDb, table: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT relfilenode::int8 FROM pg_class WHERE oid = to_regclass($1)),
                (SELECT relfilenode::int8 FROM pg_class WHERE oid = 'public.idx_rag_embeddings_vector'::regclass)",
    )
    .bind(format!("public.{table}"))
    .fetch_one(&t.admin)
    .await
    .unwrap()
}

/// (source id, vector as text) of every row of `model`, ordered.
async fn vectors(t: &TestDb) -> Vec<(uuid::Uuid, String)> {
    sqlx::query_as("SELECT source_id, embedding::text FROM rag_embeddings ORDER BY 1")
        .fetch_all(&t.admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_table_is_adopted_in_place_and_its_unchanged_vectors_cost_nothing() {
    let t = with_schema(APP_SCHEMA).await;
    let fake = fake(embed_worker::fake_openai::FakeConfig::default()).await;
    let cli = |args: &[&str]| {
        output(
            worker_command(&t, &fake.base_url())
                .env("EMBED_WORKER__RENDER__TEMPLATE", APP_TEMPLATE)
                .args(args),
        )
    };
    let model = "text-embedding-ada-002";
    let part = embed_worker::model_index::partition_name(model);
    let before_files = files(&t, "rag_embeddings").await;
    let before = vectors(&t).await;
    assert_eq!(before.len(), 40);
    // The app's vectors of sources not changed since: 30 sessions less the 5 edited, 10 templates.
    let unchanged: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT e.source_id, e.embedding::text FROM rag_embeddings e
          WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = e.source_id
                                                       AND s.updated_at > e.updated_at)
          ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(unchanged.len(), 35);

    // Before migrate, estimate says what adoption saves: 35 sources kept, 15 to embed.
    let (code, out, err) = cli(&["estimate"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("are kept at no cost: 35 sources, ")
            && out.contains("to embed (never embedded, or changed since): 15 sources, "),
        "{out}"
    );
    let (code, plan, err) = cli(&["migrate", "--plan"]);
    assert_eq!(code, 0, "{plan}\n{err}");
    assert!(
        plan.contains(
            "table rag_embeddings: the app's (40 rows of text-embedding-ada-002, 1536 \
             dimensions), adopted in place"
        ) && plan.contains("keeps its HNSW index idx_rag_embeddings_vector"),
        "{plan}"
    );
    let (code, out, err) = cli(&["migrate"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("index idx_rag_embeddings_vector ready"),
        "{out}"
    );

    // Attached, not copied or rebuilt: the same heap and index files, under the partition.
    assert_eq!(files(&t, &part).await, before_files);
    let (kind, parent): (String, String) = sqlx::query_as(
        "SELECT c.relkind::text, i.inhparent::regclass::text FROM pg_class c
           JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.oid = $1::regclass",
    )
    .bind(format!("public.{part}"))
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!((kind.as_str(), parent.as_str()), ("r", "rag_embeddings"));
    assert_eq!(
        count(
            &t.admin,
            "SELECT count(*) FROM pg_indexes WHERE indexdef LIKE '%USING hnsw%'"
        )
        .await,
        1,
        "no second HNSW index"
    );
    // The app's ids, extra columns and their values are read through rag_embeddings.
    assert_eq!(
        count(
            &t.admin,
            "SELECT count(*) FROM rag_embeddings WHERE content <> '' AND metadata = '{}'"
        )
        .await,
        40
    );

    // Changed (5) and never embedded (10) sources are billed; the 35 others cost nothing.
    let (code, out, err) = cli(&["enqueue-stale"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = cli(&["run", "--until-empty"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let inputs: usize = fake.requests().iter().map(|r| r.inputs).sum();
    assert_eq!(
        inputs, 15,
        "exactly the changed and missing sources are sent"
    );
    let after = vectors(&t).await;
    assert_eq!(after.len(), 50);
    for (id, v) in &unchanged {
        let now = after.iter().find(|(i, _)| i == id).unwrap();
        assert_eq!(&now.1, v, "adopted vector of {id} changed");
    }
    assert_eq!(
        count(
            &t.admin,
            "SELECT count(*) FROM rag_embeddings WHERE content_hash = '' OR token_count IS NULL"
        )
        .await,
        0,
        "every adopted vector verified: its hash and tokens recorded"
    );
    assert_eq!(files(&t, &part).await, before_files);
    let (code, out, err) = cli(&["status"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("adopted: the app's rag_embeddings, 40 vectors of text-embedding-ada-002")
            && out.contains("; 0 not yet verified by a run"),
        "{out}"
    );

    // verify names the app's index. The review's sessions have no row-level security, and
    // the worker's app_user may read them: verify says so and how to fix it, as the owner.
    let (code, out, err) = cli(&["verify"]);
    assert!(
        out.contains("idx_rag_embeddings_vector") && out.contains("vector (the column)"),
        "{out}"
    );
    let problems: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("verify: FAIL"))
        .collect();
    assert_eq!(problems.len(), 1, "{out}\n{err}");
    assert!(
        problems[0].contains("row-level security is off on sessions"),
        "{out}"
    );
    assert_ne!(code, 0);
    let fix = problems[0]
        .split("Fix (as the table's owner): ")
        .nth(1)
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(fix.to_string()))
        .execute(&t.admin)
        .await
        .unwrap();
    let (code, out, err) = cli(&["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");

    // The design's own checks on the adopted table: an orphan is refused; as the app's user,
    // only that user's session embeddings (and the templates') are visible.
    let orphan = sqlx::raw_sql(
        "INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding, dimensions,
                                     token_count)
         VALUES ('session', gen_random_uuid(), 'h', array_fill(0.1::real, ARRAY[1536])::vector,
                 1536, 1)",
    )
    .execute(&t.admin)
    .await;
    assert!(orphan.is_err(), "an orphan embedding was accepted");
    let user = "00000000-0000-0000-0000-000000000001";
    let seen: (i64, i64, i64) = {
        let mut tx = t.admin.begin().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL ROLE app_user; SELECT set_config('request.jwt.claim.sub', '{user}', true)"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        let seen = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE source_type = 'session'),
                    count(*) FILTER (WHERE source_type = 'session' AND source_id NOT IN
                                     (SELECT id FROM sessions WHERE user_id = $1::uuid)),
                    count(*) FILTER (WHERE source_type = 'template')
               FROM rag_embeddings",
        )
        .bind(user)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        seen
    };
    let own = count(
        &t.admin,
        "SELECT count(*) FROM sessions WHERE user_id = '00000000-0000-0000-0000-000000000001'",
    )
    .await;
    assert_eq!(
        seen,
        (own, 0, 10),
        "(own sessions, others' sessions, templates) seen"
    );
    // Search ranks through the app's index, and labels hits from the app's columns.
    let (code, out, err) = cli(&[
        "search",
        "How would you voice a chord in bar 3?",
        "--source-type",
        "template",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("through index idx_rag_embeddings_vector"),
        "{out}"
    );
    assert!(
        out.contains("[template harmony] Question (technical, harmony)"),
        "{out}"
    );
    // The statement search sends can use that index (40 rows: a scan and a sort are cheaper,
    // so both are turned off to see whether the index applies at all).
    let spec = embed_worker::model_index::IndexSpec::new(
        model,
        1536,
        embed_worker::config::IndexPrecision::Auto,
    )
    .unwrap();
    let sql = embed_worker::search::index_statement(&t.admin, &spec.model, 5, None)
        .await
        .unwrap();
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .bind(pgvector::Vector::from(vec![0.01f32; 1536]))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using idx_rag_embeddings_vector"),
        "{plan}"
    );
    tx.rollback().await.unwrap();
    // What the app reads to write its own query says the same: the plain column.
    let expression: String =
        sqlx::query_scalar("SELECT index_expression FROM embed_worker.serving_model()")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(expression, "embedding");

    // A second migrate changes nothing.
    let catalog = whole_catalog(&t.admin).await;
    let (code, out, err) = cli(&["migrate"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(whole_catalog(&t.admin).await, catalog);
}

#[tokio::test]
async fn adopting_migrate_killed_at_any_step_leaves_the_apps_table_and_finishes_when_run_again() {
    let env = |c: &mut Command, t: &TestDb| {
        c.env("DATABASE_URL", &t.url)
            .env("EMBED_WORKER__RENDER__TEMPLATE", APP_TEMPLATE)
            .arg("migrate");
    };
    // A reference: one uninterrupted adoption.
    let clean = with_schema(APP_SCHEMA).await;
    let mut c = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    env(&mut c, &clean);
    let (code, out, err) = output(&mut c);
    assert_eq!(code, 0, "{out}\n{err}");
    let want = catalog_shape(&clean.admin).await;

    let t = with_schema(APP_SCHEMA).await;
    let before = vectors(&t).await;
    // SIGKILL at each step of the preparation, then inside the one transaction (its lock on
    // the app's table held).
    let steps = [
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attname = 'content_hash'
                           AND attrelid = to_regclass('public.rag_embeddings'))",
        "SELECT count(*) >= 2 FROM pg_constraint
          WHERE conname LIKE 'embed_worker_adopted_%' AND convalidated",
        "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'embed_worker_adopted_key')",
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                         WHERE c.relname = 'rag_embeddings' AND c.relkind = 'r'
                           AND l.mode = 'AccessExclusiveLock' AND l.granted
                           AND l.pid <> pg_backend_pid())",
    ];
    let mut landed = 0;
    for step in steps {
        let mut c = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
        env(&mut c, &t);
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            let reached: bool = sqlx::query_scalar(step).fetch_one(&t.admin).await.unwrap();
            if reached || child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Until the commit the app's table is where it was, its vectors as they were.
        let still_the_apps: bool = sqlx::query_scalar(
            "SELECT relkind = 'r' FROM pg_class WHERE oid = 'public.rag_embeddings'::regclass",
        )
        .fetch_one(&t.admin)
        .await
        .unwrap();
        if still_the_apps {
            landed += 1;
            assert_eq!(vectors(&t).await, before);
        }
    }
    assert!(
        landed > 0,
        "no kill landed before the commit; nothing was tested"
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    env(&mut c, &t);
    let (code, out, err) = output(&mut c);
    assert_eq!(code, 0, "after {landed} kills:\n{out}\n{err}");
    let got = catalog_shape(&t.admin).await;
    let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
    let lacking: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
    assert!(
        extra.is_empty() && lacking.is_empty(),
        "killed {landed} times, then run again: not the clean result.\nonly after the kills: \
         {extra:#?}\nonly in the clean one: {lacking:#?}"
    );
    assert_eq!(vectors(&t).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigint_ids_an_enum_source_type_an_untyped_vector_and_no_token_count_are_adopted() {
    // The review's schema, its rag_embeddings made otherwise: bigint identity ids, source_type
    // an ENUM of the app's, `vector` without a size, no token_count (nor updated_at: the rows
    // have no usable timestamp, so freshness.adopt_untimed decides).
    let variant = APP_SCHEMA
        .replace(
            "CREATE TABLE rag_embeddings (\n    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),\n    source_type  text NOT NULL, ",
            "CREATE TYPE app_source AS ENUM ('session', 'template');\nCREATE TABLE rag_embeddings (\n    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n    source_type  app_source NOT NULL, ",
        )
        .replace("embedding    vector(1536) NOT NULL,", "embedding    vector NOT NULL,")
        // A column without a size is indexed through a cast (as the worker's own are).
        .replace(
            "USING hnsw (embedding vector_cosine_ops)",
            "USING hnsw ((embedding::vector(1536)) vector_cosine_ops)",
        )
        .replace(
            "  ADD COLUMN embedding_model VARCHAR(100) DEFAULT 'text-embedding-ada-002',\n  ADD COLUMN updated_at TIMESTAMPTZ DEFAULT NOW(),\n  ADD COLUMN token_count INTEGER;",
            "  ADD COLUMN embedding_model VARCHAR(100) DEFAULT 'text-embedding-ada-002';",
        )
        .replace(
            "INSERT INTO rag_embeddings (source_type, source_id, content, embedding, updated_at)\nSELECT 'template', q.id, q.question_text,\n       array_fill(0.01::real, ARRAY[1536])::vector, q.updated_at + interval '1 minute'",
            "INSERT INTO rag_embeddings (source_type, source_id, content, embedding)\nSELECT 'template', q.id, q.question_text,\n       array_fill(0.01::real, ARRAY[1536])::vector",
        )
        .replace(
            "INSERT INTO rag_embeddings (source_type, source_id, content, embedding, updated_at)\nSELECT 'session', s.id, s.title, array_fill(0.02::real, ARRAY[1536])::vector,\n       s.updated_at + interval '1 minute'",
            "INSERT INTO rag_embeddings (source_type, source_id, content, embedding)\nSELECT 'session', s.id, s.title, array_fill(0.02::real, ARRAY[1536])::vector",
        );
    assert!(
        variant.contains("bigint GENERATED ALWAYS")
            && !variant.contains("ADD COLUMN token_count")
            && !variant.contains("embedding    vector(1536)")
    );
    for (untimed, billed) in [("true", 10), ("false", 50)] {
        let t = with_schema(&variant).await;
        let fake = fake(embed_worker::fake_openai::FakeConfig::default()).await;
        let cli = |args: &[&str]| {
            output(
                worker_command(&t, &fake.base_url())
                    .env("EMBED_WORKER__RENDER__TEMPLATE", APP_TEMPLATE)
                    .env("EMBED_WORKER__FRESHNESS__ADOPT_UNTIMED", untimed)
                    .args(args),
            )
        };
        let before = vectors(&t).await;
        let max_id = count(&t.admin, "SELECT max(id) FROM rag_embeddings").await;
        let (code, out, err) = cli(&["migrate"]);
        assert_eq!(code, 0, "{out}\n{err}");
        let types: Vec<String> = sqlx::query_scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'public.rag_embeddings'::regclass
                AND attname IN ('id', 'source_type', 'embedding') ORDER BY attname",
        )
        .fetch_all(&t.admin)
        .await
        .unwrap();
        assert_eq!(types, ["vector", "bigint", "app_source"]);
        let (code, out, err) = cli(&["enqueue-stale"]);
        assert_eq!(code, 0, "{out}\n{err}");
        let (code, out, err) = cli(&["run", "--until-empty"]);
        assert_eq!(code, 0, "{out}\n{err}");
        let inputs: usize = fake.requests().iter().map(|r| r.inputs).sum();
        // Untimed kept: only the 10 never embedded; untimed embedded again: all 50.
        assert_eq!(inputs, billed, "adopt_untimed = {untimed}");
        let after = vectors(&t).await;
        assert_eq!(after.len(), 50);
        let kept = before.iter().filter(|b| after.contains(b)).count();
        assert_eq!(kept, if untimed == "true" { 40 } else { 0 });
        // New rows take ids after the app's.
        assert_eq!(
            count(
                &t.admin,
                "SELECT count(*) FROM rag_embeddings WHERE id <= 40 AND content IS NULL"
            )
            .await,
            0
        );
        assert!(max_id == 40);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_of_migrations_1_to_16_with_data_upgrades_with_nothing_lost() {
    let t = TestDb::empty().await;
    // The worker as it was: apalis's schema, then migrations 1-16 (sqlx's own runner over the
    // first 16 files; the fields are semver-exempt, which a test may live with).
    apalis_postgres::PostgresStorage::setup(&t.admin)
        .await
        .unwrap();
    let all = &embed_worker::db::MIGRATOR;
    let old = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(all.migrations[..16].to_vec()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    let mut conn = t.admin.acquire().await.unwrap();
    sqlx::raw_sql("SET embed_worker.creating_sessions = on")
        .execute(&mut *conn)
        .await
        .unwrap();
    old.run(&mut *conn).await.unwrap();
    drop(conn);
    // Its data: 30 sessions (their jobs queued by that version's capture), the model, and the
    // vectors of 20 of them with that version's hashes.
    let user = uuid::Uuid::new_v4();
    let sources = insert_sessions(&t.admin, user, 30, |i| 3 + i % 5).await;
    let s = t.settings();
    let model = s.model.name.clone();
    register(&t, &model, s.model.dimensions).await;
    let loaded = embed_worker::pipeline::load::load(&t.admin, &s.render, &sources[..20])
        .await
        .unwrap();
    for (source, l) in &loaded {
        let hash = embed_worker::pipeline::chunk::content_hash(&l.text, &model, s.model.dimensions);
        sqlx::query(
            "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash,
                                         embedding, embedding_model, dimensions, token_count)
             VALUES ('session', $1, 0, $2, array_fill(0.03::real, ARRAY[$3])::vector, $4, $3, 7)",
        )
        .bind(source.source_id)
        .bind(hash)
        .bind(s.model.dimensions as i32)
        .bind(&model)
        .execute(&t.admin)
        .await
        .unwrap();
    }
    let jobs = count(&t.admin, "SELECT count(*) FROM apalis.jobs").await;
    assert!(
        jobs >= 30,
        "that version's capture queued the sessions: {jobs}"
    );
    let rows = |t: &TestDb| {
        let pool = t.admin.clone();
        async move {
            sqlx::query_as::<_, (uuid::Uuid, String, String, i32)>(
                "SELECT source_id, content_hash, embedding::text, token_count FROM rag_embeddings
                  ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = rows(&t).await;
    assert_eq!(before.len(), 20);

    let fake = fake(embed_worker::fake_openai::FakeConfig::default()).await;
    let (code, out, err) = output(worker_command(&t, &fake.base_url()).arg("migrate"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "migrations: {} of {} to apply, each in its own transaction",
            all.iter().count() - 16,
            all.iter().count()
        )),
        "{out}"
    );
    assert_eq!(rows(&t).await, before, "the upgrade changed stored vectors");
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM apalis.jobs").await,
        jobs
    );
    // Its queued jobs run after the upgrade: the 10 sessions without a vector are embedded,
    // the 20 with one cost nothing.
    let (code, out, err) =
        output(worker_command(&t, &fake.base_url()).args(["run", "--until-empty"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let inputs: usize = fake.requests().iter().map(|r| r.inputs).sum();
    assert_eq!(inputs, 10);
    let after = rows(&t).await;
    assert_eq!(after.len(), 30);
    for b in &before {
        let a = after.iter().find(|a| a.0 == b.0).unwrap();
        assert_eq!(
            (&a.1, &a.2),
            (&b.1, &b.2),
            "an unchanged vector was replaced"
        );
    }
}

/// `sql` as the app's user `user` (app_user, `auth.uid()` = user), rolled back.
async fn as_app_user<T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>>(
    t: &TestDb,
    user: &str,
    sql: &str,
) -> Result<Vec<T>, String> {
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL ROLE app_user; SELECT set_config('request.jwt.claim.sub', '{user}', true)"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let r = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| e.to_string());
    tx.rollback().await.unwrap();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_owner_column_is_a_setting_read_by_rls_the_enqueue_check_and_search() {
    // The app calls its sessions' owner `owner_id`.
    let t = with_schema(&APP_SCHEMA.replace("user_id", "owner_id")).await;
    let fake = fake(embed_worker::fake_openai::FakeConfig::default()).await;
    let cli = |args: &[&str], owner: &str| {
        output(
            worker_command(&t, &fake.base_url())
                .env("EMBED_WORKER__RENDER__TEMPLATE", APP_TEMPLATE)
                .env("EMBED_WORKER__RENDER__SESSION_OWNER", owner)
                .args(args),
        )
    };
    let (code, plan, _) = cli(&["migrate", "--plan"], "user_id");
    assert_eq!(code, 1, "{plan}");
    assert!(
        plan.contains("    - sessions.user_id: no such column; needed: uuid, the owner (auth.uid()), named by render.session_owner"),
        "{plan}"
    );
    let (code, out, err) = cli(&["migrate"], "owner_id");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(
            "session owner: row-level security and the app's enqueue check read sessions.owner_id"
        ),
        "{out}"
    );
    // The placeholder user_id the released migrations needed is gone; the index is on owner_id.
    let (has_user_id, index): (bool, String) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.sessions'::regclass
                          AND attname = 'user_id' AND NOT attisdropped),
                pg_get_indexdef('public.idx_sessions_user_id'::regclass)",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert!(!has_user_id);
    assert!(index.ends_with("USING btree (owner_id)"), "{index}");
    let (code, out, err) = cli(&["enqueue-stale"], "owner_id");
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = cli(&["run", "--until-empty"], "owner_id");
    assert_eq!(code, 0, "{out}\n{err}");

    let user = "00000000-0000-0000-0000-000000000001";
    let own = count(
        &t.admin,
        "SELECT count(*) FROM sessions WHERE owner_id = '00000000-0000-0000-0000-000000000001'",
    )
    .await;
    let seen: Vec<(i64, i64)> = as_app_user(
        &t,
        user,
        &format!(
            "SELECT count(*) FILTER (WHERE source_type = 'session'),
                    count(*) FILTER (WHERE source_type = 'session' AND source_id NOT IN
                        (SELECT id FROM sessions WHERE owner_id = '{user}'))
               FROM rag_embeddings"
        ),
    )
    .await
    .unwrap();
    assert_eq!(seen, [(own, 0)], "own session embeddings only");
    // The app's enqueue: its own session accepted, another user's refused.
    let (mine, theirs): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT id FROM sessions WHERE owner_id = '{user}' LIMIT 1),
                (SELECT id FROM sessions WHERE owner_id <> '{user}' LIMIT 1)"
    )))
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let ok: Result<Vec<(i64,)>, String> = as_app_user(
        &t,
        user,
        &format!("SELECT embed_worker.enqueue('session', '{mine}')::int::int8"),
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");
    let refused: Result<Vec<(i64,)>, String> = as_app_user(
        &t,
        user,
        &format!("SELECT embed_worker.enqueue('session', '{theirs}')::int::int8"),
    )
    .await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("are not yours")),
        "{refused:?}"
    );
    // Search as that user sees only their sessions.
    let (code, out, err) = cli(
        &[
            "search",
            "notes of session",
            "--as-user",
            user,
            "--source-type",
            "session",
        ],
        "owner_id",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let hits: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("[session, user …"))
        .collect();
    assert!(!hits.is_empty(), "{out}");
    assert!(hits.iter().all(|l| l.contains("user …0001]")), "{out}");
    // A second migrate leaves the owner checks as they are.
    let (code, out, err) = cli(&["migrate"], "owner_id");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("session owner:"), "{out}");
}
