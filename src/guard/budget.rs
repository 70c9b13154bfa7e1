//! Budget guard: the design's "acceptable monthly embedding budget", enforced before spending.
//!
//! Why in the database: spend must survive restarts and be shared by every replica. Each request
//! reserves its estimated cost (budgeted tokens × price) under a lock on the budget row, so the
//! month never goes over the budget even with many pods; after the answer the reservation is
//! settled to the billed tokens, or refunded when the request failed. At the budget, API calls
//! stop (readiness says why, a metric and an ERROR log say so) while queueing goes on; the guard
//! re-checks every `budget.recheck_secs`, so raising the budget resumes the worker.
//!
//! Providers with another tokenizer (vLLM, TEI, Ollama) bill more tokens than our cl100k count:
//! reservations are scaled by the billed/counted ratio last seen, and settlement re-checks the
//! budget, so the month goes over by at most the requests already in flight. A request whose
//! outcome is unknown (timeout, reset) is settled as spent at its reservation.

use chrono::NaiveDate;
use sqlx::PgPool;

/// A reservation to settle or refund. A batch record stores both fields, so a restarted
/// process settles the reservation it made.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    /// The budget month it counts against (settled in that month even after it ends).
    pub month: NaiveDate,
    /// USD reserved (≥ 0).
    pub usd: f64,
}

#[derive(Debug, Clone, PartialEq)]
/// Whether a reservation fits the budget.
pub enum Decision {
    /// Reserved (or settled) within the budget.
    Reserved,
    /// The month is at or over the budget.
    Exceeded {
        /// This month's spend in USD.
        spent: f64,
        /// The monthly budget in USD.
        budget: f64,
    },
}

/// The budget guard for one model's price.
pub struct Budget {
    pool: PgPool,
    model: String,
    usd_per_million: f64,
    /// Billed tokens per counted token, as last seen (≥ 1), × 1,000,000; shared by the guards
    /// of one provider and model (the sync lane's and the batch lane's).
    billing_ratio_ppm: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Whether this process has seen the provider bill (shared like the ratio).
    billed_once: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The highest billing ratio accepted (billed tokens per counted token), × 1,000,000.
const MAX_RATIO_PPM: u64 = 100_000_000;

impl Budget {
    /// A guard for `model` at `usd_per_million` tokens.
    pub fn new(pool: PgPool, model: &str, usd_per_million: f64) -> Budget {
        Budget {
            pool,
            model: model.to_string(),
            usd_per_million,
            billing_ratio_ppm: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1_000_000)),
            billed_once: Default::default(),
        }
    }

    /// A guard for the same provider and model at another price (the Batch API's), spending as
    /// `model`: what either sees billed scales both's reservations.
    pub fn at_price(&self, model: &str, usd_per_million: f64) -> Budget {
        Budget {
            pool: self.pool.clone(),
            model: model.to_string(),
            usd_per_million,
            billing_ratio_ppm: self.billing_ratio_ppm.clone(),
            billed_once: self.billed_once.clone(),
        }
    }

    /// Tokens of ours whose expected bill fits what is left of the month's budget; `None` when
    /// there is no budget.
    pub async fn affordable(&self) -> sqlx::Result<Option<u64>> {
        let ppm = self
            .billing_ratio_ppm
            .load(std::sync::atomic::Ordering::Relaxed);
        self.affordable_at(ppm).await
    }

    /// [`Budget::affordable`] for a spend that is billed all at once (a batch): before this
    /// process has seen the provider bill, at most what fits if it billed the highest ratio
    /// accepted (100× our count) or, when that is less, one request of `request_tokens`. A
    /// provider billing 100× took a $1.00 budget to $19.01 with its first batch; now it goes
    /// over by at most one request.
    pub async fn affordable_at_once(&self, request_tokens: u64) -> sqlx::Result<Option<u64>> {
        let seen = self.affordable().await?;
        if self.billed_once.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(seen);
        }
        let cautious = self.affordable_at(MAX_RATIO_PPM).await?;
        Ok(seen
            .zip(cautious)
            .map(|(seen, cautious)| seen.min(cautious.max(request_tokens))))
    }

    async fn affordable_at(&self, ppm: u64) -> sqlx::Result<Option<u64>> {
        let (spent, budget) = month(&self.pool).await?;
        if budget <= 0.0 {
            return Ok(None);
        }
        let usd_left = (budget - spent).max(0.0);
        let billed = usd_left / self.usd_per_million.max(f64::MIN_POSITIVE) * 1e6;
        Ok(Some((billed * 1e6 / ppm as f64).floor() as u64))
    }

    /// Records what the provider billed for `counted` tokens of ours.
    pub fn observe_billing(&self, counted: u64, billed: u64) {
        if let Some(ppm) = billed.saturating_mul(1_000_000).checked_div(counted) {
            self.billing_ratio_ppm.store(
                ppm.clamp(1_000_000, MAX_RATIO_PPM),
                std::sync::atomic::Ordering::Relaxed,
            );
            self.billed_once
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Tokens the provider is expected to bill for `counted` of ours.
    fn expected(&self, counted: u64) -> u64 {
        let ppm = self
            .billing_ratio_ppm
            .load(std::sync::atomic::Ordering::Relaxed);
        (counted as u128 * ppm as u128).div_ceil(1_000_000) as u64
    }

    /// USD for `tokens`.
    pub fn cost(&self, tokens: u64) -> f64 {
        tokens as f64 * self.usd_per_million / 1e6
    }

    /// Reserves the cost of `tokens` (our count, scaled to what the provider bills), or says
    /// the budget would be exceeded.
    pub async fn reserve(&self, tokens: u64) -> sqlx::Result<(Decision, Option<Reservation>)> {
        let usd = self.cost(self.expected(tokens));
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

    /// Settles a reservation to what was billed (`Some(0)` for a request that surely failed;
    /// `None` when the outcome is unknown: the reservation stands as spent). Says whether the
    /// month is now at or over the budget.
    pub async fn settle(&self, r: Reservation, billed: Option<u64>) -> sqlx::Result<Decision> {
        let (usd, tokens) = match billed {
            Some(t) => (self.cost(t), t),
            None => (
                r.usd,
                (r.usd / self.usd_per_million.max(f64::MIN_POSITIVE) * 1e6) as u64,
            ),
        };
        let (spent, budget): (f64, f64) = sqlx::query_as(
            "SELECT spent::float8, budget::float8
               FROM embed_worker.settle_spend($1, $2, $3::float8::numeric, $4::float8::numeric, $5)",
        )
        .bind(r.month)
        .bind(&self.model)
        .bind(r.usd)
        .bind(usd)
        .bind(tokens as i64)
        .fetch_one(&self.pool)
        .await?;
        crate::meter::budget(spent, budget);
        if budget > 0.0 && spent >= budget {
            Ok(Decision::Exceeded { spent, budget })
        } else {
            Ok(Decision::Reserved)
        }
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
        // Unchanged, no write: `migrate` neither moves `updated_at` nor waits on the row lock
        // every request's reservation takes.
        "UPDATE embed_worker.budget SET monthly_usd = $1::float8::numeric, updated_at = now()
          WHERE monthly_usd IS DISTINCT FROM $1::float8::numeric",
    )
    .bind(usd)
    .execute(pool)
    .await?;
    Ok(())
}
