//! Change capture (`"changes": "capture"`) on real Postgres, driven by the real driver: the
//! triggers follow every kind of write, a run reads the change log instead of the table, the
//! reconcile catches what the triggers did not see and reports it as drift, and going back to
//! scan drops the triggers.

mod support;

use embsync_core::config::Config;
use embsync_core::log::Level;
use embsync_core::report::{RunReport, SourceReport};
use embsync_core::sync::{Budget, Outcome};
use embsync_store::PgStore;
use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

/// A config with small dimensions and the given sources (`name`, `table`, `column`, `changes`),
/// mass deletes allowed (a TRUNCATE empties a source).
fn capture_config(sources: &[(&str, &str, &str, &str)]) -> Config {
    let sources: Vec<String> = sources
        .iter()
        .map(|(n, t, c, changes)| format!(r#"{{"name":"{n}","table":"{t}","column":"{c}","changes":"{changes}","allowMassDelete":true}}"#))
        .collect();
    Config::parse(&format!(
        r#"{{"version":"1.0","models":{{"large":{{"name":"text-embedding-3-large","dimensions":4}},"small":{{"name":"text-embedding-3-small","dimensions":2}}}},
        "batchSize":10,"sources":[{}]}}"#,
        sources.join(",")
    ))
    .expect("a valid test config")
}

struct World {
    db: TestDb,
    config: Config,
    store: PgStore,
    provider: FakeProvider,
    rt: TestRuntime,
}

impl World {
    async fn new(sources: &[(&str, &str, &str, &str)]) -> World {
        let db = TestDb::create().await;
        let config = capture_config(sources);
        let store = db.store(&config).await;
        World { db, config, store, provider: FakeProvider::default(), rt: TestRuntime::default() }
    }

    async fn reconfigure(&mut self, sources: &[(&str, &str, &str, &str)]) {
        self.config = capture_config(sources);
        self.store = self.db.store(&self.config).await;
    }

    /// One whole run (one invocation is enough for these sizes).
    async fn run(&mut self) -> RunReport {
        self.rt.events.borrow_mut().clear();
        match invoke(&self.config, &mut self.store, &self.provider, &self.rt, Budget::default(), "worker", None).await {
            Ok(Outcome::Finished(report)) => report,
            other => panic!("the run did not finish: {other:?}"),
        }
    }

    fn source<'a>(report: &'a RunReport, name: &str) -> &'a SourceReport {
        report.sources.iter().find(|s| s.name == name).expect("the source is in the report")
    }

    /// The events of the last run with this kind.
    fn events(&self, kind: &str) -> Vec<String> {
        self.rt.events.borrow().iter().filter(|e| e.event == kind).map(|e| e.message.clone()).collect()
    }

    /// The values linked to the source, done (both embeddings).
    async fn linked(&self, table: &str, column: &str) -> BTreeSet<String> {
        self.db
            .texts(&format!(
                "SELECT c.value FROM embedding_cache_sources l JOIN embedding_cache c ON c.value_hash = l.value_hash
                 WHERE l.source_table = '{table}' AND l.source_column = '{column}'
                   AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL"
            ))
            .await
    }

    /// The distinct non-empty trimmed values the table has.
    async fn has(&self, table: &str, column: &str) -> BTreeSet<String> {
        self.db
            .texts(&format!("SELECT DISTINCT btrim({column}, ' ') FROM {table} WHERE {column} IS NOT NULL AND btrim({column}, ' ') <> ''"))
            .await
    }

    /// Checks that the source's embeddings and embsync's copy of its values follow the table.
    async fn follows(&self, table: &str, column: &str) {
        let has = self.has(table, column).await;
        assert_eq!(self.linked(table, column).await, has, "the links of {table}.{column} follow the table");
        let copy = self
            .db
            .texts(&format!(
                "SELECT m.value || ' x' || m.n FROM embedding_sync_capture_values m JOIN embedding_sync_capture k USING (capture_id)
                 WHERE k.source_table = '{table}' AND k.source_column = '{column}'"
            ))
            .await;
        let counted = self
            .db
            .texts(&format!(
                "SELECT btrim({column}, ' ') || ' x' || count(*) FROM {table}
                 WHERE {column} IS NOT NULL AND btrim({column}, ' ') <> '' GROUP BY btrim({column}, ' ')"
            ))
            .await;
        assert_eq!(copy, counted, "embsync's copy of {table}.{column} counts what the table has");
    }

    async fn log_rows(&self) -> i64 {
        // The sentinel (capture 0) aside.
        self.db.count("SELECT count(*) FROM embedding_sync_change_log WHERE capture_id <> 0").await
    }

    /// Reads (sequential and index scans) of `table` so far, once every backend has reported
    /// its statistics. Seen to fail with a scanned
    /// source (`"scan"` below).
    async fn reads(&mut self, table: &str) -> i64 {
        // A backend flushes its table statistics when it goes idle, at most once a second, and
        // 10 s later when the flush met a lock (a loaded machine): a wait is not enough. One that
        // exits flushes them at once, so the store gets a new connection and the old backend's
        // exit is awaited; this test's own reads (of `follows`) are flushed on demand.
        let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let before = self.db.count(others).await;
        self.store = self.db.store(&self.config).await;
        for _ in 0..200 {
            if self.db.count(others).await <= before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.db.exec("SELECT pg_stat_force_next_flush()").await;
        self.db.exec("SELECT pg_stat_clear_snapshot()").await;
        self.db.count(&format!("SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = '{table}'")).await
    }

    /// The capture triggers on `table`: name and `tgenabled`.
    async fn triggers(&self, table: &str) -> BTreeSet<String> {
        self.db
            .texts(&format!(
                "SELECT tgname::text || ' ' || tgenabled::text FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname LIKE 'embsync_capture%'"
            ))
            .await
    }

    async fn functions(&self) -> BTreeSet<String> {
        self.db
            .texts(
                "SELECT proname::text FROM pg_proc WHERE proname LIKE 'embsync_capture\\_%' AND proname <> 'embsync_capture_log_truncated'",
            )
            .await
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_captured_source_follows_inserts_updates_deletes_truncate_and_copy() {
    let mut w = World::new(&[("A", "a", "title", "capture")]).await;
    w.db.exec("CREATE TABLE a (id serial PRIMARY KEY, title text, other int DEFAULT 0)").await;
    w.db.insert("a", "title", &["x", "y", " y ", "z", "", " "]).await;

    // The first run installs the triggers (enabled always) and fills embsync's copy by a scan.
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").total, World::source(&report, "A").embedded), (3, 3));
    assert_eq!(w.events("reconcile"), ["Source A: reconciled by a scan: the capture was installed"]);
    let always: BTreeSet<String> =
        ["insert", "update", "delete", "truncate"].iter().map(|op| format!("embsync_capture_1_{op} A")).collect();
    assert_eq!(w.triggers("a").await, always);
    w.follows("a", "title").await;

    // Nothing changed: the source is not planned, nothing is asked of the provider.
    let calls = w.provider.calls.borrow().len();
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!((a.total, a.unchanged, a.new, a.embedded), (3, 3, 0, 0));
    assert_eq!(w.provider.calls.borrow().len(), calls);

    // INSERT: only the new value is embedded.
    w.db.insert("a", "title", &["w", " x", "w"]).await;
    assert_eq!(w.log_rows().await, 3, "one log row per row written (netted when the log is read)");
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 1);
    assert_eq!(w.provider.requests_for("w"), 2);
    assert_eq!(w.log_rows().await, 0, "the run consumed the log");
    w.follows("a", "title").await;

    // UPDATE of another column: no log row, and the next run costs nothing.
    w.db.exec("UPDATE a SET other = other + 1").await;
    assert_eq!(w.log_rows().await, 0, "an update of another column records nothing");
    let calls = w.provider.calls.borrow().len();
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").new, w.provider.calls.borrow().len()), (0, calls));
    assert!(w.events("capture").is_empty(), "the source was not even folded: {:?}", w.events("capture"));

    // UPDATE of the column: the new value is embedded, the old one goes.
    w.db.exec("UPDATE a SET title = 'v' WHERE title = 'z'").await;
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!((a.embedded, a.stale, a.deleted), (1, 1, 1));
    w.follows("a", "title").await;
    assert_eq!(w.db.count(&format!("SELECT count(*) FROM embedding_cache WHERE value_hash = '{}'", hash_of("z"))).await, 0);

    // An UPDATE that trims to the same value, and one that moves one of two rows: no change of the set.
    w.db.exec("UPDATE a SET title = ' w ' WHERE title = 'w'").await;
    w.db.exec("UPDATE a SET title = 'x' WHERE title = ' y '").await;
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!((a.embedded, a.stale), (0, 0));
    w.follows("a", "title").await;

    // DELETE.
    w.db.exec("DELETE FROM a WHERE btrim(title) = 'w'").await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").stale, 1);
    w.follows("a", "title").await;

    // COPY fires the statement's trigger too.
    let sink = w.db.client.copy_in("COPY a (title) FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    use futures::SinkExt;
    sink.send(bytes::Bytes::from_static(b"copied 1\ncopied 2\nx\n")).await.unwrap();
    sink.as_mut().finish().await.unwrap();
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 2);
    w.follows("a", "title").await;

    // TRUNCATE forces a reconcile by scan.
    w.db.exec("TRUNCATE a").await;
    w.db.insert("a", "title", &["after"]).await;
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!((a.total, a.embedded), (1, 1));
    assert_eq!(w.events("reconcile"), ["Source A: reconciled by a scan: the table was truncated"]);
    w.follows("a", "title").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_change_the_triggers_did_not_see_is_caught_by_the_reconcile_and_reported_as_drift() {
    let mut w = World::new(&[("A", "a", "title", "capture")]).await;
    w.db.source_table("a", "title", &["x", "y"]).await;
    w.run().await;

    // Disabled triggers: the run scans instead, and reports what the capture missed.
    w.db.exec("ALTER TABLE a DISABLE TRIGGER USER").await;
    w.db.insert("a", "title", &["hidden"]).await;
    w.db.exec("DELETE FROM a WHERE title = 'x'").await;
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!((a.embedded, a.stale), (1, 1));
    let warning = a.warning.clone().unwrap_or_default();
    assert!(warning.contains("missed 1 new and 1 stale values") && warning.contains("4 of its triggers are disabled"), "{warning}");
    assert!(w.rt.events.borrow().iter().any(|e| e.event == "reconcile" && e.level == Level::Warn));
    w.follows("a", "title").await;
    assert_eq!(w.db.count("SELECT drift_new + drift_stale FROM embedding_sync_capture").await, 2);

    // Enabled again by hand (for `origin` only): the run enables them always and reconciles.
    w.db.exec("ALTER TABLE a ENABLE TRIGGER USER").await;
    w.db.insert("a", "title", &["while enabled"]).await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").warning, None, "the insert was seen by the triggers: no drift");
    assert!(w.events("reconcile")[0].contains("enabled again"), "{:?}", w.events("reconcile"));
    assert!(w.triggers("a").await.iter().all(|t| t.ends_with(" A")));
    w.follows("a", "title").await;

    // Under session_replication_role = replica (a logical replication apply) they fire too.
    w.db.exec("SET session_replication_role = replica; INSERT INTO a (title) VALUES ('replicated'); RESET session_replication_role").await;
    assert_eq!(w.log_rows().await, 1);
    w.run().await;
    w.follows("a", "title").await;

    // A change nothing could see (disabled and enabled always again in between) waits for the
    // scheduled reconcile.
    w.db.exec(
        "ALTER TABLE a DISABLE TRIGGER USER; INSERT INTO a (title) VALUES ('sneaky');
         ALTER TABLE a ENABLE ALWAYS TRIGGER embsync_capture_1_insert, ENABLE ALWAYS TRIGGER embsync_capture_1_update,
         ENABLE ALWAYS TRIGGER embsync_capture_1_delete, ENABLE ALWAYS TRIGGER embsync_capture_1_truncate",
    )
    .await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 0, "not seen before the schedule");
    w.db.exec("UPDATE embedding_sync_capture SET reconciled_at = now() - interval '25 hours'").await;
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!(a.embedded, 1);
    assert!(
        a.warning.clone().unwrap_or_default().contains("missed 1 new and 0 stale values (the scheduled reconcile (every 1d))"),
        "{:?}",
        a.warning
    );
    w.follows("a", "title").await;

    // A delete the triggers did not see, then one they did: the count would go below zero,
    // which forces a reconcile at once.
    w.db.exec(
        "ALTER TABLE a DISABLE TRIGGER USER; INSERT INTO a (title) VALUES ('twice');
         ALTER TABLE a ENABLE ALWAYS TRIGGER embsync_capture_1_insert, ENABLE ALWAYS TRIGGER embsync_capture_1_update,
         ENABLE ALWAYS TRIGGER embsync_capture_1_delete, ENABLE ALWAYS TRIGGER embsync_capture_1_truncate; DELETE FROM a WHERE title = 'twice'",
    )
    .await;
    let report = w.run().await;
    assert!(w.events("reconcile").iter().any(|e| e.contains("without the triggers")), "{:?}", w.events("reconcile"));
    assert_eq!(World::source(&report, "A").warning, None, "the table is as the copy says once the log is counted");
    w.follows("a", "title").await;

    // A trigger function from another version of embsync is replaced, and the source reconciled.
    w.db.exec(
        "CREATE OR REPLACE FUNCTION embsync_capture_1() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         INSERT INTO a (title) VALUES ('under the old function')",
    )
    .await;
    let report = w.run().await;
    assert_eq!(w.events("reconcile"), ["Source A: reconciled by a scan: its trigger function was replaced by this version of embsync"]);
    assert_eq!(World::source(&report, "A").embedded, 1);
    w.db.insert("a", "title", &["under the new one"]).await;
    assert_eq!(w.log_rows().await, 1, "the replaced function logs again");
    w.run().await;
    w.follows("a", "title").await;

    // An UPDATE of another column, or one that trims to the same value, logs nothing.
    w.db.exec("ALTER TABLE a ADD COLUMN other int DEFAULT 0; UPDATE a SET other = 1; UPDATE a SET title = title || ' ' WHERE title = 'y'")
        .await;
    assert_eq!(w.log_rows().await, 0);

    // The change log truncated: every capture is reconciled.
    w.db.insert("a", "title", &["lost"]).await;
    w.db.exec("TRUNCATE embedding_sync_change_log").await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 1);
    assert_eq!(w.events("reconcile"), ["Source A: reconciled by a scan: the change log was truncated"]);
    w.follows("a", "title").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_value_shared_by_a_captured_and_a_scanned_source() {
    let mut w = World::new(&[("A", "a", "title", "capture"), ("B", "b", "name", "scan")]).await;
    w.db.source_table("a", "title", &["shared", "only a"]).await;
    w.db.source_table("b", "name", &["shared", "only b"]).await;
    w.run().await;
    assert_eq!(w.provider.requests_for("shared"), 2, "embedded once, by both models");
    assert!(w.triggers("b").await.is_empty(), "the scanned source has no trigger");

    w.db.exec("DELETE FROM a WHERE title = 'shared'").await;
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").stale, World::source(&report, "A").deleted), (1, 0));
    assert_eq!(w.db.count(&format!("SELECT count(*) FROM embedding_cache WHERE value_hash = '{}'", hash_of("shared"))).await, 1);
    w.follows("a", "title").await;

    w.db.insert("a", "title", &["shared"]).await;
    w.db.exec("DELETE FROM b WHERE name = 'shared'").await;
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").reused, World::source(&report, "B").stale), (1, 1));
    assert_eq!(w.provider.requests_for("shared"), 2, "never paid twice");
    w.follows("a", "title").await;

    w.db.exec("DELETE FROM a WHERE title = 'shared'").await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").deleted, 1, "no source has it any more");
}

#[tokio::test(flavor = "current_thread")]
async fn going_back_to_scan_or_leaving_the_config_drops_the_triggers_and_functions() {
    let mut w = World::new(&[("A", "a", "title", "capture"), ("B", "b", "name", "capture")]).await;
    w.db.source_table("a", "title", &["x"]).await;
    w.db.source_table("b", "name", &["y"]).await;
    w.run().await;
    assert_eq!(w.triggers("a").await.len(), 4);
    assert_eq!(w.triggers("b").await.len(), 4);
    assert_eq!(w.functions().await.len(), 2);

    w.reconfigure(&[("A", "a", "title", "scan"), ("B", "b", "name", "capture")]).await;
    let report = w.run().await;
    assert!(w.triggers("a").await.is_empty());
    assert_eq!(w.triggers("b").await.len(), 4);
    assert_eq!(w.functions().await.len(), 1);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_capture").await, 1);
    assert_eq!(World::source(&report, "A").total, 1, "the scan goes on where the capture stopped");
    w.db.insert("a", "title", &["scanned"]).await;
    assert_eq!(w.log_rows().await, 0);
    w.db.insert("b", "name", &["captured"]).await;
    w.run().await;
    w.follows("b", "name").await;
    assert_eq!(w.linked("a", "title").await, w.has("a", "title").await);

    w.reconfigure(&[("A", "a", "title", "scan")]).await;
    w.run().await;
    assert!(w.triggers("b").await.is_empty());
    assert!(w.functions().await.is_empty());
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_capture").await, 0);
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_capture_values").await, 0);

    // A captured table renamed, then removed from the config: its triggers go with the function.
    w.reconfigure(&[("A", "a", "title", "scan"), ("B", "b", "name", "capture")]).await;
    w.run().await;
    w.db.exec("ALTER TABLE b RENAME TO b_old").await;
    w.reconfigure(&[("A", "a", "title", "scan")]).await;
    w.run().await;
    assert!(w.triggers("b_old").await.is_empty());
    assert!(w.functions().await.is_empty());

    // Captured again: installed afresh, and reconciled.
    w.reconfigure(&[("A", "a", "title", "capture")]).await;
    w.run().await;
    assert_eq!(w.events("reconcile"), ["Source A: reconciled by a scan: the capture was installed"]);
    w.follows("a", "title").await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_no_op_sync_of_a_captured_source_reads_no_source_rows_nor_does_an_insert() {
    let mut w = World::new(&[("A", "a", "title", "capture")]).await;
    w.db.exec(
        "CREATE TABLE a (id serial PRIMARY KEY, title text); INSERT INTO a (title) SELECT 'value ' || i FROM generate_series(1, 2000) i",
    )
    .await;
    w.run().await;
    w.follows("a", "title").await;

    let before = w.reads("a").await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").unchanged, 2000);
    assert_eq!(w.reads("a").await, before, "the no-op run read the source");

    // An insert is read from the change log; the plan reads embsync's copy, not the table.
    w.db.exec("INSERT INTO a (title) VALUES ('value 2001'), ('value 1')").await;
    let before = w.reads("a").await;
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").total, World::source(&report, "A").embedded), (2001, 1));
    assert_eq!(w.reads("a").await, before, "the run read the source");
    w.follows("a", "title").await;
}

#[tokio::test(flavor = "current_thread")]
async fn names_that_need_quoting_are_captured_too() {
    let mut w = World::new(&[("A", "app.Items", "t$embsync$", "capture")]).await;
    w.db.exec(r#"CREATE SCHEMA app; CREATE TABLE app."Items" (id serial PRIMARY KEY, "t$embsync$" text); INSERT INTO app."Items" ("t$embsync$") VALUES ('one')"#)
        .await;
    w.run().await;
    w.db.exec(
        r#"INSERT INTO app."Items" ("t$embsync$") VALUES ('two'); UPDATE app."Items" SET "t$embsync$" = 'uno' WHERE "t$embsync$" = 'one'"#,
    )
    .await;
    assert_eq!(w.log_rows().await, 3);
    let report = w.run().await;
    let a = World::source(&report, "A");
    assert_eq!((a.total, a.embedded, a.stale), (2, 2, 1));
    let want: BTreeSet<String> = ["two", "uno"].map(String::from).into();
    assert_eq!(w.linked("app.Items", "t$embsync$").await, want);
    w.reconfigure(&[("A", "app.Items", "t$embsync$", "scan")]).await;
    w.run().await;
    assert_eq!(w.db.count(r#"SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app."Items"'::regclass AND NOT tgisinternal"#).await, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn the_dry_run_and_status_show_the_mode_the_last_reconcile_and_the_backlog() {
    use embsync_core::report::ChangesMode;
    let mut w = World::new(&[("A", "a", "title", "capture"), ("B", "b", "name", "scan")]).await;
    w.db.source_table("a", "title", &["x"]).await;
    w.db.source_table("b", "name", &["y"]).await;

    // Before the first run (not even migrated): not installed, and counted by a scan.
    let plan = embsync_core::sync::dry_run(&w.config, &mut w.store).await;
    let (a, b) = (&plan.sources[0], &plan.sources[1]);
    assert_eq!((a.changes, b.changes), (ChangesMode::Capture, ChangesMode::Scan));
    let capture = a.capture.clone().expect("a capture entry");
    assert_eq!(
        (capture.triggers.as_str(), capture.reconcile_every.as_str(), capture.last_reconcile.clone(), capture.backlog),
        ("not installed", "1d", None, 0)
    );
    assert_eq!((a.total, a.error.clone(), b.capture.clone()), (1, None, None));

    // A database migrated before this version (no capture tables yet): counted by a scan too.
    w.db.exec("CREATE TABLE embedding_cache_sources (value_hash text, source_table text, source_column text); CREATE TABLE embedding_cache_owned (value_hash text, cache_id bigint, large_model text, small_model text); CREATE TABLE embedding_sync_errors (source_table text, source_column text, value_hash text, next_retry_at timestamptz); CREATE TABLE embedding_sync_runs (run_id text); CREATE TABLE embedding_cache (id bigserial, value text, value_hash text, embedding_large vector(4), embedding_small vector(2))").await;
    let mut fresh = w.db.store(&w.config).await;
    let plan = embsync_core::sync::dry_run(&w.config, &mut fresh).await;
    assert_eq!((plan.sources[0].total, plan.sources[0].new, plan.sources[0].error.clone()), (1, 1, None));
    w.db.exec("DROP TABLE embedding_cache_sources, embedding_cache_owned, embedding_sync_errors, embedding_sync_runs, embedding_cache")
        .await;

    w.run().await;
    w.db.insert("a", "title", &["p", "q", "q"]).await;
    let plan = embsync_core::sync::dry_run(&w.config, &mut w.store).await;
    let capture = plan.sources[0].capture.clone().expect("a capture entry");
    assert_eq!((capture.triggers.as_str(), capture.backlog, capture.last_drift), ("enabled", 3, None), "three rows written");
    assert!(capture.last_reconcile.is_some());

    let coverage = w.store.coverage(&w.config.sources[0]).await;
    assert_eq!((coverage.changes, coverage.capture.map(|c| c.backlog)), (ChangesMode::Capture, Some(3)));
    assert_eq!(w.store.coverage(&w.config.sources[1]).await.capture, None);

    // p and q were logged: only the value inserted with the triggers disabled is drift.
    w.db.exec("ALTER TABLE a DISABLE TRIGGER USER; INSERT INTO a (title) VALUES ('missed')").await;
    w.run().await;
    let capture = w.store.coverage(&w.config.sources[0]).await.capture.expect("a capture entry");
    assert_eq!((capture.triggers.as_str(), capture.last_drift), ("disabled", Some(embsync_core::sync::Drift { new: 1, stale: 0 })));
}

#[tokio::test(flavor = "current_thread")]
async fn a_change_log_emptied_without_a_truncate_forces_a_reconcile_of_every_capture() {
    // The log is UNLOGGED: a crash, a failover or a restarted compute empties it, sentinel and
    // all, and no TRUNCATE trigger fires. Rows deleted from it (here, with the sentinel) stand
    // for that loss.
    let mut w = World::new(&[("A", "a", "title", "capture"), ("B", "b", "name", "capture")]).await;
    w.db.source_table("a", "title", &["x"]).await;
    w.db.source_table("b", "name", &["y"]).await;
    w.run().await;
    assert_eq!(
        w.db.count("SELECT count(*) FROM pg_class WHERE relname = 'embedding_sync_change_log' AND relpersistence = 'u'").await,
        1,
        "the log is unlogged"
    );
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_change_log WHERE capture_id = 0").await, 1, "its sentinel");

    // Lost with changes in it: both sources are reconciled, and both changes embedded.
    w.db.insert("a", "title", &["lost a"]).await;
    w.db.insert("b", "name", &["lost b"]).await;
    w.db.exec("DELETE FROM embedding_sync_change_log").await;
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").embedded, World::source(&report, "B").embedded), (1, 1));
    let reason = "reconciled by a scan: the change log was lost (it is unlogged: a crash, a failover or a restart empties it)";
    assert_eq!(w.events("reconcile"), [format!("Source A: {reason}"), format!("Source B: {reason}")]);
    assert_eq!(World::source(&report, "A").warning, None, "a lost log's record is not whole: no drift");
    w.follows("a", "title").await;
    w.follows("b", "name").await;
    assert_eq!(w.db.count("SELECT count(*) FROM embedding_sync_change_log WHERE capture_id = 0").await, 1, "the sentinel is back");

    // Once reconciled, the capture goes on from the log.
    w.db.insert("a", "title", &["after"]).await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 1);
    assert!(w.events("reconcile").is_empty(), "{:?}", w.events("reconcile"));
    w.follows("a", "title").await;

    // Lost while the source was settled (nothing in the log for it): reconciled all the same.
    w.db.exec("ALTER TABLE a DISABLE TRIGGER USER; INSERT INTO a (title) VALUES ('unseen'); ALTER TABLE a ENABLE ALWAYS TRIGGER embsync_capture_1_insert").await;
    w.db.exec("DELETE FROM embedding_sync_change_log").await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 1);
    w.follows("a", "title").await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_earlier_versions_statement_level_update_trigger_is_replaced_by_the_row_trigger() {
    let mut w = World::new(&[("A", "a", "title", "capture")]).await;
    w.db.source_table("a", "title", &["x"]).await;
    w.run().await;
    // As version 4 installed it: statement-level, with transition tables, and another body.
    w.db.exec(
        "CREATE OR REPLACE TRIGGER embsync_capture_1_update AFTER UPDATE ON a REFERENCING OLD TABLE AS embsync_old NEW TABLE AS embsync_new
             FOR EACH STATEMENT EXECUTE FUNCTION embsync_capture_1();
         ALTER TABLE a ENABLE ALWAYS TRIGGER embsync_capture_1_update;
         CREATE OR REPLACE FUNCTION embsync_capture_1() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    )
    .await;
    w.run().await;
    assert_eq!(
        w.db.count("SELECT count(*) FROM pg_trigger WHERE tgname = 'embsync_capture_1_update' AND tgtype & 1 = 1 AND tgqual IS NOT NULL AND tgenabled = 'A'")
            .await,
        1,
        "a row trigger with a WHEN, enabled always"
    );
    w.db.exec("UPDATE a SET title = 'x2'").await;
    assert_eq!(w.log_rows().await, 2);
    let report = w.run().await;
    assert_eq!((World::source(&report, "A").embedded, World::source(&report, "A").stale), (1, 1));
    w.follows("a", "title").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_logged_change_log_postgres_will_not_make_unlogged_stays_logged_and_the_migration_goes_on() {
    let mut w = World::new(&[("A", "a", "title", "capture")]).await;
    w.db.source_table("a", "title", &["x"]).await;
    w.run().await;
    // As version 4 left it, then put in a publication by name (inserts only: one that publishes
    // deletes would refuse the fold's, as it did before): SET UNLOGGED is refused.
    w.db.exec(
        "ALTER TABLE embedding_sync_change_log SET LOGGED; CREATE PUBLICATION embsync_test_pub FOR TABLE embedding_sync_change_log WITH (publish = 'insert');
         UPDATE embedding_sync_schema SET version = 4",
    )
    .await;
    w.reconfigure(&[("A", "a", "title", "capture")]).await;
    w.db.insert("a", "title", &["y"]).await;
    let report = w.run().await;
    assert_eq!(World::source(&report, "A").embedded, 1);
    w.follows("a", "title").await;
    assert_eq!(w.db.count("SELECT version::int8 FROM embedding_sync_schema").await, embsync_core::sql::SCHEMA_VERSION as i64);
    assert_eq!(
        w.db.count("SELECT count(*) FROM pg_class WHERE relname = 'embedding_sync_change_log' AND relpersistence = 'p'").await,
        1,
        "still logged"
    );
    w.db.exec("DROP PUBLICATION embsync_test_pub").await;
}
