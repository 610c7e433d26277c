//! Sources that leave the config (removed, renamed, disabled): what `/status` lists of them and
//! what `POST /prune` deletes, and the bounded run history; the real store against real Postgres.

mod support;

use embsync_core::config::{Config, ModelSlot};
use embsync_core::hash::ValueHash;
use embsync_core::prune::{LeftReason, LeftSource, PruneOutcome, PruneRefusal, PruneReport, PruneRequest};
use embsync_core::sql::{BatchValue, SetBatchState};
use embsync_core::sync::{Budget, Lease, Outcome, RunId, Store};
use embsync_store::PgStore;
use std::time::Duration;
use support::*;

/// A config with small dimensions and the given sources (`name`, `table`, `column`, `enabled`),
/// and `extra` top-level fields (e.g. `"retention": {...},`).
fn config_with(sources: &[(&str, &str, &str, bool)], extra: &str) -> Config {
    let sources: Vec<String> =
        sources.iter().map(|(n, t, c, e)| format!(r#"{{"name":"{n}","table":"{t}","column":"{c}","enabled":{e}}}"#)).collect();
    Config::parse(&format!(
        r#"{{"version":"1.0","models":{{"large":{{"name":"text-embedding-3-large","dimensions":4}},"small":{{"name":"text-embedding-3-small","dimensions":2}}}},
        "batchSize":10,{extra}"sources":[{}]}}"#,
        sources.join(",")
    ))
    .expect("a valid test config")
}

async fn sync(config: &Config, db: &TestDb, provider: &FakeProvider) -> embsync_core::report::RunReport {
    let rt = TestRuntime::default();
    let mut store = db.store(config).await;
    match invoke(config, &mut store, provider, &rt, Budget::default(), "inv", None).await.unwrap() {
        Outcome::Finished(report) => report,
        other => panic!("the run did not finish: {other:?}"),
    }
}

async fn prune(store: &mut PgStore, config: &Config, body: &str) -> PruneOutcome {
    store.prune(config, &PruneRequest::parse(body).unwrap(), "prune-1", Duration::from_secs(60)).await.unwrap()
}

fn done(outcome: PruneOutcome) -> PruneReport {
    match outcome {
        PruneOutcome::Done(report) => report,
        other => panic!("expected a prune report, got {other:?}"),
    }
}

fn refused(outcome: PruneOutcome) -> PruneRefusal {
    match outcome {
        PruneOutcome::Refused(refusal) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Everything embsync's tables hold, for "nothing changed" checks.
async fn snapshot(db: &TestDb) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT value_hash || ' ' || coalesce(embedding_large::text, '-') || ' ' || source_table || '.' || source_column FROM embedding_cache",
        "SELECT value_hash || ' ' || source_table || '.' || source_column FROM embedding_cache_sources",
        "SELECT value_hash FROM embedding_cache_owned",
        "SELECT value_hash || ' ' || source_table || '.' || source_column FROM embedding_sync_errors",
    ] {
        out.extend(db.texts(sql).await);
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn a_removed_source_is_listed_and_pruned_only_when_confirmed_keeping_what_others_hold() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "shared"]).await;
    db.source_table("notes", "body", &["shared", "only-notes-1", "only-notes-2"]).await;
    let both = config_with(&[("Items", "items", "title", true), ("Notes", "notes", "body", true)], "");
    let provider = FakeProvider::default();
    sync(&both, &db, &provider).await;
    // Another pipeline's row that notes reuses: never embsync's to delete.
    db.exec(
        "INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small, source_table, source_column)
         VALUES ('foreign', encode(sha256('foreign'::bytea), 'hex'), '[1,2,3,4]', '[5,6]', 'theirs', 'col')",
    )
    .await;
    db.insert("notes", "body", &["foreign"]).await;
    sync(&both, &db, &provider).await;
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_sources WHERE source_table = 'notes'").await, 4);

    // Notes leaves the config.
    let items_only = config_with(&[("Items", "items", "title", true)], "");
    let mut store = db.store(&items_only).await;
    let left = store.left_sources(&items_only).await.unwrap();
    let notes = LeftSource::new(&items_only, "notes".into(), "body".into(), 4, 0, 2);
    assert_eq!(left, vec![notes.clone()]);
    assert_eq!(notes.reason, LeftReason::Removed);

    let before = snapshot(&db).await;
    let unconfirmed = refused(prune(&mut store, &items_only, r#"{"table":"notes","column":"body"}"#).await);
    assert!(matches!(&unconfirmed, PruneRefusal::Unconfirmed { report } if report.rows == 2), "{unconfirmed:?}");
    assert_eq!(unconfirmed.status(), 400);
    let dry = done(prune(&mut store, &items_only, r#"{"table":"notes","column":"body","dryRun":true}"#).await);
    assert_eq!((dry.dry_run, dry.pruned, dry.rows, dry.links, dry.errors), (true, false, 2, 4, 0));
    let mismatch = refused(prune(&mut store, &items_only, r#"{"table":"notes","column":"body","confirm":3}"#).await);
    assert_eq!(mismatch.status(), 409, "{mismatch:?}");
    assert_eq!(snapshot(&db).await, before, "a refused prune or a dry run deleted something");

    let report = done(prune(&mut store, &items_only, r#"{"table":"notes","column":"body","confirm":2}"#).await);
    assert_eq!((report.pruned, report.rows, report.links, report.errors), (true, 2, 4, 0));
    assert_eq!(db.texts("SELECT value FROM embedding_cache").await, ["alpha", "foreign", "shared"].map(String::from).into());
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE value = 'foreign' AND embedding_large::text = '[1,2,3,4]' AND source_table = 'theirs'").await,
        1,
        "the other pipeline's row changed"
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_owned").await, 2, "the ownership rows of the deleted rows were left behind");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_sources WHERE source_table = 'notes'").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_sources WHERE source_table = 'items'").await, 2);
    // The shared row was first written for notes: it names items now, which still has it.
    assert_eq!(db.texts("SELECT source_table FROM embedding_cache WHERE value = 'shared'").await, ["items".to_owned()].into());
    assert!(store.left_sources(&items_only).await.unwrap().is_empty());

    // Items is untouched: the next run costs nothing.
    let calls = provider.calls.borrow().len();
    let again = sync(&items_only, &db, &provider).await;
    assert_eq!((again.totals.new, again.totals.unchanged), (0, 2));
    assert_eq!(provider.calls.borrow().len(), calls);
}

#[tokio::test(flavor = "current_thread")]
async fn a_renamed_source_leaves_its_links_behind_and_pruning_them_deletes_no_row() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma"]).await;
    let provider = FakeProvider::default();
    sync(&config_with(&[("Items", "items", "title", true)], ""), &db, &provider).await;
    // The same table, spelled with its schema: another source key, so everything is linked again
    // (reused, no provider call) and the old key's links stay.
    let qualified = config_with(&[("Items", "public.items", "title", true)], "");
    // Before the renamed source has run, the old spelling holds every row alone: /status says
    // that it is the same column, so nobody prunes it by mistake.
    let mut store = db.store(&qualified).await;
    let mut renamed = LeftSource::new(&qualified, "items".into(), "title".into(), 3, 0, 3);
    renamed.same_as = Some("Items".into());
    assert_eq!(store.left_sources(&qualified).await.unwrap(), vec![renamed.clone()]);
    let calls = provider.calls.borrow().len();
    let report = sync(&qualified, &db, &provider).await;
    assert_eq!((report.totals.new, report.totals.reused), (3, 3));
    assert_eq!(provider.calls.borrow().len(), calls);
    assert_eq!(store.left_sources(&qualified).await.unwrap(), vec![LeftSource { rows: 0, ..renamed }]);

    let report = done(prune(&mut store, &qualified, r#"{"all":true,"confirm":0}"#).await);
    assert_eq!((report.rows, report.links), (0, 3));
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 3);
    assert_eq!(db.texts("SELECT DISTINCT source_table FROM embedding_cache").await, ["public.items".to_owned()].into());
    assert_eq!(db.texts("SELECT DISTINCT source_table FROM embedding_cache_sources").await, ["public.items".to_owned()].into());
    let again = sync(&qualified, &db, &provider).await;
    assert_eq!((again.totals.new, again.totals.unchanged), (0, 3));
}

#[tokio::test(flavor = "current_thread")]
async fn a_disabled_source_is_listed_by_name_and_its_errors_go_with_it() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha"]).await;
    db.source_table("drafts", "body", &["draft", "poison pill"]).await;
    let provider = FakeProvider::default();
    *provider.poison.borrow_mut() = Some("poison".into());
    let config = config_with(&[("Items", "items", "title", true), ("Drafts", "drafts", "body", true)], "");
    sync(&config, &db, &provider).await;
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_errors WHERE source_table = 'drafts'").await, 1);

    let disabled = config_with(&[("Items", "items", "title", true), ("Drafts", "drafts", "body", false)], "");
    let mut store = db.store(&disabled).await;
    let left = store.left_sources(&disabled).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].reason, left[0].name.as_deref(), left[0].links, left[0].errors, left[0].rows),
        (LeftReason::Disabled, Some("Drafts"), 1, 1, 1)
    );

    // An enabled source is never pruned, and neither is a source nothing is recorded for.
    let enabled = refused(prune(&mut store, &disabled, r#"{"table":"items","column":"title","confirm":1}"#).await);
    assert!(matches!(enabled, PruneRefusal::EnabledSource { .. }), "{enabled:?}");
    let unknown = refused(prune(&mut store, &disabled, r#"{"table":"nope","column":"x","confirm":0}"#).await);
    assert!(unknown.to_string().contains("drafts.body"), "{unknown}");

    let report = done(prune(&mut store, &disabled, r#"{"all":true,"confirm":1}"#).await);
    assert_eq!((report.rows, report.links, report.errors), (1, 1, 1));
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_errors").await, 0);
    assert_eq!(db.texts("SELECT value FROM embedding_cache").await, ["alpha".to_owned()].into());
}

#[tokio::test(flavor = "current_thread")]
async fn a_prune_waits_for_the_sync_lease_and_deletes_nothing_while_a_sync_holds_it() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha"]).await;
    db.source_table("notes", "body", &["note"]).await;
    let provider = FakeProvider::default();
    sync(&config_with(&[("Items", "items", "title", true), ("Notes", "notes", "body", true)], ""), &db, &provider).await;
    let items_only = config_with(&[("Items", "items", "title", true)], "");
    let mut syncing = db.store(&items_only).await;
    syncing.acquire_lease("a-sync", Duration::from_secs(60)).await.unwrap();
    let mut store = db.store(&items_only).await;
    let before = snapshot(&db).await;
    match prune(&mut store, &items_only, r#"{"all":true,"confirm":1}"#).await {
        PruneOutcome::Busy { holder, .. } => assert_eq!(holder, "a-sync"),
        other => panic!("expected busy, got {other:?}"),
    }
    assert_eq!(snapshot(&db).await, before);
    // A dry run takes no lease.
    assert_eq!(done(prune(&mut store, &items_only, r#"{"all":true,"dryRun":true}"#).await).rows, 1);
    syncing.release_lease().await.unwrap();
    assert_eq!(done(prune(&mut store, &items_only, r#"{"all":true,"confirm":1}"#).await).rows, 1);
    // The prune gave the lease back.
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_lease WHERE expires_at > now()").await, 0);
    assert_eq!(db.texts("SELECT value FROM embedding_cache").await, ["alpha".to_owned()].into());
}

#[tokio::test(flavor = "current_thread")]
async fn finished_runs_beyond_the_retention_are_deleted_when_a_run_finishes() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha"]).await;
    db.source_table("notes", "body", &["note"]).await;
    let config = config_with(&[("Items", "items", "title", true), ("Notes", "notes", "body", true)], r#""retention":{"runs":3},"#);
    let provider = FakeProvider::default();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(sync(&config, &db, &provider).await.run_id);
    }
    assert_eq!(db.texts("SELECT run_id FROM embedding_sync_runs").await, ids[2..].iter().cloned().collect());
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_run_sources").await, 6);
    assert_eq!(db.texts("SELECT DISTINCT run_id FROM embedding_sync_run_sources").await, ids[2..].iter().cloned().collect());
    // What /status reads is served by an index, newest first.
    let plan: Vec<String> = db
        .client
        .simple_query(
            "BEGIN; SET LOCAL enable_seqscan = off; EXPLAIN SELECT run_id FROM embedding_sync_runs
             WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 10; COMMIT",
        )
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert!(plan.iter().any(|l| l.contains("embedding_sync_runs_finished_idx")), "{plan:#?}");
    assert!(!plan.iter().any(|l| l.contains("Sort")), "{plan:#?}");
}

/// Records file `file` of `slot` for run `run-1`, one request `custom_id` holding `values` (each
/// `(table, column, value)`).
async fn record_file(store: &mut PgStore, file: &str, slot: ModelSlot, custom_id: &str, values: &[(&str, &str, &str)]) {
    let hashes: Vec<ValueHash> = values.iter().map(|(_, _, v)| ValueHash::from_hex(&hash_of(v)).unwrap()).collect();
    let rows: Vec<BatchValue<'_>> = values
        .iter()
        .enumerate()
        .map(|(i, (table, column, value))| BatchValue {
            custom_id,
            position: i as i32,
            hash: &hashes[i],
            value,
            occurrences: 1,
            source_table: table,
            source_column: column,
        })
        .collect();
    store.record_batch_file(file, &RunId("run-1".into()), slot, 1, &rows).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn pending_batches_are_in_the_status_and_a_prune_forgets_the_batch_values_of_the_sources_it_removes() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha"]).await;
    db.source_table("notes", "body", &["n1"]).await;
    let both = config_with(&[("Items", "items", "title", true), ("Notes", "notes", "body", true)], "");
    let provider = FakeProvider::default();
    sync(&both, &db, &provider).await;
    let mut store = db.store(&both).await;
    assert!(store.pending_batches().await.unwrap().is_empty());

    // Values in flight through the Batch API: a large file with a value of each source and one
    // of a source the config never had (`drafts.body`: recorded only there), not created yet;
    // a small file, created, then polled.
    db.insert("items", "title", &["beta"]).await;
    db.insert("notes", "body", &["n2", "n3"]).await;
    assert_eq!(store.acquire_lease("inv-b", Duration::from_secs(60)).await.unwrap(), Lease::Acquired);
    record_file(
        &mut store,
        "file-l",
        ModelSlot::Large,
        "embsync:run-1:large:0",
        &[("items", "title", "beta"), ("notes", "body", "n2"), ("notes", "body", "n3"), ("drafts", "body", "d1")],
    )
    .await;
    record_file(&mut store, "file-s", ModelSlot::Small, "embsync:run-1:small:0", &[("items", "title", "beta"), ("notes", "body", "n2")])
        .await;
    store.set_batch_created("file-s", "batch_s").await.unwrap();
    store
        .set_batch_state(&SetBatchState {
            batch_id: "batch_s",
            state: "in_progress",
            output_file_id: None,
            error_file_id: None,
            request_counts: r#"{"total": 1, "completed": 0, "failed": 0}"#,
            finished: false,
        })
        .await
        .unwrap();
    // What a file embsync is done with left behind (the sync forgets its values when it ends it;
    // a row of a file with no record, or of an ended one, is only ever garbage).
    db.exec("INSERT INTO embedding_sync_batch_values VALUES ('file-gone', 'embsync:old:large:0', 0, 'x', 'x', 1, 'items', 'title')").await;
    store.release_lease().await.unwrap();

    let pending = store.pending_batches().await.unwrap();
    let shape: Vec<(String, String, Vec<(Option<String>, String, u64, u64, u64, Option<serde_json::Value>)>)> = pending
        .iter()
        .map(|m| {
            let batches = m
                .batches
                .iter()
                .map(|b| (b.batch_id.clone(), b.state.clone(), b.requests, b.values, b.waiting, b.request_counts.clone()))
                .collect();
            (m.slot.clone(), m.model.clone(), batches)
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("large".into(), "text-embedding-3-large:4".into(), vec![(None, "uploaded".into(), 1, 4, 4, None)]),
            (
                "small".into(),
                "text-embedding-3-small:2".into(),
                vec![(
                    Some("batch_s".into()),
                    "in_progress".into(),
                    1,
                    2,
                    2,
                    Some(serde_json::json!({"total": 1, "completed": 0, "failed": 0}))
                )]
            ),
        ]
    );
    let small = &pending[1].batches[0];
    assert!(small.age_seconds < 60 && small.created_at.ends_with('Z') && small.polled_at.is_some(), "{small:?}");

    // Notes leaves the config: it is listed with its values in pending files, and so is drafts,
    // which only a file records.
    let items_only = config_with(&[("Items", "items", "title", true)], "");
    let mut store = db.store(&items_only).await;
    let left = store.left_sources(&items_only).await.unwrap();
    let keyed: Vec<(String, u64, u64)> = left.iter().map(|l| (l.key(), l.links, l.batch_values)).collect();
    assert_eq!(keyed, vec![("drafts.body".into(), 0, 1), ("notes.body".into(), 1, 3)]);

    let dry = done(prune(&mut store, &items_only, r#"{"table":"notes","column":"body","dryRun":true}"#).await);
    // Notes' three, and the garbage row.
    assert_eq!((dry.rows, dry.links, dry.batch_values), (1, 1, 4));
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 7, "a dry run forgot something");
    let unconfirmed = refused(prune(&mut store, &items_only, r#"{"table":"notes","column":"body"}"#).await);
    assert!(unconfirmed.to_string().contains("and forgets 4 of their values in pending Batch API files"), "{unconfirmed}");
    let report = done(prune(&mut store, &items_only, r#"{"table":"notes","column":"body","confirm":1}"#).await);
    assert_eq!((report.pruned, report.rows, report.links, report.batch_values), (true, 1, 1, 4));
    assert_eq!(
        db.texts("SELECT input_file_id || ' ' || source_table || ' ' || value FROM embedding_sync_batch_values").await,
        ["file-l drafts d1", "file-l items beta", "file-s items beta"].map(String::from).into(),
        "only the pruned source's values and the garbage are forgotten"
    );
    // The files stay pending (their other values still come), with fewer values waiting.
    let waiting: Vec<u64> = store.pending_batches().await.unwrap().iter().map(|m| m.batches[0].waiting).collect();
    assert_eq!(waiting, vec![2, 1]);
    let left = store.left_sources(&items_only).await.unwrap();
    assert_eq!(left.iter().map(|l| (l.key(), l.batch_values)).collect::<Vec<_>>(), vec![("drafts.body".into(), 1)]);
    let all = done(prune(&mut store, &items_only, r#"{"all":true,"confirm":0}"#).await);
    assert_eq!((all.rows, all.batch_values), (0, 1));
    assert!(store.left_sources(&items_only).await.unwrap().is_empty());

    // Before schema version 4 (a /status read after an upgrade, before a sync migrates), there
    // are no batches to show and the left sources read as before.
    db.exec("DROP TABLE embedding_sync_batch_values, embedding_sync_batches").await;
    let mut store = db.store(&items_only).await;
    assert!(store.pending_batches().await.unwrap().is_empty());
    assert!(store.left_sources(&items_only).await.unwrap().is_empty());
    assert_eq!(done(prune(&mut store, &items_only, r#"{"all":true,"dryRun":true}"#).await).batch_values, 0);
}
