//! The mass-delete guard decides in the transaction that deletes: a source emptied after the
//! driver counted it is still held back.

mod support;

use embsync_core::report::Trigger;
use embsync_core::sync::{Budget, DeleteGuard, Outcome, RunId};
use embsync_store::PgStore;
use support::hooked::{Call, Go, Hook, Hooked};
use support::*;

/// The source table emptied (by someone else) just before stale values are removed: after
/// every count the driver could take.
struct EmptiedBeforeRemoval<'a> {
    db: &'a TestDb,
    empty: &'a str,
}

impl Hook for EmptiedBeforeRemoval<'_> {
    async fn before(&mut self, call: &Call<'_>, _: &mut PgStore) -> Go {
        if let Call::RemoveStale { .. } = call {
            self.db.exec(&format!("DELETE FROM {}", self.empty)).await;
        }
        Go::Run
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_source_emptied_after_it_was_counted_is_still_held_back_by_the_guard() {
    let db = TestDb::create().await;
    let values: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = values.iter().map(|s| s.as_str()).collect();
    db.source_table("items", "title", &refs).await;
    let mut config = config(10, &[("Items", "items", "title")]);
    config.mass_delete_minimum = 3;
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 10);

    // Two values go (an ordinary change, which the driver's count lets through), and the
    // table is emptied after that count, just before the removal.
    db.exec("DELETE FROM items WHERE title IN ('v0', 'v1')").await;
    let mut store = Hooked::new(db.store(&config).await, EmptiedBeforeRemoval { db: &db, empty: "items" });
    let id = RunId("run-guard".into());
    let inv = embsync_core::sync::Invocation {
        trigger: Trigger::Cron,
        retry: Default::default(),
        budget: Budget::default(),
        new_run: &id,
        holder: "inv-2",
        hint: None,
        fanout: None,
        batch_api: None,
    };
    let Outcome::Finished(report) = embsync_core::sync::invoke(&config, &mut store, &provider, &rt, &inv).await.unwrap() else {
        panic!("the run did not finish");
    };
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 10, "the emptied source was deleted past the guard");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_sources").await, 10);
    assert_eq!((report.sources[0].stale, report.sources[0].deleted), (0, 0));
    let warning = report.sources[0].warning.as_deref().unwrap_or_default();
    assert!(warning.starts_with("the source returned no values, so all 10 of its embedded values look stale"), "{warning}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_guards_sql_and_rust_agree() {
    let db = TestDb::create().await;
    let guard = DeleteGuard { minimum: 3, max_share: 0.5 };
    let statement = format!(
        "SELECT {} FROM (SELECT $6::int8 AS total, $7::int8 AS had, $8::int8 AS stale) c WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL",
        embsync_core::sql::MASS_DELETE_HELD
    );
    for total in [0u64, 1, 5, 10] {
        for had in [0u64, 1, 2, 5, 6, 10] {
            for stale in 0..=had {
                for on in [true, false] {
                    let (t, m, sh) = (total as i64, had as i64, stale as i64);
                    let row = db
                        .client
                        .query_typed_one(
                            &statement,
                            &[
                                (&"t", tokio_postgres::types::Type::TEXT),
                                (&"c", tokio_postgres::types::Type::TEXT),
                                (&on, tokio_postgres::types::Type::BOOL),
                                (&(guard.minimum as i64), tokio_postgres::types::Type::INT8),
                                (&guard.max_share, tokio_postgres::types::Type::FLOAT8),
                                (&t, tokio_postgres::types::Type::INT8),
                                (&m, tokio_postgres::types::Type::INT8),
                                (&sh, tokio_postgres::types::Type::INT8),
                            ],
                        )
                        .await
                        .unwrap();
                    let rust = on && guard.holds(total, had, stale);
                    assert_eq!(row.get::<_, bool>(0), rust, "total={total} had={had} stale={stale} on={on}");
                }
            }
        }
    }
}
