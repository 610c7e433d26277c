//! Removing stale values costs what changed, not the size of the cache, in any planner state:
//! on tables nobody has analyzed yet (right after a bulk load), the removal's plan probes indexes
//! for the stale values instead of scanning `embedding_cache` or `embedding_cache_sources`.

mod support;

use embsync_core::sql;
use embsync_core::sync::Store;
use support::*;
use tokio_postgres::types::{ToSql, Type};

/// Before, the three statements touched about 4,050 buffers here (52 + 968 + 3,030); now the
/// one statement touches about 225.
///
/// The statements stale removal runs for a source, with their parameters (the guard on, as by
/// default). Before, they were `unlink_stale`, `DELETE_ORPHANS` and `REASSIGN_SOURCE`: the
/// orphan deletion's plan was hash joins over sequential scans of `embedding_cache`,
/// `embedding_cache_sources` and `embedding_cache_owned`.
fn removal(source: &embsync_core::config::Source) -> Vec<(String, Vec<(Box<dyn ToSql + Sync + Send>, Type)>)> {
    let params: Vec<(Box<dyn ToSql + Sync + Send>, Type)> = vec![
        (Box::new(source.table_key()), Type::TEXT),
        (Box::new(source.column_key().to_owned()), Type::TEXT),
        (Box::new(true), Type::BOOL),
        (Box::new(100i64), Type::INT8),
        (Box::new(0.5f64), Type::FLOAT8),
    ];
    vec![(sql::remove_stale(source), params)]
}

async fn explain(db: &TestDb, options: &str, statement: &str, params: &[(Box<dyn ToSql + Sync + Send>, Type)]) -> String {
    let params: Vec<(&(dyn ToSql + Sync), Type)> = params.iter().map(|(v, t)| (&**v as &(dyn ToSql + Sync), t.clone())).collect();
    let rows =
        db.client.query_typed(&format!("EXPLAIN ({options}) {statement}"), &params).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
    rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
}

/// The shared buffers (hit and read) of the plan's top node: the whole statement's.
fn top_buffers(plan: &str) -> i64 {
    let Some(line) = plan.lines().find(|l| l.trim_start().starts_with("Buffers: shared")) else {
        return 0;
    };
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix("hit=").or_else(|| w.strip_prefix("read=")).or_else(|| w.strip_prefix("dirtied=").map(|_| "0")))
        .map(|n| n.parse::<i64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "current_thread")]
async fn stale_removal_probes_indexes_for_the_stale_values_on_tables_never_analyzed() {
    let db = TestDb::create().await;
    let config = config(10, &[("A", "a", "title"), ("B", "b", "name")]);
    let mut store = db.store(&config).await;
    store.ensure_schema(&config).await.unwrap();
    let tables = ["embedding_cache", "embedding_cache_sources", "embedding_cache_owned", "embedding_sync_errors", "embedding_sync_orphans"];
    for t in tables {
        db.exec(&format!("ALTER TABLE {t} SET (autovacuum_enabled = off)")).await;
    }
    // A bulk load: source B has 20,000 values, source A 100, all embedded by embsync and linked.
    db.exec(
        "CREATE TABLE a (title text); INSERT INTO a SELECT 'a' || i FROM generate_series(1, 100) i;
         CREATE TABLE b (name text); INSERT INTO b SELECT 'b' || i FROM generate_series(1, 20000) i;
         INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count)
         SELECT v, encode(sha256(convert_to(v, 'UTF8')), 'hex'), '[1,2,3,4]', '[1,2]', t, c, 1
         FROM (SELECT title, 'a', 'title' FROM a UNION ALL SELECT name, 'b', 'name' FROM b) s(v, t, c);
         INSERT INTO embedding_cache_owned (value_hash, cache_id, large_model, small_model, created_at)
         SELECT value_hash, id, 'text-embedding-3-large:4', 'text-embedding-3-small:2', created_at FROM embedding_cache;
         INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)
         SELECT value_hash, source_table, source_column FROM embedding_cache;
         DELETE FROM a WHERE title IN ('a1', 'a2', 'a3', 'a4', 'a5', 'a6', 'a7', 'a8', 'a9', 'a10');",
    )
    .await;
    for t in tables {
        assert_eq!(db.count(&format!("SELECT count(*) FROM pg_stat_user_tables WHERE relname = '{t}' AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL)")).await, 0, "{t} was analyzed");
    }
    let source = &config.sources[0];
    let (mut buffers, mut orphan_buffers) = (0, 0);
    for (statement, params) in removal(source) {
        let plan = explain(&db, "COSTS false", &statement, &params).await;
        for t in ["embedding_cache", "embedding_cache_sources", "embedding_cache_owned"] {
            assert!(!plan.lines().any(|l| l.contains(&format!("Seq Scan on {t} "))), "a scan of {t}:\n{statement}\n{plan}");
        }
        // What it touches, executed and rolled back.
        db.exec("BEGIN").await;
        let analyzed = explain(&db, "ANALYZE, BUFFERS, COSTS false, TIMING false", &statement, &params).await;
        buffers += top_buffers(&analyzed);
        // The source's values are read once, never once per link (a correlated subquery over
        // them is quadratic: 4.3 s at 10,000 values).
        let rescanned = analyzed.lines().filter(|l| l.contains("CTE Scan on src") && !l.contains("loops=1)") && !l.contains("never executed")).collect::<Vec<_>>();
        assert!(rescanned.is_empty(), "the source's values read again per link: {rescanned:?}\n{analyzed}");
        let unlinked = analyzed.lines().find(|l| l.contains("Delete on embedding_cache_sources")).unwrap_or_default();
        assert!(unlinked.contains("actual rows=10"), "not 10 stale values:\n{analyzed}");
        // The run's end deletes the 10 orphan candidates the removal recorded: its plan probes
        // indexes too, on the same tables never analyzed.
        let run: Vec<(Box<dyn ToSql + Sync + Send>, Type)> = vec![(Box::new("run-1".to_owned()), Type::TEXT)];
        let delete = sql::delete_orphans(&config.enabled_sources().collect::<Vec<_>>());
        let plan = explain(&db, "COSTS false", &delete, &run).await;
        for t in ["embedding_cache", "embedding_cache_sources", "embedding_cache_owned"] {
            assert!(!plan.lines().any(|l| l.contains(&format!("Seq Scan on {t} "))), "a scan of {t}:\n{delete}\n{plan}");
        }
        let analyzed = explain(&db, "ANALYZE, BUFFERS, COSTS false, TIMING false", &delete, &run).await;
        db.exec("ROLLBACK").await;
        let deleted = analyzed.lines().find(|l| l.contains("Delete on embedding_cache d")).unwrap_or_default();
        assert!(deleted.contains("actual rows=10"), "not 10 orphans deleted:\n{analyzed}");
        orphan_buffers += top_buffers(&analyzed);
    }
    eprintln!("stale removal of 10 values touched {buffers} buffers, the orphans' deletion {orphan_buffers}");
    assert!(buffers < 400, "stale removal of 10 values touched {buffers} buffers");
    assert!(orphan_buffers < 400, "deleting 10 orphans touched {orphan_buffers} buffers");
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_sync_analyzes_embsyncs_own_tables() {
    let db = TestDb::create().await;
    db.exec("CREATE TABLE items (title text); INSERT INTO items SELECT 'v' || i FROM generate_series(1, 12000) i").await;
    let config = config(2048, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    let outcome = invoke(&config, &mut store, &provider, &rt, embsync_core::sync::Budget::default(), "inv", None).await.unwrap();
    assert!(matches!(outcome, embsync_core::sync::Outcome::Finished(_)), "{outcome:?}");
    let analyzed =
        db.texts("SELECT relname::text FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL AND relname LIKE 'embedding_%'").await;
    assert_eq!(
        analyzed,
        ["embedding_cache", "embedding_cache_owned", "embedding_cache_sources", "embedding_sync_pending"].map(String::from).into()
    );
}
