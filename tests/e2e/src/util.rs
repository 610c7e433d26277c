//! The environment `scripts/test.sh` sets, unique names, temporary files and polling.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Whether to keep the logs of passing tests too (`EMBSYNC_E2E_KEEP_LOGS=1`).
pub(crate) fn keep_logs() -> bool {
    thread::panicking() || std::env::var_os("EMBSYNC_E2E_KEEP_LOGS").is_some_and(|v| v == "1")
}

/// A fresh temporary directory.
pub(crate) fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(prefix));
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The port of an origin `http://127.0.0.1:PORT`.
pub(crate) fn port_of(origin: &str) -> u16 {
    origin.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in the origin {origin:?}"))
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

/// A temporary directory that outlives single workers (e.g. a `--persist-to` directory shared
/// by a worker and its restart); removed on drop unless the test failed or logs are kept.
pub struct SharedDir {
    pub path: PathBuf,
}

impl SharedDir {
    /// A fresh, empty directory.
    pub fn new(prefix: &str) -> SharedDir {
        SharedDir { path: temp_dir(prefix) }
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
