//! Issue 4, the provider side: retries and pacing, fatal and permanent errors, base64 and
//! pgvector's binary format, model changes, cost estimates and the per-run token budget; and
//! Azure OpenAI (issue 9).
//!
//! Every test starts its own stack; faults come from the local provider's switches
//! (`/_admin/faults`, `--no-base64`), and the assertions read the provider's request log, the
//! database and the worker's log.

mod azure;
mod cost;
mod errors;
mod models;
mod retries;
mod vectors;

use std::collections::BTreeSet;

use embsync_e2e::*;
use serde_json::{json, Value};

/// An `EMBEDDING_SOURCES` JSON: the default models, `batch_size`, the sources, and `extra`
/// top-level fields (e.g. `maxTokensPerRun`, or `models` to replace the default models).
pub fn config_with(batch_size: u64, sources: &[Src], extra: Value) -> String {
    let mut doc: Value = serde_json::from_str(&sources_json(batch_size, sources)).unwrap();
    for (k, v) in extra.as_object().expect("extra must be an object") {
        doc[k] = v.clone();
    }
    doc.to_string()
}

/// The set of owned strings of `values`.
pub fn set_of(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|s| s.to_string()).collect()
}

/// The provider's log entries for `model`.
pub fn entries_for(provider: &Provider, model: &str) -> Vec<Value> {
    provider
        .requests()
        .into_iter()
        .filter(|r| r["model"] == model)
        .collect()
}

/// The inputs of the requests for `model` that the provider answered 200, sorted, with
/// repetitions.
pub fn ok_inputs(provider: &Provider, model: &str) -> Vec<String> {
    let mut v: Vec<String> = entries_for(provider, model)
        .iter()
        .filter(|r| r["status"] == 200)
        .flat_map(|r| r["inputs"].as_array().cloned().unwrap_or_default())
        .map(|x| x.as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

/// Every value of `values` was embedded successfully exactly once per model, and nothing else.
pub fn assert_each_embedded_once(provider: &Provider, values: &BTreeSet<String>) {
    let want: Vec<String> = values.iter().cloned().collect();
    for model in [LARGE_MODEL, SMALL_MODEL] {
        assert_eq!(
            ok_inputs(provider, model),
            want,
            "inputs the provider embedded successfully for {model} (each value exactly once)\nlog: {:#}",
            json!(provider.requests())
        );
    }
}

/// `embedding_cache` holds exactly `values`, each with both embeddings of the default sizes.
pub fn assert_cache_complete(db: &mut TestDb, values: &BTreeSet<String>) {
    assert_eq!(
        db.cache_hashes(),
        hashes_of(values),
        "embedding_cache hashes"
    );
    let bad = db.count(
        "SELECT count(*) FROM embedding_cache WHERE embedding_large IS NULL OR embedding_small IS NULL \
         OR vector_dims(embedding_large) <> 3072 OR vector_dims(embedding_small) <> 1536",
    );
    assert_eq!(
        bad, 0,
        "rows without both embeddings of 3072 and 1536 dimensions"
    );
}

/// The worker's log lines containing `needle`.
pub fn log_lines(worker: &Worker, needle: &str) -> Vec<String> {
    worker
        .logs()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A float field of a JSON object.
pub fn float(obj: &Value, key: &str) -> f64 {
    obj[key]
        .as_f64()
        .unwrap_or_else(|| panic!("field {key:?} missing or not a number in {obj:#}"))
}
