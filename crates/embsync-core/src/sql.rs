//! Every SQL statement embsync runs, as text.
//!
//! Architecture Invariant: table and column names enter these strings only through
//! [`TableName::quoted`](crate::ident::TableName::quoted) and
//! [`Ident::quoted`](crate::ident::Ident::quoted); every value is a bound parameter. Statements
//! hold no session state (no temp tables, no session advisory locks, no prepared-statement
//! names), so they also work through a transaction-pooling proxy such as Hyperdrive.
//!
//! Source statements take `$1` = source table key and `$2` = source column key, the strings
//! recorded in `embedding_cache_sources` (see [`Source::table_key`]).

use crate::config::{Models, Source};

/// Creates what embsync needs, idempotently, without touching existing rows. Runs in one
/// transaction after [`LOCK_SCHEMA`].
pub fn ensure_schema(models: &Models) -> String {
    format!(
        r#"CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS embedding_cache (
    id bigserial PRIMARY KEY,
    value text NOT NULL,
    value_hash text NOT NULL UNIQUE,
    embedding_large vector({large}),
    embedding_small vector({small}),
    source_table text,
    source_column text,
    usage_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'embedding_cache'::regclass AND i.indisunique AND i.indnatts = 1
          AND a.attname = 'value_hash'
    ) THEN
        CREATE UNIQUE INDEX embedding_cache_value_hash_key ON embedding_cache (value_hash);
    END IF;
END
$$;
CREATE TABLE IF NOT EXISTS embedding_cache_sources (
    value_hash text NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    linked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, source_column, value_hash)
);
CREATE INDEX IF NOT EXISTS embedding_cache_sources_value_hash_idx ON embedding_cache_sources (value_hash);
CREATE TABLE IF NOT EXISTS embedding_cache_owned (
    value_hash text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);"#,
        large = models.large.dimensions(),
        small = models.small.dimensions(),
    )
}

/// Serialises concurrent schema creation; transaction-scoped, so it is released at commit.
pub const LOCK_SCHEMA: &str = "SELECT pg_advisory_xact_lock(hashtext('embsync:schema'))";

/// Which of embsync's tables exist: `(embedding_cache, embedding_cache_sources)` as two booleans.
pub const SCHEMA_STATE: &str =
    "SELECT to_regclass('embedding_cache') IS NOT NULL, to_regclass('embedding_cache_sources') IS NOT NULL";

/// The distinct non-empty trimmed values of a source with their hash and row count, as a CTE
/// body: columns `h` (hash), `v` (trimmed value), `n` (source rows holding it).
fn source_values(source: &Source) -> String {
    let col = source.column.quoted();
    format!(
        "SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n\n    \
         FROM (SELECT btrim({col}::text, ' ') AS v, count(*) AS n FROM {table} WHERE {col} IS NOT NULL GROUP BY 1) d\n    \
         WHERE d.v <> ''",
        table = source.table.quoted(),
    )
}

/// What exists decides how a dry run can count without creating anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaState {
    /// `embedding_cache` exists (ours, or another pipeline's).
    pub cache: bool,
    /// `embedding_cache_sources` exists.
    pub links: bool,
}

/// Counts for one source, one row: `total`, `new`, `reusable`, `embed_tokens`, `stale` (int8).
///
/// new = values this source has that are not done for it: not linked, or linked but its cache
/// row lacks an embedding (a model failed) or was removed by someone else; reusable = new values whose cache row already has both embeddings;
/// embed_tokens = estimated tokens of the rest (ceil(bytes / 4) each); stale = links of this
/// source whose value is gone.
pub fn plan(source: &Source, state: SchemaState) -> String {
    let mine = if state.cache && state.links {
        "SELECT l.value_hash AS h FROM embedding_cache_sources l\n    \
         JOIN embedding_cache c ON c.value_hash = l.value_hash\n    \
         WHERE l.source_table = $1 AND l.source_column = $2\n      \
         AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL"
    } else {
        "SELECT NULL::text AS h WHERE $1::text IS NULL AND $2::text IS NULL"
    };
    let complete = if state.cache {
        "EXISTS (SELECT 1 FROM embedding_cache c WHERE c.value_hash = s.h\n        \
         AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL)"
    } else {
        "false"
    };
    let stale = if state.links {
        "SELECT count(*) FROM embedding_cache_sources l\n     \
         WHERE l.source_table = $1 AND l.source_column = $2\n       \
         AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)"
    } else {
        "SELECT 0::int8"
    };
    format!(
        "WITH src AS MATERIALIZED (\n    {src}\n),\n\
         mine AS MATERIALIZED (\n    {mine}\n),\n\
         fresh AS MATERIALIZED (\n    \
         SELECT s.h, s.v, {complete} AS complete\n    \
         FROM src s WHERE NOT EXISTS (SELECT 1 FROM mine m WHERE m.h = s.h)\n)\n\
         SELECT\n    \
         (SELECT count(*) FROM src) AS total,\n    \
         (SELECT count(*) FROM fresh) AS new,\n    \
         (SELECT count(*) FROM fresh WHERE complete) AS reusable,\n    \
         (SELECT coalesce(sum((octet_length(v) + 3) / 4), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,\n    \
         ({stale}) AS stale",
        src = source_values(source),
    )
}

/// Links this source to every value it has whose cache row already holds both embeddings
/// (ours or another pipeline's): no provider call. Rows affected = values reused.
pub fn link_reusable(source: &Source) -> String {
    format!(
        "WITH src AS (\n    {src}\n)\n\
         INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)\n\
         SELECT s.h, $1, $2 FROM src s\n\
         JOIN embedding_cache c ON c.value_hash = s.h\n\
         WHERE c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL\n\
         ON CONFLICT DO NOTHING",
        src = source_values(source),
    )
}

/// One page of values that still need an embedding, in hash order after `$3` (use `''` for the
/// first page), at most `$4` (int8) rows: `h`, `v`, `n`, `has_large`, `has_small`.
pub fn pending_page(source: &Source) -> String {
    format!(
        "WITH src AS (\n    {src}\n)\n\
         SELECT s.h, s.v, s.n,\n       \
         coalesce(c.embedding_large IS NOT NULL, false) AS has_large,\n       \
         coalesce(c.embedding_small IS NOT NULL, false) AS has_small\n\
         FROM src s\n\
         LEFT JOIN embedding_cache c ON c.value_hash = s.h\n\
         WHERE s.h > $3\n  \
         AND NOT (c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL\n           \
         AND EXISTS (SELECT 1 FROM embedding_cache_sources l\n                       \
         WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))\n\
         ORDER BY s.h\n\
         LIMIT $4",
        src = source_values(source),
    )
}

/// Writes one batch: inserts new cache rows (recording them as embsync's own) and fills only
/// the embedding columns that are NULL in rows that exist. Never overwrites a vector.
///
/// `$1` source table key, `$2` source column key, `$3` hashes (text[]), `$4` values (text[]),
/// `$5` source row counts (int4[]), `$6` large vectors (vector[], NULL where not embedded),
/// `$7` small vectors (vector[]).
pub const UPSERT_BATCH: &str = "\
WITH t AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::int4[], $6::vector[], $7::vector[]) AS t(h, v, n, l, s)
),
ins AS (
    INSERT INTO embedding_cache
        (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count, created_at)
    SELECT t.v, t.h, t.l, t.s, $1, $2, t.n, now() FROM t
    ON CONFLICT (value_hash) DO NOTHING
    RETURNING value_hash
),
own AS (
    INSERT INTO embedding_cache_owned (value_hash) SELECT value_hash FROM ins ON CONFLICT DO NOTHING
)
UPDATE embedding_cache c
SET embedding_large = coalesce(c.embedding_large, t.l),
    embedding_small = coalesce(c.embedding_small, t.s)
FROM t
WHERE c.value_hash = t.h
  AND ((c.embedding_large IS NULL AND t.l IS NOT NULL) OR (c.embedding_small IS NULL AND t.s IS NOT NULL))";

/// Links this source to the given hashes (`$3`, text[]): every value the batch wrote.
pub const LINK_VALUES: &str = "\
INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)
SELECT h, $1, $2 FROM unnest($3::text[]) AS h
ON CONFLICT DO NOTHING";

/// Unlinks this source from values it no longer has. Rows affected = stale values.
pub fn unlink_stale(source: &Source) -> String {
    format!(
        "WITH src AS MATERIALIZED (\n    {src}\n)\n\
         DELETE FROM embedding_cache_sources l\n\
         WHERE l.source_table = $1 AND l.source_column = $2\n  \
         AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)",
        src = source_values(source),
    )
}

/// Deletes cache rows that embsync created and no source has any more; rows written by anyone
/// else are never deleted. One row: the number deleted (int8).
pub const DELETE_ORPHANS: &str = "\
WITH gone AS (
    DELETE FROM embedding_cache c
    USING embedding_cache_owned o
    WHERE o.value_hash = c.value_hash
      AND NOT EXISTS (SELECT 1 FROM embedding_cache_sources l WHERE l.value_hash = c.value_hash)
    RETURNING c.value_hash
),
disowned AS (
    DELETE FROM embedding_cache_owned o USING gone WHERE o.value_hash = gone.value_hash
)
SELECT count(*)::int8 FROM gone";

/// Rows embsync created that name this source (`$1`, `$2`) as theirs although it no longer has
/// the value get another source that still has it, so `source_table`/`source_column` stay true.
pub const REASSIGN_SOURCE: &str = "\
UPDATE embedding_cache c
SET source_table = other.source_table, source_column = other.source_column
FROM embedding_cache_owned o,
     LATERAL (SELECT l.source_table, l.source_column FROM embedding_cache_sources l
              WHERE l.value_hash = o.value_hash
              ORDER BY l.linked_at, l.source_table, l.source_column LIMIT 1) other
WHERE o.value_hash = c.value_hash
  AND c.source_table = $1 AND c.source_column = $2
  AND NOT EXISTS (SELECT 1 FROM embedding_cache_sources x
                  WHERE x.value_hash = c.value_hash AND x.source_table = $1 AND x.source_column = $2)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use expect_test::expect;

    fn source() -> Source {
        let json = r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
            "sources":[{"name":"A","table":"app.Items","column":"title"}]}"#;
        Config::parse(json).unwrap().sources.remove(0)
    }

    #[test]
    fn plan_sql() {
        let full = SchemaState { cache: true, links: true };
        expect![[r#"
            WITH src AS MATERIALIZED (
                SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
                FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
                WHERE d.v <> ''
            ),
            mine AS MATERIALIZED (
                SELECT l.value_hash AS h FROM embedding_cache_sources l
                JOIN embedding_cache c ON c.value_hash = l.value_hash
                WHERE l.source_table = $1 AND l.source_column = $2
                  AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL
            ),
            fresh AS MATERIALIZED (
                SELECT s.h, s.v, EXISTS (SELECT 1 FROM embedding_cache c WHERE c.value_hash = s.h
                    AND c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL) AS complete
                FROM src s WHERE NOT EXISTS (SELECT 1 FROM mine m WHERE m.h = s.h)
            )
            SELECT
                (SELECT count(*) FROM src) AS total,
                (SELECT count(*) FROM fresh) AS new,
                (SELECT count(*) FROM fresh WHERE complete) AS reusable,
                (SELECT coalesce(sum((octet_length(v) + 3) / 4), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,
                (SELECT count(*) FROM embedding_cache_sources l
                 WHERE l.source_table = $1 AND l.source_column = $2
                   AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)) AS stale"#]].assert_eq(&plan(&source(), full));
        let fresh = SchemaState { cache: false, links: false };
        expect![[r#"
            WITH src AS MATERIALIZED (
                SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
                FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
                WHERE d.v <> ''
            ),
            mine AS MATERIALIZED (
                SELECT NULL::text AS h WHERE $1::text IS NULL AND $2::text IS NULL
            ),
            fresh AS MATERIALIZED (
                SELECT s.h, s.v, false AS complete
                FROM src s WHERE NOT EXISTS (SELECT 1 FROM mine m WHERE m.h = s.h)
            )
            SELECT
                (SELECT count(*) FROM src) AS total,
                (SELECT count(*) FROM fresh) AS new,
                (SELECT count(*) FROM fresh WHERE complete) AS reusable,
                (SELECT coalesce(sum((octet_length(v) + 3) / 4), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,
                (SELECT 0::int8) AS stale"#]].assert_eq(&plan(&source(), fresh));
    }

    #[test]
    fn source_sql() {
        expect![[r#"
            WITH src AS (
                SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
                FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
                WHERE d.v <> ''
            )
            INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)
            SELECT s.h, $1, $2 FROM src s
            JOIN embedding_cache c ON c.value_hash = s.h
            WHERE c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL
            ON CONFLICT DO NOTHING"#]].assert_eq(&link_reusable(&source()));
        expect![[r#"
            WITH src AS (
                SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
                FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
                WHERE d.v <> ''
            )
            SELECT s.h, s.v, s.n,
                   coalesce(c.embedding_large IS NOT NULL, false) AS has_large,
                   coalesce(c.embedding_small IS NOT NULL, false) AS has_small
            FROM src s
            LEFT JOIN embedding_cache c ON c.value_hash = s.h
            WHERE s.h > $3
              AND NOT (c.embedding_large IS NOT NULL AND c.embedding_small IS NOT NULL
                       AND EXISTS (SELECT 1 FROM embedding_cache_sources l
                                   WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))
            ORDER BY s.h
            LIMIT $4"#]].assert_eq(&pending_page(&source()));
        expect![[r#"
            WITH src AS MATERIALIZED (
                SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
                FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
                WHERE d.v <> ''
            )
            DELETE FROM embedding_cache_sources l
            WHERE l.source_table = $1 AND l.source_column = $2
              AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)"#]].assert_eq(&unlink_stale(&source()));
    }
}
