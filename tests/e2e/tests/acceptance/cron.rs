//! The cron trigger (`/__scheduled` under `wrangler dev --test-scheduled`) runs the sync, and an
//! immediate second cron run has nothing to do.

use std::time::Duration;

use embsync_e2e::*;
use serde_json::json;

#[test]
fn cron_trigger_runs_the_sync() {
    let mut db = db_with_options(&["Trailer coupling", "Roof box", "Roof box  "]);
    db.insert_strs(POSITION, &["Towing", "Storage"]);
    db.insert_strs(HTB, &["towing_capacity_kg"]);
    let all: Vec<String> = [
        "Trailer coupling",
        "Roof box",
        "Towing",
        "Storage",
        "towing_capacity_kg",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (provider, worker) = start_stack(&db, None);
    assert_eq!(db.cache_count(), 0);

    let (status, _) = worker.scheduled();
    assert_eq!(status, 200, "/__scheduled");
    // The scheduled answer says nothing about the sync: watch the database.
    poll(
        Duration::from_secs(60),
        "5 rows with both embeddings in embedding_cache",
        || {
            let ready = db.relation_exists("embedding_cache")
            && db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL")
                == 5;
            ready.then_some(())
        },
    );
    assert_eq!(db.cache_hashes(), hashes_of(&all));

    worker.wait_for_log("Sync report:", Duration::from_secs(30));
    let reports = worker.logged_reports();
    assert_eq!(reports.len(), 1, "one cron run, one report");
    let report = &reports[0];
    assert_eq!(report["trigger"], json!("cron"), "{report:#}");
    assert_counts(
        "cron report totals",
        &report["totals"],
        &[("new", 5), ("embedded", 5), ("errors", 0)],
    );
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let mut sent = provider.inputs_for(model);
        sent.sort();
        let mut want = all.clone();
        want.sort();
        assert_eq!(sent, want, "values the cron run sent to {model}");
    }

    // The cron path is the same sync: run again at once, it has nothing to do and pays nothing.
    provider.clear();
    let rows_before = db.text_set("SELECT c::text FROM embedding_cache c");
    let (status, _) = worker.scheduled();
    assert_eq!(status, 200, "the second /__scheduled");
    let again = poll(Duration::from_secs(60), "a second cron `Sync report:` line", || {
        worker.logged_reports().into_iter().nth(1)
    });
    assert_eq!(again["trigger"], json!("cron"), "{again:#}");
    assert_counts(
        "cron re-run totals",
        &again["totals"],
        &[("new", 0), ("stale", 0), ("unchanged", 5), ("embedded", 0), ("deleted", 0)],
    );
    assert!(provider.embedding_requests().is_empty(), "the cron re-run called the provider");
    assert_eq!(db.text_set("SELECT c::text FROM embedding_cache c"), rows_before, "a re-run must not rewrite rows");
}
