//! What a run or a dry run reports, per source and in total, as JSON (camelCase) and log lines.

use serde::Serialize;
use std::fmt;

/// Counts for one source in a sync run.
///
/// It also reads back from a stored report; fields missing there (from an older version) are 0
/// or `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SourceReport {
    /// The source's name from the config.
    pub name: String,
    /// The table as configured.
    pub table: String,
    /// The column.
    pub column: String,
    /// Distinct non-empty values in the source.
    pub total: u64,
    /// Values the source has that were not yet embedded for it.
    pub new: u64,
    /// Values recorded for the source that it no longer has.
    pub stale: u64,
    /// `total - new`: cost nothing.
    pub unchanged: u64,
    /// New values whose embeddings already existed (no provider call).
    pub reused: u64,
    /// Values sent to the provider and stored.
    pub embedded: u64,
    /// Cache rows deleted (embsync's own, no longer in any source).
    pub deleted: u64,
    /// Values that could not be embedded in this run (recorded in `embedding_sync_errors`).
    pub errors: u64,
    /// New values not attempted because an earlier failure asked for a later retry.
    pub deferred: u64,
    /// Provider batches run.
    pub batches: u64,
    /// Wall time for this source.
    pub duration_ms: u64,
    /// Why the source stopped early, if it did.
    pub error: Option<String>,
    /// Something the run held back on purpose (e.g. the mass-delete guard), if so.
    pub warning: Option<String>,
}

/// Sums over all sources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Totals {
    /// See [`SourceReport::total`].
    pub total: u64,
    /// See [`SourceReport::new`].
    pub new: u64,
    /// See [`SourceReport::stale`].
    pub stale: u64,
    /// See [`SourceReport::unchanged`].
    pub unchanged: u64,
    /// See [`SourceReport::reused`].
    pub reused: u64,
    /// See [`SourceReport::embedded`].
    pub embedded: u64,
    /// See [`SourceReport::deleted`].
    pub deleted: u64,
    /// See [`SourceReport::errors`].
    pub errors: u64,
    /// See [`SourceReport::deferred`].
    pub deferred: u64,
    /// See [`SourceReport::batches`].
    pub batches: u64,
}

impl Totals {
    /// Sums the sources.
    pub fn of(sources: &[SourceReport]) -> Totals {
        let mut t = Totals::default();
        for s in sources {
            t.total += s.total;
            t.new += s.new;
            t.stale += s.stale;
            t.unchanged += s.unchanged;
            t.reused += s.reused;
            t.embedded += s.embedded;
            t.deleted += s.deleted;
            t.errors += s.errors;
            t.deferred += s.deferred;
            t.batches += s.batches;
        }
        t
    }
}

/// Tokens the provider reported, per model slot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Usage {
    /// `embedding_large`'s model.
    pub large: ModelUsage,
    /// `embedding_small`'s model.
    pub small: ModelUsage,
    /// What the reported tokens cost at the configured prices, in US dollars.
    pub cost_usd: f64,
}

/// Tokens one model consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ModelUsage {
    /// Sum of `usage.prompt_tokens` over successful requests.
    pub prompt_tokens: u64,
    /// Successful requests.
    pub requests: u64,
    /// Of `prompt_tokens`, those of requests that went through the Batch API (priced at
    /// [`crate::batch_api::PRICE_FACTOR`] of the list price). Left out when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub batch_prompt_tokens: u64,
    /// Of `requests`, those of the Batch API. Left out when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub batch_requests: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The Batch API's batches a run waits for (the run stays open until they are over).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PendingBatches {
    /// Batches not over yet (a request file whose batch is not created yet included).
    pub batches: u64,
    /// Their values.
    pub values: u64,
    /// Of the batches, those over whose output is read in part (the invocation's time ran out
    /// or the download broke off): the worker chains the next invocation for them.
    pub reading: u64,
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The cron trigger.
    Cron,
    /// `POST /sync`.
    Http,
}

impl Trigger {
    /// As stored in `embedding_sync_runs.trigger`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cron => "cron",
            Trigger::Http => "http",
        }
    }
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Being worked on by an invocation.
    Running,
    /// Stopped at an invocation's budget; the next invocation goes on.
    Paused,
    /// Done: every source was synced.
    Finished,
    /// Stopped for good by an error no later request could get past (e.g. a rejected API key).
    Failed,
    /// Ended without a report: the config's sources changed while it was open, and a new run
    /// started over.
    Abandoned,
}

impl RunStatus {
    /// As stored in `embedding_sync_runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Finished => "finished",
            RunStatus::Failed => "failed",
            RunStatus::Abandoned => "abandoned",
        }
    }

    /// Reads [`RunStatus::as_str`]'s text back; `None` for anything else.
    pub fn parse(text: &str) -> Option<RunStatus> {
        [RunStatus::Running, RunStatus::Paused, RunStatus::Finished, RunStatus::Failed, RunStatus::Abandoned]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// The report of one sync run, over all its invocations so far.
///
/// It also reads back from `embedding_sync_runs.report`; the fields later versions added
/// (`invocations`, `totals`, `usage`, `stopped`) default when missing.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// The run's id.
    pub run_id: String,
    /// Where the run stands.
    pub status: RunStatus,
    /// Invocations the run took so far.
    #[serde(default)]
    pub invocations: u64,
    /// What started the run.
    pub trigger: Trigger,
    /// ISO 8601 UTC start time.
    pub started_at: String,
    /// Wall time of the run.
    #[serde(default)]
    pub duration_ms: u64,
    /// One entry per enabled source, in config order.
    pub sources: Vec<SourceReport>,
    /// Sums over the sources.
    #[serde(default)]
    pub totals: Totals,
    /// Tokens the provider reported.
    #[serde(default)]
    pub usage: Usage,
    /// Why the run stopped before doing everything (e.g. the token budget), if it did.
    #[serde(default)]
    pub stopped: Option<String>,
    /// What the run did to the HNSW indexes (`vectorIndexes`); `None` when the option is off or
    /// the run did not finish everything.
    #[serde(default)]
    pub indexes: Option<IndexReport>,
    /// The Batch API's batches the run waits for (status `paused` until they are over); left
    /// out when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_batches: Option<PendingBatches>,
}

/// The index step of a finished run (see [`crate::index`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IndexReport {
    /// Indexes built by this run.
    pub created: Vec<String>,
    /// embsync's indexes dropped: replaced by a new one, or left INVALID by an interrupted build.
    pub dropped: Vec<String>,
    /// Wanted indexes that were there and valid.
    pub kept: Vec<String>,
    /// Why something wanted was not built (e.g. the cache is another pipeline's table).
    pub skipped: Vec<String>,
    /// The statement that failed, if one did; the next finished run tries again.
    pub error: Option<String>,
}

impl fmt::Display for SourceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Source {}: total={} new={} stale={} unchanged={} reused={} embedded={} deleted={} errors={} batches={} deferred={} ({} ms)",
            self.name,
            self.total,
            self.new,
            self.stale,
            self.unchanged,
            self.reused,
            self.embedded,
            self.deleted,
            self.errors,
            self.batches,
            self.deferred,
            self.duration_ms
        )?;
        if let Some(e) = &self.error {
            write!(f, " error: {e}")?;
        }
        if let Some(w) = &self.warning {
            write!(f, " warning: {w}")?;
        }
        Ok(())
    }
}

/// Estimated tokens per model slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenEstimate {
    /// For `embedding_large`'s model.
    pub large: u64,
    /// For `embedding_small`'s model.
    pub small: u64,
}

/// Estimated cost in US dollars, per model and in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CostEstimate {
    /// For `embedding_large`'s model.
    pub large: f64,
    /// For `embedding_small`'s model.
    pub small: f64,
    /// Both.
    pub total: f64,
}

impl CostEstimate {
    /// Prices `large` and `small` tokens at the configured per-million prices.
    pub fn of(config: &crate::config::Config, large: u64, small: u64) -> CostEstimate {
        let price = |tokens: u64, per_million: f64| (tokens as f64 * per_million / 1e6 * 1e6).round() / 1e6;
        let large = price(large, config.models.large.price_per_million());
        let small = price(small, config.models.small.price_per_million());
        CostEstimate { large, small, total: ((large + small) * 1e6).round() / 1e6 }
    }
}

/// How a source's changes are found (`changes` in the config), as reports show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangesMode {
    /// Every run scans the table.
    #[default]
    Scan,
    /// Triggers record the changes; a reconcile scans on a schedule.
    Capture,
}

impl ChangesMode {
    /// The mode of `changes`.
    pub fn of(changes: crate::config::Changes) -> ChangesMode {
        if changes.is_capture() {
            ChangesMode::Capture
        } else {
            ChangesMode::Scan
        }
    }
}

/// A captured source's change capture, as the dry run and `/status` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureInfo {
    /// `reconcileEvery` (`24h`).
    pub reconcile_every: String,
    /// The triggers: `enabled`, `disabled` (the source is scanned every run until they are
    /// enabled again), `not installed` (the next run installs them) or `incomplete` (the next
    /// run reinstalls them).
    pub triggers: String,
    /// When the last full reconcile ran (ISO 8601), if one has.
    pub last_reconcile: Option<String>,
    /// Change log rows waiting for the next run.
    pub backlog: u64,
    /// What the last reconcile found the capture had missed, when it could know.
    pub last_drift: Option<crate::sync::Drift>,
}

/// One source in a dry run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourcePlanReport {
    /// The source's name from the config.
    pub name: String,
    /// The table as configured.
    pub table: String,
    /// The column.
    pub column: String,
    /// How its changes are found.
    pub changes: ChangesMode,
    /// Its change capture, when `changes` is `capture`. The counts below are then read from
    /// embsync's copy of its values, without the backlog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureInfo>,
    /// Distinct non-empty values in the source.
    pub total: u64,
    /// Values not yet embedded for this source.
    pub new: u64,
    /// Values recorded for this source that it no longer has.
    pub stale: u64,
    /// `total - new`.
    pub unchanged: u64,
    /// New values whose embeddings already exist.
    pub reusable: u64,
    /// New values that need the provider.
    pub to_embed: u64,
    /// New values waiting for a retry after an error.
    pub deferred: u64,
    /// Provider batches that would run.
    pub batches: u64,
    /// Estimated tokens per model for `to_embed`.
    pub estimated_tokens: TokenEstimate,
    /// Estimated cost of `to_embed`.
    pub estimated_cost_usd: CostEstimate,
    /// Why this source could not be planned, if so.
    pub error: Option<String>,
}

/// Dry-run sums.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanTotals {
    /// Sum of `total`.
    pub total: u64,
    /// Sum of `new`.
    pub new: u64,
    /// Sum of `stale`.
    pub stale: u64,
    /// Sum of `unchanged`.
    pub unchanged: u64,
    /// Sum of `reusable`.
    pub reusable: u64,
    /// Sum of `toEmbed`.
    pub to_embed: u64,
    /// Sum of `deferred`.
    pub deferred: u64,
    /// Sum of `batches`.
    pub batches: u64,
    /// Sum of the estimates.
    pub estimated_tokens: TokenEstimate,
}

/// A model as the dry run shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The provider's model name.
    pub model: String,
    /// Stored vector length.
    pub dimensions: u32,
}

/// Both models.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelsInfo {
    /// `embedding_large`.
    pub large: ModelInfo,
    /// `embedding_small`.
    pub small: ModelInfo,
}

/// The answer of `GET /dry-run`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunReport {
    /// Always true: nothing was written and the provider was not called.
    pub dry_run: bool,
    /// Values per provider request.
    pub batch_size: u64,
    /// The configured models.
    pub models: ModelsInfo,
    /// One entry per enabled source.
    pub sources: Vec<SourcePlanReport>,
    /// Names of disabled sources.
    pub disabled: Vec<String>,
    /// Sums.
    pub totals: PlanTotals,
    /// Estimated cost of everything to embed, at the configured prices.
    pub estimated_cost_usd: CostEstimate,
    /// The Batch API: the setting, and per model both prices and which way it would go.
    pub batch_api: BatchApiPlan,
}

/// The dry run's view of the Batch API (`batchApi` in the config).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchApiPlan {
    /// Whether `batchApi` is on.
    pub enabled: bool,
    /// Its `minValues`, when on.
    pub min_values: Option<u64>,
    /// `embedding_large`'s model.
    pub large: ModelWay,
    /// `embedding_small`'s model.
    pub small: ModelWay,
}

/// One model's way and prices in a dry run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelWay {
    /// The way its pending values would go by the config.
    pub way: crate::batch_api::Way,
    /// Its values to embed (all sources).
    pub pending_values: u64,
    /// The list price, US dollars per million tokens.
    pub price_per_million_tokens: f64,
    /// The Batch API's price, half the list price.
    pub batch_price_per_million_tokens: f64,
    /// The estimated cost of its pending values at the list price.
    pub estimated_cost_usd: f64,
    /// The same at the Batch API's price.
    pub estimated_batch_cost_usd: f64,
}

impl BatchApiPlan {
    /// The plan for `pending` values (large, small: those pending batches do not bring) of
    /// `tokens` estimated tokens per model.
    pub fn of(config: &crate::config::Config, pending: (u64, u64), tokens: &TokenEstimate) -> BatchApiPlan {
        use crate::config::ModelSlot;
        let dollars = |tokens: u64, per_million: f64| (tokens as f64 * per_million / 1e6 * 1e6).round() / 1e6;
        let model = |slot: ModelSlot, pending: u64, tokens: u64| {
            let spec = config.models.get(slot);
            let price = spec.price_per_million();
            let batch_price = crate::batch_api::batch_price_per_million(spec);
            ModelWay {
                way: crate::batch_api::way(config, pending),
                pending_values: pending,
                price_per_million_tokens: price,
                batch_price_per_million_tokens: batch_price,
                estimated_cost_usd: dollars(tokens, price),
                estimated_batch_cost_usd: dollars(tokens, batch_price),
            }
        };
        BatchApiPlan {
            enabled: config.batch_api.is_some(),
            min_values: config.batch_api.map(|b| b.min_values),
            large: model(ModelSlot::Large, pending.0, tokens.large),
            small: model(ModelSlot::Small, pending.1, tokens.small),
        }
    }
}

impl PlanTotals {
    /// Sums the sources.
    pub fn of(sources: &[SourcePlanReport]) -> PlanTotals {
        let mut t = PlanTotals::default();
        for s in sources {
            t.total += s.total;
            t.new += s.new;
            t.stale += s.stale;
            t.unchanged += s.unchanged;
            t.reusable += s.reusable;
            t.to_embed += s.to_embed;
            t.deferred += s.deferred;
            t.batches += s.batches;
            t.estimated_tokens.large += s.estimated_tokens.large;
            t.estimated_tokens.small += s.estimated_tokens.small;
        }
        t
    }
}

/// Formats epoch milliseconds as ISO 8601 UTC (`2026-11-23T23:59:00.000Z`).
pub fn iso8601(epoch_ms: f64) -> String {
    let ms = epoch_ms.max(0.0) as i64;
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_795_478_340_123.0), "2026-11-23T23:59:00.123Z");
        assert_eq!(iso8601(951_782_400_000.0), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_dry_runs_batch_api_plan() {
        let config = |batch_api: &str| {
            crate::config::Config::parse(&format!(
                r#"{{"version": "1.0", "models": {{"large": "text-embedding-3-large", "small": "text-embedding-3-small"}}, {batch_api}
                "sources": [{{"name": "a", "table": "t", "column": "c"}}]}}"#
            ))
            .unwrap()
        };
        let tokens = TokenEstimate { large: 2_000_000, small: 2_000_000 };
        let on = config(r#""batchApi": {"enabled": true, "minValues": 500},"#);
        expect_test::expect![[r#"
            {
              "enabled": true,
              "minValues": 500,
              "large": {
                "way": "batchApi",
                "pendingValues": 500,
                "pricePerMillionTokens": 0.13,
                "batchPricePerMillionTokens": 0.065,
                "estimatedCostUsd": 0.26,
                "estimatedBatchCostUsd": 0.13
              },
              "small": {
                "way": "batchApi",
                "pendingValues": 500,
                "pricePerMillionTokens": 0.02,
                "batchPricePerMillionTokens": 0.01,
                "estimatedCostUsd": 0.04,
                "estimatedBatchCostUsd": 0.02
              }
            }"#]]
        .assert_eq(&serde_json::to_string_pretty(&BatchApiPlan::of(&on, (500, 500), &tokens)).unwrap());
        let below = BatchApiPlan::of(&on, (499, 500), &tokens);
        assert_eq!((below.large.way, below.small.way), (crate::batch_api::Way::Embeddings, crate::batch_api::Way::BatchApi));
        assert_eq!((below.large.pending_values, below.small.pending_values), (499, 500), "each model's own pending values");
        let off = BatchApiPlan::of(&config(""), (1_000_000, 1_000_000), &tokens);
        assert_eq!((off.enabled, off.min_values, off.large.way), (false, None, crate::batch_api::Way::Embeddings));
        assert_eq!(off.large.estimated_batch_cost_usd, 0.13, "both prices are shown whatever the way");
    }
}
