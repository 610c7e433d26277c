//! The sync itself: NEW and STALE detection, stored embeddings, source tracking, idempotent
//! re-runs and the report's numbers.

use std::collections::BTreeSet;

use embsync_e2e::*;
use serde_json::{json, Value};

/// Raw column values per default source (with duplicates, padding, NULL and blanks).
fn sample_values() -> [(Src, Vec<Option<&'static str>>); 3] {
    [
        (
            OPTION,
            vec![
                Some("Red leather seats"),
                Some("  Red leather seats "),
                Some("Sunroof"),
                Some("Sunroof"),
                Some("Heated steering wheel"),
                None,
                Some(""),
                Some("   "),
                Some("Tow hitch"),
            ],
        ),
        (
            POSITION,
            vec![
                Some("Color"),
                Some("Trim level"),
                Some("Engine"),
                Some("Color "),
            ],
        ),
        (HTB, vec![Some("Body style"), Some("Drive type")]),
    ]
}

fn insert_samples(db: &mut TestDb) -> Vec<(Src, BTreeSet<String>)> {
    db.create_default_sources();
    sample_values()
        .iter()
        .map(|(src, values)| {
            db.insert(src.table, src.column, values);
            (*src, distinct_trimmed(values))
        })
        .collect()
}

/// The hashes `embedding_cache_sources` records for one source.
fn recorded_for(db: &mut TestDb, src: Src) -> BTreeSet<String> {
    db.client()
        .query(
            "SELECT value_hash FROM embedding_cache_sources WHERE source_table = $1 AND source_column = $2",
            &[&src.table, &src.column],
        )
        .expect("select embedding_cache_sources")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every embedding_cache row's (id, value_hash), in id order: equal before and after a re-run
/// when nothing was rewritten.
fn cache_ids(db: &mut TestDb) -> Vec<(i64, String)> {
    db.client()
        .query(
            "SELECT id, value_hash FROM embedding_cache ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn new_values_are_detected_on_fresh_sources() {
    let mut db = TestDb::create();
    let expected = insert_samples(&mut db);
    let (provider, worker) = start_stack(&db, None);

    let plan = worker.dry_run();
    let mut all = BTreeSet::new();
    for (src, values) in &expected {
        let n = values.len() as i64;
        assert_counts(
            &format!("dry run of {}", src.name),
            source_entry(&plan, src.table),
            &[
                ("total", n),
                ("new", n),
                ("stale", 0),
                ("unchanged", 0),
                ("reusable", 0),
                ("toEmbed", n),
                ("batches", 1),
            ],
        );
        all.extend(values.iter().cloned());
    }
    let n_all = all.len() as i64;
    assert_counts(
        "dry run totals",
        &plan["totals"],
        &[("total", 9), ("new", 9), ("toEmbed", n_all), ("batches", 3)],
    );
    for model in ["large", "small"] {
        assert!(
            plan["totals"]["estimatedTokens"][model]
                .as_i64()
                .unwrap_or(0)
                > 0,
            "estimated tokens for {model} should be > 0: {plan:#}"
        );
    }
    assert!(
        provider.embedding_requests().is_empty(),
        "the dry run must not call the provider"
    );
    assert_eq!(db.cache_count(), 0, "the dry run must not write cache rows");

    let report = worker.sync();
    for (src, values) in &expected {
        let n = values.len() as i64;
        let entry = source_entry(&report, src.table);
        assert_counts(
            &format!("sync of {}", src.name),
            entry,
            &[
                ("total", n),
                ("new", n),
                ("stale", 0),
                ("unchanged", 0),
                ("embedded", n),
                ("deleted", 0),
                ("errors", 0),
            ],
        );
        assert_eq!(entry["error"], Value::Null, "{entry:#}");
        assert_eq!(
            recorded_for(&mut db, *src),
            hashes_of(values),
            "embedding_cache_sources for {}",
            src.name
        );
        worker.wait_for_log(
            &format!("Source {}: total={n} new={n} stale=0 unchanged=0 reused=0 embedded={n} deleted=0 errors=0 batches=1 deferred=0 (", src.name),
            std::time::Duration::from_secs(5),
        );
    }
    assert_eq!(
        db.cache_hashes(),
        hashes_of(&all),
        "embedding_cache must hold exactly the new values"
    );
    let stored: BTreeSet<String> = db.cache_values().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        stored, all,
        "embedding_cache.value must be the trimmed values"
    );
}

#[test]
fn stale_values_are_detected_after_deleting_source_rows() {
    let values = [
        "alpha", "beta", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", " theta ",
    ];
    let mut db = db_with_options(&values);
    let (provider, worker) = start_stack(&db, None);
    let first = worker.sync();
    assert_counts(
        "first sync",
        source_entry(&first, OPTION.table),
        &[("total", 8), ("new", 8)],
    );

    // Three distinct values disappear; " theta " goes but "theta" stays, so theta is not stale.
    let gone = ["beta", "gamma", "delta"];
    let removed = db.delete_exact(OPTION, &["beta", "gamma", "delta", " theta "]);
    assert_eq!(removed, 5);
    provider.clear();

    let plan = worker.dry_run();
    assert_counts(
        "dry run after delete",
        source_entry(&plan, OPTION.table),
        &[
            ("total", 5),
            ("new", 0),
            ("stale", 3),
            ("unchanged", 5),
            ("toEmbed", 0),
        ],
    );
    assert_eq!(db.cache_count(), 8, "the dry run must not delete anything");

    let report = worker.sync();
    assert_counts(
        "sync after delete",
        source_entry(&report, OPTION.table),
        &[
            ("total", 5),
            ("new", 0),
            ("stale", 3),
            ("unchanged", 5),
            ("embedded", 0),
            ("deleted", 3),
            ("errors", 0),
        ],
    );
    let left = db.cache_hashes();
    for v in gone {
        assert!(
            !left.contains(&expected_hash(v).unwrap()),
            "{v:?} should be deleted from embedding_cache"
        );
    }
    let kept: Vec<String> = ["alpha", "epsilon", "zeta", "eta", "theta"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(left, hashes_of(&kept));
    assert!(
        provider.embedding_requests().is_empty(),
        "deleting needs no provider call"
    );
}

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
fn distinct_source_table_and_column_list_every_source() {
    let mut db = db_with_options(&["Alloy wheels", "Fog lights"]);
    db.insert_strs(POSITION, &["Wheel size", "Lighting"]);
    db.insert_strs(HTB, &["wheel_diameter_inch"]);
    let (_provider, worker) = start_stack(&db, None);
    worker.sync();

    let pairs: BTreeSet<(String, String)> = db
        .client()
        .query(
            "SELECT DISTINCT source_table, source_column FROM embedding_cache",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: BTreeSet<(String, String)> = DEFAULT_SOURCES
        .iter()
        .map(|s| (s.table.to_string(), s.column.to_string()))
        .collect();
    assert_eq!(pairs, expected);
    // And each row is attributed to the source that has it.
    let option_rows = db.text_set("SELECT value FROM embedding_cache WHERE source_table = 'config_option' AND source_column = 'description'");
    assert_eq!(
        option_rows,
        BTreeSet::from(["Alloy wheels".to_string(), "Fog lights".to_string()])
    );
}

#[test]
fn immediate_rerun_reports_nothing_new_and_calls_no_provider() {
    let mut db = TestDb::create();
    insert_samples(&mut db);
    let (provider, worker) = start_stack(&db, None);
    let first = worker.sync();
    assert_counts(
        "first sync totals",
        &first["totals"],
        &[("new", 9), ("embedded", 9)],
    );
    assert!(
        !provider.embedding_requests().is_empty(),
        "the first sync must call the provider"
    );
    let rows_before = cache_ids(&mut db);
    provider.clear();

    let second = worker.sync();
    for s in DEFAULT_SOURCES {
        let e = source_entry(&second, s.table);
        let total = num(e, "total");
        assert_counts(
            &format!("re-run of {}", s.name),
            e,
            &[
                ("new", 0),
                ("stale", 0),
                ("unchanged", total),
                ("embedded", 0),
                ("deleted", 0),
                ("errors", 0),
                ("batches", 0),
            ],
        );
    }
    assert_counts(
        "re-run totals",
        &second["totals"],
        &[
            ("total", 9),
            ("new", 0),
            ("stale", 0),
            ("unchanged", 9),
            ("embedded", 0),
        ],
    );
    assert!(
        provider.embedding_requests().is_empty(),
        "re-run called the provider: {:?}",
        provider.embedding_requests()
    );

    let plan = worker.dry_run();
    assert_counts(
        "dry run after re-run",
        &plan["totals"],
        &[("new", 0), ("stale", 0), ("toEmbed", 0), ("batches", 0)],
    );

    // The cron path is the same sync: also nothing to do.
    let reports_before = worker.logged_reports().len();
    worker.scheduled();
    let cron = poll(
        std::time::Duration::from_secs(60),
        "a cron `Sync report:` log line",
        || {
            worker
                .logged_reports()
                .into_iter()
                .skip(reports_before)
                .find(|r| r["trigger"] == "cron")
        },
    );
    assert_counts(
        "cron re-run totals",
        &cron["totals"],
        &[("new", 0), ("stale", 0), ("embedded", 0)],
    );
    assert!(
        provider.embedding_requests().is_empty(),
        "cron re-run called the provider"
    );

    let rows_after = cache_ids(&mut db);
    assert_eq!(rows_before, rows_after, "a re-run must not rewrite rows");
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
