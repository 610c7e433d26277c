//! Removing stale values costs what changed, not the size of the cache, in any planner state:
//! on tables nobody has analyzed yet (right after a bulk load), the removal's plan probes indexes
//! for the stale values instead of scanning `embedding_cache` or `embedding_cache_sources`.

mod support;

use embsync_core::report::Trigger;
use embsync_core::sql::param::{Param, Text};
use embsync_core::sql::{self, Statement};
use embsync_core::status::WaitingOrphans;
use embsync_core::sync::{Budget, DeleteGuard, Outcome, RunId, Store, StoreError};
use embsync_store::bind::{query, Bound};
use embsync_store::PgStore;
use support::hooked::{Call, Go, Hook, Hooked};
use support::*;

/// `EXPLAIN (options)` of a typed statement, with its parameters.
struct Explain<'a, S> {
    options: &'a str,
    statement: &'a S,
}

impl<const N: usize, S: Statement<N>> Statement<N> for Explain<'_, S> {
    fn text(&self) -> Text<N> {
        Text::built(format!("EXPLAIN ({}) {}", self.options, self.statement.text().as_str()))
    }
    fn params(&self) -> [Param<'_>; N] {
        self.statement.params()
    }
}

async fn explain<const N: usize>(db: &TestDb, options: &str, statement: &impl Statement<N>) -> String {
    let rows = query(&db.client, &Bound::new(&Explain { options, statement }))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", statement.text().as_str()));
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
    // Stale removal as the store runs it, with the guard on as by default. Before, it was three
    // statements (`unlink_stale`, `DELETE_ORPHANS` and `REASSIGN_SOURCE`) that touched about
    // 4,050 buffers here (52 + 968 + 3,030): the orphan deletion's plan was hash joins over
    // sequential scans of `embedding_cache`, `embedding_cache_sources` and
    // `embedding_cache_owned`. Now the one statement touches about 225.
    let removal = sql::RemoveStale { source, guard: Some(DeleteGuard { minimum: 100, max_share: 0.5 }) };
    let statement = removal.text();
    let plan = explain(&db, "COSTS false", &removal).await;
    for t in ["embedding_cache", "embedding_cache_sources", "embedding_cache_owned"] {
        assert!(!plan.lines().any(|l| l.contains(&format!("Seq Scan on {t} "))), "a scan of {t}:\n{}\n{plan}", statement.as_str());
    }
    // What it touches, executed and rolled back.
    db.exec("BEGIN").await;
    let analyzed = explain(&db, "ANALYZE, BUFFERS, COSTS false, TIMING false", &removal).await;
    let buffers = top_buffers(&analyzed);
    // The source's values are read once, never once per link (a correlated subquery over them is
    // quadratic: 4.3 s at 10,000 values).
    let rescanned = analyzed
        .lines()
        .filter(|l| l.contains("CTE Scan on src") && !l.contains("loops=1)") && !l.contains("never executed"))
        .collect::<Vec<_>>();
    assert!(rescanned.is_empty(), "the source's values read again per link: {rescanned:?}\n{analyzed}");
    let unlinked = analyzed.lines().find(|l| l.contains("Delete on embedding_cache_sources")).unwrap_or_default();
    assert!(unlinked.contains("actual rows=10"), "not 10 stale values:\n{analyzed}");
    // The run's end deletes the 10 orphan candidates the removal recorded: its plan probes
    // indexes too, on the same tables never analyzed.
    let (run, sources) = (RunId("run-1".into()), config.enabled_sources().collect::<Vec<_>>());
    let orphans = sql::DeleteOrphans { run: &run, sources: &sources };
    let delete = orphans.text();
    let plan = explain(&db, "COSTS false", &orphans).await;
    for t in ["embedding_cache", "embedding_cache_sources", "embedding_cache_owned"] {
        assert!(!plan.lines().any(|l| l.contains(&format!("Seq Scan on {t} "))), "a scan of {t}:\n{}\n{plan}", delete.as_str());
    }
    let analyzed = explain(&db, "ANALYZE, BUFFERS, COSTS false, TIMING false", &orphans).await;
    db.exec("ROLLBACK").await;
    let deleted = analyzed.lines().find(|l| l.contains("Delete on embedding_cache d")).unwrap_or_default();
    assert!(deleted.contains("actual rows=10"), "not 10 orphans deleted:\n{analyzed}");
    let orphan_buffers = top_buffers(&analyzed);
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

/// The run's end fails to delete the orphan candidates.
struct CutBeforeOrphans;

impl Hook for CutBeforeOrphans {
    async fn before(&mut self, call: &Call<'_>, _: &mut PgStore) -> Go {
        match call {
            Call::DeleteOrphans { .. } => Go::Fail(StoreError::new("cut before the orphans' deletion")),
            _ => Go::Run,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn status_counts_the_orphan_candidates_waiting_for_the_end_of_a_run() {
    let db = TestDb::create().await;
    let config = config(10, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    // Before embsync's tables exist there is nothing to count, and no error.
    assert_eq!(store.waiting_orphans().await.unwrap(), WaitingOrphans::default());
    db.source_table("items", "title", &["a", "b", "c", "d"]).await;
    invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap();
    assert_eq!(store.waiting_orphans().await.unwrap(), WaitingOrphans::default());

    // Two values leave the source; the run that unlinks them fails to delete their rows at its
    // end: they wait.
    db.exec("DELETE FROM items WHERE title IN ('a', 'b')").await;
    let mut hooked = Hooked::new(db.store(&config).await, CutBeforeOrphans);
    let id = RunId("run-cut".into());
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
    // The driver goes on without the deletion (the next run's end deletes them).
    let cut = embsync_core::sync::invoke(&config, &mut hooked, &provider, &rt, &inv).await;
    let Ok(Outcome::Finished(report)) = cut else { panic!("{cut:?}") };
    assert_eq!((report.totals.stale, report.totals.deleted), (2, 0));
    let waiting = store.waiting_orphans().await.unwrap();
    assert_eq!(waiting.rows, 2);
    let oldest = waiting.oldest.expect("the time the first was unlinked");
    let recorded =
        db.texts("SELECT to_char(min(unlinked_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') FROM embedding_sync_orphans").await;
    assert!(recorded.iter().all(|t| oldest.starts_with(t.as_str())), "{oldest} is not {recorded:?}");

    // The next run that gets through every source deletes them: nothing waits.
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-3", None).await.unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
    assert_eq!(store.waiting_orphans().await.unwrap(), WaitingOrphans::default());
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 2);
}
