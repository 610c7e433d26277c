//! The whole sync driven in memory: a store that models the SQL semantics and a provider that
//! fails on command.

use crate::config::{Config, ModelSpec};
use crate::hash::{Value, ValueHash};
use crate::log::{Level, LogEvent};
use crate::provider::{Embeddings, ProviderError};
use crate::report::Trigger;
use crate::sync::*;
use crate::vector::Vector;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

#[derive(Clone, Debug)]
struct Row {
    value: String,
    large: Option<Vector>,
    small: Option<Vector>,
    /// Model tags of the embeddings (None: unknown, e.g. written by someone else).
    tags: (Option<String>, Option<String>),
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
    /// (table, column, hash) -> (attempts, deferred until a later run).
    errors: BTreeMap<(String, String, ValueHash), (u32, bool)>,
    /// Configured model tags (large, small).
    tags: (String, String),
    /// The unfinished run, as "Postgres" holds it, and finished runs' reports.
    run: Option<RunState>,
    finished: Vec<crate::report::RunReport>,
    /// Lease holder and expiry (in store calls: a crude clock).
    lease: Option<(String, u64)>,
    /// The holder this store acquired the lease as (its fencing token).
    me: Option<String>,
    clock: u64,
    /// Stale removals that were told the source is clean.
    scans_spared: u64,
    /// Another invocation takes the lease over just before this store call (1-based).
    steal_lease_at_store_call: Option<usize>,
    /// The catalog as `index_state` reads it; `index_ddl` applies its statements to it.
    index_state: crate::index::IndexState,
    /// Index statements run, in order.
    ddl: Vec<String>,
    /// `index_ddl` fails while this is set.
    fail_ddl: Option<String>,
    /// Another invocation takes the lease over just before the first `index_ddl`.
    steal_lease_at_ddl: bool,
}

impl MemStore {
    fn set(&mut self, table: &str, column: &str, values: &[&str]) {
        self.tables.insert((table.into(), column.into()), values.iter().map(|v| Some(v.to_string())).collect());
    }

    fn distinct(&self, s: &Source) -> Result<BTreeMap<ValueHash, (String, i32)>, StoreError> {
        let rows = self
            .tables
            .get(&(s.table_key(), s.column_key().to_owned()))
            .ok_or_else(|| StoreError::new(format!("relation \"{}\" does not exist", s.table)))?;
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

    fn has(&self, h: &ValueHash) -> (bool, bool) {
        match self.cache.get(h) {
            None => (false, false),
            Some(r) => {
                let current = |v: &Option<Vector>, tag: &Option<String>, want: &str| {
                    v.is_some() && (!r.owned || tag.as_deref().is_none_or(|t| t == want))
                };
                (current(&r.large, &r.tags.0, &self.tags.0), current(&r.small, &r.tags.1, &self.tags.1))
            }
        }
    }

    fn complete(&self, h: &ValueHash) -> bool {
        self.has(h) == (true, true)
    }

    fn deferred(&self, s: &Source, h: &ValueHash) -> bool {
        let (t, c) = Self::key(s);
        self.errors.get(&(t, c, h.clone())).is_some_and(|e| e.1)
    }

    /// Time passes: every recorded error may be retried.
    fn retry_errors_now(&mut self) {
        for e in self.errors.values_mut() {
            e.1 = false;
        }
    }

    fn link_count(&self, s: &Source) -> usize {
        let (t, c) = Self::key(s);
        self.links.iter().filter(|(lt, lc, _)| *lt == t && *lc == c).count()
    }
}

use crate::config::Source;

impl Store for MemStore {
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError> {
        self.schema = true;
        self.tags = (config.models.large.tag(), config.models.small.tag());
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
            deferred: fresh.iter().filter(|(h, _)| self.deferred(s, h)).count() as u64,
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

    async fn pending(
        &mut self,
        s: &Source,
        _run: &RunId,
        after: Option<&ValueHash>,
        limit: usize,
    ) -> Result<Vec<PendingValue>, StoreError> {
        let values = self.distinct(s)?;
        Ok(values
            .into_iter()
            .filter(|(h, _)| after.is_none_or(|a| h > a))
            .filter(|(h, _)| !(self.complete(h) && self.linked(s, h)))
            .filter(|(h, _)| !self.deferred(s, h))
            .take(limit)
            .map(|(h, (v, n))| {
                let (has_large, has_small) = self.has(&h);
                PendingValue { has_large, has_small, hash: h, value: v, occurrences: n }
            })
            .collect())
    }

    async fn store(&mut self, s: &Source, batch: &[EmbeddedValue], p: &Progress<'_>) -> Result<(), StoreError> {
        self.store_calls += 1;
        if self.fail_store_call == Some(self.store_calls) {
            return Err(StoreError::new("connection reset"));
        }
        if self.steal_lease_at_store_call == Some(self.store_calls) {
            self.lease = Some(("thief".into(), u64::MAX));
        }
        if self.lease.as_ref().map(|(h, _)| h) != self.me.as_ref() {
            return Err(StoreError::lease_lost("the sync lease was lost to another invocation"));
        }
        let i = self.source_index(s);
        let run = self.run.as_mut().expect("a run is open");
        let st = &mut run.sources[i];
        st.report.embedded += p.embedded;
        st.report.reused += p.reused;
        st.report.batches += p.batches;
        st.usage.0.prompt_tokens += p.usage.0.prompt_tokens;
        st.usage.0.requests += p.usage.0.requests;
        st.usage.1.prompt_tokens += p.usage.1.prompt_tokens;
        st.usage.1.requests += p.usage.1.requests;
        let (t, c) = Self::key(s);
        let tags = self.tags.clone();
        for v in batch {
            let row = self.cache.entry(v.hash.clone()).or_insert_with(|| Row {
                value: v.value.clone(),
                large: None,
                small: None,
                tags: (None, None),
                source: (t.clone(), c.clone()),
                owned: true,
            });
            let owned = row.owned;
            let replace = |cur: &Option<Vector>, tag: &Option<String>, want: &str| {
                cur.is_none() || (owned && tag.as_deref().is_some_and(|t| t != want))
            };
            if v.large.is_some() && replace(&row.large, &row.tags.0, &tags.0) {
                row.large = v.large.clone();
                row.tags.0 = Some(tags.0.clone());
            }
            if v.small.is_some() && replace(&row.small, &row.tags.1, &tags.1) {
                row.small = v.small.clone();
                row.tags.1 = Some(tags.1.clone());
            }
            self.links.insert((t.clone(), c.clone(), v.hash.clone()));
            self.errors.remove(&(t.clone(), c.clone(), v.hash.clone()));
        }
        Ok(())
    }

    async fn remove_stale(&mut self, s: &Source, _run: &RunId, known_clean: bool) -> Result<StaleOutcome, StoreError> {
        self.scans_spared += u64::from(known_clean);
        if known_clean {
            let i = self.source_index(s);
            let st = &mut self.run.as_mut().expect("a run is open").sources[i];
            st.done = true;
            return Ok(StaleOutcome::default());
        }
        let values = self.distinct(s)?;
        let (t, c) = Self::key(s);
        let before = self.links.len();
        self.links.retain(|(lt, lc, h)| !(*lt == t && *lc == c && !values.contains_key(h)));
        let unlinked = (before - self.links.len()) as u64;
        let linked: BTreeSet<ValueHash> = self.links.iter().map(|(_, _, h)| h.clone()).collect();
        let before = self.cache.len();
        self.cache.retain(|h, r| !r.owned || linked.contains(h));
        let deleted = (before - self.cache.len()) as u64;
        let i = self.source_index(s);
        let st = &mut self.run.as_mut().expect("a run is open").sources[i];
        st.report.stale = unlinked;
        st.report.deleted = deleted;
        st.done = true;
        Ok(StaleOutcome { unlinked, deleted })
    }

    async fn record_errors(&mut self, s: &Source, failures: &[ValueFailure], _run: &RunId) -> Result<(), StoreError> {
        let (t, c) = Self::key(s);
        for f in failures {
            self.errors.entry((t.clone(), c.clone(), f.hash.clone())).or_insert((0, true)).0 += 1;
            self.errors.get_mut(&(t.clone(), c.clone(), f.hash.clone())).unwrap().1 = true;
        }
        let i = self.source_index(s);
        self.run.as_mut().expect("a run is open").sources[i].report.errors += failures.len() as u64;
        Ok(())
    }

    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.clock += 1;
        match &self.lease {
            Some((h, until)) if h != holder && *until > self.clock => {
                Ok(Lease::Held { holder: h.clone(), expires_in_secs: (*until - self.clock) as f64 })
            }
            _ => {
                self.lease = Some((holder.to_owned(), self.clock + ttl.as_secs()));
                self.me = Some(holder.to_owned());
                Ok(Lease::Acquired)
            }
        }
    }

    async fn release_lease(&mut self) -> Result<(), StoreError> {
        if self.lease.as_ref().map(|(h, _)| h) == self.me.take().as_ref() {
            self.lease = None;
        }
        Ok(())
    }

    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError> {
        let run = self.run.get_or_insert_with(|| RunState {
            id: new_id.clone(),
            trigger,
            started_at_ms: 0.0,
            invocations: 0,
            sources: sources
                .iter()
                .map(|s| SourceState {
                    report: crate::report::SourceReport {
                        name: s.name.clone(),
                        table: s.table_key(),
                        column: s.column_key().to_owned(),
                        ..Default::default()
                    },
                    planned: false,
                    planned_batches: 0,
                    done: false,
                    usage: Default::default(),
                })
                .collect(),
        });
        run.invocations += 1;
        Ok(run.clone())
    }

    async fn save_plan(&mut self, _run: &RunId, s: &Source, plan: &crate::report::SourceReport, _snapshot: bool) -> Result<(), StoreError> {
        let i = self.source_index(s);
        let st = &mut self.run.as_mut().expect("a run is open").sources[i];
        st.report.total = plan.total;
        st.report.new = plan.new;
        st.report.unchanged = plan.unchanged;
        st.report.reused = plan.reused;
        st.report.deferred = plan.deferred;
        st.planned_batches = plan.batches;
        st.planned = true;
        Ok(())
    }

    async fn finish_run(&mut self, _run: &RunId, report: &crate::report::RunReport) -> Result<(), StoreError> {
        self.run = None;
        self.finished.push(report.clone());
        Ok(())
    }

    async fn index_state(&mut self) -> Result<crate::index::IndexState, StoreError> {
        Ok(self.index_state.clone())
    }

    async fn index_ddl(&mut self, statement: &str) -> Result<(), StoreError> {
        assert!(self.run.is_none(), "indexes are built once the run is marked finished");
        if std::mem::take(&mut self.steal_lease_at_ddl) {
            self.lease = Some(("thief".into(), u64::MAX));
        }
        if self.lease.as_ref().map(|(h, _)| h) != self.me.as_ref() {
            return Err(StoreError::lease_lost("the sync lease was lost to another invocation"));
        }
        if let Some(e) = &self.fail_ddl {
            return Err(StoreError::new(e.clone()));
        }
        self.ddl.push(statement.to_owned());
        let name = statement.split('"').nth(1).expect("a quoted index name").to_owned();
        self.index_state.indexes.retain(|i| i.name != name);
        if statement.starts_with("CREATE") {
            self.index_state.indexes.push(crate::index::ExistingIndex { name, valid: true });
        }
        Ok(())
    }

    async fn record_indexes(&mut self, _run: &RunId, indexes: &crate::report::IndexReport) -> Result<(), StoreError> {
        let last = self.finished.last_mut().expect("a finished run");
        last.indexes = Some(indexes.clone());
        Ok(())
    }
}

impl MemStore {
    fn source_index(&self, s: &Source) -> usize {
        let run = self.run.as_ref().expect("a run is open");
        run.sources.iter().position(|st| st.report.table == s.table_key() && st.report.column == s.column_key()).expect("source in run")
    }
}

/// What the fake provider answers for its n-th request (1-based); unlisted requests succeed.
#[derive(Default)]
struct MemProvider {
    faults: HashMap<usize, ProviderError>,
    /// Inputs containing this always fail with 400.
    poison: Option<String>,
    /// Rate-limit state reported with every answer.
    rate: Option<crate::provider::RateLimit>,
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
        Ok(Embeddings {
            vectors: inputs.iter().map(|i| Vector::from_f32(&vec![i.len() as f32; dims]).unwrap()).collect(),
            prompt_tokens: inputs.len() as u64,
            rate: self.rate,
        })
    }
}

#[derive(Default)]
struct MemRuntime {
    now: RefCell<f64>,
    slept: RefCell<Vec<Duration>>,
    /// The messages of the events, for tests that read them as text.
    logs: RefCell<Vec<String>>,
    events: RefCell<Vec<LogEvent>>,
}

impl Runtime for MemRuntime {
    fn now_ms(&self) -> f64 {
        *self.now.borrow_mut() += 1.0;
        *self.now.borrow()
    }
    async fn sleep(&self, d: Duration) {
        self.slept.borrow_mut().push(d);
        *self.now.borrow_mut() += d.as_secs_f64() * 1e3;
    }
    fn random(&self) -> f64 {
        0.5
    }
    fn log(&self, event: LogEvent) {
        self.logs.borrow_mut().push(event.message.clone());
        self.events.borrow_mut().push(event);
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
    runs: u32,
}

impl World {
    fn new(batch: u32) -> World {
        World { config: config(batch), store: MemStore::default(), provider: MemProvider::default(), rt: MemRuntime::default(), runs: 0 }
    }

    fn invoke(&mut self, budget: Budget, holder: &str, hint: Option<&Cursor>) -> Result<Outcome, SyncError> {
        self.runs += 1;
        let id = RunId(format!("run-{}", self.runs));
        let inv = Invocation { trigger: Trigger::Cron, retry: RetryPolicy::default(), budget, new_run: &id, holder, hint };
        futures::executor::block_on(invoke(&self.config, &mut self.store, &self.provider, &self.rt, &inv))
    }

    /// One invocation with the default budget, which must finish the run.
    fn run(&mut self) -> Result<crate::report::RunReport, SyncError> {
        match self.invoke(Budget::default(), "worker", None)? {
            Outcome::Finished(r) => Ok(r),
            other => panic!("the run did not finish: {other:?}"),
        }
    }

    /// `name: total/new/stale/unchanged/reused/embedded/deleted/errors/batches` per source.
    fn summary(&mut self) -> String {
        match self.run() {
            Ok(r) => r
                .sources
                .iter()
                .map(|s| {
                    format!(
                        "{}: total={} new={} stale={} unchanged={} reused={} embedded={} deleted={} errors={}{} batches={}{}",
                        s.name,
                        s.total,
                        s.new,
                        s.stale,
                        s.unchanged,
                        s.reused,
                        s.embedded,
                        s.deleted,
                        s.errors,
                        if s.deferred > 0 { format!(" deferred={}", s.deferred) } else { String::new() },
                        s.batches,
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
    assert_eq!(w.store.scans_spared, 2 + 2, "both runs counted no stale values, so neither scanned for them");
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
        large: Some(Vector::from_f32(&[9.0; 4]).unwrap()),
        small: both.then(|| Vector::from_f32(&[9.0; 2]).unwrap()),
        tags: (None, None),
        source: ("elsewhere".into(), "x".into()),
        owned: false,
    };
    w.store.cache.insert(Value::normalize("reuse me").unwrap().hash(), foreign("reuse me", true));
    w.store.cache.insert(Value::normalize("half").unwrap().hash(), foreign("half", false));
    w.store.cache.insert(Value::normalize("unrelated").unwrap().hash(), foreign("unrelated", true));
    w.store.set("ta", "ca", &["reuse me", "half", "fresh"]);
    w.store.set("tb", "cb", &[]);
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=3 new=3 stale=0 unchanged=0 reused=1 embedded=2 deleted=0 errors=0 batches=1"
    );
    assert_eq!(w.provider.requests_for("reuse me"), 0);
    // Only the missing small embedding was asked for, and the existing large one was kept.
    let calls = w.provider.calls.borrow().clone();
    assert_eq!(
        calls.iter().filter(|(_, i)| i.contains(&"half".to_owned())).map(|(m, _)| m.as_str()).collect::<Vec<_>>(),
        ["text-embedding-3-small"]
    );
    assert_eq!(w.store.cache[&Value::normalize("half").unwrap().hash()].large, Some(Vector::from_f32(&[9.0; 4]).unwrap()));
    w.store.set("ta", "ca", &[]);
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=0 new=0 stale=3 unchanged=0 reused=0 embedded=0 deleted=1 errors=0 batches=0"
    );
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
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=6 new=6 stale=0 unchanged=0 reused=0 embedded=6 deleted=0 errors=0 batches=3"
    );
    let slept = w.rt.slept.borrow().clone();
    // The large model's request 3 gets the 429 and waits what it was told; its retry (request 4)
    // gets the 503 and backs off 2 x 500 ms with jitter 0.75.
    assert_eq!(slept, [Duration::from_secs(3), Duration::from_millis(750)]);
}

#[test]
fn batch_source_and_retry_events_carry_the_run_and_their_fields() {
    let mut w = World::new(2);
    let a = values("v", 3);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &[]);
    w.provider.faults.insert(1, ProviderError::Server { status: 502, message: "bad gateway".into() });
    let report = w.run().unwrap();
    let events = w.rt.events.borrow();
    let json: Vec<serde_json::Value> = events.iter().map(|e| serde_json::from_str(&e.to_json()).unwrap()).collect();
    let of_kind = |kind: &str| json.iter().filter(|e| e["event"] == kind).cloned().collect::<Vec<_>>();
    let batches = of_kind("batch");
    assert_eq!(batches.len(), 2);
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(b["runId"], report.run_id.as_str());
        assert_eq!((b["batch"].as_u64(), b["of"].as_u64(), b["source"].as_str()), (Some(i as u64 + 1), Some(2), Some("A")));
        assert_eq!(b["message"], format!("Batch {} of 2: A ({} values)", i + 1, [2, 1][i]));
    }
    let retry = &of_kind("retry")[0];
    assert_eq!(
        (retry["level"].as_str(), retry["model"].as_str(), retry["attempt"].as_u64()),
        (Some("warn"), Some("text-embedding-3-large"), Some(2))
    );
    let sources = of_kind("source");
    assert_eq!(sources.len(), 2);
    assert_eq!((sources[0]["report"]["embedded"].as_u64(), sources[0]["runId"].as_str()), (Some(3), Some(report.run_id.as_str())));
    assert!(events.iter().all(|e| e.level != Level::Error), "{events:#?}");
}

#[test]
fn a_retry_that_would_outlast_the_invocation_pauses_the_source_before_its_batch() {
    let mut w = World::new(2);
    let a = values("v", 6);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &[]);
    // Batch 2's large request is told to come back in 15 s, in an invocation of 10 s.
    w.provider.faults.insert(3, ProviderError::RateLimited { retry_after: Some(Duration::from_secs(15)), message: "slow down".into() });
    let budget = Budget { max_ms: 10_000.0, ..Budget::default() };
    let hint = match w.invoke(budget, "inv-1", None).unwrap() {
        Outcome::Paused(report, cursor) => {
            let a = &report.sources[0];
            // Batch 1 is stored; batch 2 was given up unwritten and is not an error.
            assert_eq!((a.embedded, a.batches, a.errors), (2, 1, 0));
            assert!(w.store.errors.is_empty());
            // ... and the source pauses after batch 1: its two values come first in hash order.
            let mut hashes: Vec<String> = values("v", 6).iter().map(|v| Value::normalize(v).unwrap().hash().as_str().to_owned()).collect();
            hashes.sort();
            assert_eq!(cursor.after.as_deref(), Some(hashes[1].as_str()));
            cursor
        }
        other => panic!("expected a pause, got {other:?}"),
    };
    assert!(w.rt.slept.borrow().is_empty(), "it must not sleep past its budget: {:?}", w.rt.slept.borrow());
    assert!(*w.rt.now.borrow() < 10_000.0);
    assert!(
        w.rt.logs.borrow().iter().any(|l| l.starts_with("Not retrying text-embedding-3-large in 15000 ms")),
        "{:#?}",
        w.rt.logs.borrow()
    );
    // The next invocation goes on from batch 2 and finishes with exact counts.
    let report = match w.invoke(budget, "inv-2", Some(&hint)).unwrap() {
        Outcome::Finished(r) => r,
        other => panic!("expected the run to finish, got {other:?}"),
    };
    let a = &report.sources[0];
    assert_eq!((a.total, a.new, a.embedded, a.batches, a.errors), (6, 6, 6, 3, 0));
    for v in values("v", 6) {
        assert!(w.store.cache.contains_key(&Value::normalize(&v).unwrap().hash()), "{v} stored");
    }
}

#[test]
fn a_value_that_always_fails_is_isolated_recorded_and_retried_later() {
    let mut w = World::new(4);
    w.store.set("ta", "ca", &["good 1", "good 2", "bad apple", "good 3", "good 4"]);
    w.store.set("tb", "cb", &["b"]);
    w.provider.poison = Some("bad".into());
    // The request holding the bad value is split until the bad value is alone; the rest is stored.
    assert_eq!(w.summary(), "A: total=5 new=5 stale=0 unchanged=0 reused=0 embedded=4 deleted=0 errors=1 batches=2\nB: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1");
    let bad = Value::normalize("bad apple").unwrap().hash();
    assert_eq!(w.store.errors.get(&("ta".into(), "ca".into(), bad.clone())), Some(&(1, true)));
    assert!(!w.store.cache.contains_key(&bad));
    // The next run does not try it again before its retry time.
    let calls = w.calls();
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=5 new=1 stale=0 unchanged=4 reused=0 embedded=0 deleted=0 errors=0 deferred=1 batches=0"
    );
    assert_eq!(w.calls(), calls);
    // Once its time has come it is tried again; still bad, it is recorded with one more attempt.
    w.store.retry_errors_now();
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=5 new=1 stale=0 unchanged=4 reused=0 embedded=0 deleted=0 errors=1 batches=1"
    );
    assert_eq!(w.store.errors.get(&("ta".into(), "ca".into(), bad.clone())), Some(&(2, true)));
    // Fixed at the provider, it goes through and its error record is cleared.
    w.provider.poison = None;
    w.store.retry_errors_now();
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=5 new=1 stale=0 unchanged=4 reused=0 embedded=1 deleted=0 errors=0 batches=1"
    );
    assert!(w.store.errors.is_empty());
}

#[test]
fn a_value_over_the_input_limit_is_an_error_of_its_own() {
    let mut w = World::new(10);
    let long = "word ".repeat(7000);
    w.store.set("ta", "ca", &["short", &long]);
    w.store.set("tb", "cb", &[]);
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=1 batches=1"
    );
    assert_eq!(w.provider.requests_for(long.trim_matches(' ')), 0, "never sent");
}

#[test]
fn the_token_budget_stops_the_run_cleanly_and_the_next_run_goes_on() {
    let mut w = World::new(2);
    w.config.max_tokens_per_run = Some(6);
    let a = values("v", 7);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &["b"]);
    // Each batch of 2 values costs 2 tokens per model: the budget of 6 is reached after 2 batches.
    let report = w.run().unwrap();
    assert_eq!((report.totals.embedded, report.totals.batches), (4, 2));
    assert_eq!(report.stopped.as_deref(), Some("token budget of 6 reached; the next run goes on where this one stopped"));
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=7 new=3 stale=0 unchanged=4 reused=0 embedded=3 deleted=0 errors=0 batches=2"
    );
}

#[test]
fn a_model_change_re_embeds_that_model_only() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p", "q"]);
    w.store.set("tb", "cb", &[]);
    w.run().unwrap();
    w.config = Config::parse(r#"{"version":"1.0","models":{"large":{"name":"text-embedding-3-large","dimensions":4},"small":{"name":"text-embedding-3-small","dimensions":3}},
        "batchSize":10,"sources":[{"name":"A","table":"ta","column":"ca"},{"name":"B","table":"tb","column":"cb"}]}"#).unwrap();
    let before = w.calls();
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=2 deleted=0 errors=0 batches=1"
    );
    let calls = w.provider.calls.borrow().clone();
    assert_eq!(calls[before..].iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["text-embedding-3-small"]);
    assert!(w.store.cache.values().all(|r| r.small.as_ref().map(Vector::dims) == Some(3) && r.large.as_ref().map(Vector::dims) == Some(4)));
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=2 new=0 stale=0 unchanged=2 reused=0 embedded=0 deleted=0 errors=0 batches=0"
    );
}

#[test]
fn pacing_waits_when_the_rate_limit_is_nearly_used_up() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p"]);
    w.store.set("tb", "cb", &[]);
    w.provider.rate = Some(crate::provider::RateLimit {
        remaining_requests: Some(1),
        remaining_tokens: Some(1_000_000),
        reset_requests: Some(Duration::from_millis(800)),
        reset_tokens: None,
    });
    w.run().unwrap();
    assert_eq!(*w.rt.slept.borrow(), [Duration::from_millis(800), Duration::from_millis(800)]);
}

#[test]
fn one_model_failing_keeps_the_other_and_asks_only_for_the_missing_one_next_time() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p", "q"]);
    w.store.set("tb", "cb", &[]);
    // Calls 2..=6 are the small model of batch 1 and its four retries.
    w.provider.faults.insert(2, ProviderError::Server { status: 500, message: "down".into() });
    w.provider.faults.insert(3, ProviderError::Server { status: 500, message: "down".into() });
    w.provider.faults.insert(4, ProviderError::Server { status: 500, message: "down".into() });
    w.provider.faults.insert(5, ProviderError::Server { status: 500, message: "down".into() });
    w.provider.faults.insert(6, ProviderError::Server { status: 500, message: "down".into() });
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=0 deleted=0 errors=2 batches=1"
    );
    assert!(w.store.cache.values().all(|r| r.large.is_some() && r.small.is_none()));
    w.store.retry_errors_now();
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=2 new=2 stale=0 unchanged=0 reused=0 embedded=2 deleted=0 errors=0 batches=1"
    );
    let calls = w.provider.calls.borrow().clone();
    assert_eq!(calls.last().map(|(m, _)| m.as_str()), Some("text-embedding-3-small"));
    assert_eq!(calls.len(), 7, "1 large + 5 small attempts, then only the small one");
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
    // The run ended as failed; the next trigger starts a new run.
    assert!(w.store.run.is_none());
    assert_eq!(w.store.finished.last().map(|r| r.status), Some(crate::report::RunStatus::Failed));
    w.provider.faults.clear();
    let r = w.run().unwrap();
    assert_eq!((r.run_id.as_str(), r.totals.new, r.totals.embedded), ("run-2", 2, 2));
}

#[test]
fn a_failing_store_fails_its_source_and_the_run_goes_on() {
    let mut w = World::new(10);
    w.store.set("ta", "ca", &["p"]);
    w.store.set("tb", "cb", &["q"]);
    w.store.fail_store_call = Some(1);
    assert_eq!(w.summary(), "A: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=0 deleted=0 errors=0 batches=0 error=storing a batch of source A: connection reset\nB: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1");
    assert_eq!(
        w.summary().lines().next().unwrap(),
        "A: total=1 new=1 stale=0 unchanged=0 reused=0 embedded=1 deleted=0 errors=0 batches=1"
    );
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

fn small_budget(batches: u64) -> Budget {
    Budget { max_batches: batches, ..Budget::default() }
}

#[test]
fn a_large_source_finishes_over_several_invocations_with_exact_counts() {
    let mut w = World::new(2);
    let a = values("v", 9);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &["b1", "b2", "b3"]);
    let mut hint: Option<Cursor> = None;
    let mut invocations = 0;
    let report = loop {
        invocations += 1;
        match w.invoke(small_budget(2), &format!("inv-{invocations}"), hint.as_ref()).unwrap() {
            Outcome::Finished(r) => break r,
            Outcome::Paused(r, cursor) => {
                assert_eq!(r.status, crate::report::RunStatus::Paused);
                assert_eq!(cursor.run_id, "run-1", "every invocation goes on with the same run");
                hint = Some(cursor);
            }
            Outcome::Busy { .. } => panic!("nobody else holds the lease"),
        }
        assert!(invocations < 20);
    };
    // 5 batches for A (9 values by 2) and 2 for B, at most 2 per invocation.
    assert_eq!(invocations, 4);
    assert_eq!((report.invocations, report.run_id.as_str()), (4, "run-1"));
    let a = &report.sources[0];
    assert_eq!((a.total, a.new, a.embedded, a.batches, a.errors), (9, 9, 9, 5, 0));
    assert_eq!((report.totals.embedded, report.totals.batches), (12, 7));
    for v in values("v", 9) {
        assert_eq!(w.provider.requests_for(&v), 2, "{v} embedded once per model");
    }
    let logs = w.rt.logs.borrow().clone();
    for i in 1..=5 {
        assert!(
            logs.iter().any(|l| l == &format!("Batch {i} of 5: A (2 values)") || l == &format!("Batch {i} of 5: A (1 values)")),
            "Batch {i} of 5 missing: {logs:#?}"
        );
    }
    assert_eq!(w.summary(), "A: total=9 new=0 stale=0 unchanged=9 reused=0 embedded=0 deleted=0 errors=0 batches=0\nB: total=3 new=0 stale=0 unchanged=3 reused=0 embedded=0 deleted=0 errors=0 batches=0");
}

#[test]
fn a_missing_or_garbage_hint_costs_a_rescan_not_a_value() {
    let mut w = World::new(2);
    let a = values("v", 6);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &[]);
    assert!(matches!(w.invoke(small_budget(1), "i1", None).unwrap(), Outcome::Paused(..)));
    // A cursor from another run, and one pointing past everything, are both ignored or harmless.
    let foreign =
        Cursor { run_id: "other".into(), source: 0, phase: "embed".into(), after: Some("f".repeat(64)), totals: Default::default() };
    assert!(matches!(w.invoke(small_budget(1), "i2", Some(&foreign)).unwrap(), Outcome::Paused(..)));
    let past_end =
        Cursor { run_id: "run-1".into(), source: 0, phase: "embed".into(), after: Some("f".repeat(64)), totals: Default::default() };
    let report = match w.invoke(small_budget(5), "i3", Some(&past_end)).unwrap() {
        Outcome::Finished(r) => r,
        other => panic!("{other:?}"),
    };
    // The hint skipped to the end of A, so this run left some values for the next one ...
    let left = 6 - report.sources[0].embedded;
    assert!(left > 0);
    // ... which finds them, because Postgres, not the hint, decides what is pending.
    assert_eq!(
        w.summary().lines().next().unwrap(),
        format!("A: total=6 new={left} stale=0 unchanged={} reused=0 embedded={left} deleted=0 errors=0 batches=1", 6 - left)
    );
    for v in values("v", 6) {
        assert_eq!(w.provider.requests_for(&v), 2, "{v} paid once per model");
    }
}

#[test]
fn an_invocation_killed_mid_run_is_finished_by_the_next_with_exact_counts() {
    let mut w = World::new(2);
    let a = values("v", 6);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &[]);
    // The second batch's write fails as if the worker died after the provider answered.
    w.store.fail_store_call = Some(2);
    let r = w.run().unwrap();
    assert!(r.sources[0].error.as_deref().unwrap().contains("connection reset"));
    // The next run picks the rest up; only the batch in flight was paid twice.
    let r = w.run().unwrap();
    assert_eq!((r.sources[0].new, r.sources[0].embedded), (4, 4));
    let twice: Vec<_> = values("v", 6).into_iter().filter(|v| w.provider.requests_for(v) > 2).collect();
    assert_eq!(twice.len(), 2, "{twice:?}");
}

#[test]
fn a_second_invocation_is_turned_away_while_the_lease_is_held() {
    let mut w = World::new(2);
    w.store.set("ta", "ca", &["p"]);
    w.store.set("tb", "cb", &[]);
    w.store.lease = Some(("someone".into(), 1_000));
    assert!(matches!(w.invoke(Budget::default(), "me", None).unwrap(), Outcome::Busy { ref holder, .. } if holder == "someone"));
    assert_eq!(w.calls(), 0);
    // An expired lease is taken over.
    w.store.lease = Some(("someone".into(), 0));
    assert!(matches!(w.invoke(Budget::default(), "me", None).unwrap(), Outcome::Finished(_)));
    assert_eq!(w.store.lease, None, "released at the end");
}

#[test]
fn a_source_that_suddenly_looks_empty_keeps_its_embeddings_unless_allowed() {
    let mut w = World::new(100);
    w.config.mass_delete_minimum = 3;
    let a = values("v", 10);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &[]);
    w.run().unwrap();
    // The table comes back empty (a bad migration, say): nothing is deleted and the report says why.
    w.store.set("ta", "ca", &[]);
    let r = w.run().unwrap();
    assert_eq!((r.sources[0].stale, r.sources[0].deleted), (0, 0));
    assert_eq!(r.sources[0].warning.as_deref(), Some("the source returned no values, so all 10 of its embedded values look stale; nothing was deleted: check the source, or set \"allowMassDelete\": true for it if this is intended"));
    assert_eq!(w.store.cache.len(), 10);
    // Losing 6 of 10 is more than half: held back too.
    w.store.set("ta", "ca", &refs(&a[..4]));
    let r = w.run().unwrap();
    assert_eq!(r.sources[0].deleted, 0);
    assert!(r.sources[0]
        .warning
        .as_deref()
        .unwrap()
        .starts_with("6 of its 10 embedded values (60%) look stale, more than maxDeleteShare (50%)"));
    // Losing 2 of 10 is ordinary.
    w.store.set("ta", "ca", &refs(&a[..8]));
    let r = w.run().unwrap();
    assert_eq!((r.sources[0].stale, r.sources[0].deleted, r.sources[0].warning.clone()), (2, 2, None));
    // With allowMassDelete the source may lose everything.
    w.config.sources[0].allow_mass_delete = true;
    w.store.set("ta", "ca", &[]);
    let r = w.run().unwrap();
    assert_eq!((r.sources[0].stale, r.sources[0].deleted), (8, 8));
}

#[test]
fn an_invocation_that_lost_its_lease_stops_without_finishing_or_reporting_the_run() {
    let mut w = World::new(2);
    let a = values("v", 6);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &["b"]);
    w.store.steal_lease_at_store_call = Some(2);
    let result = w.invoke(Budget::default(), "slow", None);
    assert!(matches!(result, Err(SyncError::LeaseLost(_))), "{result:?}");
    // The run is still open for the new holder, with only the first batch counted, and source B
    // was not touched.
    let run = w.store.run.as_ref().expect("the run stays open");
    assert_eq!((run.sources[0].report.embedded, run.sources[0].done, run.sources[1].report.embedded), (2, false, 0));
    assert!(w.store.finished.is_empty());
    assert_eq!(w.provider.requests_for("b"), 0);
}

fn with_indexes(w: &mut World) {
    w.config.vector_indexes = Some(crate::config::VectorIndexes { m: 16, ef_construction: 64 });
    w.store.index_state = crate::index::IndexState {
        cache_is_ours: true,
        large_typmod: Some(4),
        small_typmod: Some(2),
        indexes: vec![crate::index::ExistingIndex { name: "embedding_cache_pkey".into(), valid: true }],
        ..Default::default()
    };
}

#[test]
fn indexes_are_built_once_the_run_has_done_everything_and_kept_afterwards() {
    let mut w = World::new(2);
    with_indexes(&mut w);
    let a = values("v", 6);
    w.store.set("ta", "ca", &refs(&a));
    w.store.set("tb", "cb", &["b"]);
    // A paused invocation builds nothing.
    let Outcome::Paused(report, _) = w.invoke(small_budget(1), "i1", None).unwrap() else { panic!("expected a pause") };
    assert_eq!((report.indexes, w.store.ddl.len()), (None, 0));
    let report = w.run().unwrap();
    let indexes = report.indexes.expect("an index report");
    assert_eq!(indexes.created.len(), 2, "{indexes:?}");
    assert!(indexes.created.iter().all(|n| n.starts_with("embsync_hnsw_")), "{indexes:?}");
    assert!(w.store.ddl.iter().all(|s| s.starts_with("CREATE INDEX CONCURRENTLY IF NOT EXISTS")), "{:?}", w.store.ddl);
    assert!(w.rt.logs.borrow().iter().any(|l| l.starts_with("Index embsync_hnsw_large_4_") && l.contains("built in")));
    // The next run finds them and does nothing.
    let report = w.run().unwrap();
    let indexes = report.indexes.expect("an index report");
    assert_eq!((indexes.created.len(), indexes.kept.len(), w.store.ddl.len()), (0, 2, 2), "{indexes:?}");
}

#[test]
fn without_the_option_no_index_is_touched() {
    let mut w = World::new(2);
    with_indexes(&mut w);
    w.config.vector_indexes = None;
    w.store.set("ta", "ca", &["a"]);
    w.store.set("tb", "cb", &["b"]);
    let report = w.run().unwrap();
    assert_eq!((report.indexes, w.store.ddl.len()), (None, 0));
}

#[test]
fn a_failed_index_build_is_reported_and_tried_again_by_the_next_finished_run() {
    let mut w = World::new(2);
    with_indexes(&mut w);
    w.store.set("ta", "ca", &["a"]);
    w.store.set("tb", "cb", &["b"]);
    w.store.fail_ddl = Some("could not extend file: No space left on device".into());
    let report = w.run().unwrap();
    assert_eq!(report.status, crate::report::RunStatus::Finished);
    let error = report.indexes.and_then(|i| i.error).expect("the failure is reported");
    assert!(error.starts_with("CREATE INDEX CONCURRENTLY") && error.ends_with("No space left on device"), "{error}");
    assert_eq!(w.store.finished.len(), 1, "the run is finished all the same");
    assert_eq!(w.store.finished[0].indexes.as_ref().and_then(|i| i.error.as_deref()), Some(error.as_str()), "and the failure is stored");
    w.store.fail_ddl = None;
    let report = w.run().unwrap();
    assert_eq!(report.indexes.map(|i| i.created.len()), Some(2));
}

/// `Budget::from_settings` over the given settings: the budget, or the error.
fn budget_of(settings: &[(&str, &str)]) -> String {
    match Budget::from_settings(|name| settings.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())) {
        Ok(b) => format!("{} batches, {} ms, lease {:?}", b.max_batches, b.max_ms, b.lease_ttl),
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn the_budget_settings_are_checked_and_the_lease_must_outlast_the_time_budget() {
    let check = |settings: &[(&str, &str)], expect: expect_test::Expect| expect.assert_eq(&budget_of(settings));
    use expect_test::expect;
    check(&[], expect!["200 batches, 120000 ms, lease 300s"]);
    check(&[("SYNC_MAX_BATCHES", " 7 "), ("SYNC_MAX_SECONDS", "4"), ("SYNC_LEASE_SECONDS", "6")], expect!["7 batches, 4000 ms, lease 6s"]);
    check(&[("SYNC_MAX_SECONDS", ""), ("SYNC_LEASE_SECONDS", "")], expect!["200 batches, 120000 ms, lease 300s"]);
    check(
        &[("SYNC_MAX_SECONDS", "300")],
        expect!["error: SYNC_LEASE_SECONDS (300) must be at least 1.5 times SYNC_MAX_SECONDS (300), so that a working invocation keeps its lease: set SYNC_LEASE_SECONDS to 450 or more, or lower SYNC_MAX_SECONDS"],
    );
    check(
        &[("SYNC_LEASE_SECONDS", "2")],
        expect!["error: SYNC_LEASE_SECONDS (2) must be at least 1.5 times SYNC_MAX_SECONDS (120), so that a working invocation keeps its lease: set SYNC_LEASE_SECONDS to 180 or more, or lower SYNC_MAX_SECONDS"],
    );
    check(
        &[("SYNC_MAX_SECONDS", "ten")],
        expect![[r#"error: SYNC_MAX_SECONDS is "ten", which is not a positive number: set it to one or remove it for the default"#]],
    );
    check(
        &[("SYNC_MAX_BATCHES", "2.5")],
        expect![[r#"error: SYNC_MAX_BATCHES is "2.5", which is not a positive whole number: set it to one or remove it for the default"#]],
    );
    check(
        &[("SYNC_MAX_BATCHES", "0")],
        expect![[r#"error: SYNC_MAX_BATCHES is "0", which is not a positive whole number: set it to one or remove it for the default"#]],
    );
    check(
        &[("SYNC_LEASE_SECONDS", "-5")],
        expect![[r#"error: SYNC_LEASE_SECONDS is "-5", which is not a positive number: set it to one or remove it for the default"#]],
    );
    check(
        &[("SYNC_MAX_SECONDS", "inf")],
        expect![[r#"error: SYNC_MAX_SECONDS is "inf", which is not a positive number: set it to one or remove it for the default"#]],
    );
}

#[test]
fn an_invocation_that_lost_its_lease_before_an_index_build_stops_there() {
    let mut w = World::new(2);
    with_indexes(&mut w);
    w.store.set("ta", "ca", &["a"]);
    w.store.set("tb", "cb", &["b"]);
    w.store.steal_lease_at_ddl = true;
    let result = w.invoke(Budget::default(), "slow", None);
    assert!(matches!(result, Err(SyncError::LeaseLost(_))), "{result:?}");
    assert_eq!(w.store.ddl.len(), 0, "no index statement after the lease was lost");
    assert_eq!(w.store.finished.len(), 1, "the run had been finished before");
    assert_eq!(w.store.finished[0].indexes, None, "no index step is recorded");
}
