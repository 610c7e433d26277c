//! Issue 3: runs that span many invocations. A large source finishes over several cron
//! invocations within a small per-invocation budget; a run survives workerd being killed with
//! SIGKILL; two triggers at once never embed a value twice, and an invocation that lost its lease
//! leaves the run alone; a deleted or garbage KV cursor costs nothing but a re-scan; `GET /status`
//! shows the run; a 1,000,000-row source can be planned.
//!
//! Every test starts its own stack. The values are generated in SQL. The embedding columns are
//! created with few dimensions (`dimensions` in the config; the worker creates the columns to
//! match): what these tests exercise (budgets, leases, cursors, counters) does not depend on the
//! vector size, and full-size vectors would only make the suite slower.

mod chain;
mod cursor;
mod large;
mod overlap;
mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use embsync_e2e::*;
use serde_json::{json, Value};

/// The one source of these tests.
pub const PARTS: Src = Src { name: "Parts", table: "runs_part", column: "label" };

/// Batches an invocation holds launched and not yet written, at most, with both models: the one
/// being written and two whose requests are out (five provider connections, two requests a
/// batch). A killed invocation pays at most these twice.
pub const IN_FLIGHT_BATCHES: u64 = 3;

/// Dimensions of the two models in these tests (the worker creates the columns to match).
pub const LARGE_D: u64 = 48;
pub const SMALL_D: u64 = 24;

/// An `EMBEDDING_SOURCES` JSON with [`PARTS`] only, `batch_size` and the small dimensions.
pub fn parts_config(batch_size: u64) -> String {
    json!({
        "version": "1.0",
        "models": {
            "large": {"name": LARGE_MODEL, "dimensions": LARGE_D},
            "small": {"name": SMALL_MODEL, "dimensions": SMALL_D},
        },
        "batchSize": batch_size,
        "sources": [{"name": PARTS.name, "table": PARTS.table, "column": PARTS.column, "enabled": true}],
    })
    .to_string()
}

/// A database whose [`PARTS`] table holds `rows` rows over `distinct` distinct values
/// (`'Part <g> <md5(g)>'`, g = 1..=distinct, each repeated evenly), generated in SQL.
pub fn db_with_parts(distinct: u64, rows: u64) -> TestDb {
    let mut db = TestDb::create();
    db.create_source_table(PARTS.table, PARTS.column);
    db.exec(&format!(
        "INSERT INTO {t} ({c}) SELECT 'Part ' || k || ' ' || md5(k::text) \
         FROM (SELECT (g - 1) % {distinct} + 1 AS k FROM generate_series(1, {rows}) g) s; \
         ANALYZE {t}",
        t = PARTS.table,
        c = PARTS.column,
    ));
    db
}

/// The distinct values of [`PARTS`].
pub fn part_values(db: &mut TestDb) -> BTreeSet<String> {
    db.text_set(&format!("SELECT DISTINCT {c} FROM {t}", t = PARTS.table, c = PARTS.column))
}

/// The worker options of these tests: [`parts_config`] and `vars` (`SYNC_MAX_BATCHES`, ...).
pub fn opts(db: &TestDb, provider: &Provider, batch_size: u64, vars: &[(&str, &str)]) -> WorkerOpts {
    let mut o = WorkerOpts::new(db, provider).sources(parts_config(batch_size));
    for (k, v) in vars {
        o = o.var(k, v);
    }
    o
}

/// How one invocation ended, as the worker logged it.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// A `paused` event: its cursor.
    Paused(Value),
    /// A `report` event (the run finished): its report.
    Finished(Value),
    /// A `skipped` event (the lease was held): its message.
    Skipped(String),
    /// A `failed` event: `Sync failed: ...` (cron) or `/sync failed: ...` (HTTP).
    Failed(String),
}

/// The invocation ends logged so far, oldest first. A refused `POST /sync` logs both a
/// `skipped` and a `failed` event; the latter is folded into the former.
pub fn ends(worker: &Worker) -> Vec<End> {
    let mut out: Vec<End> = Vec::new();
    for e in worker.events() {
        let message = e["message"].as_str().unwrap_or_default().to_string();
        match e["event"].as_str() {
            Some("paused") => out.push(End::Paused(e["cursor"].clone())),
            Some("report") => out.push(End::Finished(e["report"].clone())),
            Some("skipped") => out.push(End::Skipped(message)),
            Some("failed") => {
                if !matches!(out.last(), Some(End::Skipped(_))) || e["path"].is_null() {
                    out.push(End::Failed(message));
                }
            }
            _ => {}
        }
    }
    out
}

/// Waits until the worker has logged more than `before` invocation ends; returns the next one.
pub fn wait_end(worker: &Worker, before: usize, timeout: Duration) -> End {
    let deadline = Instant::now() + timeout;
    loop {
        let e = ends(worker);
        if e.len() > before {
            return e[before].clone();
        }
        if Instant::now() > deadline {
            panic!(
                "no end of invocation {} (`Sync paused:`, `Sync report:`, `Sync skipped:` or \
                 `Sync failed:`) within {timeout:?}; log {}:\n{}",
                before + 1,
                worker.log_path().display(),
                worker.log_tail(60)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One cron invocation: triggers `/__scheduled` and waits for it to end (the endpoint answers
/// 200 whatever happens, so the end is read from the log).
pub fn cron(worker: &Worker, timeout: Duration) -> End {
    let before = ends(worker).len();
    let (status, body) = worker.scheduled();
    assert_eq!(status, 200, "/__scheduled: {body}");
    wait_end(worker, before, timeout)
}

/// Cron invocations until the run finishes (at most `max`); returns every end, the last one
/// being [`End::Finished`].
pub fn cron_until_finished(worker: &Worker, max: usize, timeout_each: Duration) -> Vec<End> {
    let mut out = Vec::new();
    for _ in 0..max {
        let end = cron(worker, timeout_each);
        out.push(end.clone());
        match end {
            End::Finished(_) => return out,
            End::Paused(_) => {}
            other => panic!("a cron invocation ended with {other:?} (ends so far: {out:?}); log tail:\n{}", worker.log_tail(60)),
        }
    }
    panic!("the run did not finish within {max} cron invocations: {out:?}");
}

/// The `(i, N)` of every `batch` event (`Batch i of N: ...`), in log order.
pub fn batch_lines(worker: &Worker) -> Vec<(u64, u64)> {
    worker.events_of("batch").iter().map(|e| (e["batch"].as_u64().expect("batch"), e["of"].as_u64().expect("of"))).collect()
}

/// How often the provider answered 200 for each input of `model`.
pub fn ok_input_counts(provider: &Provider, model: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in provider.requests() {
        if r["model"] != model || r["status"] != 200 {
            continue;
        }
        for x in r["inputs"].as_array().cloned().unwrap_or_default() {
            *out.entry(x.as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
        }
    }
    out
}

/// Every value of `values` was embedded exactly once per model, and nothing else was asked.
/// The message lists a few offenders, not the whole log.
pub fn assert_each_value_paid_once(provider: &Provider, values: &BTreeSet<String>) {
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let counts = ok_input_counts(provider, model);
        let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
        let missing: Vec<&String> = values.iter().filter(|v| !counts.contains_key(*v)).collect();
        let extra: Vec<&String> = counts.keys().filter(|v| !values.contains(*v)).collect();
        assert!(
            twice.is_empty() && missing.is_empty() && extra.is_empty(),
            "{model}: each of the {} values must be embedded exactly once: {} asked more than once \
             (e.g. {:?}), {} never asked (e.g. {:?}), {} not in the source (e.g. {:?})",
            values.len(),
            twice.len(),
            &twice[..twice.len().min(5)],
            missing.len(),
            &missing[..missing.len().min(5)],
            extra.len(),
            &extra[..extra.len().min(5)],
        );
    }
}

/// `embedding_cache` holds exactly the values of [`PARTS`], each with both embeddings of the
/// test sizes, linked once to the source and owned by embsync.
pub fn assert_cache_exact(db: &mut TestDb, distinct: i64) {
    let rows = db.count("SELECT count(*) FROM embedding_cache");
    assert_eq!(rows, distinct, "rows in embedding_cache");
    let missing = db.count(&format!(
        "SELECT count(*) FROM (SELECT DISTINCT encode(sha256(convert_to(trim({c}), 'UTF8')), 'hex') AS h FROM {t}) s \
         WHERE NOT EXISTS (SELECT 1 FROM embedding_cache c WHERE c.value_hash = s.h \
           AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL \
           AND vector_dims(c.embedding_large) = {LARGE_D} AND vector_dims(c.embedding_small) = {SMALL_D})",
        t = PARTS.table,
        c = PARTS.column,
    ));
    assert_eq!(missing, 0, "source values without a complete cache row");
    let links = db.count(&format!(
        "SELECT count(*) FROM embedding_cache_sources WHERE source_table = '{}' AND source_column = '{}'",
        PARTS.table, PARTS.column
    ));
    assert_eq!(links, distinct, "links in embedding_cache_sources");
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache_owned"), distinct, "rows in embedding_cache_owned");
}

/// The runs in `embedding_sync_runs`: `(run_id, status, invocations, finished)`, oldest first.
pub fn runs(db: &mut TestDb) -> Vec<(String, String, i32, bool)> {
    db.client()
        .query("SELECT run_id, status, invocations, finished_at IS NOT NULL FROM embedding_sync_runs ORDER BY started_at, run_id", &[])
        .expect("select embedding_sync_runs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// The id of the one run in the database.
pub fn only_run_id(db: &mut TestDb) -> String {
    let all = runs(db);
    assert_eq!(all.len(), 1, "exactly one run: {all:?}");
    all[0].0.clone()
}

/// The stored report of run `id` (`embedding_sync_runs.report`).
pub fn stored_report(db: &mut TestDb, id: &str) -> Value {
    db.json(&format!("SELECT report::text FROM embedding_sync_runs WHERE run_id = '{id}'"))
        .unwrap_or_else(|| panic!("run {id} has no stored report"))
}

/// Asserts the final report of a run over [`PARTS`] with `distinct` new values, all embedded.
pub fn assert_final_report(report: &Value, run_id: &str, distinct: i64, batches: i64) {
    assert_eq!(report["runId"], json!(run_id), "runId of {report:#}");
    assert_eq!(report["status"], json!("finished"), "status of {report:#}");
    assert_counts(
        "report totals",
        &report["totals"],
        &[
            ("total", distinct),
            ("new", distinct),
            ("unchanged", 0),
            ("reused", 0),
            ("embedded", distinct),
            ("stale", 0),
            ("deleted", 0),
            ("errors", 0),
            ("deferred", 0),
            ("batches", batches),
        ],
    );
    assert_counts(
        "report of Parts",
        source_entry(report, PARTS.table),
        &[("total", distinct), ("new", distinct), ("embedded", distinct), ("errors", 0)],
    );
}

/// Seconds since `t`, for the timing lines the tests print.
pub fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}
