//! Issue 10, item 4: fan-out over Cloudflare Queues, under `wrangler dev` with local queues.
//!
//! The worker runs with the queue blocks of wrangler.toml uncommented ([`WorkerOpts::queues`]):
//! the `SYNC_QUEUE` producer binding, the ranges queue's consumer and the dead-letter queue's.
//! Local queues deliver one batch at a time, whatever `max_concurrency` says (see
//! ARCHITECTURE.md), so these tests set `max_batch_size = 4` and `max_concurrency = 1`: the
//! worker consumes the four messages of a batch side by side, four consumers at once, and
//! `SYNC_QUEUE_CONSUMERS = 4` (max_concurrency x max_batch_size). The config's
//! `rate.maxConcurrency` is 4, so each consumer's share is one request in flight; a batch goes
//! out whole even so (its two requests, one per model, when nothing else is in flight), so one
//! consumer has at most two requests in flight: more than two at once in the provider's log are
//! two or more consumers at once.
//!
//! The source is `runs`' [`PARTS`], with the small test dimensions.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use embsync_e2e::*;
use serde_json::{json, Value};

use crate::runs::*;

/// Values per batch.
const BATCH: u64 = 10;
/// Values per range: five batches.
const RANGE: u64 = 50;
/// Consumers at once: `SYNC_QUEUE_CONSUMERS`, the ranges consumer's `max_batch_size`, and the
/// config's `rate.maxConcurrency` (a share of one request in flight per consumer).
const CONSUMERS: u64 = 4;

/// [`parts_config`] with `rate.maxConcurrency` = [`CONSUMERS`].
fn config() -> String {
    let mut c: Value = serde_json::from_str(&parts_config(BATCH)).unwrap();
    c["rate"] = json!({ "maxConcurrency": CONSUMERS });
    c.to_string()
}

/// The worker with fan-out: a source of 100 or more pending values is split into ranges of
/// [`RANGE`]; a failing range is retried once, at once, then dead-lettered.
fn fanout_opts(db: &TestDb, provider: &Provider, vars: &[(&str, &str)]) -> WorkerOpts {
    let consumers = CONSUMERS.to_string();
    let mut o = WorkerOpts::new(db, provider)
        .sources(config())
        .var("SYNC_FANOUT_MIN_VALUES", 100)
        .var("SYNC_FANOUT_RANGE_VALUES", RANGE)
        .var("SYNC_QUEUE_CONSUMERS", CONSUMERS)
        .queues(&[
            ("max_batch_size", consumers.as_str()),
            ("max_concurrency", "1"),
            ("max_batch_timeout", "0"),
            ("max_retries", "1"),
            ("retry_delay", "0"),
        ]);
    for (k, v) in vars {
        o = o.var(k, v);
    }
    o
}

/// The provider answers after 100 ms + 1 ms per input, so requests overlap when consumers do.
fn slow_provider() -> Provider {
    Provider::start_with(Some(API_KEY), &["--latency-ms", "100", "--latency-per-input-ms", "1"])
}

/// The runs' ranges: `(id, state)`, by id.
fn ranges(db: &mut TestDb) -> Vec<(i64, String)> {
    db.client()
        .query("SELECT id, state FROM embedding_sync_ranges ORDER BY id", &[])
        .expect("select embedding_sync_ranges")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until the one run is finished; returns its id.
fn wait_finished(db: &mut TestDb, worker: &Worker, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let all = runs(db);
        if let [(id, status, _, true)] = all.as_slice() {
            assert_eq!(status, "finished", "{all:?}");
            return id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish within {timeout:?}: runs {all:?}, ranges {:?}; log {}:\n{}",
            ranges(db),
            worker.log_path().display(),
            worker.log_tail(80)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The most consumers that were at work at once, from the worker's `consume` and `consumed`
/// events (in log order).
fn most_consumers_at_once(worker: &Worker) -> i64 {
    let (mut now, mut most) = (0i64, 0i64);
    for e in worker.events() {
        match e["event"].as_str() {
            Some("consume") => now += 1,
            Some("consumed") => now -= 1,
            _ => {}
        }
        most = most.max(now);
    }
    most
}

/// The most provider requests in flight at once, from the provider's log (start and end times).
fn most_requests_at_once(provider: &Provider) -> usize {
    let mut edges: Vec<(u64, i64)> = Vec::new();
    for r in provider.requests() {
        let (Some(s), Some(e)) = (r["startedMs"].as_u64(), r["endedMs"].as_u64()) else { continue };
        edges.push((s, 1));
        edges.push((e, -1));
    }
    // An end at the same millisecond as a start comes first: touching is not overlapping.
    edges.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// The worker's `enqueued` events: how many range messages each trigger sent.
fn fanned_out(worker: &Worker) -> Vec<u64> {
    worker.events_of("enqueued").iter().map(|e| e["ranges"].as_u64().unwrap_or_default()).collect()
}

#[test]
fn a_backfill_fans_out_to_consumers_side_by_side_and_pays_each_value_once() {
    const DISTINCT: u64 = 400;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = slow_provider();
    let worker = Worker::start(fanout_opts(&db, &provider, &[]));

    let report = worker.sync();
    assert_eq!(report["status"], json!("paused"), "the trigger fans out and leaves the run to the consumers: {report:#}");
    assert_eq!(fanned_out(&worker), vec![DISTINCT / RANGE], "one message per range of {RANGE}");
    let run_id = wait_finished(&mut db, &worker, Duration::from_secs(120));

    // Several consumers at once, seen by the worker and by the provider; together within the
    // config's ceiling of requests in flight.
    let consumers = most_consumers_at_once(&worker);
    let in_flight = most_requests_at_once(&provider);
    eprintln!("queues: at most {consumers} consumers and {in_flight} provider requests at once");
    assert!(consumers >= 2, "consumers must overlap: at most {consumers} at once");
    assert!(in_flight > 2, "one consumer has at most one batch (two requests) in flight, so more are consumers at once: {in_flight}");
    // Each consumer's share of rate.maxConcurrency is 1, but a batch always goes out whole: two
    // requests per consumer at most (the core's `Window::admits`), not the config's 4 in all.
    assert!(in_flight as u64 <= 2 * CONSUMERS, "at most one batch in flight per consumer: {in_flight}");

    // Every range done, every value once per model, the run's counters exact.
    assert_eq!(ranges(&mut db).iter().filter(|(_, s)| s != "done").count(), 0, "{:?}", ranges(&mut db));
    assert_each_value_paid_once(&provider, &values);
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_final_report(&stored_report(&mut db, &run_id), &run_id, DISTINCT as i64, (DISTINCT / BATCH) as i64);
    assert_eq!(worker.events_of("consumed").iter().filter(|e| e["outcome"] == "failed").count(), 0);
}

#[test]
fn a_consumer_killed_mid_range_leaves_a_run_that_still_finishes_exactly() {
    // Four ranges, four consumers: every range is claimed when workerd dies.
    const DISTINCT: u64 = 4 * RANGE;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = slow_provider();
    let kv = SharedDir::new("embsync-e2e-queues-kv");
    // A short claim, so that the killed consumers' ranges are free again soon.
    let vars = [("SYNC_LEASE_SECONDS", "10"), ("SYNC_MAX_SECONDS", "6")];
    let mut first = Worker::start(fanout_opts(&db, &provider, &vars).persist_to(&kv.path));
    first.sync();
    // Kill workerd once every consumer has written a batch or so.
    poll(Duration::from_secs(60), "consumers to write 40 values", || {
        (db.count("SELECT count(*) FROM embedding_cache") >= 40).then_some(())
    });
    first.kill_hard();
    let rows = db.count("SELECT count(*) FROM embedding_cache");
    let held = db.count("SELECT count(*) FROM embedding_sync_ranges WHERE state = 'queued' AND holder IS NOT NULL");
    eprintln!("queues: killed with {rows} rows written and {held} ranges held by the dead consumers");
    assert!(rows < DISTINCT as i64 && held > 0, "the kill should land mid-range: {rows} rows, ranges {:?}", ranges(&mut db));
    let run = runs(&mut db)[0].0.clone();

    // Local queues live in wrangler's memory: the messages died with it. Once the dead
    // consumers' claims have expired, the next trigger's sweeper sends their ranges again, and
    // the consumers finish the run.
    let second = Worker::start(fanout_opts(&db, &provider, &vars).persist_to(&kv.path));
    std::thread::sleep(Duration::from_secs(11));
    let report = second.sync();
    assert_eq!(report["status"], json!("paused"), "the trigger waits for the consumers: {report:#}");
    assert_eq!(fanned_out(&second), vec![held as u64], "the sweeper sends every range whose consumer died");
    let run_id = wait_finished(&mut db, &second, Duration::from_secs(120));
    assert_eq!(run_id, run);

    // Exact in Postgres; paid twice at most for what the killed consumers had in flight: one
    // batch (both models) for each consumer at work.
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_final_report(&stored_report(&mut db, &run_id), &run_id, DISTINCT as i64, (DISTINCT / BATCH) as i64);
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let counts = ok_input_counts(&provider, model);
        let missing = values.iter().filter(|v| !counts.contains_key(*v)).count();
        let twice = counts.values().filter(|n| **n > 1).count() as u64;
        assert_eq!(missing, 0, "{model}: every value embedded");
        assert!(counts.values().all(|n| *n <= 2), "{model}: no value paid more than twice");
        assert!(twice <= CONSUMERS * BATCH, "{model}: {twice} values paid twice; at most the batches in flight at the kill");
    }
}

#[test]
fn a_duplicate_message_costs_nothing() {
    const DISTINCT: u64 = 200;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = slow_provider();
    let worker = Worker::start(fanout_opts(&db, &provider, &[]));
    worker.sync();
    // While the run goes on: every range once more, at once (done, held or not yet started).
    let run = runs(&mut db)[0].0.clone();
    let ids: Vec<i64> = ranges(&mut db).iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len() as u64, DISTINCT / RANGE);
    let enqueue = |id: i64| {
        let (status, body) = worker.request_body("POST", "/enqueue", TOKEN, &json!({"run": run, "range": id}).to_string());
        assert_eq!(status, 200, "{body}");
    };
    ids.iter().for_each(|id| enqueue(*id));
    let run_id = wait_finished(&mut db, &worker, Duration::from_secs(120));
    assert_each_value_paid_once(&provider, &values);

    // After the run: the duplicates are skipped, nothing asked of the provider.
    let asked = provider.requests().len();
    let skipped_before = worker.events_of("consumed").iter().filter(|e| e["outcome"] == "skipped").count();
    ids.iter().for_each(|id| enqueue(*id));
    poll(Duration::from_secs(30), "the duplicates to be skipped", || {
        let skipped = worker.events_of("consumed").iter().filter(|e| e["outcome"] == "skipped").count();
        (skipped >= skipped_before + ids.len()).then_some(())
    });
    assert_eq!(provider.requests().len(), asked, "a duplicate asks nothing of the provider");
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_final_report(&stored_report(&mut db, &run_id), &run_id, DISTINCT as i64, (DISTINCT / BATCH) as i64);
    // A body that is not a range message is refused before it reaches the queue.
    let (status, _) = worker.request_body("POST", "/enqueue", TOKEN, "{\"range\": 1}");
    assert_eq!(status, 400);
}

#[test]
fn a_range_that_keeps_failing_reaches_the_dead_letter_queue_and_status_shows_it() {
    const DISTINCT: u64 = 200;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = slow_provider();
    // One value's requests always fail: its range's consumer fails every attempt (the message
    // is retried once, then moved to the dead-letter queue).
    let bad = values.iter().find(|v| v.starts_with("Part 7 ")).expect("Part 7").clone();
    provider.set_faults(&json!({"rules": [{"status": 500, "inputContains": bad}]}));
    let worker = Worker::start(fanout_opts(&db, &provider, &[]));
    worker.sync();
    poll(Duration::from_secs(180), "a range to be dead (and logged so) and the others done", || {
        let r = ranges(&mut db);
        let logged = !worker.events_of("dead").is_empty();
        (logged && r.iter().any(|(_, s)| s == "dead") && r.iter().all(|(_, s)| s != "queued")).then_some(r)
    });
    let dead: Vec<i64> = ranges(&mut db).into_iter().filter(|(_, s)| s == "dead").map(|(id, _)| id).collect();
    assert_eq!(dead.len(), 1, "only the failing value's range dies: {:?}", ranges(&mut db));
    let failed = worker.events_of("consumed").iter().filter(|e| e["outcome"] == "failed" && e["range"] == json!(dead[0])).count();
    assert_eq!(failed, 2, "max_retries = 1: two attempts, then the dead-letter queue");
    assert_eq!(worker.events_of("dead").len(), 1, "the dead-letter consumer logged it: {:#?}", worker.events_of("dead"));

    // /status shows the dead range, with why, while the run waits for a trigger.
    let status = worker.status();
    let ranges_status = &status["currentRun"]["sources"][0]["ranges"];
    assert_eq!(ranges_status["dead"], json!(1), "{status:#}");
    assert_eq!(ranges_status["deadRanges"][0]["range"], json!(dead[0]), "{status:#}");
    assert!(ranges_status["deadRanges"][0]["error"].as_str().unwrap_or_default().contains("dead-letter queue"), "{status:#}");

    // The provider is back: the next trigger's in-line pass embeds the dead range's values and
    // the run finishes, saying a range was given up. Each value paid once.
    provider.set_faults(&json!({}));
    let report = worker.sync();
    assert_eq!(report["status"], json!("finished"), "{report:#}");
    let warning = source_entry(&report, PARTS.table)["warning"].as_str().unwrap_or_default().to_string();
    assert!(warning.contains("given up"), "the report says a range was given up: {warning:?}");
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_each_value_paid_once(&provider, &values);
}

#[test]
fn without_a_queue_binding_nothing_fans_out() {
    const DISTINCT: u64 = 200;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    // The fan-out settings, but no queue blocks: the run is synced in-line, in one trigger.
    let opts = WorkerOpts::new(&db, &provider).sources(config()).var("SYNC_FANOUT_MIN_VALUES", 100).var("SYNC_FANOUT_RANGE_VALUES", RANGE);
    let worker = Worker::start(opts);
    let report = worker.sync();
    let run_id = only_run_id(&mut db);
    assert_final_report(&report, &run_id, DISTINCT as i64, (DISTINCT / BATCH) as i64);
    assert!(fanned_out(&worker).is_empty() && worker.events_of("consume").is_empty());
    assert_each_value_paid_once(&provider, &values);
    let tables: BTreeSet<String> = db.text_set("SELECT DISTINCT run_id FROM embedding_sync_ranges");
    assert!(tables.is_empty(), "no ranges: {tables:?}");
}
