//! The status page in a real browser: headless Chromium loads `/status.html` from the worker with
//! Basic credentials in the URL, takes a screenshot, and the coverage bars in it are measured.
//!
//! Four sources: one fully synced, one a paused run has done a fifth of, one whose table does not
//! exist (with markup in its name, which must stay text), and a disabled one. The screenshots
//! are kept in `target/e2e-artifacts/` for a person to look at.

use std::path::Path;

use embsync_e2e::*;
use serde_json::{json, Value};

const FULL: Src = Src { name: "Fully synced", table: "html_full", column: "label" };
const PART: Src = Src { name: "Partly synced", table: "html_part", column: "label" };
/// Its table is never created; its name is markup that must reach the browser as text.
const BROKEN: Src = Src { name: "<script>alert('x')</script> & \"Broken\"", table: "html_missing", column: "label" };
const DISABLED: Src = Src { name: "Switched off", table: "html_off", column: "label" };

/// Values per batch; the paused invocation may run [`MAX_BATCHES`] batches.
const BATCH: u64 = 10;
const MAX_BATCHES: u64 = 5;
const FULL_VALUES: i64 = 30;
const PART_VALUES: i64 = 100;
/// What the first invocation leaves done of [`PART`]: the batches left after [`FULL`]'s three.
const PART_DONE: i64 = (MAX_BATCHES as i64 - FULL_VALUES / BATCH as i64) * BATCH as i64;

const VIEWPORT: (u32, u32) = (1200, 900);

/// The bar colours of the page's style sheet (`--fill`, `--track`), light and dark.
const LIGHT: ([u8; 3], [u8; 3]) = ([0x1a, 0x9c, 0x4a], [0xe1, 0xe6, 0xea]);
const DARK: ([u8; 3], [u8; 3]) = ([0x3f, 0xb8, 0x64], [0x3a, 0x44, 0x52]);

fn config() -> String {
    let source = |s: Src, enabled: bool| json!({"name": s.name, "table": s.table, "column": s.column, "enabled": enabled});
    json!({
        "version": "1.0",
        "models": {"large": {"name": LARGE_MODEL, "dimensions": 48}, "small": {"name": SMALL_MODEL, "dimensions": 24}},
        "batchSize": BATCH,
        "sources": [source(FULL, true), source(PART, true), source(BROKEN, true), source(DISABLED, false)],
    })
    .to_string()
}

/// One coverage bar found in a screenshot, measured along its middle row.
#[derive(Debug)]
struct Bar {
    /// The middle row.
    y: u32,
    /// Pixels from the bar's first to its last pixel of fill or track colour.
    width: u32,
    /// Pixels of fill colour.
    filled: u32,
}

impl Bar {
    fn share(&self) -> f64 {
        f64::from(self.filled) / f64::from(self.width)
    }
}

/// A horizontal run of bar pixels.
#[derive(Debug, Clone, Copy, Default)]
struct PixelRun {
    start: u32,
    len: u32,
    filled: u32,
}

/// Reads an 8-bit RGB(A) PNG: width, height, and the RGB of every pixel, row by row.
fn read_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut reader = png::Decoder::new(file).read_info().unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("decode the PNG");
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{info:?}");
    let step = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let pixels = buf[..info.buffer_size()].chunks_exact(step).map(|p| [p[0], p[1], p[2]]).collect();
    (info.width, info.height, pixels)
}

/// The bars in a screenshot, top to bottom: bands of at least 6 rows that each hold a run of at
/// least 100 pixels of the fill or the track colour, measured along the band's middle row.
fn bars(path: &Path, (fill, track): ([u8; 3], [u8; 3])) -> Vec<Bar> {
    let (width, height, pixels) = read_png(path);
    let near = |p: [u8; 3], c: [u8; 3]| p.iter().zip(c).all(|(a, b)| a.abs_diff(b) <= 6);
    // The longest run of bar pixels in row `y`, bridging gaps of up to 2 pixels (where the fill
    // meets the track, a pixel may be a blend of both): its length and its fill pixels.
    let longest_run = |y: u32| {
        let row = &pixels[(y * width) as usize..((y + 1) * width) as usize];
        let mut best = PixelRun::default();
        let mut current: Option<PixelRun> = None;
        let mut gap = 0;
        for (x, &p) in row.iter().enumerate() {
            let x = x as u32;
            if near(p, fill) || near(p, track) {
                let run = current.get_or_insert(PixelRun { start: x, ..PixelRun::default() });
                run.len = x - run.start + 1;
                run.filled += u32::from(near(p, fill));
                gap = 0;
            } else if current.is_some() {
                gap += 1;
                if gap > 2 {
                    current = None;
                }
            }
            if let Some(run) = current.filter(|r| r.len > best.len) {
                best = run;
            }
        }
        best
    };
    let is_bar_row = |y: u32| longest_run(y).len >= 100;
    let mut found = Vec::new();
    let mut y = 0;
    while y < height {
        if !is_bar_row(y) {
            y += 1;
            continue;
        }
        let top = y;
        while y < height && is_bar_row(y) {
            y += 1;
        }
        if y - top >= 6 {
            let mid = (top + y) / 2;
            let run = longest_run(mid);
            found.push(Bar { y: mid, width: run.len, filled: run.filled });
        }
    }
    found
}

/// Asserts that the screenshot shows one bar per expected share, top to bottom, each filled to
/// that share of its width (within two pixels).
fn assert_bars(path: &Path, colours: ([u8; 3], [u8; 3]), shares: &[f64]) {
    let found = bars(path, colours);
    assert_eq!(found.len(), shares.len(), "bars in {}: {found:?}", path.display());
    for (bar, share) in found.iter().zip(shares) {
        assert!(bar.width > 600, "a bar spans the page, this one {bar:?} in {}", path.display());
        let expected = share * f64::from(bar.width);
        assert!(
            (f64::from(bar.filled) - expected).abs() <= 2.0,
            "bar at y={} should be {:.0}% filled ({expected:.0} of {} px) but is {:.1}% ({} px) in {}",
            bar.y,
            share * 100.0,
            bar.width,
            bar.share() * 100.0,
            bar.filled,
            path.display()
        );
    }
}

/// The page URL with Basic credentials (any user name, the token as the password).
fn page_url(worker: &Worker, password: &str) -> String {
    format!("http://status-reader:{password}@127.0.0.1:{}/status.html", worker.port())
}

fn coverage<'a>(status: &'a Value, table: &str) -> &'a Value {
    source_entry(status, table)
}

fn basic(password: &str) -> String {
    basic_auth("reader", password)
}

/// The page's auth: Basic with the token as password or the bearer token; a 401 that makes a
/// browser ask; JSON stays the default of `/status` and takes no Basic credentials.
fn check_auth_and_headers(worker: &Worker) {
    for (what, headers) in [("no credentials", vec![]), ("a wrong password", vec![("Authorization", basic("wrong-token"))])] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for path in ["/status.html", "/status"] {
            let mut h = headers.clone();
            h.push(("Accept", "text/html"));
            let r = worker.get_full(path, &h);
            assert_eq!(r.status, 401, "GET {path} with {what}: {r:?}");
            assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"embsync\""), "GET {path} with {what}: {r:?}");
            assert!(!r.body.contains("Sources"), "nothing of the page without the token: {r:?}");
        }
    }
    let right = basic(TOKEN);
    let bearer = format!("Bearer {TOKEN}");
    for (path, headers) in [
        ("/status.html", vec![("Authorization", right.as_str())]),
        ("/status.html", vec![("Authorization", bearer.as_str())]),
        ("/status", vec![("Authorization", right.as_str()), ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")]),
    ] {
        let r = worker.get_full(path, &headers);
        assert_eq!(r.status, 200, "GET {path} with {headers:?}: {r:?}");
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"), "{r:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(csp.starts_with("default-src 'none'; style-src 'sha256-"), "{csp}");
        assert!(r.body.starts_with("<!DOCTYPE html>"), "{}", &r.body[..r.body.len().min(200)]);
    }
    // JSON stays the default, and its endpoints take the bearer token only.
    let json = worker.get_full("/status", &[("Authorization", &bearer)]);
    assert_eq!(json.status, 200, "{json:?}");
    assert!(json.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{json:?}");
    assert_eq!(json.header("vary"), Some("Accept"), "{json:?}");
    let basic_json = worker.get_full("/status", &[("Authorization", &right)]);
    assert_eq!(basic_json.status, 401, "JSON endpoints take no Basic credentials: {basic_json:?}");
    assert_eq!(basic_json.header("www-authenticate"), None, "{basic_json:?}");
    assert_eq!(worker.get_full("/status.html?x=1", &[("Authorization", &right)]).status, 400);
}

#[test]
fn status_page_in_a_headless_browser() {
    let mut db = TestDb::create();
    for (src, n) in [(FULL, FULL_VALUES), (PART, PART_VALUES), (DISABLED, 5)] {
        db.create_source_table(src.table, src.column);
        db.exec(&format!("INSERT INTO {} ({}) SELECT '{} value ' || g FROM generate_series(1, {n}) g", src.table, src.column, src.table));
    }
    let provider = Provider::start(Some(API_KEY));
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(config()).var("SYNC_MAX_BATCHES", MAX_BATCHES));
    let browser = Browser::find();
    let artifacts = artifacts_dir();

    // A run that pauses with the first source done and a fifth of the second.
    let report = worker.sync();
    assert_eq!(report["status"], json!("paused"), "{report:#}");
    let status = worker.status();
    assert_counts("full", coverage(&status, FULL.table), &[("distinctValues", FULL_VALUES), ("pending", 0)]);
    assert_counts("part", coverage(&status, PART.table), &[("distinctValues", PART_VALUES), ("pending", PART_VALUES - PART_DONE)]);
    assert!(coverage(&status, BROKEN.table)["error"].as_str().is_some_and(|e| e.contains("html_missing")), "{status:#}");
    assert_eq!(status["currentRun"]["status"], json!("paused"), "{status:#}");
    let open: Vec<(&Value, &Value)> =
        status["currentRun"]["sources"].as_array().expect("sources").iter().map(|s| (&s["planned"], &s["done"])).collect();
    assert_eq!(open, [(&json!(true), &json!(true)), (&json!(true), &json!(false)), (&json!(false), &json!(false))], "{status:#}");
    assert_eq!(status["disabled"], json!([DISABLED.name]), "{status:#}");

    check_auth_and_headers(&worker);

    // The browser signs in with the URL's credentials after the worker's 401 challenge.
    let paused_png = artifacts.join("status-paused.png");
    browser.screenshot(&page_url(&worker, TOKEN), &paused_png, VIEWPORT, false);
    let (w, h, _) = read_png(&paused_png);
    assert_eq!((w, h), VIEWPORT, "screenshot size");
    // Two bars (the broken source has none, the disabled one is only named), drawn to scale.
    assert_bars(&paused_png, LIGHT, &[1.0, PART_DONE as f64 / PART_VALUES as f64]);

    let dom = browser.dump_dom(&page_url(&worker, TOKEN));
    for text in [
        "Run in progress <span class=\"badge paused\">paused</span>",
        &format!("<strong>{FULL_VALUES}</strong> of {FULL_VALUES} values embedded · <strong>100%</strong>"),
        &format!("<strong>{PART_DONE}</strong> of {PART_VALUES} values embedded · <strong>20.0%</strong>"),
        "This run so far",
        "<div><dt>embedded</dt><dd>20</dd></div>",
        "<h3>&lt;script&gt;alert('x')&lt;/script&gt; &amp; \"Broken\"</h3>",
        "Coverage unavailable:",
        "Not reached yet in this run.",
        "Disabled: Switched off",
    ] {
        assert!(dom.contains(text), "the page should show {text:?}:\n{dom}");
    }
    assert_eq!(dom.matches("<script").count(), 0, "a source name became markup:\n{dom}");
    assert_eq!(dom.matches("<progress").count(), 2, "{dom}");

    // A wrong password in the URL: the browser gets the 401 and shows the error, not the page.
    let denied = browser.dump_dom(&page_url(&worker, "not-the-token"));
    assert!(denied.contains("invalid token") && !denied.contains("Sources"), "{denied}");

    // Finish the run: the page shows its report, and both bars are full, in both colour schemes.
    for _ in 0..10 {
        if worker.sync()["status"] == json!("finished") {
            break;
        }
    }
    let status = worker.status();
    assert_eq!(status["currentRun"], Value::Null, "{status:#}");
    assert_eq!(status["lastRuns"][0]["status"], json!("finished"), "{status:#}");
    let finished_png = artifacts.join("status-finished.png");
    browser.screenshot(&page_url(&worker, TOKEN), &finished_png, VIEWPORT, false);
    assert_bars(&finished_png, LIGHT, &[1.0, 1.0]);
    let dark_png = artifacts.join("status-finished-dark.png");
    browser.screenshot(&page_url(&worker, TOKEN), &dark_png, VIEWPORT, true);
    assert_bars(&dark_png, DARK, &[1.0, 1.0]);
    assert!(bars(&dark_png, LIGHT).is_empty(), "the dark page uses the dark colours");

    let dom = browser.dump_dom(&page_url(&worker, TOKEN));
    let run_id = status["lastRuns"][0]["runId"].as_str().expect("runId");
    for text in [
        "Last run <span class=\"badge finished\">finished</span>",
        &format!("<code>{run_id}</code>"),
        &format!("<strong>{PART_VALUES}</strong> of {PART_VALUES} values embedded · <strong>100%</strong>"),
        &format!("<div><dt>new</dt><dd>{PART_VALUES}</dd></div>"),
        "<div><dt>Invocations</dt><dd>",
    ] {
        assert!(dom.contains(text), "the page should show {text:?}:\n{dom}");
    }
    // The broken source's error from the run's report, next to the coverage error.
    let broken = &dom[dom.find("&lt;script&gt;").expect("the broken source")..];
    let broken = &broken[..broken.find("</article>").expect("its end")];
    assert_eq!(broken.matches("class=\"note err\"").count(), 2, "{broken}");
}
