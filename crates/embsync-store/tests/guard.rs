//! The mass-delete guard decides in the transaction that deletes: a source emptied after the
//! driver counted it is still held back.

mod support;

use embsync_core::config::{Config, Source};
use embsync_core::hash::ValueHash;
use embsync_core::index::IndexState;
use embsync_core::report::{IndexReport, RunReport, SourceReport, Trigger};
use embsync_core::sync::{
    Budget, DeleteGuard, EmbeddedValue, Lease, OrphansDeleted, Outcome, PendingValue, Progress, RunId, RunState, SourceCounts,
    StaleOutcome, Store, StoreError, ValueFailure,
};
use embsync_store::PgStore;
use std::time::Duration;
use support::*;

/// The real store, with the source table emptied (by someone else) just before stale values
/// are removed: after every count the driver could take.
struct EmptiedBeforeRemoval<'a> {
    inner: PgStore,
    db: &'a TestDb,
    empty: &'a str,
}

impl Store for EmptiedBeforeRemoval<'_> {
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError> {
        self.inner.ensure_schema(config).await
    }
    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError> {
        self.inner.counts(source).await
    }
    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError> {
        self.inner.link_reusable(source).await
    }
    async fn pending(
        &mut self,
        source: &Source,
        run: &RunId,
        after: Option<&ValueHash>,
        limit: usize,
    ) -> Result<Vec<PendingValue>, StoreError> {
        self.inner.pending(source, run, after, limit).await
    }
    async fn store(&mut self, source: &Source, batch: &[EmbeddedValue], progress: &Progress<'_>) -> Result<(), StoreError> {
        self.inner.store(source, batch, progress).await
    }
    async fn remove_stale(
        &mut self,
        source: &Source,
        run: &RunId,
        known_clean: bool,
        guard: Option<DeleteGuard>,
    ) -> Result<StaleOutcome, StoreError> {
        self.db.exec(&format!("DELETE FROM {}", self.empty)).await;
        self.inner.remove_stale(source, run, known_clean, guard).await
    }
    async fn record_errors(&mut self, source: &Source, failures: &[ValueFailure], run: &RunId) -> Result<(), StoreError> {
        self.inner.record_errors(source, failures, run).await
    }
    async fn delete_orphans(&mut self, run: &RunId, sources: &[&Source]) -> Result<Vec<OrphansDeleted>, StoreError> {
        self.inner.delete_orphans(run, sources).await
    }
    async fn record_refused(&mut self, run: &RunId, reasons: &[String]) -> Result<(), StoreError> {
        self.inner.record_refused(run, reasons).await
    }
    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.inner.acquire_lease(holder, ttl).await
    }
    async fn release_lease(&mut self) -> Result<(), StoreError> {
        self.inner.release_lease().await
    }
    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError> {
        self.inner.open_run(new_id, trigger, sources).await
    }
    async fn save_plan(&mut self, run: &RunId, source: &Source, plan: &SourceReport, snapshot: bool) -> Result<(), StoreError> {
        self.inner.save_plan(run, source, plan, snapshot).await
    }
    async fn finish_run(&mut self, run: &RunId, report: &RunReport) -> Result<(), StoreError> {
        self.inner.finish_run(run, report).await
    }
    async fn index_state(&mut self) -> Result<IndexState, StoreError> {
        self.inner.index_state().await
    }
    async fn index_ddl(&mut self, statement: &str) -> Result<(), StoreError> {
        self.inner.index_ddl(statement).await
    }
    async fn record_indexes(&mut self, run: &RunId, indexes: &IndexReport) -> Result<(), StoreError> {
        self.inner.record_indexes(run, indexes).await
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_source_emptied_after_it_was_counted_is_still_held_back_by_the_guard() {
    let db = TestDb::create().await;
    let values: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = values.iter().map(|s| s.as_str()).collect();
    db.source_table("items", "title", &refs).await;
    let mut config = config(10, &[("Items", "items", "title")]);
    config.mass_delete_minimum = 3;
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 10);

    // Two values go (an ordinary change, which the driver's count lets through), and the
    // table is emptied after that count, just before the removal.
    db.exec("DELETE FROM items WHERE title IN ('v0', 'v1')").await;
    let mut store = EmptiedBeforeRemoval { inner: db.store(&config).await, db: &db, empty: "items" };
    let id = RunId("run-guard".into());
    let inv = embsync_core::sync::Invocation {
        trigger: Trigger::Cron,
        retry: Default::default(),
        budget: Budget::default(),
        new_run: &id,
        holder: "inv-2",
        hint: None,
    };
    let Outcome::Finished(report) = embsync_core::sync::invoke(&config, &mut store, &provider, &rt, &inv).await.unwrap() else {
        panic!("the run did not finish");
    };
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 10, "the emptied source was deleted past the guard");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_sources").await, 10);
    assert_eq!((report.sources[0].stale, report.sources[0].deleted), (0, 0));
    let warning = report.sources[0].warning.as_deref().unwrap_or_default();
    assert!(warning.starts_with("the source returned no values, so all 10 of its embedded values look stale"), "{warning}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_guards_sql_and_rust_agree() {
    let db = TestDb::create().await;
    let guard = DeleteGuard { minimum: 3, max_share: 0.5 };
    let statement = format!(
        "SELECT {} FROM (SELECT $6::int8 AS total, $7::int8 AS had, $8::int8 AS stale) c WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL",
        embsync_core::sql::MASS_DELETE_HELD
    );
    for total in [0u64, 1, 5, 10] {
        for had in [0u64, 1, 2, 5, 6, 10] {
            for stale in 0..=had {
                for on in [true, false] {
                    let (t, m, sh) = (total as i64, had as i64, stale as i64);
                    let row = db
                        .client
                        .query_typed_one(
                            &statement,
                            &[
                                (&"t", tokio_postgres::types::Type::TEXT),
                                (&"c", tokio_postgres::types::Type::TEXT),
                                (&on, tokio_postgres::types::Type::BOOL),
                                (&(guard.minimum as i64), tokio_postgres::types::Type::INT8),
                                (&guard.max_share, tokio_postgres::types::Type::FLOAT8),
                                (&t, tokio_postgres::types::Type::INT8),
                                (&m, tokio_postgres::types::Type::INT8),
                                (&sh, tokio_postgres::types::Type::INT8),
                            ],
                        )
                        .await
                        .unwrap();
                    let rust = on && guard.holds(total, had, stale);
                    assert_eq!(row.get::<_, bool>(0), rust, "total={total} had={had} stale={stale} on={on}");
                }
            }
        }
    }
}
