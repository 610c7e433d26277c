//! Fan-out over a queue, on real Postgres: a run's large source split into ranges, embedded by
//! several consumers at the same time (each a `PgStore` on its own connection, interleaved on one
//! thread), each fenced by its claim; the sweeper; the dead-letter queue; `/status`.

mod support;

use embsync_core::config::Config;
use embsync_core::fanout::{self, Consume, Consumed, FanOut, RangeMessage};
use embsync_core::provider::ProviderError;
use embsync_core::report::{RunReport, Trigger};
use embsync_core::sync::{self, Budget, Invocation, Outcome, RetryPolicy, RunId, Store, SyncError};
use embsync_store::PgStore;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Duration;
use support::hooked::{Call, Go, Hook, Hooked};
use support::{FakeProvider, TestDb, TestRuntime};

const FAN: FanOut = FanOut { min_values: 20, range_values: 10, consumers: 3 };

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} value {i}")).collect()
}

/// A database with `items.name` (`n` values) and `tags.label` (3 values), and its config.
async fn setup(n: usize) -> (TestDb, Config, Vec<String>) {
    let db = TestDb::create().await;
    let items = values("item", n);
    let refs: Vec<&str> = items.iter().map(String::as_str).collect();
    db.source_table("items", "name", &refs).await;
    db.source_table("tags", "label", &["red", "green", "blue"]).await;
    let config = support::config(4, &[("Items", "items", "name"), ("Tags", "tags", "label")]);
    (db, config, items)
}

/// One lease-holding invocation with fan-out.
async fn invoke(config: &Config, store: &mut impl Store, provider: &FakeProvider, holder: &str) -> Result<Outcome, SyncError> {
    let id = RunId(format!("run-{holder}"));
    let inv = Invocation {
        trigger: Trigger::Cron,
        retry: RetryPolicy::default(),
        budget: Budget::default(),
        new_run: &id,
        holder,
        hint: None,
        fanout: Some(FAN),
        batch_api: None,
    };
    sync::invoke(config, store, provider, &TestRuntime::default(), &inv).await
}

fn fanned_out(outcome: Outcome) -> Vec<RangeMessage> {
    match outcome {
        Outcome::FannedOut { messages, .. } => messages,
        other => panic!("expected the run to fan out, got {other:?}"),
    }
}

fn finished(outcome: Outcome) -> RunReport {
    match outcome {
        Outcome::Finished(report) => report,
        other => panic!("expected the run to finish, got {other:?}"),
    }
}

fn consume_with(holder: &str, max_batches: u64) -> (String, Budget) {
    (holder.to_owned(), Budget::new(max_batches, 60.0, 120.0).unwrap())
}

async fn consume(
    config: &Config,
    store: &mut impl Store,
    provider: &FakeProvider,
    holder: &str,
    budget: Budget,
    msg: &RangeMessage,
) -> Result<Consumed, SyncError> {
    let inv = Consume { holder, budget, retry: RetryPolicy::default(), fanout: FAN };
    fanout::consume(config, store, provider, &TestRuntime::default(), &inv, msg).await
}

/// Requests per model that carried `value`.
fn paid(provider: &FakeProvider, value: &str) -> (usize, usize) {
    let calls = provider.calls.borrow();
    let n = |model: &str| calls.iter().filter(|(m, inputs)| m == model && inputs.iter().any(|i| i == value)).count();
    (n("text-embedding-3-large"), n("text-embedding-3-small"))
}

async fn range_states(db: &TestDb) -> Vec<(i64, String, i64, String)> {
    let rows = db
        .client
        .query("SELECT id, state, generation, coalesce(last_error, '') FROM embedding_sync_ranges ORDER BY id", &[])
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn three_consumers_embed_a_fanned_out_run_once_per_model_with_exact_counters() {
    let (db, config, items) = setup(57).await;
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    // Items (57 values) fans out into 6 ranges of 10 (the last one 7); tags (3), under the
    // threshold, is synced in-line once items is done.
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead-1").await.unwrap());
    assert_eq!(messages.len(), 6, "{messages:?}");
    let bounds = db
        .client
        .query("SELECT lo, hi, next FROM embedding_sync_ranges ORDER BY hi", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
        .collect::<Vec<_>>();
    assert_eq!(bounds[0].0, "", "the first range starts below every hash");
    for w in bounds.windows(2) {
        assert_eq!(w[1].0, w[0].1, "ranges are contiguous: each starts where the one before ends");
    }
    assert!(bounds.iter().all(|(lo, _, next)| lo == next), "no progress yet");
    assert_eq!(provider.requests_for("red"), 0, "the next source waits for the fanned-out one");
    assert!(items.iter().all(|v| paid(&provider, v) == (0, 0)), "the fanned-out source waits for the consumers");
    // The run waits: a second lease holder sends nothing (every message was sent just now).
    assert!(fanned_out(invoke(&config, &mut lead, &provider, "lead-2").await.unwrap()).is_empty());

    // Every message is delivered twice (at least once delivery), to three consumers with a
    // budget of one batch each: they hand ranges on, and take each other's over.
    let queue: RefCell<VecDeque<RangeMessage>> = RefCell::new(messages.iter().chain(messages.iter()).cloned().collect());
    let ready = RefCell::new(0);
    let skipped = RefCell::new(Vec::new());
    let worker = |store: PgStore, holder: &'static str| {
        let (queue, ready, skipped, config, provider) = (&queue, &ready, &skipped, &config, &provider);
        async move {
            let mut store = store;
            let (holder, budget) = consume_with(holder, 1);
            loop {
                let Some(msg) = queue.borrow_mut().pop_front() else { break };
                match consume(config, &mut store, provider, &holder, budget, &msg).await.unwrap() {
                    Consumed::Done { run_ready } => *ready.borrow_mut() += usize::from(run_ready),
                    Consumed::Continue(m) => queue.borrow_mut().push_back(m),
                    Consumed::Skipped(why) => skipped.borrow_mut().push(why),
                }
                tokio::task::yield_now().await;
            }
        }
    };
    let (a, b, c) = (db.store(&config).await, db.store(&config).await, db.store(&config).await);
    futures::join!(worker(a, "consumer-a"), worker(b, "consumer-b"), worker(c, "consumer-c"));
    // The last to read after the last commit sees it; two ending at once may both see it.
    assert!(*ready.borrow() >= 1, "a consumer saw the last range settle");
    assert!(skipped.borrow().iter().any(|w| w.contains("is done")), "duplicates of done ranges were skipped: {:?}", skipped.borrow());
    assert!(range_states(&db).await.iter().all(|(_, state, _, _)| state == "done"));
    for v in &items {
        assert_eq!(paid(&provider, v), (1, 1), "{v} is paid once per model");
    }
    // The counters the consumers committed, with their batches.
    let embedded = db.count("SELECT embedded FROM embedding_sync_run_sources WHERE source_table = 'items'").await;
    assert_eq!(embedded, 57);

    // The next lease holder finishes the run: nothing left to embed, every counter exact.
    let report = finished(invoke(&config, &mut lead, &provider, "lead-3").await.unwrap());
    assert_eq!(provider.requests_for("red"), 2, "tags was synced in-line");
    assert!(items.iter().all(|v| paid(&provider, v) == (1, 1)), "the pass from the start found nothing left");
    let items_report = &report.sources[0];
    assert_eq!((items_report.new, items_report.embedded, items_report.errors), (57, 57, 0));
    assert_eq!(items_report.batches, 17, "57 values: 5 ranges of 10 in 3 batches of at most 4, and one of 7 in 2");
    assert_eq!(report.sources[1].embedded, 3);
    assert_eq!(report.totals.embedded, 60);
    let requests: u64 = report.usage.large.requests + report.usage.small.requests;
    assert_eq!(requests as usize, provider.calls.borrow().len(), "every request is in the run's usage");
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL").await,
        60
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_ranges").await, 0, "a finished run's ranges are dropped");
    let stored: String = db.client.query_one("SELECT report::text FROM embedding_sync_runs", &[]).await.unwrap().get(0);
    let stored: RunReport = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored.totals, report.totals);
}

/// Before consumer A's first batch is written, its claim expires and consumer B claims the
/// range, writes a batch and hands it on (queued, unclaimed).
struct TakenOver<'a> {
    db: &'a TestDb,
    config: &'a Config,
    provider: &'a FakeProvider,
    range: i64,
    other: Option<PgStore>,
    outcome: Option<Consumed>,
}

impl Hook for TakenOver<'_> {
    async fn before(&mut self, call: &Call<'_>, _: &mut PgStore) -> Go {
        if let (Call::Store { .. }, true) = (call, self.outcome.is_none()) {
            let mut other = self.other.take().expect("the other consumer's store");
            self.db.exec(&format!("UPDATE embedding_sync_ranges SET expires_at = now() - interval '1 s' WHERE id = {}", self.range)).await;
            let msg = RangeMessage { run: "run-lead".into(), range: self.range };
            // B writes one batch and hands the range on: it stays queued, unclaimed.
            let (holder, budget) = consume_with("consumer-b", 1);
            self.outcome = Some(consume(self.config, &mut other, self.provider, &holder, budget, &msg).await.unwrap());
            self.other = Some(other);
        }
        Go::Run
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_consumer_whose_claim_was_taken_over_writes_nothing_more() {
    let (db, config, items) = setup(25).await;
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    assert_eq!(messages.len(), 3);
    let range = messages[0].range;
    let hook = TakenOver { db: &db, config: &config, provider: &provider, range, other: Some(db.store(&config).await), outcome: None };
    let mut a = Hooked::new(db.store(&config).await, hook);
    let (holder, budget) = consume_with("consumer-a", 100);
    let outcome = consume(&config, &mut a, &provider, &holder, budget, &messages[0]).await.unwrap();
    assert!(matches!(&outcome, Consumed::Skipped(why) if why.contains("claim")), "{outcome:?}");
    assert_eq!(a.hook.outcome, Some(Consumed::Continue(messages[0].clone())));
    assert_eq!(db.count("SELECT embedded FROM embedding_sync_run_sources WHERE source_table = 'items'").await, 4, "B's batch only");
    // B's next message finishes the range.
    let mut b = a.hook.other.take().expect("B's store");
    let (holder, budget) = consume_with("consumer-b", 100);
    assert_eq!(consume(&config, &mut b, &provider, &holder, budget, &messages[0]).await.unwrap(), Consumed::Done { run_ready: false });
    let states = range_states(&db).await;
    assert_eq!((states[0].1.as_str(), states[0].2), ("done", 3), "done by the third claim");
    // A's batches went out before it found its claim gone (paid twice, as batches in flight
    // are), but A wrote nothing: the range's 10 values are counted once, by B.
    let embedded = db.count("SELECT embedded FROM embedding_sync_run_sources WHERE source_table = 'items'").await;
    assert_eq!(embedded, 10);
    let first_range: Vec<&String> = items.iter().filter(|v| paid(&provider, v).0 > 0).collect();
    assert_eq!(first_range.len(), 10);
    // B paid each value once; A at most once more (its batches in flight when it found out).
    assert!(first_range.iter().all(|v| matches!(paid(&provider, v), (1, 1) | (2, 2))));
    assert!(first_range.iter().any(|v| paid(&provider, v) == (2, 2)), "A had its first batch in flight");
    // A's claim is gone for good: its store refuses every write.
    let e = a.inner.end_claim(embsync_core::fanout::RangeEnd::Done).await.unwrap_err();
    assert!(e.is_lease_lost(), "{e}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_redelivered_or_duplicate_message_costs_nothing() {
    let (db, config, _) = setup(25).await;
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    let (m0, m1) = (&messages[0], &messages[1]);
    let mut a = db.store(&config).await;
    let mut b = db.store(&config).await;
    let (holder, budget) = consume_with("consumer-a", 100);
    assert_eq!(consume(&config, &mut a, &provider, &holder, budget, m0).await.unwrap(), Consumed::Done { run_ready: false });
    let calls = provider.calls.borrow().len();
    // Redelivered after it was done.
    let again = consume(&config, &mut b, &provider, "consumer-b", budget, m0).await.unwrap();
    assert!(matches!(&again, Consumed::Skipped(why) if why.contains("is done")), "{again:?}");
    // A duplicate while another consumer holds the range.
    let run = RunId(m1.run.clone());
    assert!(matches!(a.claim_range(&run, m1.range, "consumer-a", Duration::from_secs(60)).await.unwrap(), fanout::RangeClaim::Claimed(_)));
    let dup = consume(&config, &mut b, &provider, "consumer-b", budget, m1).await.unwrap();
    assert!(matches!(&dup, Consumed::Skipped(why) if why.contains("held by another consumer")), "{dup:?}");
    // A message of an unknown run or range.
    let unknown =
        consume(&config, &mut b, &provider, "consumer-b", budget, &RangeMessage { run: "nope".into(), range: m1.range }).await.unwrap();
    assert!(matches!(&unknown, Consumed::Skipped(why) if why.contains("unknown")), "{unknown:?}");
    assert_eq!(provider.calls.borrow().len(), calls, "none of them called the provider");
    assert_eq!(db.count("SELECT embedded FROM embedding_sync_run_sources WHERE source_table = 'items'").await, 10);
}

#[tokio::test(flavor = "current_thread")]
async fn a_failing_range_keeps_its_progress_reaches_the_dead_letter_queue_and_the_run_says_so() {
    let (db, config, items) = setup(25).await;
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    let calls = provider.calls.borrow().len();
    // The first batch (2 requests) goes through, then the provider is down for good.
    for n in calls + 3..calls + 200 {
        provider.faults.borrow_mut().insert(n, ProviderError::Server { status: 503, message: "down".into() });
    }
    let mut a = db.store(&config).await;
    let (holder, budget) = consume_with("consumer-a", 100);
    let e = consume(&config, &mut a, &provider, &holder, budget, &messages[0]).await.unwrap_err();
    assert!(matches!(e, SyncError::Unavailable(_)), "{e}");
    let row = db
        .client
        .query_one(
            "SELECT state, next > lo, attempts, coalesce(last_error, ''), expires_at <= now() FROM embedding_sync_ranges WHERE id = $1",
            &[&messages[0].range],
        )
        .await
        .unwrap();
    let (state, moved, attempts, error, released): (String, bool, i32, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!((state.as_str(), moved, attempts, released), ("queued", true, 1, true), "progress kept, claim released");
    assert!(error.contains("503"), "{error}");
    assert_eq!(
        db.count("SELECT embedded FROM embedding_sync_run_sources WHERE source_table = 'items'").await,
        4,
        "the first batch is kept"
    );
    // The queue gives up: the dead-letter queue's consumer marks it dead; /status shows it.
    fanout::dead_letter(&mut a, &messages[0], "max retries reached: the provider is unavailable (503)").await.unwrap();
    let status = a.current_run().await.unwrap().expect("an open run");
    let ranges = status.sources[0].ranges.as_ref().expect("items has ranges");
    assert_eq!((ranges.queued, ranges.done, ranges.dead), (2, 0, 1));
    assert_eq!(ranges.dead_ranges[0].range, messages[0].range);
    assert!(ranges.dead_ranges[0].error.contains("max retries"), "{:?}", ranges.dead_ranges);
    assert!(status.sources[1].ranges.is_none(), "tags was synced in-line");
    // The provider is back: the other ranges are consumed, the run finishes and says what died.
    provider.faults.borrow_mut().clear();
    for m in &messages[1..] {
        consume(&config, &mut a, &provider, &holder, budget, m).await.unwrap();
    }
    let report = finished(invoke(&config, &mut lead, &provider, "lead-2").await.unwrap());
    let warning = report.sources[0].warning.as_deref().unwrap_or_default();
    assert!(warning.contains("1 of its 3 fan-out ranges were given up") && warning.contains("max retries"), "{warning}");
    // The in-line pass tried the dead range's values again: everything is embedded, once.
    assert_eq!(report.sources[0].embedded, 25);
    for v in &items {
        assert_eq!(paid(&provider, v).0.min(1), 1, "{v} is embedded");
    }
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL").await,
        28
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_sweeper_sends_again_what_was_lost_and_nothing_held() {
    let (db, config, _) = setup(35).await;
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    let ids: Vec<i64> = messages.iter().map(|m| m.range).collect();
    assert_eq!(ids.len(), 4);
    assert!(fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap()).is_empty(), "all sent just now");
    // Range 0's message was lost (sent long ago); range 1 is claimed by a consumer that died
    // (expired, sent just now); range 2 is held by a live consumer (sent long ago); range 3 was
    // handed on by a consumer whose budget was spent (its message is in the queue).
    let mut c = db.store(&config).await;
    let run = RunId(messages[0].run.clone());
    assert!(matches!(c.claim_range(&run, ids[1], "dead", Duration::from_secs(60)).await.unwrap(), fanout::RangeClaim::Claimed(_)));
    let mut d = db.store(&config).await;
    assert!(matches!(d.claim_range(&run, ids[2], "alive", Duration::from_secs(60)).await.unwrap(), fanout::RangeClaim::Claimed(_)));
    db.exec(&format!("UPDATE embedding_sync_ranges SET expires_at = now() - interval '1 s' WHERE id = {}", ids[1])).await;
    db.exec(&format!("UPDATE embedding_sync_ranges SET sent_at = now() - interval '10 minutes' WHERE id IN ({}, {})", ids[0], ids[2]))
        .await;
    let mut e = db.store(&config).await;
    let (holder, budget) = consume_with("consumer-e", 1);
    assert_eq!(consume(&config, &mut e, &provider, &holder, budget, &messages[3]).await.unwrap(), Consumed::Continue(messages[3].clone()));
    let again: Vec<i64> = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap()).iter().map(|m| m.range).collect();
    assert_eq!(again, vec![ids[0], ids[1]]);
    // Sent now: the next sweep leaves them alone.
    assert!(fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap()).is_empty());
    // The dead consumer's store writes nothing more; the live one goes on.
    assert!(c.end_claim(fanout::RangeEnd::Done).await.unwrap_err().is_lease_lost());
    assert!(!d.end_claim(fanout::RangeEnd::Done).await.unwrap(), "other ranges are still queued");
}

#[tokio::test(flavor = "current_thread")]
async fn without_fanout_a_large_source_is_synced_in_line() {
    let (db, config, _) = setup(57).await;
    let provider = FakeProvider::default();
    let mut store = db.store(&config).await;
    let report = support::invoke(&config, &mut store, &provider, &TestRuntime::default(), Budget::default(), "inv", None).await.unwrap();
    let report = finished(report);
    assert_eq!(report.totals.embedded, 60);
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_ranges").await, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_source_after_a_fanned_out_one_waits_so_shared_values_are_paid_once() {
    let (db, _, items) = setup(25).await;
    let refs: Vec<&str> = items.iter().map(String::as_str).collect();
    db.source_table("copies", "name", &refs).await;
    let config = support::config(4, &[("Items", "items", "name"), ("Copies", "copies", "name")]);
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    assert_eq!(messages.len(), 3);
    let planned = db.count("SELECT count(*) FROM embedding_sync_run_sources WHERE planned").await;
    assert_eq!(planned, 1, "copies is not planned while items' ranges are queued");
    let mut a = db.store(&config).await;
    let (holder, budget) = consume_with("consumer-a", 100);
    for m in &messages {
        consume(&config, &mut a, &provider, &holder, budget, m).await.unwrap();
    }
    let report = finished(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    assert_eq!((report.sources[0].embedded, report.sources[1].embedded, report.sources[1].reused), (25, 0, 25));
    for v in &items {
        assert_eq!(paid(&provider, v), (1, 1), "{v} is paid once per model");
    }
}

/// The claim expires after the range's last batch was written, before the consumer marks it done.
struct ExpiresBeforeTheEnd<'a> {
    db: &'a TestDb,
}

impl Hook for ExpiresBeforeTheEnd<'_> {
    async fn before(&mut self, call: &Call<'_>, _: &mut PgStore) -> Go {
        if let Call::EndClaim { .. } = call {
            self.db
                .exec("UPDATE embedding_sync_ranges SET expires_at = now() - interval '1 s' WHERE state = 'queued' AND holder IS NOT NULL")
                .await;
        }
        Go::Run
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_range_whose_claim_expired_before_its_end_is_finished_by_the_next_message_for_free() {
    let (db, config, _) = setup(25).await;
    let provider = FakeProvider::default();
    let mut lead = db.store(&config).await;
    let messages = fanned_out(invoke(&config, &mut lead, &provider, "lead").await.unwrap());
    let mut a = Hooked::new(db.store(&config).await, ExpiresBeforeTheEnd { db: &db });
    let (holder, budget) = consume_with("consumer-a", 100);
    let outcome = consume(&config, &mut a, &provider, &holder, budget, &messages[0]).await.unwrap();
    assert!(matches!(&outcome, Consumed::Skipped(why) if why.contains("claim")), "{outcome:?}");
    assert_eq!(range_states(&db).await[0].1, "queued", "not marked done by a consumer without its claim");
    assert_eq!(db.count("SELECT embedded FROM embedding_sync_run_sources WHERE source_table = 'items'").await, 10);
    let calls = provider.calls.borrow().len();
    let mut b = db.store(&config).await;
    let again = consume(&config, &mut b, &provider, "consumer-b", budget, &messages[0]).await.unwrap();
    assert_eq!(again, Consumed::Done { run_ready: false });
    assert_eq!(provider.calls.borrow().len(), calls, "nothing was left to embed");
    assert_eq!(range_states(&db).await[0].1, "done");
}
