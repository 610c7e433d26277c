//! The sync driver: plans and runs a sync over a [`Store`] and an [`Embedder`].
//!
//! The driver holds the rules (what is new, stale and unchanged; batching; retries; what a
//! failure costs) and performs no IO itself: the worker implements the traits with Postgres and
//! `fetch`, and the tests below implement them in memory, with faults on command.

use crate::batch;
use crate::batch_api::BatchApi;
use crate::config::{Config, ModelSlot, ModelSpec, Source};
use crate::fanout::{FanOut, RangeClaim, RangeEnd, RangeMessage, RangeTally};
use crate::hash::ValueHash;
use crate::index::{self, DropReason, IndexAction, IndexState};
use crate::log::LogEvent;
use crate::provider::{Embeddings, ProviderError};
use crate::rate;
use crate::report::{
    iso8601, BatchApiPlan, CaptureInfo, ChangesMode, CostEstimate, DryRunReport, IndexReport, ModelInfo, ModelUsage, ModelsInfo,
    PlanTotals, RunReport, RunStatus, SourcePlanReport, SourceReport, TokenEstimate, Totals, Trigger, Usage,
};
use crate::vector::Vector;
use std::cell::{Cell, RefCell};
use std::time::Duration;

/// A failure of the database, with what was being done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    message: String,
    lease_lost: bool,
}

impl StoreError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError { message: message.into(), lease_lost: false }
    }

    /// The write was refused because this invocation no longer holds the sync lease.
    pub fn lease_lost(message: impl Into<String>) -> Self {
        StoreError { message: message.into(), lease_lost: true }
    }

    /// Whether another invocation took the lease over: this one must stop at once.
    pub fn is_lease_lost(&self) -> bool {
        self.lease_lost
    }

    /// The same error with what was being done in front.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        StoreError { message: format!("{what}: {}", self.message), ..self }
    }
}

/// Counts for one source, computed set-wise by the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCounts {
    /// Distinct non-empty values in the source.
    pub total: u64,
    /// Values not yet embedded for this source.
    pub new: u64,
    /// New values whose cache row already has both embeddings.
    pub reusable: u64,
    /// Estimated tokens of the values that need the provider.
    pub embed_tokens: u64,
    /// Values recorded for this source that it no longer has.
    pub stale: u64,
    /// New values waiting for a retry after an error (not attempted until then).
    pub deferred: u64,
}

impl SourceCounts {
    /// New values that need the provider.
    pub fn to_embed(&self) -> u64 {
        self.new.saturating_sub(self.reusable)
    }

    /// Provider batches a run would take: the values to embed, less those waiting for a retry,
    /// in batches of `per_batch` ([`Config::values_per_batch`]).
    pub fn batches(&self, per_batch: usize) -> u64 {
        self.to_embed().saturating_sub(self.deferred).div_ceil(per_batch.max(1) as u64)
    }
}

/// A value that still needs an embedding for a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingValue {
    /// The value hash.
    pub hash: ValueHash,
    /// The trimmed value.
    pub value: String,
    /// Source rows holding the value.
    pub occurrences: i32,
    /// The cache row already has `embedding_large`.
    pub has_large: bool,
    /// The cache row already has `embedding_small`.
    pub has_small: bool,
}

/// A value with the embeddings this run made for it.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedValue {
    /// The value hash.
    pub hash: ValueHash,
    /// The trimmed value.
    pub value: String,
    /// Source rows holding the value.
    pub occurrences: i32,
    /// New `embedding_large`, or `None` when the row has it already or the call failed.
    pub large: Option<Vector>,
    /// New `embedding_small`, likewise.
    pub small: Option<Vector>,
    /// The value has both embeddings once this batch is written.
    pub complete: bool,
}

/// A value that could not be embedded in this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueFailure {
    /// The value hash.
    pub hash: ValueHash,
    /// The model or models that failed, comma-separated.
    pub model: String,
    /// Why.
    pub message: String,
}

/// What [`Store::capture`] found for a captured source (`"changes": "capture"`) before it is
/// planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureStep {
    /// Its change log holds nothing for it, its triggers are in place, no reconcile is due, and
    /// the last run left it with nothing pending under the same models: it need not be planned.
    Unchanged {
        /// Its distinct values, as last counted.
        total: u64,
    },
    /// Its change log was folded into embsync's copy of its values, which its plan reads
    /// instead of the table.
    Folded {
        /// Log rows consumed.
        changes: u64,
    },
    /// A full reconcile by scan rewrote embsync's copy of its values.
    Reconciled {
        /// Why it ran (schedule, capture installed, triggers disabled, TRUNCATE, ...).
        why: String,
        /// What the capture had missed, when it could know (not after an install or a
        /// TRUNCATE, whose changes the log does not hold).
        drift: Option<Drift>,
    },
}

/// Values a reconcile found that the capture had missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Drift {
    /// Values the source has that the capture did not record.
    pub new: u64,
    /// Values the capture recorded that the source has no more.
    pub stale: u64,
}

/// What removing stale values did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaleOutcome {
    /// Links removed: values the source no longer has. Cache rows no source links any more are
    /// deleted at the run's end ([`Store::delete_orphans`]).
    pub unlinked: u64,
    /// Why the mass-delete guard held the removal back (then nothing was removed).
    pub held_back: Option<String>,
}

/// The mass-delete guard: how much of a source's values one run may remove. The store checks it
/// in the transaction that removes them, on the counts that transaction sees, so a source emptied
/// after the driver counted it is still held back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeleteGuard {
    /// Fewer stale values than this always pass (`massDeleteMinimum`).
    pub minimum: u64,
    /// The largest share of its linked values a source may lose (`maxDeleteShare`).
    pub max_share: f64,
}

impl DeleteGuard {
    /// The guard for `source`, or `None` when it allows mass deletes.
    pub fn of(config: &Config, source: &Source) -> Option<DeleteGuard> {
        (!source.allow_mass_delete).then_some(DeleteGuard { minimum: config.mass_delete_minimum, max_share: config.max_delete_share })
    }

    /// Whether removing `stale` of the source's `had` linked values, while it has `total`
    /// values, is held back. The SQL form is [`crate::sql::MASS_DELETE_HELD`].
    pub fn holds(&self, total: u64, had: u64, stale: u64) -> bool {
        stale >= self.minimum && had > 0 && (total == 0 || stale as f64 > self.max_share * had as f64)
    }

    /// Why the removal is held back, for the report and the log, if it is.
    pub fn check(&self, total: u64, had: u64, stale: u64) -> Option<String> {
        if !self.holds(total, had, stale) {
            return None;
        }
        let why = if total == 0 {
            format!("the source returned no values, so all {stale} of its embedded values look stale")
        } else {
            format!(
                "{stale} of its {had} embedded values ({:.0}%) look stale, more than maxDeleteShare ({:.0}%)",
                stale as f64 / had as f64 * 100.0,
                self.max_share * 100.0
            )
        };
        Some(format!("{why}; nothing was deleted: check the source, or set \"allowMassDelete\": true for it if this is intended"))
    }
}

/// The database, as the driver needs it. Every method that writes is one transaction, fenced by
/// the lease this store took in [`Store::acquire_lease`]: once the lease is lost it writes
/// nothing. `index_ddl` is the exception: `CONCURRENTLY` runs outside a transaction, after a
/// fenced check. Reads may take more than one statement.
///
/// Architecture Invariant: Postgres holds the truth about a run (its counters, which sources are
/// done, the lease); anything kept elsewhere (the KV cursor) is a hint that may be stale.
///
/// Architecture Invariant: every method that writes (all but `ensure_schema`, `counts`,
/// `pending`, `index_state` and `range_tally`, which only read, and `claim_range` and
/// `dead_letter`, which stand alone) is fenced by the lease [`Store::acquire_lease`] took, or by
/// the range claim [`Store::claim_range`] took (a queue consumer): it writes only while that
/// lease or claim is still this invocation's, unexpired, and renews it; otherwise it writes
/// nothing and fails with [`StoreError::is_lease_lost`], and the driver stops.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Brings embsync's schema up to date when its recorded version is behind (DDL only then,
    /// with a lock timeout, so a steady-state invocation takes no lock a pg_dump holds up) and
    /// checks the embedding columns against the models. Never changes the user's rows.
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError>;
    /// Counts for one source. Must not write anything (a dry run calls it on a fresh database).
    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError>;
    /// Links the source to values whose embeddings exist already; returns how many.
    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError>;
    /// Up to `limit` values that need an embedding, in hash order after `after`: from the run's
    /// snapshot of the source's pending values when [`Store::save_plan`] took one (a range scan),
    /// else from the source itself (a scan of the source per page).
    async fn pending(
        &mut self,
        source: &Source,
        run: &RunId,
        after: Option<&ValueHash>,
        limit: usize,
    ) -> Result<Vec<PendingValue>, StoreError>;
    /// Writes one batch and links all its values to the source, atomically, together with the
    /// run's counters for it (`progress`). A value counts as done for the source only when it is
    /// linked and its row holds both embeddings, so a value with one embedding is kept (it is
    /// paid for) and completed by a later run.
    async fn store(&mut self, source: &Source, batch: &[EmbeddedValue], progress: &Progress<'_>) -> Result<(), StoreError>;
    /// Unlinks values the source no longer has, records embsync's rows of them that no other
    /// source links as orphan candidates (deleted by [`Store::delete_orphans`] once every source
    /// of the run is done, so a value that moved to a source planned later is linked by then
    /// and kept), drops the source's errors of values it no longer has, and marks the source
    /// done in the run, atomically. With a `guard`, it counts and decides in the same
    /// transaction (the same snapshot of the source) and removes nothing when the guard holds
    /// ([`StaleOutcome::held_back`]). With `known_clean` (this invocation counted no stale
    /// values) and no errors recorded for the source it only marks the source done, sparing a
    /// scan of the source.
    async fn remove_stale(
        &mut self,
        source: &Source,
        run: &RunId,
        known_clean: bool,
        guard: Option<DeleteGuard>,
    ) -> Result<StaleOutcome, StoreError>;
    /// Deletes embsync's rows of the orphan candidates that no source links and none of
    /// `sources` (the enabled ones) has any more, and forgets the candidates that are linked
    /// again or deleted, adding the rows deleted to the `deleted` counters of the run's sources
    /// that unlinked them, atomically. Called once every source of the run is done without
    /// error. Returns the rows deleted per source that unlinked them.
    async fn delete_orphans(&mut self, run: &RunId, sources: &[&Source]) -> Result<Vec<OrphansDeleted>, StoreError>;
    /// Adds to the run why the provider refused a model's requests themselves, so the
    /// invocation that finishes the run reports it `stopped` (its values wait for the first run
    /// after the fix), whichever invocation that is.
    async fn record_refused(&mut self, run: &RunId, reasons: &[String]) -> Result<(), StoreError>;
    /// For a captured source, before it is planned in a run: installs its triggers when they
    /// are missing (DDL, with a lock timeout; only then), then either finds nothing to do,
    /// folds its change log into embsync's copy of its values, or reconciles the copy with a
    /// scan of the source when one is due or forced (never reconciled, `reconcileEvery` passed,
    /// triggers disabled or re-enabled, a TRUNCATE of the source or of the log, a count that
    /// went below zero). Fenced.
    async fn capture(&mut self, source: &Source) -> Result<CaptureStep, StoreError>;
    /// Drops embsync's triggers and functions on the tables of sources that are not in
    /// `captured` (the enabled sources with `"changes": "capture"`) any more, with their
    /// change log and copy of values (DDL with a lock timeout, only when there is one to
    /// drop). Returns the `table.column` keys released. Fenced.
    async fn release_captures(&mut self, captured: &[&Source]) -> Result<Vec<String>, StoreError>;
    /// What the dry run and `/status` show of a captured source's capture. Reads only (also on
    /// a database embsync has not migrated yet: then not installed).
    async fn capture_info(&mut self, source: &Source) -> Result<CaptureInfo, StoreError>;
    /// Records failures so the values are retried by a later run, with backoff, and counts them
    /// in the run. A successful [`Store::store`] of a value clears its record.
    async fn record_errors(&mut self, source: &Source, failures: &[ValueFailure], run: &RunId) -> Result<(), StoreError>;
    /// Takes the sync lease for `holder` for `ttl`, unless another holder has it unexpired. The
    /// store keeps the lease it took (its fencing token) for the writes that follow, each of
    /// which renews it for `ttl`.
    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError>;
    /// Gives the lease up, if this store still holds it (a lost lease is left alone).
    async fn release_lease(&mut self) -> Result<(), StoreError>;
    /// The unfinished run with its per-source state, or a new run `new_id` over `sources`.
    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError>;
    /// Saves a source's plan (counted once per run, at its first invocation) and, with
    /// `snapshot`, the source's pending values with their hashes, in one transaction, so later
    /// pages need not hash the whole source again.
    async fn save_plan(&mut self, run: &RunId, source: &Source, plan: &SourceReport, snapshot: bool) -> Result<(), StoreError>;
    /// Ends the run with its final report (status `finished` or `failed`, from the report).
    async fn finish_run(&mut self, run: &RunId, report: &RunReport) -> Result<(), StoreError>;
    /// What [`index::plan`] needs to know about `embedding_cache`. Reads only.
    async fn index_state(&mut self) -> Result<IndexState, StoreError>;
    /// Runs one `CREATE INDEX CONCURRENTLY` or `DROP INDEX CONCURRENTLY` statement from
    /// [`index::IndexAction::sql`], outside any transaction. It may take minutes.
    async fn index_ddl(&mut self, statement: &str) -> Result<(), StoreError>;
    /// Adds the index step's outcome to the stored report of a finished run.
    async fn record_indexes(&mut self, run: &RunId, indexes: &IndexReport) -> Result<(), StoreError>;
    /// Fan-out ([`crate::fanout`]): splits the run's snapshot of the source into ranges of
    /// `range_values` values in hash order, in one statement fenced by the lease; returns how
    /// many (none when the snapshot is empty or the source has ranges already).
    async fn plan_ranges(&mut self, run: &RunId, source: &Source, range_values: u64) -> Result<u64, StoreError>;
    /// The run's ranges per source and state. Reads only.
    async fn range_tally(&mut self, run: &RunId) -> Result<Vec<RangeTally>, StoreError>;
    /// The sweeper, fenced by the lease: the run's queued ranges that no consumer holds and
    /// whose message was not sent within `resend_after` (or never) are marked sent now; returns
    /// their ids, for the worker to send.
    async fn sweep_ranges(&mut self, run: &RunId, resend_after: Duration) -> Result<Vec<i64>, StoreError>;
    /// Claims range `range` of `run` for `holder` for `ttl` when the run is open (under this
    /// config's models), the range queued and nobody holds it unexpired. From then on every
    /// write of this store is fenced by the claim instead of the lease (and renews it), a batch
    /// also moves the range's progress, and [`Store::pending`] pages stop at the range's upper
    /// bound. Needs no lease.
    async fn claim_range(&mut self, run: &RunId, range: i64, holder: &str, ttl: Duration) -> Result<RangeClaim, StoreError>;
    /// Ends the claim (fenced by it, like any write): the range is done, handed on or dead.
    /// Returns whether no range of the run is queued any more (read after the end committed).
    async fn end_claim(&mut self, end: RangeEnd) -> Result<bool, StoreError>;
    /// Marks the range dead with `reason` (the dead-letter queue) unless it is settled or a
    /// consumer holds it unexpired; whether it was marked. Needs no lease or claim.
    async fn dead_letter(&mut self, run: &RunId, range: i64, reason: &str) -> Result<bool, StoreError>;
    /// The Batch API ([`crate::batch_flow`]): records an uploaded request file of `requests`
    /// requests for `slot`'s configured model, with the values of each request, in one fenced
    /// transaction, before its batch is created (a cut between the two leaves the file to find
    /// the batch by). From then on [`Store::pending`] counts the values' `slot` embedding as
    /// had.
    async fn record_batch_file(
        &mut self,
        input_file_id: &str,
        run: &RunId,
        slot: ModelSlot,
        requests: u64,
        values: &[crate::sql::BatchValue<'_>],
    ) -> Result<(), StoreError>;
    /// Records the batch created from a file. Fenced.
    async fn set_batch_created(&mut self, input_file_id: &str, batch_id: &str) -> Result<(), StoreError>;
    /// Records a batch's state as polled, or that embsync is done with it (`finished`): then
    /// the values still recorded for it are forgotten in the same transaction, and go the
    /// synchronous way. Fenced.
    async fn set_batch_state(&mut self, state: &crate::sql::SetBatchState<'_>) -> Result<(), StoreError>;
    /// Ends a file no batch was made of (`state`, e.g. `abandoned`); its values go the
    /// synchronous way. Fenced.
    async fn finish_batch_file(&mut self, input_file_id: &str, state: &str) -> Result<(), StoreError>;
    /// The request files embsync has not finished with, oldest first. Reads only.
    async fn open_batches(&mut self) -> Result<Vec<crate::batch_flow::OpenBatch>, StoreError>;
    /// The requests of a file whose vectors are not stored yet, with their number of inputs.
    /// Reads only.
    async fn batch_requests(&mut self, input_file_id: &str) -> Result<Vec<(String, u32)>, StoreError>;
    /// Stores the vectors of request `custom_id` of file `input_file_id` (`vectors[i]` for its
    /// input `i`) in one fenced transaction: only for the values their source still has, never
    /// over a vector that is there (the batch write fills what is missing or made by another
    /// model), with `run`'s counters (the values written, and `prompt_tokens` as batch usage);
    /// then forgets the request, so that reading the output again stores and counts nothing
    /// twice. A request of another model than the slot's configured one writes nothing.
    async fn store_batch_request(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        vectors: &[Vector],
        prompt_tokens: u64,
    ) -> Result<crate::batch_flow::RequestStored, StoreError>;
    /// Records a request the batch refused for its inputs: each of its values that its source
    /// still has goes to `embedding_sync_errors` (with the synchronous path's backoff) and
    /// counts in `run`'s errors, and the request is forgotten, in one fenced transaction.
    /// Returns the errors recorded per source (table key, column key, values).
    async fn record_batch_request_errors(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        message: &str,
    ) -> Result<Vec<(String, String, u64)>, StoreError>;
    /// The values of each model (large, small) of `source` that pending batches of the
    /// configured models bring (for the dry run). Reads only (none on a database embsync has
    /// not migrated).
    async fn awaited_values(&mut self, source: &Source) -> Result<(u64, u64), StoreError>;
}

/// Cache rows [`Store::delete_orphans`] deleted, for the source that unlinked them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphansDeleted {
    /// The source's table key ([`Source::table_key`]).
    pub table: String,
    /// The source's column key.
    pub column: String,
    /// Rows deleted.
    pub rows: u64,
}

/// A run's id: one run may span many invocations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunId(pub String);

/// The lease that keeps two invocations from syncing at once.
#[derive(Debug, Clone, PartialEq)]
pub enum Lease {
    /// This invocation holds it.
    Acquired,
    /// Another invocation holds it.
    Held {
        /// Its holder.
        holder: String,
        /// Seconds until it expires unless renewed.
        expires_in_secs: f64,
    },
}

/// What one batch adds to the run's counters, written with the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress<'a> {
    /// The run.
    pub run: &'a RunId,
    /// Values embedded and stored by this batch.
    pub embedded: u64,
    /// Values reused (no provider call) by this batch.
    pub reused: u64,
    /// 1 when this batch needed the provider (it counts in `Batch i of N`), else 0.
    pub batches: u64,
    /// Provider-reported tokens and requests of this batch.
    pub usage: (ModelUsage, ModelUsage),
}

/// A source's state within a run, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceState {
    /// Counters so far (all invocations).
    pub report: SourceReport,
    /// The plan was saved (counts taken, reusable values linked).
    pub planned: bool,
    /// Batches planned at the first invocation.
    pub planned_batches: u64,
    /// Stale values removed: the source is done for this run.
    pub done: bool,
    /// Provider usage so far, large and small.
    pub usage: (ModelUsage, ModelUsage),
}

/// A run as stored: what earlier invocations did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    /// The run.
    pub id: RunId,
    /// What started it.
    pub trigger: Trigger,
    /// When it started (epoch ms).
    pub started_at_ms: f64,
    /// Invocations so far, this one included.
    pub invocations: u64,
    /// Per enabled source, in config order.
    pub sources: Vec<SourceState>,
    /// Why the provider refused a model's requests themselves in an invocation of the run
    /// ([`Store::record_refused`]).
    pub refused: Vec<String>,
}

/// What one invocation may spend before it stops cleanly and leaves the rest to the next one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Provider batches (each is one request per model, plus retries).
    pub max_batches: u64,
    /// Wall time, in milliseconds.
    pub max_ms: f64,
    /// How long the lease lasts without renewal; a killed invocation blocks others this long.
    pub lease_ttl: Duration,
    /// Provider requests (subrequests), retries and split halves included: the invocation
    /// pauses before the one that would go past this.
    pub max_subrequests: u64,
}

impl Default for Budget {
    /// Fits the Workers paid plan: at most 200 batches and 120 s of wall time per invocation,
    /// and at most 1,000 provider requests, a tenth of the plan's 10,000 subrequests per
    /// invocation, whatever the retries and splits.
    fn default() -> Self {
        Budget { max_batches: 200, max_ms: 120_000.0, lease_ttl: Duration::from_secs(300), max_subrequests: 1000 }
    }
}

impl Budget {
    /// How many times the time budget the lease must last at least: a healthy invocation renews
    /// it with every write, and the longest stretch without one is a batch's provider calls
    /// with their retries, which the time budget bounds (plus the request in flight).
    pub const LEASE_MARGIN: f64 = 1.5;

    /// A budget of `max_batches` provider batches and `max_seconds` of wall time per invocation,
    /// with a lease of `lease_seconds`.
    ///
    /// # Errors
    /// [`BudgetError`] when a number is not positive and finite, or the lease is shorter than
    /// [`Budget::LEASE_MARGIN`] times `max_seconds`.
    pub fn new(max_batches: u64, max_seconds: f64, lease_seconds: f64) -> Result<Budget, BudgetError> {
        let positive = |name: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(BudgetError::NotPositive { name, value: v.to_string() })
            }
        };
        positive("SYNC_MAX_BATCHES", max_batches as f64)?;
        let max_seconds = positive("SYNC_MAX_SECONDS", max_seconds)?;
        let lease_seconds = positive("SYNC_LEASE_SECONDS", lease_seconds)?;
        if lease_seconds < max_seconds * Self::LEASE_MARGIN {
            return Err(BudgetError::LeaseTooShort { lease_seconds, max_seconds });
        }
        Ok(Budget {
            max_batches,
            max_ms: max_seconds * 1000.0,
            lease_ttl: Duration::from_secs_f64(lease_seconds),
            max_subrequests: Budget::default().max_subrequests,
        })
    }

    /// The budget from the settings `SYNC_MAX_BATCHES`, `SYNC_MAX_SECONDS`,
    /// `SYNC_LEASE_SECONDS` and `SYNC_MAX_SUBREQUESTS`, as `setting` reads them (`None` or blank:
    /// the default).
    ///
    /// # Errors
    /// [`BudgetError`] naming the setting that is not a number, or as [`Budget::new`].
    pub fn from_settings(setting: impl Fn(&str) -> Option<String>) -> Result<Budget, BudgetError> {
        let d = Budget::default();
        let read = |name: &'static str, default: f64| -> Result<f64, BudgetError> {
            match setting(name).as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.parse::<f64>().map_err(|_| BudgetError::NotPositive { name, value: v.to_owned() }),
            }
        };
        let whole = |name: &'static str, default: u64| -> Result<u64, BudgetError> {
            match setting(name).as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| BudgetError::NotPositive { name, value: v.to_owned() }),
            }
        };
        let batches = whole("SYNC_MAX_BATCHES", d.max_batches)?;
        let subrequests = whole("SYNC_MAX_SUBREQUESTS", d.max_subrequests)?;
        let budget =
            Budget::new(batches, read("SYNC_MAX_SECONDS", d.max_ms / 1000.0)?, read("SYNC_LEASE_SECONDS", d.lease_ttl.as_secs_f64())?)?;
        Ok(Budget { max_subrequests: subrequests, ..budget })
    }
}

/// Why the invocation budget's settings were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// A setting is not a positive number (`SYNC_MAX_BATCHES`, `SYNC_MAX_SUBREQUESTS`: a positive
    /// integer).
    #[error(
        "{name} is {value:?}, which is not a positive {}number: set it to one or remove it for the default",
        if matches!(*name, "SYNC_MAX_BATCHES" | "SYNC_MAX_SUBREQUESTS" | "SYNC_FANOUT_MIN_VALUES" | "SYNC_FANOUT_RANGE_VALUES" | "SYNC_QUEUE_CONSUMERS") { "whole " } else { "" }
    )]
    NotPositive {
        /// The setting.
        name: &'static str,
        /// What it holds.
        value: String,
    },
    /// The lease would expire during a healthy invocation, which would then lose it to the next.
    #[error(
        "SYNC_LEASE_SECONDS ({lease_seconds}) must be at least 1.5 times SYNC_MAX_SECONDS ({max_seconds}), so that a working \
         invocation keeps its lease: set SYNC_LEASE_SECONDS to {} or more, or lower SYNC_MAX_SECONDS",
        (max_seconds * Budget::LEASE_MARGIN).ceil()
    )]
    LeaseTooShort {
        /// `SYNC_LEASE_SECONDS`.
        lease_seconds: f64,
        /// `SYNC_MAX_SECONDS`.
        max_seconds: f64,
    },
    /// More queue consumers than the config's `rate.maxConcurrency`: each keeps at least one
    /// provider request in flight, so together they would go past it.
    #[error(
        "SYNC_QUEUE_CONSUMERS is {consumers} but rate.maxConcurrency is {max_concurrency}: each queue consumer keeps at least one \
         provider request in flight, so together they would have {consumers}; set SYNC_QUEUE_CONSUMERS (and the ranges \
         consumer's max_concurrency x max_batch_size in wrangler.toml) to at most {max_concurrency}, or raise rate.maxConcurrency"
    )]
    ConsumersOverConcurrency {
        /// `SYNC_QUEUE_CONSUMERS`.
        consumers: u32,
        /// The config's `rate.maxConcurrency`.
        max_concurrency: u8,
    },
}

/// Where an invocation stopped: saved in KV as a hint for the next one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cursor {
    /// The run.
    pub run_id: String,
    /// Index of the source among the enabled ones.
    pub source: usize,
    /// `embed` or `stale`.
    pub phase: String,
    /// The last hash processed in the source (hash order).
    pub after: Option<String>,
    /// The run's totals so far (a copy; Postgres holds the truth).
    pub totals: Totals,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The run finished; its report covers all its invocations.
    Finished(RunReport),
    /// The budget ran out; the report so far and where to go on.
    Paused(RunReport, Cursor),
    /// Fan-out ([`crate::fanout`]): a source's ranges are queued (planned by this invocation,
    /// or waiting for consumers); the worker sends `messages` (after this returns) and stops
    /// chaining: the consumers do the work, and the one that settles the last range starts the
    /// chain again. A message never sent is not lost: a later lease holder sends it again.
    FannedOut {
        /// The run so far (status `paused`).
        report: RunReport,
        /// The ranges to send a message for (new, or whose message looks lost).
        messages: Vec<RangeMessage>,
    },
    /// Another invocation holds the lease; nothing was done.
    Busy {
        /// The other holder.
        holder: String,
        /// Seconds until its lease expires unless renewed.
        expires_in_secs: f64,
    },
}

/// Subrequests one Workers invocation may make on the Workers Paid plan
/// (<https://developers.cloudflare.com/workers/platform/limits/#subrequests>): the invocations
/// of the driver chained in one trigger share them.
pub const WORKER_SUBREQUESTS: u64 = 10_000;

/// How long one trigger (a cron event, a `POST /sync`) goes on with a paused run: invocation of
/// [`invoke`] after invocation, each with its own budget, lease and cursor, so a run that needs
/// several does not wait for the next cron tick between them. No queue is needed: the worker
/// loops while the trigger's wall time lasts (a cron event may run 15 minutes; what binds is
/// the CPU time, `limits.cpu_ms`, which the invocations' time budgets keep well under).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chain {
    /// Wall time the trigger may take, in milliseconds (`SYNC_CHAIN_SECONDS`); 0: one
    /// invocation per trigger.
    pub max_ms: f64,
}

impl Default for Chain {
    /// Ten minutes: inside a cron event's 15 minutes of wall time with room for the last
    /// invocation's stale removal and index step.
    fn default() -> Self {
        Chain { max_ms: 600_000.0 }
    }
}

impl Chain {
    /// The chain from `SYNC_CHAIN_SECONDS` as `setting` reads it (`None` or blank: the default;
    /// `0`: off).
    ///
    /// # Errors
    /// [`BudgetError::NotPositive`] when it is not a number of seconds (0 or more).
    pub fn from_settings(setting: impl Fn(&str) -> Option<String>) -> Result<Chain, BudgetError> {
        const NAME: &str = "SYNC_CHAIN_SECONDS";
        match setting(NAME).as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            None => Ok(Chain::default()),
            Some(v) => match v.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(Chain { max_ms: secs * 1000.0 }),
                _ => Err(BudgetError::NotPositive { name: NAME, value: v.to_owned() }),
            },
        }
    }

    /// Whether the trigger starts the next invocation at once after `outcome`, `elapsed_ms`
    /// after it began and `invocations` invocations in: only for a run paused by its budget
    /// (an outage or a refused model waits for the next trigger: `stopped` says why), when a
    /// whole invocation of `budget` still fits in the wall time, and when the invocations
    /// together stay within [`WORKER_SUBREQUESTS`] (less one invocation's worth for KV and the
    /// database).
    pub fn goes_on(&self, outcome: &Outcome, elapsed_ms: f64, invocations: u64, budget: &Budget) -> bool {
        let Outcome::Paused(report, _) = outcome else { return false };
        let most = (WORKER_SUBREQUESTS / budget.max_subrequests.max(1)).saturating_sub(1).max(1);
        // A run waiting for batches goes on at once only to read an output left partly read.
        let batches_ready = report.pending_batches.as_ref().is_none_or(|p| p.reading > 0);
        report.stopped.is_none() && batches_ready && elapsed_ms + budget.max_ms <= self.max_ms && invocations < most
    }
}

/// The embeddings provider: one request, no retries (the driver retries).
#[allow(async_fn_in_trait)]
pub trait Embedder {
    /// Embeds `inputs` with `model`; one vector per input, in order.
    async fn embed(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Embeddings, ProviderError>;
}

/// Time and logging, from the platform.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> f64;
    /// Waits.
    async fn sleep(&self, duration: Duration);
    /// A number in [0, 1) for jitter.
    fn random(&self) -> f64;
    /// Writes one structured log event.
    fn log(&self, event: LogEvent);
}

/// How failed provider calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The first backoff.
    pub base: Duration,
    /// No backoff of ours is longer than this. A wait the provider asks for (`retry-after`) is
    /// honoured in full; the invocation's time budget bounds it.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 5, base: Duration::from_millis(500), max_delay: Duration::from_secs(20) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 = first retry): the provider's `retry-after`
    /// when it gave one, in full; else exponential backoff capped at `max_delay`, of which a
    /// random half is waited ("equal jitter": between half and all of it, `random` in [0, 1)).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, random: f64) -> Duration {
        match retry_after {
            Some(d) => d,
            None => {
                let exp = self.base.saturating_mul(1u32 << retry.min(16));
                exp.min(self.max_delay).mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
            }
        }
    }
}

/// Why a run stopped before it could report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The database could not be prepared.
    #[error("preparing the database: {0}")]
    Schema(#[source] StoreError),
    /// The provider refused every request (e.g. a wrong API key); the run stopped at once.
    #[error("sync stopped: {0}")]
    Provider(#[source] ProviderError),
    /// Another invocation took the lease over (this one was too slow); it goes on with the run
    /// and this one stopped without writing anything more.
    #[error("this invocation lost the sync lease to another one, which goes on with the run: {0}")]
    LeaseLost(#[source] StoreError),
    /// A queue consumer found the provider unavailable through every retry (429, 5xx, no
    /// answer): its range keeps its progress and the message is retried.
    #[error("the provider is unavailable: {0}; the range keeps its progress and is retried")]
    Unavailable(String),
}

/// Plans every enabled source without calling the provider or writing anything.
///
/// A source that cannot be counted (e.g. its table is missing) carries the error in its entry;
/// the others are still planned.
pub async fn dry_run<S: Store>(config: &Config, store: &mut S) -> DryRunReport {
    let batch = config.batch_size.get() as u64;
    let mut sources = Vec::new();
    // Per model (large, small): the values to embed that no pending batch brings.
    let mut pending = (0u64, 0u64);
    for source in config.enabled_sources() {
        let mut entry = SourcePlanReport {
            name: source.name.clone(),
            table: source.table_key(),
            column: source.column_key().to_owned(),
            changes: ChangesMode::of(source.changes),
            ..Default::default()
        };
        if source.changes.is_capture() {
            match store.capture_info(source).await {
                Ok(info) => entry.capture = Some(info),
                Err(e) => entry.error = Some(format!("reading the change capture of source {}: {e}", source.name)),
            }
        }
        // Values pending batches bring are not pending for their model.
        let awaited = match store.awaited_values(source).await {
            Ok(awaited) => awaited,
            Err(e) => {
                entry.error = Some(format!("reading the pending batches of source {}: {e}", source.name));
                (0, 0)
            }
        };
        match store.counts(source).await {
            Ok(c) => {
                pending.0 += c.to_embed().saturating_sub(awaited.0);
                pending.1 += c.to_embed().saturating_sub(awaited.1);
                entry.total = c.total;
                entry.new = c.new;
                entry.stale = c.stale;
                entry.deferred = c.deferred;
                entry.unchanged = c.total.saturating_sub(c.new);
                entry.reusable = c.reusable;
                entry.to_embed = c.to_embed();
                entry.batches = c.batches(config.values_per_batch());
                entry.estimated_tokens = TokenEstimate { large: c.embed_tokens, small: c.embed_tokens };
                entry.estimated_cost_usd = CostEstimate::of(config, c.embed_tokens, c.embed_tokens);
            }
            Err(e) => entry.error = Some(format!("planning source {}: {e}", source.name)),
        }
        sources.push(entry);
    }
    let totals = PlanTotals::of(&sources);
    DryRunReport {
        dry_run: true,
        batch_api: BatchApiPlan::of(config, pending, &totals.estimated_tokens),
        estimated_cost_usd: CostEstimate::of(config, totals.estimated_tokens.large, totals.estimated_tokens.small),
        batch_size: batch,
        models: ModelsInfo { large: model_info(config, ModelSlot::Large), small: model_info(config, ModelSlot::Small) },
        disabled: config.sources.iter().filter(|s| !s.enabled).map(|s| s.name.clone()).collect(),
        totals,
        sources,
    }
}

fn model_info(config: &Config, slot: ModelSlot) -> ModelInfo {
    let m = config.models.get(slot);
    ModelInfo { model: m.name().to_owned(), dimensions: m.dimensions() }
}

/// Runs one invocation of a sync: resumes the unfinished run (or starts one) and goes on until
/// the run is done or the budget is spent.
///
/// A source that fails (its table is missing, the database drops a statement) gets the error in
/// its report and the run goes on with the next one; values the provider keeps refusing are
/// recorded and the run goes on.
///
/// # Errors
/// [`SyncError::Schema`] when the database cannot be prepared or the run state cannot be read,
/// and [`SyncError::Provider`] when the provider rejects the API key: nothing later could
/// succeed, so the run stops at once. [`SyncError::LeaseLost`] when any write was refused because
/// another invocation took the lease over (or it expired): this one stops at once, writes nothing
/// more and reports nothing; the run is the new holder's.
pub async fn invoke<S: Store, E: Embedder, R: Runtime>(
    config: &Config,
    store: &mut S,
    embedder: &E,
    rt: &R,
    inv: &Invocation<'_>,
) -> Result<Outcome, SyncError> {
    let began = rt.now_ms();
    let schema = |e: StoreError| SyncError::Schema(e);
    store.ensure_schema(config).await.map_err(schema)?;
    match store.acquire_lease(inv.holder, inv.budget.lease_ttl).await.map_err(schema)? {
        Lease::Acquired => {}
        Lease::Held { holder, expires_in_secs } => return Ok(Outcome::Busy { holder, expires_in_secs }),
    }
    let result = invoke_leased(config, store, embedder, rt, inv, began).await;
    if let Err(e) = store.release_lease().await {
        rt.log(LogEvent::warn("lease", format!("Could not release the sync lease (it expires by itself): {e}")));
    }
    result
}

/// What one invocation is asked to do.
#[derive(Clone)]
pub struct Invocation<'a> {
    /// What started it (recorded when it starts a new run).
    pub trigger: Trigger,
    /// How provider calls are retried.
    pub retry: RetryPolicy,
    /// What it may spend.
    pub budget: Budget,
    /// The id a new run gets if there is no unfinished one.
    pub new_run: &'a RunId,
    /// This invocation's lease holder id.
    pub holder: &'a str,
    /// Where the previous invocation stopped, from KV: a hint only.
    pub hint: Option<&'a Cursor>,
    /// Fan-out over a queue (`None`: no queue binding; every source is synced in-line and
    /// ranges left by an earlier invocation are ignored).
    pub fanout: Option<FanOut>,
    /// The Batch API's transport (`None`: every model goes the synchronous way, whatever
    /// `batchApi` says, and open batches wait for an invocation that has one).
    pub batch_api: Option<&'a dyn BatchApi>,
}

impl std::fmt::Debug for Invocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocation")
            .field("trigger", &self.trigger)
            .field("retry", &self.retry)
            .field("budget", &self.budget)
            .field("new_run", &self.new_run)
            .field("holder", &self.holder)
            .field("hint", &self.hint)
            .field("fanout", &self.fanout)
            .field("batch_api", &self.batch_api.is_some())
            .finish()
    }
}

async fn invoke_leased<S: Store, E: Embedder, R: Runtime>(
    config: &Config,
    store: &mut S,
    embedder: &E,
    rt: &R,
    inv: &Invocation<'_>,
    began: f64,
) -> Result<Outcome, SyncError> {
    let Invocation { trigger, retry, budget, new_run, hint, fanout, .. } = inv.clone();
    let sources: Vec<&Source> = config.enabled_sources().collect();
    let mut run = store.open_run(new_run, trigger, &sources).await.map_err(fatal)?;
    if run.sources.len() != sources.len() {
        return Err(SyncError::Schema(StoreError::new(format!(
            "run {} has {} sources but the config enables {}",
            run.id.0,
            run.sources.len(),
            sources.len()
        ))));
    }
    if run.invocations > 1 {
        rt.log(
            LogEvent::info("resume", format!("Resuming run {} (invocation {})", run.id.0, run.invocations))
                .run(&run.id.0)
                .field("invocation", run.invocations),
        );
    }
    // Triggers of sources no longer captured (back to scan, disabled, removed) are dropped.
    let captured: Vec<&Source> = sources.iter().copied().filter(|s| s.changes.is_capture()).collect();
    match store.release_captures(&captured).await {
        Ok(released) => {
            for key in released {
                rt.log(
                    LogEvent::info("capture", format!("Dropped the change capture of {key}: its source is not captured any more"))
                        .run(&run.id.0),
                );
            }
        }
        Err(e) if e.is_lease_lost() => return Err(lease_lost(rt, &run.id, e)),
        Err(e) => rt.log(
            LogEvent::warn("capture", format!("Could not drop a change capture that is not used any more (the next run tries again): {e}"))
                .run(&run.id.0),
        ),
    }
    // The hint is used only when it agrees with Postgres about the run.
    let hint = hint.filter(|c| c.run_id == run.id.0);
    let spent = InvocationSpend::new(began, budget, &config.rate);
    // The Batch API: the open batches are polled and the output of those that ended is read
    // first; then, at the run's plan (no source planned yet), a model with enough pending
    // values goes that way, before the sources' pages (which leave out what batches bring).
    let mut unread = 0;
    if let Some(api) = inv.batch_api {
        let step = async {
            unread = crate::batch_flow::service(config, store, api, rt, retry, &mut run, began + budget.max_ms).await?;
            if config.batch_api.is_some() && run.sources.iter().all(|s| !s.planned) {
                crate::batch_flow::submit(config, store, api, rt, retry, &run.id, &sources).await?;
            }
            Ok::<(), StoreError>(())
        };
        match step.await {
            Ok(()) => {}
            Err(e) if e.is_lease_lost() => return Err(lease_lost(rt, &run.id, e)),
            Err(e) => rt.log(
                LogEvent::error("batch_api", format!("The Batch API step failed (the next invocation tries again): {e}")).run(&run.id.0),
            ),
        }
    }
    let mut token_budget_ended = false;
    let mut paused: Option<Cursor> = None;
    // Sources this invocation finished: their events wait until the run's orphans are deleted
    // (when it finishes), which adds to their `deleted` counts.
    let mut ended: Vec<usize> = Vec::new();
    let log_ended = |run: &RunState, ended: &[usize]| {
        for &i in ended {
            rt.log(source_event(&run.id, &run.sources[i].report));
        }
    };
    // Fan-out: the ranges earlier invocations planned. A source with queued ranges waits for
    // its consumers, and the sources after it with it (sources are taken one after another, as
    // without fan-out, so a value two sources share is embedded once); one whose ranges are all
    // settled goes on in-line with one pass from the start (which also retries the values of
    // dead ranges).
    let tallies = match fanout {
        Some(_) => store.range_tally(&run.id).await.map_err(fatal)?,
        None => Vec::new(),
    };
    let mut waiting: Vec<usize> = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        if run.sources[i].done {
            continue;
        }
        let mut mode = Mode::Source;
        if let Some(t) = tallies.iter().find(|t| t.table == source.table_key() && t.column == source.column_key()) {
            if t.queued > 0 {
                // Later sources wait too: one may share values with this one, and planned now
                // it would embed them again while the consumers do.
                waiting.push(i);
                break;
            }
            mode = Mode::Settled;
            if !t.dead.is_empty() {
                let why = format!(
                    "{} of its {} fan-out ranges were given up ({}); their values were tried again in-line",
                    t.dead.len(),
                    t.dead.len() as u64 + t.done,
                    t.dead.join("; ")
                );
                rt.log(LogEvent::warn("range", format!("Source {}: {why}", source.name)).run(&run.id.0).field("source", &source.name));
                run.sources[i].report.warning = Some(why);
            }
        }
        let after = match mode {
            Mode::Source => hint.filter(|c| c.source == i).and_then(|c| c.after.as_deref()).and_then(ValueHash::from_hex),
            _ => None,
        };
        let began_source = rt.now_ms();
        let run_tokens: u64 = run.sources.iter().map(|s| s.usage.0.prompt_tokens + s.usage.1.prompt_tokens).sum();
        let state = &mut run.sources[i];
        let calls = Calls { config, embedder, rt, retry, run: &run.id, spent: &spent };
        let mut ctx = SourceRun { config, store: &mut *store, calls, rt, state, run: &run.id, spent: &spent, run_tokens, mode, fanout };
        let outcome = ctx.sync(source, after).await;
        let state = &mut run.sources[i];
        state.report.duration_ms += (rt.now_ms() - began_source).max(0.0) as u64;
        match outcome {
            Ok(SourceEnd::Done) => ended.push(i),
            Ok(SourceEnd::FannedOut) => {
                rt.log(
                    LogEvent::info("fanout", format!("Source {}: fanned out to the queue", source.name))
                        .run(&run.id.0)
                        .field("source", &source.name),
                );
                waiting.push(i);
                break;
            }
            Ok(SourceEnd::TokenBudget) => {
                // The run ends here; the next run goes on with what is still pending.
                rt.log(source_event(&run.id, &state.report));
                token_budget_ended = true;
                break;
            }
            Ok(SourceEnd::Refused) => {
                // Neither model can embed anything: the run ends here, stopped (see below).
                rt.log(source_event(&run.id, &state.report));
                break;
            }
            Ok(SourceEnd::Paused(after)) => {
                paused = Some(Cursor {
                    run_id: run.id.0.clone(),
                    source: i,
                    phase: "embed".into(),
                    after: after.map(|h| h.as_str().to_owned()),
                    totals: Totals::default(),
                });
                break;
            }
            Err(Stop::Store(e)) => {
                // The source is reported as failed for this run; the next run tries it again.
                state.report.error = Some(e.to_string());
                state.done = true;
                rt.log(source_event(&run.id, &state.report));
            }
            Err(Stop::LeaseLost(e)) => {
                log_ended(&run, &ended);
                return Err(lease_lost(rt, &run.id, e));
            }
            Err(Stop::Fatal(e)) => {
                log_ended(&run, &ended);
                // Nothing later can succeed: the run ends here as failed, and the next trigger
                // starts a new run once the cause is fixed.
                rt.log(LogEvent::error("stopped", format!("Sync stopped: {e}")).run(&run.id.0));
                let mut report = report_of(config, &run, rt);
                report.status = RunStatus::Failed;
                report.stopped = Some(e.to_string());
                if let Err(store_error) = store.finish_run(&run.id, &report).await {
                    if store_error.is_lease_lost() {
                        return Err(lease_lost(rt, &run.id, store_error));
                    }
                    rt.log(LogEvent::error("store", format!("Could not mark run {} failed: {store_error}", run.id.0)).run(&run.id.0));
                }
                return Err(SyncError::Provider(e));
            }
        }
    }
    // Sources wait for their ranges: the run goes on once the consumers settled them all. The
    // sweeper hands out the ranges whose message is new or looks lost.
    if !waiting.is_empty() {
        log_ended(&run, &ended);
        let resend = Duration::from_secs(crate::fanout::RESEND_AFTER_SECS);
        let ids =
            store.sweep_ranges(&run.id, resend).await.map_err(|e| if e.is_lease_lost() { lease_lost(rt, &run.id, e) } else { fatal(e) })?;
        let messages: Vec<RangeMessage> = ids.into_iter().map(|range| RangeMessage { run: run.id.0.clone(), range }).collect();
        let mut report = report_of(config, &run, rt);
        report.status = RunStatus::Paused;
        let names: Vec<&str> = waiting.iter().map(|&i| sources[i].name.as_str()).collect();
        rt.log(
            LogEvent::info(
                "fanout",
                format!(
                    "Run {} waits for the queue's consumers ({}); {} range messages to send",
                    run.id.0,
                    names.join(", "),
                    messages.len()
                ),
            )
            .run(&run.id.0)
            .field("messages", messages.len()),
        );
        return Ok(Outcome::FannedOut { report, messages });
    }
    // A run with batches not over stays open (paused, without chaining: a later trigger polls
    // them), and its orphans wait: its report then counts what the batches bring.
    if let (Some(_), None) = (inv.batch_api, &paused) {
        match store.open_batches().await {
            Ok(open) if !open.is_empty() => {
                log_ended(&run, &ended);
                let mut report = report_of(config, &run, rt);
                report.status = RunStatus::Paused;
                let values = open.iter().map(|b| u64::from(b.values)).sum();
                report.pending_batches = Some(crate::report::PendingBatches { batches: open.len() as u64, values, reading: unread });
                rt.log(
                    LogEvent::info(
                        "batch_api",
                        format!("Run {} waits for {} batches of the Batch API ({values} values)", run.id.0, open.len()),
                    )
                    .run(&run.id.0)
                    .field("batches", open.len()),
                );
                let cursor = Cursor {
                    run_id: run.id.0.clone(),
                    source: sources.len(),
                    phase: "batches".into(),
                    after: None,
                    totals: report.totals.clone(),
                };
                return Ok(Outcome::Paused(report, cursor));
            }
            Ok(_) => {}
            Err(e) if e.is_lease_lost() => {
                log_ended(&run, &ended);
                return Err(lease_lost(rt, &run.id, e));
            }
            Err(e) => rt.log(LogEvent::warn("batch_api", format!("Could not list the open batches: {e}")).run(&run.id.0)),
        }
    }
    // Every source has been planned (so it linked the values it has) and had its stale values
    // removed, without error: embsync's rows that no source links now are deleted. Otherwise the
    // candidates wait for the next run in which every source gets this far.
    if paused.is_none() && run.sources.iter().all(|s| s.done && s.report.error.is_none()) {
        match store.delete_orphans(&run.id, &sources).await {
            Ok(deleted) => {
                for d in deleted {
                    let at = sources.iter().position(|s| s.table_key() == d.table && s.column_key() == d.column);
                    if let Some(state) = at.and_then(|i| run.sources.get_mut(i)) {
                        state.report.deleted += d.rows;
                    }
                }
            }
            Err(e) if e.is_lease_lost() => {
                log_ended(&run, &ended);
                return Err(lease_lost(rt, &run.id, e));
            }
            Err(e) => rt.log(
                LogEvent::warn(
                    "orphans",
                    format!("Could not delete the cache rows no source has any more (the next run tries again): {e}"),
                )
                .run(&run.id.0),
            ),
        }
    }
    log_ended(&run, &ended);
    let mut report = report_of(config, &run, rt);
    // Stopped early: the token budget ended the run while values were left, or the provider
    // refused a model's requests, in this invocation or an earlier one of the run (that model's
    // values wait for the run after the fix).
    let mut stopped: Vec<String> = run.refused.clone();
    for why in spent.refused.iter().filter_map(|r| r.borrow().clone()) {
        if !stopped.contains(&why) {
            stopped.push(why);
        }
    }
    if let (true, Some(max)) = (token_budget_ended, config.max_tokens_per_run) {
        stopped.push(format!("token budget of {max} reached; the next run goes on where this one stopped"));
    }
    if let Some(mut cursor) = paused {
        cursor.totals = report.totals.clone();
        report.status = RunStatus::Paused;
        if let Some(Pause::Outage(why)) = spent.pause.borrow().as_ref() {
            stopped.push(why.clone());
        }
        report.stopped = (!stopped.is_empty()).then(|| stopped.join("; "));
        let (n, id) = (spent.batches.get(), &run.id.0);
        let event = match spent.pause.borrow().as_ref() {
            Some(Pause::Outage(why)) => {
                LogEvent::warn("budget", format!("Invocation paused after {n} batches: {why}; run {id} goes on in the next invocation"))
            }
            _ if spent.requests.get() >= budget.max_subrequests => LogEvent::info(
                "budget",
                format!(
                    "Invocation paused after {n} batches: its {} provider requests (SYNC_MAX_SUBREQUESTS) are sent; run {id} goes on in the next invocation",
                    budget.max_subrequests
                ),
            ),
            _ => LogEvent::info("budget", format!("Invocation budget spent after {n} batches; run {id} goes on in the next invocation")),
        };
        rt.log(event.run(id).field("batches", n).field("requests", spent.requests.get()));
        return Ok(Outcome::Paused(report, cursor));
    }
    report.status = RunStatus::Finished;
    report.stopped = (!stopped.is_empty()).then(|| stopped.join("; "));
    if let Some(why) = &report.stopped {
        rt.log(LogEvent::warn("stopped", format!("Sync stopped early: {why}")).run(&run.id.0));
    }
    store.finish_run(&run.id, &report).await.map_err(|e| if e.is_lease_lost() { lease_lost(rt, &run.id, e) } else { fatal(e) })?;
    // Only once every source is done, so a build does not compete with the initial load, and
    // after the run is marked finished, so a build that outlives the invocation costs the next
    // run nothing: it finds the index INVALID and builds it again.
    if report.stopped.is_none() {
        report.indexes = maintain_indexes(config, store, rt, &run.id).await.map_err(|e| lease_lost(rt, &run.id, e))?;
        if let Some(indexes) = &report.indexes {
            if let Err(e) = store.record_indexes(&run.id, indexes).await {
                if e.is_lease_lost() {
                    return Err(lease_lost(rt, &run.id, e));
                }
                rt.log(LogEvent::warn("index", format!("Could not record the index step in run {}: {e}", run.id.0)).run(&run.id.0));
            }
        }
    }
    Ok(Outcome::Finished(report))
}

/// A store error that ends the invocation: [`SyncError::LeaseLost`] when the lease was lost,
/// else [`SyncError::Schema`].
fn fatal(e: StoreError) -> SyncError {
    if e.is_lease_lost() {
        SyncError::LeaseLost(e)
    } else {
        SyncError::Schema(e)
    }
}

/// The invocation lost the lease: the new holder owns the run now, so this one finishes
/// nothing and reports nothing as final.
fn lease_lost<R: Runtime>(rt: &R, run: &RunId, e: StoreError) -> SyncError {
    rt.log(LogEvent::error("lease", format!("Invocation stopped: {e}")).run(&run.0));
    SyncError::LeaseLost(e)
}

/// Brings embsync's HNSW indexes in line with the config (see [`crate::index`]). A failure is
/// reported, not raised: the sync itself is done.
///
/// # Errors
/// Only the lease lost (the store refused a statement): the invocation stops there.
async fn maintain_indexes<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    rt: &R,
    run: &RunId,
) -> Result<Option<IndexReport>, StoreError> {
    let Some(options) = config.vector_indexes else { return Ok(None) };
    let mut report = IndexReport::default();
    let state = match store.index_state().await {
        Ok(state) => state,
        Err(e) => {
            report.error = Some(format!("reading the indexes of embedding_cache: {e}"));
            rt.log(LogEvent::warn("index", format!("Indexes: {}", report.error.as_deref().unwrap_or_default())).run(&run.0));
            return Ok(Some(report));
        }
    };
    let plan = index::plan(options, &config.models, &state);
    for why in &plan.skipped {
        rt.log(LogEvent::info("index", format!("Indexes: skipped: {why}")).run(&run.0));
    }
    report.kept = plan.kept;
    report.skipped = plan.skipped;
    for action in &plan.actions {
        let statement = action.sql();
        let began = rt.now_ms();
        rt.log(LogEvent::info("index", format!("Index {}: {statement}", action.name())).run(&run.0));
        if let Err(e) = store.index_ddl(&statement).await {
            if e.is_lease_lost() {
                return Err(e);
            }
            let error = format!("{statement}: {e}");
            rt.log(LogEvent::warn("index", format!("Index {} failed (the next finished run tries again): {e}", action.name())).run(&run.0));
            report.error = Some(error);
            break;
        }
        let secs = (rt.now_ms() - began).max(0.0) / 1000.0;
        match action {
            IndexAction::Create(_) => {
                rt.log(LogEvent::info("index", format!("Index {}: built in {secs:.1} s", action.name())).run(&run.0));
                report.created.push(action.name().to_owned());
            }
            IndexAction::Drop { reason, .. } => {
                let why = match reason {
                    DropReason::Invalid => "invalid after an interrupted build",
                    DropReason::Replaced => "replaced",
                };
                rt.log(LogEvent::info("index", format!("Index {}: dropped ({why})", action.name())).run(&run.0));
                report.dropped.push(action.name().to_owned());
            }
        }
    }
    Ok(Some(report))
}

fn report_of<R: Runtime>(config: &Config, run: &RunState, rt: &R) -> RunReport {
    let sources: Vec<SourceReport> = run.sources.iter().map(|s| s.report.clone()).collect();
    let mut usage = Usage::default();
    for s in &run.sources {
        for (sum, add) in [(&mut usage.large, &s.usage.0), (&mut usage.small, &s.usage.1)] {
            sum.prompt_tokens += add.prompt_tokens;
            sum.requests += add.requests;
            sum.batch_prompt_tokens += add.batch_prompt_tokens;
            sum.batch_requests += add.batch_requests;
        }
    }
    usage.cost_usd = cost_of(config, &usage);
    RunReport {
        run_id: run.id.0.clone(),
        status: RunStatus::Running,
        invocations: run.invocations,
        trigger: run.trigger,
        started_at: iso8601(run.started_at_ms),
        duration_ms: (rt.now_ms() - run.started_at_ms).max(0.0) as u64,
        totals: Totals::of(&sources),
        sources,
        usage,
        stopped: None,
        indexes: None,
        pending_batches: None,
    }
}

/// What `usage` cost: its synchronous tokens at the list prices, its Batch API tokens at the
/// batch prices, in US dollars (rounded to the micro-dollar).
fn cost_of(config: &Config, usage: &Usage) -> f64 {
    let sync = CostEstimate::of(
        config,
        usage.large.prompt_tokens.saturating_sub(usage.large.batch_prompt_tokens),
        usage.small.prompt_tokens.saturating_sub(usage.small.batch_prompt_tokens),
    )
    .total;
    let batch = |tokens: u64, slot: ModelSlot| tokens as f64 * crate::batch_api::batch_price_per_million(config.models.get(slot)) / 1e6;
    let batch = batch(usage.large.batch_prompt_tokens, ModelSlot::Large) + batch(usage.small.batch_prompt_tokens, ModelSlot::Small);
    ((sync + batch) * 1e6).round() / 1e6
}

/// The event of a source's end in an invocation: its counts, as text and as fields.
fn source_event(run: &RunId, report: &SourceReport) -> LogEvent {
    let level = if report.error.is_some() { crate::log::Level::Error } else { crate::log::Level::Info };
    LogEvent::new(level, "source", report.to_string()).run(&run.0).field("source", &report.name).field("report", report)
}

/// What this invocation has spent, and what it learnt about the provider.
pub(crate) struct InvocationSpend {
    /// Batches written that counted against the budget.
    batches: Cell<u64>,
    began: f64,
    budget: Budget,
    /// Provider requests sent, retries and split halves included.
    requests: Cell<u64>,
    /// Per model (large, small): why the provider refused its requests themselves, if it did.
    /// That model sends nothing more in this invocation.
    refused: [RefCell<Option<String>>; 2],
    /// The refusals stored with the run ([`Store::record_refused`]).
    refusals_recorded: RefCell<Vec<String>>,
    /// Why no further batch may start (a wait that would outlast the budget), if so.
    pub(crate) pause: RefCell<Option<Pause>>,
    /// The adaptive rate of provider requests.
    rate: RefCell<rate::Control>,
    /// The provider has answered a request with embeddings in this invocation.
    answered: Cell<bool>,
}

impl InvocationSpend {
    pub(crate) fn new(began: f64, budget: Budget, rate: &crate::config::Rate) -> Self {
        InvocationSpend {
            batches: Cell::new(0),
            began,
            budget,
            requests: Cell::new(0),
            refused: Default::default(),
            refusals_recorded: RefCell::new(Vec::new()),
            pause: RefCell::new(None),
            rate: RefCell::new(rate::Control::new(rate, began)),
            answered: Cell::new(false),
        }
    }

    /// This invocation is one of `n` that draw on the provider's buckets at once (queue
    /// consumers): see [`rate::Control::sharing`].
    pub(crate) fn share_provider(&self, n: u32) {
        let control = self.rate.borrow().clone();
        *self.rate.borrow_mut() = control.sharing(n);
    }

    fn refused(&self, slot: ModelSlot) -> bool {
        self.refused[slot_index(slot)].borrow().is_some()
    }

    /// The end of the time budget (epoch ms).
    fn deadline(&self) -> f64 {
        self.began + self.budget.max_ms
    }
}

fn slot_index(slot: ModelSlot) -> usize {
    match slot {
        ModelSlot::Large => 0,
        ModelSlot::Small => 1,
    }
}

pub(crate) enum SourceEnd {
    Done,
    /// Fan-out: the source's snapshot was split into ranges for the queue's consumers.
    FannedOut,
    /// The run's token budget is spent: the run ends here.
    TokenBudget,
    /// The provider refuses both models' requests themselves: the run ends here.
    Refused,
    /// Stopped at the budget after the given hash (the last one stored).
    Paused(Option<ValueHash>),
}

pub(crate) enum Stop {
    Store(StoreError),
    Fatal(ProviderError),
    LeaseLost(StoreError),
}

/// Why an invocation stops sending before its batch budget is spent. The group in hand keeps
/// what it got (stored, so nothing paid for is lost) and the source pauses before it, for the
/// next invocation.
#[derive(Debug, Clone)]
pub(crate) enum Pause {
    /// A wait (a retry, a `retry-after`, pacing) would end past the time budget.
    OutOfTime,
    /// The provider stayed unavailable (429, 5xx, no answer) through every retry: no value is
    /// to blame.
    Outage(String),
    /// The next request would go past the invocation's subrequest cap.
    Subrequests,
}

impl Stop {
    /// A store error: the invocation stops at once when it lost the lease; otherwise only the
    /// source does.
    fn of(e: StoreError) -> Stop {
        if e.is_lease_lost() {
            Stop::LeaseLost(e)
        } else {
            Stop::Store(e)
        }
    }
}

pub(crate) struct SourceRun<'a, S, E, R> {
    pub(crate) config: &'a Config,
    pub(crate) store: &'a mut S,
    /// The provider side: what the batches in flight borrow (shared state only).
    pub(crate) calls: Calls<'a, E, R>,
    pub(crate) rt: &'a R,
    pub(crate) state: &'a mut SourceState,
    pub(crate) run: &'a RunId,
    pub(crate) spent: &'a InvocationSpend,
    pub(crate) run_tokens: u64,
    pub(crate) mode: Mode,
    /// Fan-out: a source planned now whose snapshot is large enough is split into ranges.
    pub(crate) fanout: Option<FanOut>,
}

/// What a [`SourceRun`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The whole source (planned if it is not yet), then its stale values.
    Source,
    /// A fanned-out source whose ranges are all settled: one pass from the start (no second
    /// one), then its stale values.
    Settled,
    /// One fan-out range, claimed by a queue consumer: its values only (the store bounds the
    /// pages), no planning, no pass from the start, no stale removal.
    Range,
}

/// What the driver does in order, one step at a time: write a group's answer, or move the cursor
/// to the end of a page once everything before it is stored or recorded.
enum Step {
    /// A group in flight: its last hash and what it takes of the window.
    Group { last: Option<ValueHash>, load: rate::Load, needs_provider: bool },
    /// The cursor may move here (a page's end, past its over-long values; or back to the start
    /// for the pass from the start).
    Cursor(Option<ValueHash>),
}

/// Why a source stops launching batches once what is in flight is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    TokenBudget,
    Refused,
    Paused,
}

/// Runs `work` (a store call) to its end while the batches in flight go on: answers that arrive
/// meanwhile are kept, in order, in `answered`. Only the provider side is concurrent; the store
/// sees one call at a time.
async fn drive<F: std::future::Future, W: futures::Stream + Unpin>(
    flying: &mut W,
    answered: &mut std::collections::VecDeque<W::Item>,
    work: F,
) -> F::Output {
    use futures::StreamExt;
    let mut work = std::pin::pin!(work);
    futures::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(out);
        }
        while let std::task::Poll::Ready(Some(answer)) = flying.poll_next_unpin(cx) {
            answered.push_back(answer);
        }
        std::task::Poll::Pending
    })
    .await
}

impl<S: Store, E: Embedder, R: Runtime> SourceRun<'_, S, E, R> {
    pub(crate) async fn sync(&mut self, source: &Source, after: Option<ValueHash>) -> Result<SourceEnd, Stop> {
        use futures::StreamExt;
        let name = &source.name;
        let ctx = |what: &str, e: StoreError| Stop::of(e.context(format_args!("{what} of source {name}")));
        let batch_size = self.config.values_per_batch();
        // Counts taken by this invocation let a no-op source skip its other scans.
        let mut fresh: Option<SourceCounts> = None;
        if source.changes.is_capture() && !self.state.planned {
            // A captured source is planned from embsync's copy of its values, which this brings
            // up to date (or finds up to date and settled: then there is nothing to plan).
            match self.store.capture(source).await.map_err(|e| ctx("reading the change capture", e))? {
                CaptureStep::Unchanged { total } => {
                    let r = &mut self.state.report;
                    (r.total, r.unchanged, r.new, r.deferred) = (total, total, 0, 0);
                    self.state.planned_batches = 0;
                    let plan = self.state.report.clone();
                    self.store.save_plan(self.run, source, &plan, false).await.map_err(|e| ctx("saving the plan", e))?;
                    self.state.planned = true;
                    fresh = Some(SourceCounts { total, ..SourceCounts::default() });
                }
                CaptureStep::Folded { changes } => self.rt.log(
                    LogEvent::info("capture", format!("Source {name}: {changes} changes read from the change log"))
                        .run(&self.run.0)
                        .field("source", name)
                        .field("changes", changes),
                ),
                CaptureStep::Reconciled { why, drift } => {
                    let mut event = LogEvent::info("reconcile", format!("Source {name}: reconciled by a scan: {why}"))
                        .run(&self.run.0)
                        .field("source", name);
                    if let Some(d) = drift {
                        event = event.field("driftNew", d.new).field("driftStale", d.stale);
                        if d.new + d.stale > 0 {
                            let what = format!(
                                "the change capture had missed {} new and {} stale values ({why}); the reconcile repaired them",
                                d.new, d.stale
                            );
                            event = LogEvent::warn("reconcile", format!("Source {name}: {what}"))
                                .run(&self.run.0)
                                .field("source", name)
                                .field("driftNew", d.new)
                                .field("driftStale", d.stale);
                            self.state.report.warning = Some(what);
                        }
                    }
                    self.rt.log(event);
                }
            }
        }
        if !self.state.planned {
            let counts = self.store.counts(source).await.map_err(|e| ctx("counting values", e))?;
            let r = &mut self.state.report;
            r.total = counts.total;
            r.new = counts.new;
            r.unchanged = counts.total.saturating_sub(counts.new);
            r.deferred = counts.deferred;
            if counts.reusable > 0 {
                r.reused = self.store.link_reusable(source).await.map_err(|e| ctx("linking reusable values", e))?;
            }
            self.state.planned_batches = counts.batches(batch_size);
            let mut plan = self.state.report.clone();
            plan.batches = self.state.planned_batches;
            let snapshot = counts.to_embed() > counts.deferred;
            self.store.save_plan(self.run, source, &plan, snapshot).await.map_err(|e| ctx("saving the plan", e))?;
            self.state.planned = true;
            if let Some(f) = self.fanout.filter(|f| snapshot && counts.to_embed().saturating_sub(counts.deferred) >= f.min_values) {
                let ranges = self.store.plan_ranges(self.run, source, f.range_values).await.map_err(|e| ctx("splitting into ranges", e))?;
                if ranges > 0 {
                    return Ok(SourceEnd::FannedOut);
                }
            }
            fresh = Some(counts);
        }
        // Pages are a few batches long, so a large source is scanned fewer times.
        let page_size = (batch_size * 4).clamp(batch_size, 2048);
        let nothing_to_embed = fresh.is_some_and(|c| c.to_embed() <= c.deferred);
        // A hint is only where this invocation starts, and a source planned by an earlier
        // invocation may have values before it that an earlier invocation left (a model it had
        // refused). Once the end is reached, one more pass from the start finds them: once per
        // source and run, it costs a scan of the snapshot's done values, never a value left
        // pending by a finished source.
        let mut wrap = self.mode == Mode::Source && (after.is_some() || fresh.is_none());
        // The batches in flight borrow only `calls`; the store is written one batch at a time,
        // in order, while later batches' requests are out (see `rate`).
        let calls = self.calls;
        let mut window = rate::Window::default();
        let mut flying = futures::stream::FuturesOrdered::new();
        let mut answered = std::collections::VecDeque::new();
        let mut steps: std::collections::VecDeque<Step> = std::collections::VecDeque::new();
        // The current page's groups not yet launched, and where the cursor goes after them.
        let mut groups: std::collections::VecDeque<Vec<PendingValue>> = std::collections::VecDeque::new();
        let mut page_end: Option<Option<ValueHash>> = None;
        // Where the next page starts; whether the last page has been read.
        let mut read_after = after.clone();
        let mut at_end = nothing_to_embed;
        // `cursor` moves only past values that are stored or recorded, in order: once a group
        // was cut short (`frozen`), not even past later groups that were written.
        let mut cursor = after;
        let mut frozen = false;
        let mut halt: Option<Halt> = None;
        // An answered group, to be written once the window has been refilled.
        let mut to_write: Option<(rate::Load, Option<ValueHash>, bool, Result<Answer, ProviderError>)> = None;
        loop {
            // Launch what the budget, the provider and the window allow.
            while halt.is_none() {
                if groups.is_empty() {
                    if let Some(end) = page_end.take() {
                        steps.push_back(Step::Cursor(end));
                        continue;
                    }
                    if at_end {
                        // The pass from the start begins once everything in flight is written:
                        // values in flight are not done yet and would be read again.
                        if window.is_empty() && !nothing_to_embed && std::mem::take(&mut wrap) {
                            read_after = None;
                            at_end = false;
                            steps.push_back(Step::Cursor(None));
                            continue;
                        }
                        break;
                    }
                    // The budget is checked before each batch, not here: a source whose last
                    // batch used the budget up still finds its page empty and finishes.
                    let page = drive(&mut flying, &mut answered, self.store.pending(source, self.run, read_after.as_ref(), page_size))
                        .await
                        .map_err(|e| ctx("listing new values", e))?;
                    // A short page is the last one: no need to ask again.
                    at_end = page.len() < page_size;
                    if page.is_empty() {
                        continue;
                    }
                    read_after = page.last().map(|p| p.hash.clone());
                    // Once every value of the page is stored or recorded, the cursor moves past it.
                    page_end = Some(read_after.clone());
                    let (page, long): (Vec<PendingValue>, Vec<PendingValue>) = page.into_iter().partition(|p| !batch::too_long(&p.value));
                    let failures: Vec<ValueFailure> = long
                        .iter()
                        .map(|p| ValueFailure {
                            hash: p.hash.clone(),
                            model: "all".into(),
                            message: format!(
                                "value is about {} tokens ({} bytes), over the {}-token input limit: it is not sent",
                                batch::estimate_tokens(&p.value),
                                p.value.len(),
                                batch::MAX_TOKENS_PER_INPUT
                            ),
                        })
                        .collect();
                    drive(&mut flying, &mut answered, self.record(source, &failures)).await?;
                    let ranges = batch::pack(page.iter().map(|p| p.value.as_str()), batch_size, batch::MAX_TOKENS_PER_REQUEST);
                    let mut page = page.into_iter();
                    groups = ranges.into_iter().map(|r| page.by_ref().take(r.len()).collect()).collect();
                    continue;
                }
                if let Some(h) = self.halt(&window) {
                    // With batches in flight this may only be a wait (their batches and tokens
                    // count until written); once they are written it is checked again.
                    if window.is_empty() {
                        halt = Some(h);
                    }
                    break;
                }
                // The first batch of an invocation goes alone: until the provider has answered
                // once, a wrong key, a refused model or a server without base64 costs one
                // batch's requests, not a window's.
                if !window.is_empty() && !self.spent.answered.get() {
                    break;
                }
                let group = groups.front().expect("a group");
                let load = self.load(group);
                let concurrency = self.spent.rate.borrow().concurrency();
                if !window.admits(&load, concurrency) {
                    break;
                }
                let now = self.rt.now_ms();
                let wait = self.spent.rate.borrow().delay(now, load.requests, load.tokens);
                if let Some(wait) = wait.filter(|_| load.requests > 0) {
                    if !window.is_empty() {
                        // Write what is in flight meanwhile; then look again.
                        break;
                    }
                    let ms = wait.as_millis() as u64;
                    if now + wait.as_secs_f64() * 1e3 > self.spent.deadline() {
                        self.rt.log(
                            LogEvent::info(
                                "pacing",
                                format!("The provider's rate limit holds new batches for {ms} ms, past this invocation's time budget; the next invocation goes on from here"),
                            )
                            .run(&self.run.0)
                            .field("waitMs", ms),
                        );
                        self.spent.pause.borrow_mut().get_or_insert(Pause::OutOfTime);
                    } else {
                        self.rt.log(
                            LogEvent::info("pacing", format!("Pacing: the provider's rate limit holds new batches for {ms} ms"))
                                .run(&self.run.0)
                                .field("waitMs", ms),
                        );
                        self.rt.sleep(wait).await;
                    }
                    continue;
                }
                self.spent.rate.borrow_mut().sent(now, load.requests, load.tokens);
                let group = groups.pop_front().expect("a group");
                // What a refused model lacks waits for the next run.
                let needs_provider = load.requests > 0;
                if needs_provider {
                    let i = self.state.report.batches + window.batches() + 1;
                    let of = self.state.planned_batches.max(i);
                    self.rt.log(
                        LogEvent::info("batch", format!("Batch {i} of {of}: {name} ({} values)", group.len()))
                            .run(&self.run.0)
                            .field("source", name)
                            .field("batch", i)
                            .field("of", of)
                            .field("values", group.len()),
                    );
                }
                window.launch(&load);
                steps.push_back(Step::Group { last: group.last().map(|p| p.hash.clone()), load, needs_provider });
                // A batch alone may still ask more than the concurrency allows (both models at
                // `maxConcurrency` 1, or a queue consumer's share of 1): its models then go one
                // after the other.
                flying.push_back(calls.embed_group(group, load.requests > concurrency));
            }
            // Write the answered group, in order, while later ones are in flight.
            if let Some((load, last, needs_provider, answer)) = to_write.take() {
                let answer = answer.map_err(Stop::Fatal)?;
                if !answer.started {
                    // A pause or both models' refusal came before it sent anything.
                    window.written(&load);
                    drive(&mut flying, &mut answered, self.record_refusals()).await.map_err(|e| ctx("recording a refused model", e))?;
                    frozen = true;
                    halt = halt.or(Some(if answer.pause.is_some() { Halt::Paused } else { Halt::Refused }));
                    continue;
                }
                let Answer { mut batch, failures, usage, pause, .. } = answer;
                batch.retain(|v| v.complete || v.large.is_some() || v.small.is_some());
                // A group cut short by a pause is done again by the next invocation: it counts
                // as a batch then.
                let counts_as_batch = needs_provider && pause.is_none();
                let embedded = batch.iter().filter(|v| v.complete && (v.large.is_some() || v.small.is_some())).count() as u64;
                let complete = batch.iter().filter(|v| v.complete).count() as u64;
                let progress = Progress {
                    run: self.run,
                    embedded,
                    reused: complete - embedded,
                    batches: u64::from(counts_as_batch),
                    usage: usage.clone(),
                };
                if !batch.is_empty() || counts_as_batch {
                    drive(&mut flying, &mut answered, self.store.store(source, &batch, &progress))
                        .await
                        .map_err(|e| ctx("storing a batch", e))?;
                }
                drop(batch);
                window.written(&load);
                drive(&mut flying, &mut answered, self.record_refusals()).await.map_err(|e| ctx("recording a refused model", e))?;
                // Counters follow the committed write, so they equal what Postgres holds.
                let r = &mut self.state.report;
                r.embedded += embedded;
                r.reused += complete - embedded;
                if counts_as_batch {
                    r.batches += 1;
                    self.spent.batches.set(self.spent.batches.get() + 1);
                }
                self.state.usage.0.prompt_tokens += usage.0.prompt_tokens;
                self.state.usage.0.requests += usage.0.requests;
                self.state.usage.1.prompt_tokens += usage.1.prompt_tokens;
                self.state.usage.1.requests += usage.1.requests;
                self.run_tokens += usage.0.prompt_tokens + usage.1.prompt_tokens;
                drive(&mut flying, &mut answered, self.record(source, &failures)).await?;
                if pause.is_some() {
                    // The rest of the group, and everything after it, is for the next
                    // invocation; groups already in flight are still written (they are paid for).
                    frozen = true;
                    halt = Some(Halt::Paused);
                } else if !frozen {
                    cursor = last;
                }
                continue;
            }
            match steps.pop_front() {
                None => break,
                Some(Step::Cursor(to)) => {
                    if !frozen {
                        cursor = to;
                    }
                }
                Some(Step::Group { last, load, needs_provider }) => {
                    let answer = match answered.pop_front() {
                        Some(a) => a,
                        None => flying.next().await.expect("an answer for every group in flight"),
                    };
                    window.answered(&load);
                    to_write = Some((load, last, needs_provider, answer));
                }
            }
        }
        match halt {
            Some(Halt::TokenBudget) => return Ok(SourceEnd::TokenBudget),
            Some(Halt::Refused) => return Ok(SourceEnd::Refused),
            Some(Halt::Paused) => return Ok(SourceEnd::Paused(cursor)),
            None => {}
        }
        if self.mode == Mode::Range {
            // The range is written; the source's stale values are the lease holder's.
            return Ok(SourceEnd::Done);
        }
        let known_clean = fresh.is_some_and(|c| c.stale == 0);
        let guard = DeleteGuard::of(self.config, source);
        let stale = self.store.remove_stale(source, self.run, known_clean, guard).await.map_err(|e| ctx("removing stale values", e))?;
        if let Some(why) = &stale.held_back {
            self.rt.log(LogEvent::warn("guard", format!("Source {name}: {why}")).run(&self.run.0).field("source", name));
            self.state.report.warning = Some(match self.state.report.warning.take() {
                Some(drift) => format!("{drift}; {why}"),
                None => why.clone(),
            });
        }
        self.state.report.stale = stale.unlinked;
        self.state.done = true;
        Ok(SourceEnd::Done)
    }

    /// Why no further batch may start, if so: the run's token budget, or this invocation's
    /// batch, time and subrequest budget, or a wait that would outlast it, or both models
    /// refused. The batches and estimated tokens of `window` count as spent.
    fn halt(&self, window: &rate::Window) -> Option<Halt> {
        if self.config.token_budget_spent(self.run_tokens + window.tokens()) {
            return Some(Halt::TokenBudget);
        }
        let b = &self.spent.budget;
        let spent = self.spent.batches.get() + window.batches() >= b.max_batches
            || self.rt.now_ms() - self.spent.began >= b.max_ms
            || self.spent.requests.get() >= b.max_subrequests
            || self.spent.pause.borrow().is_some();
        if spent {
            return Some(Halt::Paused);
        }
        (self.spent.refused(ModelSlot::Large) && self.spent.refused(ModelSlot::Small)).then_some(Halt::Refused)
    }

    /// What `group` takes of the window: a request per model that some value lacks (unless that
    /// model is refused), the vectors asked for, and a conservative estimate of the tokens paid.
    fn load(&self, group: &[PendingValue]) -> rate::Load {
        let models = &self.config.models;
        let mut load = rate::Load::default();
        for slot in [ModelSlot::Large, ModelSlot::Small] {
            if self.spent.refused(slot) {
                continue;
            }
            let lacks = |p: &&PendingValue| if slot == ModelSlot::Large { !p.has_large } else { !p.has_small };
            let values = group.iter().filter(lacks).count();
            if values == 0 {
                continue;
            }
            load.requests += 1;
            load.vector_bytes += values * models.get(slot).dimensions() as usize * 4;
            load.tokens += group.iter().filter(lacks).map(|p| batch::limit_tokens(&p.value)).sum::<u64>();
        }
        load.batches = u64::from(load.requests > 0);
        load
    }

    /// Stores with the run the refusals of this invocation not stored yet, before anything
    /// else is written (a source finished, say), so the invocation that finishes the run knows
    /// of them.
    async fn record_refusals(&mut self) -> Result<(), StoreError> {
        let refused: Vec<String> = self
            .spent
            .refused
            .iter()
            .filter_map(|r| r.borrow().clone())
            .filter(|why| !self.spent.refusals_recorded.borrow().contains(why))
            .collect();
        if !refused.is_empty() {
            self.store.record_refused(self.run, &refused).await?;
            self.spent.refusals_recorded.borrow_mut().extend(refused);
        }
        Ok(())
    }

    async fn record(&mut self, source: &Source, failures: &[ValueFailure]) -> Result<(), Stop> {
        if failures.is_empty() {
            return Ok(());
        }
        self.store
            .record_errors(source, failures, self.run)
            .await
            .map_err(|e| Stop::of(e.context(format_args!("recording errors of source {}", source.name))))?;
        self.state.report.errors += failures.len() as u64;
        Ok(())
    }
}

/// The provider side of a source's sync: shared state only, so that several batches can be in
/// flight while the store writes earlier ones.
pub(crate) struct Calls<'a, E, R> {
    pub(crate) config: &'a Config,
    pub(crate) embedder: &'a E,
    pub(crate) rt: &'a R,
    pub(crate) retry: RetryPolicy,
    pub(crate) run: &'a RunId,
    pub(crate) spent: &'a InvocationSpend,
}

impl<E, R> Clone for Calls<'_, E, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E, R> Copy for Calls<'_, E, R> {}

/// What one group got from the provider.
struct Answer {
    /// The values with what they got.
    batch: Vec<EmbeddedValue>,
    /// Values that failed for themselves.
    failures: Vec<ValueFailure>,
    /// Tokens and requests paid, large and small.
    usage: (ModelUsage, ModelUsage),
    /// Why it stopped before every value had an answer, if it did.
    pause: Option<Pause>,
    /// It sent something: false when a pause or a refusal of both models came first.
    started: bool,
}

impl<E: Embedder, R: Runtime> Calls<'_, E, R> {
    /// Calls both models for the values that lack each: at once, or one after the other when
    /// `one_at_a_time` (the concurrency allows one request). A value one model fails
    /// for keeps the other model's embedding (it is paid for) and is retried later for the
    /// missing one only. With a pause, the values keep what they got and the rest is left to the
    /// next invocation; a model whose requests the provider refuses sends nothing and blames no
    /// value. A group launched before a pause (or both models' refusal) was known sends nothing.
    ///
    /// # Errors
    /// The provider refused the API key: the run stops.
    async fn embed_group(self, group: Vec<PendingValue>, one_at_a_time: bool) -> Result<Answer, ProviderError> {
        let not_started = |pause| Answer { batch: Vec::new(), failures: Vec::new(), usage: Default::default(), pause, started: false };
        if let Some(p) = self.spent.pause.borrow().clone() {
            return Ok(not_started(Some(p)));
        }
        if self.spent.refused(ModelSlot::Large) && self.spent.refused(ModelSlot::Small) {
            return Ok(not_started(None));
        }
        let models = &self.config.models;
        let large_idx: Vec<usize> = (0..group.len()).filter(|&i| !group[i].has_large).collect();
        let small_idx: Vec<usize> = (0..group.len()).filter(|&i| !group[i].has_small).collect();
        let large_in: Vec<&str> = large_idx.iter().map(|&i| group[i].value.as_str()).collect();
        let small_in: Vec<&str> = small_idx.iter().map(|&i| group[i].value.as_str()).collect();
        let (large, small) = if one_at_a_time {
            let large = self.embed_isolating(ModelSlot::Large, &large_in).await;
            (large, self.embed_isolating(ModelSlot::Small, &small_in).await)
        } else {
            futures::future::join(self.embed_isolating(ModelSlot::Large, &large_in), self.embed_isolating(ModelSlot::Small, &small_in))
                .await
        };
        let mut out: Vec<EmbeddedValue> = group
            .iter()
            .map(|p| EmbeddedValue {
                hash: p.hash.clone(),
                value: p.value.clone(),
                occurrences: p.occurrences,
                large: None,
                small: None,
                complete: false,
            })
            .collect();
        let mut errors: Vec<Vec<(String, String)>> = vec![Vec::new(); group.len()];
        let mut usage = (ModelUsage::default(), ModelUsage::default());
        let mut pause = None;
        for (slot, outcome, idx) in [(ModelSlot::Large, large, &large_idx), (ModelSlot::Small, small, &small_idx)] {
            if let Some(e) = outcome.fatal {
                return Err(e);
            }
            pause = pause.or(outcome.pause);
            let u = if slot == ModelSlot::Large { &mut usage.0 } else { &mut usage.1 };
            u.prompt_tokens += outcome.prompt_tokens;
            u.requests += outcome.requests;
            for (&i, r) in idx.iter().zip(outcome.results) {
                match (r, slot) {
                    (Some(Ok(v)), ModelSlot::Large) => out[i].large = Some(v),
                    (Some(Ok(v)), ModelSlot::Small) => out[i].small = Some(v),
                    (Some(Err(e)), _) => errors[i].push((models.get(slot).name().to_owned(), e)),
                    (None, _) => {}
                }
            }
        }
        let mut failures = Vec::new();
        for ((v, p), errs) in out.iter_mut().zip(&group).zip(errors) {
            v.complete = (p.has_large || v.large.is_some()) && (p.has_small || v.small.is_some());
            if !errs.is_empty() {
                let model = errs.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", ");
                let message = errs.iter().map(|(m, e)| format!("{m}: {e}")).collect::<Vec<_>>().join("; ");
                failures.push(ValueFailure { hash: v.hash.clone(), model, message });
            }
        }
        if let Some(p) = &pause {
            // No further group starts; an outage's reason is kept for the report.
            let mut declared = self.spent.pause.borrow_mut();
            if !matches!(*declared, Some(Pause::Outage(_))) {
                *declared = Some(p.clone());
            }
        }
        Ok(Answer { batch: out, failures, usage, pause, started: true })
    }

    /// Embeds `inputs` with the model in `slot`, with retries. When the provider refuses a
    /// request because of an input (not [`ProviderError::is_request_level`]), the request is
    /// split in halves until the values it refuses are isolated, so one bad value costs only itself.
    /// When it refuses the request itself (the model, `dimensions`, its size), no value is to
    /// blame: the model sends nothing more in this invocation. Retryable failures that outlast
    /// the retries, a wait past the time budget and the subrequest cap pause the invocation.
    /// An input that got no answer has no result.
    async fn embed_isolating(&self, slot: ModelSlot, inputs: &[&str]) -> Isolated {
        let model = self.config.models.get(slot);
        let mut out = Isolated { results: vec![None; inputs.len()], prompt_tokens: 0, requests: 0, pause: None, fatal: None };
        let all = 0..inputs.len();
        let mut todo = vec![all];
        while let Some(range) = todo.pop() {
            if range.is_empty() || self.spent.refused(slot) {
                continue;
            }
            // The first request of the group was counted by the rate control when it launched.
            let reserved = range == (0..inputs.len());
            let answer = match self.embed_with_retry(model, &inputs[range.clone()], reserved).await {
                Ok(answer) => answer,
                Err(pause) => {
                    out.pause = Some(pause);
                    break;
                }
            };
            match answer {
                Ok(e) => {
                    out.prompt_tokens += e.prompt_tokens;
                    out.requests += 1;
                    for (i, v) in range.zip(e.vectors) {
                        out.results[i] = Some(Ok(v));
                    }
                }
                Err(e) if e.is_fatal() => {
                    out.fatal = Some(e);
                    break;
                }
                Err(e) if e.is_request_level() => {
                    let why = refusal_message(slot, model, &e);
                    self.rt.log(self.event(LogEvent::error("refused", why.clone()), model));
                    *self.spent.refused[slot_index(slot)].borrow_mut() = Some(why);
                    break;
                }
                Err(e) if range.len() > 1 => {
                    self.rt.log(self.event(
                        LogEvent::warn(
                            "split",
                            format!("{} refused {} values ({e}); splitting the request to isolate the bad ones", model.name(), range.len()),
                        ),
                        model,
                    ));
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
                Err(e) => {
                    self.rt.log(
                        self.event(LogEvent::error("provider", format!("{} failed for {} values: {e}", model.name(), range.len())), model),
                    );
                    for i in range {
                        out.results[i] = Some(Err(e.to_string()));
                    }
                }
            }
        }
        out
    }

    /// `event` tagged with this run and `model`.
    fn event(&self, event: LogEvent, model: &ModelSpec) -> LogEvent {
        event.run(&self.run.0).field("model", model.name())
    }

    /// One request with retries, each counted against the subrequest cap. `Err` is a pause:
    /// the cap would be passed, a wait (a retry's backoff, the provider's `retry-after`) would
    /// end past this invocation's time budget, or the provider stayed unavailable through every
    /// retry (an outage, for the next invocation). A pacing wait that would end past the budget
    /// is not waited: the answer is returned and no further batch starts.
    async fn embed_with_retry(
        &self,
        model: &ModelSpec,
        inputs: &[&str],
        reserved: bool,
    ) -> Result<Result<Embeddings, ProviderError>, Pause> {
        let mut retry = 0;
        loop {
            if self.spent.requests.get() >= self.spent.budget.max_subrequests {
                self.rt.log(self.event(
                    LogEvent::info(
                        "subrequests",
                        format!(
                            "Not sending {}: this invocation has sent its {} provider requests (SYNC_MAX_SUBREQUESTS); the next invocation goes on from this batch",
                            model.name(),
                            self.spent.budget.max_subrequests
                        ),
                    ),
                    model,
                ));
                return Err(Pause::Subrequests);
            }
            self.spent.requests.set(self.spent.requests.get() + 1);
            if !(reserved && retry == 0) {
                self.spent.rate.borrow_mut().sent(self.rt.now_ms(), 1, batch::limit_tokens_all(inputs));
            }
            let answer = self.embedder.embed(model, inputs).await;
            match &answer {
                Ok(e) => {
                    self.spent.answered.set(true);
                    self.spent.rate.borrow_mut().answered(self.rt.now_ms(), e.rate.as_ref());
                }
                Err(ProviderError::RateLimited { retry_after, .. }) => {
                    self.spent.rate.borrow_mut().throttled(self.rt.now_ms(), *retry_after)
                }
                Err(_) => {}
            }
            return Ok(match answer {
                Ok(e) => {
                    if let Some(wait) = e.rate.and_then(|r| r.pause(batch::limit_tokens_all(inputs))) {
                        if self.rt.now_ms() + wait.as_secs_f64() * 1e3 > self.spent.deadline() {
                            self.rt.log(self.event(
                                LogEvent::info(
                                    "pacing",
                                    format!(
                                        "The rate limit of {} is nearly used up for {} ms, past this invocation's time budget; the next invocation goes on after this batch",
                                        model.name(),
                                        wait.as_millis()
                                    ),
                                )
                                .field("waitMs", wait.as_millis() as u64),
                                model,
                            ));
                            self.spent.pause.borrow_mut().get_or_insert(Pause::OutOfTime);
                        } else {
                            self.rt.log(
                                self.event(
                                    LogEvent::info(
                                        "pacing",
                                        format!(
                                            "Pacing {}: the rate limit is nearly used up, waiting {} ms",
                                            model.name(),
                                            wait.as_millis()
                                        ),
                                    )
                                    .field("waitMs", wait.as_millis() as u64),
                                    model,
                                ),
                            );
                            self.rt.sleep(wait).await;
                        }
                    }
                    Ok(e)
                }
                Err(e) if e.is_retryable() && retry + 1 < self.retry.max_attempts => {
                    let wait = self.retry.delay(retry, e.retry_after(), self.rt.random());
                    if self.rt.now_ms() + wait.as_secs_f64() * 1e3 > self.spent.deadline() {
                        self.rt.log(self.event(
                            LogEvent::warn(
                                "retry",
                                format!(
                                    "Not retrying {} in {} ms ({e}): that is past this invocation's time budget; the next invocation goes on from this batch",
                                    model.name(),
                                    wait.as_millis()
                                ),
                            )
                            .field("waitMs", wait.as_millis() as u64),
                            model,
                        ));
                        return Err(Pause::OutOfTime);
                    }
                    self.rt.log(
                        self.event(
                            LogEvent::warn("retry", format!("Retrying {} in {} ms: {e}", model.name(), wait.as_millis()))
                                .field("waitMs", wait.as_millis() as u64)
                                .field("attempt", retry + 2),
                            model,
                        ),
                    );
                    self.rt.sleep(wait).await;
                    retry += 1;
                    continue;
                }
                Err(e) if e.is_retryable() => {
                    let why = format!(
                        "{} is unavailable after {} attempts ({e}); no value is to blame: the next invocation goes on from this batch",
                        model.name(),
                        retry + 1
                    );
                    self.rt.log(self.event(LogEvent::warn("outage", why.clone()), model));
                    return Err(Pause::Outage(why));
                }
                Err(e) => Err(e),
            });
        }
    }
}

/// What a run says when the provider refuses `model`'s requests themselves: the model, the
/// refusal, and what to fix.
fn refusal_message(slot: ModelSlot, model: &ModelSpec, e: &ProviderError) -> String {
    let slot = match slot {
        ModelSlot::Large => "large",
        ModelSlot::Small => "small",
    };
    let fix = match e {
        ProviderError::RequestRejected { status: 413, .. } => {
            "the request is too large for the provider: lower batchSize in embedding-sources.json".to_owned()
        }
        _ => {
            format!("check models.{slot} in embedding-sources.json (its name, and dimensions if the model takes them) and OPENAI_BASE_URL")
        }
    };
    format!(
        "{} refused the request itself ({e}); no value is to blame: {fix}. Values keep the other model's embedding and get this one's in the first run after the fix",
        model.name()
    )
}

/// Per-input results of one model over a group: `None` for an input that got no answer (a
/// pause, a refused model).
struct Isolated {
    results: Vec<Option<Result<Vector, String>>>,
    prompt_tokens: u64,
    requests: u64,
    /// Why the model stopped sending before every input had an answer, if it did.
    pause: Option<Pause>,
    /// The provider refused the API key: the run stops.
    fatal: Option<ProviderError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};

    fn check(settings: &[(&str, &str)], expect: Expect) {
        let budget = Budget::from_settings(|name| settings.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()));
        expect.assert_eq(&match budget {
            Ok(b) => format!("{} batches, {} ms, lease {:?}, {} subrequests", b.max_batches, b.max_ms, b.lease_ttl, b.max_subrequests),
            Err(e) => format!("error: {e}"),
        });
    }

    #[test]
    fn a_trigger_goes_on_with_a_run_paused_by_its_budget_while_a_whole_invocation_fits() {
        let chain = |v: Option<&str>| Chain::from_settings(|_| v.map(str::to_owned));
        assert_eq!(chain(None), Ok(Chain { max_ms: 600_000.0 }));
        assert_eq!(chain(Some(" 0 ")), Ok(Chain { max_ms: 0.0 }));
        assert_eq!(
            chain(Some("-1")).unwrap_err().to_string(),
            r#"SYNC_CHAIN_SECONDS is "-1", which is not a positive number: set it to one or remove it for the default"#
        );
        let report = |stopped: Option<&str>| RunReport {
            run_id: "r".into(),
            status: RunStatus::Paused,
            invocations: 1,
            trigger: Trigger::Cron,
            started_at: String::new(),
            duration_ms: 0,
            totals: Totals::default(),
            sources: Vec::new(),
            usage: Usage::default(),
            stopped: stopped.map(str::to_owned),
            indexes: None,
            pending_batches: None,
        };
        let cursor = Cursor { run_id: "r".into(), source: 0, phase: "embed".into(), after: None, totals: Totals::default() };
        let paused = Outcome::Paused(report(None), cursor.clone());
        let budget = Budget::default();
        let on = Chain::default();
        assert!(on.goes_on(&paused, 0.0, 1, &budget));
        // The next invocation (120 s) must fit in the ten minutes.
        assert!(on.goes_on(&paused, 480_000.0, 4, &budget));
        assert!(!on.goes_on(&paused, 480_001.0, 4, &budget));
        // 1,000 subrequests an invocation: nine in one trigger, the tenth thousand kept for KV.
        assert!(on.goes_on(&paused, 0.0, 8, &budget));
        assert!(!on.goes_on(&paused, 0.0, 9, &budget));
        let greedy = Budget { max_subrequests: 9_000, ..budget };
        assert!(on.goes_on(&paused, 0.0, 0, &greedy) && !on.goes_on(&paused, 0.0, 1, &greedy));
        // An outage (or a refused model) waits for the next trigger; a finished run is done.
        assert!(!on.goes_on(&Outcome::Paused(report(Some("outage")), cursor.clone()), 0.0, 1, &budget));
        assert!(!on.goes_on(&Outcome::Finished(report(None)), 0.0, 1, &budget));
        assert!(!Chain { max_ms: 0.0 }.goes_on(&paused, 0.0, 1, &budget));
        // A fanned-out run is the queue's consumers' now: the chain stops.
        let fanned = Outcome::FannedOut { report: report(None), messages: vec![RangeMessage { run: "r".into(), range: 1 }] };
        assert!(!on.goes_on(&fanned, 0.0, 1, &budget));
        // A run waiting for the Batch API's batches waits for the next trigger, unless an ended
        // batch's output is partly read.
        let waiting = |reading: u64| {
            let pending = crate::report::PendingBatches { batches: 2, values: 10, reading };
            Outcome::Paused(RunReport { pending_batches: Some(pending), ..report(None) }, cursor.clone())
        };
        assert!(!on.goes_on(&waiting(0), 0.0, 1, &budget));
        assert!(on.goes_on(&waiting(1), 0.0, 1, &budget));
    }

    #[test]
    fn the_budget_settings_are_checked_and_the_lease_must_outlast_the_time_budget() {
        check(&[], expect!["200 batches, 120000 ms, lease 300s, 1000 subrequests"]);
        check(
            &[("SYNC_MAX_BATCHES", " 7 "), ("SYNC_MAX_SECONDS", "4"), ("SYNC_LEASE_SECONDS", "6"), ("SYNC_MAX_SUBREQUESTS", "40")],
            expect!["7 batches, 4000 ms, lease 6s, 40 subrequests"],
        );
        check(&[("SYNC_MAX_SECONDS", ""), ("SYNC_LEASE_SECONDS", "")], expect!["200 batches, 120000 ms, lease 300s, 1000 subrequests"]);
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
            expect![[
                r#"error: SYNC_MAX_BATCHES is "2.5", which is not a positive whole number: set it to one or remove it for the default"#
            ]],
        );
        check(
            &[("SYNC_MAX_BATCHES", "0")],
            expect![[
                r#"error: SYNC_MAX_BATCHES is "0", which is not a positive whole number: set it to one or remove it for the default"#
            ]],
        );
        check(
            &[("SYNC_MAX_SUBREQUESTS", "0")],
            expect![[
                r#"error: SYNC_MAX_SUBREQUESTS is "0", which is not a positive whole number: set it to one or remove it for the default"#
            ]],
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
}
