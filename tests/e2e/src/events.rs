//! Reading the worker's log: the lines wrangler captured and the worker's structured events.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::tail_of;
use crate::wrangler::Worker;

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

impl Worker {
    /// Everything wrangler (and the worker's console) printed so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_of(self.log_path(), n)
    }

    /// Waits until a log line contains `needle`; returns that line (the first such line).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if Instant::now() > deadline {
                panic!("no log line containing {needle:?} within {timeout:?}; log {}:\n{}", self.log_path().display(), self.log_tail(60));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs().lines().filter(|l| l.contains(needle)).count()
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
