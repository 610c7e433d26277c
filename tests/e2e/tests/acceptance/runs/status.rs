//! `GET /status`: the cursor and the open run while a run is paused; the finished run with its
//! report, and per-source coverage, afterwards.

use std::time::Duration;

use embsync_e2e::*;
use serde_json::{json, Value};

use super::*;

const DISTINCT: i64 = 1_000;

/// The one entry of `sources[]` in a status.
fn parts_coverage(status: &Value) -> &Value {
    let sources = status["sources"].as_array().unwrap_or_else(|| panic!("no sources[] in {status:#}"));
    assert_eq!(sources.len(), 1, "{status:#}");
    let s = &sources[0];
    assert_eq!((&s["name"], &s["table"], &s["column"]), (&json!(PARTS.name), &json!(PARTS.table), &json!(PARTS.column)), "{s}");
    assert_eq!(s["error"], Value::Null, "{s}");
    s
}

#[test]
fn status_shows_a_paused_run_and_then_its_report_and_coverage() {
    let db = db_with_parts(DISTINCT as u64, DISTINCT as u64);
    let provider = Provider::start(Some(API_KEY));
    // 10 batches of 100, 4 per invocation: 3 invocations.
    let worker = Worker::start(opts(&db, &provider, 100, &[("SYNC_MAX_BATCHES", "4")]));
    let mut db = db;
    let timeout = Duration::from_secs(120);

    let before = worker.status();
    assert_eq!(before["cursor"], Value::Null, "{before:#}");
    assert_eq!(before["currentRun"], Value::Null, "{before:#}");
    assert_eq!(before["lastRuns"], json!([]), "{before:#}");

    let End::Paused(_) = cron(&worker, timeout) else { panic!("invocation 1 should pause: {}", worker.log_tail(30)) };
    let run_id = only_run_id(&mut db);
    let paused = worker.status();
    let cursor = &paused["cursor"];
    assert_eq!(cursor["runId"], json!(run_id), "cursor in {paused:#}");
    assert_eq!(cursor["phase"], json!("embed"), "{cursor}");
    assert!(cursor["after"].as_str().is_some_and(|h| h.len() == 64), "{cursor}");
    assert_counts("cursor totals", &cursor["totals"], &[("new", DISTINCT), ("embedded", 400)]);
    let current = &paused["currentRun"];
    assert_eq!(current["runId"], json!(run_id), "currentRun in {paused:#}");
    assert_eq!(current["invocations"], json!(1), "{current}");
    // No invocation holds the lease between invocations: the run is paused, not running.
    assert_eq!((&current["status"], &current["trigger"]), (&json!("paused"), &json!("cron")), "{current}");
    assert!(current["startedAt"].as_str().is_some_and(|t| t.ends_with('Z')), "ISO 8601 UTC: {current}");
    assert_counts("the open run's counters", &current["sources"][0], &[("new", DISTINCT), ("embedded", 400), ("batches", 4)]);
    assert_eq!(paused["lastRuns"], json!([]), "no run finished yet: {paused:#}");
    assert_counts(
        "coverage of a paused run",
        parts_coverage(&paused),
        &[("distinctValues", DISTINCT), ("embeddedLarge", 400), ("embeddedSmall", 400), ("pending", 600), ("errors", 0)],
    );

    let ends = cron_until_finished(&worker, 5, timeout);
    assert_eq!(ends.len(), 2, "two more invocations: {ends:?}");
    let done = worker.status();
    assert_eq!(done["cursor"], Value::Null, "the cursor is gone: {done:#}");
    assert_eq!(done["currentRun"], Value::Null, "no open run: {done:#}");
    let last = done["lastRuns"].as_array().unwrap_or_else(|| panic!("no lastRuns[] in {done:#}"));
    assert_eq!(last.len(), 1, "{done:#}");
    assert_eq!(last[0]["runId"], json!(run_id));
    assert_eq!(last[0]["status"], json!("finished"));
    assert!(last[0]["finishedAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", last[0]);
    assert_final_report(&last[0]["report"], &run_id, DISTINCT, 10);
    assert_eq!(last[0]["report"]["invocations"], json!(3));
    assert_counts(
        "coverage after the run",
        parts_coverage(&done),
        &[("distinctValues", DISTINCT), ("embeddedLarge", DISTINCT), ("embeddedSmall", DISTINCT), ("pending", 0), ("errors", 0)],
    );
}
