//! The whole sync driven in memory: a store that models the SQL semantics and a provider that
//! fails on command.

use crate::config::{Config, ModelSpec};
use crate::hash::{Value, ValueHash};
use crate::provider::{Embeddings, ProviderError};
use crate::report::Trigger;
use crate::sync::*;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

#[derive(Clone, Debug)]
struct Row {
    value: String,
    large: Option<Vec<f32>>,
    small: Option<Vec<f32>>,
    #[allow(dead_code)]
    source: (String, String),
    owned: bool,
}

#[derive(Default)]
struct MemStore {
    tables: HashMap<(String, String), Vec<Option<String>>>,
    cache: BTreeMap<ValueHash, Row>,
    links: BTreeSet<(String, String, ValueHash)>,
    schema: bool,
    /// Fails the n-th call to `store` (1-based) after nothing was written.
    fail_store_call: Option<usize>,
    store_calls: usize,
}

impl MemStore {
    fn set(&mut self, table: &str, column: &str, values: &[&str]) {
        self.tables.insert((table.into(), column.into()), values.iter().map(|v| Some(v.to_string())).collect());
    }

    fn distinct(&self, s: &Source) -> Result<BTreeMap<ValueHash, (String, i32)>, StoreError> {
        let rows = self
            .tables
            .get(&(s.table_key(), s.column_key().to_owned()))
            .ok_or_else(|| StoreError(format!("relation \"{}\" does not exist", s.table)))?;
        let mut out = BTreeMap::new();
        for v in rows.iter().flatten().filter_map(|v| Value::normalize(v)) {
            out.entry(v.hash()).or_insert((v.as_str().to_owned(), 0)).1 += 1;
        }
        Ok(out)
    }

    fn key(s: &Source) -> (String, String) {
        (s.table_key(), s.column_key().to_owned())
    }

    fn linked(&self, s: &Source, h: &ValueHash) -> bool {
        let (t, c) = Self::key(s);
        self.links.contains(&(t, c, h.clone())) && self.complete(h)
    }

    fn complete(&self, h: &ValueHash) -> bool {
        self.cache.get(h).is_some_and(|r| r.large.is_some() && r.small.is_some())
    }

    fn link_count(&self, s: &Source) -> usize {
        let (t, c) = Self::key(s);
        self.links.iter().filter(|(lt, lc, _)| *lt == t && *lc == c).count()
    }
}

use crate::config::Source;

impl Store for MemStore {
    async fn ensure_schema(&mut self, _: &Config) -> Result<(), StoreError> {
        self.schema = true;
        Ok(())
    }

    async fn counts(&mut self, s: &Source) -> Result<SourceCounts, StoreError> {
        let values = self.distinct(s)?;
        let fresh: Vec<_> = values.iter().filter(|(h, _)| !self.linked(s, h)).collect();
        let (t, c) = Self::key(s);
        Ok(SourceCounts {
            total: values.len() as u64,
            new: fresh.len() as u64,
            reusable: fresh.iter().filter(|(h, _)| self.complete(h)).count() as u64,
            embed_tokens: fresh.iter().filter(|(h, _)| !self.complete(h)).map(|(_, (v, _))| v.len().div_ceil(4) as u64).sum(),
            stale: self.links.iter().filter(|(lt, lc, h)| *lt == t && *lc == c && !values.contains_key(h)).count() as u64,
        })
    }

    async fn link_reusable(&mut self, s: &Source) -> Result<u64, StoreError> {
        let values = self.distinct(s)?;
        let (t, c) = Self::key(s);
        let mut n = 0;
        for h in values.keys() {
            if self.complete(h) && self.links.insert((t.clone(), c.clone(), h.clone())) {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn pending(&mut self, s: &Source, after: Option<&ValueHash>, limit: usize) -> Result<Vec<PendingValue>, StoreError> {
        let values = self.distinct(s)?;
        Ok(values
            .into_iter()
            .filter(|(h, _)| after.is_none_or(|a| h > a))
            .filter(|(h, _)| !(self.complete(h) && self.linked(s, h)))
            .take(limit)
            .map(|(h, (v, n))| {
                let row = self.cache.get(&h);
                PendingValue {
                    has_large: row.is_some_and(|r| r.large.is_some()),
                    has_small: row.is_some_and(|r| r.small.is_some()),
                    hash: h,
                    value: v,
                    occurrences: n,
                }
            })
            .collect())
    }

    async fn store(&mut self, s: &Source, batch: &[EmbeddedValue]) -> Result<(), StoreError> {
        self.store_calls += 1;
        if self.fail_store_call == Some(self.store_calls) {
            return Err(StoreError("connection reset".into()));
        }
        let (t, c) = Self::key(s);
        for v in batch {
            let row = self.cache.entry(v.hash.clone()).or_insert_with(|| Row {
                value: v.value.clone(),
                large: None,
                small: None,
                source: (t.clone(), c.clone()),
                owned: true,
            });
            if row.large.is_none() {
                row.large = v.large.clone();
            }
            if row.small.is_none() {
                row.small = v.small.clone();
            }
            self.links.insert((t.clone(), c.clone(), v.hash.clone()));
        }
        Ok(())
    }

    async fn remove_stale(&mut self, s: &Source) -> Result<StaleOutcome, StoreError> {
        let values = self.distinct(s)?;
        let (t, c) = Self::key(s);
        let before = self.links.len();
        self.links.retain(|(lt, lc, h)| !(*lt == t && *lc == c && !values.contains_key(h)));
        let unlinked = (before - self.links.len()) as u64;
        let linked: BTreeSet<ValueHash> = self.links.iter().map(|(_, _, h)| h.clone()).collect();
        let before = self.cache.len();
        self.cache.retain(|h, r| !r.owned || linked.contains(h));
        Ok(StaleOutcome { unlinked, deleted: (before - self.cache.len()) as u64 })
    }
}

/// What the fake provider answers for its n-th request (1-based); unlisted requests succeed.
#[derive(Default)]
struct MemProvider {
    faults: HashMap<usize, ProviderError>,
    /// Inputs containing this always fail with 400.
    poison: Option<String>,
    calls: RefCell<Vec<(String, Vec<String>)>>,
}

impl MemProvider {
    fn requests_for(&self, value: &str) -> usize {
        self.calls.borrow().iter().filter(|(_, inputs)| inputs.iter().any(|i| i == value)).count()
    }
}

impl Embedder for MemProvider {
    async fn embed(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let n = {
            let mut calls = self.calls.borrow_mut();
            calls.push((model.name().to_owned(), inputs.iter().map(|s| s.to_string()).collect()));
            calls.len()
        };
        if let Some(e) = self.faults.get(&n) {
            return Err(e.clone());
        }
        if let Some(p) = &self.poison {
            if inputs.iter().any(|i| i.contains(p.as_str())) {
                return Err(ProviderError::Rejected { status: 400, message: "bad input".into() });
            }
        }
        let dims = model.dimensions() as usize;
        Ok(Embeddings { vectors: inputs.iter().map(|i| vec![i.len() as f32; dims]).collect(), prompt_tokens: inputs.len() as u64 })
    }
}

#[derive(Default)]
struct MemRuntime {
    now: RefCell<f64>,
    slept: RefCell<Vec<Duration>>,
    logs: RefCell<Vec<String>>,
}

impl Runtime for MemRuntime {
    fn now_ms(&self) -> f64 {
        *self.now.borrow_mut() += 1.0;
        *self.now.borrow()
    }
    async fn sleep(&self, d: Duration) {
        self.slept.borrow_mut().push(d);
    }
    fn random(&self) -> f64 {
        0.5
    }
    fn log(&self, line: &str) {
        self.logs.borrow_mut().push(line.to_owned());
    }
}

fn config(batch: u32) -> Config {
    Config::parse(&format!(
        r#"{{"version":"1.0","models":{{"large":{{"name":"text-embedding-3-large","dimensions":4}},"small":{{"name":"text-embedding-3-small","dimensions":2}}}},
        "batchSize":{batch},
        "sources":[{{"name":"A","table":"ta","column":"ca"}},{{"name":"B","table":"tb","column":"cb"}}]}}"#
    ))
    .unwrap()
}

struct World {
    config: Config,
    store: MemStore,
    provider: MemProvider,
    rt: MemRuntime,
}

impl World {
    fn new(batch: u32) -> World {
        World { config: config(batch), store: MemStore::default(), provider: MemProvider::default(), rt: MemRuntime::default() }
    }

    fn run(&mut self) -> Result<crate::report::RunReport, SyncError> {
        futures::executor::block_on(run(&self.config, &mut self.store, &self.provider, &self.rt, Trigger::Cron, RetryPolicy::default()))
    }

    /// `name: total/new/stale/unchanged/reused/embedded/deleted/errors/batches` per source.
    fn summary(&mut self) -> String {
        match self.run() {
            Ok(r) => r
                .sources
                .iter()
                .map(|s| {
                    format!(
                        "{}: total={} new={} stale={} unchanged={} reused={} embedded={} deleted={} errors={} batches={}{}",
                        s.name, s.total, s.new, s.stale, s.unchanged, s.reused, s.embedded, s.deleted, s.errors, s.batches,
                        s.error.as_ref().map(|e| format!(" error={e}")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("error: {e}"),
        }
    }

    fn calls(&self) -> usize {
        self.provider.calls.borrow().len()
    }
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[test]
fn first_run_embeds_and_second_run_is_free() {
    let mut w = World::new(10);
    let a = values("alpha", 25);
    let mut a_rows = refs(&a);
    a_rows.extend(["  alpha 0 ", "", "   ", "alpha 1"]);
    w.store.set("ta", "ca", &a_rows);
    w.store.set("tb", "cb", &["beta"]);
    assert_eq!(w.summary(), "A: total=25 new=25 stale=0 unchanged=0 reused=0 embedded=25 deleted=0 errors=0 batches=3\nB: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1");
    // Two models per batch: 3 + 1 batches.
    assert_eq!(w.calls(), 8);
    let logs = w.rt.logs.borrow().clone();
    for line in ["Batch 1 of 3: A (10 values)", "Batch 2 of 3: A (10 values)", "Batch 3 of 3: A (5 values)", "Batch 1 of 1: B (1 values)"] {
        assert!(logs.iter().any(|l| l == line), "{line} missing from {logs:#?}");
    }
    assert_eq!(w.store.cache.get(&Value::normalize("alpha 0").unwrap().hash()).map(|r| r.value.as_str()), Some("alpha 0"));

    assert_eq!(w.summary(), "A: total=25 new=0 stale=0 unchanged=25 reused=0 embedded=0 deleted=0 errors=0 batches=0\nB: total=1 new=0 stale=0 unchanged=1 reused=0 embedded=0 deleted=0 errors=0 batches=0");
    assert_eq!(w.calls(), 8, "a re-run must not call the provider");
}

#[test]
fn stale_values_are_unlinked_and_deleted() {
    let mut w = World::new(100);
    w.store.set("ta", "ca", &["one", "two", "three"]);
    w.store.set("tb", "cb", &["x"]);
    w.run().unwrap();
    w.store.set("ta", "ca", &["one", "four"]);
    assert_eq!(w.summary(), "A: total=2 new=1 stale=2 unchanged=1 reused=0 embedded=1 deleted=2 errors=0 batches=1\nB: total=1 new=0 stale=0 unchanged=1 reused=0 embedded=0 deleted=0 errors=0 batches=0");
    assert!(!w.store.cache.contains_key(&Value::normalize("two").unwrap().hash()));
    assert_eq!(w.store.link_count(&w.config.sources[0]), 2);
}

#[test]
fn shared_value_is_embedded_once_and_kept_while_any_source_has_it() {
    let mut w = World::new(100);
    w.store.set("ta", "ca", &["shared", "only a"]);
    w.store.set("tb", "cb", &["shared"]);
    assert_eq!(w.summary(), "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=2 deleted=0 errors=0 batches=1\nB: total=1 new=1 stale=0 unchanged=0 reused=1 embedded=0 deleted=0 errors=0 batches=0");
    assert_eq!(w.provider.requests_for("shared"), 2, "once per model");
    w.store.set("ta", "ca", &["only a"]);
    assert_eq!(w.summary(), "A: total=1 new=0 stale=1 unchanged=1 reused=0 embedded=0 deleted=0 errors=0 batches=0\nB: total=1 new=0 stale=0 unchanged=1 reused=0 embedded=0 deleted=0 errors=0 batches=0");
    assert!(w.store.cache.contains_key(&Value::normalize("shared").unwrap().hash()));
    w.store.set("tb", "cb", &[]);
    assert_eq!(w.summary(), "A: total=1 new=0 stale=0 unchanged=1 reused=0 embedded=0 deleted=0 errors=0 batches=0\nB: total=0 new=0 stale=1 unchanged=0 reused=0 embedded=0 deleted=1 errors=0 batches=0");
}

#[test]
fn foreign_rows_are_reused_and_never_deleted() {
    let mut w = World::new(100);
    let foreign = |v: &str, both: bool| Row {
        value: v.into(),
        large: Some(vec![9.0; 4]),
        small: both.then(|| vec![9.0; 2]),
        source: ("elsewhere".into(), "x".into()),
        owned: false,
    };
    w.store.cache.insert(Value::normalize("reuse me").unwrap().hash(), foreign("reuse me", true));
    w.store.cache.insert(Value::normalize("half").unwrap().hash(), foreign("half", false));
    w.store.cache.insert(Value::normalize("unrelated").unwrap().hash(), foreign("unrelated", true));
    w.store.set("ta", "ca", &["reuse me", "half", "fresh"]);
    w.store.set("tb", "cb", &[]);
    assert_eq!(w.summary().lines().next().unwrap(), "A: total=3 new=3 stale=0 unchanged=0 reused=1 embedded=2 deleted=0 errors=0 batches=1");
    assert_eq!(w.provider.requests_for("reuse me"), 0);
    // Only the missing small embedding was asked for, and the existing large one was kept.
    let calls = w.provider.calls.borrow().clone();
    assert_eq!(calls.iter().filter(|(_, i)| i.contains(&"half".to_owned())).map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["text-embedding-3-small"]);
    assert_eq!(w.store.cache[&Value::normalize("half").unwrap().hash()].large, Some(vec![9.0; 4]));
    w.store.set("ta", "ca", &[]);
    assert_eq!(w.summary().lines().next().unwrap(), "A: total=0 new=0 stale=3 unchanged=0 reused=0 embedded=0 deleted=1 errors=0 batches=0");
    for v in ["reuse me", "half", "unrelated"] {
        assert!(w.store.cache.contains_key(&Value::normalize(v).unwrap().hash()), "foreign row {v} was deleted");
    }
}

#[test]
fn rate_limit_on_batch_two_is_retried_after_the_wait_asked_for() {
    let mut w = World::new(2);
    let a = values("v", 6);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &[]);
    w.provider.faults.insert(3, ProviderError::RateLimited { retry_after: Some(Duration::from_secs(3)), message: "slow down".into() });
    w.provider.faults.insert(4, ProviderError::Server { status: 503, message: "busy".into() });
    assert_eq!(w.summary().lines().next().unwrap(), "A: total=6 new=6 stale=0 unchanged=0 reused=0 embedded=6 deleted=0 errors=0 batches=3");
    let slept = w.rt.slept.borrow().clone();
    // The large model's request 3 gets the 429 and waits what it was told; its retry (request 4)
    // gets the 503 and backs off 2 x 500 ms with jitter 0.75.
    assert_eq!(slept, [Duration::from_secs(3), Duration::from_millis(750)]);
}

#[test]
fn a_value_that_always_fails_costs_only_itself() {
    let mut w = World::new(2);
    w.store.set("ta", "ca", &["good 1", "good 2", "bad apple", "good 3"]);
    w.store.set("tb", "cb", &["b"]);
    w.provider.poison = Some("bad".into());
    let summary = w.summary();
    // The batch holding the bad value fails for both models; the other batch and source go on.
    let bad_batch_values = 2;
    assert_eq!(summary, format!("A: total=4 new=4 stale=0 unchanged=0 reused=0 embedded={} deleted=0 errors={bad_batch_values} batches=2\nB: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1", 4 - bad_batch_values));
    w.provider.poison = None;
    assert_eq!(w.summary().lines().next().unwrap(), format!("A: total=4 new={bad_batch_values} stale=0 unchanged=2 reused=0 embedded={bad_batch_values} deleted=0 errors=0 batches=1"));
}

#[test]
fn one_model_failing_keeps_the_other_and_asks_only_for_the_missing_one_next_time() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p", "q"]);
    w.store.set("tb", "cb", &[]);
    // Call 2 is the small model of batch 1; a 400 is not retried.
    w.provider.faults.insert(2, ProviderError::Rejected { status: 400, message: "nope".into() });
    assert_eq!(w.summary().lines().next().unwrap(), "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=0 deleted=0 errors=2 batches=1");
    assert!(w.store.cache.values().all(|r| r.large.is_some() && r.small.is_none()));
    assert_eq!(w.summary().lines().next().unwrap(), "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=2 deleted=0 errors=0 batches=1");
    let calls = w.provider.calls.borrow().clone();
    assert_eq!(calls.last().map(|(m, _)| m.as_str()), Some("text-embedding-3-small"));
    assert_eq!(calls.len(), 3);
}

#[test]
fn unauthorized_stops_the_run_and_writes_nothing() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p"]);
    w.store.set("tb", "cb", &["q"]);
    w.provider.faults.insert(1, ProviderError::Unauthorized { status: 401 });
    assert_eq!(w.summary(), "error: sync stopped: the provider rejected the API key (401): check the OPENAI_API_KEY secret");
    assert!(w.store.cache.is_empty());
    assert!(w.calls() <= 2, "no retries and no further batches");
}

#[test]
fn a_failing_store_fails_its_source_and_the_run_goes_on() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p"]);
    w.store.set("tb", "cb", &["q"]);
    w.store.fail_store_call = Some(1);
    assert_eq!(w.summary(), "A: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=0 deleted=0 errors=0 batches=1 error=storing a batch of source A: connection reset\nB: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1");
    assert_eq!(w.summary().lines().next().unwrap(), "A: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1");
}

#[test]
fn a_missing_table_fails_only_its_source() {
    let mut w = World::new(10);
    w.store.set("tb", "cb", &["q"]);
    assert_eq!(w.summary(), "A: total=0 new=0 stale=0 unchanged=0 reused=0 embedded=0 deleted=0 errors=0 batches=0 error=counting values of source A: relation \"ta\" does not exist\nB: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1");
}

#[test]
fn dry_run_plans_without_writing_or_calling() {
    let mut w = World::new(2);
    w.store.set("ta", "ca", &["one", "two", "three", "  one"]);
    let plan = futures::executor::block_on(dry_run(&w.config, &mut w.store));
    let a = &plan.sources[0];
    assert_eq!((a.total, a.new, a.to_embed, a.batches, a.estimated_tokens.large), (3, 3, 3, 2, 4), "ceil(bytes / 4) per value");
    assert_eq!(plan.sources[1].error.as_deref(), Some("planning source B: relation \"tb\" does not exist"));
    assert!(!w.store.schema && w.store.cache.is_empty() && w.calls() == 0);
}

#[test]
fn retry_policy_backs_off_and_caps() {
    let p = RetryPolicy::default();
    assert_eq!(p.delay(0, None, 0.0), Duration::from_millis(250));
    assert_eq!(p.delay(0, None, 1.0), Duration::from_millis(500));
    assert_eq!(p.delay(3, None, 1.0), Duration::from_secs(4));
    assert_eq!(p.delay(30, None, 1.0), Duration::from_secs(20));
    assert_eq!(p.delay(0, Some(Duration::from_secs(7)), 0.0), Duration::from_secs(7));
    assert_eq!(p.delay(0, Some(Duration::from_secs(600)), 0.0), Duration::from_secs(20));
}
