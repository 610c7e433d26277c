//! The Batch API's bookkeeping on real Postgres: a request file and its values recorded, the
//! batch's state, and a request's vectors stored once, only for values their source still has,
//! never over a vector that is there, fenced by the lease.

mod support;

use std::time::Duration;

use embsync_core::config::{Config, ModelSlot};
use embsync_core::hash::ValueHash;
use embsync_core::sql::{BatchValue, SetBatchState};
use embsync_core::sync::{Lease, RunId, Store};
use embsync_core::vector::Vector;
use embsync_store::{PgStore, RequestStored};
use support::*;

const TTL: Duration = Duration::from_secs(60);
const FILE: &str = "file-abc";
const REQ0: &str = "embsync:run-1:large:0";
const REQ1: &str = "embsync:run-1:large:1";

fn large(value: &str) -> Vector {
    Vector::from_f32(&vector_for("batch", 4, value)).unwrap()
}

/// A store holding the lease, its schema in place.
async fn leased(db: &TestDb, config: &Config, holder: &str) -> PgStore {
    let mut store = db.store(config).await;
    store.ensure_schema(config).await.unwrap();
    assert_eq!(store.acquire_lease(holder, TTL).await.unwrap(), Lease::Acquired);
    store
}

/// Records `FILE` for the large model: `REQ0` with alpha, beta, gamma; `REQ1` with delta.
async fn record(store: &mut PgStore, config: &Config) {
    let source = &config.sources[0];
    let (table, column) = (source.table_key(), source.column_key().to_owned());
    let hashes: Vec<ValueHash> = ["alpha", "beta", "gamma", "delta"].iter().map(|v| ValueHash::from_hex(&hash_of(v)).unwrap()).collect();
    let value = |i: usize, custom_id: &'static str, position: i32, text: &'static str| BatchValue {
        custom_id,
        position,
        hash: &hashes[i],
        value: text,
        occurrences: 1,
        source_table: &table,
        source_column: &column,
    };
    let values = [value(0, REQ0, 0, "alpha"), value(1, REQ0, 1, "beta"), value(2, REQ0, 2, "gamma"), value(3, REQ1, 0, "delta")];
    store.record_batch_file(FILE, &RunId("run-1".into()), ModelSlot::Large, 2, &values).await.unwrap();
}

async fn large_of(db: &TestDb, value: &str) -> Option<String> {
    db.client
        .query_opt("SELECT embedding_large::text FROM embedding_cache WHERE value_hash = $1", &[&hash_of(value)])
        .await
        .unwrap()
        .and_then(|row| row.get::<_, Option<String>>(0))
}

fn text_of(v: &Vector) -> String {
    let floats: Vec<String> = v.to_f32().iter().map(|x| x.to_string()).collect();
    format!("[{}]", floats.join(","))
}

#[tokio::test(flavor = "current_thread")]
async fn a_requests_vectors_are_stored_once_and_only_where_due() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma", "delta"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let mut store = leased(&db, &config, "inv-1").await;
    record(&mut store, &config).await;

    let open = store.open_batches().await.unwrap();
    assert_eq!(open.len(), 1);
    let file = &open[0];
    assert_eq!((file.input_file_id.as_str(), file.batch_id.as_deref(), file.state.as_str()), (FILE, None, "uploaded"));
    assert_eq!((file.slot, file.model.as_str(), file.requests, file.values), (ModelSlot::Large, "text-embedding-3-large:4", 2, 4));
    store.set_batch_created(FILE, "batch_1").await.unwrap();
    let open = store.open_batches().await.unwrap();
    assert_eq!((open[0].batch_id.as_deref(), open[0].state.as_str()), (Some("batch_1"), "validating"));

    // While the batch is pending, beta leaves its source, and another pipeline embeds gamma.
    db.exec("DELETE FROM items WHERE title = 'beta'").await;
    db.exec(&format!(
        "INSERT INTO embedding_cache (value, value_hash, embedding_large) VALUES ('gamma', '{}', '[9,9,9,9]')",
        hash_of("gamma")
    ))
    .await;

    let stored = store
        .store_batch_request(&config, &RunId("run-1".into()), FILE, REQ0, &[large("alpha"), large("beta"), large("gamma")], 7)
        .await
        .unwrap();
    assert_eq!((stored.written, stored.gone, stored.model_changed), (2, 1, false));
    // No run-1 row in embedding_sync_run_sources: the counters' update finds nothing to add to.
    assert_eq!(stored.sources.iter().map(|s| (s.written, s.tokens, s.requests)).collect::<Vec<_>>(), [(2, 7, 1)]);
    assert_eq!(large_of(&db, "alpha").await, Some(text_of(&large("alpha"))));
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_small IS NOT NULL").await, 0, "only the batch's model");
    assert_eq!(large_of(&db, "beta").await, None, "a value its source lost is not stored");
    assert_eq!(large_of(&db, "gamma").await.as_deref(), Some("[9,9,9,9]"), "another pipeline's vector is kept");
    assert_eq!(
        db.texts("SELECT value_hash FROM embedding_cache_sources WHERE source_table = 'items'").await,
        [hash_of("alpha"), hash_of("gamma")].into()
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_owned").await, 1, "only alpha's row is embsync's");

    // Reading the output again (after a crash) stores nothing twice.
    let again =
        store.store_batch_request(&config, &RunId("run-1".into()), FILE, REQ0, &[large("x"), large("y"), large("z")], 7).await.unwrap();
    assert_eq!(again, RequestStored::default());
    assert_eq!(large_of(&db, "alpha").await, Some(text_of(&large("alpha"))));
    // A request needs a vector for each of its inputs.
    let short = store.store_batch_request(&config, &RunId("run-1".into()), FILE, REQ1, &[], 7).await.unwrap_err();
    assert!(short.to_string().contains("no vector for its input 0"), "{short}");
    assert_eq!(large_of(&db, "delta").await, None);
    let unknown = store.store_batch_request(&config, &RunId("run-1".into()), "file-nope", REQ1, &[large("delta")], 7).await.unwrap_err();
    assert!(unknown.to_string().contains("no batch file file-nope"), "{unknown}");

    store
        .set_batch_state(&SetBatchState {
            batch_id: "batch_1",
            state: "completed",
            output_file_id: Some("file-out"),
            error_file_id: None,
            request_counts: r#"{"total": 2, "completed": 2, "failed": 0}"#,
            finished: false,
        })
        .await
        .unwrap();
    let open = store.open_batches().await.unwrap();
    assert_eq!(
        (open[0].state.as_str(), open[0].output_file_id.as_deref(), open[0].error_file_id.as_deref()),
        ("completed", Some("file-out"), None)
    );
    assert_eq!(db.count("SELECT (request_counts->>'completed')::int8 FROM embedding_sync_batches").await, 2);
    store
        .set_batch_state(&SetBatchState {
            batch_id: "batch_1",
            state: "stored",
            output_file_id: Some("file-out"),
            error_file_id: None,
            request_counts: "{}",
            finished: true,
        })
        .await
        .unwrap();
    assert!(store.open_batches().await.unwrap().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn nothing_is_written_without_the_lease_or_under_another_model() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma", "delta"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let mut store = leased(&db, &config, "inv-1").await;
    record(&mut store, &config).await;

    // Another invocation takes the expired lease over: this one writes nothing more.
    db.exec("UPDATE embedding_sync_lease SET expires_at = now() - interval '1 second'").await;
    let other = leased(&db, &config, "inv-2").await;
    let lost = store
        .store_batch_request(&config, &RunId("run-1".into()), FILE, REQ0, &[large("alpha"), large("beta"), large("gamma")], 7)
        .await
        .unwrap_err();
    assert!(lost.is_lease_lost(), "{lost}");
    assert!(store.set_batch_created(FILE, "batch_1").await.unwrap_err().is_lease_lost());
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 4);

    // The large model's size changed since the file was built: its vectors are not stored, and
    // its values go the synchronous way (they are no longer recorded as in a batch).
    let changed = Config::parse(
        &serde_json::to_string(&serde_json::json!({
            "version": "1.0",
            "models": {"large": {"name": "text-embedding-3-large", "dimensions": 8}, "small": {"name": "text-embedding-3-small", "dimensions": 2}},
            "sources": [{"name": "Items", "table": "items", "column": "title"}]
        }))
        .unwrap(),
    )
    .unwrap();
    // The store's tags are its config's: a store of the changed config holding the lease.
    db.exec("UPDATE embedding_sync_lease SET expires_at = now() - interval '1 second'").await;
    let mut changed_store = db.store(&changed).await;
    assert_eq!(changed_store.acquire_lease("inv-3", TTL).await.unwrap(), Lease::Acquired);
    let stored = changed_store
        .store_batch_request(&changed, &RunId("run-1".into()), FILE, REQ0, &[large("alpha"), large("beta"), large("gamma")], 7)
        .await
        .unwrap();
    assert_eq!(stored, RequestStored { written: 0, gone: 0, model_changed: true, sources: Vec::new() });
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 1, "only REQ1 is left");
    drop(other);
}

#[tokio::test(flavor = "current_thread")]
async fn the_sync_does_not_send_what_a_pending_batch_brings() {
    use embsync_core::sync::{Budget, Outcome};
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma", "delta"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let mut store = leased(&db, &config, "inv-0").await;
    // A pending batch of the large model has alpha, beta and gamma (REQ0) and delta (REQ1).
    record(&mut store, &config).await;
    store.set_batch_created(FILE, "batch_1").await.unwrap();
    store.release_lease().await.unwrap();

    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let Outcome::Finished(report) = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap() else {
        panic!("the run did not finish");
    };
    assert_eq!(report.totals.new, 4);
    let calls = provider.calls.borrow().clone();
    assert!(calls.iter().all(|(model, _)| model == "text-embedding-3-small"), "the large model waits for its batch: {calls:?}");
    for value in ["alpha", "beta", "gamma", "delta"] {
        assert_eq!(provider.requests_for(value), 1, "{value}: its small embedding, once");
    }
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NULL AND embedding_small IS NOT NULL").await, 4);

    // The batch's output arrives: REQ0 is stored; the next run has only delta's large left,
    // and sends nothing while its batch is pending.
    assert_eq!(store.acquire_lease("inv-2", TTL).await.unwrap(), Lease::Acquired);
    let stored = store
        .store_batch_request(&config, &RunId("run-1".into()), FILE, REQ0, &[large("alpha"), large("beta"), large("gamma")], 7)
        .await
        .unwrap();
    assert_eq!(stored.written, 3);
    assert_eq!(large_of(&db, "beta").await, Some(text_of(&large("beta"))), "a row embsync wrote gets the batch's vector");
    store.release_lease().await.unwrap();
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-3", None).await.unwrap();
    assert_eq!(provider.calls.borrow().len(), calls.len(), "nothing is sent while delta's batch is pending");

    // Once the batch is over (e.g. failed), delta's large goes the synchronous way.
    assert_eq!(store.acquire_lease("inv-4", TTL).await.unwrap(), Lease::Acquired);
    let over = SetBatchState {
        batch_id: "batch_1",
        state: "failed",
        output_file_id: None,
        error_file_id: None,
        request_counts: "{}",
        finished: true,
    };
    store.set_batch_state(&over).await.unwrap();
    store.release_lease().await.unwrap();
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-5", None).await.unwrap();
    let after: Vec<_> = provider.calls.borrow()[calls.len()..].to_vec();
    assert_eq!(after, [("text-embedding-3-large".to_string(), vec!["delta".to_string()])]);
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL").await, 4);
}

#[tokio::test(flavor = "current_thread")]
async fn refused_lines_go_to_the_errors_and_an_ended_batch_releases_its_values() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma", "delta"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let mut store = leased(&db, &config, "inv-1").await;
    record(&mut store, &config).await;
    store.set_batch_created(FILE, "batch_1").await.unwrap();
    db.exec("DELETE FROM items WHERE title = 'gamma'").await;

    // REQ0's line was refused because of an input: its values that the source still has are
    // recorded as errors of the source, with the model's tag, and wait for their retry.
    let recorded = store
        .record_batch_request_errors(&config, &RunId("run-1".into()), FILE, REQ0, "provider refused the request (400): bad input")
        .await
        .unwrap();
    assert_eq!(recorded, [("items".to_string(), "title".to_string(), 2)]);
    assert_eq!(
        db.texts("SELECT value_hash || ' ' || model || ' ' || message FROM embedding_sync_errors WHERE source_table = 'items'").await,
        ["alpha", "beta"]
            .iter()
            .map(|v| format!("{} text-embedding-3-large:4 provider refused the request (400): bad input", hash_of(v)))
            .collect()
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_errors WHERE next_retry_at > now()").await, 2);
    assert_eq!(db.count(&format!("SELECT count(*) FROM embedding_sync_batch_values WHERE custom_id = '{REQ0}'")).await, 0);

    // The batch ends (here: expired) with REQ1 not run: its values are released with it.
    let over = SetBatchState {
        batch_id: "batch_1",
        state: "expired",
        output_file_id: None,
        error_file_id: Some("file-err"),
        request_counts: "{}",
        finished: true,
    };
    store.set_batch_state(&over).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0);
    assert!(store.open_batches().await.unwrap().is_empty());

    // A file no batch was made of (cut between upload and create) ends the same way.
    let hash = ValueHash::from_hex(&hash_of("delta")).unwrap();
    let (table, column) = (config.sources[0].table_key(), config.sources[0].column_key().to_owned());
    let value = BatchValue {
        custom_id: REQ0,
        position: 0,
        hash: &hash,
        value: "delta",
        occurrences: 1,
        source_table: &table,
        source_column: &column,
    };
    store.record_batch_file("file-2", &RunId("run-2".into()), ModelSlot::Small, 1, &[value]).await.unwrap();
    store.finish_batch_file("file-2", "abandoned").await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_batch_values").await, 0);
    assert_eq!(
        db.texts("SELECT state FROM embedding_sync_batches WHERE finished_at IS NOT NULL").await,
        ["abandoned".to_string(), "expired".to_string()].into()
    );
}
