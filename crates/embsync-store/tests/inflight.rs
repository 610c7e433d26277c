//! Provider requests in flight within an invocation, on the real store against real Postgres:
//! the window is used and never exceeded, and a pause while batches are in flight writes what
//! they got and resumes exactly where it stopped. Behaviour, not timing: the provider's delay
//! only makes requests overlap; the assertions count, they do not time.

mod support;

use embsync_core::config::{Config, ModelSpec};
use embsync_core::provider::{Embeddings, ProviderError};
use embsync_core::report::Trigger;
use embsync_core::sync::{self, Budget, Cursor, Embedder, Invocation, Outcome, RetryPolicy, RunId};
use embsync_store::PgStore;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use support::*;

const LARGE: &str = "text-embedding-3-large";

/// The fake provider behind a real delay, counting the requests in flight at once.
struct Slow {
    inner: FakeProvider,
    delay: Duration,
    in_flight: Cell<usize>,
    /// The most requests in flight at once.
    most: Cell<usize>,
    /// The requests in flight as each request started (itself included), in order.
    starts: RefCell<Vec<usize>>,
    /// Large-model requests with an input in this set fail with a 503 (an outage for them).
    down_for: RefCell<BTreeSet<String>>,
}

impl Slow {
    fn new(delay_ms: u64) -> Slow {
        Slow {
            inner: FakeProvider::default(),
            delay: Duration::from_millis(delay_ms),
            in_flight: Cell::new(0),
            most: Cell::new(0),
            starts: RefCell::default(),
            down_for: RefCell::default(),
        }
    }
}

impl Embedder for Slow {
    async fn embed(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        self.in_flight.set(self.in_flight.get() + 1);
        self.most.set(self.most.get().max(self.in_flight.get()));
        self.starts.borrow_mut().push(self.in_flight.get());
        tokio::time::sleep(self.delay).await;
        self.in_flight.set(self.in_flight.get() - 1);
        if model.name() == LARGE && inputs.iter().any(|i| self.down_for.borrow().contains(*i)) {
            return Err(ProviderError::Server { status: 503, message: "overloaded".into() });
        }
        self.inner.embed(model, inputs).await
    }
}

async fn invoke_slow(
    config: &Config,
    store: &mut PgStore,
    provider: &Slow,
    rt: &TestRuntime,
    holder: &str,
    hint: Option<&Cursor>,
) -> Outcome {
    let id = RunId(format!("run-{holder}"));
    let inv = Invocation { trigger: Trigger::Cron, retry: RetryPolicy::default(), budget: Budget::default(), new_run: &id, holder, hint, fanout: None, batch_api: None };
    sync::invoke(config, store, provider, rt, &inv).await.expect("an invocation")
}

/// Values that are done for the source: linked, with both embeddings.
async fn done_values(db: &TestDb) -> BTreeSet<String> {
    db.texts(
        "SELECT c.value FROM embedding_cache c JOIN embedding_cache_sources s USING (value_hash) \
         WHERE c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL",
    )
    .await
}

/// How many answered requests carried each (model, value) (failed ones never reach the fake).
fn paid(provider: &Slow) -> HashMap<(String, String), usize> {
    let mut out = HashMap::new();
    for (model, inputs) in provider.inner.calls.borrow().iter() {
        for i in inputs {
            *out.entry((model.clone(), i.clone())).or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn batches_overlap_up_to_the_window_and_never_past_it() {
    let db = TestDb::create().await;
    let values: Vec<String> = (0..16).map(|i| format!("value {i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    db.source_table("items", "title", &refs).await;
    // Eight batches of two values, each a request per model.
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (Slow::new(20), TestRuntime::default());
    let mut store = db.store(&config).await;
    let outcome = invoke_slow(&config, &mut store, &provider, &rt, "inv-1", None).await;
    let Outcome::Finished(report) = outcome else { panic!("one invocation does it all: {outcome:?}") };

    // Once the first batch (alone) is answered, two batches of two requests fly at once: five
    // connections (six less the database's) leave no room for a third.
    assert_eq!(provider.most.get(), 4, "requests in flight at once");
    assert_eq!(done_values(&db).await, values.iter().cloned().collect::<BTreeSet<_>>());
    let paid = paid(&provider);
    assert_eq!(paid.len(), 32, "every value with each model");
    assert!(paid.values().all(|&n| n == 1), "each paid once: {paid:?}");
    assert_eq!((report.totals.embedded, report.totals.batches), (16, 8), "{report:?}");
    // Counters written with each batch, in order: the stored run agrees.
    assert_eq!(db.count("SELECT sum(batches)::bigint FROM embedding_sync_run_sources").await, 8);
}

#[tokio::test(flavor = "current_thread")]
async fn an_outage_while_batches_are_in_flight_writes_what_they_got_and_resumes_where_it_stopped() {
    let db = TestDb::create().await;
    let mut values: Vec<String> = (0..8).map(|i| format!("item {i}")).collect();
    db.source_table("items", "title", &values.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // In hash order, batches of two. The first goes alone (the window opens once the provider
    // has answered); then the second and third go together, and the second's large requests
    // fail through every retry while the third is in flight.
    values.sort_by_key(|v| hash_of(v));
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (Slow::new(20), TestRuntime::default());
    let second: BTreeSet<String> = values[2..4].iter().cloned().collect();
    *provider.down_for.borrow_mut() = second.clone();
    let mut store = db.store(&config).await;
    let outcome = invoke_slow(&config, &mut store, &provider, &rt, "inv-1", None).await;
    let Outcome::Paused(report, cursor) = outcome else { panic!("an outage pauses: {outcome:?}") };
    assert!(report.stopped.as_deref().is_some_and(|s| s.contains("503")), "{report:?}");

    // The third batch was in flight: it is written (it is paid for); the second keeps its small
    // embeddings; the cursor stays after the first, before the batch cut short.
    let written: BTreeSet<String> = values[..2].iter().chain(&values[4..6]).cloned().collect();
    assert_eq!(done_values(&db).await, written);
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NULL AND embedding_small IS NOT NULL").await, 2);
    assert_eq!(cursor.after.as_deref(), Some(hash_of(&values[1]).as_str()), "the cursor stays before the batch cut short: {cursor:?}");

    // Healed, the next invocation goes on from the second batch and pays nothing twice.
    provider.down_for.borrow_mut().clear();
    let outcome = invoke_slow(&config, &mut store, &provider, &rt, "inv-2", Some(&cursor)).await;
    let Outcome::Finished(report) = outcome else { panic!("the run finishes: {outcome:?}") };
    assert_eq!(done_values(&db).await, values.iter().cloned().collect::<BTreeSet<_>>());
    let paid = paid(&provider);
    assert_eq!(paid.len(), 16, "every value with each model: {paid:?}");
    assert!(paid.values().all(|&n| n == 1), "each paid once: {paid:?}");
    assert_eq!(report.totals.embedded, 8, "{report:?}");
    assert_eq!(provider.inner.requests_for(&values[6]), 2, "the fourth batch went out only in the second invocation");
}

#[tokio::test(flavor = "current_thread")]
async fn the_configured_concurrency_and_a_429_narrow_the_window() {
    let values: Vec<String> = (0..12).map(|i| format!("value {i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();

    // `rate.maxConcurrency: 3`: one batch of two requests and no second (it would make four).
    let db = TestDb::create().await;
    db.source_table("items", "title", &refs).await;
    let mut narrow = config(2, &[("Items", "items", "title")]);
    narrow.rate.max_concurrency = std::num::NonZeroU8::new(3);
    let (provider, rt) = (Slow::new(10), TestRuntime::default());
    let mut store = db.store(&narrow).await;
    assert!(matches!(invoke_slow(&narrow, &mut store, &provider, &rt, "inv-1", None).await, Outcome::Finished(_)));
    assert_eq!(provider.most.get(), 2, "requests in flight at once with maxConcurrency 3");
    assert_eq!(done_values(&db).await, values.iter().cloned().collect::<BTreeSet<_>>());

    // A 429 on the second batch's first request halves the default five to two: one batch at a time from then
    // on, and the next batch waits for the Retry-After (the runtime's virtual clock sleeps it).
    let db = TestDb::create().await;
    db.source_table("items", "title", &refs).await;
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (Slow::new(10), TestRuntime::default());
    provider
        .inner
        .faults
        .borrow_mut()
        .insert(3, ProviderError::RateLimited { retry_after: Some(Duration::from_secs(7)), message: "slow down".into() });
    let mut store = db.store(&config).await;
    assert!(matches!(invoke_slow(&config, &mut store, &provider, &rt, "inv-1", None).await, Outcome::Finished(_)));
    assert_eq!(done_values(&db).await, values.iter().cloned().collect::<BTreeSet<_>>());
    // The first batch went alone, then two together (four requests), the third request (the
    // second batch's large) answered 429; its retry goes in its own slot; then one batch at a
    // time for a while, until the concurrency has grown back (by about one request per window
    // of answers) and two batches fly again.
    let starts = provider.starts.borrow().clone();
    assert_eq!(&starts[..6], [1, 2, 1, 2, 3, 4], "the first batch alone, then the window full: {starts:?}");
    assert!(starts[7..11].iter().all(|&n| n <= 2), "after the 429, two requests in flight at most: {starts:?}");
    assert!(starts[11..].contains(&4), "the window grows back: {starts:?}");
    assert!(rt.slept.borrow().iter().any(|d| *d == Duration::from_secs(7)), "Retry-After waited: {:?}", rt.slept.borrow());
}
