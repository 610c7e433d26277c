//! Fencing: an invocation that lost the sync lease writes nothing more, whatever it calls.
//!
//! The lease is a fencing token (holder and generation, see `sql::ACQUIRE_LEASE`): every write
//! of an invocation runs in a transaction whose first statement checks and renews it, so one
//! that stalled past its lease, and found another invocation holding it, cannot delete rows,
//! drop the new holder's snapshot or finish its run. These tests take the lease away from a real
//! store on a real Postgres at every point of a real run and read the database back.

mod support;

use embsync_core::config::{Config, Source};
use embsync_core::hash::ValueHash;
use embsync_core::report::{IndexReport, RunReport, RunStatus, SourceReport, Trigger};
use embsync_core::sync::{Budget, EmbeddedValue, Lease, Outcome, Progress, RunId, Store, StoreError, SyncError, ValueFailure};
use embsync_core::vector::Vector;
use embsync_store::PgStore;
use std::time::Duration;
use support::hooked::{Call, Go, Hook, Hooked};
use support::*;

const TTL: Duration = Duration::from_secs(300);

/// Everything embsync keeps in the database, as text (rows sorted), and the indexes on its
/// tables: two equal dumps mean nothing was written in between.
async fn dump(db: &TestDb) -> String {
    let mut out = String::new();
    for table in [
        "embedding_cache",
        "embedding_cache_sources",
        "embedding_cache_owned",
        "embedding_sync_errors",
        "embedding_sync_runs",
        "embedding_sync_run_sources",
        "embedding_sync_pending",
        "embedding_sync_orphans",
        "embedding_sync_lease",
        "embedding_sync_capture",
        "embedding_sync_change_log",
        "embedding_sync_capture_values",
    ] {
        let rows = db.texts(&format!("SELECT x::text FROM {table} x")).await;
        out.push_str(&format!("{table}:\n"));
        for row in rows {
            out.push_str(&format!("  {row}\n"));
        }
    }
    let indexes = db.texts("SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public'").await;
    out.push_str(&format!("indexes: {indexes:?}\n"));
    out
}

/// Takes the lease from whoever holds it, as an invocation does once it expired: expires it
/// and acquires it for `holder` on `store`.
async fn take_over(db: &TestDb, store: &mut PgStore, holder: &str) {
    db.exec("UPDATE embedding_sync_lease SET expires_at = now() - interval '1 second'").await;
    let lease = store.acquire_lease(holder, TTL).await.expect("acquiring the expired lease");
    assert_eq!(lease, Lease::Acquired, "{holder} takes the expired lease over");
}

fn embedded(value: &str) -> EmbeddedValue {
    let v = |model: &str, dims: usize| Vector::from_f32(&vector_for(model, dims, value)).expect("finite");
    EmbeddedValue {
        hash: ValueHash::from_hex(&hash_of(value)).expect("a hash"),
        value: value.to_owned(),
        occurrences: 1,
        large: Some(v("text-embedding-3-large", 4)),
        small: Some(v("text-embedding-3-small", 2)),
        complete: true,
    }
}

/// Whether `result` is the refusal of a write without the lease; a description if not.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) -> Option<String> {
    match result {
        Err(e) if e.is_lease_lost() => None,
        other => Some(format!("{what}: expected a lease_lost error, got {other:?}")),
    }
}

/// Invocation A opens a run and stalls; its lease expires and B takes the run on (one batch of
/// `items`, a snapshot of the rest) and holds the lease. Then every write A still makes is
/// refused as lease_lost and leaves the database exactly as B left it.
#[tokio::test(flavor = "current_thread")]
async fn every_write_of_an_invocation_that_lost_the_lease_is_refused_and_writes_nothing() {
    let db = TestDb::create().await;
    let values: Vec<String> = (0..10).map(|i| format!("v{i:02}")).collect();
    db.source_table("items", "title", &values.iter().map(String::as_str).collect::<Vec<_>>()).await;
    db.source_table("notes", "body", &["n1", "n2"]).await;
    let config = config(2, &[("Items", "items", "title"), ("Notes", "notes", "body")]);
    let sources: Vec<&Source> = config.enabled_sources().collect();
    let (items, notes) = (sources[0], sources[1]);

    // A: the lease and the run, then it stalls.
    let mut a = db.store(&config).await;
    a.ensure_schema(&config).await.unwrap();
    // Another pipeline's row with both embeddings: `notes` can reuse it (link_reusable).
    db.exec(&format!(
        "INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small) VALUES ('n1', '{}', '[1,2,3,4]', '[1,2]')",
        hash_of("n1")
    ))
    .await;
    assert_eq!(a.acquire_lease("inv-a", TTL).await.unwrap(), Lease::Acquired);
    let run = a.open_run(&RunId("run-a".into()), Trigger::Cron, &sources).await.unwrap().id;

    // A's lease expires; B takes it, resumes the run, stores one batch and pauses; then it takes
    // the lease again for its next step and holds it.
    db.exec("UPDATE embedding_sync_lease SET expires_at = now() - interval '1 second'").await;
    let mut b = db.store(&config).await;
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let budget = Budget { max_batches: 1, ..Budget::default() };
    let Outcome::Paused(report, _) = invoke(&config, &mut b, &provider, &rt, budget, "inv-b", None).await.unwrap() else {
        panic!("B should pause after one batch")
    };
    assert_eq!(report.run_id, run.0, "B resumed A's run");
    assert_eq!(b.acquire_lease("inv-b", TTL).await.unwrap(), Lease::Acquired);
    // One of the values B stored leaves the source: A's remove_stale would unlink and delete it.
    let gone = db.texts("SELECT value FROM embedding_cache WHERE value LIKE 'v%' ORDER BY value LIMIT 1").await;
    let gone = gone.into_iter().next().expect("B stored a batch");
    db.exec(&format!("DELETE FROM items WHERE title = '{gone}'")).await;
    let pending_value = db.texts("SELECT value FROM embedding_sync_pending").await.into_iter().next().expect("B's snapshot");

    let before = dump(&db).await;
    assert!(before.contains("embedding_sync_pending:\n  ("), "B's snapshot is there: {before}");
    let mut problems = Vec::new();
    let mut check = |what: &str, outcome: Option<String>, after: String| {
        problems.extend(outcome);
        if after != before {
            problems.push(format!("{what} wrote to the database:\n--- before\n{before}--- after\n{after}"));
        }
    };

    let plan = SourceReport { total: 999, new: 999, ..Default::default() };
    let r = a.save_plan(&run, items, &plan, true).await;
    check("save_plan", refused("save_plan", r), dump(&db).await);
    let r = a.link_reusable(notes).await;
    check("link_reusable", refused("link_reusable", r), dump(&db).await);
    let progress = Progress { run: &run, embedded: 1, reused: 0, batches: 1, usage: Default::default() };
    let r = a.store(items, &[embedded(&pending_value)], &progress).await;
    check("store", refused("store", r), dump(&db).await);
    let r = a.remove_stale(items, &run, false, None).await;
    check("remove_stale", refused("remove_stale", r), dump(&db).await);
    let r = a.delete_orphans(&run, &sources).await;
    check("delete_orphans", refused("delete_orphans", r), dump(&db).await);
    let r = a.record_refused(&run, &["the model is gone".to_owned()]).await;
    check("record_refused", refused("record_refused", r), dump(&db).await);
    let failure = ValueFailure { hash: ValueHash::from_hex(&hash_of(&pending_value)).unwrap(), model: "all".into(), message: "x".into() };
    let r = a.record_errors(items, &[failure], &run).await;
    check("record_errors", refused("record_errors", r), dump(&db).await);
    let finished = RunReport { status: RunStatus::Finished, ..report.clone() };
    let r = a.finish_run(&run, &finished).await;
    check("finish_run", refused("finish_run", r), dump(&db).await);
    let r = a.record_indexes(&run, &IndexReport::default()).await;
    check("record_indexes", refused("record_indexes", r), dump(&db).await);
    let r = a.open_run(&RunId("run-a2".into()), Trigger::Cron, &sources).await;
    check("open_run", refused("open_run", r), dump(&db).await);
    let r = a.index_ddl("CREATE INDEX CONCURRENTLY IF NOT EXISTS fence_test ON embedding_sync_errors (value_hash)").await;
    check("index_ddl", refused("index_ddl", r), dump(&db).await);
    // Releasing a lease one no longer holds is no error, and leaves the holder's lease alone.
    let r = a.release_lease().await;
    check("release_lease", r.err().map(|e| format!("release_lease: {e}")), dump(&db).await);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // B still holds the lease and its writes go through.
    b.save_plan(&run, items, &plan, false).await.expect("the holder's write");
}

/// The fencing token is holder and generation: an invocation that lost the lease to another
/// with the same holder id (which took the expired lease: a new generation) is fenced off too.
#[tokio::test(flavor = "current_thread")]
async fn the_same_holder_id_in_a_later_generation_fences_the_earlier_one() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["v1", "v2", "v3"]).await;
    let config = config(2, &[("Items", "items", "title")]);
    let sources: Vec<&Source> = config.enabled_sources().collect();
    let mut a = db.store(&config).await;
    a.ensure_schema(&config).await.unwrap();
    assert_eq!(a.acquire_lease("inv-x", TTL).await.unwrap(), Lease::Acquired);
    let run = a.open_run(&RunId("run-x".into()), Trigger::Cron, &sources).await.unwrap().id;
    let mut b = db.store(&config).await;
    take_over(&db, &mut b, "inv-x").await;

    let before = dump(&db).await;
    let progress = Progress { run: &run, embedded: 1, reused: 0, batches: 1, usage: Default::default() };
    let mut problems: Vec<String> = Vec::new();
    problems.extend(refused("store", a.store(sources[0], &[embedded("v1")], &progress).await));
    let plan = SourceReport { total: 3, new: 3, ..Default::default() };
    problems.extend(refused("save_plan", a.save_plan(&run, sources[0], &plan, true).await));
    problems.extend(refused("remove_stale", a.remove_stale(sources[0], &run, false, None).await));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(dump(&db).await, before, "the earlier generation wrote nothing");

    // The later generation writes.
    b.save_plan(&run, sources[0], &plan, true).await.expect("the current generation's write");
    b.store(sources[0], &[embedded("v1")], &progress).await.expect("the current generation's batch");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 1);
}

/// A lease that expired is lost even when nobody took it yet: the write is refused.
#[tokio::test(flavor = "current_thread")]
async fn an_expired_lease_fences_its_holder_even_before_anyone_takes_it() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["v1"]).await;
    let config = config(2, &[("Items", "items", "title")]);
    let sources: Vec<&Source> = config.enabled_sources().collect();
    let mut a = db.store(&config).await;
    a.ensure_schema(&config).await.unwrap();
    assert_eq!(a.acquire_lease("inv-a", TTL).await.unwrap(), Lease::Acquired);
    let run = a.open_run(&RunId("run-a".into()), Trigger::Cron, &sources).await.unwrap().id;
    db.exec("UPDATE embedding_sync_lease SET expires_at = now() - interval '1 second'").await;
    let before = dump(&db).await;
    let plan = SourceReport { total: 1, new: 1, ..Default::default() };
    let problem = refused("save_plan", a.save_plan(&run, sources[0], &plan, true).await);
    assert_eq!(problem, None);
    assert_eq!(dump(&db).await, before);
}

/// A deployment from before the lease had a generation: `ensure_schema` adds the column, the
/// old holder's unexpired lease is still respected, and once it expires the next acquisition
/// starts a generation that fences off anyone holding the old one.
#[tokio::test(flavor = "current_thread")]
async fn a_lease_table_from_before_generations_is_migrated_and_still_respected() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["v1"]).await;
    db.exec(
        "CREATE TABLE embedding_sync_lease (name text PRIMARY KEY, holder text NOT NULL, expires_at timestamptz NOT NULL);
         INSERT INTO embedding_sync_lease VALUES ('sync', 'inv-old', now() + interval '1 hour')",
    )
    .await;
    let config = config(2, &[("Items", "items", "title")]);
    let mut a = db.store(&config).await;
    a.ensure_schema(&config).await.unwrap();
    a.ensure_schema(&config).await.expect("a second time: nothing to do");
    assert_eq!(db.count("SELECT generation FROM embedding_sync_lease").await, 0);
    let held = a.acquire_lease("inv-a", TTL).await.unwrap();
    assert!(matches!(held, Lease::Held { ref holder, .. } if holder == "inv-old"), "{held:?}");
    take_over(&db, &mut a, "inv-a").await;
    assert_eq!(db.count("SELECT generation FROM embedding_sync_lease").await, 1);
    a.release_lease().await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_lease WHERE expires_at > now()").await, 0, "released: expired");
    assert_eq!(a.acquire_lease("inv-b", TTL).await.unwrap(), Lease::Acquired, "a released lease is free at once");
    assert_eq!(db.count("SELECT generation FROM embedding_sync_lease").await, 2, "the row stays, so generations only grow");
}

/// A transaction that holds the lease row (a fenced write in flight, or a client stalled inside
/// one) makes others wait only for the lock timeout: taking the lease answers "held", a fenced
/// write fails without writing, and neither queues for the length of the lease.
#[tokio::test(flavor = "current_thread")]
async fn waiting_for_the_lease_row_ends_at_the_lock_timeout() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["v1"]).await;
    let config = config(2, &[("Items", "items", "title")]);
    let sources: Vec<&Source> = config.enabled_sources().collect();
    // A 3 s lease: a statement timeout of 1 s, and so a lock timeout of 0.5 s.
    let ttl = Duration::from_secs(3);
    let mut a = db.store(&config).await;
    a.ensure_schema(&config).await.unwrap();
    assert_eq!(a.acquire_lease("inv-a", ttl).await.unwrap(), Lease::Acquired);
    let run = a.open_run(&RunId("run-a".into()), Trigger::Cron, &sources).await.unwrap().id;
    let other = connect(&db.url).await;
    other.batch_execute("BEGIN; SELECT * FROM embedding_sync_lease FOR UPDATE").await.unwrap();
    let before = dump(&db).await;

    let began = std::time::Instant::now();
    let plan = SourceReport { total: 1, new: 1, ..Default::default() };
    let write = a.save_plan(&run, sources[0], &plan, true).await;
    let waited = began.elapsed();
    let e = write.expect_err("the lease row is locked");
    assert!(!e.is_lease_lost() && e.to_string().contains("lock timeout"), "{e}");
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_millis(2500), "waited {waited:?}");

    // The lease expires while the row is still locked (the test's own statements wait for no
    // lock: the row is unlocked for the update).
    other.batch_execute("ROLLBACK").await.unwrap();
    db.exec("UPDATE embedding_sync_lease SET expires_at = now() - interval '1 second'").await;
    other.batch_execute("BEGIN; SELECT * FROM embedding_sync_lease FOR UPDATE").await.unwrap();
    let mut b = db.store(&config).await;
    let began = std::time::Instant::now();
    let lease = b.acquire_lease("inv-b", ttl).await.unwrap();
    assert!(matches!(lease, Lease::Held { ref holder, .. } if holder == "inv-a"), "{lease:?}");
    assert!(began.elapsed() < Duration::from_millis(2500), "waited {:?}", began.elapsed());
    other.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(dump(&db).await.replace(char::is_numeric, ""), before.replace(char::is_numeric, ""), "nothing written but the expiry");
    assert_eq!(b.acquire_lease("inv-b", ttl).await.unwrap(), Lease::Acquired, "free once the lock is gone");
}

/// Which store calls write (and so must be fenced); `release_lease` is left out: releasing a
/// lost lease is a no-op, not an error.
const WRITES: &[&str] = &[
    "open_run",
    "link_reusable",
    "save_plan",
    "store",
    "remove_stale",
    "delete_orphans",
    "record_refused",
    "record_errors",
    "finish_run",
    "index_ddl",
    "record_indexes",
    // Folds the change log in these scenarios (a fenced write); it only reads when nothing changed.
    "capture",
];

/// Lets another invocation take the lease over right before the store's `at`-th call
/// (1-based) and records what the invocation did after that.
struct Takeover<'a> {
    db: &'a TestDb,
    thief: &'a mut PgStore,
    at: usize,
    calls: Vec<&'static str>,
    /// The database right after the takeover.
    snapshot: Option<String>,
    /// Calls after the takeover, with whether each was refused as lease_lost.
    after: Vec<(&'static str, bool)>,
}

impl Hook for Takeover<'_> {
    async fn before(&mut self, call: &Call<'_>, _: &mut PgStore) -> Go {
        self.calls.push(call.name());
        if self.calls.len() == self.at {
            take_over(self.db, self.thief, "inv-b").await;
            self.snapshot = Some(dump(self.db).await);
        }
        Go::Run
    }

    async fn after(&mut self, call: &Call<'_>, result: Result<&dyn std::any::Any, &StoreError>) {
        if self.snapshot.is_some() {
            self.after.push((call.name(), result.err().is_some_and(StoreError::is_lease_lost)));
        }
    }
}

/// A database after one finished run, then changed so that the next run does every kind of
/// write: new values (batches), stale ones (unlink and delete), one another pipeline embedded
/// (reused), one the provider refuses (an error recorded).
async fn changed_world(capture: bool) -> (TestDb, Config, FakeProvider) {
    let db = TestDb::create().await;
    let items: Vec<String> = (1..=8).map(|i| format!("a{i:02}")).collect();
    db.source_table("items", "title", &items.iter().map(String::as_str).collect::<Vec<_>>()).await;
    db.source_table("notes", "body", &["n1", "n2"]).await;
    let mut config = config(2, &[("Items", "items", "title"), ("Notes", "notes", "body")]);
    if capture {
        // Items' changes are then read from its change log.
        config.sources[0].changes = embsync_core::config::Changes::Capture { reconcile_every_secs: 86_400 };
    }
    let provider = FakeProvider::default();
    let mut store = db.store(&config).await;
    let outcome = invoke(&config, &mut store, &provider, &TestRuntime::default(), Budget::default(), "inv-0", None).await;
    assert!(matches!(outcome, Ok(Outcome::Finished(_))), "the first run: {outcome:?}");
    db.exec("DELETE FROM items WHERE title IN ('a01', 'a02')").await;
    db.insert("items", "title", &["a09", "a10", "a11", "a12", "a13"]).await;
    db.exec(&format!(
        "INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small) VALUES ('n3', '{}', '[1,2,3,4]', '[1,2]')",
        hash_of("n3")
    ))
    .await;
    db.insert("notes", "body", &["n3", "poison n4", "n5"]).await;
    *provider.poison.borrow_mut() = Some("poison".into());
    (db, config, provider)
}

/// What every source should hold once a run finished: each distinct value linked with both
/// embeddings, nothing stale linked, no snapshot left, every run finished.
async fn assert_synced(db: &TestDb, label: &str) {
    for (table, column, key) in [("items", "title", "items"), ("notes", "body", "notes")] {
        let want = db.texts(&format!("SELECT DISTINCT {column} FROM {table} WHERE {column} NOT LIKE 'poison%'")).await;
        let have = db
            .texts(&format!(
                "SELECT c.value FROM embedding_cache_sources l JOIN embedding_cache c USING (value_hash)
                 WHERE l.source_table = '{key}' AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL"
            ))
            .await;
        assert_eq!(have, want, "{label}: done values of {table}");
    }
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE value IN ('a01', 'a02')").await, 0, "{label}: stale rows deleted");
    // Counted once, in the stored counters and in the stored reports alike.
    assert_eq!(db.count("SELECT coalesce(sum(deleted), 0)::int8 FROM embedding_sync_run_sources").await, 2, "{label}: deleted counters");
    let reported = "SELECT coalesce(sum((report->'totals'->>'deleted')::int8), 0)::int8 FROM embedding_sync_runs";
    assert_eq!(db.count(reported).await, 2, "{label}: deleted in the reports");
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_pending").await, 0, "{label}: snapshots left");
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_runs WHERE finished_at IS NULL").await, 0, "{label}: open runs");
}

/// Another invocation takes the lease over right before the k-th store call, for every k after
/// the lease was taken: the first invocation ends with `SyncError::LeaseLost` as soon as it tries
/// to write (no finish, no report, no further call but the release), nothing it did after the
/// takeover is in the database, and the new holder finishes the run as if nothing happened.
#[tokio::test(flavor = "current_thread")]
async fn a_takeover_before_any_store_call_fences_the_rest_of_the_invocation() {
    takeover_before_every_call(false).await;
}

/// The same with a captured source, whose change log the run folds.
#[tokio::test(flavor = "current_thread")]
async fn a_takeover_before_any_store_call_fences_a_captured_source_too() {
    takeover_before_every_call(true).await;
}

async fn takeover_before_every_call(capture: bool) {
    // The undisturbed invocation, for its sequence of calls.
    let (db, config, provider) = changed_world(capture).await;
    let mut thief = db.store(&config).await;
    let takeover = Takeover { db: &db, thief: &mut thief, at: 0, calls: Vec::new(), snapshot: None, after: Vec::new() };
    let mut probe = Hooked::new(db.store(&config).await, takeover);
    let outcome = invoke_on(&config, &mut probe, &provider, "inv-a").await;
    assert!(matches!(outcome, Ok(Outcome::Finished(_))), "{outcome:?}");
    let calls = probe.hook.calls.clone();
    for kind in ["open_run", "link_reusable", "save_plan", "store", "remove_stale", "delete_orphans", "record_errors", "finish_run"] {
        assert!(calls.contains(&kind), "the scenario should call {kind}: {calls:?}");
    }
    assert_synced(&db, "undisturbed").await;
    let first = calls.iter().position(|c| *c == "acquire_lease").expect("the lease is taken") + 2;

    let mut failures = Vec::new();
    if capture {
        assert!(calls.contains(&"capture"), "the scenario should call capture: {calls:?}");
    }
    for k in first..=calls.len() {
        let (db, config, provider) = changed_world(capture).await;
        let mut thief = db.store(&config).await;
        let takeover = Takeover { db: &db, thief: &mut thief, at: k, calls: Vec::new(), snapshot: None, after: Vec::new() };
        let mut store = Hooked::new(db.store(&config).await, takeover);
        let outcome = invoke_on(&config, &mut store, &provider, "inv-a").await;
        let label = format!("takeover before call {k} ({})", calls[k - 1]);
        let after = store.hook.after.clone();
        let snapshot = store.hook.snapshot.clone().unwrap_or_else(|| panic!("{label}: no takeover happened"));
        let wrote = after.iter().position(|(name, _)| WRITES.contains(name));
        match wrote {
            Some(i) => {
                if !matches!(outcome, Err(SyncError::LeaseLost(_))) {
                    failures.push(format!("{label}: the invocation should end with LeaseLost, got {outcome:?}"));
                }
                if !after[i].1 {
                    failures.push(format!("{label}: {} after the takeover was not refused as lease_lost", after[i].0));
                }
                let rest: Vec<_> = after[i + 1..].iter().map(|(n, _)| *n).collect();
                if rest.iter().any(|n| *n != "release_lease") {
                    failures.push(format!("{label}: after the refused {} the invocation went on: {rest:?}", after[i].0));
                }
            }
            None if outcome.is_err() => failures.push(format!("{label}: nothing was written after the takeover, yet {outcome:?}")),
            None => {}
        }
        let now = dump(&db).await;
        if now != snapshot {
            failures.push(format!("{label}: the invocation wrote after the takeover:\n--- at the takeover\n{snapshot}--- after\n{now}"));
        }
        drop(store);
        // The new holder goes on with the run and finishes it.
        let outcome = invoke(&config, &mut thief, &provider, &TestRuntime::default(), Budget::default(), "inv-b", None).await;
        if !matches!(outcome, Ok(Outcome::Finished(_))) {
            failures.push(format!("{label}: the new holder's invocation: {outcome:?}"));
        }
        assert_synced(&db, &label).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// One invocation of the real driver over any store.
async fn invoke_on<S: Store>(config: &Config, store: &mut S, provider: &FakeProvider, holder: &str) -> Result<Outcome, SyncError> {
    let id = RunId(format!("run-{holder}"));
    let inv = embsync_core::sync::Invocation {
        trigger: Trigger::Cron,
        retry: embsync_core::sync::RetryPolicy::default(),
        budget: Budget::default(),
        new_run: &id,
        holder,
        hint: None,
        fanout: None,
        batch_api: None,
    };
    embsync_core::sync::invoke(config, store, provider, &TestRuntime::default(), &inv).await
}
