//! The worker under `wrangler dev`: starting and stopping it, its HTTP routes and cron trigger,
//! and its local KV.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::{send, send_get_full, to_json, HttpResponse};
use crate::pg::TestDb;
use crate::provider::Provider;
use crate::util::{env_var, free_port, keep_logs, port_of, temp_dir};
use crate::{API_KEY, TOKEN};

/// How long `wrangler dev` may take to answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The queue blocks of wrangler.toml uncommented (fan-out), with these settings of the ranges
    /// queue's consumer replaced (see [`WorkerOpts::queues`]).
    pub queues: Option<Vec<(String, String)>>,
}

impl WorkerOpts {
    /// The usual options: the test database, the provider, [`TOKEN`], the compiled-in config.
    pub fn new(db: &TestDb, provider: &Provider) -> WorkerOpts {
        WorkerOpts {
            database_url: db.url.clone(),
            openai_base_url: provider.base_url(),
            openai_api_key: provider.api_key.clone().unwrap_or_else(|| API_KEY.to_string()),
            sync_token: Some(TOKEN.to_string()),
            sources: None,
            // One invocation per trigger, as most tests count them; a test of chained
            // invocations sets it (`var` replaces it).
            vars: vec![("SYNC_CHAIN_SECONDS".to_string(), "0".to_string())],
            persist_to: None,
            env: Vec::new(),
            hyperdrive: None,
            queues: None,
        }
    }

    /// With fan-out: the worker runs with a copy of wrangler.toml whose queue blocks (between
    /// `# --- queues begin` and `# --- queues end`) are uncommented, so it has the `SYNC_QUEUE`
    /// producer binding and consumes the ranges queue and its dead-letter queue (local queues,
    /// in wrangler's memory). `consumer` replaces settings of the ranges queue's consumer, e.g.
    /// `[("max_batch_size", "4"), ("max_retries", "1"), ("retry_delay", "0")]`.
    pub fn queues(mut self, consumer: &[(&str, &str)]) -> WorkerOpts {
        self.queues = Some(consumer.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        self
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

/// Writes `dir/wrangler.toml`: the repository's, with `main` made absolute (paths in a wrangler
/// config are relative to it); with `binding`, a `[[hyperdrive]]` block for it appended (its
/// connection string is left to the environment, `Worker::try_start`); with `queues`, the queue
/// blocks uncommented and the ranges consumer's settings replaced (see [`WorkerOpts::queues`]).
fn worker_config(repo: &Path, dir: &Path, binding: Option<&str>, queues: Option<&[(String, String)]>) -> PathBuf {
    let text = fs::read_to_string(repo.join("wrangler.toml")).expect("read wrangler.toml");
    let mut out = String::new();
    // Inside the queue blocks, and how many `[[queues.consumers]]` headers were seen there (the
    // first consumer is the ranges queue's, the second the dead-letter queue's).
    let (mut in_queues, mut consumers, mut found) = (false, 0, false);
    for line in text.lines() {
        if line == "# --- queues begin" {
            in_queues = true;
            found = true;
        } else if line == "# --- queues end" {
            in_queues = false;
        } else if let (true, Some(q)) = (in_queues, queues) {
            let line = line.strip_prefix('#').unwrap_or(line).trim_start();
            consumers += usize::from(line == "[[queues.consumers]]");
            let key = line.split(" = ").next().unwrap_or("");
            match q.iter().find(|(k, _)| k == key) {
                Some((k, v)) if consumers == 1 => out.push_str(&format!("{k} = {v}\n")),
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
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
    assert!(queues.is_none() || found, "wrangler.toml has no `# --- queues begin` block");
    if let Some(q) = queues {
        for (k, _) in q {
            assert!(out.contains(&format!("\n{k} = ")), "wrangler.toml's ranges consumer has no setting {k}");
        }
    }
    if let Some(binding) = binding {
        out.push_str(&format!("\n[[hyperdrive]]\nbinding = \"{binding}\"\nid = \"00000000000000000000000000000000\"\n"));
    }
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
        assert!(shim.exists(), "{} is missing: build the worker first (scripts/test.sh does)", shim.display());

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
        let persist_dir = opts.persist_to.clone().unwrap_or_else(|| dir.join("state"));

        let config = match (&opts.hyperdrive, &opts.queues) {
            (None, None) => repo.join("wrangler.toml"),
            (binding, queues) => worker_config(&repo, &dir, binding.as_ref().map(|(b, _)| b.as_str()), queues.as_deref()),
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
            .args(["--test-scheduled", "--show-interactive-dev-session=false", "--log-level", "log"]);
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
        wrangler_env(&mut cmd, &repo).stdout(log.try_clone().unwrap()).stderr(log);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {node} {wrangler_js}: {e}"));
        let mut worker =
            Worker { child: Some(child), origin: format!("http://127.0.0.1:{port}"), dir, log_path, keep_dir: true, persist_dir };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, _)) = send("GET", &format!("{}/health", worker.origin), &[], None) {
                worker.keep_dir = false;
                return Ok(worker);
            }
            if let Some(status) = worker.child.as_mut().unwrap().try_wait().ok().flatten() {
                let tail = worker.log_tail(60);
                worker.child = None;
                return Err((
                    format!("wrangler dev exited early ({status}); log {}:\n{tail}", worker.log_path.display()),
                    port_taken(&tail),
                ));
            }
            if Instant::now() > deadline {
                let tail = worker.log_tail(60);
                return Err((
                    format!("wrangler dev: /health not 200 within {START_TIMEOUT:?}; log {}:\n{tail}", worker.log_path.display()),
                    port_taken(&tail),
                ));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Path of the captured wrangler output.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        self.request_with(method, path, &headers)
    }

    /// A request with arbitrary headers; returns status and JSON body (a JSON string when the
    /// body is not JSON).
    pub fn request_with(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let url = format!("{}{path}", self.origin);
        let body = if method == "POST" { Some("") } else { None };
        let (status, text) =
            send(method, &url, headers, body).unwrap_or_else(|e| panic!("{e}\nlog {}:\n{}", self.log_path.display(), self.log_tail(60)));
        (status, to_json(&text))
    }

    /// A request with a bearer token and a raw body (sent as JSON content); returns status and
    /// JSON body.
    pub fn request_body(&self, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.origin);
        let auth = format!("Bearer {token}");
        let (status, text) = send(method, &url, &[("Authorization", auth.as_str())], Some(body))
            .unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.log_tail(60)));
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
        send_get_full(&url, headers).unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.log_tail(60)))
    }

    /// The port `wrangler dev` listens on.
    pub fn port(&self) -> u16 {
        port_of(&self.origin)
    }

    /// `GET /dry-run` with [`TOKEN`]; asserts 200 and returns the plan.
    pub fn dry_run(&self) -> Value {
        self.ok_with_token("GET", "/dry-run")
    }

    /// `POST /sync` with [`TOKEN`]; asserts 200 and returns the report.
    pub fn sync(&self) -> Value {
        self.ok_with_token("POST", "/sync")
    }

    /// `method path` with [`TOKEN`]; asserts 200 (showing the log's tail when not) and returns
    /// the body.
    fn ok_with_token(&self, method: &str, path: &str) -> Value {
        let (status, body) = self.request(method, path, Some(TOKEN));
        assert_eq!(status, 200, "{method} {path} -> {status}: {body}\nlog tail:\n{}", self.log_tail(40));
        body
    }

    /// Triggers the cron handler: `GET /__scheduled?cron=*/5+*+*+*+*`; returns status and body.
    pub fn scheduled(&self) -> (u16, String) {
        send("GET", &self.scheduled_url(), &[], None).unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.log_tail(60)))
    }

    /// The `--persist-to` directory (local KV) of this worker.
    pub fn persist_dir(&self) -> &Path {
        &self.persist_dir
    }

    /// Triggers the cron handler from a background thread and returns at once; the thread
    /// yields the answer, or the transport error (e.g. when the worker is killed meanwhile).
    pub fn scheduled_in_background(&self) -> thread::JoinHandle<Result<(u16, String), String>> {
        let url = self.scheduled_url();
        thread::spawn(move || send("GET", &url, &[], None))
    }

    /// The URL that triggers the cron handler (`wrangler dev --test-scheduled`).
    fn scheduled_url(&self) -> String {
        format!("{}/__scheduled?cron=*/5+*+*+*+*", self.origin)
    }

    /// `GET /status` with [`TOKEN`]; asserts 200 and returns the body.
    pub fn status(&self) -> Value {
        self.ok_with_token("GET", "/status")
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

/// Whether a failed start's log `tail` says a port was taken (worth another try on new ports).
fn port_taken(tail: &str) -> bool {
    tail.contains("EADDRINUSE") || tail.contains("ddress already in use")
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
        let mut cmd = Command::new(&node);
        cmd.arg(&wrangler_js)
            .args(["kv", "key"])
            .args(args)
            .args(["--binding", "SYNC_STATE", "--local", "--persist-to"])
            .arg(persist_dir)
            .arg("--config")
            .arg(repo.join("wrangler.toml"));
        let out = wrangler_env(&mut cmd, &repo).output().unwrap_or_else(|e| panic!("spawn {node} {wrangler_js} kv key: {e}"));
        let busy = !out.status.success() && [&out.stdout, &out.stderr].iter().any(|b| String::from_utf8_lossy(b).contains("SQLITE_BUSY"));
        if !busy || attempt == 5 {
            return out;
        }
        attempt += 1;
        thread::sleep(Duration::from_millis(500));
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
