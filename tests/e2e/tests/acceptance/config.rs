//! The configuration: the compiled-in sources load, and bad `EMBEDDING_SOURCES` is rejected with
//! the documented error before anything is written.

use embsync_e2e::*;
use serde_json::{json, Value};

/// The default config as JSON, to be broken by the tests.
fn default_config() -> Value {
    serde_json::from_str(&sources_json(100, &DEFAULT_SOURCES)).unwrap()
}

#[test]
fn config_loads_dry_run_lists_the_three_default_sources() {
    let mut db = TestDb::create();
    db.create_default_sources();
    let (provider, worker) = start_stack(&db, None);

    let plan = worker.dry_run();
    assert_eq!(plan["dryRun"], json!(true), "plan: {plan:#}");
    let listed: Vec<(String, String, String)> = plan["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no sources[] in {plan:#}"))
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["table"].as_str().unwrap_or_default().to_string(),
                s["column"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = DEFAULT_SOURCES
        .iter()
        .map(|s| {
            (
                s.name.to_string(),
                s.table.to_string(),
                s.column.to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed, expected,
        "the dry run must list the compiled-in sources in order"
    );
    assert_eq!(plan["batchSize"], json!(100), "plan: {plan:#}");
    assert_eq!(
        plan["models"],
        json!({"large": {"model": LARGE_MODEL, "dimensions": 3072}, "small": {"model": SMALL_MODEL, "dimensions": 1536}}),
        "plan: {plan:#}"
    );
    assert_eq!(
        plan["disabled"],
        json!([]),
        "all default sources are enabled: {plan:#}"
    );
    for s in DEFAULT_SOURCES {
        assert_counts(
            s.name,
            source_entry(&plan, s.table),
            &[("total", 0), ("new", 0), ("stale", 0), ("toEmbed", 0)],
        );
    }
    assert!(
        provider.embedding_requests().is_empty(),
        "a dry run must not call the provider"
    );
}

/// Starts a worker with `config` as `EMBEDDING_SOURCES` and checks that the dry run and the sync
/// both answer 500 `invalid embedding sources config: ...` naming every one of `needles`, and
/// that nothing was written and the provider was not called.
fn assert_rejected(config: &str, needles: &[&str]) {
    let mut db = db_with_options(&["Leather seats", "Sunroof"]);
    let (provider, worker) = start_stack(&db, Some(config.to_string()));

    for (method, path) in [("GET", "/dry-run"), ("POST", "/sync")] {
        let (status, body) = if method == "GET" {
            worker.get(path, Some(TOKEN))
        } else {
            worker.post(path, Some(TOKEN))
        };
        assert_eq!(
            status, 500,
            "{method} {path} with config {config}: expected 500, got {status}: {body}"
        );
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no \"error\" string in {body}"));
        assert!(
            msg.starts_with("invalid embedding sources config"),
            "{method} {path}: error should start with `invalid embedding sources config`, got {msg:?}"
        );
        for n in needles {
            assert!(
                msg.contains(n),
                "{method} {path}: error {msg:?} should name {n:?} (config {config})"
            );
        }
    }
    for table in [
        "embedding_cache",
        "embedding_cache_sources",
        "embedding_cache_owned",
    ] {
        assert!(
            !db.relation_exists(table),
            "bad config: nothing may be written, but {table} was created"
        );
    }
    assert!(
        provider.embedding_requests().is_empty(),
        "bad config: the provider must not be called"
    );
}

#[test]
fn bad_config_unknown_top_level_key() {
    let mut c = default_config();
    c["colour"] = json!("blue");
    assert_rejected(&c.to_string(), &["colour"]);
}

#[test]
fn bad_config_unknown_key_in_a_source() {
    let mut c = default_config();
    c["sources"][1]["colour"] = json!("blue");
    assert_rejected(&c.to_string(), &["sources[1]", "colour"]);
}

#[test]
fn bad_config_missing_field() {
    let mut c = default_config();
    c["sources"][2].as_object_mut().unwrap().remove("column");
    assert_rejected(&c.to_string(), &["sources[2]", "column", "missing"]);
}

#[test]
fn bad_config_duplicate_table_column_pair() {
    let mut c = default_config();
    c["sources"][2] = json!({"name": "Descriptions Again", "table": "config_option", "column": "description", "enabled": true});
    assert_rejected(&c.to_string(), &["duplicate"]);
}

#[test]
fn bad_config_batch_size_zero() {
    let mut c = default_config();
    c["batchSize"] = json!(0);
    assert_rejected(&c.to_string(), &["batchSize"]);
}

#[test]
fn bad_config_batch_size_5000() {
    let mut c = default_config();
    c["batchSize"] = json!(5000);
    assert_rejected(&c.to_string(), &["batchSize"]);
}

#[test]
fn bad_config_invalid_table_identifier() {
    let mut c = default_config();
    c["sources"][0]["table"] = json!("x; drop table y");
    assert_rejected(&c.to_string(), &["sources[0].table"]);
}

#[test]
fn bad_config_invalid_column_identifier() {
    let mut c = default_config();
    c["sources"][1]["column"] = json!("label\"--");
    assert_rejected(&c.to_string(), &["sources[1].column"]);
}

#[test]
fn config_accepts_schema_qualified_table() {
    let mut db = TestDb::create();
    db.exec("CREATE SCHEMA inventory; CREATE TABLE inventory.items (id bigserial PRIMARY KEY, label text)");
    db.insert(
        "inventory.items",
        "label",
        &[
            Some("Bolt M6"),
            Some("Nut M6"),
            Some("Washer 6 mm"),
            Some("Bolt M6 "),
        ],
    );
    let config = json!({
        "version": "1.0",
        "models": {"large": LARGE_MODEL, "small": SMALL_MODEL},
        "batchSize": 10,
        "sources": [{"name": "Inventory Labels", "table": "inventory.items", "column": "label", "enabled": true}]
    });
    let (_provider, worker) = start_stack(&db, Some(config.to_string()));

    let plan = worker.dry_run();
    assert_counts(
        "dry run of inventory.items",
        source_entry(&plan, "inventory.items"),
        &[("total", 3), ("new", 3)],
    );
    let report = worker.sync();
    assert_counts(
        "sync of inventory.items",
        source_entry(&report, "inventory.items"),
        &[("total", 3), ("new", 3), ("embedded", 3), ("errors", 0)],
    );
    let expected = hashes_of(&distinct_trimmed(&[
        Some("Bolt M6"),
        Some("Nut M6"),
        Some("Washer 6 mm"),
    ]));
    assert_eq!(db.cache_hashes(), expected);
}

#[test]
fn a_lease_shorter_than_the_time_budget_allows_is_a_configuration_error() {
    let mut db = db_with_options(&["Leather seats", "Sunroof"]);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(WorkerOpts::new(&db, &provider).var("SYNC_MAX_SECONDS", 120).var("SYNC_LEASE_SECONDS", 150));
    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_eq!(status, 500, "POST /sync: {body}");
    let msg = body["error"].as_str().unwrap_or_else(|| panic!("no \"error\" string in {body}"));
    assert!(
        msg.contains("SYNC_LEASE_SECONDS (150) must be at least 1.5 times SYNC_MAX_SECONDS (120)") && msg.contains("to 180 or more"),
        "the error says what to set: {msg:?}"
    );
    // The cron trigger logs the same error.
    let (status, _) = worker.scheduled();
    assert_eq!(status, 200);
    worker.wait_for_log("Sync failed: SYNC_LEASE_SECONDS (150)", std::time::Duration::from_secs(30));
    assert!(!db.relation_exists("embedding_cache"), "nothing may be written");
    assert!(provider.embedding_requests().is_empty(), "the provider must not be called");
}
