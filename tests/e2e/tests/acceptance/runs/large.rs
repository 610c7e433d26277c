//! Large sources: 20,000 values finish over several cron invocations within a small budget;
//! 1,000,000 rows can be planned.

use std::time::{Duration, Instant};

use embsync_e2e::*;
use serde_json::{json, Value};

use super::*;

const DISTINCT: u64 = 20_000;
const BATCH: u64 = 500;
const MAX_BATCHES: u64 = 8;

#[test]
fn a_20000_value_source_finishes_over_several_cron_invocations() {
    let t0 = Instant::now();
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    assert_eq!(values.len() as u64, DISTINCT);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(opts(&db, &provider, BATCH, &[("SYNC_MAX_BATCHES", &MAX_BATCHES.to_string())]));
    let setup = secs(t0);

    let t1 = Instant::now();
    let ends = cron_until_finished(&worker, 12, Duration::from_secs(120));
    let sync_time = secs(t1);
    let invocations = ends.len() as i64;
    let planned = DISTINCT.div_ceil(BATCH) as i64;
    eprintln!(
        "runs::large: {DISTINCT} values, batchSize {BATCH}, SYNC_MAX_BATCHES {MAX_BATCHES}: \
         {invocations} cron invocations, sync {sync_time:.1} s (setup {setup:.1} s)"
    );
    assert!(
        invocations >= planned / MAX_BATCHES as i64,
        "{planned} batches at most {MAX_BATCHES} per invocation need at least {} invocations: {ends:?}",
        planned / MAX_BATCHES as i64
    );

    // Every paused invocation stopped at the budget, after a committed batch, and saved a cursor
    // of the one run.
    let run_id = only_run_id(&mut db);
    let paused = &ends[..ends.len() - 1];
    for (k, end) in paused.iter().enumerate() {
        let End::Paused(cursor) = end else { unreachable!() };
        assert_eq!(cursor["runId"], json!(run_id), "cursor of invocation {}", k + 1);
        assert_eq!(cursor["phase"], json!("embed"), "{cursor}");
    }
    let spent =
        worker.count_log(&format!("Invocation budget spent after {MAX_BATCHES} batches; run {run_id} goes on in the next invocation"));
    assert_eq!(spent, paused.len(), "each paused invocation logs that it spent its budget of {MAX_BATCHES} batches");

    // The final report covers all invocations, exactly.
    let End::Finished(report) = ends.last().unwrap() else { unreachable!() };
    assert_final_report(report, &run_id, DISTINCT as i64, planned);
    assert_eq!(report["invocations"], json!(invocations), "{report:#}");
    assert_eq!(report["trigger"], json!("cron"));
    assert_eq!(runs(&mut db), vec![(run_id.clone(), "finished".into(), invocations as i32, true)]);
    let stored = stored_report(&mut db, &run_id);
    assert_final_report(&stored, &run_id, DISTINCT as i64, planned);
    assert_eq!(stored["invocations"], json!(invocations));

    // KV: the cursor is gone, `last-run` holds the report.
    assert_eq!(worker.status()["cursor"], Value::Null, "the cursor must be deleted when the run finishes");
    let last: Value = serde_json::from_str(&worker.kv_get("last-run").expect("last-run in KV")).expect("last-run is JSON");
    assert_eq!(last["runId"], json!(run_id));
    assert_eq!(last["totals"], report["totals"]);

    // `Batch i of N` counts across invocations: 1..=N in order, with one N.
    let lines = batch_lines(&worker);
    let want: Vec<(u64, u64)> = (1..=planned as u64).map(|i| (i, planned as u64)).collect();
    assert_eq!(lines, want, "`Batch i of N` lines across the invocations");

    // Nothing lost, nothing paid twice.
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_each_value_paid_once(&provider, &values);
    eprintln!("runs::large: whole test {:.1} s", secs(t0));
}

#[test]
fn a_1000000_row_source_is_plannable() {
    const ROWS: u64 = 1_000_000;
    const DISTINCT: u64 = 200_000;
    let t0 = Instant::now();
    let mut db = db_with_parts(DISTINCT, ROWS);
    let fill = secs(t0);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(opts(&db, &provider, 2048, &[]));

    let t1 = Instant::now();
    let plan = worker.dry_run();
    let plan_time = secs(t1);
    eprintln!(
        "runs::large: dry run of {ROWS} rows / {DISTINCT} distinct values: {plan_time:.1} s \
         (filling the table {fill:.1} s)"
    );
    let d = DISTINCT as i64;
    assert_counts(
        "dry run of 1,000,000 rows",
        source_entry(&plan, PARTS.table),
        &[
            ("total", d),
            ("new", d),
            ("stale", 0),
            ("unchanged", 0),
            ("reusable", 0),
            ("toEmbed", d),
            ("batches", DISTINCT.div_ceil(2048) as i64),
        ],
    );
    assert_eq!(plan["totals"]["total"], json!(d), "{plan:#}");
    assert!(plan_time < 60.0, "the dry run of {ROWS} rows took {plan_time:.1} s");
    // A dry run writes nothing and asks the provider nothing.
    assert_eq!(db.cache_count(), 0, "rows in embedding_cache after a dry run");
    assert!(provider.requests().is_empty(), "provider requests of a dry run");
}
