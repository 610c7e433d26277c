//! Vectors on the wire and in Postgres: base64 from the provider (with a fallback to floats for
//! servers without it), pgvector's binary format into the database, bit-exact end to end.

use std::collections::BTreeSet;

use embsync_e2e::*;
use serde_json::{json, Value};

use super::*;

const VALUES: [&str; 6] = [
    "Thermal transfer printing, 600 dpi",
    "Stainless steel washdown enclosure, IP65",
    "Asian font pack (Simplified and Traditional Chinese, Japanese, Korean)",
    "Wax ribbon, 110 mm × 450 m",
    "Quote \" and backslash \\ and 'apostrophe'",
    "ラベルプリンター 印刷幅 104 mm",
];

/// Every stored vector equals the provider's float32 vector bit for bit.
fn assert_vectors_exact(db: &mut TestDb, provider: &Provider, values: &[&str]) {
    for v in values {
        let (large, small) = db.embeddings_of(&expected_hash(v).unwrap());
        for (model, dims, text) in [
            (LARGE_MODEL, LARGE_DIMS, large),
            (SMALL_MODEL, SMALL_DIMS, small),
        ] {
            let got =
                parse_vector(&text.unwrap_or_else(|| panic!("no {model} embedding of {v:?}")));
            let want = provider.embed_exact(model, v, None);
            assert_eq!(got.len(), dims, "{model} of {v:?}");
            let differ: Vec<usize> = (0..dims)
                .filter(|&i| got[i].to_bits() != want[i].to_bits())
                .collect();
            assert!(
                differ.is_empty(),
                "{model} embedding of {v:?} differs from the provider's in {} of {dims} components, \
                 e.g. [{}] stored {} vs provider {}",
                differ.len(),
                differ[0],
                got[differ[0]],
                want[differ[0]]
            );
        }
    }
}

#[test]
fn stored_vectors_equal_the_providers_float32_values_exactly() {
    let mut db = db_with_options(&VALUES);
    let (provider, worker) = start_stack(&db, Some(sources_json(4, &[OPTION])));
    let report = worker.sync();
    assert_counts(
        "sync",
        source_entry(&report, OPTION.table),
        &[("embedded", 6), ("errors", 0)],
    );
    // The worker asked for base64 every time.
    let log = provider.requests();
    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(r["encodingFormat"], json!("base64"), "{r}");
    }
    assert_vectors_exact(&mut db, &provider, &VALUES);
}

#[test]
fn a_server_without_base64_gets_floats_and_the_same_vectors() {
    let mut db = db_with_options(&VALUES);
    let provider = Provider::start_with(Some(API_KEY), &["--no-base64"]);
    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(sources_json(2, &[OPTION])));

    let report = worker.sync();
    assert_counts(
        "sync against a float-only server",
        source_entry(&report, OPTION.table),
        &[
            ("total", 6),
            ("new", 6),
            ("embedded", 6),
            ("errors", 0),
            ("batches", 3),
        ],
    );
    assert_eq!(report["totals"]["errors"], json!(0));
    let log = provider.requests();
    // Batch 1's two requests (large and small, sent together) asked for base64 and were
    // refused, each resent at once as float; every other request asked for float. (The two
    // first requests may interleave with each other's resend, so order is not checked.)
    let base64: Vec<&Value> = log
        .iter()
        .filter(|r| r["encodingFormat"] == "base64")
        .collect();
    assert!(
        !base64.is_empty() && base64.len() <= 2,
        "base64 only until refused: {log:#?}"
    );
    let models: BTreeSet<&str> = base64.iter().filter_map(|r| r["model"].as_str()).collect();
    assert_eq!(
        models.len(),
        base64.len(),
        "at most one base64 request per model: {log:#?}"
    );
    for r in &base64 {
        assert_eq!(r["status"], json!(400), "{r}");
        assert_eq!(r["fault"], json!("rejectBase64"), "{r}");
        let resent = log.iter().any(|f| {
            f["encodingFormat"] == "float"
                && f["seq"].as_u64() > r["seq"].as_u64()
                && f["model"] == r["model"]
                && f["inputs"] == r["inputs"]
        });
        assert!(resent, "the refused request was not resent as float: {r}");
    }
    let float: Vec<&Value> = log
        .iter()
        .filter(|r| r["encodingFormat"] == "float")
        .collect();
    assert_eq!(float.len() + base64.len(), log.len(), "{log:#?}");
    assert_eq!(float.len(), 6, "3 batches x 2 models, all float: {log:#?}");
    for r in &float {
        assert_eq!(r["status"], json!(200), "{r}");
    }
    assert_each_embedded_once(&provider, &set_of(&VALUES));
    worker.wait_for_log(
        "does not take encoding_format=base64",
        std::time::Duration::from_secs(5),
    );
    assert_cache_complete(&mut db, &set_of(&VALUES));

    // The float vectors, parsed by the worker and stored in binary, equal the provider's
    // float32 values. (`embed_exact` asks in base64, which this server refuses: ask a second
    // provider, whose vectors are the same functions of model and input.)
    let reference = Provider::start(Some(API_KEY));
    assert_vectors_exact(&mut db, &reference, &VALUES);
}
