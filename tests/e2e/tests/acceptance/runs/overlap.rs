//! Crashes and overlaps: workerd killed with SIGKILL mid-run, then restarted on the same KV and
//! database, finishes the same run with exact counts; two triggers at once never embed a value
//! twice, and the one that finds the lease held says so.

use std::thread;
use std::time::{Duration, Instant};

use embsync_e2e::*;
use serde_json::json;

use super::*;

#[test]
fn a_run_killed_with_sigkill_is_finished_by_the_next_invocation() {
    const DISTINCT: u64 = 3_000;
    const BATCH: u64 = 100;
    let t0 = Instant::now();
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    // Slow answers: a batch is in flight for at least this long, so the kill lands mid-run.
    provider.set_faults(&json!({"latencyMs": 400}));
    let kv = SharedDir::new("embsync-e2e-kv");
    // Short, so the dead invocation's lease expires soon; long enough to see it block first. The
    // lease must be 1.5 times the time budget at least.
    let vars = [("SYNC_LEASE_SECONDS", "9"), ("SYNC_MAX_SECONDS", "6")];
    let mut first = Worker::start(opts(&db, &provider, BATCH, &vars).persist_to(&kv.path));

    let _trigger = first.scheduled_in_background();
    // `Batch 5` is logged just before its provider calls go out, with at most two earlier
    // batches launched and not yet written (the window): two are committed by then.
    first.wait_for_log("Batch 5 of", Duration::from_secs(60));
    first.kill_hard();
    let killed_at = Instant::now();

    // What the crash left: an open run, an unexpired lease of the dead invocation, and only
    // whole batches, each with its counters.
    let run_id = only_run_id(&mut db);
    assert_eq!(runs(&mut db), vec![(run_id.clone(), "running".into(), 1, false)]);
    let holder = db.count("SELECT count(*) FROM embedding_sync_lease WHERE name = 'sync' AND expires_at > now()");
    assert_eq!(holder, 1, "the killed invocation's lease is still there, unexpired");
    let rows = db.count("SELECT count(*) FROM embedding_cache");
    let complete = db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL");
    let links = db.count("SELECT count(*) FROM embedding_cache_sources");
    let counted = db.count(&format!("SELECT coalesce(sum(embedded), 0)::int8 FROM embedding_sync_run_sources WHERE run_id = '{run_id}'"));
    let counted_batches =
        db.count(&format!("SELECT coalesce(sum(batches), 0)::int8 FROM embedding_sync_run_sources WHERE run_id = '{run_id}'"));
    assert!(rows >= 2 * BATCH as i64 && rows < DISTINCT as i64, "the kill should land mid-run: {rows} rows");
    assert_eq!(
        (complete, links, counted, counted_batches * BATCH as i64),
        (rows, rows, rows, rows),
        "after the crash, rows (complete, linked), the run's embedded counter and batches x {BATCH} \
         must agree: whole batches only"
    );
    let committed_batches = counted_batches as u64;
    eprintln!("runs::overlap: killed after {committed_batches} committed batches ({rows} rows)");

    // A new wrangler dev on the same KV and database. The dead lease expires within
    // SYNC_LEASE_SECONDS of its last renewal; an invocation before that is skipped.
    provider.set_faults(&json!({}));
    // The restarted worker's own lease and budget are long, so that it finishes the rest in one
    // invocation on a loaded machine too (with the first's 6 s budget it paused once, and the
    // test failed); the dead invocation's 9 s lease is what blocks it at first.
    let restarted = [("SYNC_LEASE_SECONDS", "90"), ("SYNC_MAX_SECONDS", "60")];
    let second = Worker::start(opts(&db, &provider, BATCH, &restarted).persist_to(&kv.path));
    let mut skipped = 0;
    let report = loop {
        // Whether the dead invocation's lease is sure to be unexpired when the trigger arrives.
        let blocked = db.count("SELECT count(*) FROM embedding_sync_lease WHERE expires_at > now() + interval '1 second'") == 1;
        let end = cron(&second, Duration::from_secs(120));
        if blocked {
            assert!(matches!(end, End::Skipped(_)), "an invocation while the killed one's lease is unexpired must be skipped: {end:?}");
        }
        match end {
            End::Finished(r) => break r,
            End::Skipped(msg) => {
                assert!(msg.contains("already in progress"), "{msg}");
                skipped += 1;
                assert!(
                    killed_at.elapsed() < Duration::from_secs(30),
                    "the dead invocation's 9 s lease still blocks {:?} after the kill",
                    killed_at.elapsed()
                );
                thread::sleep(Duration::from_millis(500));
            }
            other => panic!("unexpected end after the restart: {other:?}\n{}", second.log_tail(40)),
        }
    };
    eprintln!("runs::overlap: restarted run finished after {skipped} skipped invocation(s); test {:.1} s", secs(t0));

    // The same run, finished with exact counts over both invocations.
    let planned = DISTINCT.div_ceil(BATCH);
    assert_final_report(&report, &run_id, DISTINCT as i64, planned as i64);
    assert_eq!(report["invocations"], json!(2), "{report:#}");
    assert_eq!(runs(&mut db), vec![(run_id.clone(), "finished".into(), 2, true)]);
    assert_eq!(second.count_log(&format!("Resuming run {run_id} (invocation 2)")), 1, "the restart resumes the killed run");
    // Batch numbering goes on after the committed batches; the one in flight is redone.
    let want: Vec<(u64, u64)> = (committed_batches + 1..=planned).map(|i| (i, planned)).collect();
    assert_eq!(batch_lines(&second), want, "`Batch i of N` lines after the restart");
    assert_cache_exact(&mut db, DISTINCT as i64);

    // Nothing lost; paid twice at most for the batches in flight at the kill.
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let counts = ok_input_counts(&provider, model);
        let missing = values.iter().filter(|v| !counts.contains_key(*v)).count();
        let extra = counts.keys().filter(|v| !values.contains(*v)).count();
        let twice = counts.values().filter(|n| **n == 2).count();
        let more = counts.values().filter(|n| **n > 2).count();
        assert_eq!((missing, extra, more), (0, 0, 0), "{model}: values never asked, not in the source, asked 3+ times");
        let most = (IN_FLIGHT_BATCHES * BATCH) as usize;
        assert!(twice <= most, "{model}: {twice} values were paid twice; at most the batches in flight ({most}) may be");
        eprintln!("runs::overlap: {model}: {twice} values paid twice (the batches in flight)");
    }
}

#[test]
fn two_triggers_at_once_never_embed_a_value_twice() {
    const DISTINCT: u64 = 1_000;
    const BATCH: u64 = 100;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    provider.set_faults(&json!({"latencyMs": 300}));
    let worker = Worker::start(opts(&db, &provider, BATCH, &[]));

    // A slow cron run holds the lease...
    let cron_run = worker.scheduled_in_background();
    worker.wait_for_log("Batch 2 of", Duration::from_secs(60));

    // ... so POST /sync is refused with 409,
    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_eq!(status, 409, "POST /sync during a cron run: {body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("no error in {body}"));
    assert!(error.contains("a sync run is already in progress"), "409 body: {error}");
    // ... and a second cron invocation skips.
    let second_cron = worker.scheduled_in_background();
    poll(Duration::from_secs(60), "two `Sync skipped:` lines", || {
        (worker.count_log("Sync skipped: a sync run is already in progress") >= 2).then_some(())
    });

    // The first run finishes alone.
    worker.wait_for_log("Sync report:", Duration::from_secs(120));
    for h in [cron_run, second_cron] {
        let (status, _) = h.join().unwrap().expect("/__scheduled");
        assert_eq!(status, 200);
    }
    let reports = worker.logged_reports();
    assert_eq!(reports.len(), 1, "one run reported: {reports:#?}");
    let run_id = only_run_id(&mut db);
    assert_final_report(&reports[0], &run_id, DISTINCT as i64, DISTINCT.div_ceil(BATCH) as i64);
    assert_eq!(reports[0]["invocations"], json!(1));
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_each_value_paid_once(&provider, &values);

    // The lease was released: the next trigger runs at once (and has nothing to embed).
    provider.set_faults(&json!({}));
    let report = worker.sync();
    assert_counts("report of the next run", &report["totals"], &[("new", 0), ("embedded", 0), ("unchanged", DISTINCT as i64)]);
    assert_each_value_paid_once(&provider, &values);
}

#[test]
fn an_invocation_that_lost_its_lease_leaves_the_run_to_the_new_holder() {
    const DISTINCT: u64 = 600;
    const BATCH: u64 = 100;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(opts(&db, &provider, BATCH, &[("SYNC_LEASE_SECONDS", "3"), ("SYNC_MAX_SECONDS", "2")]));

    // Invocation A: its first batch takes 6 s, twice its 3 s lease.
    provider.set_faults(&json!({"latencyMs": 6000}));
    let a = worker.scheduled_in_background();
    worker.wait_for_log("Batch 1 of", Duration::from_secs(60));
    poll(Duration::from_secs(10), "A's two provider requests", || (provider.requests().len() >= 2).then_some(()));
    provider.set_faults(&json!({}));
    poll(Duration::from_secs(10), "A's lease to expire", || {
        (db.count("SELECT count(*) FROM embedding_sync_lease WHERE expires_at > now()") == 0).then_some(())
    });

    // Invocation B takes the expired lease over and finishes the run while A still waits.
    let b = worker.scheduled_in_background();
    worker.wait_for_log("Sync report:", Duration::from_secs(60));
    let run_id = only_run_id(&mut db);
    let finished = stored_report(&mut db, &run_id);
    assert_final_report(&finished, &run_id, DISTINCT as i64, DISTINCT.div_ceil(BATCH) as i64);
    assert_eq!(finished["invocations"], json!(2), "{finished:#}");

    // A's batch comes back: its write is refused (fenced), and it must leave B's run alone.
    for h in [a, b] {
        let (status, _) = h.join().unwrap().expect("/__scheduled");
        assert_eq!(status, 200);
    }
    poll(Duration::from_secs(10), "A to log that its lease was lost", || {
        (worker.count_log("lease expired or was taken over") >= 1).then_some(())
    });
    assert_eq!(
        stored_report(&mut db, &run_id),
        finished,
        "the stored report of run {run_id} after the invocation that lost the lease came back"
    );
    assert_eq!(runs(&mut db), vec![(run_id.clone(), "finished".into(), 2, true)]);
    let reports = worker.logged_reports();
    assert_eq!(reports.len(), 1, "only the lease holder reports the run as finished; logged reports: {:#}", json!(reports));
    let last: serde_json::Value = serde_json::from_str(&worker.kv_get("last-run").expect("last-run in KV")).expect("JSON");
    assert_eq!(last["totals"], finished["totals"], "`last-run` in KV");
    assert_cache_exact(&mut db, DISTINCT as i64);
    // A's batches in flight were paid for and thrown away; nothing else twice.
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let counts = ok_input_counts(&provider, model);
        assert_eq!(counts.len(), values.len(), "{model}: every value asked");
        let twice = counts.values().filter(|n| **n == 2).count();
        let most = (IN_FLIGHT_BATCHES * BATCH) as usize;
        assert!(counts.values().all(|n| *n <= 2) && twice <= most, "{model}: {twice} values paid twice (at most {most})");
    }
}
