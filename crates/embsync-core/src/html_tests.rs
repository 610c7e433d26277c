//! Snapshots of the status page in the states a person meets, and its escaping, bars and headers.

use super::*;
use crate::prune::{LeftReason, LeftSource};
use crate::report::{ModelUsage, Totals, Usage};
use crate::status::{CursorState, ModelBatches, OpenRunSource, PendingBatch};
use expect_test::{expect, Expect};

fn coverage(name: &str, table: &str, distinct: u64, pending: u64) -> Coverage {
    Coverage {
        name: name.into(),
        table: table.into(),
        column: "description".into(),
        distinct_values: distinct,
        embedded_large: distinct.saturating_sub(pending),
        embedded_small: distinct.saturating_sub(pending),
        pending,
        errors: 0,
        error: None,
        changes: Default::default(),
        capture: None,
    }
}

fn source_report(name: &str, table: &str, new: u64, embedded: u64) -> SourceReport {
    SourceReport {
        name: name.into(),
        table: table.into(),
        column: "description".into(),
        total: 1000,
        new,
        unchanged: 1000 - new,
        embedded,
        batches: embedded.div_ceil(100),
        ..SourceReport::default()
    }
}

fn report(status: RunStatus, sources: Vec<SourceReport>) -> RunReport {
    RunReport {
        run_id: "run-19ab-0001".into(),
        status,
        invocations: 3,
        trigger: Trigger::Cron,
        started_at: "2026-11-23T23:55:00.000Z".into(),
        duration_ms: 184_250,
        totals: Totals::of(&sources),
        sources,
        usage: Usage {
            large: ModelUsage { prompt_tokens: 12_345, requests: 10, ..Default::default() },
            small: ModelUsage { prompt_tokens: 12_345, requests: 10, ..Default::default() },
            cost_usd: 0.0018,
        },
        stopped: None,
        indexes: None,
        pending_batches: None,
    }
}

fn finished(report: &RunReport) -> FinishedRun {
    FinishedRun {
        run_id: report.run_id.clone(),
        status: report.status,
        finished_at: "2026-11-23T23:58:04.250Z".into(),
        report: serde_json::to_value(report).unwrap(),
    }
}

fn status(current_run: Option<CurrentRun>, last_runs: Vec<FinishedRun>, sources: Vec<Coverage>) -> Status {
    Status {
        cursor: CursorState::Absent,
        current_run,
        last_runs,
        sources,
        disabled: vec![],
        left_config: vec![],
        orphans: Default::default(),
        pending_batches: vec![],
    }
}

/// Checks the page's `<body>`; the head is the same for every state (see `head_is_self_contained`).
fn check(status: &Status, expect: Expect) {
    let page = render(status);
    let body = &page[page.find("<body>").expect("a body")..];
    expect.assert_eq(body);
}

#[test]
fn paused_run_shows_progress_so_far() {
    let run = CurrentRun {
        run_id: "run-19ab-0002".into(),
        status: RunStatus::Paused,
        trigger: Trigger::Cron,
        invocations: 1,
        started_at: "2026-11-24T00:00:00.120Z".into(),
        sources: vec![
            OpenRunSource { report: source_report("Parts", "parts", 1000, 400), planned: true, done: false, ranges: None },
            OpenRunSource { report: source_report("Later", "later", 0, 0), planned: false, done: false, ranges: None },
        ],
    };
    let previous = finished(&report(RunStatus::Finished, vec![]));
    check(
        &status(Some(run), vec![previous], vec![coverage("Parts", "parts", 1000, 600), coverage("Later", "later", 50, 50)]),
        expect![[r#"
            <body>
            <header>
            <h1>embsync</h1>
            <p class="sub">Embeddings of Postgres column values: coverage per source and the sync run</p>
            </header>
            <main>
            <section class="run">
            <h2>Run in progress <span class="badge paused">paused</span></h2>
            <dl class="facts">
            <div><dt>Run</dt><dd><code>run-19ab-0002</code></dd></div>
            <div><dt>Trigger</dt><dd>cron</dd></div>
            <div><dt>Started</dt><dd>2026-11-24 00:00:00 UTC</dd></div>
            <div><dt>Invocations</dt><dd>1</dd></div>
            </dl>
            <p class="muted">Paused when an invocation spent its budget: the next cron tick or POST /sync goes on where it stopped.</p>
            <p class="muted">Previous run <code>run-19ab-0001</code>: finished at 2026-11-23 23:58:04 UTC.</p>
            </section>
            <section class="sources">
            <h2>Sources</h2>
            <article class="source">
            <div class="source-head"><h3>Parts</h3><code>parts.description</code></div>
            <progress class="bar" max="1000" value="400" aria-label="Coverage of Parts">40.0%</progress>
            <p class="coverage"><strong>400</strong> of 1,000 values embedded · <strong>40.0%</strong></p>
            <p class="counts-title muted">This run so far</p>
            <dl class="counts">
            <div><dt>new</dt><dd>1,000</dd></div>
            <div><dt>stale</dt><dd>0</dd></div>
            <div><dt>unchanged</dt><dd>0</dd></div>
            <div><dt>embedded</dt><dd>400</dd></div>
            <div><dt>errors</dt><dd>0</dd></div>
            <div><dt>deferred</dt><dd>0</dd></div>
            </dl>
            </article>
            <article class="source">
            <div class="source-head"><h3>Later</h3><code>later.description</code></div>
            <progress class="bar" max="50" value="0" aria-label="Coverage of Later">0.0%</progress>
            <p class="coverage"><strong>0</strong> of 50 values embedded · <strong>0.0%</strong></p>
            <p class="counts-title muted">Not reached yet in this run.</p>
            </article>
            </section>
            </main>
            <footer>The same as JSON: <code>GET /status</code> with <code>Accept: application/json</code>.</footer>
            </body>
            </html>
        "#]],
    );
}

#[test]
fn finished_run_shows_its_report_per_source() {
    let mut guarded = source_report("Labels", "labels", 0, 0);
    guarded.warning = Some("kept 300 values: the source returned none (set allowMassDelete to remove them)".into());
    let mut with_errors = source_report("Notes", "notes", 20, 18);
    (with_errors.errors, with_errors.deferred) = (2, 0);
    let run = report(RunStatus::Finished, vec![source_report("Parts", "parts", 1000, 1000), guarded, with_errors]);
    let mut notes = coverage("Notes", "notes", 1000, 2);
    notes.errors = 2;
    let mut st = status(
        None,
        vec![finished(&run)],
        vec![coverage("Parts", "parts", 1000, 0), coverage("Labels", "labels", 300, 0), notes, coverage("New", "new_table", 0, 0)],
    );
    st.disabled = vec!["Old Notes".into(), "Drafts".into()];
    check(
        &st,
        expect![[r#"
            <body>
            <header>
            <h1>embsync</h1>
            <p class="sub">Embeddings of Postgres column values: coverage per source and the sync run</p>
            </header>
            <main>
            <section class="run">
            <h2>Last run <span class="badge finished">finished</span></h2>
            <dl class="facts">
            <div><dt>Run</dt><dd><code>run-19ab-0001</code></dd></div>
            <div><dt>Trigger</dt><dd>cron</dd></div>
            <div><dt>Started</dt><dd>2026-11-23 23:55:00 UTC</dd></div>
            <div><dt>Finished</dt><dd>2026-11-23 23:58:04 UTC</dd></div>
            <div><dt>Invocations</dt><dd>3</dd></div>
            <div><dt>Duration</dt><dd>3 min 04 s</dd></div>
            <div><dt>Tokens</dt><dd>24,690 (20 requests)</dd></div>
            <div><dt>Cost</dt><dd>$0.0018</dd></div>
            </dl>
            </section>
            <section class="sources">
            <h2>Sources</h2>
            <article class="source">
            <div class="source-head"><h3>Parts</h3><code>parts.description</code></div>
            <progress class="bar" max="1000" value="1000" aria-label="Coverage of Parts">100%</progress>
            <p class="coverage"><strong>1,000</strong> of 1,000 values embedded · <strong>100%</strong></p>
            <p class="counts-title muted">Last run</p>
            <dl class="counts">
            <div><dt>new</dt><dd>1,000</dd></div>
            <div><dt>stale</dt><dd>0</dd></div>
            <div><dt>unchanged</dt><dd>0</dd></div>
            <div><dt>embedded</dt><dd>1,000</dd></div>
            <div><dt>errors</dt><dd>0</dd></div>
            <div><dt>deferred</dt><dd>0</dd></div>
            </dl>
            </article>
            <article class="source">
            <div class="source-head"><h3>Labels</h3><code>labels.description</code></div>
            <progress class="bar" max="300" value="300" aria-label="Coverage of Labels">100%</progress>
            <p class="coverage"><strong>300</strong> of 300 values embedded · <strong>100%</strong></p>
            <p class="counts-title muted">Last run</p>
            <dl class="counts">
            <div><dt>new</dt><dd>0</dd></div>
            <div><dt>stale</dt><dd>0</dd></div>
            <div><dt>unchanged</dt><dd>1,000</dd></div>
            <div><dt>embedded</dt><dd>0</dd></div>
            <div><dt>errors</dt><dd>0</dd></div>
            <div><dt>deferred</dt><dd>0</dd></div>
            </dl>
            <p class="note warn">kept 300 values: the source returned none (set allowMassDelete to remove them)</p>
            </article>
            <article class="source">
            <div class="source-head"><h3>Notes</h3><code>notes.description</code></div>
            <progress class="bar" max="1000" value="998" aria-label="Coverage of Notes">99.8%</progress>
            <p class="coverage"><strong>998</strong> of 1,000 values embedded · <strong>99.8%</strong></p>
            <p class="counts-title muted">Last run</p>
            <dl class="counts">
            <div><dt>new</dt><dd>20</dd></div>
            <div><dt>stale</dt><dd>0</dd></div>
            <div><dt>unchanged</dt><dd>980</dd></div>
            <div><dt>embedded</dt><dd>18</dd></div>
            <div><dt>errors</dt><dd>2</dd></div>
            <div><dt>deferred</dt><dd>0</dd></div>
            </dl>
            <p class="note err">2 values failed and will be retried (see <code>embedding_sync_errors</code>).</p>
            </article>
            <article class="source">
            <div class="source-head"><h3>New</h3><code>new_table.description</code></div>
            <progress class="bar" max="1" value="0" aria-label="Coverage of New">0%</progress>
            <p class="coverage">No values in this column yet.</p>
            </article>
            <p class="muted disabled">Disabled: Old Notes, Drafts</p>
            </section>
            </main>
            <footer>The same as JSON: <code>GET /status</code> with <code>Accept: application/json</code>.</footer>
            </body>
            </html>
        "#]],
    );
}

#[test]
fn failed_run_says_why_and_a_broken_source_says_what_is_wrong() {
    let mut run = report(RunStatus::Failed, vec![source_report("Parts", "parts", 1000, 200)]);
    run.stopped = Some("the provider rejected the API key (401): fix OPENAI_API_KEY".into());
    let mut broken = coverage("Gone", "gone", 0, 0);
    broken.error = Some("reading coverage: relation \"gone\" does not exist".into());
    check(
        &status(None, vec![finished(&run)], vec![coverage("Parts", "parts", 1000, 800), broken]),
        expect![[r#"
            <body>
            <header>
            <h1>embsync</h1>
            <p class="sub">Embeddings of Postgres column values: coverage per source and the sync run</p>
            </header>
            <main>
            <section class="run">
            <h2>Last run <span class="badge failed">failed</span></h2>
            <dl class="facts">
            <div><dt>Run</dt><dd><code>run-19ab-0001</code></dd></div>
            <div><dt>Trigger</dt><dd>cron</dd></div>
            <div><dt>Started</dt><dd>2026-11-23 23:55:00 UTC</dd></div>
            <div><dt>Finished</dt><dd>2026-11-23 23:58:04 UTC</dd></div>
            <div><dt>Invocations</dt><dd>3</dd></div>
            <div><dt>Duration</dt><dd>3 min 04 s</dd></div>
            <div><dt>Tokens</dt><dd>24,690 (20 requests)</dd></div>
            <div><dt>Cost</dt><dd>$0.0018</dd></div>
            </dl>
            <p class="note err">Stopped: the provider rejected the API key (401): fix OPENAI_API_KEY</p>
            </section>
            <section class="sources">
            <h2>Sources</h2>
            <article class="source">
            <div class="source-head"><h3>Parts</h3><code>parts.description</code></div>
            <progress class="bar" max="1000" value="200" aria-label="Coverage of Parts">20.0%</progress>
            <p class="coverage"><strong>200</strong> of 1,000 values embedded · <strong>20.0%</strong></p>
            <p class="counts-title muted">Last run</p>
            <dl class="counts">
            <div><dt>new</dt><dd>1,000</dd></div>
            <div><dt>stale</dt><dd>0</dd></div>
            <div><dt>unchanged</dt><dd>0</dd></div>
            <div><dt>embedded</dt><dd>200</dd></div>
            <div><dt>errors</dt><dd>0</dd></div>
            <div><dt>deferred</dt><dd>0</dd></div>
            </dl>
            </article>
            <article class="source">
            <div class="source-head"><h3>Gone</h3><code>gone.description</code></div>
            <p class="note err">Coverage unavailable: reading coverage: relation &quot;gone&quot; does not exist</p>
            </article>
            </section>
            </main>
            <footer>The same as JSON: <code>GET /status</code> with <code>Accept: application/json</code>.</footer>
            </body>
            </html>
        "#]],
    );
}

#[test]
fn never_run_with_an_empty_cache() {
    check(
        &status(None, vec![], vec![coverage("Parts", "parts", 250, 250)]),
        expect![[r#"
            <body>
            <header>
            <h1>embsync</h1>
            <p class="sub">Embeddings of Postgres column values: coverage per source and the sync run</p>
            </header>
            <main>
            <section class="run">
            <h2>No run yet</h2>
            <p class="muted">Nothing has been synced yet: the next cron tick starts a run, or <code>POST /sync</code> does now.</p>
            </section>
            <section class="sources">
            <h2>Sources</h2>
            <article class="source">
            <div class="source-head"><h3>Parts</h3><code>parts.description</code></div>
            <progress class="bar" max="250" value="0" aria-label="Coverage of Parts">0.0%</progress>
            <p class="coverage"><strong>0</strong> of 250 values embedded · <strong>0.0%</strong></p>
            </article>
            </section>
            </main>
            <footer>The same as JSON: <code>GET /status</code> with <code>Accept: application/json</code>.</footer>
            </body>
            </html>
        "#]],
    );
}

#[test]
fn sources_that_left_the_config_show_what_they_hold() {
    let left = |table: &str, reason, name: Option<&str>, links, errors, rows| LeftSource {
        table: table.into(),
        column: "description".into(),
        reason,
        name: name.map(Into::into),
        links,
        errors,
        rows,
        batch_values: if rows > 0 { 40 } else { 0 },
        same_as: None,
    };
    let mut st = status(None, vec![], vec![coverage("Parts", "public.parts", 10, 0)]);
    st.disabled = vec!["Drafts".into()];
    let mut renamed = left("parts", LeftReason::Removed, None, 10, 0, 0);
    renamed.same_as = Some("Parts".into());
    st.left_config = vec![left("drafts", LeftReason::Disabled, Some("Drafts"), 1200, 3, 1000), renamed];
    check(
        &st,
        expect![[r#"
            <body>
            <header>
            <h1>embsync</h1>
            <p class="sub">Embeddings of Postgres column values: coverage per source and the sync run</p>
            </header>
            <main>
            <section class="run">
            <h2>No run yet</h2>
            <p class="muted">Nothing has been synced yet: the next cron tick starts a run, or <code>POST /sync</code> does now.</p>
            </section>
            <section class="sources">
            <h2>Sources</h2>
            <article class="source">
            <div class="source-head"><h3>Parts</h3><code>public.parts.description</code></div>
            <progress class="bar" max="10" value="10" aria-label="Coverage of Parts">100%</progress>
            <p class="coverage"><strong>10</strong> of 10 values embedded · <strong>100%</strong></p>
            </article>
            <p class="muted disabled">Disabled: Drafts</p>
            </section>
            <section class="left-config">
            <h2>Left the config</h2>
            <p class="muted">No longer synced (removed from the config, renamed, or disabled), but their links, the cache rows only they hold and their errors are kept until <code>POST /prune</code> removes them.</p>
            <article class="source">
            <div class="source-head"><h3><code>drafts.description</code></h3><span class="muted">disabled: Drafts</span></div>
            <dl class="counts">
            <div><dt>links</dt><dd>1,200</dd></div>
            <div><dt>errors</dt><dd>3</dd></div>
            <div><dt>rows only it holds</dt><dd>1,000</dd></div>
            <div><dt>values in pending batches</dt><dd>40</dd></div>
            </dl>
            </article>
            <article class="source">
            <div class="source-head"><h3><code>parts.description</code></h3><span class="muted">removed · the same column as the enabled source Parts</span></div>
            <dl class="counts">
            <div><dt>links</dt><dd>10</dd></div>
            <div><dt>errors</dt><dd>0</dd></div>
            <div><dt>rows only it holds</dt><dd>0</dd></div>
            <div><dt>values in pending batches</dt><dd>0</dd></div>
            </dl>
            </article>
            </section>
            </main>
            <footer>The same as JSON: <code>GET /status</code> with <code>Accept: application/json</code>.</footer>
            </body>
            </html>
        "#]],
    );
    assert!(!render(&status(None, vec![], vec![])).contains("Left the config"), "the section shows only when a source left");
}

#[test]
fn orphans_waiting_for_the_end_of_a_run_are_counted() {
    let mut st = status(None, vec![], vec![]);
    assert!(!render(&st).contains("Waiting to be deleted"), "the section shows only when orphans wait");
    st.orphans = WaitingOrphans { rows: 1234, oldest: Some("2026-11-23T23:59:00.123Z".into()) };
    let page = render(&st);
    let section = &page[page.find("<section class=\"orphans\">").expect("the section")..page.find("</main>").unwrap()];
    expect![[r#"
        <section class="orphans">
        <h2>Waiting to be deleted</h2>
        <p class="muted">1,234 cache rows embsync wrote are no longer linked by any source (the first since 2026-11-23 23:59:00 UTC). The end of the next run that gets through every source deletes those that no source links or has by then; a value a source has again is kept and linked.</p>
        </section>
    "#]]
    .assert_eq(section);
}

#[test]
fn abandoned_run_without_a_report() {
    let run = FinishedRun {
        run_id: "run-x".into(),
        status: RunStatus::Abandoned,
        finished_at: "2026-11-23T23:58:04.250Z".into(),
        report: serde_json::Value::Null,
    };
    let page = render(&status(None, vec![run], vec![coverage("Parts", "parts", 10, 0)]));
    assert!(page.contains("<h2>Last run <span class=\"badge abandoned\">abandoned</span></h2>"), "{page}");
    assert!(page.contains("Abandoned without a report"), "{page}");
    assert!(!page.contains("class=\"counts-title"), "no per-source counts without a report: {page}");
}

#[test]
fn every_text_is_escaped() {
    let evil = "<script>alert(\"x\")</script> & 'q'";
    let escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;q&#39;";
    let mut c = coverage(evil, "t<b>", 10, 5);
    c.column = "c\"onmouseover=\"x".into();
    let mut r = source_report(evil, "t<b>", 5, 5);
    r.column = c.column.clone();
    r.error = Some(format!("error {evil}"));
    r.warning = Some(format!("warning {evil}"));
    let mut run = report(RunStatus::Failed, vec![r]);
    run.run_id = format!("run {evil}");
    run.stopped = Some(format!("stopped {evil}"));
    let mut st = status(None, vec![finished(&run)], vec![c]);
    st.disabled = vec![evil.into()];
    st.left_config = vec![LeftSource {
        table: format!("left {evil}"),
        column: "c<i>".into(),
        reason: LeftReason::Disabled,
        name: Some(format!("name {evil}")),
        links: 1,
        errors: 0,
        rows: 1,
        batch_values: 0,
        same_as: Some(format!("same {evil}")),
    }];
    st.pending_batches = vec![ModelBatches {
        slot: "large".into(),
        model: format!("model {evil}"),
        batches: vec![PendingBatch {
            batch_id: Some(format!("batch {evil}")),
            input_file_id: format!("file {evil}"),
            run_id: "r".into(),
            state: format!("state {evil}"),
            created_at: "2026-11-23T23:58:00.000Z".into(),
            age_seconds: 1,
            polled_at: None,
            request_counts: Some(serde_json::json!({"total": evil})),
            requests: 1,
            values: 1,
            waiting: 1,
        }],
    }];
    let page = render(&st);
    assert!(!page.contains("<script"), "{page}");
    assert!(!page.contains("<b>"), "{page}");
    assert!(!page.contains("<i>"), "{page}");
    assert!(!page.contains("\"onmouseover"), "{page}");
    assert!(!page.contains("'q'"), "{page}");
    for shown in [
        format!("<h3>{escaped}</h3>"),
        "<code>t&lt;b&gt;.c&quot;onmouseover=&quot;x</code>".into(),
        format!("aria-label=\"Coverage of {escaped}\""),
        format!("<p class=\"note err\">error {escaped}</p>"),
        format!("<p class=\"note warn\">warning {escaped}</p>"),
        format!("Stopped: stopped {escaped}"),
        format!("<code>run {escaped}</code>"),
        format!("Disabled: {escaped}</p>"),
        format!("<h3><code>left {escaped}.c&lt;i&gt;</code></h3>"),
        format!("disabled: name {escaped} · the same column as the enabled source same {escaped}</span>"),
        format!("<code>model {escaped}</code>"),
        format!("<code>batch {escaped}</code>"),
        format!("<dd>state {escaped}</dd>"),
    ] {
        assert!(page.contains(&shown), "missing {shown:?} in {page}");
    }

    // The same through the open run and a broken source.
    let mut broken = coverage(evil, "t", 0, 0);
    broken.error = Some(evil.into());
    let open = CurrentRun {
        run_id: evil.into(),
        status: RunStatus::Running,
        trigger: Trigger::Http,
        invocations: 1,
        started_at: evil.into(),
        sources: vec![],
    };
    let page = render(&status(Some(open), vec![], vec![broken]));
    assert!(!page.contains("<script"), "{page}");
    assert!(page.contains(&format!("Coverage unavailable: {escaped}")), "{page}");
    assert!(page.contains(&format!("<dd>{escaped}</dd>")), "{page}");
}

#[test]
fn bars_are_as_wide_as_the_share_of_values_done() {
    // The bar's fill is value / max of its width; the text rounds down so that only a complete
    // source shows 100%.
    let bar = |distinct: u64, pending: u64| {
        let page = render(&status(None, vec![], vec![coverage("S", "t", distinct, pending)]));
        let start = page.find("<progress").expect("a bar");
        page[start..start + page[start..].find("</progress>").unwrap()].to_owned()
    };
    assert!(bar(1000, 600).contains("max=\"1000\" value=\"400\""), "{}", bar(1000, 600));
    assert!(bar(1000, 600).ends_with(">40.0%"));
    assert!(bar(3, 2).contains("max=\"3\" value=\"1\""));
    assert!(bar(3, 2).ends_with(">33.3%"));
    assert!(bar(10, 0).contains("max=\"10\" value=\"10\""));
    assert!(bar(0, 0).contains("max=\"1\" value=\"0\""), "an empty source: an empty bar");
    // More pending than distinct (counted at different moments) is an empty bar, not a negative one.
    assert!(bar(5, 9).contains("max=\"5\" value=\"0\""));
    assert_eq!(percent(1999, 2000), "99.9%");
    assert_eq!(percent(99_999_999, 100_000_000), "99.9%");
    assert_eq!(percent(1, 100_000), "0.0%");
    assert_eq!(percent(2, 3), "66.6%");
    assert_eq!(percent(u64::MAX - 1, u64::MAX), "99.9%");
    assert_eq!(percent(7, 7), "100%");
    assert_eq!(percent(0, 0), "0%");
}

#[test]
fn head_is_self_contained_and_allowed_by_the_policy() {
    let page = render(&status(None, vec![], vec![]));
    let head = &page[..page.find("<body>").unwrap()];
    expect![[r#"
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <meta name="color-scheme" content="light dark">
        <meta name="robots" content="noindex">
        <title>embsync status</title>
        <style>…</style>
        </head>
    "#]]
    .assert_eq(&head.replace(STYLE, "…"));
    // The policy allows exactly the style element's content, byte for byte.
    let style = &page[page.find("<style>").unwrap() + 7..page.find("</style>").unwrap()];
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(style.as_bytes()));
    let csp = content_security_policy();
    assert!(csp.contains(&format!("style-src 'sha256-{hash}'")), "{csp}");
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    // Nothing that loads or runs anything.
    for needle in ["<script", "<link", "<img", "src=", "href=", "url(", "@import", "javascript:"] {
        assert!(!page.contains(needle), "{needle} in the page");
    }
    // Both colour schemes.
    assert!(STYLE.contains("@media (prefers-color-scheme:dark)"));
}

#[test]
fn headers() {
    let headers = response_headers();
    let get = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
    assert_eq!(get("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(get("cache-control"), Some("no-store"));
    assert_eq!(get("x-content-type-options"), Some("nosniff"));
    assert_eq!(get("content-security-policy"), Some(content_security_policy().as_str()));
}

#[test]
fn html_only_when_asked_for_first() {
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
    for (accept, html) in [
        (None, false),
        (Some(""), false),
        (Some("*/*"), false),
        (Some("application/json"), false),
        (Some("text/html"), true),
        (Some("TEXT/HTML; charset=utf-8"), true),
        (Some(browser), true),
        (Some("text/html;q=0.5, */*"), false),
        (Some("text/html, application/json"), false),
        (Some("application/json;q=0.9, text/html"), true),
        (Some("text/html;q=0"), false),
        (Some("text/*"), false),
        (Some("text/html;q=nonsense"), true),
    ] {
        assert_eq!(prefers_html(accept), html, "Accept: {accept:?}");
    }
}

#[test]
fn times_and_durations_read_well() {
    assert_eq!(when("2026-11-23T23:59:00.123Z"), "2026-11-23 23:59:00 UTC");
    assert_eq!(when("yesterday"), "yesterday");
    assert_eq!(when("2026-11-23 23:59:00+00"), "2026-11-23 23:59:00+00");
    assert_eq!(duration(850), "850 ms");
    assert_eq!(duration(12_345), "12.3 s");
    assert_eq!(duration(3_723_000), "62 min 03 s");
    assert_eq!(Num(0).to_string(), "0");
    assert_eq!(Num(999).to_string(), "999");
    assert_eq!(Num(1_000).to_string(), "1,000");
    assert_eq!(Num(1_234_567).to_string(), "1,234,567");
}

#[test]
fn a_fanned_out_source_shows_its_ranges_and_the_dead_ones_why() {
    use crate::status::{DeadRange, SourceRanges};
    let ranges = SourceRanges {
        queued: 3,
        done: 1_200,
        dead: 1,
        dead_ranges: vec![DeadRange { range: 42, error: "max retries: provider <503>".into() }],
    };
    let run = CurrentRun {
        run_id: "run-fan".into(),
        status: RunStatus::Paused,
        trigger: Trigger::Cron,
        invocations: 2,
        started_at: "2026-11-24T00:00:00.120Z".into(),
        sources: vec![OpenRunSource {
            report: source_report("Parts", "parts", 1000, 400),
            planned: true,
            done: false,
            ranges: Some(ranges),
        }],
    };
    let json = serde_json::to_value(&run.sources[0]).unwrap();
    assert_eq!(
        json["ranges"],
        serde_json::json!({"queued": 3, "done": 1200, "dead": 1, "deadRanges": [{"range": 42, "error": "max retries: provider <503>"}]})
    );
    let page = render(&status(Some(run), vec![], vec![coverage("Parts", "parts", 1000, 600)]));
    let lines: Vec<&str> = page.lines().filter(|l| l.contains("Fan") || l.contains("given up")).collect();
    expect![[r#"
        [
            "<p class=\"muted\">Fanned out: the queue&#39;s consumers embed its ranges; the run goes on once they are done.</p>",
            "<p class=\"coverage\">Fan-out: <strong>3</strong> ranges queued · 1,200 done · 1 given up</p>",
            "<p class=\"note err\">Range 42 was given up: max retries: provider &lt;503&gt;</p>",
        ]
    "#]]
    .assert_debug_eq(&lines);
}

#[test]
fn a_captured_source_shows_its_capture() {
    let mut captured = coverage("Parts", "parts", 250, 2);
    captured.changes = crate::report::ChangesMode::Capture;
    captured.capture = Some(crate::report::CaptureInfo {
        reconcile_every: "1d".into(),
        triggers: "enabled".into(),
        last_reconcile: Some("2026-12-07T22:00:00.000Z".into()),
        backlog: 1234,
        last_drift: Some(crate::sync::Drift { new: 3, stale: 1 }),
    });
    let page = render(&status(None, vec![], vec![captured.clone(), coverage("Scanned", "s", 1, 0)]));
    let notes: Vec<&str> = page.lines().filter(|l| l.contains("Change capture")).collect();
    expect![[r#"
        [
            "<p class=\"note\">Change capture: triggers enabled · reconciled every 1d · last reconcile 2026-12-07T22:00:00.000Z · 1,234 changes waiting · the last reconcile repaired 3 new and 1 stale values it had missed</p>",
        ]
    "#]]
    .assert_debug_eq(&notes);
    let json = serde_json::to_value(&captured).unwrap();
    assert_eq!(json["changes"], "capture");
    assert_eq!(json["capture"]["backlog"], 1234);
    assert_eq!(serde_json::to_value(coverage("Scanned", "s", 1, 0)).unwrap()["changes"], "scan");
}

#[test]
fn pending_batches_show_per_model_with_their_age_and_request_counts() {
    let batch = |id: Option<&str>, state: &str, age_seconds, counts: Option<serde_json::Value>, waiting| PendingBatch {
        batch_id: id.map(Into::into),
        input_file_id: "file-1".into(),
        run_id: "run-1".into(),
        state: state.into(),
        created_at: "2026-11-23T23:58:00.000Z".into(),
        age_seconds,
        polled_at: None,
        request_counts: counts,
        requests: 30,
        values: 20_000,
        waiting,
    };
    let mut st = status(None, vec![], vec![]);
    st.pending_batches = vec![
        ModelBatches {
            slot: "large".into(),
            model: "text-embedding-3-large".into(),
            batches: vec![
                batch(Some("batch_a"), "in_progress", 4000, Some(serde_json::json!({"total": 30, "completed": 12, "failed": 1})), 20_000),
                batch(None, "uploaded", 42, None, 20_000),
            ],
        },
        ModelBatches {
            slot: "small".into(),
            model: "text-embedding-3-small:256".into(),
            batches: vec![batch(Some("batch_b"), "completed", 90_000, Some(serde_json::json!({"total": 30, "completed": 30})), 1_500)],
        },
    ];
    let page = render(&st);
    let section = &page[page.find("<section class=\"batches\">").expect("a batches section")..];
    let section = &section[..section.find("</section>").unwrap()];
    expect![[r#"
        <section class="batches">
        <h2>Pending batches</h2>
        <p class="muted">Values sent through the Batch API (half the price, within 24 hours). Their values are not sent again meanwhile; each invocation polls them and stores the output once a batch completes.</p>
        <article class="source">
        <div class="source-head"><h3>large</h3><code>text-embedding-3-large</code><span class="muted">2 batches</span></div>
        <dl class="facts">
        <div><dt>Batch</dt><dd><code>batch_a</code></dd></div>
        <div><dt>State</dt><dd>in_progress</dd></div>
        <div><dt>Age</dt><dd>1 h 06 min</dd></div>
        <div><dt>Requests</dt><dd>12 of 30 done, 1 failed</dd></div>
        <div><dt>Values</dt><dd>20,000 (20,000 not stored yet)</dd></div>
        </dl>
        <dl class="facts">
        <div><dt>Batch</dt><dd>not created yet (file <code>file-1</code>)</dd></div>
        <div><dt>State</dt><dd>uploaded</dd></div>
        <div><dt>Age</dt><dd>42 s</dd></div>
        <div><dt>Requests</dt><dd>30 (not polled yet)</dd></div>
        <div><dt>Values</dt><dd>20,000 (20,000 not stored yet)</dd></div>
        </dl>
        </article>
        <article class="source">
        <div class="source-head"><h3>small</h3><code>text-embedding-3-small:256</code><span class="muted">1 batch</span></div>
        <dl class="facts">
        <div><dt>Batch</dt><dd><code>batch_b</code></dd></div>
        <div><dt>State</dt><dd>completed</dd></div>
        <div><dt>Age</dt><dd>1 d 1 h</dd></div>
        <div><dt>Requests</dt><dd>30 of 30 done, 0 failed</dd></div>
        <div><dt>Values</dt><dd>20,000 (1,500 not stored yet)</dd></div>
        </dl>
        </article>
    "#]].assert_eq(section);
    assert!(!render(&status(None, vec![], vec![])).contains("Pending batches"), "no section without batches");
}
