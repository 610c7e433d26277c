//! Fault injection: the configuration set through `/_admin/faults` and the
//! selection of the rule that applies to an embeddings request.
//!
//! A rule matches a request when every selector it gives matches (`nth`,
//! `every`, `model`, `inputContains`; a rule without selectors matches every
//! request) and it has fired fewer than `times` times. The first matching rule
//! fires. Its effect is either an error `status` or a broken 200 `body`.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// The fault configuration, as posted to and returned by `/_admin/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultConfig {
    /// Extra delay before every embeddings answer, in milliseconds.
    #[serde(default, deserialize_with = "null_as_default")]
    pub latency_ms: u64,
    /// Extra delay per input of a request, in milliseconds (added to
    /// `--latency-per-input-ms`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub latency_per_input_ms: u64,
    /// Rules in priority order.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<FaultRule>,
    /// Overrides the `x-ratelimit-remaining-requests` header.
    #[serde(default)]
    pub remaining_requests: Option<u64>,
    /// Overrides the `x-ratelimit-remaining-tokens` header.
    #[serde(default)]
    pub remaining_tokens: Option<u64>,
    /// Answer requests with `encoding_format: "base64"` with a 400, like a
    /// compatible server that only speaks `float` (same as `--no-base64`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub reject_base64: bool,
}

/// One fault rule: selectors, a firing limit and an effect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRule {
    /// Effect: answer with this error status (400-599).
    pub status: Option<u16>,
    /// For 429s: the `retry-after` header (seconds).
    pub retry_after: Option<HeaderText>,
    /// For 429s: the `retry-after-ms` header (milliseconds).
    pub retry_after_ms: Option<HeaderText>,
    /// Selector: the request's sequence number is in this list.
    pub nth: Option<Vec<u64>>,
    /// Selector: the request's sequence number is a multiple of this.
    pub every: Option<u64>,
    /// Limit: fire at most this many times in total.
    pub times: Option<u64>,
    /// Selector: the request's model is exactly this.
    pub model: Option<String>,
    /// Selector: some input contains this substring.
    pub input_contains: Option<String>,
    /// Effect: answer 200 with a broken body, late, or not at all.
    pub body: Option<BodyFault>,
}

/// Ways to break a 200 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BodyFault {
    /// A truncated, unparsable JSON body.
    Malformed,
    /// One item fewer in `data` than there were inputs.
    WrongCount,
    /// Every vector one value short.
    WrongDims,
    /// Wait [`HANG_SECONDS`] before answering normally.
    Hang,
    /// Close the connection without an answer (after the latency).
    Drop,
}

/// How long a `hang` fault stalls the answer.
pub const HANG_SECONDS: u64 = 120;

impl BodyFault {
    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            BodyFault::Malformed => "malformed",
            BodyFault::WrongCount => "wrongCount",
            BodyFault::WrongDims => "wrongDims",
            BodyFault::Hang => "hang",
            BodyFault::Drop => "drop",
        }
    }
}

/// A header value given as a JSON string or number (`"1"` or `1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderText {
    Number(serde_json::Number),
    Text(String),
}

impl fmt::Display for HeaderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderText::Number(n) => write!(f, "{n}"),
            HeaderText::Text(text) => f.write_str(text),
        }
    }
}

/// Deserialises `null` as the type's default (so `"rules": null` is allowed).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// What a fired rule does to the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultEffect {
    /// Answer with an OpenAI-style error of this status.
    Status { status: u16, retry_after: Option<String>, retry_after_ms: Option<String> },
    /// Answer 200 with a broken body (or late).
    Body(BodyFault),
}

/// The facts about a request that selectors look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Sequence number of the embeddings request (from 1).
    pub seq: u64,
    pub model: &'a str,
    pub inputs: &'a [String],
}

impl FaultRule {
    /// Whether all selectors given by the rule match the request (the firing
    /// limit is checked separately).
    pub fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        let nth = self.nth.as_ref().is_none_or(|list| list.contains(&facts.seq));
        let every = self.every.is_none_or(|n| facts.seq.is_multiple_of(n));
        let model = self.model.as_ref().is_none_or(|model| model == facts.model);
        let input = self.input_contains.as_ref().is_none_or(|needle| facts.inputs.iter().any(|input| input.contains(needle.as_str())));
        nth && every && model && input
    }

    /// The rule's effect, or why the rule is invalid.
    fn effect(&self) -> Result<FaultEffect, String> {
        let header = |value: &Option<HeaderText>, name: &str| -> Result<Option<String>, String> {
            match value {
                None => Ok(None),
                Some(value) => {
                    let text = value.to_string();
                    if text.is_empty() || text.chars().any(char::is_control) {
                        Err(format!("{name} must be a non-empty value without control characters"))
                    } else {
                        Ok(Some(text))
                    }
                }
            }
        };
        if self.every == Some(0) {
            return Err("every must be at least 1".to_string());
        }
        match (self.status, self.body) {
            (Some(status), None) if (400..=599).contains(&status) => Ok(FaultEffect::Status {
                status,
                retry_after: header(&self.retry_after, "retryAfter")?,
                retry_after_ms: header(&self.retry_after_ms, "retryAfterMs")?,
            }),
            (Some(status), None) => Err(format!("status must be 400-599, got {status}")),
            (None, Some(body)) if self.retry_after.is_none() && self.retry_after_ms.is_none() => Ok(FaultEffect::Body(body)),
            (None, Some(_)) => Err("retryAfter and retryAfterMs need a status".to_string()),
            (Some(_), Some(_)) => Err("give either status or body, not both".to_string()),
            (None, None) => Err("give a status or a body".to_string()),
        }
    }
}

/// A rule that fired for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct FiredFault {
    /// Position of the rule in the configuration.
    pub rule_index: usize,
    pub effect: FaultEffect,
}

impl FiredFault {
    /// A description for the request log, e.g. `rules[0]: status 429`.
    pub fn description(&self) -> String {
        let what = match &self.effect {
            FaultEffect::Status { status, .. } => format!("status {status}"),
            FaultEffect::Body(body) => format!("body {}", body.name()),
        };
        format!("rules[{}]: {what}", self.rule_index)
    }
}

/// A validated configuration plus how often each rule has fired.
#[derive(Debug, Clone, Default)]
pub struct FaultState {
    config: FaultConfig,
    effects: Vec<FaultEffect>,
    fired: Vec<u64>,
}

impl FaultState {
    /// Validates `config`; the error names the offending rule.
    pub fn new(config: FaultConfig) -> Result<Self, String> {
        let effects = config
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| rule.effect().map_err(|err| format!("rules[{index}]: {err}")))
            .collect::<Result<Vec<_>, _>>()?;
        let fired = vec![0; effects.len()];
        Ok(FaultState { config, effects, fired })
    }

    /// The configuration as given.
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// How often each rule has fired, in rule order.
    pub fn fired_counts(&self) -> &[u64] {
        &self.fired
    }

    /// Picks the first rule that matches and has not used up its `times`,
    /// and counts it as fired.
    pub fn select(&mut self, facts: &RequestFacts<'_>) -> Option<FiredFault> {
        let rules = self.config.rules.iter().zip(&self.effects).zip(&mut self.fired);
        for (rule_index, ((rule, effect), fired)) in rules.enumerate() {
            let exhausted = rule.times.is_some_and(|times| *fired >= times);
            if !exhausted && rule.matches(facts) {
                *fired += 1;
                return Some(FiredFault { rule_index, effect: effect.clone() });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(json: &str) -> FaultState {
        let config: FaultConfig = serde_json::from_str(json).unwrap();
        FaultState::new(config).unwrap()
    }

    /// Runs requests 1..=n (model "m", one input) and returns which rule
    /// fired for each, as an index or `None`.
    fn run(state: &mut FaultState, inputs: &[&str]) -> Vec<Option<usize>> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let inputs = vec![input.to_string()];
                let facts = RequestFacts { seq: i as u64 + 1, model: "m", inputs: &inputs };
                state.select(&facts).map(|fired| fired.rule_index)
            })
            .collect()
    }

    #[test]
    fn parses_the_documented_example() {
        let config: FaultConfig = serde_json::from_str(
            r#"{"latencyMs":0,"rules":[{"status":429,"retryAfter":"1","retryAfterMs":null,
                "nth":[2,5],"every":null,"times":null,"model":null,"inputContains":null,"body":null}]}"#,
        )
        .unwrap();
        assert_eq!(config.rules[0].status, Some(429));
        assert_eq!(config.rules[0].retry_after, Some(HeaderText::Text("1".into())));
        let state = FaultState::new(config.clone()).unwrap();
        assert_eq!(state.effects[0], FaultEffect::Status { status: 429, retry_after: Some("1".into()), retry_after_ms: None });
        // Serialises back to an equivalent configuration.
        let round_trip: FaultConfig = serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
        let empty: FaultConfig = serde_json::from_str(r#"{"rules":null,"latencyMs":null}"#).unwrap();
        assert_eq!(empty, FaultConfig::default());
    }

    #[test]
    fn rejects_invalid_configs() {
        assert!(serde_json::from_str::<FaultConfig>(r#"{"rules":[{"statsu":429}]}"#).is_err());
        assert!(serde_json::from_str::<FaultConfig>(r#"{"rules":[{"body":"weird"}]}"#).is_err());
        for rules in [
            r#"[{}]"#,
            r#"[{"status":200}]"#,
            r#"[{"status":429,"body":"hang"}]"#,
            r#"[{"body":"hang","retryAfter":"1"}]"#,
            r#"[{"status":429,"every":0}]"#,
            r#"[{"status":429,"retryAfter":"1\r\nx: y"}]"#,
        ] {
            let config: FaultConfig = serde_json::from_str(&format!(r#"{{"rules":{rules}}}"#)).unwrap();
            let err = FaultState::new(config).unwrap_err();
            assert!(err.starts_with("rules[0]: "), "{rules}: {err}");
        }
        let numeric: FaultConfig = serde_json::from_str(r#"{"rules":[{"status":429,"retryAfter":2,"retryAfterMs":1500}]}"#).unwrap();
        let state = FaultState::new(numeric).unwrap();
        assert_eq!(
            state.effects[0],
            FaultEffect::Status { status: 429, retry_after: Some("2".into()), retry_after_ms: Some("1500".into()) }
        );
    }

    #[test]
    fn nth_selects_sequence_numbers() {
        let mut s = state(r#"{"rules":[{"status":500,"nth":[2,5]}]}"#);
        assert_eq!(run(&mut s, &["a"; 6]), [None, Some(0), None, None, Some(0), None]);
    }

    #[test]
    fn every_selects_multiples() {
        let mut s = state(r#"{"rules":[{"status":503,"every":3}]}"#);
        assert_eq!(run(&mut s, &["a"; 7]), [None, None, Some(0), None, None, Some(0), None]);
    }

    #[test]
    fn times_limits_firing_and_falls_through() {
        let mut s = state(r#"{"rules":[{"status":429,"times":2},{"body":"wrongCount","times":1}]}"#);
        assert_eq!(run(&mut s, &["a"; 5]), [Some(0), Some(0), Some(1), None, None]);
        assert_eq!(s.fired_counts(), [2, 1]);
    }

    #[test]
    fn input_contains_and_model_selectors() {
        let mut s = state(r#"{"rules":[{"status":400,"inputContains":"boom"},{"status":500,"model":"other"}]}"#);
        assert_eq!(run(&mut s, &["fine", "a boom b", "boo"]), [None, Some(0), None]);
        let inputs = vec!["x".to_string()];
        let other = RequestFacts { seq: 9, model: "other", inputs: &inputs };
        assert_eq!(s.select(&other).map(|f| f.description()), Some("rules[1]: status 500".into()));
    }

    #[test]
    fn all_selectors_must_match_and_first_rule_wins() {
        let mut s = state(r#"{"rules":[{"status":429,"every":2,"inputContains":"x"},{"body":"malformed","every":2}]}"#);
        assert_eq!(run(&mut s, &["x", "x", "y", "y"]), [None, Some(0), None, Some(1)]);
        let mut unconditional = state(r#"{"rules":[{"body":"hang"}]}"#);
        assert_eq!(run(&mut unconditional, &["a", "b"]), [Some(0), Some(0)]);
    }
}
