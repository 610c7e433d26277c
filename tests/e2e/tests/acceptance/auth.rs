//! The endpoints need `Authorization: Bearer $SYNC_API_TOKEN`, refuse everything when no token is
//! configured, and `/health` needs none.

use embsync_e2e::*;
use serde_json::{json, Value};

fn assert_error(status: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(
        status, want,
        "{what}: expected {want}, got {status}: {body}"
    );
    assert!(
        body["error"].is_string(),
        "{what}: body should be {{\"error\": ...}}, got {body}"
    );
}

fn assert_health(worker: &Worker, db: &TestDb) {
    let (status, body) = worker.get("/health", None);
    assert_eq!(status, 200, "/health: {body}");
    assert_eq!(
        body,
        json!({"status": "ok", "service": "embsync", "version": "0.1.0"})
    );
    let text = body.to_string();
    for secret in [TOKEN, API_KEY, db.url.as_str(), db.name.as_str()] {
        assert!(!text.contains(secret), "/health leaks {secret:?}");
    }
}

#[test]
fn endpoints_refuse_a_missing_or_wrong_token() {
    let mut db = db_with_options(&["Heated seats", "Navigation"]);
    let (provider, worker) = start_stack(&db, None);
    assert_health(&worker, &db);

    let wrong_token = format!("{TOKEN}x");
    let short_token = &TOKEN[..TOKEN.len() - 1];
    let bearer_wrong = format!("Bearer {wrong_token}");
    let bearer_short = format!("Bearer {short_token}");
    let basic = format!("Basic {TOKEN}");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no Authorization header", vec![]),
        (
            "wrong token",
            vec![("Authorization", bearer_wrong.as_str())],
        ),
        (
            "token prefix",
            vec![("Authorization", bearer_short.as_str())],
        ),
        ("empty bearer", vec![("Authorization", "Bearer ")]),
        ("token without scheme", vec![("Authorization", TOKEN)]),
        ("Basic scheme", vec![("Authorization", basic.as_str())]),
    ];
    for (what, headers) in &cases {
        for method in ["GET", "POST"] {
            let path = if method == "GET" { "/dry-run" } else { "/sync" };
            let (status, body) = worker.request_with(method, path, headers);
            assert_error(status, &body, 401, &format!("{method} {path} with {what}"));
        }
    }
    assert_eq!(db.cache_count(), 0, "a refused request must not sync");
    assert!(
        provider.embedding_requests().is_empty(),
        "a refused request must not call the provider"
    );

    // The right token works (so the 401s above are about the token).
    let plan = worker.dry_run();
    assert_counts(
        "dry run with the right token",
        source_entry(&plan, OPTION.table),
        &[("new", 2)],
    );
    let report = worker.sync();
    assert_counts(
        "sync with the right token",
        source_entry(&report, OPTION.table),
        &[("new", 2), ("embedded", 2)],
    );
}

#[test]
fn endpoints_refuse_everything_when_no_token_is_configured() {
    let mut db = db_with_options(&["Heated seats", "Navigation"]);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(WorkerOpts::new(&db, &provider).no_token());
    assert_health(&worker, &db);

    let bearer = format!("Bearer {TOKEN}");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no Authorization header", vec![]),
        ("some token", vec![("Authorization", bearer.as_str())]),
        ("empty bearer", vec![("Authorization", "Bearer ")]),
        (
            "literal undefined",
            vec![("Authorization", "Bearer undefined")],
        ),
    ];
    for (what, headers) in &cases {
        for method in ["GET", "POST"] {
            let path = if method == "GET" { "/dry-run" } else { "/sync" };
            let (status, body) = worker.request_with(method, path, headers);
            assert_error(
                status,
                &body,
                503,
                &format!("{method} {path} with {what} and no SYNC_API_TOKEN"),
            );
        }
    }
    // The status page, which also takes Basic credentials, is closed too.
    let basic = basic_auth("reader", TOKEN);
    for (path, headers) in [
        ("/status.html", vec![("Authorization", basic.as_str())]),
        ("/status", vec![("Authorization", basic.as_str()), ("Accept", "text/html")]),
        ("/status", vec![("Authorization", bearer.as_str())]),
    ] {
        let (status, body) = worker.request_with("GET", path, &headers);
        assert_error(status, &body, 503, &format!("GET {path} with {headers:?} and no SYNC_API_TOKEN"));
    }
    assert_eq!(db.cache_count(), 0, "a refused request must not sync");
    assert!(
        provider.embedding_requests().is_empty(),
        "a refused request must not call the provider"
    );
}
