//! What provider failures and budgets do to a run, on the real store against real Postgres:
//! where a paused run resumes, which refusals blame a value and which end a model's work, what
//! an outage costs, and how far an invocation may wait or send.

mod support;

use embsync_core::config::Config;
use embsync_core::provider::{ProviderError, RateLimit};
use embsync_core::report::RunReport;
use embsync_core::sync::{Budget, Cursor, Outcome};
use embsync_store::PgStore;
use std::time::Duration;
use support::*;

const LARGE: &str = "text-embedding-3-large";
const SMALL: &str = "text-embedding-3-small";

/// OpenAI's answer for a model it does not serve.
fn model_not_found(model: &str) -> String {
    format!(
        r#"{{"error":{{"message":"The model `{model}` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}}}"#
    )
}

/// OpenAI's answer for `dimensions` sent to a model that does not take it.
const DIMENSIONS_REFUSED: &str =
    r#"{"error":{"message":"This model does not support specifying dimensions.","type":"invalid_request_error","param":null,"code":null}}"#;

/// OpenAI's answer for an input over the model's context length.
const CONTEXT_LENGTH: &str = r#"{"error":{"message":"This model's maximum context length is 8192 tokens, however you requested 8610 tokens (8610 in your prompt; 0 for the completion). Please reduce your prompt; or completion length.","type":"invalid_request_error","param":null,"code":null}}"#;

/// One invocation after another, each with the cursor the previous one left, until the run
/// finishes: the final report and the provider requests of each invocation.
async fn run_to_end(
    config: &Config,
    store: &mut PgStore,
    provider: &FakeProvider,
    rt: &TestRuntime,
    budget: Budget,
) -> (RunReport, Vec<usize>) {
    let mut hint: Option<Cursor> = None;
    let mut requests = Vec::new();
    for i in 0..100 {
        let before = provider.calls.borrow().len();
        let outcome = invoke(config, store, provider, rt, budget, &format!("inv-{i}"), hint.as_ref()).await.expect("an invocation");
        requests.push(provider.calls.borrow().len() - before);
        match outcome {
            Outcome::Finished(report) => return (report, requests),
            Outcome::Paused(_, cursor) => hint = Some(cursor),
            Outcome::Busy { holder, .. } => panic!("the lease is held by {holder}"),
            Outcome::FannedOut { .. } => panic!("fanned out without fan-out"),
        }
    }
    panic!("the run did not finish in 100 invocations");
}

/// Values that are done for the source: linked, with both embeddings.
async fn done_values(db: &TestDb) -> std::collections::BTreeSet<String> {
    db.texts(
        "SELECT c.value FROM embedding_cache c JOIN embedding_cache_sources s USING (value_hash) \
         WHERE c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL",
    )
    .await
}

/// Hashes of the values with a row in `embedding_sync_errors`.
async fn error_hashes(db: &TestDb) -> std::collections::BTreeSet<String> {
    db.texts("SELECT value_hash FROM embedding_sync_errors").await
}

fn set(values: &[&str]) -> std::collections::BTreeSet<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// The first `n` values `make(i)` (i = 0, 1, ...) whose hash starts with a digit in `range`.
fn with_hash_in(range: std::ops::RangeInclusive<char>, n: usize, make: impl Fn(usize) -> String) -> Vec<String> {
    (0..).map(&make).filter(|v| range.contains(&hash_of(v).chars().next().unwrap())).take(n).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_run_paused_on_a_page_that_ends_with_an_over_long_value_resumes_where_it_stopped() {
    // One value per batch, so pages of 4 values, and one batch per invocation. In hash order the
    // first page is three over-long values and `s1`; the second is `s2`, `s3`, `s4` and a fourth
    // over-long value. `s1` spends the first invocation's budget, so the second page is read with
    // the budget spent: the pause must come before `s2`, not after the page's last value.
    let long = |i: usize| format!("{} {i}", "word ".repeat(9000));
    let mut longs = with_hash_in('0'..='3', 3, long);
    longs.extend(with_hash_in('c'..='f', 1, long));
    let s1 = with_hash_in('4'..='7', 1, |i| format!("short {i}"));
    let rest = with_hash_in('8'..='b', 3, |i| format!("short {i}"));
    let shorts: Vec<String> = s1.into_iter().chain(rest).collect();
    let db = TestDb::create().await;
    let all: Vec<&str> = longs.iter().chain(&shorts).map(String::as_str).collect();
    db.source_table("items", "title", &all).await;
    let config = config(1, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    let (report, _) = run_to_end(&config, &mut store, &provider, &rt, Budget { max_batches: 1, ..Budget::default() }).await;

    // Everything pending at the start is done, or an error for the over-long values.
    let shorts: Vec<&str> = shorts.iter().map(String::as_str).collect();
    assert_eq!(done_values(&db).await, set(&shorts), "a finished run left values pending");
    assert_eq!(error_hashes(&db).await, longs.iter().map(|v| hash_of(v)).collect());
    assert_eq!((report.totals.embedded, report.totals.errors), (4, 4), "{report:?}");
    assert!(report.stopped.is_none(), "{report:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_refusal_of_the_request_itself_ends_that_models_work_for_the_run_and_blames_no_value() {
    for (status, body) in [
        (404, model_not_found(LARGE)),
        (400, DIMENSIONS_REFUSED.to_owned()),
        (413, "<html><body>413 Request Entity Too Large</body></html>".to_owned()),
        (422, r#"{"detail":[{"loc":["body","dimensions"],"msg":"Input should be a valid integer","type":"int_parsing"}]}"#.to_owned()),
    ] {
        let db = TestDb::create().await;
        let values = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
        db.source_table("items", "title", &values).await;
        let config = config(3, &[("Items", "items", "title")]);
        let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
        provider.refusals.borrow_mut().push(Refusal { model: Some(LARGE.into()), input_contains: None, status, body });
        let mut store = db.store(&config).await;
        let (report, _) = run_to_end(&config, &mut store, &provider, &rt, Budget::default()).await;

        // One request of the large model, not split; the small model does all its work.
        let large: Vec<usize> = provider.calls.borrow().iter().filter(|(m, _)| m == LARGE).map(|(_, i)| i.len()).collect();
        assert_eq!(large, [3], "{status}: the refused request must not be split or repeated");
        assert_eq!(provider.calls.borrow().iter().filter(|(m, _)| m == SMALL).count(), 2, "{status}");
        assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_small IS NOT NULL").await, 6, "{status}");
        assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL").await, 0, "{status}");
        assert!(error_hashes(&db).await.is_empty(), "{status}: no value is to blame");
        assert_eq!(report.totals.errors, 0, "{status}: {report:?}");
        let stopped = report.stopped.clone().unwrap_or_else(|| panic!("{status}: the run must say it stopped: {report:?}"));
        assert!(stopped.contains(LARGE) && stopped.contains(&status.to_string()), "{status}: {stopped}");
        assert!(stopped.contains("embedding-sources.json"), "{status}: the fix is named: {stopped}");

        // Fixed, the next run asks the large model only, for all six.
        provider.refusals.borrow_mut().clear();
        provider.calls.borrow_mut().clear();
        let (report, _) = run_to_end(&config, &mut store, &provider, &rt, Budget::default()).await;
        assert!(provider.calls.borrow().iter().all(|(m, _)| m == LARGE), "{status}");
        assert_eq!(done_values(&db).await, set(&values), "{status}");
        assert!(report.stopped.is_none(), "{status}: {report:?}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_value_over_the_context_length_is_isolated_and_blamed_alone() {
    let db = TestDb::create().await;
    let values = ["one", "two", "three", "four (too long)"];
    db.source_table("items", "title", &values).await;
    let config = config(4, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    provider.refusals.borrow_mut().push(Refusal {
        model: None,
        input_contains: Some("(too long)".into()),
        status: 400,
        body: CONTEXT_LENGTH.into(),
    });
    let mut store = db.store(&config).await;
    let (report, _) = run_to_end(&config, &mut store, &provider, &rt, Budget::default()).await;
    assert_eq!(done_values(&db).await, set(&values[..3]));
    assert_eq!(error_hashes(&db).await, [hash_of(values[3])].into());
    assert!(report.stopped.is_none(), "{report:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_outage_pauses_the_run_for_the_next_invocation_and_blames_no_value() {
    let db = TestDb::create().await;
    let values = ["alpha", "beta", "gamma", "delta"];
    db.source_table("items", "title", &values).await;
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    // The large model's first request and its four retries all fail (the fake's sleeps return at
    // once, so they come before the small model's request, number 6).
    for n in 1..=5 {
        provider.faults.borrow_mut().insert(n, ProviderError::Server { status: 503, message: "overloaded".into() });
    }
    let mut store = db.store(&config).await;
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-1", None).await.unwrap();
    let Outcome::Paused(report, cursor) = outcome else { panic!("an outage must pause the run: {outcome:?}") };
    assert!(error_hashes(&db).await.is_empty(), "an outage blames no value");
    assert_eq!(report.totals.errors, 0);
    assert!(report.stopped.as_deref().is_some_and(|s| s.contains("503")), "{report:?}");
    // The small model's answer is paid for: it is kept.
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache WHERE embedding_small IS NOT NULL").await, 2);

    // The next invocation goes on from the same batch and asks each model only for what it lacks.
    let before = provider.calls.borrow().len();
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-2", Some(&cursor)).await.unwrap();
    let Outcome::Finished(report) = outcome else { panic!("the run must finish: {outcome:?}") };
    assert_eq!(done_values(&db).await, set(&values));
    let small_again: usize = provider.calls.borrow()[before..].iter().filter(|(m, _)| m == SMALL).map(|(_, i)| i.len()).sum();
    assert_eq!(small_again, 2, "the small model is asked again only for the second batch");
    assert_eq!((report.totals.embedded, report.totals.errors), (4, 0), "{report:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn retry_after_is_honoured_in_full_within_the_budget() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["alpha"]).await;
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    provider
        .faults
        .borrow_mut()
        .insert(1, ProviderError::RateLimited { retry_after: Some(Duration::from_secs(45)), message: "slow down".into() });
    let mut store = db.store(&config).await;
    let began = *rt.now.borrow();
    let (report, _) = run_to_end(&config, &mut store, &provider, &rt, Budget::default()).await;
    assert_eq!(report.totals.embedded, 1);
    let waited = *rt.now.borrow() - began;
    assert!(waited >= 45_000.0, "the provider asked for 45 s, waited {waited} ms");
    assert_eq!(report.invocations, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_pacing_wait_past_the_budget_pauses_after_the_batch_instead() {
    let db = TestDb::create().await;
    let values = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
    db.source_table("items", "title", &values).await;
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    // Every answer says the window is used up for 300 s, in invocations of 60 s.
    *provider.rate.borrow_mut() = Some(RateLimit {
        limit_requests: None,
        limit_tokens: None,
        remaining_requests: Some(0),
        remaining_tokens: Some(0),
        reset_requests: Some(Duration::from_secs(300)),
        reset_tokens: Some(Duration::from_secs(300)),
    });
    let mut store = db.store(&config).await;
    let budget = Budget { max_ms: 60_000.0, ..Budget::default() };
    let began = *rt.now.borrow();
    let outcome = invoke(&config, &mut store, &provider, &rt, budget, "inv-1", None).await.unwrap();
    let Outcome::Paused(report, cursor) = outcome else { panic!("expected a pause: {outcome:?}") };
    assert_eq!(report.totals.embedded, 2, "the batch in hand is stored");
    assert!(*rt.now.borrow() - began < 60_000.0, "it must not wait past its budget");
    let (report, _) = {
        let hint = Some(cursor);
        let outcome = invoke(&config, &mut store, &provider, &rt, budget, "inv-2", hint.as_ref()).await.unwrap();
        match outcome {
            Outcome::Paused(r, _) => (r, ()),
            Outcome::Finished(r) => (r, ()),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(report.totals.embedded, 4, "the next invocation goes on with the next batch: {report:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn every_invocation_keeps_its_provider_requests_under_the_cap() {
    let db = TestDb::create().await;
    // Two poisoned values among 16 in one batch: isolating them takes many split requests.
    let mut values: Vec<String> = (0..14).map(|i| format!("good {i}")).collect();
    values.extend(["bad one".to_owned(), "bad two".to_owned()]);
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    db.source_table("items", "title", &refs).await;
    let config = config(16, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    *provider.poison.borrow_mut() = Some("bad".into());
    let mut store = db.store(&config).await;
    let budget = Budget { max_subrequests: 7, ..Budget::default() };
    let (report, requests) = run_to_end(&config, &mut store, &provider, &rt, budget).await;
    assert!(requests.iter().all(|&n| n <= 7), "requests per invocation: {requests:?}");
    assert!(requests.len() > 1, "the cap must have paused the run: {requests:?}");
    assert_eq!(done_values(&db).await, set(&refs[..14]));
    assert_eq!(error_hashes(&db).await, [hash_of("bad one"), hash_of("bad two")].into());
    assert_eq!(report.totals.errors, 2, "{report:?}");
    assert!(rt.messages().iter().any(|m| m.contains("7 provider requests (SYNC_MAX_SUBREQUESTS) are sent")), "{:#?}", rt.messages());
}

#[tokio::test(flavor = "current_thread")]
async fn a_run_that_reaches_its_token_budget_with_everything_done_is_finished_not_stopped() {
    let db = TestDb::create().await;
    // Four values of 4 bytes: 1 token each per model, so 8 tokens in all.
    db.source_table("items", "title", &["aaaa", "bbbb", "cccc", "dddd"]).await;
    let mut config = config(2, &[("Items", "items", "title")]);
    config.max_tokens_per_run = Some(8);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    let mut store = db.store(&config).await;
    let (report, _) = run_to_end(&config, &mut store, &provider, &rt, Budget::default()).await;
    assert_eq!(report.usage.large.prompt_tokens + report.usage.small.prompt_tokens, 8);
    assert_eq!(done_values(&db).await, set(&["aaaa", "bbbb", "cccc", "dddd"]));
    assert_eq!(report.stopped, None, "everything is done: the run is not stopped early");
}

#[tokio::test(flavor = "current_thread")]
async fn when_both_models_are_refused_the_run_ends_at_once() {
    let db = TestDb::create().await;
    let values: Vec<String> = (0..20).map(|i| format!("value {i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    db.source_table("items", "title", &refs).await;
    let config = config(2, &[("Items", "items", "title")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    for model in [LARGE, SMALL] {
        provider.refusals.borrow_mut().push(Refusal {
            model: Some(model.into()),
            input_contains: None,
            status: 404,
            body: model_not_found(model),
        });
    }
    let mut store = db.store(&config).await;
    let (report, requests) = run_to_end(&config, &mut store, &provider, &rt, Budget::default()).await;
    assert_eq!(requests, [2], "one request per model");
    assert!(error_hashes(&db).await.is_empty());
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache").await, 0);
    let stopped = report.stopped.unwrap_or_default();
    assert!(stopped.contains(LARGE) && stopped.contains(SMALL), "{stopped}");
    assert_eq!(report.totals.batches, 1, "the one batch sent");
}

/// An invocation in which the provider refuses every request of a model finishes a source and
/// pauses; the next invocation, with the model working again, finishes the run. The run reports
/// `stopped` with the refusal, whichever invocation finishes it: the values the first one left
/// without that model's embedding wait for the next run. (Before, the refusal was known only to
/// the invocation that saw it, and the run reported a clean finish: the simulation's
/// `pending-left-refused`, seeds 11 and 29.)
#[tokio::test(flavor = "current_thread")]
async fn a_refusal_in_an_earlier_invocation_stops_the_run_a_later_one_finishes() {
    let db = TestDb::create().await;
    db.source_table("items", "title", &["i1", "i2"]).await;
    db.source_table("notes", "body", &["n1", "n2"]).await;
    let config = config(2, &[("Items", "items", "title"), ("Notes", "notes", "body")]);
    let (provider, rt) = (FakeProvider::default(), TestRuntime::default());
    provider.refusals.borrow_mut().push(Refusal {
        model: Some(SMALL.into()),
        input_contains: None,
        status: 404,
        body: model_not_found(SMALL),
    });
    let mut store = db.store(&config).await;
    // Items' one batch uses the budget up: Items finishes (its stale values removed), and the
    // invocation pauses before Notes' first batch.
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget { max_batches: 1, ..Budget::default() }, "inv-1", None).await.unwrap();
    let Outcome::Paused(report, cursor) = outcome else { panic!("the first invocation should pause: {outcome:?}") };
    assert!(report.stopped.as_deref().unwrap_or_default().contains("refused the request itself"), "{:?}", report.stopped);
    assert_eq!(db.count("SELECT count(*) FROM embedding_sync_run_sources WHERE done").await, 1, "Items is done");

    provider.refusals.borrow_mut().clear();
    let outcome = invoke(&config, &mut store, &provider, &rt, Budget::default(), "inv-2", Some(&cursor)).await.unwrap();
    let Outcome::Finished(report) = outcome else { panic!("the second invocation should finish the run: {outcome:?}") };
    let stopped = report.stopped.clone().unwrap_or_default();
    assert!(
        stopped.contains("refused the request itself") && stopped.contains(SMALL),
        "the run must report the refusal: {:?}",
        report.stopped
    );
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE embedding_small IS NULL").await,
        2,
        "Items' values wait for the next run"
    );
    let stored: String = db
        .client
        .query_one("SELECT report->>'stopped' FROM embedding_sync_runs WHERE run_id = $1", &[&report.run_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, stopped, "the stored report says so too");
}
