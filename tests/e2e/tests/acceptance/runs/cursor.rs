//! The KV cursor is only a hint: deleted, left over from another run, or garbage between
//! invocations, the run still finishes with exact counts and each value paid once.

use std::time::Duration;

use embsync_e2e::*;
use serde_json::{json, Value};

use super::*;

const DISTINCT: u64 = 2_000;
const BATCH: u64 = 100;
/// 20 batches: 6 + 6 + 6 + 2, four invocations.
const MAX_BATCHES: u64 = 6;

/// The largest `value_hash` stored: where a run in hash order stands.
fn last_stored_hash(db: &mut TestDb) -> String {
    db.text_set("SELECT max(value_hash) FROM embedding_cache").into_iter().next().expect("a stored hash")
}

/// The cursor in KV, parsed.
fn kv_cursor(worker: &Worker) -> Option<Value> {
    worker.kv_get("cursor").map(|t| serde_json::from_str(&t).unwrap_or_else(|e| panic!("the cursor in KV is not JSON ({e}): {t}")))
}

/// Checks a paused invocation's cursor: this run, the one source, its position and totals.
fn check_cursor(db: &mut TestDb, cursor: &Value, run_id: &str, embedded: i64) {
    assert_eq!(cursor["runId"], json!(run_id), "{cursor}");
    assert_eq!(cursor["source"], json!(0), "{cursor}");
    assert_eq!(cursor["phase"], json!("embed"), "{cursor}");
    assert_eq!(cursor["after"], json!(last_stored_hash(db)), "the cursor's position is the last hash stored (hash order): {cursor}");
    assert_counts("cursor totals", &cursor["totals"], &[("new", DISTINCT as i64), ("embedded", embedded)]);
}

#[test]
fn a_deleted_foreign_or_garbage_cursor_costs_nothing_but_a_rescan() {
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(opts(&db, &provider, BATCH, &[("SYNC_MAX_BATCHES", &MAX_BATCHES.to_string())]));
    let timeout = Duration::from_secs(120);
    let per = (MAX_BATCHES * BATCH) as i64;
    let unreadable = "Ignoring an unreadable cursor in KV";

    // 1: a fresh run; the cursor it saves matches what Postgres holds.
    let End::Paused(c1) = cron(&worker, timeout) else { panic!("invocation 1 should pause: {}", worker.log_tail(30)) };
    let run_id = only_run_id(&mut db);
    check_cursor(&mut db, &c1, &run_id, per);
    assert_eq!(kv_cursor(&worker).as_ref(), Some(&c1), "the cursor in KV is the one logged");

    // 2: the cursor deleted.
    worker.kv_delete("cursor");
    assert_eq!(worker.status()["cursor"], Value::Null, "GET /status after the cursor was deleted");
    let End::Paused(c2) = cron(&worker, timeout) else { panic!("invocation 2 should pause: {}", worker.log_tail(30)) };
    check_cursor(&mut db, &c2, &run_id, 2 * per);

    // 3: a well-formed cursor of another run, pointing past every value: ignored.
    let foreign = json!({
        "runId": "run-0-00000000", "source": 0, "phase": "embed", "after": "f".repeat(64),
        "totals": {"total": 0, "new": 0, "stale": 0, "unchanged": 0, "reused": 0, "embedded": 0,
                   "deleted": 0, "errors": 0, "deferred": 0, "batches": 0},
    });
    worker.kv_put("cursor", &foreign.to_string());
    let End::Paused(c3) = cron(&worker, timeout) else { panic!("invocation 3 should pause: {}", worker.log_tail(30)) };
    check_cursor(&mut db, &c3, &run_id, 3 * per);
    assert_eq!(worker.count_log(unreadable), 0, "nothing unreadable so far");

    // 4: garbage: logged, ignored; the run finishes and the cursor key is removed.
    worker.kv_put("cursor", "garbage{");
    let shown = worker.status()["cursor"].clone();
    assert!(shown["unreadable"].is_string(), "GET /status shows an unreadable cursor as such: {shown}");
    let End::Finished(report) = cron(&worker, timeout) else { panic!("invocation 4 should finish: {}", worker.log_tail(30)) };
    assert_eq!(worker.count_log(unreadable), 1, "the garbage cursor is reported once");
    let planned = DISTINCT.div_ceil(BATCH);
    assert_final_report(&report, &run_id, DISTINCT as i64, planned as i64);
    assert_eq!(report["invocations"], json!(4), "{report:#}");
    assert_eq!(stored_report(&mut db, &run_id)["totals"], report["totals"]);
    let want: Vec<(u64, u64)> = (1..=planned).map(|i| (i, planned)).collect();
    assert_eq!(batch_lines(&worker), want, "`Batch i of N` lines across the invocations");
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_each_value_paid_once(&provider, &values);
    // Read through GET /status (the same KV; a wrangler CLI call costs seconds).
    let cursor = worker.status()["cursor"].clone();
    assert_eq!(cursor, Value::Null, "the cursor key must be deleted when the run finishes (it held garbage before the last invocation)");
}

#[test]
fn a_run_that_fails_takes_its_cursor_with_it() {
    const DISTINCT: u64 = 600;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(opts(&db, &provider, BATCH, &[("SYNC_MAX_BATCHES", "2")]));
    let timeout = Duration::from_secs(120);

    // 1: pauses and leaves its cursor.
    let End::Paused(c1) = cron(&worker, timeout) else { panic!("invocation 1 should pause: {}", worker.log_tail(30)) };
    assert_eq!(kv_cursor(&worker).as_ref(), Some(&c1), "the paused invocation's cursor is in KV");

    // 2: the provider refuses the key: the run ends as failed, and nothing is left to resume.
    provider.set_faults(&json!({"rules": [{"status": 401}]}));
    let end = cron(&worker, timeout);
    assert!(matches!(end, End::Failed(ref m) if m.contains("OPENAI_API_KEY")), "invocation 2 should fail on the key: {end:?}");
    let run_id = only_run_id(&mut db);
    assert_eq!(runs(&mut db), vec![(run_id, "failed".into(), 2, true)]);
    assert_eq!(worker.status()["cursor"], Value::Null, "the cursor of a run that failed must be deleted with it");
}
