//! Budget guard: the design's "acceptable monthly embedding budget", enforced before spending.
//!
//! Why in the database: spend must survive restarts and be shared by every replica. Each request
//! reserves its estimated cost (budgeted tokens × price) under a lock on the budget row, so the
//! month never goes over the budget even with many pods; after the answer the reservation is
//! settled to the billed tokens, or refunded when the request failed. At the budget, API calls
//! stop (readiness says why, a metric and an ERROR log say so) while queueing goes on; the guard
//! re-checks every `budget.recheck_secs`, so raising the budget resumes the worker.

use chrono::NaiveDate;
use sqlx::PgPool;

/// A reservation to settle or refund.
#[derive(Debug, Clone)]
pub struct Reservation {
    month: NaiveDate,
    usd: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Reserved,
    Exceeded { spent: f64, budget: f64 },
}

pub struct Budget {
    pool: PgPool,
    model: String,
    usd_per_million: f64,
}

impl Budget {
    pub fn new(pool: PgPool, model: &str, usd_per_million: f64) -> Budget {
        Budget {
            pool,
            model: model.to_string(),
            usd_per_million,
        }
    }

    pub fn cost(&self, tokens: u64) -> f64 {
        tokens as f64 * self.usd_per_million / 1e6
    }

    /// Reserves the cost of `tokens`, or says the budget would be exceeded.
    pub async fn reserve(&self, tokens: u64) -> sqlx::Result<(Decision, Option<Reservation>)> {
        let usd = self.cost(tokens);
        let (ok, spent, budget, month): (bool, f64, f64, NaiveDate) = sqlx::query_as(
            "SELECT ok, spent::float8, budget::float8, embed_worker.current_month()
               FROM embed_worker.reserve_spend($1, $2::float8::numeric)",
        )
        .bind(&self.model)
        .bind(usd)
        .fetch_one(&self.pool)
        .await?;
        crate::meter::budget(spent, budget);
        if ok {
            Ok((Decision::Reserved, Some(Reservation { month, usd })))
        } else {
            Ok((Decision::Exceeded { spent, budget }, None))
        }
    }

    /// Settles a reservation to what was billed (`tokens` = 0 for a failed request).
    pub async fn settle(&self, r: Reservation, tokens: u64) -> sqlx::Result<()> {
        sqlx::query("SELECT embed_worker.settle_spend($1, $2, $3::float8::numeric, $4::float8::numeric, $5)")
            .bind(r.month)
            .bind(&self.model)
            .bind(r.usd)
            .bind(self.cost(tokens))
            .bind(tokens as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// This month's spend (all models) and the budget, in USD.
pub async fn month(pool: &PgPool) -> sqlx::Result<(f64, f64)> {
    sqlx::query_as(
        "SELECT coalesce((SELECT sum(usd) FROM embed_worker.spend WHERE month = embed_worker.current_month()), 0)::float8,
                (SELECT monthly_usd FROM embed_worker.budget)::float8",
    )
    .fetch_one(pool)
    .await
}

/// Sets the monthly budget (0 = none). Needs the owner's rights (migrate, or an operator).
pub async fn set(pool: &PgPool, usd: f64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.budget SET monthly_usd = $1::float8::numeric, updated_at = now()",
    )
    .bind(usd)
    .execute(pool)
    .await?;
    Ok(())
}
