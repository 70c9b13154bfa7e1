//! Test support: one fresh database per test on the dev server started by `scripts/db`.
#![allow(dead_code)]

use embed_worker::config::{DatabaseSettings, Settings};
use embed_worker::db;
use sqlx::PgPool;

/// The dev server's admin URL (`scripts/db url`), or `TEST_DATABASE_URL`.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/embed_worker".to_string())
}

fn url_for(db_name: &str) -> String {
    let base = admin_url();
    let (prefix, _) = base.rsplit_once('/').expect("database url has a path");
    format!("{prefix}/{db_name}")
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    /// Login role (superuser on the dev server): for setup and assertions.
    pub admin: PgPool,
}

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> TestDb {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let server = db::connect_admin(&admin_url()).await.expect(
            "cannot reach the dev database: run `scripts/db start` (scripts/test does this)",
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&server)
            .await
            .unwrap();
        server.close().await;
        let url = url_for(&name);
        let admin = db::connect_admin(&url).await.unwrap();
        TestDb { name, url, admin }
    }

    /// A new database with all migrations applied.
    pub async fn migrated() -> TestDb {
        let t = Self::empty().await;
        db::migrate(&t.admin).await.expect("migrate");
        t
    }

    /// A pool whose connections run as the `embed_worker` role, as the worker's do.
    pub async fn worker_pool(&self) -> PgPool {
        db::connect(&DatabaseSettings {
            url: self.url.clone(),
            max_connections: 20,
            role: "embed_worker".into(),
        })
        .await
        .unwrap()
    }

    /// Settings from config/default.toml pointed at this database.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::load(None).expect("config/default.toml");
        s.database.url = self.url.clone();
        s
    }
}

/// Inserts a session and returns its id.
pub async fn insert_session(pool: &PgPool, user: uuid::Uuid, title: &str, notes: &str) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO sessions (user_id, focus, depth, title, notes)
         VALUES ($1, 'harmony', 'standard', $2, $3) RETURNING id",
    )
    .bind(user)
    .bind(title)
    .bind(notes)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A tiny unit vector literal of `dims` dimensions.
pub fn vector_literal(dims: usize) -> String {
    let mut v = vec!["0".to_string(); dims];
    v[0] = "1".into();
    format!("[{}]", v.join(","))
}
