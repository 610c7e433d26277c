//! Values the provider refuses for good are recorded in `embedding_sync_errors`, skipped until
//! their retry time, retried with backoff, and cleared once they succeed; the rest of the run is
//! not lost because of them. Values too long for the models are never sent.

use std::time::Duration;

use embsync_e2e::*;
use postgres::Row;
use serde_json::{json, Value};

use super::*;

const GOOD: [&str; 5] = [
    "Thermal transfer printing, 203 dpi",
    "Cutter with catch tray",
    "Peel-off with liner take-up",
    "UHF RFID encoder (ETSI and FCC regions)",
    "Wireless LAN 802.11ac with Bluetooth 4.2",
];
/// Refused by both models.
const BAD: &str = "Label taken sensor (refused by the provider)";
/// Refused by the small model only.
const HALF: &str = "Real-time clock with battery backup [small refuses]";

/// One row of `embedding_sync_errors`.
#[derive(Debug)]
struct ErrorRow {
    source_table: String,
    source_column: String,
    model: String,
    message: String,
    attempts: i32,
    /// `next_retry_at - now()` in seconds.
    retry_in_s: f64,
    /// `last_failed_at - first_failed_at` in seconds.
    failing_for_s: f64,
}

fn error_row(db: &mut TestDb, value: &str) -> Option<ErrorRow> {
    let rows: Vec<Row> = db
        .client()
        .query(
            "SELECT source_table, source_column, model, message, attempts, \
                    extract(epoch FROM next_retry_at - now())::float8, \
                    extract(epoch FROM last_failed_at - first_failed_at)::float8 \
             FROM embedding_sync_errors WHERE value_hash = $1",
            &[&expected_hash(value).unwrap()],
        )
        .expect("select embedding_sync_errors");
    assert!(rows.len() <= 1, "one error row per value and source");
    rows.first().map(|r| ErrorRow {
        source_table: r.get(0),
        source_column: r.get(1),
        model: r.get(2),
        message: r.get(3),
        attempts: r.get(4),
        retry_in_s: r.get(5),
        failing_for_s: r.get(6),
    })
}

fn error_count(db: &mut TestDb) -> i64 {
    db.count("SELECT count(*) FROM embedding_sync_errors")
}

/// Simulates the passing of time: every recorded error is due.
fn make_errors_due(db: &mut TestDb) {
    db.exec("UPDATE embedding_sync_errors SET next_retry_at = now() - interval '1 second'");
}

/// The distinct inputs sent for `model` (any status), sorted. (A refused request is split in
/// halves, so a refused value is sent more than once.)
fn sent(provider: &Provider, model: &str) -> Vec<String> {
    let mut v = provider.inputs_for(model);
    v.sort();
    v.dedup();
    v
}

#[test]
fn a_value_that_always_fails_is_recorded_deferred_retried_and_cleared() {
    let mut all: Vec<&str> = GOOD.to_vec();
    all.extend([BAD, HALF]);
    let mut db = db_with_options(&all);
    let (provider, worker) = start_stack(&db, Some(sources_json(100, &[OPTION])));
    let faults = json!({"rules": [
        {"status": 400, "inputContains": "(refused by the provider)"},
        {"status": 400, "inputContains": "[small refuses]", "model": SMALL_MODEL},
    ]});
    provider.set_faults(&faults);

    // Run 1: the two refused values are isolated; the rest is stored.
    let report = worker.sync();
    assert_counts(
        "run 1",
        source_entry(&report, OPTION.table),
        &[
            ("total", 7),
            ("new", 7),
            ("embedded", 5),
            ("errors", 2),
            ("deferred", 0),
        ],
    );
    assert_counts(
        "run 1 totals",
        &report["totals"],
        &[("embedded", 5), ("errors", 2)],
    );
    for v in GOOD {
        let (l, s) = db.embeddings_of(&expected_hash(v).unwrap());
        assert!(
            l.is_some() && s.is_some(),
            "{v:?} must be stored with both embeddings"
        );
    }
    assert!(
        !db.cache_hashes().contains(&expected_hash(BAD).unwrap()),
        "a value no model embedded is not written"
    );
    let (half_large, half_small) = db.embeddings_of(&expected_hash(HALF).unwrap());
    assert!(
        half_large.is_some(),
        "the large embedding of {HALF:?} is paid for: kept"
    );
    assert!(half_small.is_none());

    let bad = error_row(&mut db, BAD).expect("an error row for the refused value");
    assert_eq!(
        (bad.source_table.as_str(), bad.source_column.as_str()),
        (OPTION.table, OPTION.column)
    );
    assert!(
        bad.model.contains(LARGE_MODEL) && bad.model.contains(SMALL_MODEL),
        "{bad:?}"
    );
    assert!(
        bad.message.contains("400"),
        "the message should carry the provider's refusal: {bad:?}"
    );
    assert_eq!(bad.attempts, 1);
    assert!(
        (240.0..=301.0).contains(&bad.retry_in_s),
        "first retry in 5 minutes: {bad:?}"
    );
    assert_eq!(bad.failing_for_s, 0.0);
    let half = error_row(&mut db, HALF).expect("an error row for the value small refuses");
    assert_eq!(half.model, SMALL_MODEL, "{half:?}");
    assert_eq!(half.attempts, 1);
    assert_eq!(error_count(&mut db), 2);
    // The refused value was sent (and refused), never answered 200.
    assert!(sent(&provider, LARGE_MODEL).contains(&BAD.to_string()));
    assert!(!ok_inputs(&provider, LARGE_MODEL).contains(&BAD.to_string()));
    assert!(!ok_inputs(&provider, SMALL_MODEL).contains(&BAD.to_string()));

    // Run 2, at once: both values wait for their retry time; nothing is sent.
    provider.clear();
    let plan = worker.dry_run();
    assert_counts(
        "dry run before the retry time",
        source_entry(&plan, OPTION.table),
        &[("deferred", 2)],
    );
    let report = worker.sync();
    assert_counts(
        "run 2",
        source_entry(&report, OPTION.table),
        &[("new", 2), ("embedded", 0), ("errors", 0), ("deferred", 2)],
    );
    assert_eq!(report["totals"]["deferred"], json!(2), "{report:#}");
    assert!(
        provider.requests().is_empty(),
        "deferred values must not be sent: {:#?}",
        provider.requests()
    );

    // Run 3, after the retry time: sent again (only the missing model for HALF), refused again.
    make_errors_due(&mut db);
    std::thread::sleep(Duration::from_millis(20));
    let report = worker.sync();
    assert_counts(
        "run 3",
        source_entry(&report, OPTION.table),
        &[("new", 2), ("embedded", 0), ("errors", 2), ("deferred", 0)],
    );
    assert_eq!(
        sent(&provider, LARGE_MODEL),
        vec![BAD.to_string()],
        "large: only the value it lacks"
    );
    assert_eq!(sent(&provider, SMALL_MODEL), {
        let mut v = vec![BAD.to_string(), HALF.to_string()];
        v.sort();
        v
    });
    let bad = error_row(&mut db, BAD).unwrap();
    assert_eq!(bad.attempts, 2, "{bad:?}");
    assert!(
        bad.retry_in_s > 15.0 * 60.0,
        "the second wait is longer (x4): {bad:?}"
    );
    assert!(bad.failing_for_s > 0.0, "last_failed_at moved: {bad:?}");
    assert_eq!(error_row(&mut db, HALF).unwrap().attempts, 2);

    // Run 4: the provider takes them now; they are stored and their error rows are gone.
    provider.set_faults(&json!({}));
    provider.clear();
    make_errors_due(&mut db);
    let report = worker.sync();
    assert_counts(
        "run 4",
        source_entry(&report, OPTION.table),
        &[
            ("total", 7),
            ("new", 2),
            ("embedded", 2),
            ("errors", 0),
            ("deferred", 0),
        ],
    );
    assert_eq!(ok_inputs(&provider, LARGE_MODEL), vec![BAD.to_string()]);
    assert_eq!(ok_inputs(&provider, SMALL_MODEL), {
        let mut v = vec![BAD.to_string(), HALF.to_string()];
        v.sort();
        v
    });
    assert_eq!(
        error_count(&mut db),
        0,
        "a stored value's error row is cleared"
    );
    assert_cache_complete(&mut db, &set_of(&all));
    let (half_large_after, _) = db.embeddings_of(&expected_hash(HALF).unwrap());
    assert_eq!(
        half_large_after, half_large,
        "the kept large embedding is not rewritten"
    );

    // And a fifth run has nothing to do.
    provider.clear();
    let report = worker.sync();
    assert_counts(
        "run 5",
        source_entry(&report, OPTION.table),
        &[("new", 0), ("deferred", 0), ("embedded", 0)],
    );
    assert!(provider.requests().is_empty());
}

/// A value of exactly `len` ASCII bytes: words of product text, each one `cl100k_base` token
/// (which the local provider counts exactly, and the worker's estimate counts alike): one token
/// per 6.6 bytes, 4,965 at 32 KiB, 9,697 at 64,000 bytes.
fn long_text(len: usize) -> String {
    let words = "label printer paper sensor cover ";
    let mut s = String::with_capacity(len + words.len());
    while s.len() < len {
        s.push_str(words);
    }
    s.truncate(len);
    // No trailing space: the value must survive trimming unchanged.
    if s.ends_with(' ') {
        s.pop();
        s.push('x');
    }
    s
}

#[test]
fn a_value_over_8192_tokens_is_recorded_and_never_sent() {
    let at_limit = long_text(32_768);
    let over = long_text(64_000);
    let mut values: Vec<&str> = GOOD[..3].to_vec();
    values.push(&at_limit);
    values.push(&over);
    let mut db = db_with_options(&values);
    let (provider, worker) = start_stack(&db, Some(sources_json(100, &[OPTION])));

    let report = worker.sync();
    assert_counts(
        "sync with an over-long value",
        source_entry(&report, OPTION.table),
        &[
            ("total", 5),
            ("new", 5),
            ("embedded", 4),
            ("errors", 1),
            ("deferred", 0),
        ],
    );
    let mut done: Vec<&str> = GOOD[..3].to_vec();
    done.push(&at_limit);
    assert_each_embedded_once(&provider, &set_of(&done));
    let longest = provider
        .requests()
        .iter()
        .flat_map(|r| r["inputs"].as_array().cloned().unwrap_or_default())
        .map(|i| i.as_str().map_or(0, str::len))
        .max()
        .unwrap_or(0);
    assert_eq!(longest, 32_768, "the 64,000-byte value must never be sent");
    assert!(!db.cache_hashes().contains(&expected_hash(&over).unwrap()));
    assert_eq!(db.cache_count(), 4);

    let row = error_row(&mut db, &over).expect("an error row for the over-long value");
    assert_eq!(row.model, "all", "{row:?}");
    assert_eq!(row.attempts, 1);
    assert!(row.retry_in_s > 0.0, "{row:?}");
    assert!(
        row.message.contains("8192") || row.message.contains("8,192"),
        "{row:?}"
    );
    assert_eq!(error_count(&mut db), 1);

    // It waits like any failed value; nothing is sent meanwhile.
    provider.clear();
    let report = worker.sync();
    assert_counts(
        "re-run",
        source_entry(&report, OPTION.table),
        &[("new", 1), ("deferred", 1), ("embedded", 0), ("errors", 0)],
    );
    assert!(provider.requests().is_empty());
}

/// A refusal of the request itself (here: `dimensions` sent to a model that takes none, and a
/// model the provider does not know, 404) is not split and blames no value: one request of that
/// model, the other model embeds everything, and the run says what to fix.
#[test]
fn a_refusal_of_the_request_itself_ends_that_models_work_and_blames_no_value() {
    for (small, status) in [
        (
            json!({"name": "text-embedding-ada-002", "dimensions": 1536}),
            400,
        ),
        (
            json!({"name": "text-embedding-3-smal", "dimensions": 1536}),
            404,
        ),
    ] {
        let db = db_with_options(&GOOD);
        let mut config: Value = serde_json::from_str(&sources_json(2, &[OPTION])).unwrap();
        config["models"]["small"] = small.clone();
        let (provider, worker) = start_stack(&db, Some(config.to_string()));
        let report = worker.sync();
        let small_name = small["name"].as_str().unwrap();
        let small_requests: Vec<Value> = provider
            .requests()
            .into_iter()
            .filter(|r| r["model"] == json!(small_name))
            .collect();
        assert_eq!(
            small_requests.len(),
            1,
            "{status}: one request, not split: {small_requests:#?}"
        );
        assert_eq!(
            small_requests[0]["status"],
            json!(status),
            "{small_requests:#?}"
        );
        assert_eq!(
            sent(&provider, LARGE_MODEL),
            set_of(&GOOD).into_iter().collect::<Vec<_>>(),
            "the large model embeds everything"
        );
        assert_counts(
            &format!("{status}"),
            source_entry(&report, OPTION.table),
            &[("total", 5), ("embedded", 0), ("errors", 0)],
        );
        let stopped = report["stopped"].as_str().unwrap_or_default();
        assert!(
            stopped.contains(small_name) && stopped.contains("models.small"),
            "{status}: {report:#}"
        );
        let mut db = db;
        assert_eq!(error_count(&mut db), 0, "{status}: no value is to blame");
    }
}
