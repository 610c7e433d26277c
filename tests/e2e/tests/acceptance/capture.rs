//! Issue 12, change capture (`"changes": "capture"`) under `wrangler dev`: a captured source
//! follows every kind of write exactly, an UPDATE of another column costs nothing (no request in
//! the provider's log), a change made with the triggers disabled is caught by the next reconcile
//! and reported as drift (in the report, the log and `/status`), and a value shared by a
//! captured and a scanned source is paid once. The store tier (`crates/embsync-store/tests/
//! capture.rs`) tests the same on the driver alone, with more cases; these show it through the
//! worker: its Postgres over the Workers socket, its reports and events. Small dimensions (the
//! vector size is not what they test).

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use embsync_e2e::*;
use serde_json::{json, Value};

const ITEMS: Src = Src { name: "Items", table: "capture_item", column: "title" };
const TAGS: Src = Src { name: "Tags", table: "capture_tag", column: "label" };

/// An `EMBEDDING_SOURCES` JSON with `sources` (`Src`, `changes`), 8/4 dimensions and mass
/// deletes allowed (a TRUNCATE empties a source).
fn capture_config(sources: &[(Src, &str)]) -> String {
    let list: Vec<Value> = sources
        .iter()
        .map(|(s, changes)| json!({"name": s.name, "table": s.table, "column": s.column, "changes": changes, "allowMassDelete": true}))
        .collect();
    json!({
        "version": "1.0",
        "models": {"large": {"name": LARGE_MODEL, "dimensions": 8}, "small": {"name": SMALL_MODEL, "dimensions": 4}},
        "batchSize": 10,
        "sources": list,
    })
    .to_string()
}

/// The distinct non-empty trimmed values of `src`'s column.
fn has(db: &mut TestDb, src: Src) -> BTreeSet<String> {
    db.text_set(&format!("SELECT DISTINCT btrim({c}, ' ') FROM {t} WHERE btrim({c}, ' ') <> ''", t = src.table, c = src.column))
}

/// The values linked to `src` with both embeddings.
fn linked(db: &mut TestDb, src: Src) -> BTreeSet<String> {
    db.text_set(&format!(
        "SELECT c.value FROM embedding_cache_sources l JOIN embedding_cache c USING (value_hash) \
         WHERE l.source_table = '{}' AND l.source_column = '{}' \
           AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL",
        src.table, src.column
    ))
}

/// Checks that `src`'s links and embsync's copy of its values (value and row count) are exactly
/// what the table holds, and that the cache holds nothing else (every source's values only).
fn follows(db: &mut TestDb, src: Src, all: &[Src]) {
    assert_eq!(linked(db, src), has(db, src), "the links of {} follow the table", src.name);
    let copy = db.text_set(&format!(
        "SELECT m.value || ' x' || m.n FROM embedding_sync_capture_values m JOIN embedding_sync_capture k USING (capture_id) \
         WHERE k.source_table = '{}' AND k.source_column = '{}'",
        src.table, src.column
    ));
    let counted = db.text_set(&format!(
        "SELECT btrim({c}, ' ') || ' x' || count(*) FROM {t} WHERE btrim({c}, ' ') <> '' GROUP BY btrim({c}, ' ')",
        t = src.table,
        c = src.column
    ));
    assert_eq!(copy, counted, "embsync's copy of {} counts what the table has", src.name);
    let mut every = BTreeSet::new();
    for s in all {
        every.extend(has(db, *s));
    }
    assert_eq!(db.text_set("SELECT value FROM embedding_cache"), every, "the cache holds the sources' values, nothing else");
}

/// The messages of the `reconcile` events logged since `from` of them, once there is one (the
/// worker's log reaches the file a moment after its answer).
fn reconciles(worker: &Worker, from: usize) -> Vec<String> {
    let events = poll(Duration::from_secs(5), "a reconcile event", || Some(worker.events_of("reconcile")).filter(|e| e.len() > from));
    events.iter().skip(from).map(|e| e["message"].as_str().unwrap_or_default().to_string()).collect()
}

/// Sorted inputs the provider got for the large model since it was last cleared.
fn sent(provider: &Provider) -> Vec<String> {
    let mut v = provider.inputs_for(LARGE_MODEL);
    v.sort();
    v
}

#[test]
fn a_captured_source_follows_inserts_updates_deletes_truncate_and_copy_exactly() {
    let mut db = TestDb::create();
    db.exec(&format!("CREATE TABLE {} (id bigserial PRIMARY KEY, {} text, other int DEFAULT 0)", ITEMS.table, ITEMS.column));
    db.insert_strs(ITEMS, &["x", "y", " y ", "z", "", " "]);
    let (provider, worker) = start_stack(&db, Some(capture_config(&[(ITEMS, "capture")])));
    let all = [ITEMS];

    // The first run installs the triggers, enabled always, and fills the copy by a scan.
    let report = worker.sync();
    assert_counts("first", source_entry(&report, ITEMS.table), &[("total", 3), ("new", 3), ("embedded", 3)]);
    assert_eq!(reconciles(&worker, 0), ["Source Items: reconciled by a scan: the capture was installed"]);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND tgname LIKE 'embsync_capture%' AND tgenabled = 'A'",
            ITEMS.table
        )),
        4,
        "four triggers enabled always"
    );
    follows(&mut db, ITEMS, &all);

    // INSERT: only the new value is sent.
    provider.clear();
    db.insert_strs(ITEMS, &["w", " x", "w"]);
    let report = worker.sync();
    assert_counts("insert", source_entry(&report, ITEMS.table), &[("total", 4), ("new", 1), ("embedded", 1), ("stale", 0)]);
    assert_eq!(sent(&provider), ["w"]);
    follows(&mut db, ITEMS, &all);

    // UPDATE of another column: nothing logged, nothing asked of the provider, nothing new.
    provider.clear();
    db.exec(&format!("UPDATE {} SET other = other + 1", ITEMS.table));
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_sync_change_log WHERE capture_id <> 0"),
        0,
        "an update of another column logs nothing"
    );
    let report = worker.sync();
    assert_counts(
        "update of another column",
        source_entry(&report, ITEMS.table),
        &[("total", 4), ("unchanged", 4), ("new", 0), ("embedded", 0), ("stale", 0), ("batches", 0)],
    );
    assert!(provider.requests().is_empty(), "an update of another column cost a request: {:?}", provider.requests());
    follows(&mut db, ITEMS, &all);

    // UPDATE of the column: the new value is embedded, the old one deleted.
    db.exec(&format!("UPDATE {} SET {c} = 'v' WHERE {c} = 'z'", ITEMS.table, c = ITEMS.column));
    let report = worker.sync();
    assert_counts("update", source_entry(&report, ITEMS.table), &[("total", 4), ("new", 1), ("embedded", 1), ("stale", 1), ("deleted", 1)]);
    assert_eq!(sent(&provider), ["v"]);
    follows(&mut db, ITEMS, &all);

    // DELETE of one of the value's rows, then of both: stale only once no row has it.
    provider.clear();
    db.exec(&format!("DELETE FROM {} WHERE {} = ' y '", ITEMS.table, ITEMS.column));
    let report = worker.sync();
    assert_counts("delete of one row", source_entry(&report, ITEMS.table), &[("total", 4), ("stale", 0), ("deleted", 0)]);
    db.exec(&format!("DELETE FROM {} WHERE btrim({}) IN ('y', 'w')", ITEMS.table, ITEMS.column));
    let report = worker.sync();
    assert_counts("delete", source_entry(&report, ITEMS.table), &[("total", 2), ("stale", 2), ("deleted", 2), ("embedded", 0)]);
    assert!(provider.requests().is_empty());
    follows(&mut db, ITEMS, &all);

    // COPY fires the statement's trigger too.
    let mut copy = db.client().copy_in(&format!("COPY {} ({}) FROM STDIN", ITEMS.table, ITEMS.column)).expect("COPY");
    copy.write_all(b"copied 1\ncopied 2\nx\n").expect("COPY data");
    copy.finish().expect("COPY finish");
    let report = worker.sync();
    assert_counts("copy", source_entry(&report, ITEMS.table), &[("total", 4), ("new", 2), ("embedded", 2)]);
    assert_eq!(sent(&provider), ["copied 1", "copied 2"]);
    follows(&mut db, ITEMS, &all);

    // TRUNCATE forces a reconcile by scan, which is not drift (the log's record is not whole).
    provider.clear();
    db.exec(&format!("TRUNCATE {}", ITEMS.table));
    db.insert_strs(ITEMS, &["after"]);
    let before = worker.events_of("reconcile").len();
    let report = worker.sync();
    let items = source_entry(&report, ITEMS.table);
    assert_counts("truncate", items, &[("total", 1), ("new", 1), ("embedded", 1), ("stale", 4), ("deleted", 4)]);
    assert_eq!(items["warning"], Value::Null, "{items:#}");
    assert_eq!(reconciles(&worker, before), ["Source Items: reconciled by a scan: the table was truncated"]);
    assert_eq!(sent(&provider), ["after"]);
    follows(&mut db, ITEMS, &all);

    // And a run after all that costs nothing.
    provider.clear();
    let report = worker.sync();
    assert_counts("no-op", source_entry(&report, ITEMS.table), &[("total", 1), ("unchanged", 1), ("new", 0), ("stale", 0)]);
    assert!(provider.requests().is_empty());
}

#[test]
fn a_change_made_with_triggers_disabled_is_caught_by_the_next_reconcile_and_reported_as_drift() {
    let mut db = TestDb::create();
    db.create_source_table(ITEMS.table, ITEMS.column);
    db.insert_strs(ITEMS, &["x", "y"]);
    let (provider, worker) = start_stack(&db, Some(capture_config(&[(ITEMS, "capture")])));
    let all = [ITEMS];
    worker.sync();

    // Triggers disabled: the next run reconciles by a scan and reports what the capture missed.
    provider.clear();
    db.exec(&format!("ALTER TABLE {} DISABLE TRIGGER USER", ITEMS.table));
    db.insert_strs(ITEMS, &["hidden"]);
    db.exec(&format!("DELETE FROM {} WHERE {} = 'x'", ITEMS.table, ITEMS.column));
    let status = worker.status();
    let coverage = status["sources"].as_array().and_then(|s| s.iter().find(|s| s["table"] == ITEMS.table)).cloned().unwrap_or_default();
    assert_eq!(coverage["capture"]["triggers"], "disabled", "/status: {status:#}");
    let before = worker.events_of("reconcile").len();
    let report = worker.sync();
    let items = source_entry(&report, ITEMS.table);
    assert_counts("disabled", items, &[("total", 2), ("new", 1), ("embedded", 1), ("stale", 1), ("deleted", 1)]);
    let warning = items["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("missed 1 new and 1 stale values") && warning.contains("4 of its triggers are disabled"),
        "the report's warning: {items:#}"
    );
    let events = poll(Duration::from_secs(5), "the reconcile's warning in the log", || {
        Some(worker.events_of("reconcile")).filter(|e| e.len() > before)
    });
    assert!(
        events[before..]
            .iter()
            .any(|e| e["level"] == "warn" && e["message"].as_str().unwrap_or_default().contains("missed 1 new and 1 stale")),
        "a reconcile warning in the log: {events:?}"
    );
    assert_eq!(sent(&provider), ["hidden"]);
    follows(&mut db, ITEMS, &all);
    let status = worker.status();
    let coverage = status["sources"].as_array().and_then(|s| s.iter().find(|s| s["table"] == ITEMS.table)).cloned().unwrap_or_default();
    assert_eq!(coverage["capture"]["lastDrift"], json!({"new": 1, "stale": 1}), "/status: {status:#}");

    // Enabled again by hand (for `origin` only): the next run enables them always again.
    db.exec(&format!("ALTER TABLE {} ENABLE TRIGGER USER", ITEMS.table));
    db.insert_strs(ITEMS, &["seen"]);
    let report = worker.sync();
    assert_eq!(source_entry(&report, ITEMS.table)["warning"], Value::Null, "the insert was logged: no drift");
    follows(&mut db, ITEMS, &all);

    // A change no trigger saw, the triggers enabled always again at once: not seen before the
    // scheduled reconcile, which then catches it and reports it.
    provider.clear();
    db.exec(&format!(
        "ALTER TABLE {t} DISABLE TRIGGER USER; INSERT INTO {t} ({c}) VALUES ('sneaky'); \
         ALTER TABLE {t} ENABLE ALWAYS TRIGGER embsync_capture_1_insert, ENABLE ALWAYS TRIGGER embsync_capture_1_update, \
         ENABLE ALWAYS TRIGGER embsync_capture_1_delete, ENABLE ALWAYS TRIGGER embsync_capture_1_truncate",
        t = ITEMS.table,
        c = ITEMS.column
    ));
    let report = worker.sync();
    assert_counts("sneaky, unseen", source_entry(&report, ITEMS.table), &[("new", 0), ("embedded", 0)]);
    assert!(provider.requests().is_empty());
    db.exec("UPDATE embedding_sync_capture SET reconciled_at = now() - interval '25 hours'");
    let report = worker.sync();
    let items = source_entry(&report, ITEMS.table);
    assert_counts("scheduled reconcile", items, &[("total", 4), ("new", 1), ("embedded", 1)]);
    assert!(
        items["warning"].as_str().unwrap_or_default().contains("missed 1 new and 0 stale values (the scheduled reconcile"),
        "{items:#}"
    );
    assert_eq!(sent(&provider), ["sneaky"]);
    follows(&mut db, ITEMS, &all);
}

#[test]
fn a_value_shared_by_a_captured_and_a_scanned_source_is_paid_once_and_kept_while_either_has_it() {
    let mut db = TestDb::create();
    db.create_source_table(ITEMS.table, ITEMS.column);
    db.create_source_table(TAGS.table, TAGS.column);
    db.insert_strs(ITEMS, &["shared", "only items"]);
    db.insert_strs(TAGS, &["shared", "only tags"]);
    let (provider, worker) = start_stack(&db, Some(capture_config(&[(ITEMS, "capture"), (TAGS, "scan")])));
    let all = [ITEMS, TAGS];
    worker.sync();
    assert_eq!(sent(&provider), ["only items", "only tags", "shared"], "the shared value is sent once");
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND NOT tgisinternal", TAGS.table)),
        0,
        "the scanned source has no trigger"
    );
    follows(&mut db, ITEMS, &all);

    // Gone from the captured source: unlinked there, kept for the scanned one.
    db.exec(&format!("DELETE FROM {} WHERE {} = 'shared'", ITEMS.table, ITEMS.column));
    let report = worker.sync();
    assert_counts("items lose it", source_entry(&report, ITEMS.table), &[("stale", 1), ("deleted", 0)]);
    follows(&mut db, ITEMS, &all);

    // Back in the captured source, gone from the scanned one: reused, not paid again.
    db.insert_strs(ITEMS, &["shared"]);
    db.exec(&format!("DELETE FROM {} WHERE {} = 'shared'", TAGS.table, TAGS.column));
    let report = worker.sync();
    assert_counts("items get it back", source_entry(&report, ITEMS.table), &[("new", 1), ("reused", 1), ("embedded", 0)]);
    assert_counts("tags lose it", source_entry(&report, TAGS.table), &[("stale", 1), ("deleted", 0)]);
    follows(&mut db, ITEMS, &all);

    // Gone from both: deleted.
    db.exec(&format!("DELETE FROM {} WHERE {} = 'shared'", ITEMS.table, ITEMS.column));
    let report = worker.sync();
    assert_counts("both lose it", source_entry(&report, ITEMS.table), &[("stale", 1), ("deleted", 1)]);
    follows(&mut db, ITEMS, &all);
    assert_eq!(sent(&provider), ["only items", "only tags", "shared"], "never paid twice");
}
