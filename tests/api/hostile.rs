//! The bulk lane against a hostile or failing provider (hardening, round 2): an output file
//! that is gone, a line that is not JSON, a create refused, a batch object that cannot be
//! read, shifted indexes, repeated and foreign lines, billing far above our count, our batch
//! paged out of the list by another tenant's, a transient failure. For each: the other batches
//! and new bulk jobs complete, the bad batch ends with its reason, nothing is written under a
//! wrong source, and no batch is created twice. And round 3: two databases on one provider
//! account, and a batch of the old model still open when the model switches.

use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::config::{BulkMode, Settings};
use embed_worker::fake_openai::{FakeConfig, FakeServer, Hostile, fake_vector};
use embed_worker::freshness;
use uuid::Uuid;

/// The batch lane with batches of 100 sources, polled every second.
fn lane_settings(t: &TestDb, fake: &FakeServer) -> Settings {
    let mut s = worker_settings(t, fake);
    s.model.name = "text-embedding-3-small".into();
    s.model.dimensions = 64;
    s.model.send_dimensions = true;
    s.bulk.mode = BulkMode::Batch;
    s.bulk.poll_secs = 1;
    s.bulk.max_sources_per_batch = 100;
    s.bulk.max_open_batches = 3;
    s.retry.job_backoff_base_secs = 1;
    s.retry.job_backoff_cap_secs = 1;
    s
}

/// Rows whose vector is not the one the provider gives for their own source's text.
async fn wrong_vectors(t: &TestDb, s: &Settings) -> usize {
    wrong_vectors_of(t, s, &s.model.name, s.model.dimensions).await
}

/// [`wrong_vectors`] among `model`'s rows, whose vectors must have `dims` dimensions.
async fn wrong_vectors_of(t: &TestDb, s: &Settings, model: &str, dims: usize) -> usize {
    let rows: Vec<(Uuid, pgvector::Vector)> = sqlx::query_as(
        "SELECT source_id, embedding FROM rag_embeddings WHERE embedding_model = $1",
    )
    .bind(model)
    .fetch_all(&t.admin)
    .await
    .unwrap();
    let ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    let sources = session_sources(&ids);
    let texts = embed_worker::pipeline::load::load(&t.admin, &s.render, &sources)
        .await
        .unwrap();
    rows.iter()
        .zip(&sources)
        .filter(|((_, v), src)| {
            let want = fake_vector(&texts[src].text, dims);
            v.as_slice().len() != dims
                || v.as_slice()
                    .iter()
                    .zip(&want)
                    .any(|(a, b)| (a - b).abs() > 1e-6)
        })
        .count()
}

/// Waits until every job of both lanes has ended and no batch is open.
async fn settled(t: &TestDb, limit: Duration) {
    let started = Instant::now();
    loop {
        let open = embed_worker::queue::open_jobs(&t.admin, "embed")
            .await
            .unwrap();
        let batches = count(
            &t.admin,
            "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NULL",
        )
        .await;
        if open == 0 && batches == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{open} jobs and {batches} batches still open after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first batch's record: (state, last error).
async fn first_batch(t: &TestDb) -> (String, String) {
    sqlx::query_as(
        "SELECT state, coalesce(last_error, '') FROM embed_worker.batches ORDER BY id LIMIT 1",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap()
}

/// Batches the fake must have created: one per record that reached it, plus its recreations.
async fn batches_recorded(t: &TestDb) -> usize {
    count(
        &t.admin,
        "SELECT count(*) FILTER (WHERE provider_id IS NOT NULL) + coalesce(sum(resubmits), 0)
           FROM embed_worker.batches",
    )
    .await as usize
}

/// 300 sources backfilled through the batch lane while the provider misbehaves `how` on its
/// first batch; 20 more queued once the first batch has ended. Returns when everything
/// settled, with the fake and the settings.
async fn run_hostile(how: Hostile) -> (TestDb, FakeServer, Settings) {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        hostile: Some(how),
        hostile_batches: 1,
        ..FakeConfig::default()
    })
    .await;
    let user = Uuid::new_v4();
    insert_sessions(&t.admin, user, 300, |i| 3 + i % 20).await;
    let s = lane_settings(&t, &fake);
    assert_eq!(backfill_stale(&t, &s).await, 300);
    let w = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    while count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NOT NULL",
    )
    .await
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{how:?}: no batch ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New bulk work after the bad batch: the lane still takes it.
    let mut more = insert_sessions(&t.admin, Uuid::new_v4(), 20, |i| 40 + i).await;
    more.truncate(20);
    assert_eq!(backfill_stale(&t, &s).await, 20);
    settled(&t, Duration::from_secs(90)).await;
    w.stop().await;
    (t, fake, s)
}

/// A hostile run whose first batch ends in `state` with a last error saying `says`, and then
/// [`assert_recovered`].
async fn hostile_ends(how: Hostile, state: &str, says: &[&str]) -> (TestDb, FakeServer, Settings) {
    let (t, fake, s) = run_hostile(how).await;
    let (ended, why) = first_batch(&t).await;
    assert_eq!(ended, state, "{how:?}: {why}");
    for words in says {
        assert!(why.contains(words), "{how:?}: {why}");
    }
    assert_recovered(&t, &fake, &s, how).await;
    (t, fake, s)
}

/// What every hostile run must end with: all 320 sources written with their own vectors, no
/// dead letter, and no batch created twice.
async fn assert_recovered(t: &TestDb, fake: &FakeServer, s: &Settings, how: Hostile) {
    let rows = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert_eq!(rows, 320, "{how:?}: every source written");
    assert_eq!(
        wrong_vectors(t, s).await,
        0,
        "{how:?}: nothing under a wrong source"
    );
    let dead = count(&t.admin, "SELECT count(*) FROM embed_worker.failed_jobs").await;
    assert_eq!(dead, 0, "{how:?}: no dead letter");
    assert_eq!(
        fake.batches_created(),
        batches_recorded(t).await,
        "{how:?}: no batch created twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_output_file_that_is_gone_ends_its_batch_and_the_lane_goes_on() {
    let (t, _, _) = hostile_ends(Hostile::OutputGone, "failed", &["404", "downloading file"]).await;
    // Its jobs were retried with an attempt, not lost.
    let retried = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'embed.batch' AND status = 'Done' AND attempts = 1",
    )
    .await;
    assert_eq!(retried, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_output_line_that_is_not_json_costs_only_its_own_inputs() {
    let _ = hostile_ends(
        Hostile::GarbageLine,
        "completed",
        &["1 output lines not JSON"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_create_ends_its_batch_with_the_providers_reason() {
    let (_, fake, _) = hostile_ends(
        Hostile::RefuseCreate,
        "failed",
        &["not allowed to create batches"],
    )
    .await;
    assert_eq!(
        fake.files_stored(),
        0,
        "the refused batch's file deleted too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_object_that_cannot_be_read_ends_its_batch() {
    let _ = hostile_ends(Hostile::UnreadableBatch, "failed", &["deserialize"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shifted_indexes_are_refused_as_on_the_sync_path() {
    let _ = hostile_ends(
        Hostile::ShiftedIndexes,
        "completed",
        &["indexes are not 0.."],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_and_foreign_lines_are_counted_once_and_not_at_all() {
    let (t, fake, s) = hostile_ends(
        Hostile::RepeatedAndForeignLines,
        "completed",
        &["repeated lines", "never sent"],
    )
    .await;
    // The spend counts each of our lines once: our tokens at the batch price.
    let ours: i64 = count(
        &t.admin,
        "SELECT sum(token_count)::bigint FROM rag_embeddings",
    )
    .await;
    let spent: f64 = sqlx::query_scalar(
        "SELECT coalesce(sum(usd), 0)::float8 FROM embed_worker.spend WHERE model LIKE '% (batch)'",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let price = s.model.batch_usd_per_million_tokens;
    assert!(
        (spent - ours as f64 * price / 1e6).abs() < 1e-12,
        "spent {spent} for {ours} tokens of ours"
    );
    assert!(
        fake.batch_tokens_billed() > ours as u64,
        "the provider billed the repeats"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_failure_creates_the_batch_again_without_using_an_attempt() {
    let (t, _, _) = hostile_ends(Hostile::TransientFailure, "completed", &[]).await;
    let attempts = count(
        &t.admin,
        "SELECT coalesce(max(attempts), 0)::bigint FROM apalis.jobs",
    )
    .await;
    assert_eq!(attempts, 0, "no job used an attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn our_batch_is_found_past_another_tenants_150_newer_ones_and_never_created_twice() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_delay: Duration::from_secs(4),
        ..FakeConfig::default()
    })
    .await;
    insert_sessions(&t.admin, Uuid::new_v4(), 50, |i| 3 + i % 20).await;
    let s = lane_settings(&t, &fake);
    backfill_stale(&t, &s).await;
    let w = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    while count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE state = 'submitted'",
    )
    .await
        == 0
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.stop().await;
    // The submitter died after creating the batch and before recording its id.
    sqlx::query(
        "UPDATE embed_worker.batches SET state = 'preparing', provider_id = NULL, submitted_at = NULL",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    fake.add_foreign_batches(150);
    let w = RunningWorker::start(s.clone()).await;
    settled(&t, Duration::from_secs(60)).await;
    w.stop().await;
    assert_eq!(fake.batches_created(), 1, "adopted, not created again");
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM rag_embeddings").await,
        50
    );
    assert_eq!(wrong_vectors(&t, &s).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_billing_100_times_our_count_stays_within_the_budget_after_its_first_batch() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        billing_multiplier: 100.0,
        ..FakeConfig::default()
    })
    .await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 400, |_| 10).await;
    let mut s = lane_settings(&t, &fake);
    s.bulk.max_open_batches = 1;
    // The first batch (100 sources) billed ×100 takes 40% of the budget.
    let first = freshness::estimate(&t.admin, &s, &sources[..100])
        .await
        .unwrap();
    let budget = first.batch_usd * 100.0 / 0.4;
    embed_worker::guard::budget::set(&t.admin, budget)
        .await
        .unwrap();
    backfill_stale(&t, &s).await;
    let w = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    // Two full batches fit (80%); the third is cut to the 20% left; then nothing.
    while count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NOT NULL",
    )
    .await
        < 3
    {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.stop().await;
    let (spent, month_budget) = embed_worker::guard::budget::month(&t.admin).await.unwrap();
    assert!(
        spent <= month_budget * (1.0 + 1e-9),
        "spent {spent} of {month_budget}"
    );
    let rows = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert!(
        (240..=250).contains(&rows),
        "2.5 batches' worth written: {rows}"
    );
    assert_eq!(fake.batches_created(), 3, "no batch past the budget");
    let waiting = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE status = 'Pending' AND attempts = 0",
    )
    .await;
    assert_eq!(
        waiting,
        400 - rows,
        "the rest waits for budget, no attempt used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_bulk_mode_to_sync_drains_every_bulk_job_of_the_batch_lane() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    insert_sessions(&t.admin, Uuid::new_v4(), 200, |i| 3 + i % 20).await;
    let batch = lane_settings(&t, &fake);
    assert_eq!(backfill_stale(&t, &batch).await, 200);
    // A dead letter of the batch lane, too: retry-failed must put it where sync mode reads.
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Killed', attempts = 10, idempotency_key = NULL
          WHERE id = (SELECT min(id) FROM apalis.jobs)",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    let mut sync = batch.clone();
    sync.bulk.mode = BulkMode::Sync;
    let n = embed_worker::queue::retry_failed(&t.admin, "embed", None, None)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let w = RunningWorker::start(sync).await;
    settled(&t, Duration::from_secs(60)).await;
    w.stop().await;
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM rag_embeddings").await,
        200
    );
    assert_eq!(fake.batches_created(), 0, "sync mode creates no batch");
    let left = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'embed.batch'",
    )
    .await;
    assert_eq!(left, 0, "every bulk job moved to the sync queue");
}

/// Waits until `t` has at least one batch and none is `preparing`: every submitted batch is at
/// the provider.
async fn submitted(t: &TestDb, limit: Duration) {
    let started = Instant::now();
    loop {
        let (all, preparing): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state = 'preparing') FROM embed_worker.batches",
        )
        .fetch_one(&t.admin)
        .await
        .unwrap();
        let waiting = count(
            &t.admin,
            "SELECT count(*) FROM apalis.jobs WHERE job_type = 'embed.batch' AND status = 'Pending'",
        )
        .await;
        if all > 0 && preparing == 0 && waiting == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "batches not submitted after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The provider ids `t` recorded.
async fn provider_ids(t: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT provider_id FROM embed_worker.batches WHERE provider_id IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_databases_on_one_provider_account_never_adopt_each_others_batches() {
    // Staging and production on one account: both number their batch records from 1, and
    // each batch stays open at the provider for 3 s, so each database's submitter looks for
    // "its" record 1, 2, 3 while the other's are listed.
    let fake = fake(FakeConfig {
        batch_delay: Duration::from_secs(3),
        ..FakeConfig::default()
    })
    .await;
    let (a, b) = (quiet_db().await, quiet_db().await);
    insert_sessions(&a.admin, Uuid::new_v4(), 300, |i| 3 + i % 20).await;
    // Other texts in the other database: a vector of A's text under B's source shows.
    insert_sessions(&b.admin, Uuid::new_v4(), 300, |i| 30 + i % 7).await;
    let (sa, sb) = (lane_settings(&a, &fake), lane_settings(&b, &fake));
    assert_eq!(backfill_stale(&a, &sa).await, 300);
    assert_eq!(backfill_stale(&b, &sb).await, 300);
    let wa = RunningWorker::start(sa.clone()).await;
    let wb = RunningWorker::start(sb.clone()).await;
    settled(&a, Duration::from_secs(90)).await;
    settled(&b, Duration::from_secs(90)).await;
    wa.stop().await;
    wb.stop().await;

    let (ia, ib) = (provider_ids(&a).await, provider_ids(&b).await);
    assert!(ia.len() >= 3 && ib.len() >= 3, "{ia:?} {ib:?}");
    assert!(
        ia.iter().all(|id| !ib.contains(id)),
        "no batch recorded by both: {ia:?} {ib:?}"
    );
    assert_eq!(
        fake.batches_created(),
        batches_recorded(&a).await + batches_recorded(&b).await,
        "each database created its own batches"
    );
    for (t, s) in [(&a, &sa), (&b, &sb)] {
        assert_eq!(
            count(&t.admin, "SELECT count(*) FROM rag_embeddings").await,
            300
        );
        assert_eq!(wrong_vectors(t, s).await, 0, "nothing of the other's texts");
        let dead = count(&t.admin, "SELECT count(*) FROM embed_worker.failed_jobs").await;
        assert_eq!(dead, 0);
    }
    assert_eq!(
        fake.files_stored(),
        0,
        "each deleted its own files, all of them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_models_batch_open_at_a_switch_is_written_to_its_own_partition_at_its_price() {
    use embed_worker::model_index::{self, lifecycle};
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_delay: Duration::from_secs(4),
        ..FakeConfig::default()
    })
    .await;
    insert_sessions(&t.admin, Uuid::new_v4(), 300, |i| 3 + i % 20).await;
    // Before: text-embedding-3-small at 64 dimensions writes and serves; its backfill goes out
    // as three batches, which are still running at the provider when the worker stops.
    let mut old = lane_settings(&t, &fake);
    old.model.usd_per_million_tokens = 0.02;
    old.model.batch_usd_per_million_tokens = 0.01;
    old.index.auto_build = false;
    let w = RunningWorker::start(old.clone()).await;
    lifecycle::record_price(&t.admin, &old.model).await.unwrap();
    assert_eq!(backfill_stale(&t, &old).await, 300);
    submitted(&t, Duration::from_secs(60)).await;
    w.stop().await;
    let open = count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NULL",
    )
    .await;
    assert!(open >= 1, "the old model's batches are open at the switch");

    // The switch, as `migrate` makes it: text-embedding-3-large at 128 writes (another size).
    let mut new = old.clone();
    new.model.name = "text-embedding-3-large".into();
    new.model.dimensions = 128;
    new.model.usd_per_million_tokens = 0.13;
    new.model.batch_usd_per_million_tokens = 0.065;
    lifecycle::on_migrate(
        &mut t.admin.acquire().await.unwrap(),
        &spec(&new.model.name, 128),
    )
    .await
    .unwrap();
    lifecycle::record_price(&t.admin, &new.model).await.unwrap();
    model_index::build::on_migrate(&t.admin, &new)
        .await
        .unwrap();
    let w = RunningWorker::start(new.clone()).await;
    settled(&t, Duration::from_secs(90)).await;
    w.stop().await;

    // The old model's vectors in its own partition at its size; none in the new one's.
    let old_rows = count(
        &t.admin,
        "SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'text-embedding-3-small'",
    )
    .await;
    assert_eq!(old_rows, 300);
    assert_eq!(wrong_vectors_of(&t, &old, &old.model.name, 64).await, 0);
    let new_rows = count(
        &t.admin,
        "SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'text-embedding-3-large'",
    )
    .await;
    assert_eq!(
        new_rows, 0,
        "nothing of the old batches counts as the new model's"
    );
    let dead = count(&t.admin, "SELECT count(*) FROM embed_worker.failed_jobs").await;
    assert_eq!(dead, 0, "no job killed for its size");
    let serving = lifecycle::serving(&t.admin).await.unwrap().unwrap().name;
    assert_eq!(
        serving, "text-embedding-3-small",
        "the new model was not promoted on no rows"
    );
    // Spent as the old model at the Batch API price; the reservation settled, nothing charged
    // to the new model.
    let (tokens, usd): (i64, f64) = sqlx::query_as(
        "SELECT coalesce(sum(tokens), 0)::int8, coalesce(sum(usd), 0)::float8
           FROM embed_worker.spend WHERE model = 'text-embedding-3-small (batch)'",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(tokens as u64, fake.batch_tokens_billed());
    assert!(tokens > 0);
    assert!(
        (usd - tokens as f64 * 0.01 / 1e6).abs() < 1e-9,
        "${usd} for {tokens} tokens at $0.01 per million"
    );
    let charged_new = count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.spend WHERE model LIKE 'text-embedding-3-large%' AND usd <> 0",
    )
    .await;
    assert_eq!(charged_new, 0);
    let not_completed = count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE state <> 'completed' OR finished_at IS NULL",
    )
    .await;
    assert_eq!(not_completed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_batch_on_a_provider_billing_100_times_stays_within_the_budget() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        billing_multiplier: 100.0,
        ..FakeConfig::default()
    })
    .await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 400, |_| 10).await;
    let mut s = lane_settings(&t, &fake);
    s.bulk.max_open_batches = 1;
    let first = freshness::estimate(&t.admin, &s, &sources[..100])
        .await
        .unwrap();
    // One request holds about ten sources; the budget is what half the first batch costs
    // billed ×100 (as seen first: the whole batch went out, 2× the budget).
    s.api.max_tokens_per_request = (first.tokens / 10) as usize;
    let budget = first.batch_usd * 100.0 * 0.5;
    embed_worker::guard::budget::set(&t.admin, budget)
        .await
        .unwrap();
    backfill_stale(&t, &s).await;
    let w = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    while count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NOT NULL",
    )
    .await
        < 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no batch ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Rounds after the first bill: the rest waits for budget.
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.stop().await;
    let (spent, month_budget) = embed_worker::guard::budget::month(&t.admin).await.unwrap();
    assert!(
        spent <= month_budget * (1.0 + 1e-9),
        "spent {spent} of {month_budget}"
    );
    let rows = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert!((40..=50).contains(&rows), "half a batch's worth: {rows}");
    assert_eq!(fake.batches_created(), 1, "no batch past the budget");
}
