//! The real store with a hook around every call: the one place where a test reaches between the
//! driver and [`PgStore`] (to fail a call, answer it, or act on the database first).
//!
//! A new [`Store`] method needs one [`Call`] variant (its arguments), one arm in
//! [`Call::name`] and one delegating method in the `impl Store for Hooked` below.

use embsync_core::batch_flow::{OpenBatch, RequestStored};
use embsync_core::config::ModelSlot;
use embsync_core::config::{Config, Source};
use embsync_core::fanout::{RangeClaim, RangeEnd, RangeTally};
use embsync_core::hash::ValueHash;
use embsync_core::index::IndexState;
use embsync_core::report::{IndexReport, RunReport, SourceReport, Trigger};
use embsync_core::sql::{BatchValue, SetBatchState};
use embsync_core::sync::{
    CaptureStep, DeleteGuard, EmbeddedValue, Lease, OrphansDeleted, PendingValue, Progress, RunId, RunState, SourceCounts, StaleOutcome,
    Store, StoreError, ValueFailure,
};
use embsync_core::vector::Vector;
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
    Capture { source: &'a Source },
    ReleaseCaptures { captured: &'a [&'a Source] },
    CaptureInfo { source: &'a Source },
    AcquireLease { holder: &'a str, ttl: Duration },
    ReleaseLease,
    OpenRun { new_id: &'a RunId, trigger: Trigger, sources: &'a [&'a Source] },
    SavePlan { run: &'a RunId, source: &'a Source, plan: &'a SourceReport, snapshot: bool },
    FinishRun { run: &'a RunId, report: &'a RunReport },
    IndexState,
    IndexDdl { statement: &'a str },
    RecordIndexes { run: &'a RunId, indexes: &'a IndexReport },
    PlanRanges { run: &'a RunId, source: &'a Source, range_values: u64 },
    RangeTally { run: &'a RunId },
    SweepRanges { run: &'a RunId, resend_after: Duration },
    ClaimRange { run: &'a RunId, range: i64, holder: &'a str, ttl: Duration },
    EndClaim { end: &'a RangeEnd },
    DeadLetter { run: &'a RunId, range: i64, reason: &'a str },
    RecordBatchFile { input_file_id: &'a str, run: &'a RunId, slot: ModelSlot, requests: u64, values: &'a [BatchValue<'a>] },
    SetBatchCreated { input_file_id: &'a str, batch_id: &'a str },
    SetBatchState { state: &'a SetBatchState<'a> },
    FinishBatchFile { input_file_id: &'a str, state: &'a str },
    OpenBatches,
    BatchRequests { input_file_id: &'a str },
    StoreBatchRequest { run: &'a RunId, input_file_id: &'a str, custom_id: &'a str, vectors: &'a [Vector], prompt_tokens: u64 },
    RecordBatchRequestErrors { run: &'a RunId, input_file_id: &'a str, custom_id: &'a str, message: &'a str },
    AwaitedValues { source: &'a Source },
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
            Call::Capture { .. } => "capture",
            Call::ReleaseCaptures { .. } => "release_captures",
            Call::CaptureInfo { .. } => "capture_info",
            Call::AcquireLease { .. } => "acquire_lease",
            Call::ReleaseLease => "release_lease",
            Call::OpenRun { .. } => "open_run",
            Call::SavePlan { .. } => "save_plan",
            Call::FinishRun { .. } => "finish_run",
            Call::IndexState => "index_state",
            Call::IndexDdl { .. } => "index_ddl",
            Call::RecordIndexes { .. } => "record_indexes",
            Call::PlanRanges { .. } => "plan_ranges",
            Call::RangeTally { .. } => "range_tally",
            Call::SweepRanges { .. } => "sweep_ranges",
            Call::ClaimRange { .. } => "claim_range",
            Call::EndClaim { .. } => "end_claim",
            Call::DeadLetter { .. } => "dead_letter",
            Call::RecordBatchFile { .. } => "record_batch_file",
            Call::SetBatchCreated { .. } => "set_batch_created",
            Call::SetBatchState { .. } => "set_batch_state",
            Call::FinishBatchFile { .. } => "finish_batch_file",
            Call::OpenBatches => "open_batches",
            Call::BatchRequests { .. } => "batch_requests",
            Call::StoreBatchRequest { .. } => "store_batch_request",
            Call::RecordBatchRequestErrors { .. } => "record_batch_request_errors",
            Call::AwaitedValues { .. } => "awaited_values",
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
    async fn capture(&mut self, source: &Source) -> Result<CaptureStep, StoreError> {
        self.call(Call::Capture { source }, async |s| s.capture(source).await).await
    }
    async fn release_captures(&mut self, captured: &[&Source]) -> Result<Vec<String>, StoreError> {
        self.call(Call::ReleaseCaptures { captured }, async |s| s.release_captures(captured).await).await
    }
    async fn capture_info(&mut self, source: &Source) -> Result<embsync_core::report::CaptureInfo, StoreError> {
        self.call(Call::CaptureInfo { source }, async |s| s.capture_info(source).await).await
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
    async fn plan_ranges(&mut self, run: &RunId, source: &Source, range_values: u64) -> Result<u64, StoreError> {
        self.call(Call::PlanRanges { run, source, range_values }, async |s| s.plan_ranges(run, source, range_values).await).await
    }
    async fn range_tally(&mut self, run: &RunId) -> Result<Vec<RangeTally>, StoreError> {
        self.call(Call::RangeTally { run }, async |s| s.range_tally(run).await).await
    }
    async fn sweep_ranges(&mut self, run: &RunId, resend_after: Duration) -> Result<Vec<i64>, StoreError> {
        self.call(Call::SweepRanges { run, resend_after }, async |s| s.sweep_ranges(run, resend_after).await).await
    }
    async fn claim_range(&mut self, run: &RunId, range: i64, holder: &str, ttl: Duration) -> Result<RangeClaim, StoreError> {
        self.call(Call::ClaimRange { run, range, holder, ttl }, async |s| s.claim_range(run, range, holder, ttl).await).await
    }
    async fn end_claim(&mut self, end: RangeEnd) -> Result<bool, StoreError> {
        let e = end.clone();
        self.call(Call::EndClaim { end: &e }, async |s| s.end_claim(end).await).await
    }
    async fn dead_letter(&mut self, run: &RunId, range: i64, reason: &str) -> Result<bool, StoreError> {
        self.call(Call::DeadLetter { run, range, reason }, async |s| s.dead_letter(run, range, reason).await).await
    }
    async fn record_batch_file(
        &mut self,
        input_file_id: &str,
        run: &RunId,
        slot: ModelSlot,
        requests: u64,
        values: &[BatchValue<'_>],
    ) -> Result<(), StoreError> {
        self.call(Call::RecordBatchFile { input_file_id, run, slot, requests, values }, async |s| {
            s.record_batch_file(input_file_id, run, slot, requests, values).await
        })
        .await
    }
    async fn set_batch_created(&mut self, input_file_id: &str, batch_id: &str) -> Result<(), StoreError> {
        self.call(Call::SetBatchCreated { input_file_id, batch_id }, async |s| s.set_batch_created(input_file_id, batch_id).await).await
    }
    async fn set_batch_state(&mut self, state: &SetBatchState<'_>) -> Result<(), StoreError> {
        self.call(Call::SetBatchState { state }, async |s| s.set_batch_state(state).await).await
    }
    async fn finish_batch_file(&mut self, input_file_id: &str, state: &str) -> Result<(), StoreError> {
        self.call(Call::FinishBatchFile { input_file_id, state }, async |s| s.finish_batch_file(input_file_id, state).await).await
    }
    async fn open_batches(&mut self) -> Result<Vec<OpenBatch>, StoreError> {
        self.call(Call::OpenBatches, async |s| s.open_batches().await).await
    }
    async fn batch_requests(&mut self, input_file_id: &str) -> Result<Vec<(String, u32)>, StoreError> {
        self.call(Call::BatchRequests { input_file_id }, async |s| s.batch_requests(input_file_id).await).await
    }
    async fn store_batch_request(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        vectors: &[Vector],
        prompt_tokens: u64,
    ) -> Result<RequestStored, StoreError> {
        self.call(Call::StoreBatchRequest { run, input_file_id, custom_id, vectors, prompt_tokens }, async |s| {
            s.store_batch_request(config, run, input_file_id, custom_id, vectors, prompt_tokens).await
        })
        .await
    }
    async fn record_batch_request_errors(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        message: &str,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        self.call(Call::RecordBatchRequestErrors { run, input_file_id, custom_id, message }, async |s| {
            s.record_batch_request_errors(config, run, input_file_id, custom_id, message).await
        })
        .await
    }
    async fn awaited_values(&mut self, source: &Source) -> Result<(u64, u64), StoreError> {
        self.call(Call::AwaitedValues { source }, async |s| s.awaited_values(source).await).await
    }
}
