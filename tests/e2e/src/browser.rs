//! Headless Chromium, for the status page's screenshots and DOM.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{env_var, tail_of, temp_dir};

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
        assert!(bin.exists(), "EMBSYNC_CHROMIUM={} does not exist: scripts/setup.sh installs chromium-headless-shell", bin.display());
        Browser { bin }
    }

    /// Loads `url` and writes a PNG screenshot of the `width` x `height` viewport to `path`.
    /// `dark` makes the page see `prefers-color-scheme: dark`.
    pub fn screenshot(&self, url: &str, path: &Path, (width, height): (u32, u32), dark: bool) {
        let _ = fs::remove_file(path);
        let mut args = vec![format!("--screenshot={}", path.display()), format!("--window-size={width},{height}")];
        if dark {
            args.push("--force-dark-mode".into());
            args.push("--blink-settings=preferredColorScheme=0".into());
        }
        let out = self.run(&args, url);
        assert!(path.exists(), "no screenshot at {} after loading {url}:\n{out}", path.display());
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
