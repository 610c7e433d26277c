//! What the store's native tests share: a fresh database per test in the throwaway Postgres that
//! `scripts/test.sh` starts (`EMBSYNC_TEST_PG_URL`), a provider that answers like OpenAI's shapes
//! and fails on command, a runtime with a virtual clock, and ([`hooked`]) the one wrapper that
//! lets a test reach between the driver and the store.
//!
//! The store under test is the worker's own [`PgStore`]: only the socket differs (TCP here, the
//! Workers socket API in the worker).

#![allow(dead_code)]

pub mod batch_http;
pub mod hooked;

use embsync_core::config::{Config, ModelSpec};
use embsync_core::dburl;
use embsync_core::log::LogEvent;
use embsync_core::provider::{decode_response, Embeddings, ProviderError, RateLimit};
use embsync_core::report::Trigger;
use embsync_core::sync::{self, Budget, Cursor, Embedder, Invocation, Outcome, RetryPolicy, RunId, Runtime, SyncError};
use embsync_core::vector::Vector;
use embsync_store::PgStore;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The admin URL of the test cluster.
pub fn admin_url() -> String {
    std::env::var("EMBSYNC_TEST_PG_URL").unwrap_or_else(|_| {
        panic!("EMBSYNC_TEST_PG_URL is not set: run these tests through scripts/test.sh, which starts a throwaway Postgres")
    })
}

/// Connects to `url`; the connection is driven by a task on the current tokio runtime.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A fresh database, dropped when the test ends (unless it failed: then it is kept and named).
pub struct TestDb {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    /// A connection for the test's own reads and writes (not the store's).
    pub client: Client,
}

impl TestDb {
    /// Creates a database with a unique name and the vector extension.
    pub async fn create() -> TestDb {
        let admin = connect(&admin_url()).await;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("embsync_store_{}_{n}", std::process::id());
        let mut last = None;
        // CREATE DATABASE copies template1 and fails while another session is connected to it.
        for _ in 0..20 {
            match admin.batch_execute(&format!("CREATE DATABASE {name}")).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Some(e) = last {
            panic!("CREATE DATABASE {name}: {e}");
        }
        let url = dburl::with_database(&admin_url(), &name);
        let client = connect(&url).await;
        client.batch_execute("CREATE EXTENSION IF NOT EXISTS vector").await.expect("CREATE EXTENSION vector");
        TestDb { url, name, client }
    }

    /// A store over a new connection to this database.
    pub async fn store(&self, config: &Config) -> PgStore {
        PgStore::new(connect(&self.url).await, config)
    }

    /// Runs SQL statements (no parameters).
    pub async fn exec(&self, sql: &str) {
        self.client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// One `bigint` (e.g. `SELECT count(*) ...`).
    pub async fn count(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// The first column of every row, as text.
    pub async fn texts(&self, sql: &str) -> BTreeSet<String> {
        self.client.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get::<_, String>(0)).collect()
    }

    /// A source table `table (id serial, column text)` holding `values`.
    pub async fn source_table(&self, table: &str, column: &str, values: &[&str]) {
        self.exec(&format!("CREATE TABLE {table} (id serial PRIMARY KEY, {column} text)")).await;
        self.insert(table, column, values).await;
    }

    /// Inserts `values` into `table.column`.
    pub async fn insert(&self, table: &str, column: &str, values: &[&str]) {
        let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.client
            .execute(&format!("INSERT INTO {table} ({column}) SELECT unnest($1::text[])"), &[&values])
            .await
            .unwrap_or_else(|e| panic!("inserting into {table}: {e}"));
    }
}

/// The hash embsync gives a value (lowercase hex SHA-256 of the trimmed text).
pub fn hash_of(value: &str) -> String {
    hex::encode(Sha256::digest(value.trim_matches(' ').as_bytes()))
}

/// The vector the fake provider answers for `input` with `model`: deterministic, so a stored
/// vector can be checked against it.
pub fn vector_for(model: &str, dims: usize, input: &str) -> Vec<f32> {
    let digest = Sha256::digest(format!("{model}\u{0}{input}").as_bytes());
    (0..dims).map(|i| f32::from(digest[i % 32]) / 255.0 - 0.5 + i as f32 * 1e-3).collect()
}

/// A provider that answers like OpenAI (one vector per input, in order, with usage) and fails on
/// command.
#[derive(Default)]
pub struct FakeProvider {
    /// Errors for the n-th request (1-based); unlisted requests succeed.
    pub faults: RefCell<HashMap<usize, ProviderError>>,
    /// An input containing this is refused with a 400 naming it.
    pub poison: RefCell<Option<String>>,
    /// Every request: model and inputs.
    pub calls: RefCell<Vec<(String, Vec<String>)>>,
    /// Recorded error answers, decoded by the worker's own `decode_response`: the first that
    /// matches a request answers it.
    pub refusals: RefCell<Vec<Refusal>>,
    /// The rate-limit state reported with every successful answer.
    pub rate: RefCell<Option<RateLimit>>,
}

/// A recorded error answer (status and body, as the provider sends them) for the requests it
/// matches: those of `model` (any when `None`) with an input containing `input_contains` (any
/// when `None`).
pub struct Refusal {
    pub model: Option<String>,
    pub input_contains: Option<String>,
    pub status: u16,
    pub body: String,
}

impl FakeProvider {
    /// How many requests carried `value`.
    pub fn requests_for(&self, value: &str) -> usize {
        self.calls.borrow().iter().filter(|(_, inputs)| inputs.iter().any(|i| i == value)).count()
    }
}

impl Embedder for FakeProvider {
    async fn embed(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let n = {
            let mut calls = self.calls.borrow_mut();
            calls.push((model.name().to_owned(), inputs.iter().map(|s| s.to_string()).collect()));
            calls.len()
        };
        if let Some(e) = self.faults.borrow().get(&n) {
            return Err(e.clone());
        }
        for r in self.refusals.borrow().iter() {
            let model_matches = r.model.as_deref().is_none_or(|m| m == model.name());
            let input_matches = r.input_contains.as_deref().is_none_or(|p| inputs.iter().any(|i| i.contains(p)));
            if model_matches && input_matches {
                let decoded = decode_response(r.status, |_| None, r.body.as_bytes(), inputs.len(), model.dimensions());
                return Err(decoded.expect_err("a refusal decodes as an error"));
            }
        }
        if let Some(p) = self.poison.borrow().as_deref() {
            if inputs.iter().any(|i| i.contains(p)) {
                return Err(ProviderError::Rejected { status: 400, message: format!("input contains {p:?}") });
            }
        }
        let dims = model.dimensions() as usize;
        Ok(Embeddings {
            vectors: inputs.iter().map(|i| Vector::from_f32(&vector_for(model.name(), dims, i)).expect("finite")).collect(),
            prompt_tokens: inputs.iter().map(|i| i.len().div_ceil(4) as u64).sum(),
            rate: *self.rate.borrow(),
        })
    }
}

/// A virtual clock: sleeping advances it at once.
#[derive(Default)]
pub struct TestRuntime {
    /// Milliseconds since the epoch.
    pub now: RefCell<f64>,
    /// Every event logged.
    pub events: RefCell<Vec<LogEvent>>,
    /// Every wait, in order.
    pub slept: RefCell<Vec<Duration>>,
}

impl TestRuntime {
    /// The messages of the events logged so far.
    pub fn messages(&self) -> Vec<String> {
        self.events.borrow().iter().map(|e| e.message.clone()).collect()
    }
}

impl Runtime for TestRuntime {
    fn now_ms(&self) -> f64 {
        *self.now.borrow_mut() += 1.0;
        *self.now.borrow()
    }
    async fn sleep(&self, d: Duration) {
        self.slept.borrow_mut().push(d);
        *self.now.borrow_mut() += d.as_secs_f64() * 1e3;
    }
    fn random(&self) -> f64 {
        0.5
    }
    fn log(&self, event: LogEvent) {
        self.events.borrow_mut().push(event);
    }
}

/// A config with small dimensions (4 and 2) and the given sources (`name`, `table`, `column`).
pub fn config(batch: u32, sources: &[(&str, &str, &str)]) -> Config {
    let sources: Vec<String> = sources.iter().map(|(n, t, c)| format!(r#"{{"name":"{n}","table":"{t}","column":"{c}"}}"#)).collect();
    Config::parse(&format!(
        r#"{{"version":"1.0","models":{{"large":{{"name":"text-embedding-3-large","dimensions":4}},"small":{{"name":"text-embedding-3-small","dimensions":2}}}},
        "batchSize":{batch},"sources":[{}]}}"#,
        sources.join(",")
    ))
    .expect("a valid test config")
}

/// One invocation of the real driver over `store`.
pub async fn invoke(
    config: &Config,
    store: &mut PgStore,
    provider: &FakeProvider,
    rt: &TestRuntime,
    budget: Budget,
    holder: &str,
    hint: Option<&Cursor>,
) -> Result<Outcome, SyncError> {
    let id = RunId(format!("run-{}", COUNTER.fetch_add(1, Ordering::SeqCst)));
    let inv = Invocation {
        trigger: Trigger::Cron,
        retry: RetryPolicy::default(),
        budget,
        new_run: &id,
        holder,
        hint,
        fanout: None,
        batch_api: None,
    };
    sync::invoke(config, store, provider, rt, &inv).await
}
