//! Azure OpenAI: a real sync against the local provider in Azure mode (`--azure`). Each model
//! goes to its own deployment with the key in an `api-key` header (never `Authorization`) and
//! `api-version` on every request (or the v1 API, `/openai/v1/embeddings` with the deployment
//! as `model`); a deployment the resource does not have gives an error that names it and the
//! fix; conflicting settings refuse to sync.

use embsync_e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

use super::*;

const VALUES: [&str; 5] = [
    "Thermal transfer printing, 203 dpi",
    "Cutter with catch tray",
    "Peel-off with liner take-up",
    "UHF RFID encoder (ETSI and FCC regions)",
    "Wireless LAN 802.11ac with Bluetooth 4.2",
];

const VERSION: &str = "2024-10-21";

/// A config whose models are served by these deployments.
fn config(large_deployment: &str, small_deployment: &str) -> String {
    config_with(
        2,
        &[OPTION],
        json!({"models": {
            "large": {"name": LARGE_MODEL, "deployment": large_deployment},
            "small": {"name": SMALL_MODEL, "deployment": small_deployment},
        }}),
    )
}

/// The provider in Azure mode with deployments `emb-large` and `emb-small`.
fn azure_provider() -> Provider {
    Provider::start_with(
        Some(API_KEY),
        &[
            "--azure-deployment",
            &format!("emb-large={LARGE_MODEL}"),
            "--azure-deployment",
            &format!("emb-small={SMALL_MODEL}"),
        ],
    )
}

/// Every stored vector is the one the model behind its column gives (`reference` is a plain
/// provider: the same deterministic vectors, asked the OpenAI way).
fn assert_vectors_are_the_models(db: &mut TestDb, reference: &Provider) {
    for v in VALUES {
        let (large, small) = db.embeddings_of(&expected_hash(v).unwrap());
        let large = parse_vector(&large.unwrap_or_else(|| panic!("no large embedding of {v:?}")));
        let small = parse_vector(&small.unwrap_or_else(|| panic!("no small embedding of {v:?}")));
        assert!(
            large == reference.embed_exact(LARGE_MODEL, v, None),
            "large vector of {v:?}"
        );
        assert!(
            small == reference.embed_exact(SMALL_MODEL, v, None),
            "small vector of {v:?}"
        );
    }
}

/// Every request carried the key in `api-key` and nothing in `Authorization`.
fn assert_azure_auth(log: &[Value]) {
    assert!(!log.is_empty(), "the provider got no requests");
    for r in log {
        assert_eq!(
            r["azure"]["apiKeyHeader"],
            json!(true),
            "api-key header: {r}"
        );
        assert_eq!(
            r["azure"]["authorizationHeader"],
            json!(false),
            "no Authorization header: {r}"
        );
        assert_eq!(r["authorized"], json!(true), "{r}");
    }
}

#[test]
fn a_sync_uses_each_models_deployment_the_api_key_header_and_the_api_version() {
    let mut db = db_with_options(&VALUES);
    let provider = azure_provider();
    let worker = Worker::start(
        WorkerOpts::new(&db, &provider)
            .sources(config("emb-large", "emb-small"))
            .azure(&provider, Some(VERSION)),
    );

    let report = worker.sync();
    assert_counts("sync", &report["totals"], &[("embedded", 5), ("errors", 0)]);

    let log = provider.requests();
    assert_azure_auth(&log);
    for r in &log {
        let deployment = match r["model"].as_str() {
            Some(LARGE_MODEL) => "emb-large",
            Some(SMALL_MODEL) => "emb-small",
            other => panic!("unexpected model {other:?}: {r}"),
        };
        assert_eq!(
            r["path"],
            json!(format!("/openai/deployments/{deployment}/embeddings")),
            "{r}"
        );
        assert_eq!(r["azure"]["deployment"], json!(deployment), "{r}");
        assert_eq!(
            r["azure"]["apiVersion"],
            json!(VERSION),
            "api-version on every request: {r}"
        );
        assert_eq!(r["status"], json!(200), "{r}");
    }
    assert_each_embedded_once(&provider, &set_of(&VALUES));
    assert_cache_complete(&mut db, &set_of(&VALUES));
    assert_vectors_are_the_models(&mut db, &Provider::start(Some(API_KEY)));
    assert!(!worker.logs().contains(API_KEY), "the key must not reach the worker's log");
}

#[test]
fn the_v1_api_names_the_deployment_in_model_and_deployments_default_to_the_model_names() {
    let mut db = db_with_options(&VALUES);
    // `--azure` alone: each model is a deployment of its own name.
    let provider = Provider::start_with(Some(API_KEY), &["--azure"]);
    let worker = Worker::start(
        WorkerOpts::new(&db, &provider)
            .sources(sources_json(2, &[OPTION]))
            .azure(&provider, None),
    );

    let report = worker.sync();
    assert_counts("sync", &report["totals"], &[("embedded", 5), ("errors", 0)]);

    let log = provider.requests();
    assert_azure_auth(&log);
    for r in &log {
        assert_eq!(r["path"], json!("/openai/v1/embeddings"), "{r}");
        assert_eq!(r["azure"]["deployment"], r["model"], "{r}");
        assert_eq!(
            r["azure"]["apiVersion"],
            Value::Null,
            "the v1 API takes no api-version: {r}"
        );
        assert_eq!(r["status"], json!(200), "{r}");
    }
    assert_each_embedded_once(&provider, &set_of(&VALUES));
    assert_cache_complete(&mut db, &set_of(&VALUES));
}

#[test]
fn a_deployment_the_resource_does_not_have_is_named_with_the_fix() {
    let mut db = db_with_options(&VALUES);
    let provider = azure_provider();
    let worker = Worker::start(
        WorkerOpts::new(&db, &provider)
            .sources(config("emb-lrage", "emb-small"))
            .azure(&provider, Some(VERSION)),
    );

    let (status, body) = worker.post("/sync", Some(TOKEN));

    let log = provider.requests();
    assert_azure_auth(&log);
    let (large, small): (Vec<&Value>, Vec<&Value>) = log
        .iter()
        .partition(|r| r["azure"]["deployment"] == "emb-lrage");
    assert!(!large.is_empty(), "the large model was asked for: {log:#?}");
    for r in &large {
        assert_eq!(r["status"], json!(404), "DeploymentNotFound: {r}");
    }
    for r in &small {
        assert_eq!(r["status"], json!(200), "the small deployment works: {r}");
    }
    // The message names the deployment, the model, Azure's code and the fix.
    let expected = format!(
        "has no deployment \"emb-lrage\" for model {LARGE_MODEL} (DeploymentNotFound: The API deployment for this resource does not exist."
    );
    let stopped = body["stopped"].as_str().unwrap_or_default();
    assert!(
        stopped.contains(&expected) && stopped.contains("set the model's \"deployment\" in the config"),
        "the run report should explain the missing deployment (sync -> {status}: {body})"
    );
    // The log says so too; warnings reach wrangler's log a moment after the response.
    let explained = |worker: &Worker| {
        worker.events().into_iter().any(|e| {
            let message = e["message"].as_str().unwrap_or_default();
            message.contains(&expected) && message.contains("set the model's \"deployment\" in the config")
        })
    };
    poll(Duration::from_secs(15), "the worker's log to explain the missing deployment", || explained(&worker).then_some(()));
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL"),
        0,
        "nothing is stored for the large model"
    );
}

#[test]
fn both_providers_configured_is_refused_with_what_to_set() {
    let db = db_with_options(&VALUES);
    let provider = azure_provider();
    let mut opts = WorkerOpts::new(&db, &provider).azure(&provider, Some(VERSION));
    opts.openai_base_url = "https://api.openai.com/v1".to_string();
    let worker = Worker::start(opts);

    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_ne!(status, 200, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT are both set"),
        "sync -> {status}: {body}"
    );
    assert!(provider.requests().is_empty(), "no request may go out");
}
