//! A value present in two sources is embedded once, kept while any source has it, and deleted
//! when none has it any more.

use std::collections::BTreeSet;

use embsync_e2e::*;

fn sources_having(db: &mut TestDb, hash: &str) -> BTreeSet<(String, String)> {
    db.client()
        .query(
            "SELECT source_table, source_column FROM embedding_cache_sources WHERE value_hash = $1",
            &[&hash],
        )
        .expect("select embedding_cache_sources")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn shared_value_is_embedded_once_and_kept_while_any_source_has_it() {
    let mut db = TestDb::create();
    db.create_default_sources();
    let shared = "Shared value";
    let hash = expected_hash(shared).unwrap();
    db.insert_strs(OPTION, &[shared, "Only in options"]);
    db.insert_strs(POSITION, &["  Shared value ", "Only in positions"]);
    let (provider, worker) = start_stack(&db, None);

    let first = worker.sync();
    assert_counts(
        "first sync: options",
        source_entry(&first, OPTION.table),
        &[("total", 2), ("new", 2)],
    );
    assert_counts(
        "first sync: positions",
        source_entry(&first, POSITION.table),
        &[("total", 2), ("new", 2)],
    );
    assert_counts(
        "first sync totals",
        &first["totals"],
        &[("embedded", 3), ("errors", 0)],
    );
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let n = provider
            .inputs_for(model)
            .iter()
            .filter(|v| v.as_str() == shared)
            .count();
        assert_eq!(
            n, 1,
            "{shared:?} should be sent to {model} exactly once, was {n} times"
        );
        assert_eq!(
            provider.inputs_for(model).len(),
            3,
            "three distinct values for {model}"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM embedding_cache"), 3);
    assert_eq!(
        sources_having(&mut db, &hash),
        BTreeSet::from([
            (OPTION.table.to_string(), OPTION.column.to_string()),
            (POSITION.table.to_string(), POSITION.column.to_string())
        ]),
        "embedding_cache_sources should link the shared value to both sources"
    );
    let id_before: i64 = db
        .client()
        .query_one(
            "SELECT id FROM embedding_cache WHERE value_hash = $1",
            &[&hash],
        )
        .unwrap()
        .get(0);

    // A third source gets a value that is already embedded: reused, no provider call.
    provider.clear();
    db.insert_strs(HTB, &["Only in options"]);
    let reuse = worker.sync();
    assert_counts(
        "sync with a value already embedded for another source",
        source_entry(&reuse, HTB.table),
        &[("new", 1), ("reused", 1), ("embedded", 0)],
    );
    assert!(
        provider.embedding_requests().is_empty(),
        "a value already embedded must not be paid for again"
    );

    // Gone from one source: stale there, but the row survives.
    assert_eq!(db.delete_exact(OPTION, &[shared]), 1);
    let second = worker.sync();
    assert_counts(
        "after deleting from options",
        source_entry(&second, OPTION.table),
        &[("stale", 1), ("deleted", 0)],
    );
    assert_counts(
        "after deleting from options: totals",
        &second["totals"],
        &[("stale", 1), ("deleted", 0)],
    );
    let id_after: i64 = db
        .client()
        .query_opt(
            "SELECT id FROM embedding_cache WHERE value_hash = $1",
            &[&hash],
        )
        .unwrap()
        .unwrap_or_else(|| panic!("{shared:?} was deleted although config_position still has it"))
        .get(0);
    assert_eq!(id_before, id_after, "the shared row must be kept as it is");
    let (large, small) = db.embeddings_of(&hash);
    assert!(
        large.is_some() && small.is_some(),
        "the shared row keeps both embeddings"
    );
    assert_eq!(
        sources_having(&mut db, &hash),
        BTreeSet::from([(POSITION.table.to_string(), POSITION.column.to_string())])
    );

    // Gone from both: deleted.
    assert_eq!(db.delete_exact(POSITION, &["  Shared value "]), 1);
    let third = worker.sync();
    assert_counts(
        "after deleting from positions",
        source_entry(&third, POSITION.table),
        &[("stale", 1), ("deleted", 1)],
    );
    assert!(
        !db.cache_hashes().contains(&hash),
        "{shared:?} should be deleted once no source has it"
    );
    assert!(sources_having(&mut db, &hash).is_empty());
    assert!(
        provider.embedding_requests().is_empty(),
        "none of these syncs needed the provider"
    );
}
