//! The real store with a hook around every call: the one place where a test reaches between the
//! driver and [`PgStore`] (to fail a call, answer it, or act on the database first).
//!
//! A new [`Store`] method needs one [`Call`] variant (its arguments), one arm in
//! [`Call::name`] and one delegating method in the `impl Store for Hooked` below.

use embsync_core::config::{Config, Source};
use embsync_core::hash::ValueHash;
use embsync_core::index::IndexState;
use embsync_core::report::{IndexReport, RunReport, SourceReport, Trigger};
use embsync_core::sync::{
    DeleteGuard, EmbeddedValue, Lease, OrphansDeleted, PendingValue, Progress, RunId, RunState, SourceCounts, StaleOutcome, Store,
    StoreError, ValueFailure,
};
use embsync_store::PgStore;
use std::any::Any;
use std::time::Duration;

/// One call of the driver to the store, with its arguments.
#[derive(Debug)]
pub enum Call<'a> {
    EnsureSchema { config: &'a Config },
    Counts { source: &'a Source },
    LinkReusable { source: &'a Source },
    Pending { source: &'a Source, run: &'a RunId, after: Option<&'a ValueHash>, limit: usize },
    Store { source: &'a Source, batch: &'a [EmbeddedValue], progress: &'a Progress<'a> },
    RemoveStale { source: &'a Source, run: &'a RunId, known_clean: bool, guard: Option<DeleteGuard> },
    RecordErrors { source: &'a Source, failures: &'a [ValueFailure], run: &'a RunId },
    DeleteOrphans { run: &'a RunId, sources: &'a [&'a Source] },
    RecordRefused { run: &'a RunId, reasons: &'a [String] },
    AcquireLease { holder: &'a str, ttl: Duration },
    ReleaseLease,
    OpenRun { new_id: &'a RunId, trigger: Trigger, sources: &'a [&'a Source] },
    SavePlan { run: &'a RunId, source: &'a Source, plan: &'a SourceReport, snapshot: bool },
    FinishRun { run: &'a RunId, report: &'a RunReport },
    IndexState,
    IndexDdl { statement: &'a str },
    RecordIndexes { run: &'a RunId, indexes: &'a IndexReport },
}

impl Call<'_> {
    /// The [`Store`] method's name.
    pub fn name(&self) -> &'static str {
        match self {
            Call::EnsureSchema { .. } => "ensure_schema",
            Call::Counts { .. } => "counts",
            Call::LinkReusable { .. } => "link_reusable",
            Call::Pending { .. } => "pending",
            Call::Store { .. } => "store",
            Call::RemoveStale { .. } => "remove_stale",
            Call::RecordErrors { .. } => "record_errors",
            Call::DeleteOrphans { .. } => "delete_orphans",
            Call::RecordRefused { .. } => "record_refused",
            Call::AcquireLease { .. } => "acquire_lease",
            Call::ReleaseLease => "release_lease",
            Call::OpenRun { .. } => "open_run",
            Call::SavePlan { .. } => "save_plan",
            Call::FinishRun { .. } => "finish_run",
            Call::IndexState => "index_state",
            Call::IndexDdl { .. } => "index_ddl",
            Call::RecordIndexes { .. } => "record_indexes",
        }
    }
}

/// What becomes of a call once the hook has seen it.
pub enum Go {
    /// The store runs it.
    Run,
    /// It fails with this error; the store never sees it.
    Fail(StoreError),
    /// It succeeds with this answer (of the method's return type); the store never sees it.
    Answer(Box<dyn Any>),
}

/// What a test does around the store's calls. Both steps default to doing nothing.
#[allow(async_fn_in_trait)]
pub trait Hook {
    /// Before `call` reaches the store (which the hook may use itself, e.g. for a fence check).
    async fn before(&mut self, call: &Call<'_>, store: &mut PgStore) -> Go {
        let _ = (call, store);
        Go::Run
    }
    /// After `call`, with its result (the store's, or what [`Hook::before`] made of it). An
    /// `Ok` holds the method's return type: `downcast_ref` it.
    async fn after(&mut self, call: &Call<'_>, result: Result<&dyn Any, &StoreError>) {
        let _ = (call, result);
    }
}

/// No hook: the store as it is.
impl Hook for () {}

/// The real [`PgStore`] with `hook` around every call.
pub struct Hooked<H> {
    pub inner: PgStore,
    pub hook: H,
}

impl<H: Hook> Hooked<H> {
    pub fn new(inner: PgStore, hook: H) -> Self {
        Hooked { inner, hook }
    }

    async fn call<R: Any>(
        &mut self,
        call: Call<'_>,
        run: impl AsyncFnOnce(&mut PgStore) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let result = match self.hook.before(&call, &mut self.inner).await {
            Go::Run => run(&mut self.inner).await,
            Go::Fail(e) => Err(e),
            Go::Answer(answer) => {
                Ok(*answer.downcast::<R>().unwrap_or_else(|_| panic!("the hook answered {} with the wrong type", call.name())))
            }
        };
        self.hook.after(&call, result.as_ref().map(|r| r as &dyn Any)).await;
        result
    }
}

impl<H: Hook> Store for Hooked<H> {
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError> {
        self.call(Call::EnsureSchema { config }, async |s| s.ensure_schema(config).await).await
    }
    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError> {
        self.call(Call::Counts { source }, async |s| s.counts(source).await).await
    }
    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError> {
        self.call(Call::LinkReusable { source }, async |s| s.link_reusable(source).await).await
    }
    async fn pending(
        &mut self,
        source: &Source,
        run: &RunId,
        after: Option<&ValueHash>,
        limit: usize,
    ) -> Result<Vec<PendingValue>, StoreError> {
        self.call(Call::Pending { source, run, after, limit }, async |s| s.pending(source, run, after, limit).await).await
    }
    async fn store(&mut self, source: &Source, batch: &[EmbeddedValue], progress: &Progress<'_>) -> Result<(), StoreError> {
        self.call(Call::Store { source, batch, progress }, async |s| s.store(source, batch, progress).await).await
    }
    async fn remove_stale(
        &mut self,
        source: &Source,
        run: &RunId,
        known_clean: bool,
        guard: Option<DeleteGuard>,
    ) -> Result<StaleOutcome, StoreError> {
        self.call(Call::RemoveStale { source, run, known_clean, guard }, async |s| s.remove_stale(source, run, known_clean, guard).await)
            .await
    }
    async fn record_errors(&mut self, source: &Source, failures: &[ValueFailure], run: &RunId) -> Result<(), StoreError> {
        self.call(Call::RecordErrors { source, failures, run }, async |s| s.record_errors(source, failures, run).await).await
    }
    async fn delete_orphans(&mut self, run: &RunId, sources: &[&Source]) -> Result<Vec<OrphansDeleted>, StoreError> {
        self.call(Call::DeleteOrphans { run, sources }, async |s| s.delete_orphans(run, sources).await).await
    }
    async fn record_refused(&mut self, run: &RunId, reasons: &[String]) -> Result<(), StoreError> {
        self.call(Call::RecordRefused { run, reasons }, async |s| s.record_refused(run, reasons).await).await
    }
    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.call(Call::AcquireLease { holder, ttl }, async |s| s.acquire_lease(holder, ttl).await).await
    }
    async fn release_lease(&mut self) -> Result<(), StoreError> {
        self.call(Call::ReleaseLease, async |s| s.release_lease().await).await
    }
    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError> {
        self.call(Call::OpenRun { new_id, trigger, sources }, async |s| s.open_run(new_id, trigger, sources).await).await
    }
    async fn save_plan(&mut self, run: &RunId, source: &Source, plan: &SourceReport, snapshot: bool) -> Result<(), StoreError> {
        self.call(Call::SavePlan { run, source, plan, snapshot }, async |s| s.save_plan(run, source, plan, snapshot).await).await
    }
    async fn finish_run(&mut self, run: &RunId, report: &RunReport) -> Result<(), StoreError> {
        self.call(Call::FinishRun { run, report }, async |s| s.finish_run(run, report).await).await
    }
    async fn index_state(&mut self) -> Result<IndexState, StoreError> {
        self.call(Call::IndexState, async |s| s.index_state().await).await
    }
    async fn index_ddl(&mut self, statement: &str) -> Result<(), StoreError> {
        self.call(Call::IndexDdl { statement }, async |s| s.index_ddl(statement).await).await
    }
    async fn record_indexes(&mut self, run: &RunId, indexes: &IndexReport) -> Result<(), StoreError> {
        self.call(Call::RecordIndexes { run, indexes }, async |s| s.record_indexes(run, indexes).await).await
    }
}
