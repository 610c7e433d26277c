//! The request log read by tests through `/_admin/requests`.

use serde::{Deserialize, Serialize};

use crate::azure::AzureFacts;
use crate::ratelimit::Snapshot;

/// One embeddings request as the provider saw and answered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    /// Sequence number among embeddings requests since the last reset (from 1).
    pub seq: u64,
    pub path: String,
    /// `model` as sent, if it was a string.
    pub model: Option<String>,
    /// `input` as sent, as a list.
    pub inputs: Vec<String>,
    /// `dimensions` as sent, if it was an integer.
    pub dimensions: Option<i64>,
    /// `encoding_format` as sent (`null` when absent).
    pub encoding_format: Option<String>,
    /// The status code answered (0: the connection was dropped without an answer).
    pub status: u16,
    /// The fault rule that fired, e.g. `rules[0]: status 429`.
    pub fault: Option<String>,
    /// Whether the `Authorization` header (in Azure mode, the `api-key` header) was accepted.
    pub authorized: bool,
    /// The API key sent (bearer token; in Azure mode the `api-key` header), masked as OpenAI
    /// masks keys in its messages (`sk-***...wxyz`); `null` when none was sent.
    #[serde(default)]
    pub key: Option<String>,
    /// The request's input tokens as the rate limit counts them (`usage.prompt_tokens`), for a
    /// valid request.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// In the rate-limit mode: the limits and what was left after the request.
    #[serde(default)]
    pub rate_limit: Option<Snapshot>,
    /// When the request arrived (its body read), in milliseconds since the Unix epoch.
    #[serde(default)]
    pub started_ms: u64,
    /// When its answer was sent, after the latency (`null` while it waits).
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// In Azure mode: the deployment, `api-version` and which key headers were sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureFacts>,
}

/// A sequence number handed out when a request arrives. It carries the log
/// generation so that a request still running across a reset does not land
/// in the new log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    pub seq: u64,
}

/// The in-memory request log.
#[derive(Debug, Default)]
pub struct RequestLog {
    generation: u64,
    last_seq: u64,
    entries: Vec<LogEntry>,
}

impl RequestLog {
    /// Hands out the next sequence number.
    pub fn begin(&mut self) -> Ticket {
        self.last_seq += 1;
        Ticket { generation: self.generation, seq: self.last_seq }
    }

    /// Records the entry of a request (its `seq` is taken from the ticket).
    /// Returns false if the log was reset since the ticket was handed out.
    pub fn record(&mut self, ticket: Ticket, mut entry: LogEntry) -> bool {
        if ticket.generation != self.generation {
            return false;
        }
        entry.seq = ticket.seq;
        // Requests finish out of order when they run concurrently; keep the
        // log sorted by sequence number.
        let position = self.entries.partition_point(|e| e.seq < entry.seq);
        self.entries.insert(position, entry);
        true
    }

    /// Sets the end time of a recorded request. Returns false if the log was
    /// reset since the ticket was handed out.
    pub fn finish(&mut self, ticket: Ticket, ended_ms: u64) -> bool {
        if ticket.generation != self.generation {
            return false;
        }
        match self.entries.binary_search_by_key(&ticket.seq, |entry| entry.seq) {
            Ok(position) => {
                self.entries[position].ended_ms = Some(ended_ms);
                true
            }
            Err(_) => false,
        }
    }

    /// The recorded entries, by sequence number.
    pub fn entries(&self) -> &[LogEntry] {
        &self.entries
    }

    /// Drops all entries and restarts sequence numbers at 1. Returns how many
    /// entries were dropped.
    pub fn reset(&mut self) -> usize {
        let dropped = self.entries.len();
        self.entries.clear();
        self.last_seq = 0;
        self.generation += 1;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: u16) -> LogEntry {
        LogEntry {
            seq: 0,
            path: "/v1/embeddings".into(),
            model: Some("m".into()),
            inputs: vec!["a".into()],
            dimensions: None,
            encoding_format: None,
            status,
            fault: None,
            authorized: true,
            key: None,
            tokens: Some(1),
            rate_limit: None,
            started_ms: 5,
            ended_ms: None,
            azure: None,
        }
    }

    #[test]
    fn sequence_numbers_order_and_reset() {
        let mut log = RequestLog::default();
        let first = log.begin();
        let second = log.begin();
        assert_eq!((first.seq, second.seq), (1, 2));
        assert!(log.record(second, entry(500)));
        assert!(log.record(first, entry(200)));
        let seqs: Vec<_> = log.entries().iter().map(|e| (e.seq, e.status)).collect();
        assert_eq!(seqs, [(1, 200), (2, 500)]);

        let in_flight = log.begin();
        assert_eq!(log.reset(), 2);
        assert!(!log.record(in_flight, entry(200)), "stale ticket must be dropped");
        assert!(log.entries().is_empty());
        let fresh = log.begin();
        assert_eq!(fresh.seq, 1);
        assert!(log.record(fresh, entry(200)));
        assert_eq!(log.entries().len(), 1);
        assert!(log.finish(fresh, 9));
        assert_eq!(log.entries()[0].ended_ms, Some(9));
        assert!(!log.finish(in_flight, 10), "stale ticket");
    }

    #[test]
    fn serialises_in_camel_case() {
        let value = serde_json::to_value(entry(200)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"seq":0,"path":"/v1/embeddings","model":"m","inputs":["a"],
                "dimensions":null,"encodingFormat":null,"status":200,"fault":null,"authorized":true,
                "key":null,"tokens":1,"rateLimit":null,"startedMs":5,"endedMs":null})
        );
    }
}
