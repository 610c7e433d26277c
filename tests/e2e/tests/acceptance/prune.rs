//! Issue 9, hole 11: a source that left the config is listed by `GET /status` (JSON and page)
//! with what it still holds, and `POST /prune` removes it only when asked and confirmed.

use embsync_e2e::*;
use serde_json::{json, Value};

#[test]
fn a_source_that_left_the_config_is_listed_by_status_and_pruned_by_post_prune() {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.insert_strs(OPTION, &["Cutter with catch tray", "Peel-off sensor"]);
    db.insert_strs(POSITION, &["Peel-off sensor", "Print width", "Media type"]);
    let provider = Provider::start(None);
    {
        let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(sources_json(10, &[OPTION, POSITION])));
        worker.sync();
    }
    assert_eq!(db.cache_count(), 4);
    // Attribute Labels leaves the config.
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(sources_json(10, &[OPTION])));
    let status = worker.status();
    let left = json!([{"table": POSITION.table, "column": POSITION.column, "reason": "removed", "name": null,
                       "links": 3, "errors": 0, "rows": 2, "batchValues": 0, "sameAs": null}]);
    assert_eq!(status["leftConfig"], left, "{status:#}");
    let page = worker.get_full("/status.html", &[("Authorization", &format!("Bearer {TOKEN}"))]);
    assert!(page.body.contains("Left the config") && page.body.contains("config_position.attribute_label"), "{}", page.body);

    // Bad bodies, an enabled source and a missing confirmation delete nothing.
    let (code, body) = worker.request_body("POST", "/prune", TOKEN, "");
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("bad prune request"), "{body}");
    let (code, body) = worker.request_body("POST", "/prune", TOKEN, r#"{"all": true, "force": true}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) =
        worker.request_body("POST", "/prune", TOKEN, &json!({"table": OPTION.table, "column": OPTION.column, "confirm": 0}).to_string());
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("enabled source"), "{body}");
    let target = json!({"table": POSITION.table, "column": POSITION.column});
    let (code, body) = worker.request_body("POST", "/prune", TOKEN, &target.to_string());
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("\"confirm\": 2"), "{body}");
    let (code, _) = worker.request_with("POST", "/prune", &[]);
    assert_eq!(code, 401);
    let mut dry = target.clone();
    dry["dryRun"] = json!(true);
    let (code, body) = worker.request_body("POST", "/prune", TOKEN, &dry.to_string());
    assert_eq!(code, 200, "{body}");
    assert_counts("dry run", &body, &[("rows", 2), ("links", 3), ("errors", 0)]);
    assert_eq!((&body["dryRun"], &body["pruned"]), (&json!(true), &json!(false)), "{body}");
    assert_eq!(db.cache_count(), 4);

    let mut confirmed = target.clone();
    confirmed["confirm"] = json!(2);
    let (code, body) = worker.request_body("POST", "/prune", TOKEN, &confirmed.to_string());
    assert_eq!(code, 200, "{body}");
    assert_counts("prune", &body, &[("rows", 2), ("links", 3), ("errors", 0)]);
    assert_eq!(body["pruned"], json!(true), "{body}");
    assert_eq!(db.text_set("SELECT value FROM embedding_cache"), ["Cutter with catch tray", "Peel-off sensor"].map(String::from).into());
    assert_eq!(worker.status()["leftConfig"], json!([]));
    // The remaining source is untouched: the next run costs nothing.
    let report = worker.sync();
    assert_counts("the next run", &report["totals"], &[("new", 0), ("unchanged", 2), ("embedded", 0)]);
    let events: Vec<Value> = worker.events_of("prune");
    assert!(events.iter().any(|e| e["message"].as_str().unwrap_or_default().starts_with("Pruned 2 cache rows")), "{events:#?}");
}
