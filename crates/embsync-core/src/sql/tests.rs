use super::*;
use crate::config::Config;
use expect_test::expect;

fn source() -> Source {
    let json = r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
        "sources":[{"name":"A","table":"app.Items","column":"title"}]}"#;
    Config::parse(json).unwrap().sources.remove(0)
}

#[test]
fn migration_sql() {
    let config = Config::parse(
        r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
        "sources":[{"name":"A","table":"a","column":"b"}]}"#,
    )
    .unwrap();
    let locks = |existed| migration(&config.models, existed).iter().map(|s| s.locks).collect::<Vec<_>>().join(", ");
    // On a cache that exists (maybe another pipeline's) no step names it: it is only read.
    expect!["the vector extension, embedding_cache_sources, embedding_cache_owned, embedding_cache_owned, embedding_sync_errors, embedding_sync_runs, embedding_sync_run_sources, embedding_sync_pending, embedding_sync_orphans, embedding_sync_lease, embedding_sync_ranges, embsync's change capture tables, embedding_sync_batches, embedding_sync_run_sources, embedding_sync_runs, embedding_sync_schema"].assert_eq(&locks(true));
    expect!["the vector extension, embedding_cache, embedding_cache_sources, embedding_cache_owned, embedding_cache_owned, embedding_sync_errors, embedding_sync_runs, embedding_sync_run_sources, embedding_sync_pending, embedding_sync_orphans, embedding_sync_lease, embedding_sync_ranges, embsync's change capture tables, embedding_sync_batches, embedding_sync_run_sources, embedding_sync_runs, embedding_sync_schema"].assert_eq(&locks(false));
    assert!(migration(&config.models, false)[1].sql.contains("embedding_large vector(3072),\n    embedding_small vector(1536)"));
    assert!(!migration(&config.models, true).iter().any(|s| s.sql.contains("INDEX") && s.sql.contains("ON embedding_cache ")));
    expect![[r#"
        UPDATE embedding_cache_owned o SET cache_id = c.id
        FROM embedding_cache c
        WHERE o.cache_id IS NULL AND c.value_hash = o.value_hash AND c.created_at = o.created_at AND c.id IS NOT NULL;
        DELETE FROM embedding_cache_owned WHERE cache_id IS NULL;
        ALTER TABLE embedding_cache_owned ALTER COLUMN cache_id SET NOT NULL"#]]
    .assert_eq(CLAIM_OWNED_ROWS);
    expect!["SET LOCAL lock_timeout = '5s'"].assert_eq(&migration_lock_timeout());
    let shape = |unique, id| check_cache_shape(unique, id).err().unwrap_or_default();
    expect!["embedding_cache has no unique index on value_hash, which embsync needs to insert rows: create it (CREATE UNIQUE INDEX CONCURRENTLY embedding_cache_value_hash_key ON embedding_cache (value_hash)); embsync does not build indexes on a table it did not create"].assert_eq(&shape(false, Some("bigint")));
    expect!["embedding_cache has no id column, which embsync records the rows it inserted by: add one (ALTER TABLE embedding_cache ADD COLUMN id bigserial)"].assert_eq(&shape(true, None));
    expect![
        "embedding_cache.id is uuid, but embsync records the rows it inserted by an integer id: use a bigint id (id bigserial PRIMARY KEY)"
    ]
    .assert_eq(&shape(true, Some("uuid")));
    expect![""].assert_eq(&shape(true, Some("integer")));
}

#[test]
fn plan_sql() {
    let full = SchemaState { cache: true, links: true, owned_by_row: true };
    expect![[r#"
        WITH src AS MATERIALIZED (
            SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
            FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
            WHERE d.v <> ''
        ),
        fresh AS MATERIALIZED (
            SELECT s.h, s.v, ((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))) AS complete
            FROM src s
            LEFT JOIN embedding_cache c ON c.value_hash = s.h
            LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.cache_id = c.id
            WHERE NOT (((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))) AND EXISTS (SELECT 1 FROM embedding_cache_sources l
                         WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))
        )
        SELECT
            (SELECT count(*) FROM src) AS total,
            (SELECT count(*) FROM fresh) AS new,
            (SELECT count(*) FROM fresh WHERE complete) AS reusable,
            (SELECT coalesce(sum((19 * octet_length(v)::int8 - 9 * char_length(v) + 39) / 40), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,
            (SELECT count(*) FROM embedding_cache_sources l
             WHERE l.source_table = $1 AND l.source_column = $2
               AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)) AS stale,
            (SELECT count(*) FROM fresh f JOIN embedding_sync_errors e
               ON e.source_table = $1 AND e.source_column = $2 AND e.value_hash = f.h
             WHERE e.next_retry_at > now() AND NOT f.complete) AS deferred"#]].assert_eq(&plan(&source(), full));
    let fresh = SchemaState { cache: false, links: false, owned_by_row: false };
    expect![[r#"
        WITH src AS MATERIALIZED (
            SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
            FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
            WHERE d.v <> ''
        ),
        fresh AS MATERIALIZED (
            SELECT s.h, s.v, false AS complete FROM src s WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL
              AND $3::text IS NOT NULL AND $4::text IS NOT NULL
        )
        SELECT
            (SELECT count(*) FROM src) AS total,
            (SELECT count(*) FROM fresh) AS new,
            (SELECT count(*) FROM fresh WHERE complete) AS reusable,
            (SELECT coalesce(sum((19 * octet_length(v)::int8 - 9 * char_length(v) + 39) / 40), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,
            (SELECT 0::int8) AS stale,
            (SELECT 0::int8) AS deferred"#]]
    .assert_eq(&plan(&source(), fresh));
    // A deployment not yet migrated to ownership by row (a dry run before the first sync).
    let legacy = SchemaState { cache: true, links: true, owned_by_row: false };
    assert!(plan(&source(), legacy).contains("LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h\n"));
}

#[test]
fn source_sql() {
    expect![[r#"
        WITH src AS (
            SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
            FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
            WHERE d.v <> ''
        ),
        linked AS (
            INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)
            SELECT s.h, $1, $2 FROM src s
            LEFT JOIN embedding_cache c ON c.value_hash = s.h
            LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.cache_id = c.id
            WHERE ((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)))
            ON CONFLICT DO NOTHING
            RETURNING value_hash
        ),
        cleared AS (
            DELETE FROM embedding_sync_errors e USING linked
            WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = linked.value_hash
        )
        SELECT count(*)::int8 FROM linked"#]].assert_eq(&link_reusable(&source()));
    expect![[r#"
        WITH src AS (
            SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
            FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
            WHERE d.v <> ''
        )
        SELECT s.h, s.v, s.n, (coalesce((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'large' AND b.model = $3)) AS has_large, (coalesce((c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'small' AND b.model = $4)) AS has_small
        FROM src s
        LEFT JOIN embedding_cache c ON c.value_hash = s.h
            LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.cache_id = c.id
        WHERE s.h > $5
          AND NOT (coalesce(((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))), false)
                   AND EXISTS (SELECT 1 FROM embedding_cache_sources l
                               WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))
          AND NOT EXISTS (SELECT 1 FROM embedding_sync_errors e
                          WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = s.h
                            AND e.next_retry_at > now())
          AND (coalesce(((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))), false) OR NOT ((coalesce((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'large' AND b.model = $3)) AND (coalesce((c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'small' AND b.model = $4))))
        ORDER BY s.h
        LIMIT $6"#]].assert_eq(&pending_page(&source()));
    expect![[r#"
        WITH src AS (
            SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
            FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
            WHERE d.v <> ''
        )
        INSERT INTO embedding_sync_pending (run_id, source_table, source_column, value_hash, value, occurrences)
        SELECT $5, $1, $2, s.h, s.v, s.n
        FROM src s
        LEFT JOIN embedding_cache c ON c.value_hash = s.h
            LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.cache_id = c.id
        WHERE NOT (coalesce(((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))), false)
                   AND EXISTS (SELECT 1 FROM embedding_cache_sources l
                               WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))
        ON CONFLICT DO NOTHING"#]].assert_eq(&snapshot_pending(&source()));
    expect![[r#"
        SELECT s.h, s.v, s.n, (coalesce((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'large' AND b.model = $3)) AS has_large, (coalesce((c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'small' AND b.model = $4)) AS has_small
        FROM (SELECT value_hash AS h, value AS v, occurrences AS n FROM embedding_sync_pending
              WHERE run_id = $5 AND source_table = $1 AND source_column = $2 AND value_hash > $6
                AND ($8 = '' OR value_hash <= $8)) s
        LEFT JOIN embedding_cache c ON c.value_hash = s.h AND c.value_hash > $6
            LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.value_hash > $6 AND o.cache_id = c.id
        WHERE NOT (coalesce(((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))), false)
                   AND EXISTS (SELECT 1 FROM embedding_cache_sources l
                               WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))
          AND NOT EXISTS (SELECT 1 FROM embedding_sync_errors e
                          WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = s.h
                            AND e.next_retry_at > now())
          AND (coalesce(((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))), false) OR NOT ((coalesce((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'large' AND b.model = $3)) AND (coalesce((c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)), false) OR EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
                   WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = 'small' AND b.model = $4))))
        ORDER BY s.h
        LIMIT $7"#]].assert_eq(&pending_snapshot_page());
    expect![[r#"
        WITH src AS MATERIALIZED (
            SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
            FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
            WHERE d.v <> ''
        ),
        c AS MATERIALIZED (
            SELECT (SELECT count(*) FROM src) AS total, count(*) AS had, count(*) FILTER (WHERE s.h IS NULL) AS stale
            FROM embedding_cache_sources l LEFT JOIN src s ON s.h = l.value_hash
            WHERE l.source_table = $1 AND l.source_column = $2
        ),
        go AS MATERIALIZED (SELECT NOT ($3 AND c.stale >= $4 AND c.had > 0 AND (c.total = 0 OR c.stale::float8 > $5 * c.had::float8)) AS ok FROM c),
        gone AS (
            DELETE FROM embedding_cache_sources l
            WHERE l.source_table = $1 AND l.source_column = $2 AND (SELECT ok FROM go)
              AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)
            RETURNING l.value_hash AS h
        ),
        gone_hashes AS MATERIALIZED (SELECT coalesce(array_agg(h), '{}') AS hs FROM gone),
        orphan AS (
            INSERT INTO embedding_sync_orphans AS k (value_hash, source_table, source_column)
            SELECT g.h, $1, $2 FROM gone g
            WHERE (SELECT x.value_hash FROM embedding_cache_sources x
                   WHERE x.value_hash = g.h AND (x.source_table <> $1 OR x.source_column <> $2) LIMIT 1) IS NULL
              AND (SELECT o.value_hash FROM embedding_cache_owned o WHERE o.value_hash = g.h) IS NOT NULL
            ON CONFLICT (value_hash) DO UPDATE
            SET source_table = EXCLUDED.source_table, source_column = EXCLUDED.source_column, unlinked_at = now()
        ),
        reassigned AS (
            UPDATE embedding_cache r
            SET source_table = other.source_table, source_column = other.source_column
            FROM embedding_cache_owned o,
                 LATERAL (SELECT x.source_table, x.source_column FROM embedding_cache_sources x
                          WHERE x.value_hash = o.value_hash AND (x.source_table <> $1 OR x.source_column <> $2)
                          ORDER BY x.linked_at, x.source_table, x.source_column LIMIT 1) other
            WHERE r.value_hash = ANY ((SELECT hs FROM gone_hashes)::text[]) AND o.value_hash = ANY ((SELECT hs FROM gone_hashes)::text[])
              AND o.value_hash = r.value_hash AND o.cache_id = r.id AND r.source_table = $1 AND r.source_column = $2
        ),
        errors AS (
            DELETE FROM embedding_sync_errors e
            WHERE e.source_table = $1 AND e.source_column = $2 AND (SELECT ok FROM go)
              AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = e.value_hash)
        )
        SELECT c.total, c.had, c.stale, NOT go.ok AS held, (SELECT count(*) FROM gone) AS unlinked
        FROM c, go"#]].assert_eq(&remove_stale(&source()));
    expect![[r#"
        WITH cand AS MATERIALIZED (
            SELECT k.value_hash AS h, k.source_table, k.source_column,
                   (SELECT x.value_hash FROM embedding_cache_sources x WHERE x.value_hash = k.value_hash LIMIT 1) IS NOT NULL AS linked,
                   (SELECT c.value FROM embedding_cache c WHERE c.value_hash = k.value_hash) AS v
            FROM embedding_sync_orphans k
        ),
        present AS MATERIALIZED (
            SELECT btrim(s."title"::text, ' ') AS v FROM "app"."Items" s WHERE btrim(s."title"::text, ' ') IN (SELECT v FROM cand WHERE NOT linked)
        ),
        orphan AS MATERIALIZED (
            SELECT coalesce(array_agg(k.h), '{}') AS hs FROM cand k
            WHERE NOT k.linked AND NOT EXISTS (SELECT 1 FROM present p WHERE p.v = k.v)
        ),
        settled AS MATERIALIZED (
            SELECT coalesce(array_agg(k.h), '{}') AS hs FROM cand k
            WHERE k.linked OR k.h = ANY ((SELECT hs FROM orphan)::text[])
        ),
        forgotten AS (
            DELETE FROM embedding_sync_orphans k WHERE k.value_hash = ANY ((SELECT hs FROM settled)::text[])
        ),
        deleted AS (
            DELETE FROM embedding_cache d USING embedding_cache_owned o
            WHERE d.value_hash = ANY ((SELECT hs FROM orphan)::text[]) AND o.value_hash = ANY ((SELECT hs FROM orphan)::text[])
              AND o.value_hash = d.value_hash AND o.cache_id = d.id
            RETURNING d.value_hash
        ),
        disowned AS (
            DELETE FROM embedding_cache_owned o WHERE o.value_hash = ANY ((SELECT hs FROM orphan)::text[])
        ),
        counted AS MATERIALIZED (
            SELECT k.source_table, k.source_column, count(*)::int8 AS n FROM deleted d JOIN cand k ON k.h = d.value_hash
            GROUP BY k.source_table, k.source_column
        ),
        added AS (
            UPDATE embedding_sync_run_sources r SET deleted = r.deleted + n.n
            FROM counted n
            WHERE r.run_id = $1 AND r.source_table = n.source_table AND r.source_column = n.source_column
        )
        SELECT source_table, source_column, n FROM counted ORDER BY source_table, source_column"#]].assert_eq(&delete_orphans(&[&source()]));
    expect![[r#"
        WITH t AS (
            SELECT * FROM unnest($5::text[], $6::text[], $7::int4[], $8::vector[], $9::vector[]) AS t(h, v, n, l, s)
        ),
        ins AS (
            INSERT INTO embedding_cache
                (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count, created_at)
            SELECT t.v, t.h, t.l, t.s, $1, $2, t.n, now() FROM t
            ON CONFLICT (value_hash) DO NOTHING
            RETURNING id, value_hash
        ),
        own AS (
            INSERT INTO embedding_cache_owned AS o (value_hash, cache_id, large_model, small_model, created_at)
            SELECT ins.value_hash, ins.id, CASE WHEN t.l IS NULL THEN NULL ELSE $3 END, CASE WHEN t.s IS NULL THEN NULL ELSE $4 END, now()
            FROM ins JOIN t ON t.h = ins.value_hash
            WHERE ins.id IS NOT NULL
            ON CONFLICT (value_hash) DO UPDATE
            SET cache_id = EXCLUDED.cache_id, large_model = EXCLUDED.large_model, small_model = EXCLUDED.small_model,
                created_at = EXCLUDED.created_at
        ),
        w AS (
            SELECT t.h, t.l, t.s, o.value_hash IS NOT NULL AS owned,
                   t.l IS NOT NULL AND (c.embedding_large IS NULL
                       OR (o.value_hash IS NOT NULL AND coalesce(o.large_model, $3) <> $3)) AS put_l,
                   t.s IS NOT NULL AND (c.embedding_small IS NULL
                       OR (o.value_hash IS NOT NULL AND coalesce(o.small_model, $4) <> $4)) AS put_s
            FROM t
            JOIN embedding_cache c ON c.value_hash = t.h
            LEFT JOIN embedding_cache_owned o ON o.value_hash = t.h AND o.cache_id = c.id
        ),
        tags AS (
            UPDATE embedding_cache_owned o
            SET large_model = CASE WHEN w.put_l THEN $3 ELSE o.large_model END,
                small_model = CASE WHEN w.put_s THEN $4 ELSE o.small_model END
            FROM w
            WHERE o.value_hash = w.h AND w.owned AND (w.put_l OR w.put_s)
        )
        UPDATE embedding_cache c
        SET embedding_large = CASE WHEN w.put_l THEN w.l ELSE c.embedding_large END,
            embedding_small = CASE WHEN w.put_s THEN w.s ELSE c.embedding_small END
        FROM w
        WHERE c.value_hash = w.h AND (w.put_l OR w.put_s)"#]]
    .assert_eq(&UPSERT_BATCH);
}

#[test]
fn prune_sql() {
    // The statement that counts and the one that deletes read the same set of rows.
    let (count, delete) = (prune_rows(), prune_delete_rows());
    assert!(count.starts_with(&format!("WITH {PRUNED}")) && delete.starts_with(&format!("WITH {PRUNED}")));
    expect![[r#"
        WITH t AS (
            SELECT * FROM unnest($1::text[], $2::text[]) AS t(source_table, source_column)
        ),
        doomed AS (
            SELECT DISTINCT c.id, l.value_hash
            FROM embedding_cache_sources l
            JOIN t ON t.source_table = l.source_table AND t.source_column = l.source_column
            JOIN embedding_cache c ON c.value_hash = l.value_hash
            JOIN embedding_cache_owned o ON o.value_hash = l.value_hash AND o.cache_id = c.id
            WHERE NOT EXISTS (SELECT 1 FROM embedding_cache_sources x
                              WHERE x.value_hash = l.value_hash
                                AND NOT EXISTS (SELECT 1 FROM t WHERE t.source_table = x.source_table AND t.source_column = x.source_column))
        ),
        gone AS (
            DELETE FROM embedding_cache c USING doomed d WHERE c.id = d.id RETURNING c.id
        ),
        disowned AS (
            DELETE FROM embedding_cache_owned o USING doomed d WHERE o.cache_id = d.id
        )
        SELECT count(*)::int8 FROM gone"#]].assert_eq(&delete);
    let models = Config::parse(include_str!("../../../../embedding-sources.json")).unwrap().models;
    assert!(migration(&models, false).iter().any(|s| s.sql == RUNS_FINISHED_INDEX), "the runs index is part of the migration");
}

/// What a test knows of a statement: its text and how many parameters it binds.
struct Checked {
    name: &'static str,
    text: String,
    params: usize,
}

fn checked<const N: usize>(name: &'static str, s: &impl Statement<N>) -> Checked {
    Checked { name, text: s.text().as_str().to_owned(), params: s.params().len() }
}

#[test]
fn typed_statements_bind_every_parameter_their_text_numbers() {
    use crate::prune::{LeftReason, LeftSource};
    use crate::report::{IndexReport, RunReport, Trigger};
    use crate::sync::{DeleteGuard, EmbeddedValue, Progress, RunId, ValueFailure};
    use std::time::Duration;
    let source = source();
    let tags = ModelTags { large: "l".into(), small: "s".into() };
    let run = RunId("r".into());
    let hash = crate::hash::Value::normalize("x").unwrap().hash();
    let batch = [EmbeddedValue { hash: hash.clone(), value: "x".into(), occurrences: 1, large: None, small: None, complete: false }];
    let failures = [ValueFailure { hash: hash.clone(), model: "m".into(), message: "e".into() }];
    let report = crate::report::SourceReport::default();
    let progress = Progress { run: &run, embedded: 1, reused: 0, batches: 1, usage: Default::default() };
    let sources = [&source];
    let run_report = RunReport {
        run_id: "r".into(),
        status: crate::report::RunStatus::Finished,
        invocations: 1,
        trigger: Trigger::Cron,
        started_at: String::new(),
        duration_ms: 0,
        sources: Vec::new(),
        totals: Default::default(),
        usage: Default::default(),
        stopped: None,
        indexes: None,
        pending_batches: None,
    };
    let indexes = IndexReport::default();
    let left = [LeftSource {
        table: "t".into(),
        column: "c".into(),
        reason: LeftReason::Removed,
        name: None,
        links: 0,
        errors: 0,
        rows: 0,
        batch_values: 0,
        same_as: None,
    }];
    let (holder, ttl) = ("h", Duration::from_secs(1));
    let captured = Source { changes: crate::config::Changes::Capture { reconcile_every_secs: 60 }, ..source.clone() };
    let table_key = source.table_key();
    let batch_values = [BatchValue {
        custom_id: "c",
        position: 0,
        hash: &hash,
        value: "x",
        occurrences: 1,
        source_table: &table_key,
        source_column: source.column_key(),
    }];
    let statements = [
        checked("Plan", &Plan { source: &source, state: FULL, tags: &tags }),
        checked(
            "Plan (fresh database)",
            &Plan { source: &source, state: SchemaState { cache: false, links: false, owned_by_row: false }, tags: &tags },
        ),
        checked("LinkReusable", &LinkReusable { source: &source, tags: &tags }),
        checked("PendingPage", &PendingPage { source: &source, tags: &tags, after: Some(&hash), limit: 10 }),
        checked("SnapshotPending", &SnapshotPending { source: &source, tags: &tags, run: &run }),
        checked(
            "PendingSnapshotPage",
            &PendingSnapshotPage { source: &source, tags: &tags, run: &run, after: None, limit: 10, upto: None },
        ),
        checked(
            "PendingSnapshotPage (a range)",
            &PendingSnapshotPage { source: &source, tags: &tags, run: &run, after: None, limit: 10, upto: Some(&hash) },
        ),
        checked("HasSnapshot", &HasSnapshot { run: &run, source: &source }),
        checked("DropSnapshot", &DropSnapshot { run: &run, source: &source }),
        checked("UpsertBatch", &UpsertBatch { source: &source, tags: &tags, batch: &batch }),
        checked("LinkValues", &LinkValues { source: &source, batch: &batch }),
        checked("ClearErrors", &ClearErrors { source: &source, batch: &batch }),
        checked("RecordErrors", &RecordErrors { source: &source, failures: &failures }),
        checked("RemoveStale", &RemoveStale { source: &source, guard: Some(DeleteGuard { minimum: 1, max_share: 0.5 }) }),
        checked("DeleteOrphans", &DeleteOrphans { run: &run, sources: &sources }),
        checked("HasErrors", &HasErrors { source: &source }),
        checked("SavePlan", &SavePlan { run: &run, source: &source, plan: &report }),
        checked("AddProgress", &AddProgress { source: &source, progress: &progress }),
        checked("AddErrors", &AddErrors { run: &run, source: &source, errors: 1 }),
        checked("SourceDone", &SourceDone { run: &run, source: &source, stale: 1 }),
        checked("AcquireLease", &AcquireLease { holder, ttl }),
        checked("Fence", &Fence { holder, generation: 1, ttl }),
        checked("ReleaseLease", &ReleaseLease { holder, generation: 1 }),
        checked("WriteLimits", &WriteLimits { statement: ttl, lock: ttl, idle: ttl }),
        checked("StartRun", &StartRun { run: &run, trigger: Trigger::Cron, tags: &tags }),
        checked("StartRunSources", &StartRunSources { run: &run, sources: &sources }),
        checked("RunSources", &RunSources { run: &run }),
        checked("AbandonRun", &AbandonRun { run: &run }),
        checked("FinishRun", &FinishRun { run: &run, report: &run_report }),
        checked("RecordIndexes", &RecordIndexes { run: &run, indexes: &indexes }),
        checked("RecordRefused", &RecordRefused { run: &run, reasons: &[] }),
        checked("DeleteOldRuns", &DeleteOldRuns { keep: 1 }),
        checked("LastRuns", &LastRuns { n: 1 }),
        checked("SourceCoverage", &SourceCoverage { source: &source }),
        checked("LeftSources", &LeftSources { state: FULL, batches: true, enabled: &sources }),
        checked("LeftSources (no batch tables)", &LeftSources { state: FULL, batches: false, enabled: &sources }),
        checked(
            "LeftSources (by hash)",
            &LeftSources { state: SchemaState { owned_by_row: false, ..FULL }, batches: false, enabled: &sources },
        ),
        checked("SameTables", &SameTables { left: &[], enabled: &sources }),
        checked("PruneRows", &PruneRows { targets: &left }),
        checked("PruneDeleteRows", &PruneDeleteRows { targets: &left }),
        checked("PruneReassign", &PruneReassign { targets: &left }),
        checked("PruneUnlink", &PruneUnlink { targets: &left }),
        checked("PruneErrors", &PruneErrors { targets: &left }),
        checked("PruneBatchValuesCount", &PruneBatchValuesCount { targets: &left }),
        checked("PruneBatchValues", &PruneBatchValues { targets: &left }),
        checked("PlanRanges", &PlanRanges { run: &run, source: &source, per_range: 10 }),
        checked("RangeTallies", &RangeTallies { run: &run }),
        checked("SweepRanges", &SweepRanges { run: &run, resend_after: ttl }),
        checked("ClaimRange", &ClaimRange { range: 1, run: &run, holder, ttl, tags: &tags }),
        checked("RangeState", &RangeState { range: 1, run: &run }),
        checked("FenceRange", &FenceRange { range: 1, holder, generation: 1, ttl, next: Some(&hash) }),
        checked("EndClaim", &EndClaim { range: 1, state: "done", error: "" }),
        checked("RunReady", &RunReady { run: &run }),
        checked("DeadLetter", &DeadLetter { range: 1, run: &run, reason: "r" }),
        checked("CaptureState", &CaptureState { source: &source }),
        checked("CaptureInfo", &CaptureInfo { source: &source }),
        checked("RegisterCapture", &RegisterCapture { source: &source, why: "w" }),
        checked("ForceReconcile", &ForceReconcile { capture_id: 1, why: "w" }),
        checked("TableExists", &TableExists { table: &source.table }),
        checked("ForgetCapture", &ForgetCapture { capture_id: 1 }),
        checked("FoldChanges", &FoldChanges { source: &source }),
        checked("DropGoneValues", &DropGoneValues { source: &source, hashes: vec![] }),
        checked("Reconcile", &Reconcile { source: &source, drift_known: true }),
        checked("SettleCapture", &SettleCapture { source: &source, tags: &tags, run: &run }),
        checked("Plan (captured)", &Plan { source: &captured, state: FULL, tags: &tags }),
        checked("LinkReusable (captured)", &LinkReusable { source: &captured, tags: &tags }),
        checked("SnapshotPending (captured)", &SnapshotPending { source: &captured, tags: &tags, run: &run }),
        checked("RemoveStale (captured)", &RemoveStale { source: &captured, guard: None }),
        checked("SourceCoverage (captured)", &SourceCoverage { source: &captured }),
        checked(
            "InsertBatchFile",
            &InsertBatchFile {
                input_file_id: "file-1",
                run: &run,
                slot: crate::config::ModelSlot::Large,
                model: "l",
                requests: 1,
                values: 1,
            },
        ),
        checked("InsertBatchValues", &InsertBatchValues { input_file_id: "file-1", values: &batch_values }),
        checked("SetBatchCreated", &SetBatchCreated { input_file_id: "file-1", batch_id: "batch_1" }),
        checked("BatchRequests", &BatchRequests { input_file_id: "file-1" }),
        checked(
            "AddBatchProgress",
            &AddBatchProgress { run: &run, table: "t", column: "c", slot: ModelSlot::Small, embedded: 1, tokens: 2, requests: 1 },
        ),
        checked("AwaitedValues", &AwaitedValues { source: &source, tags: &tags }),
        checked("CompleteAmong", &CompleteAmong { hashes: &["h"], tags: &tags }),
        checked(
            "SetBatchState",
            &SetBatchState {
                batch_id: "batch_1",
                state: "completed",
                output_file_id: Some("file-2"),
                error_file_id: None,
                request_counts: "{}",
                finished: false,
            },
        ),
        checked("RequestSources", &RequestSources { input_file_id: "file-1", custom_id: "c" }),
        checked("DeleteRequestValues", &DeleteRequestValues { input_file_id: "file-1", custom_id: "c" }),
        checked("ErrorsThisRun", &ErrorsThisRun { run: &run, source: &source, failures: &failures }),
        checked("BatchModel", &BatchModel { input_file_id: "file-1" }),
        checked("DeleteBatchValues", &DeleteBatchValues { batch_id: "batch_1" }),
        checked("FinishBatchFile", &FinishBatchFile { input_file_id: "file-1", state: "abandoned" }),
        checked("RequestValues", &RequestValues { source: &source, input_file_id: "file-1", custom_id: "c" }),
    ];
    for s in &statements {
        assert_eq!(param::numbered(&s.text), Some(s.params), "{}: its text does not number exactly $1 to ${}", s.name, s.params);
    }
    // The pages put `after` and the limit at different numbers; each binds them where its text reads them.
    let page = PendingPage { source: &source, tags: &tags, after: Some(&hash), limit: 10 };
    assert_eq!(page.params()[4], param::Param::Text(hash.as_str().into()));
    let snap = PendingSnapshotPage { source: &source, tags: &tags, run: &run, after: Some(&hash), limit: 10, upto: None };
    assert_eq!((&snap.params()[4], &snap.params()[5]), (&param::Param::Text("r".into()), &param::Param::Text(hash.as_str().into())));
    // The timeouts go as milliseconds, the lease's length as seconds.
    let limits = WriteLimits { statement: Duration::from_millis(1500), lock: Duration::from_secs(5), idle: Duration::from_millis(1500) };
    assert_eq!(limits.params()[..2], [param::Param::Text("1500".into()), param::Param::Text("5000".into())]);
    assert_eq!(
        Fence { holder, generation: 7, ttl: Duration::from_millis(2500) }.params()[1..],
        [param::Param::Int8(7), param::Param::Float8(2.5)]
    );
    // The enabled sources go as recorded: two `text[]`, tables and columns.
    let left_sources = LeftSources { state: FULL, batches: true, enabled: &sources };
    assert_eq!(left_sources.params(), [param::texts([source.table_key().as_str()]), param::texts(["title"])]);
    // A batch's errors are cleared only for the values that are done.
    let two = [batch[0].clone(), EmbeddedValue { complete: true, ..batch[0].clone() }];
    assert_eq!(ClearErrors { source: &source, batch: &two }.params()[2], param::texts([hash.as_str()]));
    assert_eq!(LinkValues { source: &source, batch: &two }.params()[2], param::texts([hash.as_str(), hash.as_str()]));
}

#[test]
fn capture_sql() {
    let json = r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
        "sources":[{"name":"A","table":"app.Items","column":"t$embsync$","changes":"capture"}]}"#;
    let source = Config::parse(json).unwrap().sources.remove(0);
    let install = install_capture(&source, 7);
    // The column's name holds the usual dollar-quote tag: the body is quoted with another.
    assert!(install.contains("SECURITY DEFINER\nSET search_path FROM CURRENT AS $embsyncx$"), "{install}");
    assert_eq!(install.matches("$embsyncx$").count(), 2, "{install}");
    assert!(install.contains(r#"btrim(r."t$embsync$"::text, ' ')"#), "{install}");
    for op in ["insert", "update", "delete", "truncate"] {
        assert!(
            install
                .contains(&format!(r#"CREATE OR REPLACE TRIGGER "embsync_capture_7_{op}" AFTER {} ON "app"."Items""#, op.to_uppercase())),
            "{install}"
        );
        assert!(install.contains(&format!(r#"ENABLE ALWAYS TRIGGER "embsync_capture_7_{op}""#)), "{install}");
    }
    expect![[r#"
        DROP TRIGGER IF EXISTS "embsync_capture_7_insert" ON "app"."Items";
        DROP TRIGGER IF EXISTS "embsync_capture_7_update" ON "app"."Items";
        DROP TRIGGER IF EXISTS "embsync_capture_7_delete" ON "app"."Items";
        DROP TRIGGER IF EXISTS "embsync_capture_7_truncate" ON "app"."Items";
        DROP FUNCTION IF EXISTS "embsync_capture_7"() CASCADE"#]]
    .assert_eq(&drop_capture(Some(&source.table), 7));
    expect![[r#"DROP FUNCTION IF EXISTS "embsync_capture_7"() CASCADE"#]].assert_eq(&drop_capture(None, 7));
    // A captured source's values come from embsync's copy once a reconcile filled it, else from a scan.
    let plan = plan(&source, FULL);
    assert!(plan.contains("FROM embedding_sync_capture_values m") && plan.contains(r#"FROM "app"."Items""#), "{}", plan.as_str());
    let scanned = Source { changes: crate::config::Changes::Scan, ..source.clone() };
    assert!(!super::plan(&scanned, FULL).contains("embedding_sync_capture"));
    let fresh = SchemaState { cache: false, links: false, owned_by_row: false };
    assert!(!super::plan(&source, fresh).contains("embedding_sync_capture"), "a dry run on a database without embsync's tables");
}
