//! Errors of values a source no longer has go with the value, and `/status` counts only errors
//! of values the source still has.

mod support;

use embsync_core::sync::{Budget, Outcome};
use support::*;

#[tokio::test(flavor = "current_thread")]
async fn the_errors_of_a_deleted_value_go_with_it_and_status_counts_only_current_values() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha", "poison one", "beta", "poison two"]).await;
    let config = config(10, &[("Items", "items", "title")]);
    let source = &config.sources[0];
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    *provider.poison.borrow_mut() = Some("poison".into());
    let mut store = db.store(&config).await;
    let Outcome::Finished(report) = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap() else {
        panic!("the run did not finish");
    };
    assert_eq!(report.totals.errors, 2);
    assert_eq!(store.coverage(source).await.errors, 2);

    // One poison value leaves the source: /status stops counting its error at once.
    db.exec("DELETE FROM items WHERE title = 'poison one'").await;
    assert_eq!(store.coverage(source).await.errors, 1, "an error of a value the source no longer has is counted");

    // The next run removes its error row with the value; the other stays.
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-2", None).await.unwrap();
    assert_eq!(
        db.texts("SELECT value_hash FROM embedding_sync_errors").await,
        [hash_of("poison two")].into(),
        "the error of the deleted value is still there"
    );
    assert_eq!(store.coverage(source).await.errors, 1);
}
