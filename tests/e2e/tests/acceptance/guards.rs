//! Issue 5 guards: a broken source fails alone, a source that suddenly looks empty keeps its
//! embeddings, requests are validated, and no secret reaches the logs.

use embsync_e2e::*;
use serde_json::json;

/// Three sources: one names a table that does not exist, one a column that does not exist.
fn missing_and_real() -> String {
    json!({
        "version": "1.0",
        "models": { "large": LARGE_MODEL, "small": SMALL_MODEL },
        "batchSize": 10,
        "sources": [
            { "name": "Gone", "table": "no_such_table", "column": "description" },
            { "name": "No column", "table": "config_position", "column": "no_such_column" },
            { "name": "Option Descriptions", "table": "config_option", "column": "description" }
        ]
    })
    .to_string()
}

#[test]
fn a_source_whose_table_or_column_is_missing_fails_alone() {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.insert_strs(OPTION, &["Cutter with catch tray", "Peel-off sensor"]);
    let (_provider, worker) = start_stack(&db, Some(missing_and_real()));
    let report = worker.sync();
    let gone = source_entry(&report, "no_such_table");
    let error = gone["error"].as_str().unwrap_or_default();
    assert!(error.contains("no_such_table") && error.contains("does not exist"), "{gone}");
    let no_column = source_entry(&report, "config_position");
    let error = no_column["error"].as_str().unwrap_or_default();
    assert!(error.contains("no_such_column") && error.contains("does not exist"), "{no_column}");
    assert_counts("the other source", source_entry(&report, OPTION.table), &[("new", 2), ("embedded", 2), ("errors", 0)]);
    assert_eq!(db.cache_count(), 2);
}

#[test]
fn a_source_that_suddenly_looks_empty_keeps_its_embeddings_unless_allowed() {
    let mut db = TestDb::create();
    db.create_default_sources();
    let values: Vec<String> = (0..12).map(|i| format!("Label stock option {i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    db.insert_strs(OPTION, &refs);
    let config = |allow: bool| {
        json!({
            "version": "1.0",
            "models": { "large": LARGE_MODEL, "small": SMALL_MODEL },
            "massDeleteMinimum": 5,
            "sources": [{ "name": "Option Descriptions", "table": "config_option", "column": "description", "allowMassDelete": allow }]
        })
        .to_string()
    };
    let provider = Provider::start(None);
    {
        let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config(false)));
        worker.sync();
        // A bad migration empties the table: nothing is deleted and the report says why.
        db.exec("DELETE FROM config_option");
        let report = worker.sync();
        let entry = source_entry(&report, OPTION.table);
        assert_counts("guarded", entry, &[("stale", 0), ("deleted", 0)]);
        let warning = entry["warning"].as_str().unwrap_or_default();
        assert!(warning.contains("returned no values") && warning.contains("allowMassDelete"), "{entry}");
        assert_eq!(db.cache_count(), 12);
    }
    // With allowMassDelete the same deletion goes through.
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config(true)));
    let report = worker.sync();
    assert_counts("allowed", source_entry(&report, OPTION.table), &[("stale", 12), ("deleted", 12)]);
    assert_eq!(db.cache_count(), 0);
}

#[test]
fn query_strings_and_request_bodies_are_validated() {
    let mut db = TestDb::create();
    db.create_default_sources();
    let (_provider, worker) = start_stack(&db, None);
    let (status, body) = worker.get("/dry-run?source=x", Some(TOKEN));
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("no query parameters"), "{body}");
    let (status, body) = worker.request_body("POST", "/sync", TOKEN, "{\"force\": true}");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("no request body"), "{body}");
    assert!(!db.relation_exists("embedding_cache"), "a refused request wrote nothing");
    let (status, body) = worker.request_body("POST", "/sync", TOKEN, "{}");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn no_secret_reaches_the_logs_even_when_things_fail() {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.insert_strs(OPTION, &["Thermal transfer printing, 300 dpi", "bad apple"]);
    let password = "pw-Secret-7f3a9c";
    let api_key = "sk-Secret-2b8e41";
    let token = "tok-Secret-91d0c5";
    let provider = Provider::start(Some(api_key));
    provider.set_faults(&json!({ "rules": [
        { "status": 429, "retryAfterMs": 20, "nth": [1] },
        { "status": 500, "nth": [2] },
        { "status": 400, "inputContains": "bad apple" }
    ]}));
    // Postgres trusts local connections, so the password is carried but not checked.
    let url = db.url.replacen("postgres://postgres@", &format!("postgres://postgres:{password}@"), 1);
    let mut opts = WorkerOpts::new(&db, &provider);
    opts.database_url = url.clone();
    opts.sync_token = Some(token.to_string());
    let worker = Worker::start(opts);
    let (status, body) = worker.request_body("POST", "/sync", token, "");
    assert_eq!(status, 200, "{body}");
    // Failures that carry the secrets' neighbourhood: a wrong token, and a wrong API key.
    let (status, _) = worker.get("/dry-run", Some("tok-wrong"));
    assert_eq!(status, 401);
    let mut wrong_key = WorkerOpts::new(&db, &provider);
    wrong_key.database_url = url;
    wrong_key.sync_token = Some(token.to_string());
    wrong_key.openai_api_key = "sk-Secret-wrong-0000".to_string();
    db.insert_strs(OPTION, &["Another value"]);
    let second = Worker::start(wrong_key);
    let (status, body) = second.request_body("POST", "/sync", token, "");
    assert_eq!(status, 502, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("OPENAI_API_KEY"), "{body}");
    for (name, logs) in [("first worker", worker.logs()), ("second worker", second.logs())] {
        for secret in [password, api_key, token, "sk-Secret-wrong-0000"] {
            assert!(!logs.contains(secret), "{name}'s log contains {secret}");
        }
    }
    for secret in [password, api_key, token, "sk-Secret-wrong-0000"] {
        assert!(!body.to_string().contains(secret), "the error body contains {secret}");
    }
}
