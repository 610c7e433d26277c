//! The real store against real Postgres + pgvector, driven by the real sync driver.

mod support;

use embsync_core::sync::{Budget, Outcome};
use support::*;

#[tokio::test(flavor = "current_thread")]
async fn a_first_run_embeds_every_distinct_value_and_a_second_run_costs_nothing() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "  alpha ", "beta", "", "   ", "gamma"]).await;
    let config = config(2, &[("Items", "items", "title")]);
    let provider = FakeProvider::default();
    let rt = TestRuntime::default();
    let mut store = db.store(&config).await;
    let Outcome::Finished(report) = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap() else {
        panic!("the run did not finish");
    };
    assert_eq!((report.totals.total, report.totals.new, report.totals.embedded), (3, 3, 3));
    assert_eq!(db.texts("SELECT value FROM embedding_cache").await, ["alpha", "beta", "gamma"].map(String::from).into());
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL").await,
        3
    );
    // Two batches of two models.
    assert_eq!(provider.calls.borrow().len(), 4);
    let Outcome::Finished(again) = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-2", None).await.unwrap() else {
        panic!("the second run did not finish");
    };
    assert_eq!((again.totals.total, again.totals.new, again.totals.unchanged), (3, 0, 3));
    assert_eq!(provider.calls.borrow().len(), 4, "an unchanged source calls the provider again");
}

#[tokio::test(flavor = "current_thread")]
async fn stored_vectors_are_the_providers_bit_for_bit() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "beta"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv", None).await.unwrap();
    for value in ["alpha", "beta"] {
        let row = db
            .client
            .query_one("SELECT embedding_large::text, embedding_small::text FROM embedding_cache WHERE value_hash = $1", &[&hash_of(value)])
            .await
            .unwrap();
        let parse = |t: String| -> Vec<f32> { t.trim_matches(['[', ']']).split(',').map(|x| x.parse().unwrap()).collect() };
        assert_eq!(parse(row.get(0)), vector_for("text-embedding-3-large", 4, value));
        assert_eq!(parse(row.get(1)), vector_for("text-embedding-3-small", 2, value));
    }
}
