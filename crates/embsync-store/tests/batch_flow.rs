//! The Batch API's driver flow through the real driver and store (real Postgres) and a transport
//! over real HTTP to the local provider started in-process: backfills through batches with exact
//! counts, every outcome of a batch, and cuts between each step.

mod support;

use std::collections::BTreeMap;

use embsync_core::batch_api::BatchApi;
use embsync_core::config::{BatchApi as BatchApiSetting, Config};
use embsync_core::report::{PendingBatches, RunReport};
use embsync_core::sync::{self, Budget, Invocation, Outcome, RetryPolicy, RunId};
use embsync_store::PgStore;
use support::batch_http::HttpBatchApi;
use support::*;

const LARGE: &str = "text-embedding-3-large";
const SMALL: &str = "text-embedding-3-small";

/// A source `items.title`, the store, the synchronous provider and the Batch API's transport.
struct World {
    db: TestDb,
    config: Config,
    store: PgStore,
    provider: FakeProvider,
    rt: TestRuntime,
    api: HttpBatchApi,
    n: u32,
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

impl World {
    async fn new(values: &[String], min_values: u64, switches: &str) -> World {
        let db = TestDb::create().await;
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        db.source_table("items", "title", &refs).await;
        let mut config = config(100, &[("Items", "items", "title")]);
        config.batch_api = Some(BatchApiSetting { min_values });
        let store = db.store(&config).await;
        World { db, config, store, provider: FakeProvider::default(), rt: TestRuntime::default(), api: HttpBatchApi::start(switches), n: 0 }
    }

    /// One invocation with the Batch API's transport.
    async fn invoke(&mut self) -> Outcome {
        self.try_invoke().await.expect("an invocation")
    }

    async fn try_invoke(&mut self) -> Result<Outcome, sync::SyncError> {
        self.n += 1;
        let (id, holder) = (RunId(format!("run-{}", self.n)), format!("inv-{}", self.n));
        let inv = Invocation {
            trigger: embsync_core::report::Trigger::Cron,
            retry: RetryPolicy::default(),
            budget: Budget::default(),
            new_run: &id,
            holder: &holder,
            hint: None,
            fanout: None,
            batch_api: Some(&self.api),
        };
        sync::invoke(&self.config, &mut self.store, &self.provider, &self.rt, &inv).await
    }

    async fn paused(&mut self) -> RunReport {
        match self.invoke().await {
            Outcome::Paused(report, _) => report,
            other => panic!("expected the run to wait for its batches: {other:?}"),
        }
    }

    async fn finished(&mut self) -> RunReport {
        match self.invoke().await {
            Outcome::Finished(report) => report,
            other => panic!("expected the run to finish: {other:?}"),
        }
    }

    /// How often each value was sent per model, both ways together: `(model, value) -> n`.
    fn sent(&self) -> BTreeMap<(String, String), usize> {
        let mut sent = BTreeMap::new();
        for (model, inputs) in self.provider.calls.borrow().iter() {
            for input in inputs {
                *sent.entry((model.clone(), input.clone())).or_default() += 1;
            }
        }
        for batch in self.api.batches() {
            // A batch that failed validation or was cancelled before running sent nothing paid.
            let id = batch["id"].as_str().unwrap().to_string();
            let model = batch["model"].as_str().unwrap().to_string();
            let inputs = self.api.admin("GET", &format!("/_admin/batches/{id}/inputs"), "");
            for input in inputs.as_array().unwrap() {
                *sent.entry((model.clone(), input.as_str().unwrap().to_string())).or_default() += 1;
            }
        }
        sent
    }

    /// Values linked to the source with both embeddings.
    async fn done(&self) -> i64 {
        self.db
            .count(
                "SELECT count(*) FROM embedding_cache c JOIN embedding_cache_sources s USING (value_hash) \
                 WHERE c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL",
            )
            .await
    }

    async fn open_files(&self) -> i64 {
        self.db.count("SELECT count(*) FROM embedding_sync_batches WHERE finished_at IS NULL").await
    }
}

/// Each of `values` was sent exactly once per model, both ways together, and nothing else.
fn once_per_model(sent: &BTreeMap<(String, String), usize>, values: &[String]) {
    for model in [LARGE, SMALL] {
        for value in values {
            assert_eq!(sent.get(&(model.to_string(), value.clone())), Some(&1), "{value} for {model}");
        }
    }
    assert_eq!(sent.len(), values.len() * 2, "nothing else was sent: {sent:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_backfill_goes_through_batches_once_with_exact_counts_at_the_batch_price() {
    let first = values("value", 60);
    let mut w = World::new(&first, 50, "{}").await;
    let plan = sync::dry_run(&w.config, &mut w.store).await;
    assert_eq!((plan.batch_api.large.pending_values, plan.batch_api.large.way), (60, embsync_core::batch_api::Way::BatchApi));

    // The plan sends both models' 60 values through batches, and the run waits for them.
    let waiting = w.paused().await;
    assert_eq!(waiting.pending_batches, Some(PendingBatches { batches: 2, values: 120, reading: 0 }));
    assert!(w.provider.calls.borrow().is_empty(), "nothing goes the synchronous way");
    assert_eq!(w.api.batches().len(), 2);
    assert_eq!(w.open_files().await, 2);
    assert!(!sync::Chain::default().goes_on(&Outcome::Paused(waiting.clone(), dummy_cursor()), 0.0, 1, &Budget::default()));
    // The dry run does not count what the batches bring.
    let plan = sync::dry_run(&w.config, &mut w.store).await;
    assert_eq!((plan.batch_api.large.pending_values, plan.batch_api.small.pending_values), (0, 0));

    // Values that arrive while the batches are pending go through the next run.
    let late = values("late", 3);
    w.db.insert("items", "title", &late.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 60);
    assert_eq!(report.totals.new, 60);
    let usage = &report.usage;
    assert!(usage.large.prompt_tokens > 0);
    assert_eq!((usage.large.batch_prompt_tokens, usage.large.batch_requests), (usage.large.prompt_tokens, 1));
    assert_eq!((usage.small.batch_prompt_tokens, usage.small.batch_requests), (usage.small.prompt_tokens, 1));
    let at_batch_price = usage.large.prompt_tokens as f64 * 0.065 / 1e6 + usage.small.prompt_tokens as f64 * 0.01 / 1e6;
    assert!((usage.cost_usd - at_batch_price).abs() < 2e-6, "{} at the batch price, not {}", usage.cost_usd, at_batch_price * 2.0);
    assert_eq!(w.done().await, 60);
    assert_eq!(w.open_files().await, 0);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0);

    let next = w.finished().await;
    assert_eq!((next.totals.embedded, next.usage.large.batch_prompt_tokens), (3, 0), "3 values are below minValues");
    assert_eq!(w.done().await, 63);
    let all: Vec<String> = first.iter().chain(&late).cloned().collect();
    once_per_model(&w.sent(), &all);
}

fn dummy_cursor() -> sync::Cursor {
    sync::Cursor { run_id: "r".into(), source: 1, phase: "batches".into(), after: None, totals: Default::default() }
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_batch_keeps_what_finished_and_the_rest_goes_the_synchronous_way() {
    // 2,100 values make two requests a file (2,048 inputs at most each); the first finishes.
    let all = values("value", 2100);
    let mut w = World::new(&all, 1000, r#"{"expireAfterLines": 1}"#).await;
    w.paused().await;
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 2048, "the first request of each file, completed by both");
    assert_eq!(report.usage.large.batch_requests, 1);
    assert_eq!(w.db.texts("SELECT state FROM embedding_sync_batches").await, ["expired".to_string()].into());
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0, "the expired request's values are released");
    assert!(w.provider.calls.borrow().is_empty());
    let next = w.finished().await;
    assert_eq!(next.totals.embedded, 52);
    assert_eq!(w.done().await, 2100);
    // What each batch ran is its first 2,048 inputs (its first line); the rest was sent
    // synchronously, once per model, and nothing else.
    for batch in w.api.batches() {
        let id = batch["id"].as_str().unwrap().to_string();
        let model = batch["model"].as_str().unwrap().to_string();
        let inputs = w.api.admin("GET", &format!("/_admin/batches/{id}/inputs"), "");
        let unrun: Vec<String> = inputs.as_array().unwrap()[2048..].iter().map(|v| v.as_str().unwrap().to_string()).collect();
        let mut synced: Vec<String> =
            w.provider.calls.borrow().iter().filter(|(m, _)| *m == model).flat_map(|(_, inputs)| inputs.clone()).collect();
        synced.sort();
        let mut unrun = unrun;
        unrun.sort();
        assert_eq!(synced, unrun, "{model}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn per_line_errors_go_to_the_error_table() {
    let mut all = values("value", 59);
    all.push("poison-pill".to_string());
    let mut w = World::new(&all, 50, r#"{"failInputContains": "poison"}"#).await;
    w.paused().await;
    let report = w.finished().await;
    // The one request of each file was refused for an input: its values are recorded, with
    // the backoff, and nothing is stored.
    assert_eq!(report.totals.embedded, 0);
    assert_eq!(report.totals.errors, 60, "60 values, each once, though both models refused it");
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_errors WHERE next_retry_at > now()").await, 60);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache").await, 0);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0);
    // They wait for their retry: the next run sends nothing.
    w.finished().await;
    assert!(w.provider.calls.borrow().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn a_cut_before_the_create_was_sent_creates_the_batch_later() {
    let all = values("value", 60);
    let mut w = World::new(&all, 50, "{}").await;
    w.api.create_unsent.set(true);
    let waiting = w.paused().await;
    assert_eq!(waiting.pending_batches.map(|p| p.batches), Some(2), "two files recorded without a batch");
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batches WHERE batch_id IS NULL").await, 2);
    assert!(w.api.batches().is_empty());
    w.api.create_unsent.set(false);
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 60);
    assert!(w.api.count("GET /v1/batches?limit=") >= 2, "the batches were looked for first");
    assert_eq!(w.api.batches().len(), 2);
    once_per_model(&w.sent(), &all);
}

#[tokio::test(flavor = "current_thread")]
async fn a_cut_after_the_create_finds_the_batch_and_pays_once() {
    let all = values("value", 60);
    let mut w = World::new(&all, 50, r#"{"completionMs": 60000}"#).await;
    w.api.create_lost.set(true);
    w.paused().await;
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batches WHERE batch_id IS NULL").await, 2);
    assert_eq!(w.api.batches().len(), 2, "each create reached the provider once");
    w.api.create_lost.set(false);
    w.api.switches("{}");
    // The switch applies to new batches: these two stay in progress for a minute. The next
    // invocation finds them by their input file, and polls them.
    let waiting = w.paused().await;
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batches WHERE batch_id IS NULL").await, 0);
    assert_eq!(waiting.pending_batches.map(|p| p.batches), Some(2));
    assert_eq!(w.api.batches().len(), 2, "found, not created again");
    assert_eq!(w.db.texts("SELECT state FROM embedding_sync_batches").await, ["in_progress".to_string()].into());
}

#[tokio::test(flavor = "current_thread")]
async fn a_cut_while_reading_the_output_resumes_without_storing_or_counting_twice() {
    let all = values("value", 2100);
    let mut w = World::new(&all, 1000, "{}").await;
    w.paused().await;
    // The large model's output breaks off in its last line (its first has arrived).
    w.api.break_content_before_end.set(Some(100));
    let waiting = w.paused().await;
    assert_eq!(
        waiting.pending_batches.as_ref().map(|p| (p.batches, p.reading)),
        Some((1, 1)),
        "the small batch was read whole after the break; the large one is partly read"
    );
    assert!(
        sync::Chain::default().goes_on(&Outcome::Paused(waiting.clone(), dummy_cursor()), 0.0, 1, &Budget::default()),
        "an output partly read is read on at once"
    );
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL").await, 2048);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache WHERE embedding_small IS NOT NULL").await, 2100);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 52, "the large model's last request waits");
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 2100);
    let usage = &report.usage;
    assert_eq!((usage.large.batch_requests, usage.small.batch_requests), (2, 2), "each request counted once");
    assert_eq!(usage.large.batch_prompt_tokens, usage.small.batch_prompt_tokens, "the same inputs, the same tokens");
    assert_eq!(w.done().await, 2100);
    once_per_model(&w.sent(), &all);
}

#[tokio::test(flavor = "current_thread")]
async fn an_output_cut_at_a_line_boundary_is_read_again_not_paid_twice() {
    let all = values("value", 2100);
    let mut w = World::new(&all, 1000, "{}").await;
    w.paused().await;
    // The large model's output ends cleanly after its first line: the download looks whole.
    w.api.end_content_after_lines.set(Some(1));
    let waiting = w.paused().await;
    assert_eq!(waiting.pending_batches.as_ref().map(|p| p.reading), Some(1), "the large batch is not taken as read");
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 52, "the large model's last request waits");
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 2100);
    assert_eq!(w.done().await, 2100);
    // Without the check the 52 values of the unread line went the synchronous way as well.
    once_per_model(&w.sent(), &all);
}

#[tokio::test(flavor = "current_thread")]
async fn values_deleted_or_done_while_pending_are_left_alone() {
    let all = values("value", 60);
    let mut w = World::new(&all, 50, "{}").await;
    w.paused().await;
    w.db.exec("DELETE FROM items WHERE title IN ('value-0001', 'value-0002', 'value-0003', 'value-0004', 'value-0005')").await;
    w.db.exec(&format!(
        "INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small) VALUES ('value-0010', '{}', '[9,9,9,9]', '[9,9]')",
        hash_of("value-0010")
    ))
    .await;
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 54, "60 less 5 deleted and 1 done by another pipeline");
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache").await, 55);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache WHERE value LIKE 'value-000_' AND value <> 'value-0000'").await, 4);
    let kept: Vec<String> =
        w.db.texts(&format!(
            "SELECT embedding_large::text || embedding_small::text FROM embedding_cache WHERE value_hash = '{}'",
            hash_of("value-0010")
        ))
        .await
        .into_iter()
        .collect();
    assert_eq!(kept, ["[9,9,9,9][9,9]"]);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache_owned").await, 54, "only what embsync wrote is embsync's");
}

#[tokio::test(flavor = "current_thread")]
async fn failed_cancelled_and_forgotten_batches_release_their_values() {
    for case in ["failed", "cancelled", "unknown"] {
        let all = values("value", 60);
        let switches = match case {
            "failed" => r#"{"failValidation": true}"#,
            _ => r#"{"completionMs": 600000}"#,
        };
        let mut w = World::new(&all, 50, switches).await;
        w.paused().await;
        match case {
            "cancelled" => {
                for batch in w.api.batches() {
                    w.api.cancel(batch["id"].as_str().unwrap()).await.expect("cancel");
                }
            }
            "unknown" => {
                w.api.admin("DELETE", "/_admin/batches", "");
            }
            _ => {}
        }
        let report = w.finished().await;
        assert_eq!(report.totals.embedded, 0, "{case}");
        assert_eq!(w.db.texts("SELECT state FROM embedding_sync_batches").await, [case.to_string()].into(), "{case}");
        assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0, "{case}: released");
        // Released, the values go the synchronous way (here below the threshold).
        w.config.batch_api = Some(BatchApiSetting { min_values: 1000 });
        w.store = w.db.store(&w.config).await;
        let next = w.finished().await;
        assert_eq!(next.totals.embedded, 60, "{case}");
        for value in &all {
            assert_eq!(w.provider.requests_for(value), 2, "{case}: {value} once per model");
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_model_change_re_embeds_its_column_through_batches() {
    let all = values("value", 60);
    let mut w = World::new(&all, 1000, "{}").await;
    let first = w.finished().await;
    assert_eq!((first.totals.embedded, w.provider.calls.borrow().len()), (60, 2), "below minValues: the synchronous way");
    // The large column's model changes: its 60 values are re-embedded, through a batch, and the
    // small column's are left alone.
    w.config = Config::parse(
        r#"{"version":"1.0","models":{"large":{"name":"text-embedding-3-small","dimensions":4},"small":{"name":"text-embedding-3-small","dimensions":2}},
        "batchSize":100,"batchApi":{"enabled":true,"minValues":50},"sources":[{"name":"Items","table":"items","column":"title"}]}"#,
    )
    .unwrap();
    w.store = w.db.store(&w.config).await;
    let waiting = w.paused().await;
    assert_eq!(waiting.pending_batches.map(|p| (p.batches, p.values)), Some((1, 60)));
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 60);
    assert_eq!((report.usage.large.batch_requests, report.usage.small.requests), (1, 0));
    assert_eq!(w.provider.calls.borrow().len(), 2, "nothing more went the synchronous way");
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache_owned WHERE large_model = 'text-embedding-3-small:4'").await, 60);
    assert_eq!(w.done().await, 60);
}

#[tokio::test(flavor = "current_thread")]
async fn a_cut_between_the_upload_and_its_record_uploads_again_and_runs_once() {
    let all = values("value", 60);
    let mut w = World::new(&all, 50, "{}").await;
    *w.api.steal_lease_after_upload.borrow_mut() = Some(w.db.url.clone());
    let cut = w.try_invoke().await;
    assert!(matches!(cut, Err(sync::SyncError::LeaseLost(_))), "{cut:?}");
    assert_eq!(w.api.count("POST /v1/files"), 1);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batches").await, 0, "nothing recorded");
    assert!(w.api.batches().is_empty(), "no batch was made of the file");
    // Once the thief's lease expired, the run's next invocation plans again: the values are
    // still pending, and go in new files.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    w.paused().await;
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 60);
    assert_eq!(w.api.count("POST /v1/files"), 3, "the unrecorded file, then one per model");
    assert_eq!(w.api.batches().len(), 2);
    once_per_model(&w.sent(), &all);
}

#[tokio::test(flavor = "current_thread")]
async fn values_two_sources_share_go_in_one_batch_and_both_sources_get_them() {
    let items = values("value", 40);
    let mut w = World::new(&items, 50, "{}").await;
    // `things` has 20 of items' values and 20 of its own.
    let things: Vec<String> = items[20..].iter().cloned().chain(values("thing", 20)).collect();
    w.db.source_table("things", "name", &things.iter().map(String::as_str).collect::<Vec<_>>()).await;
    w.config = config(100, &[("Items", "items", "title"), ("Things", "things", "name")]);
    w.config.batch_api = Some(BatchApiSetting { min_values: 50 });
    w.store = w.db.store(&w.config).await;
    let waiting = w.paused().await;
    // Items' 40 values, then the 20 of things' that items does not have: a file each, per model.
    assert_eq!(waiting.pending_batches.map(|p| (p.batches, p.values)), Some((4, 120)));
    w.finished().await;
    let distinct: Vec<String> = items.iter().chain(&things[20..]).cloned().collect();
    once_per_model(&w.sent(), &distinct);
    // The shared values are linked to things by the next run's plan, at no cost.
    w.finished().await;
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache_sources WHERE source_table = 'things'").await, 40);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_cache_sources WHERE source_table = 'items'").await, 40);
    once_per_model(&w.sent(), &distinct);
}

#[tokio::test(flavor = "current_thread")]
async fn a_file_whose_batch_cannot_be_looked_up_is_given_up_after_two_days() {
    let all = values("value", 60);
    let mut w = World::new(&all, 50, "{}").await;
    w.api.create_unsent.set(true);
    w.paused().await;
    w.api.create_unsent.set(false);
    w.api.list_fails.set(true);
    // Not looked up: no create either (it might make a second batch), and the run waits.
    w.paused().await;
    assert!(w.api.batches().is_empty());
    assert_eq!(w.open_files().await, 2);
    w.db.exec("UPDATE embedding_sync_batches SET created_at = now() - interval '49 hours'").await;
    let report = w.finished().await;
    assert_eq!(report.totals.embedded, 0);
    assert_eq!(w.db.texts("SELECT state FROM embedding_sync_batches").await, ["abandoned".to_string()].into());
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0);
    // Released, the values go their way again in the next run.
    w.api.list_fails.set(false);
    w.paused().await;
    w.finished().await;
    assert_eq!(w.done().await, 60);
    once_per_model(&w.sent(), &all);
}
