//! The sync side of `bench/capture.sh`: the real driver over the real store, natively, with an
//! in-process provider that answers at once (the bench measures what the sync costs, not the
//! provider).
//!
//! `capture_bench <database url> <table> <scan|capture> <runs> [sql]`: syncs `<table>.title`
//! until a run finishes (the initial sync), then times `<runs>` more whole runs (each an
//! `invoke`: lease, run, plan or capture step, finish) and prints one line per run: `run <ms>`
//! with the run's new, stale and unchanged counts. With `sql`, it runs that (untimed) before each
//! timed run, e.g. an UPDATE of 1% of the rows.
//!
//! `capture_bench <database url> <table> install`: only installs the capture (one run of a
//! captured source with nothing to embed beyond what the table has), for the writers' figures.
//!
//! With `BENCH_LOG` set, every log event goes to stderr with a timestamp (where a run's time
//! went).

use embsync_core::config::{Config, ModelSpec};
use embsync_core::log::LogEvent;
use embsync_core::provider::{Embeddings, ProviderError};
use embsync_core::report::Trigger;
use embsync_core::sync::{self, Budget, Embedder, Invocation, Outcome, RetryPolicy, RunId, Runtime};
use embsync_core::vector::Vector;
use embsync_store::PgStore;
use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Instant0;

impl Embedder for Instant0 {
    async fn embed(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let v: Vec<f32> = (0..model.dimensions()).map(|i| i as f32 / 10.0).collect();
        let vector = Vector::from_f32(&v).expect("finite");
        Ok(Embeddings { vectors: inputs.iter().map(|_| vector.clone()).collect(), prompt_tokens: inputs.len() as u64, rate: None })
    }
}

struct Rt;

impl Runtime for Rt {
    fn now_ms(&self) -> f64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    }
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
    fn random(&self) -> f64 {
        0.5
    }
    fn log(&self, event: LogEvent) {
        if std::env::var_os("BENCH_LOG").is_some() || matches!(event.event, "reconcile" | "stopped" | "store") {
            eprintln!("{:.0} {} {}", self.now_ms() % 100_000.0, event.event, event.message);
        }
    }
}

thread_local! {
    static RUN: Cell<u64> = const { Cell::new(0) };
}

async fn invoke(config: &Config, store: &mut PgStore) -> Outcome {
    let id = RunId(format!("bench-{}-{}", std::process::id(), RUN.with(|r| r.replace(r.get() + 1))));
    let budget = Budget { max_batches: 100_000, max_ms: 3_600_000.0, lease_ttl: Duration::from_secs(5400), max_subrequests: 1_000_000 };
    let inv = Invocation { trigger: Trigger::Http, retry: RetryPolicy::default(), budget, new_run: &id, holder: "bench", hint: None, fanout: None, batch_api: None };
    sync::invoke(config, store, &Instant0, &Rt, &inv).await.unwrap_or_else(|e| panic!("the sync failed: {e}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, table, mode, rest @ ..] = args.as_slice() else {
        panic!("usage: capture_bench <database url> <table> <scan|capture|install> [runs]");
    };
    let changes = if mode == "scan" { "scan" } else { "capture" };
    let config = Config::parse(&format!(
        r#"{{"version":"1.0","models":{{"large":{{"name":"text-embedding-3-large","dimensions":4}},"small":{{"name":"text-embedding-3-small","dimensions":2}}}},
        "batchSize":2048,"sources":[{{"name":"S","table":"{table}","column":"title","changes":"{changes}","allowMassDelete":true}}]}}"#
    ))
    .expect("a valid config");
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connecting");
    tokio::spawn(connection);
    let mut store = PgStore::new(client, &config);
    // The initial sync (or the install): until a run finishes.
    loop {
        match invoke(&config, &mut store).await {
            Outcome::Finished(_) => break,
            Outcome::Paused(..) => continue,
            other => panic!("unexpected: {other:?}"),
        }
    }
    if mode == "install" {
        return;
    }
    let runs: usize = rest.first().and_then(|r| r.parse().ok()).unwrap_or(5);
    let (other, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connecting");
    tokio::spawn(connection);
    for _ in 0..runs {
        if let Some(sql) = rest.get(1) {
            other.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let began = Instant::now();
        let outcome = invoke(&config, &mut store).await;
        let ms = began.elapsed().as_secs_f64() * 1e3;
        let Outcome::Finished(report) = outcome else { panic!("the run did not finish: {outcome:?}") };
        let s = &report.sources[0];
        println!("run {ms:.1} new={} stale={} unchanged={} embedded={}", s.new, s.stale, s.unchanged, s.embedded);
    }
}
