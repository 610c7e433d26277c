//! No locks on the user's tables in steady state: the schema's version is recorded and DDL runs
//! only when it is behind, with a lock timeout, so a pg_dump (ACCESS SHARE on every table for as
//! long as it runs) neither holds an invocation up nor gets readers queued behind embsync.

mod support;

use embsync_core::sync::{Budget, Outcome, SyncError};
use std::time::{Duration, Instant};
use support::*;
use tokio_postgres::Client;

/// What pg_dump holds while it runs: ACCESS SHARE on every table of the database, in one
/// repeatable-read transaction, until the returned connection commits or goes away.
async fn hold_like_pg_dump(db: &TestDb) -> Client {
    let dump = connect(&db.url).await;
    let tables: String = dump
        .query_one("SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    dump.batch_execute(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE {tables} IN ACCESS SHARE MODE")).await.unwrap();
    dump
}

/// Lock requests in this database that wait, and backends waiting for a lock.
async fn waiting(db: &TestDb) -> (i64, i64) {
    let locks = db
        .count("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE d.datname = current_database() AND NOT l.granted")
        .await;
    let backends = db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await;
    (locks, backends)
}

#[tokio::test(flavor = "current_thread")]
async fn a_steady_state_invocation_does_not_wait_for_a_pg_dump() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap();

    // A new value to embed and one to remove, while a dump runs.
    db.exec("INSERT INTO items (title) VALUES ('delta'); DELETE FROM items WHERE title = 'beta'").await;
    let dump = hold_like_pg_dump(&db).await;
    let mut store = db.store(&config).await;
    let began = Instant::now();
    let outcome =
        tokio::time::timeout(Duration::from_secs(10), invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-2", None)).await;
    let blocked = waiting(&db).await;
    let Ok(Ok(Outcome::Finished(report))) = outcome else {
        panic!(
            "the invocation did not finish within 10 s while a dump held ACCESS SHARE (waiting locks, backends: {blocked:?}): {outcome:?}"
        );
    };
    assert!(began.elapsed() < Duration::from_secs(5), "it took {:?}", began.elapsed());
    assert_eq!((report.totals.embedded, report.totals.stale, report.totals.deleted), (1, 1, 1));
    assert_eq!(blocked, (0, 0));
    dump.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_migration_under_a_pg_dump_fails_fast_with_a_clear_error_and_leaves_nothing_queued() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap();

    // A deployment from before the schema had a version: the next invocation migrates it.
    db.exec("DROP TABLE IF EXISTS embedding_sync_schema").await;
    let dump = hold_like_pg_dump(&db).await;
    let mut store = db.store(&config).await;
    let began = Instant::now();
    let outcome =
        tokio::time::timeout(Duration::from_secs(20), invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-2", None)).await;
    let took = began.elapsed();
    let Ok(Err(SyncError::Schema(e))) = &outcome else {
        panic!("expected a schema error within 20 s (waiting locks, backends: {:?}), got {outcome:?}", waiting(&db).await);
    };
    let message = e.to_string();
    assert!(
        message.contains("could not get a lock on embedding_cache_owned within 5 s; something holds it (a pg_dump?): retry later"),
        "{message}"
    );
    assert!(took < Duration::from_secs(10), "it took {took:?}");
    assert_eq!(waiting(&db).await, (0, 0), "a lock request stayed queued");
    assert_eq!(db.count("SELECT count(*) FROM pg_class WHERE relname = 'embedding_sync_schema'").await, 0, "half a migration");
    assert_eq!(provider.calls.borrow().len(), 2, "the provider was called");

    // Once the dump is over, the next invocation migrates and syncs.
    dump.batch_execute("COMMIT").await.unwrap();
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-3", None).await.unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_schema").await, 1, "the version is recorded");
}

#[tokio::test(flavor = "current_thread")]
async fn embsync_builds_no_index_on_a_cache_it_did_not_create() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha"]).await;
    // Another pipeline's cache, without a unique index on value_hash.
    db.exec(
        "CREATE TABLE embedding_cache (id bigserial PRIMARY KEY, value text, value_hash text, embedding_large vector(4),
             embedding_small vector(2), source_table text, source_column text, usage_count int, created_at timestamptz DEFAULT now())",
    )
    .await;
    let config = config(10, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv", None).await;
    let Err(SyncError::Schema(e)) = &outcome else { panic!("expected a schema error, got {outcome:?}") };
    assert!(
        e.to_string().contains(
            "embedding_cache has no unique index on value_hash, which embsync needs to insert rows: create it (CREATE UNIQUE INDEX CONCURRENTLY"
        ),
        "{e}"
    );
    assert_eq!(
        db.texts("SELECT indexname::text FROM pg_indexes WHERE tablename = 'embedding_cache'").await,
        ["embedding_cache_pkey".to_owned()].into()
    );
    assert_eq!(provider.calls.borrow().len(), 0);

    // Once the owner has built it, embsync goes on with the cache as it is.
    db.exec("CREATE UNIQUE INDEX embedding_cache_value_hash_key ON embedding_cache (value_hash)").await;
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv", None).await.unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL").await, 1);
}
