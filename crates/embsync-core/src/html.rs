//! `GET /status` as one small HTML page for people: the run, and per source a coverage bar with
//! the last run's counts.
//!
//! The page is self-contained: one inline style sheet (allowed by its hash in
//! [`content_security_policy`]), no script, no external assets, and it follows the reader's
//! light or dark colour scheme. Every piece of text is escaped; numbers are the only unescaped
//! output.
//!
//! ```
//! use embsync_core::html;
//! use embsync_core::status::{CursorState, Status};
//!
//! let status = Status {
//!     cursor: CursorState::Absent,
//!     current_run: None,
//!     last_runs: vec![],
//!     sources: vec![],
//!     disabled: vec![],
//!     left_config: vec![],
//!     orphans: Default::default(),
//!     pending_batches: vec![],
//! };
//! let page = html::render(&status);
//! assert!(page.starts_with("<!DOCTYPE html>"));
//! assert!(page.contains("No run yet"));
//! ```

use crate::prune::{LeftReason, LeftSource};
use crate::report::{RunReport, RunStatus, SourceReport, Trigger};
use crate::status::{Coverage, CurrentRun, FinishedRun, ModelBatches, OpenRunSource, Status, WaitingOrphans};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::fmt::{self, Write};

/// The page's style sheet, inlined in a `<style>` element and allowed by its hash.
///
/// The bar colours (`--fill`, `--track`) appear nowhere else on the page: the end-to-end test
/// finds the bars in a screenshot by them and measures the filled part.
pub const STYLE: &str = "\
:root{color-scheme:light dark;--bg:#f4f6f8;--card:#ffffff;--text:#1b1f24;--muted:#5b6570;--line:#d5dbe1;\
--code:#eef1f4;--fill:#1a9c4a;--track:#e1e6ea;--warn-bg:#fff6db;--warn:#6d5200;--err-bg:#fde8e8;--err:#a1151b;\
--badge:#e9edf1;--ok:#1a7f37;--busy:#9a6700;--bad:#c01c28}
@media (prefers-color-scheme:dark){:root{--bg:#0e1116;--card:#171b21;--text:#e4e8ec;--muted:#98a2ad;--line:#2c333b;\
--code:#222830;--fill:#3fb864;--track:#3a4452;--warn-bg:#3a2f0b;--warn:#f2cc60;--err-bg:#3d1417;--err:#ff9b9b;\
--badge:#262c34;--ok:#56d37b;--busy:#e3b341;--bad:#ff7b72}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);\
font:15px/1.5 system-ui,-apple-system,\"Segoe UI\",Roboto,\"Helvetica Neue\",\"DejaVu Sans\",sans-serif}
header,main,footer{max-width:64rem;margin:0 auto;padding:0 1.5rem}
header{padding-top:1.75rem;padding-bottom:.75rem}
h1{font-size:1.5rem;margin:0;letter-spacing:-.01em}
h2{font-size:1.05rem;margin:0 0 .75rem;display:flex;align-items:center;gap:.6rem}
h3{font-size:1rem;margin:0}
.sub,.muted,footer{color:var(--muted)}
.sub{margin:.15rem 0 0}
code{font:.85em/1.4 ui-monospace,SFMono-Regular,Menlo,\"DejaVu Sans Mono\",monospace;background:var(--code);\
padding:.1em .35em;border-radius:4px;overflow-wrap:anywhere}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:1.1rem 1.25rem;margin:1rem 0}
section>p:last-child{margin-bottom:0}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(12.5rem,1fr));gap:.5rem 1.5rem;margin:0}
.facts dt,.counts dt{font-size:.72rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.facts dd,.counts dd{margin:0;font-variant-numeric:tabular-nums}
.badge{font-size:.75rem;font-weight:600;text-transform:uppercase;letter-spacing:.05em;padding:.1rem .55rem;\
border-radius:999px;background:var(--badge)}
.badge.finished{color:var(--ok)}.badge.running,.badge.paused{color:var(--busy)}.badge.failed,.badge.abandoned{color:var(--bad)}
.source{padding:1rem 0;border-top:1px solid var(--line)}
.source:first-of-type{border-top:0;padding-top:.25rem}
.source-head{display:flex;flex-wrap:wrap;align-items:baseline;gap:.25rem .75rem;margin-bottom:.5rem}
progress.bar{-webkit-appearance:none;appearance:none;display:block;width:100%;height:14px;border:0;border-radius:7px;\
background:var(--track);color:var(--fill);overflow:hidden}
progress.bar::-webkit-progress-bar{background:var(--track);border-radius:7px}
progress.bar::-webkit-progress-value{background:var(--fill);border-radius:7px}
progress.bar::-moz-progress-bar{background:var(--fill);border-radius:7px}
.coverage{margin:.35rem 0 .5rem;font-variant-numeric:tabular-nums}
.counts{display:grid;grid-template-columns:repeat(auto-fill,minmax(7rem,1fr));gap:.25rem 1rem;margin:0}
.counts-title{margin:.25rem 0;font-size:.8rem}
.note{margin:.6rem 0 0;padding:.45rem .7rem;border-radius:6px;overflow-wrap:anywhere}
.note.warn{background:var(--warn-bg);color:var(--warn)}
.note.err{background:var(--err-bg);color:var(--err)}
footer{padding-bottom:2rem;font-size:.85rem}
";

/// The `Content-Security-Policy` of the page: nothing may load or run; only the page's own
/// style sheet applies (by its SHA-256).
pub fn content_security_policy() -> String {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()));
    format!("default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
}

/// The response headers of the page.
pub fn response_headers() -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "text/html; charset=utf-8".to_owned()),
        ("cache-control", "no-store".to_owned()),
        ("content-security-policy", content_security_policy()),
        ("x-content-type-options", "nosniff".to_owned()),
        ("referrer-policy", "no-referrer".to_owned()),
    ]
}

/// Whether a request with this `Accept` header should get the HTML page rather than JSON:
/// only when it names `text/html` and ranks it above JSON (so `*/*`, a missing header and ties
/// get JSON, and a browser's `text/html,...,*/*;q=0.8` gets HTML).
pub fn prefers_html(accept: Option<&str>) -> bool {
    let (mut html, mut json) = (None::<f32>, 0.0f32);
    for range in accept.unwrap_or_default().split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .filter(|q| q.is_finite())
            .map_or(1.0, |q| q.clamp(0.0, 1.0));
        match media.as_str() {
            "text/html" => html = Some(html.map_or(q, |h| h.max(q))),
            "application/json" | "application/*" | "*/*" => json = json.max(q),
            _ => {}
        }
    }
    html.is_some_and(|h| h > 0.0 && h > json)
}

/// Text escaped for HTML content and quoted attribute values.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// A count with thousands separators: `1,234,567`.
struct Num(u64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                f.write_char(',')?;
            }
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// `done` of `total` as a percentage with one decimal, rounded down so that only a complete
/// source shows 100%.
pub fn percent(done: u64, total: u64) -> String {
    if total == 0 || done >= total {
        return if total == 0 { "0%".to_owned() } else { "100%".to_owned() };
    }
    let tenths = u128::from(done) * 1000 / u128::from(total);
    format!("{}.{}%", tenths / 10, tenths % 10)
}

/// `2026-11-23T23:59:00.123Z` as `2026-11-23 23:59:00 UTC`; other text as it is.
fn when(iso: &str) -> String {
    let b = iso.as_bytes();
    let shaped = b.len() >= 20 && b[10] == b'T' && iso.ends_with('Z') && iso.is_char_boundary(19);
    if shaped {
        format!("{} {} UTC", &iso[..10], &iso[11..19])
    } else {
        iso.to_owned()
    }
}

/// Milliseconds as `850 ms`, `12.3 s` or `4 min 05 s`.
fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{}.{} s", ms / 1000, ms % 1000 / 100),
        _ => format!("{} min {:02} s", ms / 60_000, ms % 60_000 / 1000),
    }
}

fn trigger(t: Trigger) -> &'static str {
    match t {
        Trigger::Cron => "cron",
        Trigger::Http => "POST /sync",
    }
}

/// Renders the status page.
pub fn render(status: &Status) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // Writing to a String cannot fail.
    let _ = write_page(&mut out, status);
    out
}

/// Which run's per-source counts the page shows next to the coverage.
enum Counts<'a> {
    /// The open run's counters so far.
    Current(&'a [OpenRunSource]),
    /// The last finished run's report.
    Last(&'a [SourceReport]),
    /// No run to show.
    None,
}

fn write_page(out: &mut String, status: &Status) -> fmt::Result {
    let last = status.last_runs.first();
    let last_report = last.and_then(FinishedRun::report);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str("<meta name=\"color-scheme\" content=\"light dark\">\n<meta name=\"robots\" content=\"noindex\">\n");
    out.push_str("<title>embsync status</title>\n<style>");
    out.push_str(STYLE);
    out.push_str("</style>\n</head>\n<body>\n<header>\n<h1>embsync</h1>\n");
    out.push_str("<p class=\"sub\">Embeddings of Postgres column values: coverage per source and the sync run</p>\n</header>\n<main>\n");

    let counts = match (&status.current_run, last) {
        (Some(run), _) => {
            write_current_run(out, run, last)?;
            Counts::Current(&run.sources)
        }
        (None, Some(run)) => {
            write_last_run(out, run, last_report.as_ref())?;
            last_report.as_ref().map_or(Counts::None, |r| Counts::Last(&r.sources))
        }
        (None, None) => {
            out.push_str(
                "<section class=\"run\">\n<h2>No run yet</h2>\n<p class=\"muted\">Nothing has been synced yet: the next cron \
                 tick starts a run, or <code>POST /sync</code> does now.</p>\n</section>\n",
            );
            Counts::None
        }
    };

    out.push_str("<section class=\"sources\">\n<h2>Sources</h2>\n");
    if status.sources.is_empty() {
        out.push_str("<p class=\"muted\">No source is enabled in the config.</p>\n");
    }
    for coverage in &status.sources {
        write_source(out, coverage, &counts)?;
    }
    if !status.disabled.is_empty() {
        out.push_str("<p class=\"muted disabled\">Disabled: ");
        for (i, name) in status.disabled.iter().enumerate() {
            write!(out, "{}{}", if i > 0 { ", " } else { "" }, Esc(name))?;
        }
        out.push_str("</p>\n");
    }
    out.push_str("</section>\n");
    write_pending_batches(out, &status.pending_batches)?;
    write_left_config(out, &status.left_config)?;
    write_orphans(out, &status.orphans)?;
    out.push_str("</main>\n<footer>The same as JSON: <code>GET /status</code> with <code>Accept: application/json</code>.</footer>\n</body>\n</html>\n");
    Ok(())
}

fn badge(out: &mut String, status: RunStatus) -> fmt::Result {
    write!(out, "<span class=\"badge {0}\">{0}</span>", status.as_str())
}

fn fact(out: &mut String, label: &str, value: &str) -> fmt::Result {
    writeln!(out, "<div><dt>{}</dt><dd>{}</dd></div>", Esc(label), Esc(value))
}

fn write_current_run(out: &mut String, run: &CurrentRun, last: Option<&FinishedRun>) -> fmt::Result {
    out.push_str("<section class=\"run\">\n<h2>Run in progress ");
    badge(out, run.status)?;
    out.push_str("</h2>\n<dl class=\"facts\">\n");
    out.push_str("<div><dt>Run</dt><dd>");
    writeln!(out, "<code>{}</code></dd></div>", Esc(&run.run_id))?;
    fact(out, "Trigger", trigger(run.trigger))?;
    fact(out, "Started", &when(&run.started_at))?;
    fact(out, "Invocations", &run.invocations.to_string())?;
    out.push_str("</dl>\n");
    let waiting = run.sources.iter().any(|s| s.ranges.as_ref().is_some_and(|g| g.queued > 0));
    let note = match run.status {
        _ if waiting => "Fanned out: the queue's consumers embed its ranges; the run goes on once they are done.",
        RunStatus::Paused => "Paused when an invocation spent its budget: the next cron tick or POST /sync goes on where it stopped.",
        _ => "An invocation is working on it now.",
    };
    writeln!(out, "<p class=\"muted\">{}</p>", Esc(note))?;
    if let Some(last) = last {
        writeln!(
            out,
            "<p class=\"muted\">Previous run <code>{}</code>: {} at {}.</p>",
            Esc(&last.run_id),
            last.status.as_str(),
            Esc(&when(&last.finished_at))
        )?;
    }
    out.push_str("</section>\n");
    Ok(())
}

fn write_last_run(out: &mut String, run: &FinishedRun, report: Option<&RunReport>) -> fmt::Result {
    out.push_str("<section class=\"run\">\n<h2>Last run ");
    badge(out, run.status)?;
    out.push_str("</h2>\n<dl class=\"facts\">\n");
    writeln!(out, "<div><dt>Run</dt><dd><code>{}</code></dd></div>", Esc(&run.run_id))?;
    if let Some(r) = report {
        fact(out, "Trigger", trigger(r.trigger))?;
        fact(out, "Started", &when(&r.started_at))?;
    }
    fact(out, "Finished", &when(&run.finished_at))?;
    if let Some(r) = report {
        fact(out, "Invocations", &r.invocations.to_string())?;
        fact(out, "Duration", &duration(r.duration_ms))?;
        let (large, small) = (&r.usage.large, &r.usage.small);
        let tokens = format!("{} ({} requests)", Num(large.prompt_tokens + small.prompt_tokens), Num(large.requests + small.requests));
        fact(out, "Tokens", &tokens)?;
        fact(out, "Cost", &format!("${:.4}", r.usage.cost_usd))?;
    }
    out.push_str("</dl>\n");
    match (report, run.status) {
        (Some(r), _) => {
            if let Some(why) = &r.stopped {
                let class = if run.status == RunStatus::Failed { "err" } else { "warn" };
                writeln!(out, "<p class=\"note {class}\">Stopped: {}</p>", Esc(why))?;
            }
        }
        (None, RunStatus::Abandoned) => {
            out.push_str("<p class=\"note warn\">Abandoned without a report: the configured sources changed while it was open, so a new run started over.</p>\n");
        }
        (None, _) => out.push_str("<p class=\"note warn\">Its stored report cannot be read by this version.</p>\n"),
    }
    out.push_str("</section>\n");
    Ok(())
}

fn write_source(out: &mut String, c: &Coverage, counts: &Counts<'_>) -> fmt::Result {
    out.push_str("<article class=\"source\">\n<div class=\"source-head\">");
    writeln!(out, "<h3>{}</h3><code>{}.{}</code></div>", Esc(&c.name), Esc(&c.table), Esc(&c.column))?;
    match &c.error {
        Some(e) => writeln!(out, "<p class=\"note err\">Coverage unavailable: {}</p>", Esc(e))?,
        None => {
            let (done, total) = (c.done(), c.distinct_values);
            // A `progress` needs a positive max: an empty source shows an empty bar.
            writeln!(
                out,
                "<progress class=\"bar\" max=\"{}\" value=\"{done}\" aria-label=\"Coverage of {}\">{}</progress>",
                total.max(1),
                Esc(&c.name),
                percent(done, total)
            )?;
            if total == 0 {
                out.push_str("<p class=\"coverage\">No values in this column yet.</p>\n");
            } else {
                writeln!(
                    out,
                    "<p class=\"coverage\"><strong>{}</strong> of {} values embedded · <strong>{}</strong></p>",
                    Num(done),
                    Num(total),
                    percent(done, total)
                )?;
            }
        }
    }
    if let Some(capture) = &c.capture {
        write!(
            out,
            "<p class=\"note\">Change capture: triggers {} · reconciled every {} · last reconcile {} · {} changes waiting",
            Esc(&capture.triggers),
            Esc(&capture.reconcile_every),
            Esc(capture.last_reconcile.as_deref().unwrap_or("never")),
            Num(capture.backlog)
        )?;
        if let Some(d) = capture.last_drift.filter(|d| d.new + d.stale > 0) {
            write!(out, " · the last reconcile repaired {} new and {} stale values it had missed", Num(d.new), Num(d.stale))?;
        }
        out.push_str("</p>\n");
    }
    let same = |r: &SourceReport| r.table == c.table && r.column == c.column;
    let (title, report) = match counts {
        Counts::Current(sources) => match sources.iter().find(|s| same(&s.report)) {
            Some(s) if !s.planned => {
                out.push_str("<p class=\"counts-title muted\">Not reached yet in this run.</p>\n");
                ("", None)
            }
            found => ("This run so far", found.map(|s| &s.report)),
        },
        Counts::Last(reports) => ("Last run", reports.iter().find(|r| same(r))),
        Counts::None => ("", None),
    };
    if let Some(r) = report {
        writeln!(out, "<p class=\"counts-title muted\">{title}</p>\n<dl class=\"counts\">")?;
        for (label, n) in [
            ("new", r.new),
            ("stale", r.stale),
            ("unchanged", r.unchanged),
            ("embedded", r.embedded),
            ("errors", r.errors),
            ("deferred", r.deferred),
        ] {
            writeln!(out, "<div><dt>{label}</dt><dd>{}</dd></div>", Num(n))?;
        }
        out.push_str("</dl>\n");
        if let Some(w) = &r.warning {
            writeln!(out, "<p class=\"note warn\">{}</p>", Esc(w))?;
        }
        if let Some(e) = &r.error {
            writeln!(out, "<p class=\"note err\">{}</p>", Esc(e))?;
        }
    }
    if let Counts::Current(sources) = counts {
        if let Some(g) = sources.iter().find(|s| same(&s.report)).and_then(|s| s.ranges.as_ref()) {
            writeln!(
                out,
                "<p class=\"coverage\">Fan-out: <strong>{}</strong> ranges queued · {} done · {} given up</p>",
                Num(g.queued),
                Num(g.done),
                Num(g.dead)
            )?;
            for d in &g.dead_ranges {
                writeln!(out, "<p class=\"note err\">Range {} was given up: {}</p>", d.range, Esc(&d.error))?;
            }
        }
    }
    if c.errors > 0 {
        let values = if c.errors == 1 { "value" } else { "values" };
        writeln!(
            out,
            "<p class=\"note err\">{} {values} failed and will be retried (see <code>embedding_sync_errors</code>).</p>",
            Num(c.errors)
        )?;
    }
    out.push_str("</article>\n");
    Ok(())
}

/// Seconds as `45 s`, `12 min`, `3 h 05 min` or `2 d 4 h`.
fn age(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h {:02} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// The Batch API batches embsync has not finished with, per model, when there are any.
fn write_pending_batches(out: &mut String, models: &[ModelBatches]) -> fmt::Result {
    if models.is_empty() {
        return Ok(());
    }
    out.push_str("<section class=\"batches\">\n<h2>Pending batches</h2>\n");
    out.push_str(
        "<p class=\"muted\">Values sent through the Batch API (half the price, within 24 hours). Their values are not sent \
         again meanwhile; each invocation polls them and stores the output once a batch completes.</p>\n",
    );
    for m in models {
        out.push_str("<article class=\"source\">\n<div class=\"source-head\">");
        let count = m.batches.len();
        writeln!(
            out,
            "<h3>{}</h3><code>{}</code><span class=\"muted\">{} {}</span></div>",
            Esc(&m.slot),
            Esc(&m.model),
            count,
            if count == 1 { "batch" } else { "batches" }
        )?;
        for b in &m.batches {
            out.push_str("<dl class=\"facts\">\n<div><dt>Batch</dt><dd>");
            match &b.batch_id {
                Some(id) => write!(out, "<code>{}</code>", Esc(id))?,
                None => write!(out, "not created yet (file <code>{}</code>)", Esc(&b.input_file_id))?,
            }
            out.push_str("</dd></div>\n");
            fact(out, "State", &b.state)?;
            fact(out, "Age", &age(b.age_seconds))?;
            let counts = b.request_counts.as_ref().map(|c| {
                let n = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                format!("{} of {} done, {} failed", Num(n("completed")), Num(n("total")), Num(n("failed")))
            });
            fact(out, "Requests", &counts.unwrap_or_else(|| format!("{} (not polled yet)", Num(b.requests))))?;
            fact(out, "Values", &format!("{} ({} not stored yet)", Num(b.values), Num(b.waiting)))?;
            out.push_str("</dl>\n");
        }
        out.push_str("</article>\n");
    }
    out.push_str("</section>\n");
    Ok(())
}

/// The sources that left the config and what they still hold, when there are any.
fn write_left_config(out: &mut String, left: &[LeftSource]) -> fmt::Result {
    if left.is_empty() {
        return Ok(());
    }
    out.push_str("<section class=\"left-config\">\n<h2>Left the config</h2>\n");
    out.push_str(
        "<p class=\"muted\">No longer synced (removed from the config, renamed, or disabled), but their links, the cache \
         rows only they hold and their errors are kept until <code>POST /prune</code> removes them.</p>\n",
    );
    for l in left {
        out.push_str("<article class=\"source\">\n<div class=\"source-head\">");
        write!(out, "<h3><code>{}.{}</code></h3>", Esc(&l.table), Esc(&l.column))?;
        out.push_str("<span class=\"muted\">");
        match (l.reason, &l.name) {
            (LeftReason::Disabled, Some(name)) => write!(out, "disabled: {}", Esc(name))?,
            (reason, _) => out.push_str(reason.as_str()),
        }
        if let Some(same) = &l.same_as {
            write!(out, " · the same column as the enabled source {}", Esc(same))?;
        }
        out.push_str("</span></div>\n");
        out.push_str("<dl class=\"counts\">\n");
        for (label, n) in
            [("links", l.links), ("errors", l.errors), ("rows only it holds", l.rows), ("values in pending batches", l.batch_values)]
        {
            writeln!(out, "<div><dt>{label}</dt><dd>{}</dd></div>", Num(n))?;
        }
        out.push_str("</dl>\n</article>\n");
    }
    out.push_str("</section>\n");
    Ok(())
}

/// The orphan candidates waiting for the end of a run, when there are any.
fn write_orphans(out: &mut String, orphans: &WaitingOrphans) -> fmt::Result {
    if orphans.rows == 0 {
        return Ok(());
    }
    out.push_str("<section class=\"orphans\">\n<h2>Waiting to be deleted</h2>\n");
    write!(
        out,
        "<p class=\"muted\">{} cache {} embsync wrote {} no longer linked by any source",
        Num(orphans.rows),
        if orphans.rows == 1 { "row" } else { "rows" },
        if orphans.rows == 1 { "is" } else { "are" }
    )?;
    if let Some(oldest) = &orphans.oldest {
        write!(out, " (the first since {})", Esc(&when(oldest)))?;
    }
    out.push_str(
        ". The end of the next run that gets through every source deletes those that no source links or has by then; \
         a value a source has again is kept and linked.</p>\n</section>\n",
    );
    Ok(())
}

#[cfg(test)]
#[path = "html_tests.rs"]
mod tests;
