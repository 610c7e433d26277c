//! Structured log events: one JSON object per line.
//!
//! Workers Logs indexes the fields of JSON log lines, so a run can be followed by `runId` and
//! filtered by `event` (`batch`, `source`, `report`, `retry`, ...) or `level`; `message` keeps
//! the line readable as text (`Batch 3 of 12: Option Descriptions (100 values)`). The core
//! builds events and the worker's [`Runtime`](crate::sync::Runtime) writes them.

use serde::Serialize;
use serde_json::{Map, Value};

/// How serious an event is; the worker writes `warn` and `error` with `console.warn` and
/// `console.error`, so Workers Logs shows their level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Progress.
    Info,
    /// Something was skipped or retried; the run goes on.
    Warn,
    /// Something failed.
    Error,
}

/// One log event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEvent {
    /// How serious it is.
    pub level: Level,
    /// What kind of event: `batch`, `source`, `report`, `retry`, ...
    pub event: &'static str,
    /// The run it belongs to, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The line for people.
    pub message: String,
    /// Event-specific fields (`source`, `batch`, `of`, `report`, ...).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl LogEvent {
    /// A new event.
    pub fn new(level: Level, event: &'static str, message: impl Into<String>) -> LogEvent {
        LogEvent { level, event, run_id: None, message: message.into(), fields: Map::new() }
    }

    /// An `info` event.
    pub fn info(event: &'static str, message: impl Into<String>) -> LogEvent {
        LogEvent::new(Level::Info, event, message)
    }

    /// A `warn` event.
    pub fn warn(event: &'static str, message: impl Into<String>) -> LogEvent {
        LogEvent::new(Level::Warn, event, message)
    }

    /// An `error` event.
    pub fn error(event: &'static str, message: impl Into<String>) -> LogEvent {
        LogEvent::new(Level::Error, event, message)
    }

    /// Tags the event with its run.
    pub fn run(mut self, run_id: &str) -> LogEvent {
        self.run_id = Some(run_id.to_owned());
        self
    }

    /// Adds a field; the reserved names (`level`, `event`, `runId`, `message`) are refused.
    ///
    /// # Panics
    /// On a reserved name or a value that does not serialise: both are bugs in the caller.
    pub fn field(mut self, name: &str, value: impl Serialize) -> LogEvent {
        assert!(!["level", "event", "runId", "message"].contains(&name), "{name} is a reserved log field");
        self.fields.insert(name.to_owned(), serde_json::to_value(value).expect("log fields serialise"));
        self
    }

    /// The event as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("log events serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line_of_json_with_its_fields() {
        let e = LogEvent::info("batch", "Batch 3 of 12: A \"quoted\"\n(2 values)")
            .run("run-1")
            .field("batch", 3)
            .field("of", 12)
            .field("source", "A");
        expect_test::expect![[r#"{"level":"info","event":"batch","runId":"run-1","message":"Batch 3 of 12: A \"quoted\"\n(2 values)","batch":3,"of":12,"source":"A"}"#]]
            .assert_eq(&e.to_json());
        assert!(!e.to_json().contains('\n'));
        let e = LogEvent::error("failed", "no run");
        assert_eq!(e.to_json(), r#"{"level":"error","event":"failed","message":"no run"}"#);
    }

    #[test]
    #[should_panic(expected = "reserved")]
    fn reserved_field_names_are_refused() {
        let _ = LogEvent::info("x", "y").field("runId", "z");
    }
}
