//! Ownership follows the cache row, not its value: a row that another pipeline wrote after
//! embsync's row of the same value was deleted is never overwritten or deleted by embsync.

mod support;

use embsync_core::config::Config;
use embsync_core::sync::{Budget, Outcome};
use support::*;

/// Like [`config`], with another large model of the same size: embsync re-embeds the rows it
/// wrote with the old one.
fn other_large_model(sources: &[(&str, &str, &str)]) -> Config {
    let sources: Vec<String> =
        sources.iter().map(|(n, t, c)| format!(r#"{{"name":"{n}","table":"{t}","column":"{c}","allowMassDelete":true}}"#)).collect();
    Config::parse(&format!(
        r#"{{"version":"1.0","models":{{"large":{{"name":"another-large","dimensions":4}},"small":{{"name":"text-embedding-3-small","dimensions":2}}}},
        "batchSize":10,"sources":[{}]}}"#,
        sources.join(",")
    ))
    .expect("a valid test config")
}

/// The whole row as text: every column, byte for byte as Postgres prints it.
async fn row(db: &TestDb, value: &str) -> Option<String> {
    db.client.query_opt("SELECT c::text FROM embedding_cache c WHERE value = $1", &[&value]).await.unwrap().map(|r| r.get(0))
}

/// Someone deletes embsync's row of `value`, and another pipeline writes the same value with its
/// own vectors, naming the same source as embsync did.
async fn replace_with_foreign_row(db: &TestDb, value: &str) -> String {
    let named = db.client.query_one("SELECT source_table, source_column FROM embedding_cache WHERE value = $1", &[&value]).await.unwrap();
    let (table, column): (String, String) = (named.get(0), named.get(1));
    db.client.execute("DELETE FROM embedding_cache WHERE value = $1", &[&value]).await.unwrap();
    db.client
        .execute(
            "INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count)
             VALUES ($1, $2, '[9,8,7,6]', '[5,4]', $3, $4, 42)",
            &[&value, &hash_of(value), &table, &column],
        )
        .await
        .unwrap();
    row(db, value).await.expect("the foreign row")
}

async fn finish(config: &Config, store: &mut embsync_store::PgStore, provider: &FakeProvider, rt: &TestRuntime) {
    match invoke(config, store, provider, rt, Budget::default(), "inv", None).await.unwrap() {
        Outcome::Finished(_) => {}
        other => panic!("the run did not finish: {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_foreign_row_that_replaced_embsyncs_row_is_never_overwritten() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta"]).await;
    let first = config(10, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&first).await;
    finish(&first, &mut store, &provider, &rt).await;
    let foreign = replace_with_foreign_row(&db, "alpha").await;

    // The same config: the foreign row has both embeddings and is reused as it is.
    finish(&first, &mut store, &provider, &rt).await;
    assert_eq!(row(&db, "alpha").await.as_deref(), Some(foreign.as_str()));

    // Another large model: embsync re-embeds its own row ("beta"), not the foreign one.
    let second = other_large_model(&[("Items", "items", "title")]);
    let mut store = db.store(&second).await;
    finish(&second, &mut store, &provider, &rt).await;
    assert_eq!(row(&db, "alpha").await.as_deref(), Some(foreign.as_str()), "the foreign row was overwritten");
    assert_eq!(provider.requests_for("alpha"), 2, "alpha was embedded again: {:?}", provider.calls.borrow());
    assert!(provider.calls.borrow().iter().any(|(m, inputs)| m == "another-large" && inputs == &["beta".to_owned()]));
}

#[tokio::test(flavor = "current_thread")]
async fn a_foreign_row_that_replaced_embsyncs_row_is_never_deleted_or_reassigned() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta"]).await;
    db.source_table("others", "name", &["alpha"]).await;
    let config = config(10, &[("Items", "items", "title"), ("Others", "others", "name")]);
    let mut config = config;
    for s in &mut config.sources {
        s.allow_mass_delete = true;
    }
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    finish(&config, &mut store, &provider, &rt).await;
    let foreign = replace_with_foreign_row(&db, "alpha").await;

    // Items no longer has alpha, Others still does: the row that names Items is not embsync's
    // to reassign.
    db.exec("DELETE FROM items WHERE title = 'alpha'").await;
    finish(&config, &mut store, &provider, &rt).await;
    assert_eq!(row(&db, "alpha").await.as_deref(), Some(foreign.as_str()), "the foreign row was rewritten");

    // No source has alpha any more: the row is not embsync's to delete.
    db.exec("DELETE FROM others").await;
    finish(&config, &mut store, &provider, &rt).await;
    assert_eq!(row(&db, "alpha").await.as_deref(), Some(foreign.as_str()), "the foreign row was deleted");
    // embsync's own rows still go when no source has them.
    db.exec("DELETE FROM items").await;
    finish(&config, &mut store, &provider, &rt).await;
    assert_eq!(db.texts("SELECT value FROM embedding_cache").await, ["alpha"].map(String::from).into());
}

/// A deployment from before ownership followed the row: embsync's rows of alpha, beta and gamma
/// (each written with its ownership record in one transaction, as embsync did), then beta's
/// row replaced by another pipeline's and gamma's deleted by someone.
async fn version_1_deployment(db: &TestDb) {
    db.exec(include_str!("support/schema_v1.sql")).await;
    for value in ["alpha", "beta", "gamma"] {
        let h = hash_of(value);
        db.exec(&format!(
            "BEGIN;
             INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count, created_at)
             VALUES ('{value}', '{h}', '[1,2,3,4]', '[1,2]', 'items', 'title', 1, now());
             INSERT INTO embedding_cache_owned (value_hash, large_model, small_model) VALUES ('{h}', 'text-embedding-3-large:4', 'text-embedding-3-small:2');
             INSERT INTO embedding_cache_sources (value_hash, source_table, source_column) VALUES ('{h}', 'items', 'title');
             COMMIT;"
        ))
        .await;
    }
    db.exec(&format!(
        "DELETE FROM embedding_cache WHERE value IN ('beta', 'gamma');
         INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count)
         VALUES ('beta', '{}', '[9,8,7,6]', '[5,4]', 'items', 'title', 42);",
        hash_of("beta")
    ))
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_migration_keeps_embsyncs_own_rows_and_disowns_rows_someone_else_wrote() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta", "gamma"]).await;
    version_1_deployment(&db).await;
    let foreign = row(&db, "beta").await.unwrap();
    let mut config = config(10, &[("Items", "items", "title")]);
    config.sources[0].allow_mass_delete = true;
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    finish(&config, &mut store, &provider, &rt).await;
    // alpha's record names its row; beta's and gamma's are gone; gamma was embedded again and
    // its new row is embsync's.
    assert_eq!(
        db.texts("SELECT c.value FROM embedding_cache_owned o JOIN embedding_cache c ON c.id = o.cache_id AND c.value_hash = o.value_hash")
            .await,
        ["alpha", "gamma"].map(String::from).into()
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_owned").await, 2);
    assert_eq!(provider.requests_for("gamma"), 2);
    assert_eq!(provider.requests_for("beta"), 0, "the foreign row is complete and reused");
    assert_eq!(row(&db, "beta").await.as_deref(), Some(foreign.as_str()));

    // Every value leaves the source: embsync's rows go, the foreign one stays as it was.
    db.exec("DELETE FROM items").await;
    finish(&config, &mut store, &provider, &rt).await;
    assert_eq!(db.texts("SELECT value FROM embedding_cache").await, ["beta"].map(String::from).into());
    assert_eq!(row(&db, "beta").await.as_deref(), Some(foreign.as_str()));
}
