//! The hash contract on awkward text: backslashes, quotes, control characters, emoji, CJK,
//! padding; NULL and blank values skipped; values differing only by padding are one value.

use std::collections::BTreeSet;

use embsync_e2e::*;

/// Raw values for `config_option.description`.
const RAW: &[Option<&str>] = &[
    Some("back\\slash"),
    Some("C:\\temp\\new folder\\"),
    Some("\\x41\\x42 looks like bytea hex"),
    Some("\\\\ two backslashes"),
    Some("\\"),
    Some("it's"),
    Some("say \"hi\""),
    Some("'single' and \"double\" quotes"),
    Some("tab\there"),
    Some("line1\nline2"),
    Some("crlf\r\nend"),
    Some("emoji 😀🚀 and ZWJ 👩‍💻"),
    Some("漢字テスト 한국어 中文"),
    Some("  leading spaces"),
    Some("trailing spaces   "),
    Some("  both sides  "),
    Some("inner  double  spaces"),
    Some("x"),
    Some("  x "),
    Some("x   "),
    Some(" \t "),
    Some("\u{00A0}no-break space\u{00A0}"),
    None,
    Some(""),
    Some("     "),
];

#[test]
fn awkward_values_hash_exactly_as_the_contract_says() {
    let mut db = TestDb::create();
    db.create_default_sources();
    db.insert(OPTION.table, OPTION.column, RAW);
    let expected = distinct_trimmed(RAW);
    // The harness's own hash agrees with the SQL form of the contract on the raw source rows.
    let sql_hashes = db.text_set(
        "SELECT DISTINCT encode(sha256(convert_to(trim(description), 'UTF8')), 'hex') FROM config_option \
         WHERE description IS NOT NULL AND trim(description) <> ''",
    );
    assert_eq!(
        sql_hashes,
        hashes_of(&expected),
        "harness self-check: Rust hash vs SQL hash"
    );
    assert!(expected.contains("\t") && expected.contains("x") && !expected.contains("  x "));
    let n = expected.len() as i64;

    let (provider, worker) = start_stack(&db, None);
    let plan = worker.dry_run();
    assert_counts(
        "dry run",
        source_entry(&plan, OPTION.table),
        &[("total", n), ("new", n)],
    );
    let report = worker.sync();
    assert_counts(
        "sync",
        source_entry(&report, OPTION.table),
        &[("total", n), ("new", n), ("embedded", n), ("errors", 0)],
    );

    // value_hash = expected_hash(v) and value = trimmed v, for exactly the expected values.
    let stored: BTreeSet<(String, String)> = db.cache_values().into_iter().collect();
    let want: BTreeSet<(String, String)> = expected
        .iter()
        .map(|v| (expected_hash(v).unwrap(), v.clone()))
        .collect();
    let missing: Vec<_> = want.difference(&stored).collect();
    let extra: Vec<_> = stored.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "embedding_cache (hash, value) mismatch\nmissing: {missing:#?}\nunexpected: {extra:#?}"
    );
    assert_eq!(
        db.cache_hashes(),
        sql_hashes,
        "value_hash must equal encode(sha256(convert_to(trim(v),'UTF8')),'hex')"
    );
    let self_consistent =
        db.count("SELECT count(*) FROM embedding_cache WHERE value_hash <> encode(sha256(convert_to(value, 'UTF8')), 'hex')");
    assert_eq!(
        self_consistent, 0,
        "value_hash must be the hash of the stored (trimmed) value"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM embedding_cache WHERE value IS NULL OR trim(value) = ''"),
        0
    );

    // What was embedded is the trimmed text, each value once per model.
    for model in [LARGE_MODEL, SMALL_MODEL] {
        let mut sent = provider.inputs_for(model);
        sent.sort();
        let mut want_sent: Vec<String> = expected.iter().cloned().collect();
        want_sent.sort();
        assert_eq!(sent, want_sent, "inputs sent to {model}");
    }

    // More padding variants of known values are the same values: nothing new.
    db.insert(
        OPTION.table,
        OPTION.column,
        &[
            Some("back\\slash   "),
            Some("   x"),
            Some(" 漢字テスト 한국어 中文 "),
        ],
    );
    provider.clear();
    let again = worker.sync();
    assert_counts(
        "sync after padded duplicates",
        source_entry(&again, OPTION.table),
        &[("total", n), ("new", 0), ("stale", 0)],
    );
    assert!(provider.embedding_requests().is_empty());
}
