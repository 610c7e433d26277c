//! What `GET /status` answers: the KV cursor, the open run, the last finished runs and per-source
//! coverage. The worker gathers it (KV, Postgres); [`crate::html`] renders it for people and
//! `serde_json` for programs.

use crate::prune::LeftSource;
use crate::report::{RunReport, RunStatus, SourceReport, Trigger};
use crate::sync::Cursor;
use serde::Serialize;

/// The answer of `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The KV cursor of a paused run (a hint; Postgres holds the truth).
    pub cursor: CursorState,
    /// The run that has not finished yet, if any.
    pub current_run: Option<CurrentRun>,
    /// The last finished runs, newest first.
    pub last_runs: Vec<FinishedRun>,
    /// Coverage of each enabled source, in config order.
    pub sources: Vec<Coverage>,
    /// Names of the disabled sources.
    pub disabled: Vec<String>,
    /// Sources recorded in embsync's tables that no enabled source has (removed, renamed or
    /// disabled), with what they still hold; `POST /prune` removes them.
    pub left_config: Vec<LeftSource>,
    /// Cache rows embsync wrote that a source stopped linking, waiting for the end of a run.
    pub orphans: WaitingOrphans,
    /// Batch API batches embsync has not finished with, per model (large first; only models
    /// that have one).
    pub pending_batches: Vec<ModelBatches>,
}

/// The pending Batch API batches of one model ([`crate::batch_api`]), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelBatches {
    /// `large` or `small`.
    pub slot: String,
    /// The model tag the files were built for (`name` or `name:dims`).
    pub model: String,
    /// Its batches.
    pub batches: Vec<PendingBatch>,
}

/// A request file embsync has not finished with (`embedding_sync_batches`): a batch waiting at
/// the provider, or being read, or a file uploaded whose batch was not created yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingBatch {
    /// The provider's batch id; `null` while the file is uploaded but no batch is recorded for
    /// it (an invocation stopped between the two: the next one finds it or gives the file up).
    pub batch_id: Option<String>,
    /// The uploaded request file.
    pub input_file_id: String,
    /// The run that submitted it.
    pub run_id: String,
    /// Its status as last polled (`validating`, `in_progress`, `finalizing`, `completed`, ...),
    /// or `uploaded` before the batch was created.
    pub state: String,
    /// ISO 8601 UTC time the file was recorded.
    pub created_at: String,
    /// Seconds since then.
    pub age_seconds: u64,
    /// ISO 8601 UTC time of the last poll, if any.
    pub polled_at: Option<String>,
    /// `request_counts` as last polled (`total`, `completed`, `failed`), once polled.
    pub request_counts: Option<serde_json::Value>,
    /// Requests in the file.
    pub requests: u64,
    /// Values in the file.
    pub values: u64,
    /// Of those, the values whose vectors are not stored yet (a request's values are forgotten
    /// once its vectors are stored or its error recorded).
    pub waiting: u64,
}

impl ModelBatches {
    /// Groups `batches` (each with its slot and model tag, oldest first) per slot and model,
    /// large first, keeping their order.
    pub fn group(batches: Vec<(String, String, PendingBatch)>) -> Vec<ModelBatches> {
        let mut out: Vec<ModelBatches> = Vec::new();
        for (slot, model, batch) in batches {
            match out.iter_mut().find(|m| m.slot == slot && m.model == model) {
                Some(m) => m.batches.push(batch),
                None => out.push(ModelBatches { slot, model, batches: vec![batch] }),
            }
        }
        // Stable: per model, the batches keep their order.
        out.sort_by_key(|m| (m.slot != "large", m.slot.clone()));
        out
    }
}

/// Orphan candidates (`embedding_sync_orphans`): cache rows embsync wrote whose value a source
/// no longer has and no other source links. Stale removal records them; the end of a run that got
/// through every source deletes those that no source links or has by then, and keeps the rest
/// (a value a source has again is linked by the next run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitingOrphans {
    /// How many wait.
    pub rows: u64,
    /// ISO 8601 UTC time the longest-waiting one was unlinked, when any waits.
    pub oldest: Option<String>,
}

/// The KV cursor as `GET /status` shows it: JSON `null`, the cursor, or
/// `{"unreadable": "<why>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CursorState {
    /// No cursor is stored.
    Absent,
    /// The stored cursor.
    Readable(Cursor),
    /// Something is stored that is not a cursor; the next invocation ignores it.
    Unreadable {
        /// Why it could not be read.
        unreadable: String,
    },
}

impl CursorState {
    /// Reads the KV value (`None` when the key is missing).
    pub fn from_kv(text: Option<&str>) -> CursorState {
        match text {
            None => CursorState::Absent,
            Some(text) => match serde_json::from_str::<Cursor>(text) {
                Ok(cursor) => CursorState::Readable(cursor),
                Err(e) => CursorState::Unreadable { unreadable: e.to_string() },
            },
        }
    }
}

/// The run that has not finished yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentRun {
    /// The run's id.
    pub run_id: String,
    /// `running` while an invocation works on it, `paused` between invocations.
    pub status: RunStatus,
    /// What started the run.
    pub trigger: Trigger,
    /// Invocations the run took so far.
    pub invocations: u64,
    /// ISO 8601 UTC start time.
    pub started_at: String,
    /// Per source, the counters so far (committed with each batch), in config order.
    pub sources: Vec<OpenRunSource>,
}

/// A source of the open run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenRunSource {
    /// The counters so far, as in a report.
    #[serde(flatten)]
    pub report: SourceReport,
    /// Whether the run has counted the source yet (until then its counters are all 0).
    pub planned: bool,
    /// Whether the run is done with the source.
    pub done: bool,
    /// Fan-out: the source's ranges by state, when it was split for the queue's consumers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges: Option<SourceRanges>,
}

/// A fanned-out source's ranges in the open run ([`crate::fanout`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRanges {
    /// Not settled yet (a consumer may be at work on one).
    pub queued: u64,
    /// Finished by a consumer.
    pub done: u64,
    /// Given up (the dead-letter queue, a refused model, the token budget).
    pub dead: u64,
    /// The dead ones, with why.
    pub dead_ranges: Vec<DeadRange>,
}

/// A range that was given up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadRange {
    /// Its id (`embedding_sync_ranges.id`).
    pub range: i64,
    /// Why.
    pub error: String,
}

impl CurrentRun {
    /// Where an unfinished run stands: `embedding_sync_runs.status` says `running` from the
    /// moment an invocation takes it up, and stays so after the invocation spends its budget; it
    /// is only running while an invocation holds the sync lease, and paused otherwise.
    pub fn status_now(recorded: RunStatus, lease_held: bool) -> RunStatus {
        match recorded {
            RunStatus::Running if !lease_held => RunStatus::Paused,
            other => other,
        }
    }
}

/// A finished run, as stored in `embedding_sync_runs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishedRun {
    /// The run's id.
    pub run_id: String,
    /// `finished`, `failed` or `abandoned`.
    pub status: RunStatus,
    /// ISO 8601 UTC end time.
    pub finished_at: String,
    /// The stored report as it is (JSON `null` for an abandoned run).
    pub report: serde_json::Value,
}

impl FinishedRun {
    /// The stored report, when there is one this version can read.
    pub fn report(&self) -> Option<RunReport> {
        serde_json::from_value(self.report.clone()).ok()
    }
}

/// Coverage of one source, counted when `GET /status` is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Coverage {
    /// The source's name.
    pub name: String,
    /// The table as configured.
    pub table: String,
    /// The column.
    pub column: String,
    /// Distinct values in the source.
    pub distinct_values: u64,
    /// Values with an `embedding_large`.
    pub embedded_large: u64,
    /// Values with an `embedding_small`.
    pub embedded_small: u64,
    /// Values not yet done for the source.
    pub pending: u64,
    /// Values in the error table for the source.
    pub errors: u64,
    /// Why the source could not be read, if so.
    pub error: Option<String>,
    /// How its changes are found.
    pub changes: crate::report::ChangesMode,
    /// Its change capture, when `changes` is `capture`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::report::CaptureInfo>,
}

impl Coverage {
    /// Values done for the source: linked to it, with both embeddings.
    pub fn done(&self) -> u64 {
        self.distinct_values.saturating_sub(self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Totals;
    use expect_test::expect;

    #[test]
    fn cursor_states_serialize_as_before() {
        let json = |s: &CursorState| serde_json::to_string(s).unwrap();
        assert_eq!(json(&CursorState::from_kv(None)), "null");
        expect![[r#"{"unreadable":"expected value at line 1 column 1"}"#]].assert_eq(&json(&CursorState::from_kv(Some("garbage"))));
        let cursor = Cursor { run_id: "run-1".into(), source: 1, phase: "embed".into(), after: None, totals: Totals::default() };
        let text = serde_json::to_string(&cursor).unwrap();
        assert_eq!(CursorState::from_kv(Some(&text)), CursorState::Readable(cursor));
        assert_eq!(json(&CursorState::from_kv(Some(&text))), text);
    }

    #[test]
    fn stored_reports_read_back() {
        let run = |report: serde_json::Value| FinishedRun {
            run_id: "run-1".into(),
            status: RunStatus::Finished,
            finished_at: "2026-11-23T23:59:00.000Z".into(),
            report,
        };
        assert_eq!(run(serde_json::Value::Null).report(), None);
        // An older report without invocations, usage, stopped or per-source deferred/warning.
        let old = run(serde_json::json!({
            "runId": "run-1", "status": "finished", "trigger": "cron", "startedAt": "2026-11-23T23:58:00.000Z",
            "durationMs": 5, "sources": [{"name": "A", "table": "t", "column": "c", "total": 3, "new": 3}],
        }));
        let report = old.report().expect("an older report reads back");
        assert_eq!((report.invocations, report.sources[0].new, report.sources[0].deferred), (0, 3, 0));
    }

    fn batch(id: &str, age_seconds: u64) -> PendingBatch {
        PendingBatch {
            batch_id: Some(id.into()),
            input_file_id: format!("file-{id}"),
            run_id: "run-1".into(),
            state: "in_progress".into(),
            created_at: "2026-11-23T23:58:00.000Z".into(),
            age_seconds,
            polled_at: Some("2026-11-23T23:59:00.000Z".into()),
            request_counts: Some(serde_json::json!({"total": 3, "completed": 1, "failed": 0})),
            requests: 3,
            values: 900,
            waiting: 900,
        }
    }

    #[test]
    fn sources_that_left_the_config_are_in_the_json() {
        let config = crate::Config::parse(
            r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
            "sources":[{"name":"Items","table":"public.items","column":"title"},{"name":"Drafts","table":"drafts","column":"body","enabled":false}]}"#,
        )
        .unwrap();
        let status = Status {
            cursor: CursorState::Absent,
            current_run: None,
            last_runs: vec![],
            sources: vec![],
            disabled: vec!["Drafts".into()],
            left_config: vec![
                LeftSource::new(&config, "drafts".into(), "body".into(), 2, 1, 2),
                LeftSource::new(&config, "items".into(), "title".into(), 3, 0, 0),
            ],
            orphans: WaitingOrphans { rows: 2, oldest: Some("2026-11-23T23:59:00.123Z".into()) },
            pending_batches: ModelBatches::group(vec![
                ("small".into(), "text-embedding-3-small".into(), batch("batch_s", 3)),
                ("large".into(), "text-embedding-3-large".into(), batch("batch_l1", 2)),
                ("large".into(), "text-embedding-3-large".into(), batch("batch_l2", 1)),
            ]),
        };
        expect![[r#"
            {
              "cursor": null,
              "currentRun": null,
              "lastRuns": [],
              "sources": [],
              "disabled": [
                "Drafts"
              ],
              "leftConfig": [
                {
                  "table": "drafts",
                  "column": "body",
                  "reason": "disabled",
                  "name": "Drafts",
                  "links": 2,
                  "errors": 1,
                  "rows": 2,
                  "batchValues": 0,
                  "sameAs": null
                },
                {
                  "table": "items",
                  "column": "title",
                  "reason": "removed",
                  "name": null,
                  "links": 3,
                  "errors": 0,
                  "rows": 0,
                  "batchValues": 0,
                  "sameAs": null
                }
              ],
              "orphans": {
                "rows": 2,
                "oldest": "2026-11-23T23:59:00.123Z"
              },
              "pendingBatches": [
                {
                  "slot": "large",
                  "model": "text-embedding-3-large",
                  "batches": [
                    {
                      "batchId": "batch_l1",
                      "inputFileId": "file-batch_l1",
                      "runId": "run-1",
                      "state": "in_progress",
                      "createdAt": "2026-11-23T23:58:00.000Z",
                      "ageSeconds": 2,
                      "polledAt": "2026-11-23T23:59:00.000Z",
                      "requestCounts": {
                        "completed": 1,
                        "failed": 0,
                        "total": 3
                      },
                      "requests": 3,
                      "values": 900,
                      "waiting": 900
                    },
                    {
                      "batchId": "batch_l2",
                      "inputFileId": "file-batch_l2",
                      "runId": "run-1",
                      "state": "in_progress",
                      "createdAt": "2026-11-23T23:58:00.000Z",
                      "ageSeconds": 1,
                      "polledAt": "2026-11-23T23:59:00.000Z",
                      "requestCounts": {
                        "completed": 1,
                        "failed": 0,
                        "total": 3
                      },
                      "requests": 3,
                      "values": 900,
                      "waiting": 900
                    }
                  ]
                },
                {
                  "slot": "small",
                  "model": "text-embedding-3-small",
                  "batches": [
                    {
                      "batchId": "batch_s",
                      "inputFileId": "file-batch_s",
                      "runId": "run-1",
                      "state": "in_progress",
                      "createdAt": "2026-11-23T23:58:00.000Z",
                      "ageSeconds": 3,
                      "polledAt": "2026-11-23T23:59:00.000Z",
                      "requestCounts": {
                        "completed": 1,
                        "failed": 0,
                        "total": 3
                      },
                      "requests": 3,
                      "values": 900,
                      "waiting": 900
                    }
                  ]
                }
              ]
            }"#]]
        .assert_eq(&serde_json::to_string_pretty(&status).unwrap());
    }

    #[test]
    fn an_open_run_runs_only_while_the_lease_is_held() {
        assert_eq!(CurrentRun::status_now(RunStatus::Running, true), RunStatus::Running);
        assert_eq!(CurrentRun::status_now(RunStatus::Running, false), RunStatus::Paused);
        assert_eq!(CurrentRun::status_now(RunStatus::Paused, true), RunStatus::Paused);
    }

    #[test]
    fn done_is_distinct_minus_pending() {
        let c = Coverage {
            name: "A".into(),
            table: "t".into(),
            column: "c".into(),
            distinct_values: 10,
            embedded_large: 7,
            embedded_small: 7,
            pending: 3,
            errors: 0,
            error: None,
            changes: Default::default(),
            capture: None,
        };
        assert_eq!(c.done(), 7);
        assert_eq!(Coverage { pending: 12, ..c }.done(), 0);
    }
}
