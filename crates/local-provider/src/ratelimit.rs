//! The rate-limit mode: per-minute request and token limits per API key and model, enforced the
//! way OpenAI describes its limiter, with its `x-ratelimit-*` headers and its 429 answers.
//!
//! # What is modelled
//!
//! OpenAI limits requests per minute (RPM) and tokens per minute (TPM) per organisation and
//! model. Its guide describes the limit as replenishing: capacity used comes back continuously
//! over the minute rather than all at once at a window's end, and the `x-ratelimit-reset-*`
//! headers are "the time until the rate limit (based on requests / tokens) resets to its
//! initial state". So each (API key, model) pair has two buckets:
//!
//! * a request bucket of capacity `rpm` and a token bucket of capacity `tpm`, full at first;
//! * each refills continuously at `capacity / 60 s` (a 3000 RPM bucket gets a request back every
//!   20 ms) and never beyond its capacity;
//! * a request is admitted when its bucket holds at least 1 request and the token bucket at
//!   least the request's tokens; it then takes 1 and its tokens. For embeddings the tokens are
//!   the input tokens (`usage.prompt_tokens`), as OpenAI counts them: there is no output;
//! * a refused request gets a 429 `rate_limit_exceeded` whose message names the limit that
//!   refused it (requests first), with OpenAI's wording and "Please try again in ..." the time
//!   until the buckets hold enough for it, also sent as `retry-after` (whole seconds, rounded up)
//!   and `retry-after-ms`. OpenAI says unsuccessful requests count against the per-minute limit:
//!   a refused request takes one request from the bucket if one is there, and no tokens (so a
//!   client that waits as told is admitted);
//! * a request needing more tokens than `tpm` can never pass: 429 "Request too large ... The
//!   input or output tokens must be reduced in order to run successfully.", without a
//!   `retry-after`;
//! * every answer of the mode carries `x-ratelimit-limit-*` (the capacities),
//!   `x-ratelimit-remaining-*` (what the buckets hold after the request, rounded down) and
//!   `x-ratelimit-reset-*` (how long until they are full again), the durations in OpenAI's Go
//!   format (`20ms`, `1s`, `9.816s`, `6m0s`).
//!
//! Not modelled: OpenAI's quantisation of limits into shorter periods (it may enforce 60,000 RPM
//! as 1,000 per second), organisation-wide limits shared between keys, and limits shared
//! between models. The clock is a parameter, so the arithmetic is tested without waiting.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, RATE_LIMIT_REQUESTS, RATE_LIMIT_TOKENS};

/// A minute: the period the limits are given for.
const MINUTE: Duration = Duration::from_secs(60);

/// Limits of one model (or the defaults), as given on the command line or to
/// `/_admin/ratelimit`. An absent limit falls back to the default one, then to OpenAI's generous
/// values this provider has always announced ([`RATE_LIMIT_REQUESTS`], [`RATE_LIMIT_TOKENS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
}

/// The rate-limit settings: whether the mode is on, the default limits and per-model ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Whether limits are enforced. Off, answers carry fixed generous headers (see
    /// [`crate::app`]).
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Requests per minute of every model without its own (default 10,000).
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute of every model without its own (default 10,000,000).
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Per-model limits, by model name.
    #[serde(default)]
    pub models: BTreeMap<String, Limits>,
}

fn enabled_by_default() -> bool {
    true
}

impl RateLimitConfig {
    /// Checks that every given limit is at least 1.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |what: &str, value: Option<u64>| match value {
            Some(0) => Err(format!("{what} must be at least 1")),
            _ => Ok(()),
        };
        positive("rpm", self.rpm)?;
        positive("tpm", self.tpm)?;
        for (model, limits) in &self.models {
            positive(&format!("models.{model}.rpm"), limits.rpm)?;
            positive(&format!("models.{model}.tpm"), limits.tpm)?;
        }
        Ok(())
    }

    /// The (requests, tokens) per minute that apply to `model`.
    pub fn limits_of(&self, model: &str) -> (u64, u64) {
        let own = self.models.get(model).copied().unwrap_or_default();
        (own.rpm.or(self.rpm).unwrap_or(RATE_LIMIT_REQUESTS), own.tpm.or(self.tpm).unwrap_or(RATE_LIMIT_TOKENS))
    }
}

/// A continuously refilling bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: u64, now: Instant) -> Self {
        Bucket { capacity: capacity as f64, level: capacity as f64, updated: now }
    }

    /// Units regained per second.
    fn rate(&self) -> f64 {
        self.capacity / MINUTE.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.rate()).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// How long until the bucket holds `amount` (zero when it does).
    fn time_until(&self, amount: f64) -> Duration {
        let missing = amount - self.level;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate())
        }
    }

    /// What is left, rounded down, as the `remaining` headers say it.
    fn remaining(&self) -> u64 {
        self.level.max(0.0).floor() as u64
    }

    /// What has been taken and not yet regained, rounded up ("Used" in OpenAI's message).
    fn used(&self) -> u64 {
        (self.capacity - self.level).max(0.0).ceil() as u64
    }
}

/// The buckets of one API key and model.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    requests: Bucket,
    tokens: Bucket,
}

/// The rate-limit state a request leaves behind, for its headers and the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub limit_requests: u64,
    pub limit_tokens: u64,
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
    /// Until the request bucket is full again.
    #[serde(with = "millis")]
    pub reset_requests: Duration,
    /// Until the token bucket is full again.
    #[serde(with = "millis")]
    pub reset_tokens: Duration,
}

/// Durations in the log as (fractional) milliseconds.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64((value.as_secs_f64() * 1e6).round() / 1e3)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(deserializer)?;
        Ok(Duration::from_secs_f64(ms.max(0.0) / 1e3))
    }
}

impl Snapshot {
    /// The six `x-ratelimit-*` headers, in OpenAI's formats.
    pub fn headers(&self) -> [(&'static str, String); 6] {
        [
            ("x-ratelimit-limit-requests", self.limit_requests.to_string()),
            ("x-ratelimit-limit-tokens", self.limit_tokens.to_string()),
            ("x-ratelimit-remaining-requests", self.remaining_requests.to_string()),
            ("x-ratelimit-remaining-tokens", self.remaining_tokens.to_string()),
            ("x-ratelimit-reset-requests", go_duration(self.reset_requests)),
            ("x-ratelimit-reset-tokens", go_duration(self.reset_tokens)),
        ]
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// The request alone needs more tokens than the per-minute limit.
    TooLarge,
}

impl Exceeded {
    /// The request log's `fault` for a refusal.
    pub fn description(self) -> &'static str {
        match self {
            Exceeded::Requests => "rateLimit: requests",
            Exceeded::Tokens => "rateLimit: tokens",
            Exceeded::TooLarge => "rateLimit: request too large",
        }
    }
}

/// A refused request: why, and how long until it would pass (`None`: never).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub exceeded: Exceeded,
    pub retry_in: Option<Duration>,
    /// The "Used" figure of the message (of the limit that refused).
    pub used: u64,
    /// The "Requested" figure (1 request, or the request's tokens).
    pub requested: u64,
}

impl Refusal {
    /// OpenAI's 429 for this refusal (the `x-ratelimit-*` headers are added apart).
    pub fn error(&self, model: &str, snapshot: &Snapshot) -> ApiError {
        let org = "org-local-provider";
        let (kind, per_min, limit) = match self.exceeded {
            Exceeded::Requests => ("requests", "requests per min (RPM)", snapshot.limit_requests),
            Exceeded::Tokens | Exceeded::TooLarge => ("tokens", "tokens per min (TPM)", snapshot.limit_tokens),
        };
        let learn = "Visit https://platform.openai.com/account/rate-limits to learn more.";
        let message = match self.retry_in {
            Some(wait) => format!(
                "Rate limit reached for {model} in organization {org} on {per_min}: Limit {limit}, \
                 Used {}, Requested {}. Please try again in {}. {learn}",
                self.used,
                self.requested,
                go_duration(wait)
            ),
            None => format!(
                "Request too large for {model} in organization {org} on {per_min}: Limit {limit}, \
                 Requested {}. The input or output tokens must be reduced in order to run \
                 successfully. {learn}",
                self.requested
            ),
        };
        ApiError { status: 429, message, kind, param: None, code: Some("rate_limit_exceeded") }
    }

    /// The `retry-after` (whole seconds, rounded up) and `retry-after-ms` headers, when there
    /// is a wait that would help.
    pub fn retry_headers(&self) -> Option<[(&'static str, String); 2]> {
        let wait = self.retry_in?;
        let ms = (wait.as_secs_f64() * 1e3).ceil() as u64;
        Some([("retry-after", ms.div_ceil(1000).max(1).to_string()), ("retry-after-ms", ms.max(1).to_string())])
    }
}

/// The outcome of [`RateLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The buckets after the request.
    pub snapshot: Snapshot,
    /// `Some` when the request is refused.
    pub refusal: Option<Refusal>,
}

/// The limiter: settings and one pair of buckets per (API key, model).
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    config: RateLimitConfig,
    buckets: HashMap<(String, String), Buckets>,
}

impl RateLimiter {
    /// A limiter with these settings and full buckets.
    pub fn new(config: RateLimitConfig) -> Self {
        RateLimiter { config, buckets: HashMap::new() }
    }

    /// The settings.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Whether limits are enforced.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Admits or refuses a request of `tokens` input tokens by `key` for `model` at `now`, and
    /// takes what it uses from the buckets.
    pub fn check(&mut self, now: Instant, key: &str, model: &str, tokens: u64) -> Decision {
        let (rpm, tpm) = self.config.limits_of(model);
        let buckets = self
            .buckets
            .entry((key.to_string(), model.to_string()))
            .or_insert_with(|| Buckets { requests: Bucket::full(rpm, now), tokens: Bucket::full(tpm, now) });
        buckets.requests.refill(now);
        buckets.tokens.refill(now);
        let wanted = tokens as f64;
        let refusal = if tokens > tpm {
            Some(Refusal { exceeded: Exceeded::TooLarge, retry_in: None, used: buckets.tokens.used(), requested: tokens })
        } else if buckets.requests.level < 1.0 {
            Some(Refusal {
                exceeded: Exceeded::Requests,
                retry_in: Some(buckets.requests.time_until(1.0).max(buckets.tokens.time_until(wanted))),
                used: buckets.requests.used(),
                requested: 1,
            })
        } else if buckets.tokens.level < wanted {
            Some(Refusal {
                exceeded: Exceeded::Tokens,
                retry_in: Some(buckets.tokens.time_until(wanted)),
                used: buckets.tokens.used(),
                requested: tokens,
            })
        } else {
            None
        };
        match refusal {
            None => {
                buckets.requests.level -= 1.0;
                buckets.tokens.level -= wanted;
            }
            // An unsuccessful request counts against the request limit, when there is room.
            Some(_) if buckets.requests.level >= 1.0 => buckets.requests.level -= 1.0,
            Some(_) => {}
        }
        let snapshot = Snapshot {
            limit_requests: rpm,
            limit_tokens: tpm,
            remaining_requests: buckets.requests.remaining(),
            remaining_tokens: buckets.tokens.remaining(),
            reset_requests: buckets.requests.time_until(buckets.requests.capacity),
            reset_tokens: buckets.tokens.time_until(buckets.tokens.capacity),
        };
        Decision { snapshot, refusal }
    }
}

/// A duration as Go prints it, to the millisecond, which is how OpenAI's headers and messages
/// show them: `0s`, `20ms`, `1s`, `9.816s`, `6m0s`, `1h0m0.5s`. Parts of a millisecond are
/// rounded up, so a wait is never announced shorter than it is.
pub fn go_duration(duration: Duration) -> String {
    let total_ms = (duration.as_secs_f64() * 1e3).ceil() as u64;
    if total_ms == 0 {
        return "0s".to_string();
    }
    if total_ms < 1000 {
        return format!("{total_ms}ms");
    }
    let hours = total_ms / 3_600_000;
    let minutes = total_ms / 60_000 % 60;
    let seconds = total_ms / 1000 % 60;
    let millis = total_ms % 1000;
    let mut text = String::new();
    if hours > 0 {
        let _ = write!(text, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(text, "{minutes}m");
    }
    let _ = write!(text, "{seconds}");
    if millis > 0 {
        let fraction = format!("{millis:03}");
        let _ = write!(text, ".{}", fraction.trim_end_matches('0'));
    }
    text.push('s');
    text
}

/// Parses a `--rpm` / `--tpm` value: `N` (every model) or `MODEL=N`. Returns the model, if
/// named, and the limit.
pub fn parse_limit_arg(text: &str) -> Result<(Option<String>, u64), String> {
    let (model, number) = match text.split_once('=') {
        Some((model, number)) => (Some(model.to_string()), number),
        None => (None, text),
    };
    if let Some(model) = &model {
        if crate::api::Model::from_name(model).is_none() {
            return Err(format!("unknown model {model:?}"));
        }
    }
    match number.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("not a positive number: {number:?}")),
        Ok(n) => Ok((model, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "text-embedding-3-small";

    fn limiter(rpm: u64, tpm: u64) -> RateLimiter {
        RateLimiter::new(RateLimitConfig { enabled: true, rpm: Some(rpm), tpm: Some(tpm), models: BTreeMap::new() })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_durations() {
        let cases = [
            (0, "0s"),
            (1, "1ms"),
            (20, "20ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (9816, "9.816s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (61_020, "1m1.02s"),
            (3_600_500, "1h0m0.5s"),
        ];
        for (millis, text) in cases {
            assert_eq!(go_duration(ms(millis)), text, "{millis} ms");
            let parsed = embsync_reset(text);
            assert_eq!(parsed, ms(millis), "{text} parses back");
        }
        // A part of a millisecond rounds up.
        assert_eq!(go_duration(Duration::from_micros(19_001)), "20ms");
    }

    /// The worker's parser of these headers (`embsync_core::provider::parse_reset`), restated
    /// here so that the formats are checked against what it accepts without a dependency.
    fn embsync_reset(text: &str) -> Duration {
        let mut total = 0.0;
        let mut rest = text;
        while !rest.is_empty() {
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap();
            let value: f64 = rest[..end].parse().unwrap();
            rest = &rest[end..];
            let unit_end = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            total += value
                * match &rest[..unit_end] {
                    "ms" => 0.001,
                    "s" => 1.0,
                    "m" => 60.0,
                    "h" => 3600.0,
                    unit => panic!("unit {unit:?}"),
                };
            rest = &rest[unit_end..];
        }
        Duration::from_secs_f64(total)
    }

    #[test]
    fn requests_run_out_and_replenish_continuously() {
        let t0 = Instant::now();
        let mut rl = limiter(3, 1_000);
        for left in [2, 1, 0] {
            let d = rl.check(t0, "k", MODEL, 10);
            assert_eq!(d.refusal, None);
            assert_eq!(d.snapshot.remaining_requests, left);
        }
        let refused = rl.check(t0, "k", MODEL, 10);
        let refusal = refused.refusal.expect("a fourth request in the same instant");
        assert_eq!(refusal.exceeded, Exceeded::Requests);
        // 3 RPM: one request comes back every 20 s.
        assert_eq!(refusal.retry_in, Some(Duration::from_secs(20)));
        assert_eq!((refusal.used, refusal.requested), (3, 1));
        assert_eq!(refused.snapshot.reset_requests, Duration::from_secs(60));
        // A refused request took no tokens.
        assert_eq!(refused.snapshot.remaining_tokens, 970);
        // 19.9 s later: still not a whole request.
        assert!(rl.check(t0 + ms(19_900), "k", MODEL, 10).refusal.is_some());
        // At 20 s it passes, and the bucket is empty again.
        let d = rl.check(t0 + ms(20_000), "k", MODEL, 10);
        assert_eq!(d.refusal, None);
        assert_eq!(d.snapshot.remaining_requests, 0);
        // Tokens refilled meanwhile (1000/min over 20 s = 333.3), capped at the capacity.
        assert_eq!(d.snapshot.remaining_tokens, 990);
    }

    #[test]
    fn tokens_run_out_and_say_when_to_retry() {
        let t0 = Instant::now();
        let mut rl = limiter(1_000, 600);
        assert_eq!(rl.check(t0, "k", MODEL, 500).refusal, None);
        let d = rl.check(t0, "k", MODEL, 150);
        let refusal = d.refusal.unwrap();
        assert_eq!(refusal.exceeded, Exceeded::Tokens);
        // 600 TPM = 10 tokens/s; 50 missing: 5 s.
        assert_eq!(refusal.retry_in, Some(Duration::from_secs(5)));
        assert_eq!((refusal.used, refusal.requested), (500, 150));
        // The refused request used a request, not tokens.
        assert_eq!(d.snapshot.remaining_requests, 998);
        assert_eq!(d.snapshot.remaining_tokens, 100);
        assert_eq!(d.snapshot.reset_tokens, Duration::from_secs(50));
        assert_eq!(refusal.retry_headers().unwrap(), [("retry-after", "5".into()), ("retry-after-ms", "5000".into())]);
        let error = refusal.error(MODEL, &d.snapshot);
        assert_eq!(error.kind, "tokens");
        assert_eq!(
            error.message,
            "Rate limit reached for text-embedding-3-small in organization org-local-provider on \
             tokens per min (TPM): Limit 600, Used 500, Requested 150. Please try again in 5s. \
             Visit https://platform.openai.com/account/rate-limits to learn more."
        );
        assert_eq!(rl.check(t0 + ms(5_000), "k", MODEL, 150).refusal, None);
    }

    #[test]
    fn a_request_over_the_token_limit_never_passes() {
        let t0 = Instant::now();
        let mut rl = limiter(10, 100);
        let d = rl.check(t0, "k", MODEL, 101);
        let refusal = d.refusal.unwrap();
        assert_eq!(refusal.exceeded, Exceeded::TooLarge);
        assert_eq!(refusal.retry_in, None);
        assert_eq!(refusal.retry_headers(), None);
        assert!(refusal.error(MODEL, &d.snapshot).message.starts_with("Request too large for text-embedding-3-small"));
        assert!(rl.check(t0 + Duration::from_secs(600), "k", MODEL, 101).refusal.is_some());
        assert_eq!(rl.check(t0, "k", MODEL, 100).refusal, None);
    }

    #[test]
    fn buckets_are_per_key_and_model_with_model_overrides() {
        let t0 = Instant::now();
        let mut config = RateLimitConfig { enabled: true, rpm: Some(1), tpm: None, models: BTreeMap::new() };
        config.models.insert("text-embedding-3-large".into(), Limits { rpm: Some(2), tpm: Some(50) });
        assert_eq!(config.limits_of(MODEL), (1, RATE_LIMIT_TOKENS));
        assert_eq!(config.limits_of("text-embedding-3-large"), (2, 50));
        let mut rl = RateLimiter::new(config);
        assert_eq!(rl.check(t0, "a", MODEL, 1).refusal, None);
        assert!(rl.check(t0, "a", MODEL, 1).refusal.is_some());
        assert_eq!(rl.check(t0, "b", MODEL, 1).refusal, None, "another key");
        let large = "text-embedding-3-large";
        assert_eq!(rl.check(t0, "a", large, 1).refusal, None, "another model");
        let d = rl.check(t0, "a", large, 1);
        assert_eq!(d.refusal, None);
        assert_eq!(d.snapshot.limit_tokens, 50);
        assert_eq!(d.snapshot.remaining_tokens, 48);
    }

    #[test]
    fn headers_in_openai_formats() {
        let t0 = Instant::now();
        let mut rl = limiter(3000, 1_000_000);
        let d = rl.check(t0, "k", MODEL, 24);
        let headers: Vec<(&str, String)> = d.snapshot.headers().into_iter().collect();
        assert_eq!(
            headers,
            [
                ("x-ratelimit-limit-requests", "3000".to_string()),
                ("x-ratelimit-limit-tokens", "1000000".into()),
                ("x-ratelimit-remaining-requests", "2999".into()),
                ("x-ratelimit-remaining-tokens", "999976".into()),
                ("x-ratelimit-reset-requests", "20ms".into()),
                // 24 tokens at 1,000,000/min: 1.44 ms.
                ("x-ratelimit-reset-tokens", "2ms".into()),
            ]
        );
    }

    #[test]
    fn configs_parse_and_validate() {
        let config: RateLimitConfig = serde_json::from_str(r#"{"rpm":3000,"models":{"text-embedding-3-large":{"tpm":5000}}}"#).unwrap();
        assert!(config.enabled);
        assert_eq!(config.limits_of("text-embedding-3-large"), (3000, 5000));
        assert!(config.validate().is_ok());
        let zero: RateLimitConfig = serde_json::from_str(r#"{"tpm":0}"#).unwrap();
        assert!(zero.validate().is_err());
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"rpn":1}"#).is_err());
        assert_eq!(parse_limit_arg("3000"), Ok((None, 3000)));
        assert_eq!(parse_limit_arg("text-embedding-3-small=5"), Ok((Some(MODEL.into()), 5)));
        for bad in ["0", "-1", "x", "gpt-4=5", "text-embedding-3-small="] {
            assert!(parse_limit_arg(bad).is_err(), "{bad}");
        }
    }
}
