//! Batching: `Batch i of N` is logged for every batch, for HTTP and cron runs; the logs are
//! structured events (one JSON object a line) carrying the run id.

use std::time::Duration;

use embsync_e2e::*;

#[test]
fn logs_show_every_batch_for_http_and_cron_runs() {
    let mut db = TestDb::create();
    db.create_default_sources();
    let options: Vec<String> = (1..=10)
        .map(|i| format!("Option description number {i}"))
        .collect();
    db.insert_strs(
        OPTION,
        &options.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (provider, worker) = start_stack(&db, Some(sources_json(4, &DEFAULT_SOURCES)));

    let plan = worker.dry_run();
    assert_eq!(plan["batchSize"], 4, "{plan:#}");
    assert_counts(
        "dry run",
        source_entry(&plan, OPTION.table),
        &[("new", 10), ("toEmbed", 10), ("batches", 3)],
    );

    let report = worker.sync();
    assert_counts(
        "sync",
        source_entry(&report, OPTION.table),
        &[("new", 10), ("embedded", 10), ("batches", 3)],
    );
    for (i, n) in [(1, 4), (2, 4), (3, 2)] {
        let line = format!("Batch {i} of 3: Option Descriptions ({n} values)");
        worker.wait_for_log(&line, Duration::from_secs(5));
        assert_eq!(worker.count_log(&line), 1, "{line:?} should be logged once");
    }
    assert_eq!(worker.count_log("Batch 4 of"), 0, "no fourth batch");
    // Each batch is one request per model, of the batch's size.
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let mut sizes: Vec<usize> = provider
            .embedding_requests()
            .into_iter()
            .filter(|(m, _)| m == model)
            .map(|(_, i)| i.len())
            .collect();
        sizes.sort();
        assert_eq!(sizes, vec![2, 4, 4], "request sizes for {model}");
    }

    // A cron run batches the same way.
    let labels: Vec<String> = (1..=6).map(|i| format!("Attribute label {i}")).collect();
    db.insert_strs(
        POSITION,
        &labels.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (status, _) = worker.scheduled();
    assert_eq!(status, 200);
    worker.wait_for_log(
        "Batch 2 of 2: Attribute Labels (2 values)",
        Duration::from_secs(60),
    );
    worker.wait_for_log(
        "Batch 1 of 2: Attribute Labels (4 values)",
        Duration::from_secs(5),
    );
    let cron = poll(
        Duration::from_secs(30),
        "the cron `Sync report:` line",
        || {
            worker
                .logged_reports()
                .into_iter()
                .find(|r| r["trigger"] == "cron")
        },
    );
    assert_counts(
        "cron sync",
        source_entry(&cron, POSITION.table),
        &[("new", 6), ("embedded", 6), ("batches", 2)],
    );
    let n = poll(
        Duration::from_secs(30),
        "16 rows in embedding_cache",
        || Some(db.cache_count()).filter(|n| *n == 16),
    );
    assert_eq!(n, 16);

    // Every line the worker logged is a JSON event with a level, a kind and a message, and the
    // events of each run (batches, sources, the report) carry that run's id.
    let events = worker.events();
    for e in &events {
        assert!(["info", "warn", "error"].contains(&e["level"].as_str().unwrap_or_default()), "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let worker_lines = worker.logs().lines().filter(|l| l.contains("\"event\":")).count();
    assert_eq!(worker_lines, events.len(), "every worker log line parses as one JSON event");
    for (run, report) in [("http", &report), ("cron", &cron)] {
        let id = report["runId"].as_str().expect("runId");
        let of_run = |kind: &str| events.iter().filter(|e| e["event"] == kind && e["runId"] == id).count();
        let batches = if run == "http" { 3 } else { 2 };
        assert_eq!(of_run("batch"), batches, "{run}: one batch event per batch, tagged with {id}");
        assert_eq!(of_run("source"), 3, "{run}: one source event per source, tagged with {id}");
        assert_eq!(of_run("report"), 1, "{run}: one report event, tagged with {id}");
    }
    let batch = worker.events_of("batch").into_iter().find(|e| e["runId"] == cron["runId"]).expect("a cron batch event");
    assert_eq!((batch["source"].as_str(), batch["of"].as_u64()), (Some("Attribute Labels"), Some(2)), "{batch}");
}
