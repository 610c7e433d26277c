//! Issue 11: backfills through the OpenAI Batch API, under `wrangler dev`, against the local
//! provider's `/v1/files` and `/v1/batches` (its switches set through `/_admin/batch`): a backfill
//! with exact counts, each value paid once per model across both ways, and the report at the
//! batch price; an expired batch; per-line errors; workerd killed while it reads an output file;
//! values deleted while their batch is pending.
//!
//! The models have 48 and 24 dimensions (a request then holds up to 2,048 inputs, so a line of
//! a request file is 2,048 values) and the provider completes a batch within a second or two:
//! what is tested (the flow, the bookkeeping) does not depend on the sizes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use embsync_e2e::*;
use serde_json::{json, Value};

use crate::runs::{assert_cache_exact, db_with_parts, ok_input_counts, part_values, runs, secs, stored_report, LARGE_D, PARTS, SMALL_D};

/// The models' list prices in the config, US dollars per million tokens.
const LARGE_PRICE: f64 = 0.13;
const SMALL_PRICE: f64 = 0.02;

/// The inputs of one line of a request file at these dimensions.
const LINE: usize = 2048;

/// The config: [`PARTS`] with the small dimensions, `batchSize` 500 for the synchronous way, and
/// the Batch API for a model with at least `min_values` pending values.
fn config(min_values: u64) -> String {
    json!({
        "version": "1.0",
        "models": {
            "large": {"name": LARGE_MODEL, "dimensions": LARGE_D, "pricePerMillionTokens": LARGE_PRICE},
            "small": {"name": SMALL_MODEL, "dimensions": SMALL_D, "pricePerMillionTokens": SMALL_PRICE},
        },
        "batchSize": 500,
        "batchApi": {"enabled": true, "minValues": min_values},
        "sources": [{"name": PARTS.name, "table": PARTS.table, "column": PARTS.column}],
    })
    .to_string()
}

fn opts(db: &TestDb, provider: &Provider, min_values: u64) -> WorkerOpts {
    WorkerOpts::new(db, provider).sources(config(min_values))
}

/// The provider's batches, waited for until none is running any more (validating, in progress,
/// finalizing, cancelling).
fn wait_batches_over(provider: &Provider, timeout: Duration) -> Vec<Value> {
    poll(timeout, "the provider's batches to end", || {
        let batches = provider.batches();
        let running = ["validating", "in_progress", "finalizing", "cancelling"];
        (!batches.is_empty() && batches.iter().all(|b| !running.contains(&b["status"].as_str().unwrap_or_default()))).then_some(batches)
    })
}

/// `POST /sync` until a report says `finished` (at most `max` runs of the trigger, a short pause
/// between; a 409 while a dead invocation's lease runs out is tried again for up to 30 s).
fn sync_until_finished(worker: &Worker, max: usize) -> Vec<Value> {
    let mut reports = Vec::new();
    for _ in 0..max {
        let report = poll(Duration::from_secs(30), "the sync lease to be free", || {
            let (status, body) = worker.request_body("POST", "/sync", TOKEN, "");
            match status {
                200 => Some(body),
                409 => None,
                _ => panic!("POST /sync -> {status}: {body}\nlog tail:\n{}", worker.log_tail(40)),
            }
        });
        let finished = report["status"] == "finished";
        reports.push(report);
        if finished {
            return reports;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("the run did not finish in {max} triggers: {reports:#?}\nlog tail:\n{}", worker.log_tail(60));
}

/// How many times each value was paid for with `model`: answered 200 by the embeddings
/// endpoint, or in a line of a batch's output file (`paid_in_batches`).
fn paid(provider: &Provider, model: &str, paid_in_batches: &[String]) -> BTreeMap<String, usize> {
    let mut counts = ok_input_counts(provider, model);
    for value in paid_in_batches {
        *counts.entry(value.clone()).or_insert(0) += 1;
    }
    counts
}

/// Every value of `values` paid exactly once for each model, nothing else paid.
fn assert_paid_once(provider: &Provider, values: &BTreeSet<String>, paid_in_batches: &dyn Fn(&str) -> Vec<String>) {
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let counts = paid(provider, model, &paid_in_batches(model));
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
        let missing: Vec<_> = values.iter().filter(|v| !counts.contains_key(*v)).take(5).collect();
        let extra: Vec<_> = counts.keys().filter(|v| !values.contains(*v)).take(5).collect();
        assert!(
            twice.is_empty() && missing.is_empty() && extra.is_empty(),
            "{model}: each of {} values paid once across both ways: twice {twice:?}, never {missing:?}, not in the source {extra:?}",
            values.len()
        );
    }
}

/// The inputs of `model`'s batches that the provider ran: each batch's inputs in file order,
/// as many lines of them as its `request_counts.completed` (the lines that ran are the first:
/// these tests fail none, and an expiry stops the lines in order), a line holding [`LINE`]
/// inputs but the file's last. (The output files themselves are gone: embsync deletes a
/// batch's files once it has read them.)
fn batch_outputs(provider: &Provider, model: &str) -> Vec<String> {
    let mut out = Vec::new();
    for b in provider.batches().iter().filter(|b| b["model"] == model) {
        let id = b["id"].as_str().unwrap();
        let inputs = provider.batch_inputs(id);
        let completed = provider.batch_object(id)["request_counts"]["completed"].as_u64().unwrap() as usize;
        out.extend_from_slice(&inputs[..(completed * LINE).min(inputs.len())]);
    }
    out
}

/// A batch's `request_counts` as the last report or `/status` showed them are checked by the
/// tests; this is the sum of the report's per-model usage as `(tokens, batch tokens)`.
fn usage(report: &Value, slot: &str) -> (u64, u64) {
    let u = &report["usage"][slot];
    (u["promptTokens"].as_u64().unwrap_or(0), u["batchPromptTokens"].as_u64().unwrap_or(0))
}

#[test]
fn a_20000_value_backfill_goes_through_the_batch_api_once_at_the_batch_price() {
    const DISTINCT: u64 = 20_000;
    let t0 = Instant::now();
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    provider.set_batch(&json!({"validatingMs": 200, "completionMs": 1500, "finalizingMs": 200}));
    let worker = Worker::start(opts(&db, &provider, 10_000));

    // The dry run shows which way each model goes, at both prices.
    let plan = worker.dry_run();
    assert_eq!(plan["batchApi"]["large"]["way"], json!("batchApi"), "{:#}", plan["batchApi"]);
    assert_eq!(plan["batchApi"]["small"]["way"], json!("batchApi"), "{:#}", plan["batchApi"]);

    // The first trigger submits one file per model and waits for them.
    let first = worker.sync();
    assert_eq!(first["status"], json!("paused"), "{first:#}");
    assert_eq!(first["pendingBatches"], json!({"batches": 2, "values": 2 * DISTINCT, "reading": 0}), "{first:#}");
    assert!(provider.embedding_requests().is_empty(), "nothing goes the synchronous way: {:?}", provider.embedding_requests().len());
    let status = worker.status();
    let pending = status["pendingBatches"].as_array().expect("pendingBatches in /status");
    let shown: Vec<(String, u64)> =
        pending.iter().map(|m| (m["slot"].as_str().unwrap().to_owned(), m["batches"][0]["values"].as_u64().unwrap())).collect();
    assert_eq!(shown, vec![("large".into(), DISTINCT), ("small".into(), DISTINCT)], "{status:#}");
    for m in pending {
        let b = &m["batches"][0];
        assert!(b["batchId"].is_string() && b["ageSeconds"].is_u64() && b["state"].is_string(), "{b:#}");
    }
    let page = worker.get_full("/status.html", &[("Authorization", &format!("Bearer {TOKEN}"))]);
    assert!(page.body.contains("Pending batches") && page.body.contains(pending[0]["batches"][0]["batchId"].as_str().unwrap()));

    // Once the provider is done, the next trigger reads the output and finishes the run.
    let batches = wait_batches_over(&provider, Duration::from_secs(60));
    assert!(batches.iter().all(|b| b["status"] == "completed"), "{batches:#?}");
    let t1 = Instant::now();
    let reports = sync_until_finished(&worker, 5);
    let report = reports.last().unwrap();
    eprintln!("batch_api: {DISTINCT} values stored {:.1} s after the batches completed", secs(t1));

    let run_id = runs(&mut db)[0].0.clone();
    assert_eq!(runs(&mut db).len(), 1, "one run");
    assert_eq!(report["runId"], json!(run_id));
    let d = DISTINCT as i64;
    assert_counts("report totals", &report["totals"], &[("total", d), ("new", d), ("embedded", d), ("errors", 0), ("deferred", 0)]);
    assert_eq!(stored_report(&mut db, &run_id)["totals"], report["totals"]);
    assert_cache_exact(&mut db, d);
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values"), 0, "every batch value is forgotten once stored");
    assert_eq!(worker.status()["pendingBatches"], json!([]));

    // Each value once per model, across both ways; here all went through the batches.
    assert_paid_once(&provider, &values, &|model| batch_outputs(&provider, model));
    assert!(provider.embedding_requests().is_empty());

    // The report's usage is all Batch API usage, priced at half the list price.
    let (large, large_batch) = usage(report, "large");
    let (small, small_batch) = usage(report, "small");
    assert!(large > 0 && small > 0, "{:#}", report["usage"]);
    assert_eq!((large_batch, small_batch), (large, small), "all tokens went through batches: {:#}", report["usage"]);
    let want = ((large as f64 * LARGE_PRICE + small as f64 * SMALL_PRICE) / 2.0 / 1e6 * 1e6).round() / 1e6;
    let cost = report["usage"]["costUsd"].as_f64().unwrap();
    assert!((cost - want).abs() < 2e-6, "costUsd {cost} is not the batch price {want}: {:#}", report["usage"]);
    eprintln!("batch_api: whole test {:.1} s", secs(t0));
}

#[test]
fn an_expired_batch_keeps_what_finished_and_the_rest_goes_the_synchronous_way() {
    // Three lines per model; the batches expire after their first line.
    const DISTINCT: u64 = 2 * LINE as u64 + 100;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    provider.set_batch(&json!({"completionMs": 500, "expireAfterLines": 1}));
    // What the expiry leaves (2,148 values) stays under minValues: the next run goes the
    // synchronous way.
    let worker = Worker::start(opts(&db, &provider, 3_000));

    assert_eq!(worker.sync()["status"], json!("paused"));
    let batches = wait_batches_over(&provider, Duration::from_secs(30));
    assert!(batches.iter().all(|b| b["status"] == "expired"), "{batches:#?}");
    let reports = sync_until_finished(&worker, 5);
    let first = reports.last().unwrap();
    // What finished is stored (one line, both models); nothing went the synchronous way yet.
    assert_counts("the expired run", &first["totals"], &[("embedded", LINE as i64), ("errors", 0)]);
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL"),
        LINE as i64
    );
    assert!(provider.embedding_requests().is_empty());
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values"), 0, "the expired lines' values are released");

    // The next run embeds the rest synchronously, once.
    let second = worker.sync();
    assert_eq!(second["status"], json!("finished"), "{second:#}");
    let rest = (DISTINCT - LINE as u64) as i64;
    assert_counts("the next run", &second["totals"], &[("new", rest), ("embedded", rest), ("unchanged", LINE as i64)]);
    assert_eq!(usage(&second, "large").1, 0, "no batch usage in a synchronous run");
    assert_cache_exact(&mut db, DISTINCT as i64);
    assert_paid_once(&provider, &values, &|model| batch_outputs(&provider, model));
    for model in [LARGE_MODEL, SMALL_MODEL] {
        assert_eq!(batch_outputs(&provider, model).len(), LINE, "{model}: one line ran");
    }
}

#[test]
fn per_line_errors_go_to_the_error_table_and_the_other_lines_are_stored() {
    // Two lines per model; the one holding the poisoned value is refused for its input.
    const DISTINCT: u64 = LINE as u64 + 300;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    db.exec(&format!("UPDATE {t} SET {c} = {c} || ' poison' WHERE {c} = 'Part 7 ' || md5('7')", t = PARTS.table, c = PARTS.column));
    let provider = Provider::start(Some(API_KEY));
    provider.set_batch(&json!({"completionMs": 300, "failInputContains": "poison"}));
    let worker = Worker::start(opts(&db, &provider, 1_000));

    assert_eq!(worker.sync()["status"], json!("paused"));
    let batches = wait_batches_over(&provider, Duration::from_secs(30));
    let refused: BTreeSet<String> = batches
        .iter()
        .flat_map(|b| {
            let object = provider.batch_object(b["id"].as_str().unwrap());
            let file = object["error_file_id"].as_str().expect("an error file").to_owned();
            assert_eq!(object["request_counts"]["failed"], json!(1), "{object:#}");
            provider.file_lines(&file)
        })
        .map(|line| {
            assert_eq!(line["response"]["status_code"], json!(400), "{line}");
            line["custom_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(refused.len(), 2, "one refused line per model: {refused:?}");
    let report = sync_until_finished(&worker, 5).pop().unwrap();

    // The refused line's values are in the error table (once per value, with the model that
    // refused them), the other line's values are stored; nothing went the synchronous way.
    let failed = db.count("SELECT count(DISTINCT value_hash) FROM embedding_sync_errors");
    let stored = db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL");
    assert!(failed == LINE as i64 || failed == 300, "the values of one line: {failed}");
    assert_eq!(stored + failed, DISTINCT as i64, "every value stored or recorded as failed");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache c JOIN embedding_sync_errors e USING (value_hash)"), 0);
    let poisoned = db.count(
        "SELECT count(*) FROM embedding_sync_errors e WHERE e.value_hash = encode(sha256(convert_to('Part 7 ' || md5('7') || ' poison', 'UTF8')), 'hex') AND e.message LIKE '%refused%(400)%'",
    );
    assert_eq!(poisoned, 1, "the poisoned value is recorded with the provider's refusal");
    // A value both models refused counts once, as on the synchronous way.
    assert_counts("the run's report", &report["totals"], &[("embedded", stored), ("errors", failed)]);
    assert!(provider.embedding_requests().is_empty());
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values"), 0);
}

#[test]
fn workerd_killed_while_reading_the_output_neither_loses_nor_pays_twice() {
    // Three lines per model, the output sent a line every 1.5 s: the kill lands after the
    // first line is stored.
    const DISTINCT: u64 = 2 * LINE as u64 + 100;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let values = part_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    provider.set_batch(&json!({"completionMs": 300, "lineDelayMs": 1500}));
    let kv = SharedDir::new("embsync-e2e-batch-api-kv");
    let opts = |db: &TestDb| opts(db, &provider, 1_000).persist_to(&kv.path);
    let mut first = Worker::start(opts(&db));
    assert_eq!(first.sync()["status"], json!("paused"));
    wait_batches_over(&provider, Duration::from_secs(30));
    let recorded = db.count("SELECT count(*) FROM embedding_sync_batch_values");
    assert_eq!(recorded, 2 * DISTINCT as i64);

    let _trigger = first.scheduled_in_background();
    poll(Duration::from_secs(60), "the first output line to be stored", || {
        let left = db.count("SELECT count(*) FROM embedding_sync_batch_values");
        (left < recorded).then_some(())
    });
    first.kill_hard();
    let left = db.count("SELECT count(*) FROM embedding_sync_batch_values");
    let rows = db.count("SELECT count(*) FROM embedding_cache");
    eprintln!("batch_api: killed with {rows} cache rows written, {left} of {recorded} batch values waiting");
    assert!(left > 0 && rows > 0, "the kill should land mid-file: {rows} rows, {left} values waiting");
    // The dead invocation's lease runs out, as it does SYNC_LEASE_SECONDS after its last write.
    db.exec("UPDATE embedding_sync_lease SET expires_at = now()");

    // A new workerd reads the files again and stores what was not stored, once.
    let second = Worker::start(opts(&db));
    let report = sync_until_finished(&second, 5).pop().unwrap();
    let d = DISTINCT as i64;
    assert_counts("the report", &report["totals"], &[("total", d), ("new", d), ("embedded", d), ("errors", 0)]);
    assert_cache_exact(&mut db, d);
    assert_paid_once(&provider, &values, &|model| batch_outputs(&provider, model));
    assert!(provider.embedding_requests().is_empty(), "nothing was sent again the synchronous way");
    assert_eq!(runs(&mut db).len(), 1);
}

#[test]
fn values_deleted_while_their_batch_was_pending_are_not_stored() {
    const DISTINCT: u64 = 1_500;
    const DELETED: i64 = 100;
    let mut db = db_with_parts(DISTINCT, DISTINCT);
    let provider = Provider::start(Some(API_KEY));
    provider.set_batch(&json!({"completionMs": 1000}));
    let worker = Worker::start(opts(&db, &provider, 1_000));
    assert_eq!(worker.sync()["status"], json!("paused"));
    // While the batches are pending, rows leave the source, and a new value comes.
    db.exec(&format!(
        "DELETE FROM {t} WHERE {c} IN (SELECT {c} FROM {t} ORDER BY {c} LIMIT {DELETED}); INSERT INTO {t} ({c}) VALUES ('a value of later')",
        t = PARTS.table,
        c = PARTS.column
    ));
    wait_batches_over(&provider, Duration::from_secs(30));
    let report = sync_until_finished(&worker, 5).pop().unwrap();
    let kept = DISTINCT as i64 - DELETED;
    assert_counts("the run", &report["totals"], &[("embedded", kept), ("errors", 0)]);
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache"), kept, "the deleted values are not stored");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE value = 'a value of later'"), 0, "a new value waits for the next run");
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values"), 0);

    // The next run embeds the new value (synchronously: one value is under minValues) and
    // nothing else.
    let before = provider.embedding_requests().len();
    let next = worker.sync();
    assert_counts("the next run", &next["totals"], &[("new", 1), ("embedded", 1), ("unchanged", kept), ("stale", 0)]);
    assert_eq!(provider.inputs_for(LARGE_MODEL), vec!["a value of later".to_owned()]);
    assert!(provider.embedding_requests().len() > before);
    assert_cache_exact(&mut db, kept + 1);
}
