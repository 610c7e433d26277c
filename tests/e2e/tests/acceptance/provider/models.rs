//! Model changes: switching `small` to `dimensions: 512` re-embeds only the small column of
//! embsync's rows; a column whose declared size does not fit the config stops the run.

use embsync_e2e::*;
use serde_json::json;

use super::*;

const VALUES: [&str; 5] = [
    "Thermal transfer printing, 300 dpi",
    "Rotary cutter for continuous media",
    "HF RFID encoder, ISO 15693 and NFC",
    "Colour touch display 4.3\"",
    "Heated enclosure for cold-storage use down to –20 °C",
];

/// A digest of every row's vectors (as text) per column, to show a column was not touched.
fn column_digest(db: &mut TestDb, column: &str) -> String {
    let row = db
        .client()
        .query_one(
            &format!(
                "SELECT md5(string_agg(value_hash || '=' || coalesce({column}::text, 'NULL'), ';' ORDER BY value_hash)) FROM embedding_cache"
            ),
            &[],
        )
        .unwrap();
    row.get(0)
}

fn small_dims(db: &mut TestDb) -> std::collections::BTreeSet<String> {
    db.text_set("SELECT coalesce(vector_dims(embedding_small)::text, 'NULL') FROM embedding_cache")
}

/// Every small vector equals the provider's 512-dimension embedding of its value, exactly.
fn assert_small_is_512(db: &mut TestDb, provider: &Provider) {
    for v in VALUES {
        let (_, small) = db.embeddings_of(&expected_hash(v).unwrap());
        let got = parse_vector(&small.unwrap_or_else(|| panic!("no small embedding of {v:?}")));
        let want = provider.embed_exact(SMALL_MODEL, v, Some(512));
        assert_eq!(got.len(), 512, "{v:?}");
        assert!(
            got == want,
            "small embedding of {v:?} is not the provider's 512-d vector"
        );
    }
}

/// Only the small model was asked, with 512 dimensions, for each value exactly once.
fn assert_only_small_512_requested(provider: &Provider) {
    let log = provider.requests();
    assert!(!log.is_empty(), "the small column must be re-embedded");
    for r in &log {
        assert_eq!(
            r["model"],
            json!(SMALL_MODEL),
            "only the small model may be asked: {r}"
        );
        assert_eq!(r["dimensions"], json!(512), "{r}");
        assert_eq!(r["status"], json!(200), "{r}");
    }
    let mut inputs = ok_inputs(provider, SMALL_MODEL);
    inputs.dedup();
    assert_eq!(
        inputs.len(),
        ok_inputs(provider, SMALL_MODEL).len(),
        "each value once"
    );
    assert_eq!(inputs, set_of(&VALUES).into_iter().collect::<Vec<_>>());
}

/// The run re-embedded the small column, and only it: only the small model was asked (at 512
/// dimensions), every small vector is its 512-d embedding, and the large column is unchanged
/// (its digest is still `large_before`).
fn assert_only_small_re_embedded(db: &mut TestDb, provider: &Provider, large_before: &str) {
    assert_only_small_512_requested(provider);
    assert_eq!(
        small_dims(db),
        std::collections::BTreeSet::from(["512".to_string()])
    );
    assert_small_is_512(db, provider);
    assert_eq!(
        column_digest(db, "embedding_large"),
        large_before,
        "large vectors must not change"
    );
}

#[test]
fn switching_small_to_512_dimensions_re_embeds_only_the_small_column() {
    let mut db = db_with_options(&VALUES);
    let provider = Provider::start(Some(API_KEY));
    let cfg_1536 = sources_json(2, &[OPTION]);
    let cfg_512 = config_with(
        2,
        &[OPTION],
        json!({"models": {"large": LARGE_MODEL, "small": {"name": SMALL_MODEL, "dimensions": 512}}}),
    );

    // The first config: both models at their full size.
    {
        let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(cfg_1536));
        let report = worker.sync();
        assert_counts(
            "first sync",
            &report["totals"],
            &[("embedded", 5), ("errors", 0)],
        );
    }
    assert_cache_complete(&mut db, &set_of(&VALUES));
    let tags = db.text_set("SELECT large_model || '/' || small_model FROM embedding_cache_owned");
    assert_eq!(
        tags,
        std::collections::BTreeSet::from([format!("{LARGE_MODEL}/{SMALL_MODEL}")])
    );
    let large_before = column_digest(&mut db, "embedding_large");
    let small_before = column_digest(&mut db, "embedding_small");

    let worker = Worker::start(WorkerOpts::new(&db, &provider).sources(cfg_512));

    // The column is still vector(1536): the run stops with the documented message.
    provider.clear();
    let (status, body) = worker.post("/sync", Some(TOKEN));
    assert_eq!(status, 502, "a 1536-d column with a 512-d config: {body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "embedding_cache.embedding_small is vector(1536) but models.small ({SMALL_MODEL}) makes 512 dimensions"
        )) && error.contains("ALTER TABLE embedding_cache ALTER COLUMN embedding_small TYPE vector(512)"),
        "{error}"
    );
    assert!(
        provider.requests().is_empty(),
        "nothing may be sent: {:#?}",
        provider.requests()
    );
    assert_eq!(column_digest(&mut db, "embedding_large"), large_before);
    assert_eq!(
        column_digest(&mut db, "embedding_small"),
        small_before,
        "nothing may be written"
    );

    // An unconstrained column keeps the old 1536-d vectors: the run replaces each with a 512-d
    // one, asking only the small model, and leaves the large column alone.
    db.exec("ALTER TABLE embedding_cache ALTER COLUMN embedding_small TYPE vector");
    let plan = worker.dry_run();
    assert_counts(
        "dry run after the switch",
        source_entry(&plan, OPTION.table),
        &[("new", 5), ("toEmbed", 5)],
    );
    assert_eq!(
        plan["models"]["small"]["dimensions"],
        json!(512),
        "{plan:#}"
    );
    let report = worker.sync();
    assert_counts(
        "sync after the switch",
        source_entry(&report, OPTION.table),
        &[("total", 5), ("new", 5), ("embedded", 5), ("errors", 0)],
    );
    assert_eq!(report["usage"]["large"]["requests"], json!(0), "{report:#}");
    assert_only_small_re_embedded(&mut db, &provider, &large_before);
    let tags = db.text_set("SELECT large_model || '/' || small_model FROM embedding_cache_owned");
    assert_eq!(
        tags,
        std::collections::BTreeSet::from([format!("{LARGE_MODEL}/{SMALL_MODEL}:512")])
    );

    // Nothing left to do.
    provider.clear();
    let report = worker.sync();
    assert_counts(
        "re-run",
        source_entry(&report, OPTION.table),
        &[("new", 0), ("embedded", 0)],
    );
    assert!(provider.requests().is_empty());

    // A matching vector(512) column whose vectors were dropped (USING NULL): the small
    // embeddings are made again, and only they.
    db.exec("ALTER TABLE embedding_cache ALTER COLUMN embedding_small TYPE vector(512) USING NULL");
    provider.clear();
    let report = worker.sync();
    assert_counts(
        "sync after ALTER ... vector(512) USING NULL",
        source_entry(&report, OPTION.table),
        &[("new", 5), ("embedded", 5), ("errors", 0)],
    );
    assert_only_small_re_embedded(&mut db, &provider, &large_before);
}
