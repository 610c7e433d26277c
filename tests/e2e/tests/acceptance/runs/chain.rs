//! Issue 10: no idle gaps. A run that needs several invocations finishes from one trigger, with
//! no queue binding: the worker starts the next invocation at once while the run pauses at its
//! budget and `SYNC_CHAIN_SECONDS` last, instead of waiting for the next cron tick.

use std::time::Duration;

use embsync_e2e::*;
use serde_json::{json, Value};

use super::*;

#[test]
fn a_run_without_a_queue_binding_finishes_without_waiting_for_cron_ticks() {
    // 8 batches of 5, at most 2 per invocation: 4 invocations.
    const DISTINCT: u64 = 40;
    const BATCH: u64 = 5;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(opts(&db, &provider, BATCH, &[("SYNC_MAX_BATCHES", "2"), ("SYNC_CHAIN_SECONDS", "600")]));

    // One cron trigger, one end: the run's report.
    let end = cron(&worker, Duration::from_secs(120));
    let End::Finished(report) = end else { panic!("one trigger must finish the run: {end:?}; log:\n{}", worker.log_tail(60)) };
    assert_eq!(ends(&worker).len(), 1, "one trigger, one end: {:?}", ends(&worker));
    let run_id = only_run_id(&mut db);
    assert_eq!(report["invocations"], json!(4), "{report:#}");
    assert_eq!(runs(&mut db), vec![(run_id.clone(), "finished".into(), 4, true)]);
    // Each invocation after the first went on at once, and said so.
    let chained = worker.events_of("chain");
    assert_eq!(chained.len(), 3, "{chained:#?}");
    assert!(chained.iter().all(|e| e["runId"] == json!(run_id)), "{chained:#?}");
    let spent = worker.count_log(&format!("Invocation budget spent after 2 batches; run {run_id} goes on in the next invocation"));
    assert_eq!(spent, 3, "three invocations paused at their budget");

    // Nothing lost, nothing paid twice, the counters exact, no cursor left.
    assert_final_report(&report, &run_id, DISTINCT as i64, 8);
    assert_final_report(&stored_report(&mut db, &run_id), &run_id, DISTINCT as i64, 8);
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_each_value_paid_once(&provider, &values);
    assert_eq!(worker.status()["cursor"], Value::Null);
}
