//! Issue 5 guards at the worker's edge: requests are validated, and no secret reaches the logs.
//! (A broken source failing alone and the mass-delete guard are tested on the store tier,
//! `crates/embsync-store/tests/driver.rs` and `guard.rs`.)

use embsync_e2e::*;
use serde_json::json;

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
