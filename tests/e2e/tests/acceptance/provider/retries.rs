//! Transient failures are retried (429 with `retry-after-ms`, 5xx), a rejected API key stops the
//! run at once, and the rate-limit headers slow a run down before it is throttled.

use embsync_e2e::*;
use serde_json::{json, Value};

use super::*;

const VALUES: [&str; 12] = [
    "Thermal transfer printing, 203 dpi",
    "Direct thermal printing, 300 dpi",
    "Cutter with catch tray",
    "Peel-off with liner take-up",
    "UHF RFID encoder (ETSI and FCC regions)",
    "Wireless LAN 802.11ac with Bluetooth 4.2",
    "Gigabit Ethernet print server",
    "Black mark sensor, movable",
    "Real-time clock with battery backup",
    "Wall mounting bracket",
    "Wax/resin ribbon, 110 mm × 450 m",
    "Polyimide labels, heat resistant up to 300 °C",
];

#[test]
fn a_429_on_every_other_request_still_completes_with_exact_counts() {
    let mut db = db_with_options(&VALUES);
    // Batches of 3: four groups, each a large and a small request.
    let (provider, worker) = start_stack(&db, Some(sources_json(3, &[OPTION])));
    provider.set_faults(&json!({"rules": [{"status": 429, "retryAfterMs": 50, "every": 2}]}));

    let report = worker.sync();
    assert_counts(
        "sync under a 429 storm",
        source_entry(&report, OPTION.table),
        &[
            ("total", 12),
            ("new", 12),
            ("embedded", 12),
            ("errors", 0),
            ("deferred", 0),
            ("batches", 4),
        ],
    );
    assert_counts(
        "totals",
        &report["totals"],
        &[("embedded", 12), ("errors", 0)],
    );
    for model in ["large", "small"] {
        assert_eq!(
            report["usage"][model]["requests"],
            json!(4),
            "usage.{model}.requests counts successful requests: {report:#}"
        );
    }
    let values = set_of(&VALUES);
    assert_cache_complete(&mut db, &values);
    assert_each_embedded_once(&provider, &values);

    let log = provider.requests();
    for r in &log {
        let seq = r["seq"].as_u64().unwrap();
        let want = if seq % 2 == 0 { 429 } else { 200 };
        assert_eq!(r["status"], json!(want), "request {seq}: {r}");
    }
    let throttled = log.iter().filter(|r| r["status"] == 429).count();
    let ok = log.iter().filter(|r| r["status"] == 200).count();
    assert_eq!(ok, 8, "4 batches x 2 models");
    assert_eq!(
        throttled,
        ok - 1,
        "every even request was a 429 and was retried"
    );

    // Each 429 was retried after the provider's `retry-after-ms`, not the default backoff.
    let retries = log_lines(&worker, "Retrying text-embedding-3-");
    assert_eq!(
        retries.len(),
        throttled,
        "one `Retrying` line per 429:\n{}",
        retries.join("\n")
    );
    for line in &retries {
        assert!(
            line.contains(" in 50 ms"),
            "retry-after-ms: 50 not honoured: {line}"
        );
    }
}

#[test]
fn a_500_on_batch_2_is_retried() {
    let mut db = db_with_options(&VALUES[..6]);
    let (provider, worker) = start_stack(&db, Some(sources_json(2, &[OPTION])));
    // Requests 1 and 2 are batch 1 (large and small concurrently); 3 is the first of batch 2.
    provider.set_faults(&json!({"rules": [{"status": 500, "nth": [3]}]}));

    let report = worker.sync();
    assert_counts(
        "sync with a 500 on batch 2",
        source_entry(&report, OPTION.table),
        &[
            ("total", 6),
            ("new", 6),
            ("embedded", 6),
            ("errors", 0),
            ("batches", 3),
        ],
    );
    let values = set_of(&VALUES[..6]);
    assert_cache_complete(&mut db, &values);
    assert_each_embedded_once(&provider, &values);

    let log = provider.requests();
    let failed: Vec<&Value> = log.iter().filter(|r| r["status"] != 200).collect();
    assert_eq!(failed.len(), 1, "one failed request: {failed:#?}");
    let failed = failed[0];
    assert_eq!(failed["seq"], json!(3));
    assert_eq!(failed["status"], json!(500));
    assert_eq!(failed["fault"], json!("rules[0]: status 500"));
    let retried = log.iter().any(|r| {
        r["seq"].as_u64() > Some(3)
            && r["status"] == 200
            && r["model"] == failed["model"]
            && r["inputs"] == failed["inputs"]
    });
    assert!(retried, "request 3 was not sent again: {log:#?}");
    assert_eq!(log.len(), 7, "six requests and one retry");

    let model = failed["model"].as_str().unwrap();
    let retries = log_lines(&worker, &format!("Retrying {model} in "));
    assert_eq!(retries.len(), 1, "{retries:?}");
    // The first backoff: 500 ms with jitter (between half and all of it).
    let ms: u64 = retries[0]
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wait in {:?}", retries[0]));
    assert!(
        (250..=500).contains(&ms),
        "first backoff {ms} ms: {}",
        retries[0]
    );
}

#[test]
fn a_rejected_api_key_stops_at_once_and_writes_nothing() {
    let mut db = db_with_options(&VALUES[..4]);
    // The provider takes another key than the worker's.
    let provider = Provider::start(Some("sk-e2e-some-other-key"));
    let mut opts = WorkerOpts::new(&db, &provider);
    opts.openai_api_key = API_KEY.to_string();
    // One value per batch: if the run went on, there would be more requests.
    opts.sources = Some(sources_json(1, &[OPTION]));
    let worker = Worker::start(opts);

    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_eq!(status, 502, "POST /sync with a rejected key: {body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"));
    assert!(
        error.contains("OPENAI_API_KEY"),
        "the error must name OPENAI_API_KEY: {error}"
    );
    assert!(
        !error.contains(API_KEY),
        "the error must not show the key: {error}"
    );
    assert!(
        !worker.logs().contains(API_KEY),
        "the log must not show the key"
    );

    assert_eq!(db.cache_count(), 0, "nothing may be written");
    if db.relation_exists("embedding_sync_errors") {
        assert_eq!(
            db.count("SELECT count(*) FROM embedding_sync_errors"),
            0,
            "a 401 is not a value's error"
        );
    }
    let log = provider.requests();
    assert!(
        !log.is_empty() && log.len() <= 2,
        "only the first batch's requests: {log:#?}"
    );
    for r in &log {
        assert_eq!(r["status"], json!(401), "{r}");
        assert_eq!(r["authorized"], json!(false), "{r}");
    }
    let models: std::collections::BTreeSet<&str> =
        log.iter().filter_map(|r| r["model"].as_str()).collect();
    assert_eq!(
        models.len(),
        log.len(),
        "a 401 must not be retried: {log:#?}"
    );
    assert!(
        log_lines(&worker, "Retrying").is_empty(),
        "a 401 must not be retried"
    );
}

#[test]
fn a_401_in_the_middle_of_a_run_stops_it_before_writing_that_batch() {
    let mut db = db_with_options(&VALUES[..6]);
    let (provider, worker) = start_stack(&db, Some(sources_json(2, &[OPTION])));
    // Values go in hash order: batch 1 holds the first two, batch 2 the next two. Batch 1 goes
    // alone; then batches 2 and 3 go together (the window), so the order in which their four
    // requests reach the provider is not fixed: the 401 is for batch 2's large-model request,
    // chosen by its input (not by arrival, which made batch 3 the refused one now and then).
    // The other requests in flight may succeed, but neither batch is written and no batch
    // follows.
    let mut by_hash: Vec<(String, &str)> = VALUES[..6]
        .iter()
        .map(|v| (expected_hash(v).unwrap(), *v))
        .collect();
    by_hash.sort();
    provider.set_faults(&json!({"rules": [{
        "status": 401, "inputContains": by_hash[2].1, "model": "text-embedding-3-large", "times": 1
    }]}));

    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_eq!(status, 502, "POST /sync: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("OPENAI_API_KEY")),
        "{body}"
    );

    let first: Vec<&str> = by_hash[..2].iter().map(|(_, v)| *v).collect();
    assert_cache_complete(&mut db, &set_of(&first));
    let log = provider.requests();
    assert!(log.len() <= 6, "no request after the batches in flight (2 and 3): {log:#?}");
    assert_eq!(
        log.iter().filter(|r| r["status"] == 401).count(),
        1,
        "{log:#?}"
    );

    // With the key accepted again, the next sync does the rest, sending only the rest. (Its
    // report may cover the interrupted run as a whole, so its counts are not checked here: the
    // provider's log and the database are.)
    provider.set_faults(&json!({}));
    provider.clear();
    let report = worker.sync();
    assert_counts(
        "the sync after the 401",
        source_entry(&report, OPTION.table),
        &[("total", 6), ("errors", 0)],
    );
    let rest: Vec<&str> = by_hash[2..].iter().map(|(_, v)| *v).collect();
    assert_each_embedded_once(&provider, &set_of(&rest));
    assert_cache_complete(&mut db, &set_of(&VALUES[..6]));
}

#[test]
fn nearly_used_up_rate_limits_make_the_run_pace_itself() {
    let mut db = db_with_options(&VALUES[..4]);
    let (provider, worker) = start_stack(&db, Some(sources_json(2, &[OPTION])));

    // Plenty left (the provider's default headers): no pacing.
    let report = worker.sync();
    assert_counts(
        "first sync",
        source_entry(&report, OPTION.table),
        &[("embedded", 4)],
    );
    assert!(
        log_lines(&worker, "Pacing").is_empty(),
        "no pacing with room left"
    );

    // One request left in the window: the worker waits for the reset (6 ms) after each request.
    provider.set_faults(&json!({"remainingRequests": 1}));
    db.insert_strs(OPTION, &VALUES[4..8]);
    let report = worker.sync();
    assert_counts(
        "sync with 1 request left",
        source_entry(&report, OPTION.table),
        &[("new", 4), ("embedded", 4), ("errors", 0)],
    );
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let lines = log_lines(&worker, &format!("Pacing {model}"));
        assert_eq!(
            lines.len(),
            2,
            "one `Pacing {model}` line per request (2 batches): {lines:?}"
        );
    }

    // Fewer tokens left than the next request needs: pacing too.
    provider.set_faults(&json!({"remainingTokens": 0}));
    db.insert_strs(OPTION, &VALUES[8..10]);
    let before = log_lines(&worker, "Pacing").len();
    let report = worker.sync();
    assert_counts(
        "sync with 0 tokens left",
        source_entry(&report, OPTION.table),
        &[("embedded", 2)],
    );
    assert!(
        log_lines(&worker, "Pacing").len() > before,
        "no pacing with 0 tokens left"
    );
    assert_cache_complete(&mut db, &set_of(&VALUES[..10]));
}

#[test]
fn a_retry_wait_past_the_invocation_budget_pauses_instead_of_overrunning() {
    let mut db = db_with_options(&VALUES[..6]);
    let provider = Provider::start(Some(API_KEY));
    // An invocation may spend 5 s; batch 2's large request is told to come back in 15 s. Batch 1
    // goes alone, then batches 2 and 3 together (the window).
    let worker = Worker::start(
        WorkerOpts::new(&db, &provider)
            .sources(sources_json(2, &[OPTION]))
            .var("SYNC_MAX_SECONDS", 5),
    );
    provider.set_faults(&json!({"rules": [{"status": 429, "retryAfterMs": 15000, "nth": [3]}]}));

    let started = std::time::Instant::now();
    let first = worker.sync();
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(12), "the invocation waited for the retry: {took:?}");
    assert_eq!(first["status"], "paused", "{first:#}");
    // Batch 3 was in flight when batch 2 paused: it is paid for, so it is written; batch 2 keeps
    // its small embeddings, and the run goes on from it.
    assert_counts(
        "invocation 1 (paused at batch 2, batch 3 written)",
        source_entry(&first, OPTION.table),
        &[("embedded", 4), ("errors", 0), ("batches", 2)],
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_errors"), 0, "an out-of-time batch is not an error");
    // wrangler writes warnings through another stream: the line may land a moment later.
    let not_retried = poll(std::time::Duration::from_secs(10), "a `Not retrying` retry event", || {
        worker.events_of("retry").into_iter().find(|e| e["message"].as_str().is_some_and(|m| m.starts_with("Not retrying")))
    });
    assert_eq!((not_retried["waitMs"].as_u64(), not_retried["level"].as_str()), (Some(15000), Some("warn")), "{not_retried}");
    assert_eq!(not_retried["runId"], first["runId"]);

    // The next invocation goes on from batch 2 in the same run and finishes it.
    let second = worker.sync();
    assert_eq!((second["status"].as_str(), second["runId"].as_str()), (Some("finished"), first["runId"].as_str()), "{second:#}");
    assert_counts(
        "the run, over two invocations",
        source_entry(&second, OPTION.table),
        &[("total", 6), ("new", 6), ("embedded", 6), ("errors", 0), ("batches", 3)],
    );
    assert_cache_complete(&mut db, &set_of(&VALUES[..6]));
}
