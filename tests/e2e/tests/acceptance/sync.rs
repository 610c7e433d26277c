//! A whole sync over HTTP: the report's numbers (returned and logged) and both embeddings
//! stored at their full dimensions. What a sync leaves in the database (new and stale values,
//! source tracking, free re-runs) is tested on the store tier, `crates/embsync-store/tests/driver.rs`.

use std::collections::BTreeSet;

use embsync_e2e::*;
use serde_json::{json, Value};

#[test]
fn both_embeddings_are_stored_with_3072_and_1536_dimensions() {
    let values = [
        "Panoramic roof",
        "Adaptive cruise control",
        "Lane keeping assist",
        "Rear camera",
        "Keyless entry",
    ];
    let mut db = db_with_options(&values);
    // Batches of 2: a misaligned batch would store a vector under the wrong value.
    let (provider, worker) = start_stack(&db, Some(sources_json(2, &DEFAULT_SOURCES)));
    worker.sync();

    let bad = db.count(
        "SELECT count(*) FROM embedding_cache WHERE embedding_large IS NULL OR embedding_small IS NULL \
         OR vector_dims(embedding_large) <> 3072 OR vector_dims(embedding_small) <> 1536",
    );
    assert_eq!(
        bad, 0,
        "every row needs both embeddings with 3072 and 1536 dimensions"
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache"), 5);
    let dims = db.text_set("SELECT vector_dims(embedding_large) || '/' || vector_dims(embedding_small) FROM embedding_cache");
    assert_eq!(dims, BTreeSet::from(["3072/1536".to_string()]));

    // What the worker asked for (model and dimensions), to ask the provider the same.
    let requests = provider.requests();
    let dims_asked = |model: &str| -> Option<u64> {
        requests
            .iter()
            .find(|r| r["model"] == model)
            .and_then(|b| b["dimensions"].as_u64())
    };
    let (large_dims, small_dims) = (dims_asked(LARGE_MODEL), dims_asked(SMALL_MODEL));
    for v in values {
        let (large, small) = db.embeddings_of(&expected_hash(v).unwrap());
        let large = parse_vector(&large.expect("embedding_large"));
        let small = parse_vector(&small.expect("embedding_small"));
        assert_eq!((large.len(), small.len()), (LARGE_DIMS, SMALL_DIMS));
        for (what, vector) in [("large", &large), ("small", &small)] {
            let n = norm(vector);
            assert!(
                (n - 1.0).abs() < 1e-3,
                "{what} embedding of {v:?} should have unit length, has {n}"
            );
        }
        let want_large = provider.embed(LARGE_MODEL, v, large_dims);
        let want_small = provider.embed(SMALL_MODEL, v, small_dims);
        for (what, got, want) in [
            ("large", &large, &want_large),
            ("small", &small, &want_small),
        ] {
            assert_eq!(got.len(), want.len(), "{what} of {v:?}: length");
            let worst = got
                .iter()
                .zip(want.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-6,
                "{what} embedding of {v:?} differs from the provider's by up to {worst}"
            );
        }
        assert_ne!(
            large[..8],
            small[..8],
            "large and small embeddings of {v:?} should come from different models"
        );
    }
}

#[test]
fn report_has_correct_numbers_per_source_and_in_totals() {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.insert_strs(
        OPTION,
        &[
            "Cup holder",
            "Ambient lighting",
            "Ambient lighting ",
            "Roof rails",
            "Ski bag",
            "Ashtray",
        ],
    );
    db.insert_strs(POSITION, &["Interior", "Exterior", "Comfort"]);
    let (provider, worker) = start_stack(&db, None);

    let first = worker.sync();
    assert_eq!(first["trigger"], json!("http"), "{first:#}");
    assert!(first["startedAt"].is_string(), "startedAt: {first:#}");
    assert!(first["durationMs"].is_number(), "durationMs: {first:#}");
    let zero_rest = |n: i64| {
        vec![
            ("total", n),
            ("new", n),
            ("stale", 0),
            ("unchanged", 0),
            ("reused", 0),
            ("embedded", n),
            ("deleted", 0),
            ("errors", 0),
        ]
    };
    assert_counts(
        "first: Option Descriptions",
        source_entry(&first, OPTION.table),
        &[zero_rest(5), vec![("batches", 1)]].concat(),
    );
    assert_counts(
        "first: Attribute Labels",
        source_entry(&first, POSITION.table),
        &[zero_rest(3), vec![("batches", 1)]].concat(),
    );
    assert_counts(
        "first: HTB Attribute Names",
        source_entry(&first, HTB.table),
        &[zero_rest(0), vec![("batches", 0)]].concat(),
    );
    assert_counts(
        "first: totals",
        &first["totals"],
        &[zero_rest(8), vec![("batches", 2)]].concat(),
    );
    for model in ["large", "small"] {
        assert!(
            first["usage"][model]["promptTokens"].as_i64().unwrap_or(0) > 0,
            "usage.{model}.promptTokens: {first:#}"
        );
    }
    for s in DEFAULT_SOURCES {
        let e = source_entry(&first, s.table);
        assert_eq!(e["name"], json!(s.name));
        assert_eq!(e["column"], json!(s.column));
        assert_eq!(e["error"], Value::Null, "{e:#}");
        assert!(e["durationMs"].is_number(), "{e:#}");
    }

    // Two new and one stale value in the first source, nothing in the second, one new in the third.
    db.insert_strs(OPTION, &["Tinted windows", "Sport pedals"]);
    assert_eq!(db.delete_exact(OPTION, &["Ashtray"]), 1);
    db.insert_strs(HTB, &["cup_holder_count"]);
    provider.clear();

    let second = worker.sync();
    assert_counts(
        "second: Option Descriptions",
        source_entry(&second, OPTION.table),
        &[
            ("total", 6),
            ("new", 2),
            ("stale", 1),
            ("unchanged", 4),
            ("reused", 0),
            ("embedded", 2),
            ("deleted", 1),
            ("errors", 0),
            ("batches", 1),
        ],
    );
    assert_counts(
        "second: Attribute Labels",
        source_entry(&second, POSITION.table),
        &[
            ("total", 3),
            ("new", 0),
            ("stale", 0),
            ("unchanged", 3),
            ("reused", 0),
            ("embedded", 0),
            ("deleted", 0),
            ("errors", 0),
            ("batches", 0),
        ],
    );
    assert_counts(
        "second: HTB Attribute Names",
        source_entry(&second, HTB.table),
        &[
            ("total", 1),
            ("new", 1),
            ("stale", 0),
            ("unchanged", 0),
            ("reused", 0),
            ("embedded", 1),
            ("deleted", 0),
            ("errors", 0),
            ("batches", 1),
        ],
    );
    assert_counts(
        "second: totals",
        &second["totals"],
        &[
            ("total", 10),
            ("new", 3),
            ("stale", 1),
            ("unchanged", 7),
            ("reused", 0),
            ("embedded", 3),
            ("deleted", 1),
            ("errors", 0),
            ("batches", 2),
        ],
    );
    let mut sent = provider.inputs_for(LARGE_MODEL);
    sent.sort();
    assert_eq!(
        sent,
        vec!["Sport pedals", "Tinted windows", "cup_holder_count"],
        "values sent to the large model"
    );

    worker.wait_for_log(
        "Source Option Descriptions: total=6 new=2 stale=1 unchanged=4 reused=0 embedded=2 deleted=1 errors=0 batches=1 deferred=0 (",
        std::time::Duration::from_secs(5),
    );
    let logged = poll(
        std::time::Duration::from_secs(5),
        "two `Sync report:` lines",
        || Some(worker.logged_reports()).filter(|r| r.len() >= 2),
    );
    assert_eq!(logged.len(), 2, "one `Sync report:` line per sync");
    assert_eq!(
        logged[1], second,
        "the logged report must be the one returned"
    );
}
