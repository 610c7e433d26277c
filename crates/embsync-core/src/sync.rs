//! The sync driver: plans and runs a sync over a [`Store`] and an [`Embedder`].
//!
//! The driver holds the rules (what is new, stale and unchanged; batching; retries; what a
//! failure costs) and performs no IO itself: the worker implements the traits with Postgres and
//! `fetch`, and the tests below implement them in memory, with faults on command.

use crate::config::{Config, ModelSlot, ModelSpec, Source};
use crate::hash::ValueHash;
use crate::provider::{Embeddings, ProviderError};
use crate::report::{
    iso8601, DryRunReport, ModelInfo, ModelsInfo, ModelUsage, PlanTotals, RunReport, SourcePlanReport, SourceReport,
    TokenEstimate, Totals, Trigger, Usage,
};
use std::time::Duration;

/// A failure of the database, with what was being done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

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
}

impl SourceCounts {
    /// New values that need the provider.
    pub fn to_embed(&self) -> u64 {
        self.new.saturating_sub(self.reusable)
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
    pub large: Option<Vec<f32>>,
    /// New `embedding_small`, likewise.
    pub small: Option<Vec<f32>>,
    /// The value has both embeddings once this batch is written.
    pub complete: bool,
}

/// What removing stale values did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StaleOutcome {
    /// Links removed: values the source no longer has.
    pub unlinked: u64,
    /// Cache rows deleted because no source has them any more.
    pub deleted: u64,
}

/// The database, as the driver needs it. Every method is one transaction.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Creates tables and indexes if they are missing; never touches existing rows.
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError>;
    /// Counts for one source. Must not write anything (a dry run calls it on a fresh database).
    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError>;
    /// Links the source to values whose embeddings exist already; returns how many.
    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError>;
    /// Up to `limit` values that need an embedding, in hash order after `after`.
    async fn pending(&mut self, source: &Source, after: Option<&ValueHash>, limit: usize) -> Result<Vec<PendingValue>, StoreError>;
    /// Writes one batch and links all its values to the source, atomically. A value counts as
    /// done for the source only when it is linked and its row holds both embeddings, so a value
    /// with one embedding is kept (it is paid for) and completed by a later run.
    async fn store(&mut self, source: &Source, batch: &[EmbeddedValue]) -> Result<(), StoreError>;
    /// Unlinks values the source no longer has and deletes embsync's rows no source has.
    async fn remove_stale(&mut self, source: &Source) -> Result<StaleOutcome, StoreError>;
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
    /// Writes one log line.
    fn log(&self, line: &str);
}

/// How failed provider calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The first backoff.
    pub base: Duration,
    /// No single wait is longer than this, whatever the provider asks.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 5, base: Duration::from_millis(500), max_delay: Duration::from_secs(20) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 = first retry): the provider's `retry-after`
    /// when it gave one, else exponential backoff with full jitter (`random` in [0, 1)).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, random: f64) -> Duration {
        let wait = match retry_after {
            Some(d) => d,
            None => {
                let exp = self.base.saturating_mul(1u32 << retry.min(16));
                exp.min(self.max_delay).mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
            }
        };
        wait.min(self.max_delay)
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
}

/// Plans every enabled source without calling the provider or writing anything.
///
/// A source that cannot be counted (e.g. its table is missing) carries the error in its entry;
/// the others are still planned.
pub async fn dry_run<S: Store>(config: &Config, store: &mut S) -> DryRunReport {
    let batch = config.batch_size.get() as u64;
    let mut sources = Vec::new();
    for source in config.enabled_sources() {
        let mut entry = SourcePlanReport {
            name: source.name.clone(),
            table: source.table_key(),
            column: source.column_key().to_owned(),
            ..Default::default()
        };
        match store.counts(source).await {
            Ok(c) => {
                entry.total = c.total;
                entry.new = c.new;
                entry.stale = c.stale;
                entry.unchanged = c.total.saturating_sub(c.new);
                entry.reusable = c.reusable;
                entry.to_embed = c.to_embed();
                entry.batches = c.to_embed().div_ceil(batch);
                entry.estimated_tokens = TokenEstimate { large: c.embed_tokens, small: c.embed_tokens };
            }
            Err(e) => entry.error = Some(format!("planning source {}: {e}", source.name)),
        }
        sources.push(entry);
    }
    DryRunReport {
        dry_run: true,
        batch_size: batch,
        models: ModelsInfo { large: model_info(config, ModelSlot::Large), small: model_info(config, ModelSlot::Small) },
        disabled: config.sources.iter().filter(|s| !s.enabled).map(|s| s.name.clone()).collect(),
        totals: PlanTotals::of(&sources),
        sources,
    }
}

fn model_info(config: &Config, slot: ModelSlot) -> ModelInfo {
    let m = config.models.get(slot);
    ModelInfo { model: m.name().to_owned(), dimensions: m.dimensions() }
}

/// Runs one sync of every enabled source.
///
/// A source that fails (its table is missing, the database drops a statement) gets the error in
/// its report and the run goes on with the next one; a batch the provider keeps refusing counts
/// as errors and the run goes on with the next batch.
///
/// # Errors
/// [`SyncError::Schema`] when the database cannot be prepared, and [`SyncError::Provider`] when
/// the provider rejects the API key: nothing later could succeed, so the run stops at once.
pub async fn run<S: Store, E: Embedder, R: Runtime>(
    config: &Config,
    store: &mut S,
    embedder: &E,
    rt: &R,
    trigger: Trigger,
    retry: RetryPolicy,
) -> Result<RunReport, SyncError> {
    let started = rt.now_ms();
    store.ensure_schema(config).await.map_err(SyncError::Schema)?;
    let mut usage = Usage::default();
    let mut sources = Vec::new();
    for source in config.enabled_sources() {
        let began = rt.now_ms();
        let mut report = SourceReport {
            name: source.name.clone(),
            table: source.table_key(),
            column: source.column_key().to_owned(),
            ..Default::default()
        };
        let mut ctx = SourceRun { config, store: &mut *store, embedder, rt, retry, report: &mut report, usage: &mut usage };
        match ctx.sync(source).await {
            Ok(()) => {}
            Err(Stop::Store(e)) => report.error = Some(e.to_string()),
            Err(Stop::Fatal(e)) => {
                rt.log(&format!("Sync stopped: {e}"));
                return Err(SyncError::Provider(e));
            }
        }
        report.duration_ms = (rt.now_ms() - began).max(0.0) as u64;
        rt.log(&report.to_string());
        sources.push(report);
    }
    let report = RunReport {
        trigger,
        started_at: iso8601(started),
        duration_ms: (rt.now_ms() - started).max(0.0) as u64,
        totals: Totals::of(&sources),
        sources,
        usage,
    };
    Ok(report)
}

enum Stop {
    Store(StoreError),
    Fatal(ProviderError),
}

struct SourceRun<'a, S, E, R> {
    config: &'a Config,
    store: &'a mut S,
    embedder: &'a E,
    rt: &'a R,
    retry: RetryPolicy,
    report: &'a mut SourceReport,
    usage: &'a mut Usage,
}

impl<S: Store, E: Embedder, R: Runtime> SourceRun<'_, S, E, R> {
    async fn sync(&mut self, source: &Source) -> Result<(), Stop> {
        let name = &source.name;
        let ctx = |what: &str, e: StoreError| Stop::Store(StoreError(format!("{what} of source {name}: {e}")));
        let counts = self.store.counts(source).await.map_err(|e| ctx("counting values", e))?;
        self.report.total = counts.total;
        self.report.new = counts.new;
        self.report.unchanged = counts.total.saturating_sub(counts.new);
        if counts.reusable > 0 {
            self.report.reused = self.store.link_reusable(source).await.map_err(|e| ctx("linking reusable values", e))?;
        }
        let batch_size = self.config.batch_size.get();
        let planned = counts.to_embed().div_ceil(batch_size as u64);
        let mut after: Option<ValueHash> = None;
        loop {
            let page = self.store.pending(source, after.as_ref(), batch_size).await.map_err(|e| ctx("listing new values", e))?;
            let Some(last) = page.last() else { break };
            after = Some(last.hash.clone());
            let needs_provider = page.iter().any(|p| !(p.has_large && p.has_small));
            if needs_provider {
                self.report.batches += 1;
                let i = self.report.batches;
                self.rt.log(&format!("Batch {i} of {}: {name} ({} values)", planned.max(i), page.len()));
            }
            let mut batch = self.embed_page(&page).await?;
            // A value with nothing new to write is not stored; it stays pending for the next run.
            batch.retain(|v| v.complete || v.large.is_some() || v.small.is_some());
            let embedded = batch.iter().filter(|v| v.complete && (v.large.is_some() || v.small.is_some())).count() as u64;
            let complete = batch.iter().filter(|v| v.complete).count() as u64;
            if !batch.is_empty() {
                self.store.store(source, &batch).await.map_err(|e| ctx("storing a batch", e))?;
            }
            self.report.embedded += embedded;
            // A page value that needed no provider call was reused (it appeared after planning).
            self.report.reused += complete - embedded;
            self.report.errors += page.len() as u64 - complete;
        }
        let stale = self.store.remove_stale(source).await.map_err(|e| ctx("removing stale values", e))?;
        self.report.stale = stale.unlinked;
        self.report.deleted = stale.deleted;
        Ok(())
    }

    /// Calls both models concurrently for the values that lack each, with retries. A model
    /// that fails for the batch leaves those values incomplete (counted as errors and picked up
    /// again by the next run, which then asks only for what is missing).
    async fn embed_page(&mut self, page: &[PendingValue]) -> Result<Vec<EmbeddedValue>, Stop> {
        let large_idx: Vec<usize> = (0..page.len()).filter(|&i| !page[i].has_large).collect();
        let small_idx: Vec<usize> = (0..page.len()).filter(|&i| !page[i].has_small).collect();
        let large_in: Vec<&str> = large_idx.iter().map(|&i| page[i].value.as_str()).collect();
        let small_in: Vec<&str> = small_idx.iter().map(|&i| page[i].value.as_str()).collect();
        let models = &self.config.models;
        let (large, small) = futures::future::join(
            self.embed_with_retry(&models.large, &large_in),
            self.embed_with_retry(&models.small, &small_in),
        )
        .await;
        let mut out: Vec<EmbeddedValue> = page
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
        let mut large_ok = true;
        let mut small_ok = true;
        for (slot, result, idx) in [(ModelSlot::Large, large, &large_idx), (ModelSlot::Small, small, &small_idx)] {
            match result {
                Ok(Some(e)) => {
                    let u: &mut ModelUsage = if slot == ModelSlot::Large { &mut self.usage.large } else { &mut self.usage.small };
                    u.prompt_tokens += e.prompt_tokens;
                    u.requests += 1;
                    for (&i, v) in idx.iter().zip(e.vectors) {
                        match slot {
                            ModelSlot::Large => out[i].large = Some(v),
                            ModelSlot::Small => out[i].small = Some(v),
                        }
                    }
                }
                Ok(None) => {}
                Err(e) if e.is_fatal() => return Err(Stop::Fatal(e)),
                Err(e) => {
                    self.rt.log(&format!("Batch {} failed for {} ({} values): {e}", self.report.batches, models.get(slot).name(), idx.len()));
                    match slot {
                        ModelSlot::Large => large_ok = false,
                        ModelSlot::Small => small_ok = false,
                    }
                }
            }
        }
        for (v, p) in out.iter_mut().zip(page) {
            v.complete = (p.has_large || (large_ok && v.large.is_some())) && (p.has_small || (small_ok && v.small.is_some()));
        }
        Ok(out)
    }

    /// `Ok(None)` when there is nothing to embed.
    async fn embed_with_retry(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Option<Embeddings>, ProviderError> {
        if inputs.is_empty() {
            return Ok(None);
        }
        let mut retry = 0;
        loop {
            match self.embedder.embed(model, inputs).await {
                Ok(e) => return Ok(Some(e)),
                Err(e) if e.is_retryable() && retry + 1 < self.retry.max_attempts => {
                    let wait = self.retry.delay(retry, e.retry_after(), self.rt.random());
                    self.rt.log(&format!("Retrying {} in {} ms: {e}", model.name(), wait.as_millis()));
                    self.rt.sleep(wait).await;
                    retry += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
