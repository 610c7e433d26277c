//! `embedding-sources.json`, parsed once into types.
//!
//! ```json
//! { "version": "1.0",
//!   "models": { "large": "text-embedding-3-large", "small": "text-embedding-3-small" },
//!   "batchSize": 100,
//!   "sources": [
//!     { "name": "Option Descriptions", "table": "config_option", "column": "description", "enabled": true } ] }
//! ```
//! A model is a name, or `{ "name": "...", "dimensions": 1024, "pricePerMillionTokens": 0.13,
//! "deployment": "..." }` (list prices of the OpenAI models are built in; `deployment` is the
//! Azure OpenAI deployment that serves the model, see [`crate::endpoint`]). `batchSize`
//! (1..=2048) defaults to 100, `enabled` to `true`, and the optional `maxTokensPerRun` caps what
//! one run may spend. The mass-delete guard (`maxDeleteShare`, default 0.5; `massDeleteMinimum`, default 100; per source
//! `allowMassDelete`, default false) keeps a source that suddenly looks empty from deleting its
//! embeddings. `vectorIndexes` (`{"enabled": true, "m": 16, "efConstruction": 64}`, off when
//! absent) makes the sync keep HNSW indexes on the embedding columns (see [`crate::index`]).
//! `retention` (`{"runs": 1000}`) bounds the run history: when a run finishes, finished runs
//! beyond the newest `runs` are deleted. `batchApi` (`{"enabled": true, "minValues": 10000}`,
//! off when absent) sends a model's pending values through OpenAI's Batch API, at half the
//! price, when a run has at least `minValues` of them (see [`crate::batch_api`]).
//! Every other field is required and unknown keys are rejected.
//! Code past this module takes [`Config`], never raw JSON.
//!
//! `schema/embedding-sources.schema.json` states the same rules as a JSON Schema for editors;
//! `tests/schema.rs` checks both on the examples in `tests/config-examples/`.

use crate::ident::{Ident, TableName};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;

/// The most inputs OpenAI accepts in one embeddings request.
pub const MAX_BATCH_SIZE: u16 = 2048;

/// A checked, parsed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The two models every value is embedded with.
    pub models: Models,
    /// How many values go into one provider request.
    pub batch_size: BatchSize,
    /// Every source, enabled or not, in config order.
    pub sources: Vec<Source>,
    /// A run stops cleanly, after a committed batch, once the provider reported this many
    /// tokens (both models together). `None`: no limit.
    pub max_tokens_per_run: Option<u64>,
    /// The mass-delete guard: a source may lose at most this share (0..=1, default 0.5) of its
    /// values in one run unless it allows mass deletes ...
    pub max_delete_share: f64,
    /// ... once it would lose at least this many values (default 100).
    pub mass_delete_minimum: u64,
    /// HNSW indexes the sync keeps on the embedding columns (`vectorIndexes`); `None` when
    /// absent or disabled: the sync then neither creates nor drops any index.
    pub vector_indexes: Option<VectorIndexes>,
    /// How many finished runs `embedding_sync_runs` keeps (`retention.runs`, default 1000).
    pub retention_runs: u64,
    /// Ceilings of the provider requests' rate (`rate`; see [`crate::rate`]).
    pub rate: Rate,
    /// When a model's pending values go through the Batch API (`batchApi`); `None` when absent
    /// or disabled: every value goes to the embeddings endpoint.
    pub batch_api: Option<BatchApi>,
}

/// The default of `batchApi.minValues`.
pub const DEFAULT_BATCH_API_MIN_VALUES: u64 = 10_000;

/// `batchApi`: a model whose pending values in a run reach `min_values` sends them through
/// OpenAI's Batch API (half the price, within 24 hours) instead of the embeddings endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchApi {
    /// The fewest pending values of a model that go through the Batch API (at least 1).
    pub min_values: u64,
}

/// Ceilings of the provider requests' rate (`rate` in the config), for a key shared with other
/// services. Each is optional; within them the sync adapts to the provider's answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    /// Provider requests in flight at most (`maxConcurrency`, 1..=5; default 5: a Worker has six
    /// connections, one of which is the database's).
    pub max_concurrency: Option<std::num::NonZeroU8>,
    /// Provider requests per minute at most (`requestsPerMinute`).
    pub requests_per_minute: Option<std::num::NonZeroU64>,
    /// Tokens per minute at most, both models together (`tokensPerMinute`), estimated
    /// conservatively (3 bytes a token) before each request.
    pub tokens_per_minute: Option<std::num::NonZeroU64>,
}

/// The default of `retention.runs`: about three days of a five-minute cron.
pub const DEFAULT_RETENTION_RUNS: u64 = 1000;

/// Build parameters of the HNSW indexes embsync keeps (see [`crate::index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VectorIndexes {
    /// Connections per node (pgvector `m`, 2..=100, default 16).
    pub m: u16,
    /// Candidate list size while building (pgvector `ef_construction`, 4..=1000, at least
    /// `2 * m`, default 64).
    pub ef_construction: u16,
}

/// The two embedding models.
#[derive(Debug, Clone, PartialEq)]
pub struct Models {
    /// Stored in `embedding_large`.
    pub large: ModelSpec,
    /// Stored in `embedding_small`.
    pub small: ModelSpec,
}

impl Models {
    /// The spec for one slot.
    pub fn get(&self, slot: ModelSlot) -> &ModelSpec {
        match slot {
            ModelSlot::Large => &self.large,
            ModelSlot::Small => &self.small,
        }
    }
}

/// Which of the two embedding columns a model fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelSlot {
    /// `embedding_large`.
    Large,
    /// `embedding_small`.
    Small,
}

impl ModelSlot {
    /// Both slots, large first.
    pub const ALL: [ModelSlot; 2] = [ModelSlot::Large, ModelSlot::Small];

    /// `large` or `small`, as in the config and reports.
    pub fn key(self) -> &'static str {
        match self {
            ModelSlot::Large => "large",
            ModelSlot::Small => "small",
        }
    }
}

/// A model name, the vector size it produces and its price.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    name: String,
    dimensions: u32,
    explicit_dimensions: bool,
    price_per_million: f64,
    deployment: Option<Deployment>,
}

impl ModelSpec {
    /// The provider's model name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The length of the vectors this model produces, as stored.
    pub fn dimensions(&self) -> u32 {
        self.dimensions
    }

    /// The `dimensions` to send in requests: only when the config set it.
    pub fn requested_dimensions(&self) -> Option<u32> {
        self.explicit_dimensions.then_some(self.dimensions)
    }

    /// What made a stored embedding, recorded next to it: `name` or `name:dimensions`.
    /// A change of tag means the stored vectors are from another model and are re-embedded.
    pub fn tag(&self) -> String {
        match self.requested_dimensions() {
            Some(d) => format!("{}:{d}", self.name),
            None => self.name.clone(),
        }
    }

    /// US dollars per million input tokens.
    pub fn price_per_million(&self) -> f64 {
        self.price_per_million
    }

    /// The Azure OpenAI deployment that serves this model: `deployment` when the config sets
    /// it, else one named like the model. Other providers ignore it; it is not part of the
    /// [`tag`](Self::tag), since a deployment is only where the model runs.
    pub fn deployment(&self) -> &str {
        self.deployment.as_ref().map_or(&self.name, |d| d.as_str())
    }
}

/// An Azure OpenAI deployment name, checked so that it is one URL path segment as it is:
/// 1 to 64 ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment(String);

impl Deployment {
    /// Checks a name.
    ///
    /// # Errors
    /// What is wrong with it, as a message for [`ConfigError`].
    pub fn parse(name: &str) -> Result<Deployment, String> {
        let starts_well = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let chars_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if name.is_empty() || name.len() > 64 || !starts_well || !chars_ok {
            return Err(format!(
                "{name:?} is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit"
            ));
        }
        Ok(Deployment(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The list price in US dollars per million tokens of the models this tool knows.
pub fn default_price(model: &str) -> Option<f64> {
    match model {
        "text-embedding-3-large" => Some(0.13),
        "text-embedding-3-small" => Some(0.02),
        "text-embedding-ada-002" => Some(0.10),
        _ => None,
    }
}

/// The native vector size of the models this tool knows.
pub fn native_dimensions(model: &str) -> Option<u32> {
    match model {
        "text-embedding-3-large" => Some(3072),
        "text-embedding-3-small" | "text-embedding-ada-002" => Some(1536),
        _ => None,
    }
}

/// Values per provider request, 1..=2048.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSize(u16);

impl BatchSize {
    /// Checks the range.
    pub fn new(n: u64) -> Option<BatchSize> {
        (1..=u64::from(MAX_BATCH_SIZE)).contains(&n).then_some(BatchSize(n as u16))
    }

    /// The size as a count.
    pub fn get(self) -> usize {
        usize::from(self.0)
    }
}

/// One configured source column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// A human name, unique in the config.
    pub name: String,
    /// The table, `table` or `schema.table`.
    pub table: TableName,
    /// The text column.
    pub column: Ident,
    /// Disabled sources are listed but not synced; their embeddings are kept.
    pub enabled: bool,
    /// Lets a run remove more than [`Config::max_delete_share`] of the source's values (or all
    /// of them) at once. Off by default: a source that suddenly looks empty is more often a
    /// broken table or a bad migration than a real mass deletion.
    pub allow_mass_delete: bool,
    /// How a run finds the source's changes (`changes`, default [`Changes::Scan`]).
    pub changes: Changes,
}

/// How a run finds what changed in a source (`changes` and `reconcileEvery` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changes {
    /// Every run hashes every value of the source (`"scan"`, the default).
    Scan,
    /// Statement-level triggers record the hashes of the column's changed values in embsync's
    /// change log, which a run reads instead of the table (`"capture"`); a full reconcile by
    /// scan runs every `reconcile_every_secs` seconds (`reconcileEvery`, default 24 h) and
    /// whenever the capture may have missed something.
    Capture {
        /// Seconds between full reconciles.
        reconcile_every_secs: u64,
    },
}

/// `reconcileEvery`'s default: a day.
pub const DEFAULT_RECONCILE_EVERY_SECS: u64 = 24 * 3600;

impl Changes {
    /// Whether the source is captured.
    pub fn is_capture(self) -> bool {
        matches!(self, Changes::Capture { .. })
    }
}

/// `reconcileEvery` as written back: `1d`, `6h`, `90s`.
pub fn duration_text(secs: u64) -> String {
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A duration such as `"24h"`, `"30m"`, `"7d"` or `"90s"`: whole seconds.
fn duration_secs(text: &str) -> Option<u64> {
    let text = text.trim();
    let unit = text.chars().last()?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale).filter(|&n| n > 0)
}

impl Source {
    /// The table as recorded in `source_table` columns.
    pub fn table_key(&self) -> String {
        self.table.to_string()
    }

    /// The column as recorded in `source_column` columns.
    pub fn column_key(&self) -> &str {
        self.column.as_str()
    }
}

/// Why a config was rejected. The message names the field and says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Where in the document, e.g. `sources[1].table` (`.` for the whole document).
    pub path: String,
    /// What is wrong there and how to fix it.
    pub message: String,
}

impl ConfigError {
    fn at(path: impl Into<String>, message: impl fmt::Display) -> Self {
        ConfigError { path: path.into(), message: message.to_string() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(rename = "$schema")]
    #[allow(dead_code)]
    schema: Option<String>,
    version: String,
    models: Object<RawModels>,
    batch_size: Option<u64>,
    max_tokens_per_run: Option<u64>,
    max_delete_share: Option<f64>,
    mass_delete_minimum: Option<u64>,
    vector_indexes: Option<Object<RawVectorIndexes>>,
    retention: Option<Object<RawRetention>>,
    rate: Option<Object<RawRate>>,
    batch_api: Option<Object<RawBatchApi>>,
    sources: Vec<Object<RawSource>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBatchApi {
    enabled: bool,
    min_values: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRate {
    max_concurrency: Option<u64>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    runs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVectorIndexes {
    enabled: bool,
    m: Option<u16>,
    ef_construction: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModels {
    large: RawModel,
    small: RawModel,
}

/// A model name, or an object. Hand-written rather than `#[serde(untagged)]`, whose only error
/// is "data did not match any variant": this one names the field that is wrong.
enum RawModel {
    Name(String),
    Spec(RawModelSpec),
}

impl<'de> Deserialize<'de> for RawModel {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawModel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a model name or {"name": "...", "dimensions": N}"#)
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<RawModel, E> {
                Ok(RawModel::Name(name.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawModel, A::Error> {
                RawModelSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RawModel::Spec)
            }
        }
        de.deserialize_any(Visit)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
struct RawModelSpec {
    name: String,
    dimensions: Option<u32>,
    price_per_million_tokens: Option<f64>,
    deployment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    name: String,
    table: String,
    column: String,
    enabled: Option<bool>,
    allow_mass_delete: Option<bool>,
    changes: Option<String>,
    reconcile_every: Option<String>,
}

/// A struct that must be written as a JSON object. Serde also fills a struct from an array of
/// its fields in order (`["1.0", {...}, ...]`); the config is only ever written as objects, and
/// the JSON Schema says so, so the parser says so too.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        de.deserialize_map(Visit(std::marker::PhantomData)).map(Object)
    }
}

impl Config {
    /// Parses and checks a config document.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field: JSON syntax, unknown keys, missing fields, a version
    /// other than 1.x, a bad model, `batchSize` outside 1..=2048, table or column names that are
    /// not identifiers, empty or duplicate names, and duplicate table/column pairs.
    pub fn parse(json: &str) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(json);
        let Object(raw): Object<RawConfig> = serde_path_to_error::deserialize(de).map_err(|err| {
            let path = err.path().to_string();
            ConfigError::at(path, err.inner())
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.version != "1" && !raw.version.starts_with("1.") {
            return Err(ConfigError::at("version", format!("unsupported version {:?}: this build reads version 1.x", raw.version)));
        }
        let Object(raw_models) = raw.models;
        let models = Models { large: model("models.large", raw_models.large)?, small: model("models.small", raw_models.small)? };
        let batch_size = match raw.batch_size {
            None => BatchSize(100),
            Some(n) => BatchSize::new(n).ok_or_else(|| {
                ConfigError::at(
                    "batchSize",
                    format!(
                        "{n} is out of range: use 1..={MAX_BATCH_SIZE} (the provider takes at most {MAX_BATCH_SIZE} inputs per request)"
                    ),
                )
            })?,
        };
        if raw.sources.is_empty() {
            return Err(ConfigError::at("sources", "is empty: list at least one source"));
        }
        let mut names = HashSet::new();
        let mut pairs = HashSet::new();
        let mut sources = Vec::with_capacity(raw.sources.len());
        for (i, Object(s)) in raw.sources.into_iter().enumerate() {
            let at = |field: &str| format!("sources[{i}].{field}");
            let name = s.name.trim().to_owned();
            if name.is_empty() {
                return Err(ConfigError::at(at("name"), "is empty: give the source a name"));
            }
            let table = TableName::parse(&s.table).map_err(|e| ConfigError::at(at("table"), e))?;
            let column = Ident::parse(&s.column).map_err(|e| ConfigError::at(at("column"), e))?;
            if !names.insert(name.clone()) {
                return Err(ConfigError::at(at("name"), format!("duplicate source name {name:?}: names must be unique")));
            }
            if !pairs.insert((table.clone(), column.clone())) {
                return Err(ConfigError::at(
                    at("column"),
                    format!("duplicate source {table}.{column}: each table/column pair may be listed once"),
                ));
            }
            let reconcile_every_secs = match s.reconcile_every.as_deref() {
                None => DEFAULT_RECONCILE_EVERY_SECS,
                Some(text) => duration_secs(text).ok_or_else(|| {
                    ConfigError::at(
                        at("reconcileEvery"),
                        format!("{text:?} is not a duration: write a whole number and s, m, h or d, e.g. \"24h\""),
                    )
                })?,
            };
            let changes = match s.changes.as_deref() {
                None | Some("scan") => Changes::Scan,
                Some("capture") => Changes::Capture { reconcile_every_secs },
                Some(other) => return Err(ConfigError::at(at("changes"), format!("{other:?} is not a mode: use \"scan\" or \"capture\""))),
            };
            sources.push(Source {
                name,
                table,
                column,
                enabled: s.enabled.unwrap_or(true),
                allow_mass_delete: s.allow_mass_delete.unwrap_or(false),
                changes,
            });
        }
        if raw.max_tokens_per_run == Some(0) {
            return Err(ConfigError::at("maxTokensPerRun", "must be at least 1 (leave it out for no limit)"));
        }
        let max_delete_share = match raw.max_delete_share {
            None => 0.5,
            Some(share) if (0.0..=1.0).contains(&share) => share,
            Some(share) => return Err(ConfigError::at("maxDeleteShare", format!("{share} is not a share: use a number from 0 to 1"))),
        };
        let vector_indexes = match raw.vector_indexes {
            None => None,
            Some(Object(v)) => vector_indexes(v)?,
        };
        let retention_runs = match raw.retention.and_then(|Object(r)| r.runs) {
            None => DEFAULT_RETENTION_RUNS,
            Some(0) => return Err(ConfigError::at("retention.runs", "must be at least 1: the runs table keeps this many finished runs")),
            Some(n) => n,
        };
        let rate = match raw.rate {
            None => Rate::default(),
            Some(Object(r)) => rate(r)?,
        };
        let batch_api = match raw.batch_api {
            None => None,
            Some(Object(b)) => {
                let min_values = b.min_values.unwrap_or(DEFAULT_BATCH_API_MIN_VALUES);
                if min_values == 0 {
                    return Err(ConfigError::at(
                        "batchApi.minValues",
                        "must be at least 1 (the fewest pending values of a model that go through the Batch API)",
                    ));
                }
                b.enabled.then_some(BatchApi { min_values })
            }
        };
        Ok(Config {
            rate,
            batch_api,
            models,
            batch_size,
            sources,
            max_tokens_per_run: raw.max_tokens_per_run,
            max_delete_share,
            mass_delete_minimum: raw.mass_delete_minimum.unwrap_or(100),
            vector_indexes,
            retention_runs,
        })
    }

    /// The sources to sync, in config order.
    pub fn enabled_sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.iter().filter(|s| s.enabled)
    }

    /// Values per batch as the sync runs it: `batchSize`, capped so a batch fits a Worker's
    /// memory (see [`crate::batch::max_values_per_batch`]).
    pub fn values_per_batch(&self) -> usize {
        crate::batch::max_values_per_batch(self.batch_size.get(), self.models.large.dimensions(), self.models.small.dimensions())
    }

    /// Whether a run that got `tokens` reported by the provider has reached `maxTokensPerRun`.
    pub fn token_budget_spent(&self, tokens: u64) -> bool {
        self.max_tokens_per_run.is_some_and(|max| tokens >= max)
    }
}

/// Checks `rate`.
fn rate(raw: RawRate) -> Result<Rate, ConfigError> {
    let max = crate::rate::MAX_REQUESTS_IN_FLIGHT as u64;
    let max_concurrency = match raw.max_concurrency {
        None => None,
        Some(n @ 1..) if n <= max => std::num::NonZeroU8::new(n as u8),
        Some(n) => {
            return Err(ConfigError::at(
                "rate.maxConcurrency",
                format!(
                    "{n} is out of range: use 1..={max} (a Worker invocation has six connections, one of which is the database's), or leave it out for {max}"
                ),
            ))
        }
    };
    let per_minute = |field: &str, n: Option<u64>| match n {
        None => Ok(None),
        Some(0) => Err(ConfigError::at(format!("rate.{field}"), "must be at least 1 (leave it out for no ceiling)")),
        Some(n) => Ok(std::num::NonZeroU64::new(n)),
    };
    Ok(Rate {
        max_concurrency,
        requests_per_minute: per_minute("requestsPerMinute", raw.requests_per_minute)?,
        tokens_per_minute: per_minute("tokensPerMinute", raw.tokens_per_minute)?,
    })
}

/// Checks `vectorIndexes` (also when disabled, so a mistake shows before it is switched on).
fn vector_indexes(raw: RawVectorIndexes) -> Result<Option<VectorIndexes>, ConfigError> {
    let m = raw.m.unwrap_or(16);
    if !(2..=100).contains(&m) {
        return Err(ConfigError::at(
            "vectorIndexes.m",
            format!("{m} is out of range: use 2..=100 (pgvector's limits; 16 is a good default)"),
        ));
    }
    let ef_construction = raw.ef_construction.unwrap_or(64);
    if !(4..=1000).contains(&ef_construction) {
        return Err(ConfigError::at(
            "vectorIndexes.efConstruction",
            format!("{ef_construction} is out of range: use 4..=1000 (pgvector's limits; 64 is a good default)"),
        ));
    }
    if ef_construction < 2 * m {
        return Err(ConfigError::at(
            "vectorIndexes.efConstruction",
            format!("{ef_construction} is less than 2 * m ({}): pgvector needs efConstruction >= 2 * m", 2 * m),
        ));
    }
    Ok(raw.enabled.then_some(VectorIndexes { m, ef_construction }))
}

fn model(path: &str, raw: RawModel) -> Result<ModelSpec, ConfigError> {
    let (name, dimensions, price, deployment) = match raw {
        RawModel::Name(name) => (name, None, None, None),
        RawModel::Spec(spec) => (spec.name, spec.dimensions, spec.price_per_million_tokens, spec.deployment),
    };
    let deployment = deployment.map(|d| Deployment::parse(&d)).transpose().map_err(|e| ConfigError::at(format!("{path}.deployment"), e))?;
    let price = match price {
        Some(p) if !(p.is_finite() && p >= 0.0) => {
            return Err(ConfigError::at(
                format!("{path}.pricePerMillionTokens"),
                format!("{p} is not a price: use a number of US dollars, 0 or more"),
            ))
        }
        Some(p) => p,
        None => default_price(&name).unwrap_or(0.0),
    };
    if name.trim().is_empty() {
        return Err(ConfigError::at(path, "model name is empty"));
    }
    let native = native_dimensions(&name);
    let dims = match (dimensions, native) {
        (Some(0), _) => return Err(ConfigError::at(format!("{path}.dimensions"), "must be at least 1")),
        (Some(d), Some(n)) if d > n => {
            return Err(ConfigError::at(format!("{path}.dimensions"), format!("{d} is more than {name} produces ({n})")))
        }
        (Some(d), _) if d > 16000 => {
            return Err(ConfigError::at(format!("{path}.dimensions"), format!("{d} is more than pgvector stores (16000)")))
        }
        (Some(d), _) => d,
        (None, Some(n)) => n,
        (None, None) => {
            return Err(ConfigError::at(
                path,
                format!("unknown model {name:?}: give its vector size as {{\"name\": {name:?}, \"dimensions\": N}}"),
            ))
        }
    };
    Ok(ModelSpec { name, dimensions: dims, explicit_dimensions: dimensions.is_some(), price_per_million: price, deployment })
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};

    const GOOD: &str = r#"{ "version": "1.0",
      "models": { "large": "text-embedding-3-large", "small": "text-embedding-3-small" },
      "batchSize": 100,
      "sources": [
        { "name": "Option Descriptions", "table": "config_option", "column": "description", "enabled": true },
        { "name": "Attribute Labels", "table": "config_position", "column": "attribute_label", "enabled": true },
        { "name": "HTB Attribute Names", "table": "htb_attribute_mapping_zebra_provided", "column": "attribute_name_for_htb", "enabled": true } ] }"#;

    fn check(json: &str, expect: Expect) {
        let actual = match Config::parse(json) {
            Ok(c) => {
                let sources: Vec<String> = c
                    .sources
                    .iter()
                    .map(|s| format!("{} {}.{}{}", s.name, s.table.quoted(), s.column.quoted(), if s.enabled { "" } else { " (disabled)" }))
                    .collect();
                format!(
                    "ok large={}/{} small={}/{} batch={}\n{}",
                    c.models.large.name(),
                    c.models.large.dimensions(),
                    c.models.small.name(),
                    c.models.small.dimensions(),
                    c.batch_size.get(),
                    sources.join("\n")
                )
            }
            Err(e) => format!("err {e}"),
        };
        expect.assert_eq(&actual);
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "{replace}");
        GOOD.replacen(replace, by, 1)
    }

    #[test]
    fn the_shipped_config_parses() {
        let shipped = include_str!("../../../embedding-sources.json");
        assert!(Config::parse(shipped).is_ok(), "{:?}", Config::parse(shipped));
        check(
            GOOD,
            expect![[r#"
            ok large=text-embedding-3-large/3072 small=text-embedding-3-small/1536 batch=100
            Option Descriptions "config_option"."description"
            Attribute Labels "config_position"."attribute_label"
            HTB Attribute Names "htb_attribute_mapping_zebra_provided"."attribute_name_for_htb""#]],
        );
    }

    #[test]
    fn batch_api() {
        let parse = |by: &str| Config::parse(&with(r#""batchSize": 100,"#, &format!(r#""batchSize": 100, {by}"#))).map(|c| c.batch_api);
        assert_eq!(Config::parse(GOOD).unwrap().batch_api, None);
        assert_eq!(parse(r#""batchApi": null,"#).unwrap(), None);
        assert_eq!(parse(r#""batchApi": {"enabled": true},"#).unwrap(), Some(BatchApi { min_values: DEFAULT_BATCH_API_MIN_VALUES }));
        assert_eq!(parse(r#""batchApi": {"enabled": true, "minValues": 3},"#).unwrap(), Some(BatchApi { min_values: 3 }));
        assert_eq!(parse(r#""batchApi": {"enabled": false, "minValues": 3},"#).unwrap(), None);
        // Checked also when disabled, so a mistake shows before it is switched on.
        let err = parse(r#""batchApi": {"enabled": false, "minValues": 0},"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batchApi.minValues: must be at least 1 (the fewest pending values of a model that go through the Batch API)"
        );
    }

    #[test]
    fn options() {
        check(
            r#"{"version":"1.0","models":{"large":{"name":"text-embedding-3-large","dimensions":1024},"small":"text-embedding-3-small"},
                "sources":[{"name":"A","table":"app.items","column":"title","enabled":false}]}"#,
            expect![[r#"
                ok large=text-embedding-3-large/1024 small=text-embedding-3-small/1536 batch=100
                A "app"."items"."title" (disabled)"#]],
        );
    }

    #[test]
    fn changes_and_reconcile_every() {
        let parse = |extra: &str| {
            Config::parse(&with(r#""column": "description", "enabled": true"#, &format!(r#""column": "description"{extra}"#)))
                .map(|c| c.sources[0].changes)
        };
        assert_eq!(parse(""), Ok(Changes::Scan));
        assert_eq!(parse(r#", "changes": "scan""#), Ok(Changes::Scan));
        assert_eq!(parse(r#", "changes": "capture""#), Ok(Changes::Capture { reconcile_every_secs: 86_400 }));
        assert_eq!(parse(r#", "changes": "capture", "reconcileEvery": "90s""#), Ok(Changes::Capture { reconcile_every_secs: 90 }));
        assert_eq!(parse(r#", "changes": "capture", "reconcileEvery": "30m""#), Ok(Changes::Capture { reconcile_every_secs: 1800 }));
        assert_eq!(parse(r#", "changes": "capture", "reconcileEvery": "7d""#), Ok(Changes::Capture { reconcile_every_secs: 604_800 }));
        assert_eq!([86_400, 7200, 1800, 90].map(duration_text), ["1d", "2h", "30m", "90s"]);
        let err = |extra: &str| parse(extra).unwrap_err().to_string();
        assert_eq!(err(r#", "changes": "triggers""#), r#"sources[0].changes: "triggers" is not a mode: use "scan" or "capture""#);
        for bad in ["0h", "24", "h", "1.5h", "-1h", "24 hours", ""] {
            assert_eq!(
                err(&format!(r#", "changes": "capture", "reconcileEvery": "{bad}""#)),
                format!(r#"sources[0].reconcileEvery: "{bad}" is not a duration: write a whole number and s, m, h or d, e.g. "24h""#),
            );
        }
    }

    #[test]
    fn rejections() {
        check(&with(r#""batchSize": 100,"#, r#""batchSize": 100, "extra": 1,"#), expect!["err extra: unknown field `extra`, expected one of `$schema`, `version`, `models`, `batchSize`, `maxTokensPerRun`, `maxDeleteShare`, `massDeleteMinimum`, `vectorIndexes`, `retention`, `rate`, `batchApi`, `sources` at line 3 column 31"]);
        check(
            &with(r#", "enabled": true },"#, r#", "enabled": true, "colour": "red" },"#),
            expect![
                "err sources[0].colour: unknown field `colour`, expected one of `name`, `table`, `column`, `enabled`, `allowMassDelete`, `changes`, `reconcileEvery` at line 5 column 117"
            ],
        );
        check(&with(r#""table": "config_position", "#, ""), expect!["err sources[1]: missing field `table` at line 6 column 84"]);
        check(
            &with(r#""batchSize": 100"#, r#""batchSize": 0"#),
            expect!["err batchSize: 0 is out of range: use 1..=2048 (the provider takes at most 2048 inputs per request)"],
        );
        check(
            &with(r#""batchSize": 100"#, r#""batchSize": 5000"#),
            expect!["err batchSize: 5000 is out of range: use 1..=2048 (the provider takes at most 2048 inputs per request)"],
        );
        check(
            &with(r#""batchSize": 100"#, r#""batchSize": -1"#),
            expect!["err batchSize: invalid value: integer `-1`, expected u64 at line 3 column 21"],
        );
        check(
            &with("config_position", "x; drop table y"),
            expect![[
                r#"err sources[1].table: "x; drop table y" is not a valid identifier: ';' is not allowed (use letters, digits, _ and $, starting with a letter or _)"#
            ]],
        );
        check(&with("attribute_label", "label\"--"), expect!["err sources[1].?: expected `,` or `}` at line 6 column 84"]);
        check(
            &with(
                "\"Attribute Labels\", \"table\": \"config_position\", \"column\": \"attribute_label\"",
                "\"Other\", \"table\": \"config_option\", \"column\": \"description\"",
            ),
            expect!["err sources[1].column: duplicate source config_option.description: each table/column pair may be listed once"],
        );
        check(
            &with("Attribute Labels", "Option Descriptions"),
            expect![[r#"err sources[1].name: duplicate source name "Option Descriptions": names must be unique"#]],
        );
        check(
            &with(r#""version": "1.0""#, r#""version": "2.0""#),
            expect![[r#"err version: unsupported version "2.0": this build reads version 1.x"#]],
        );
        check(
            &with("text-embedding-3-small", "my-model"),
            expect![[r#"err models.small: unknown model "my-model": give its vector size as {"name": "my-model", "dimensions": N}"#]],
        );
        check(
            &with(r#""text-embedding-3-small""#, r#"{"name":"text-embedding-3-small","dimensions":4096}"#),
            expect!["err models.small.dimensions: 4096 is more than text-embedding-3-small produces (1536)"],
        );
        check(
            r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},"sources":[]}"#,
            expect!["err sources: is empty: list at least one source"],
        );
        check("{", expect!["err ?: EOF while parsing an object at line 1 column 1"]);
    }
}
