//! Every SQL statement embsync runs, as text.
//!
//! Architecture Invariant: table and column names enter these strings only through
//! [`TableName::quoted`](crate::ident::TableName::quoted) and
//! [`Ident::quoted`](crate::ident::Ident::quoted); every value is a bound parameter. Statements
//! hold no session state (no temp tables, no session advisory locks, no prepared-statement
//! names), so they also work through a transaction-pooling proxy such as Hyperdrive.
//!
//! Source statements take `$1` = source table key and `$2` = source column key, the strings
//! recorded in `embedding_cache_sources` (see [`Source::table_key`]), and `$3` / `$4` = the
//! configured model tags of the large and small model ([`ModelSpec::tag`]).
//!
//! A row *has* a model's embedding when the column is not NULL and, for rows embsync wrote, the
//! tag recorded in `embedding_cache_owned` is the configured one (no tag counts as current). Rows written by someone else are judged by NULL-ness only: embsync never
//! overwrites their vectors.
//!
//! [`ModelSpec::tag`]: crate::config::ModelSpec::tag

use crate::config::{ModelSlot, Models, Source, VectorIndexes};
use crate::ident::Ident;
use crate::index::IndexTarget;

/// The version of embsync's schema this code needs, recorded in `embedding_sync_schema`.
///
/// 1 is every schema from before the version was recorded; 2 ties ownership to the cache row
/// (`embedding_cache_owned.cache_id`) and adds `embedding_sync_schema`; 3 adds
/// `embedding_sync_orphans` (rows to delete once every source has been planned) and
/// `embedding_sync_runs.refused` (a model the provider refused during the run).
pub const SCHEMA_VERSION: i32 = 3;

/// How long a migration waits for any one lock before it gives up (`SET LOCAL lock_timeout`).
pub const MIGRATION_LOCK_TIMEOUT_SECS: u32 = 5;

/// Whether `embedding_sync_schema` exists (a catalog read: no lock on any table).
pub const HAS_SCHEMA_VERSION: &str = "SELECT to_regclass('embedding_sync_schema') IS NOT NULL";

/// The recorded schema: `version` (int4) and `cache_created` (embsync created `embedding_cache`).
pub const SCHEMA_VERSION_ROW: &str = "SELECT version, cache_created FROM embedding_sync_schema";

/// Bounds every lock wait of the migration's transaction.
pub fn migration_lock_timeout() -> String {
    format!("SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT_SECS}s'")
}

/// One step of a migration: its statements, and what it waits for a lock on (named in the error
/// when the wait times out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStep {
    /// The table (or lock) the step may wait for.
    pub locks: &'static str,
    /// The statements (no parameters; run with the simple query protocol).
    pub sql: String,
}

fn step(locks: &'static str, sql: impl Into<String>) -> MigrationStep {
    MigrationStep { locks, sql: sql.into() }
}

/// Brings any earlier schema (or none) to [`SCHEMA_VERSION`], in one transaction after
/// [`migration_lock_timeout`] and [`LOCK_SCHEMA`]; every step is idempotent. Runs only when the
/// recorded version is behind, so a steady-state invocation runs no DDL at all.
///
/// On `embedding_cache` it only ever creates the table (when `cache_exists` is false) and reads
/// it: a cache that exists may be another pipeline's, and embsync builds no index on it and
/// takes no lock stronger than ACCESS SHARE. Every other step locks only embsync's own tables.
///
/// Ownership moves from the value hash to the row: an `embedding_cache_owned` record keeps
/// the `id` of the row embsync inserted. For records from before, the row that holds the hash
/// now is claimed only when its `created_at` equals the record's: embsync wrote both in one
/// statement, with the same `now()`, so a row another pipeline inserted after embsync's was
/// deleted has another `created_at` and is not claimed. Records that match no row are dropped
/// (embsync then treats such rows as someone else's: it never deletes or overwrites them).
pub fn migration(models: &Models, cache_exists: bool) -> Vec<MigrationStep> {
    let mut steps = vec![step("the vector extension", "CREATE EXTENSION IF NOT EXISTS vector")];
    if !cache_exists {
        steps.push(step(
            "embedding_cache",
            format!(
                r#"CREATE TABLE embedding_cache (
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
{MARK_CACHE_OURS}"#,
                large = models.large.dimensions(),
                small = models.small.dimensions(),
            ),
        ));
    }
    steps.push(step(
        "embedding_cache_sources",
        "CREATE TABLE IF NOT EXISTS embedding_cache_sources (
    value_hash text NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    linked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, source_column, value_hash)
);
CREATE INDEX IF NOT EXISTS embedding_cache_sources_value_hash_idx ON embedding_cache_sources (value_hash)",
    ));
    steps.push(step(
        "embedding_cache_owned",
        "CREATE TABLE IF NOT EXISTS embedding_cache_owned (
    value_hash text PRIMARY KEY,
    cache_id bigint,
    large_model text,
    small_model text,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE embedding_cache_owned ADD COLUMN IF NOT EXISTS large_model text;
ALTER TABLE embedding_cache_owned ADD COLUMN IF NOT EXISTS small_model text;
ALTER TABLE embedding_cache_owned ADD COLUMN IF NOT EXISTS cache_id bigint",
    ));
    steps.push(step("embedding_cache_owned", CLAIM_OWNED_ROWS));
    steps.push(step(
        "embedding_sync_errors",
        "CREATE TABLE IF NOT EXISTS embedding_sync_errors (
    source_table text NOT NULL,
    source_column text NOT NULL,
    value_hash text NOT NULL,
    model text NOT NULL,
    message text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at timestamptz NOT NULL DEFAULT now(),
    next_retry_at timestamptz NOT NULL,
    PRIMARY KEY (source_table, source_column, value_hash)
)",
    ));
    steps.push(step(
        "embedding_sync_runs",
        "CREATE TABLE IF NOT EXISTS embedding_sync_runs (
    run_id text PRIMARY KEY,
    trigger text NOT NULL,
    status text NOT NULL DEFAULT 'running',
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    invocations integer NOT NULL DEFAULT 0,
    report jsonb
);
CREATE UNIQUE INDEX IF NOT EXISTS embedding_sync_runs_one_open ON embedding_sync_runs ((true)) WHERE finished_at IS NULL;
-- The model tags a run embeds with (large and small, a line each): a run is resumed only under
-- the same ones.
ALTER TABLE embedding_sync_runs ADD COLUMN IF NOT EXISTS models text;
-- Why the provider refused a model's requests themselves during the run (one reason each), so
-- that whichever invocation finishes the run reports it stopped.
ALTER TABLE embedding_sync_runs ADD COLUMN IF NOT EXISTS refused text[] NOT NULL DEFAULT '{}'",
    ));
    steps.push(step(
        "embedding_sync_run_sources",
        "CREATE TABLE IF NOT EXISTS embedding_sync_run_sources (
    run_id text NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    position integer NOT NULL,
    name text NOT NULL,
    planned boolean NOT NULL DEFAULT false,
    done boolean NOT NULL DEFAULT false,
    planned_batches bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    new bigint NOT NULL DEFAULT 0,
    unchanged bigint NOT NULL DEFAULT 0,
    reused bigint NOT NULL DEFAULT 0,
    embedded bigint NOT NULL DEFAULT 0,
    stale bigint NOT NULL DEFAULT 0,
    deleted bigint NOT NULL DEFAULT 0,
    errors bigint NOT NULL DEFAULT 0,
    deferred bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    tokens_large bigint NOT NULL DEFAULT 0,
    requests_large bigint NOT NULL DEFAULT 0,
    tokens_small bigint NOT NULL DEFAULT 0,
    requests_small bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, source_table, source_column)
)",
    ));
    steps.push(step(
        "embedding_sync_pending",
        "CREATE TABLE IF NOT EXISTS embedding_sync_pending (
    run_id text NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    value_hash text NOT NULL,
    value text NOT NULL,
    occurrences bigint NOT NULL,
    PRIMARY KEY (run_id, source_table, source_column, value_hash)
)",
    ));
    steps.push(step(
        "embedding_sync_orphans",
        "CREATE TABLE IF NOT EXISTS embedding_sync_orphans (
    value_hash text PRIMARY KEY,
    source_table text NOT NULL,
    source_column text NOT NULL,
    unlinked_at timestamptz NOT NULL DEFAULT now()
)",
    ));
    steps.push(step(
        "embedding_sync_lease",
        "CREATE TABLE IF NOT EXISTS embedding_sync_lease (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL,
    generation bigint NOT NULL DEFAULT 0
);
-- The lease's fencing generation, for deployments older than it.
ALTER TABLE embedding_sync_lease ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0",
    ));
    // Bounded run history: what `/status` reads, finished runs newest first.
    steps.push(step("embedding_sync_runs", RUNS_FINISHED_INDEX));
    steps.push(step(
        "embedding_sync_schema",
        format!(
            "CREATE TABLE IF NOT EXISTS embedding_sync_schema (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    version integer NOT NULL,
    cache_created boolean NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO embedding_sync_schema (version, cache_created)
VALUES ({SCHEMA_VERSION}, coalesce(obj_description('embedding_cache'::regclass, 'pg_class'), '') LIKE 'embsync: created by embsync%')
ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()"
        ),
    ));
    steps
}

/// Ties every ownership record from before [`SCHEMA_VERSION`] 2 to the row embsync inserted, when
/// that row is still there (same hash, same `created_at`), and drops the others; see
/// [`migration`].
pub const CLAIM_OWNED_ROWS: &str = "\
UPDATE embedding_cache_owned o SET cache_id = c.id
FROM embedding_cache c
WHERE o.cache_id IS NULL AND c.value_hash = o.value_hash AND c.created_at = o.created_at AND c.id IS NOT NULL;
DELETE FROM embedding_cache_owned WHERE cache_id IS NULL;
ALTER TABLE embedding_cache_owned ALTER COLUMN cache_id SET NOT NULL";

/// What the store needs of an `embedding_cache` it did not create, one row: whether a unique
/// index on `value_hash` alone exists (the batch's `ON CONFLICT (value_hash)` needs it), and the
/// type of `id` (NULL when there is none). Catalog reads only.
pub const CACHE_SHAPE: &str = "\
SELECT EXISTS (
           SELECT 1 FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE i.indrelid = to_regclass('embedding_cache') AND i.indisunique AND i.indnatts = 1
             AND i.indpred IS NULL AND a.attname = 'value_hash'),
       (SELECT format_type(atttypid, NULL) FROM pg_attribute
        WHERE attrelid = to_regclass('embedding_cache') AND attname = 'id' AND NOT attisdropped)";

/// Checks an existing `embedding_cache` (from [`CACHE_SHAPE`]) for what embsync relies on.
///
/// # Errors
/// A message that names what is missing and the statement that adds it.
pub fn check_cache_shape(unique_hash: bool, id_type: Option<&str>) -> Result<(), String> {
    if !unique_hash {
        return Err("embedding_cache has no unique index on value_hash, which embsync needs to insert rows: \
                    create it (CREATE UNIQUE INDEX CONCURRENTLY embedding_cache_value_hash_key ON embedding_cache (value_hash)); \
                    embsync does not build indexes on a table it did not create"
            .to_owned());
    }
    match id_type {
        Some("bigint" | "integer" | "smallint") => Ok(()),
        Some(other) => Err(format!(
            "embedding_cache.id is {other}, but embsync records the rows it inserted by an integer id: \
             use a bigint id (id bigserial PRIMARY KEY)"
        )),
        None => Err("embedding_cache has no id column, which embsync records the rows it inserted by: \
                     add one (ALTER TABLE embedding_cache ADD COLUMN id bigserial)"
            .to_owned()),
    }
}

/// Serialises concurrent migrations; transaction-scoped, so it is released at commit.
pub const LOCK_SCHEMA: &str = "SELECT pg_advisory_xact_lock(hashtext('embsync:schema'))";

/// Gives the plan query room to hash and join a large source in memory instead of spilling to
/// disk; transaction-scoped (`SET LOCAL`), so it also works through a transaction-pooling proxy.
pub const PLAN_WORK_MEM: &str = "SET LOCAL work_mem = '64MB'";

/// Which of embsync's tables exist: whether `embedding_cache` does (ours or another
/// pipeline's), whether all of embsync's own tables do, and whether ownership records name the
/// row (`embedding_cache_owned.cache_id`, [`SCHEMA_VERSION`] 2) (three booleans).
pub const SCHEMA_STATE: &str = "\
SELECT to_regclass('embedding_cache') IS NOT NULL,
       to_regclass('embedding_cache_sources') IS NOT NULL
         AND to_regclass('embedding_cache_owned') IS NOT NULL
         AND to_regclass('embedding_sync_errors') IS NOT NULL
         AND to_regclass('embedding_sync_runs') IS NOT NULL,
       EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('embedding_cache_owned')
                 AND attname = 'cache_id' AND NOT attisdropped)";

/// The declared dimensions of the two embedding columns (`atttypmod`; -1 when unconstrained,
/// NULL when the column or the table is missing): `large`, `small`. A catalog read: no lock on
/// the table.
pub const COLUMN_DIMS: &str = "\
SELECT (SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass('embedding_cache')
          AND attname = 'embedding_large' AND NOT attisdropped),
       (SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass('embedding_cache')
          AND attname = 'embedding_small' AND NOT attisdropped)";

/// Checks the declared column dimensions (from [`COLUMN_DIMS`]) against the models.
///
/// # Errors
/// A message that names the column, both sizes and the two ways to fix it.
pub fn check_column_dims(models: &Models, large: Option<i32>, small: Option<i32>) -> Result<(), String> {
    for (column, key, spec, typmod) in
        [("embedding_large", "large", &models.large, large), ("embedding_small", "small", &models.small, small)]
    {
        let want = spec.dimensions();
        match typmod {
            None => return Err(format!("embedding_cache has no column {column}: add it (ALTER TABLE embedding_cache ADD COLUMN {column} vector({want}))")),
            Some(-1) => {}
            Some(d) if d == want as i32 => {}
            Some(d) => {
                return Err(format!(
                    "embedding_cache.{column} is vector({d}) but models.{key} ({}) makes {want} dimensions: change the column (ALTER TABLE embedding_cache ALTER COLUMN {column} TYPE vector({want}) USING NULL) or the config",
                    spec.name()
                ))
            }
        }
    }
    Ok(())
}

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
    /// All of embsync's own tables and columns exist.
    pub links: bool,
    /// Ownership records name the cache row (`cache_id`): the schema is at
    /// [`SCHEMA_VERSION`] 2 or later. Before that (a deployment not yet migrated, read by a dry
    /// run), a record is matched by the value hash alone.
    pub owned_by_row: bool,
}

/// `c` has the configured large (`$3`) or small (`$4`) embedding; needs `c` (the cache row) and
/// `o` (its `embedding_cache_owned` row, LEFT JOINed) in scope.
fn has(slot: &str, state: SchemaState) -> String {
    let tag = if slot == "large" { "$3" } else { "$4" };
    if state.links {
        format!("(c.embedding_{slot} IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.{slot}_model, {tag}) = {tag}))")
    } else {
        format!("(c.embedding_{slot} IS NOT NULL AND {tag}::text IS NOT NULL)")
    }
}

fn complete(state: SchemaState) -> String {
    format!("({} AND {})", has("large", state), has("small", state))
}

/// Joins the cache row `c` and its ownership record `o` for the value `s.h`: the record counts
/// only when it names that very row (its `id`), so a row another pipeline wrote after embsync's
/// was deleted is not embsync's.
fn join_cache(state: SchemaState) -> &'static str {
    match (state.links, state.owned_by_row) {
        (true, true) => "LEFT JOIN embedding_cache c ON c.value_hash = s.h\n    LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.cache_id = c.id",
        (true, false) => "LEFT JOIN embedding_cache c ON c.value_hash = s.h\n    LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h",
        _ => "LEFT JOIN embedding_cache c ON c.value_hash = s.h",
    }
}

const FULL: SchemaState = SchemaState { cache: true, links: true, owned_by_row: true };

/// `s.h` is not done for the source (`$1`, `$2`): its row lacks a current embedding, or the
/// source is not linked to it. Needs `c` and `o` from [`join_cache`].
fn not_done() -> String {
    format!(
        "NOT (coalesce({complete}, false)\n           \
         AND EXISTS (SELECT 1 FROM embedding_cache_sources l\n                       \
         WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))",
        complete = complete(FULL)
    )
}

/// `s.h` is not waiting for a retry after an error in the source (`$1`, `$2`).
const NOT_DEFERRED: &str = "NOT EXISTS (SELECT 1 FROM embedding_sync_errors e\n                  \
     WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = s.h\n                    \
     AND e.next_retry_at > now())";

/// Counts for one source, one row: `total`, `new`, `reusable`, `embed_tokens`, `stale`,
/// `deferred` (int8).
///
/// new = values this source has that are not done for it: not linked, or linked but its cache
/// row lacks a current embedding (a model failed, the model changed) or was removed by someone
/// else; reusable = new values whose cache row already has both; embed_tokens = estimated
/// tokens of the rest (see [`crate::batch::sql_estimate_tokens`]: SQL sees bytes and characters,
/// not scripts); stale =
/// links of this source whose value is gone; deferred = new values waiting for a retry after
/// an error (not those another pipeline has since made reusable: those count as reusable).
pub fn plan(source: &Source, state: SchemaState) -> String {
    let fresh = if !state.cache {
        "SELECT s.h, s.v, false AS complete FROM src s WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL\n      \
         AND $3::text IS NOT NULL AND $4::text IS NOT NULL"
            .to_owned()
    } else {
        let linked = if state.links {
            "EXISTS (SELECT 1 FROM embedding_cache_sources l\n                 \
             WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h)"
        } else {
            "($1::text IS NULL AND $2::text IS NULL)"
        };
        format!(
            "SELECT s.h, s.v, {complete} AS complete\n    \
             FROM src s\n    {join}\n    \
             WHERE NOT ({complete} AND {linked})",
            complete = complete(state),
            join = join_cache(state),
        )
    };
    let (stale, deferred) = if state.links {
        (
            "SELECT count(*) FROM embedding_cache_sources l\n     \
             WHERE l.source_table = $1 AND l.source_column = $2\n       \
             AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)",
            "SELECT count(*) FROM fresh f JOIN embedding_sync_errors e\n       \
             ON e.source_table = $1 AND e.source_column = $2 AND e.value_hash = f.h\n     \
             WHERE e.next_retry_at > now() AND NOT f.complete",
        )
    } else {
        ("SELECT 0::int8", "SELECT 0::int8")
    };
    format!(
        "WITH src AS MATERIALIZED (\n    {src}\n),\n\
         fresh AS MATERIALIZED (\n    {fresh}\n)\n\
         SELECT\n    \
         (SELECT count(*) FROM src) AS total,\n    \
         (SELECT count(*) FROM fresh) AS new,\n    \
         (SELECT count(*) FROM fresh WHERE complete) AS reusable,\n    \
         (SELECT coalesce(sum((19 * octet_length(v)::int8 - 9 * char_length(v) + 39) / 40), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,\n    \
         ({stale}) AS stale,\n    \
         ({deferred}) AS deferred",
        src = source_values(source),
    )
}

/// Links this source to every value it has whose cache row already holds both embeddings
/// (ours or another pipeline's): no provider call. A linked value is done, so its error record
/// for the source goes. One row: the values reused (int8).
pub fn link_reusable(source: &Source) -> String {
    format!(
        "WITH src AS (\n    {src}\n),\n\
         linked AS (\n    \
         INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)\n    \
         SELECT s.h, $1, $2 FROM src s\n    \
         {join}\n    \
         WHERE {complete}\n    \
         ON CONFLICT DO NOTHING\n    \
         RETURNING value_hash\n\
         ),\n\
         cleared AS (\n    \
         DELETE FROM embedding_sync_errors e USING linked\n    \
         WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = linked.value_hash\n\
         )\n\
         SELECT count(*)::int8 FROM linked",
        src = source_values(source),
        join = join_cache(FULL),
        complete = complete(FULL),
    )
}

/// One page of values that still need an embedding, in hash order after `$5` (use `''` for the
/// first page), at most `$6` (int8) rows: `h`, `v`, `n`, `has_large`, `has_small`. Values whose
/// last failure asked for a later retry are left out until then.
pub fn pending_page(source: &Source) -> String {
    format!(
        "WITH src AS (\n    {src}\n)\n\
         SELECT s.h, s.v, s.n, coalesce({has_large}, false) AS has_large, coalesce({has_small}, false) AS has_small\n\
         FROM src s\n\
         {join}\n\
         WHERE s.h > $5\n  \
         AND {not_done}\n  \
         AND {NOT_DEFERRED}\n\
         ORDER BY s.h\n\
         LIMIT $6",
        src = source_values(source),
        has_large = has("large", FULL),
        has_small = has("small", FULL),
        not_done = not_done(),
        join = join_cache(FULL),
    )
}

/// Snapshots a source's pending values for run `$5` (same condition as [`pending_page`]): one
/// scan of the source per run instead of one per page.
pub fn snapshot_pending(source: &Source) -> String {
    format!(
        "WITH src AS (\n    {src}\n)\n\
         INSERT INTO embedding_sync_pending (run_id, source_table, source_column, value_hash, value, occurrences)\n\
         SELECT $5, $1, $2, s.h, s.v, s.n\n\
         FROM src s\n\
         {join}\n\
         WHERE {not_done}\n\
         ON CONFLICT DO NOTHING",
        src = source_values(source),
        not_done = not_done(),
        join = join_cache(FULL),
    )
}

/// One page of the snapshot of run `$5` (see [`snapshot_pending`]) after `$6`, at most `$7`
/// (int8) rows, leaving out values done since the snapshot and values waiting for a retry (before
/// the limit, so a short page is the last one); same columns as [`pending_page`]. An ordered
/// range scan of the snapshot's primary key.
pub fn pending_snapshot_page() -> String {
    format!(
        "SELECT s.h, s.v, s.n, coalesce({has_large}, false) AS has_large, coalesce({has_small}, false) AS has_small\n\
         FROM (SELECT value_hash AS h, value AS v, occurrences AS n FROM embedding_sync_pending\n      \
         WHERE run_id = $5 AND source_table = $1 AND source_column = $2 AND value_hash > $6) s\n\
         {join}\n\
         WHERE {not_done}\n  \
         AND {NOT_DEFERRED}\n\
         ORDER BY s.h\n\
         LIMIT $7",
        has_large = has("large", FULL),
        has_small = has("small", FULL),
        not_done = not_done(),
        // The range bound on the joined tables lets their merge joins start at the page
        // instead of reading every row before it (measured: 313 ms -> 8.5 ms a page with
        // 300,000 rows done).
        join = "LEFT JOIN embedding_cache c ON c.value_hash = s.h AND c.value_hash > $6\n    \
                LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.value_hash > $6 AND o.cache_id = c.id",
    )
}

/// Whether run `$1` has a snapshot for the source (`$2`, `$3`).
pub const HAS_SNAPSHOT: &str = "\
SELECT EXISTS (SELECT 1 FROM embedding_sync_pending WHERE run_id = $1 AND source_table = $2 AND source_column = $3)";

/// Drops run `$1`'s snapshot of the source (`$2`, `$3`): it is done.
pub const DROP_SNAPSHOT: &str = "DELETE FROM embedding_sync_pending WHERE run_id = $1 AND source_table = $2 AND source_column = $3";

/// Drops snapshots of runs that are over (finished, failed or abandoned).
pub const DROP_OLD_SNAPSHOTS: &str = "\
DELETE FROM embedding_sync_pending p USING embedding_sync_runs r WHERE r.run_id = p.run_id AND r.finished_at IS NOT NULL";

/// Writes one batch: inserts new cache rows (recording them as embsync's own by their `id`, with
/// the model tags) and, in rows that exist, writes an embedding where the column is NULL or, in
/// embsync's own rows, was made by another model. Never overwrites a vector in a row it did not
/// write (a row is embsync's only when its ownership record names its `id`), and never adds
/// columns to `embedding_cache`: the tags live in `embedding_cache_owned`. A record left from
/// a row of embsync's that someone deleted is replaced when embsync inserts the value again.
///
/// `$1` source table key, `$2` source column key, `$3` large tag, `$4` small tag, `$5` hashes
/// (text[]), `$6` values (text[]), `$7` source row counts (int4[]), `$8` large vectors
/// (vector[], NULL where not embedded), `$9` small vectors (vector[]).
pub const UPSERT_BATCH: &str = "\
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
WHERE c.value_hash = w.h AND (w.put_l OR w.put_s)";

/// Links this source to the given hashes (`$3`, text[]): every value the batch wrote.
pub const LINK_VALUES: &str = "\
INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)
SELECT h, $1, $2 FROM unnest($3::text[]) AS h
ON CONFLICT DO NOTHING";

/// Takes the sync lease for `$1` (holder) for `$2` (float8 seconds) unless someone else holds
/// it unexpired. One row when taken: the lease's new `generation` (int8), which with the holder
/// is this invocation's fencing token ([`FENCE`]); none when not. Every acquisition starts a new
/// generation, also when the holder id is the same, so a token is never valid twice. The row is
/// never deleted (a release expires it), so generations only grow.
pub const ACQUIRE_LEASE: &str = "\
INSERT INTO embedding_sync_lease AS l (name, holder, expires_at, generation)
VALUES ('sync', $1, now() + make_interval(secs => $2), 1)
ON CONFLICT (name) DO UPDATE
SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, generation = l.generation + 1
WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
RETURNING generation";

/// Who holds the lease and for how many more seconds: `holder`, `secs` (float8).
pub const LEASE_HOLDER: &str = "\
SELECT holder, extract(epoch FROM expires_at - now())::float8 FROM embedding_sync_lease WHERE name = 'sync'";

/// The fence: the first statement of every transaction that writes for an invocation. Extends
/// the lease of the token `$1` (holder), `$2` (generation, int8) by `$3` (float8) seconds from
/// now; 0 rows when the token no longer holds it unexpired, and then the transaction writes
/// nothing. The row lock it takes is held until the transaction ends, so nobody takes the lease
/// over while a fenced transaction is in flight.
pub const FENCE: &str = "\
UPDATE embedding_sync_lease SET expires_at = now() + make_interval(secs => $3)
WHERE name = 'sync' AND holder = $1 AND generation = $2 AND expires_at > now()";

/// Gives up the lease of the token `$1` (holder), `$2` (generation): it expires now (the row
/// stays, keeping its generation). A token that no longer holds it changes nothing.
pub const RELEASE_LEASE: &str = "\
UPDATE embedding_sync_lease SET expires_at = now()
WHERE name = 'sync' AND holder = $1 AND generation = $2 AND expires_at > now()";

/// The limits of a fenced transaction, transaction-scoped (`set_config(.., true)` is
/// `SET LOCAL`): `$1` `statement_timeout`, `$2` `lock_timeout`, `$3`
/// `idle_in_transaction_session_timeout`, each in milliseconds as text.
pub const WRITE_LIMITS: &str = "\
SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true),
       set_config('idle_in_transaction_session_timeout', $3, true)";

/// The unfinished run, counting this invocation: `run_id`, `trigger`, `started_ms` (float8),
/// `invocations`, `models` (the model tags it was started with, large and small a line each;
/// empty for a run started before they were recorded), `refused` (text[], see
/// [`RECORD_REFUSED`]).
pub const RESUME_RUN: &str = "\
UPDATE embedding_sync_runs SET invocations = invocations + 1, updated_at = now(), status = 'running'
WHERE finished_at IS NULL
RETURNING run_id, trigger, (extract(epoch FROM started_at) * 1000)::float8, invocations, coalesce(models, ''), refused";

/// Starts run `$1` with trigger `$2` and the model tags `$3` (see [`RESUME_RUN`]): same columns
/// as [`RESUME_RUN`].
pub const START_RUN: &str = "\
INSERT INTO embedding_sync_runs (run_id, trigger, invocations, models) VALUES ($1, $2, 1, $3)
RETURNING run_id, trigger, (extract(epoch FROM started_at) * 1000)::float8, invocations, models, refused";

/// Adds the run's sources: `$1` run, `$2` tables, `$3` columns, `$4` names (text[]).
pub const START_RUN_SOURCES: &str = "\
INSERT INTO embedding_sync_run_sources (run_id, source_table, source_column, name, position)
SELECT $1, t, c, n, (p - 1)::int4 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u(t, c, n, p)";

/// A run's sources in config order.
pub const RUN_SOURCES: &str = "\
SELECT source_table, source_column, name, planned, done, planned_batches, total, new, unchanged, reused,
       embedded, stale, deleted, errors, deferred, batches, tokens_large, requests_large, tokens_small, requests_small
FROM embedding_sync_run_sources WHERE run_id = $1 ORDER BY position";

/// Ends a run whose sources no longer match the config (it was changed mid-run): `$1` run.
pub const ABANDON_RUN: &str = "\
UPDATE embedding_sync_runs SET status = 'abandoned', finished_at = now(), updated_at = now() WHERE run_id = $1";

/// Saves a source's plan: `$1` run, `$2` table, `$3` column, `$4` total, `$5` new,
/// `$6` unchanged, `$7` reused, `$8` deferred, `$9` planned batches (int8 each).
pub const SAVE_PLAN: &str = "\
UPDATE embedding_sync_run_sources
SET planned = true, total = $4, new = $5, unchanged = $6, reused = $7, deferred = $8, planned_batches = $9
WHERE run_id = $1 AND source_table = $2 AND source_column = $3";

/// Adds one batch to a source's counters: `$1` run, `$2` table, `$3` column, `$4` embedded,
/// `$5` reused, `$6` batches, `$7` large tokens, `$8` large requests, `$9` small tokens,
/// `$10` small requests (int8 each).
pub const ADD_PROGRESS: &str = "\
UPDATE embedding_sync_run_sources
SET embedded = embedded + $4, reused = reused + $5, batches = batches + $6,
    tokens_large = tokens_large + $7, requests_large = requests_large + $8,
    tokens_small = tokens_small + $9, requests_small = requests_small + $10
WHERE run_id = $1 AND source_table = $2 AND source_column = $3";

/// Adds `$4` (int8) errors to a source's counters.
pub const ADD_ERRORS: &str = "\
UPDATE embedding_sync_run_sources SET errors = errors + $4
WHERE run_id = $1 AND source_table = $2 AND source_column = $3";

/// Marks a source done with its stale count `$4` (int8). Its `deleted` count grows when the
/// run's orphans are deleted ([`delete_orphans`]).
pub const SOURCE_DONE: &str = "\
UPDATE embedding_sync_run_sources SET stale = $4, done = true
WHERE run_id = $1 AND source_table = $2 AND source_column = $3";

/// Ends run `$1` with its report `$2` (JSON text) and status `$3` (`finished` or `failed`).
pub const FINISH_RUN: &str = "\
UPDATE embedding_sync_runs SET status = $3, finished_at = now(), updated_at = now(), report = $2::text::jsonb
WHERE run_id = $1 AND finished_at IS NULL";

/// Adds the index step (`$2`, JSON text) to the stored report of finished run `$1`.
pub const RECORD_INDEXES: &str = "\
UPDATE embedding_sync_runs SET report = jsonb_set(report, '{indexes}', $2::text::jsonb), updated_at = now()
WHERE run_id = $1 AND report IS NOT NULL";

/// The unfinished run, if any: `run_id`, `status`, `trigger`, `invocations` (int4),
/// `started_at` (epoch milliseconds, float8).
pub const CURRENT_RUN: &str = "\
SELECT run_id, status, trigger, invocations, (extract(epoch FROM started_at) * 1000)::float8
FROM embedding_sync_runs WHERE finished_at IS NULL";

/// The last `$1` (int8) finished runs, newest first: `run_id`, `status`, `report` (JSON text),
/// `finished_at` (epoch milliseconds, float8).
pub const LAST_RUNS: &str = "\
SELECT run_id, status, coalesce(report::text, 'null'), (extract(epoch FROM finished_at) * 1000)::float8 FROM embedding_sync_runs
WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT $1";

/// Coverage of one source: `total`, `embedded_large`, `embedded_small`, `errors` (int8 each;
/// errors of values the source still has).
pub fn coverage(source: &Source) -> String {
    format!(
        "WITH src AS MATERIALIZED (\n    {src}\n)\n\
         SELECT (SELECT count(*) FROM src),\n       \
         (SELECT count(*) FROM src s JOIN embedding_cache c ON c.value_hash = s.h WHERE c.embedding_large IS NOT NULL),\n       \
         (SELECT count(*) FROM src s JOIN embedding_cache c ON c.value_hash = s.h WHERE c.embedding_small IS NOT NULL),\n       \
         (SELECT count(*) FROM embedding_sync_errors e JOIN src s ON s.h = e.value_hash\n         \
         WHERE e.source_table = $1 AND e.source_column = $2)",
        src = source_values(source),
    )
}

/// Forgets earlier failures of the given hashes (`$3`, text[]) for this source: they are done.
pub const CLEAR_ERRORS: &str = "\
DELETE FROM embedding_sync_errors
WHERE source_table = $1 AND source_column = $2 AND value_hash = ANY($3::text[])";

/// Records failures for this source: `$3` hashes, `$4` models, `$5` messages (text[] each). A
/// value that fails again waits longer: 5 minutes after the first failure, then 4 times longer
/// each time, at most a day.
pub const RECORD_ERRORS: &str = "\
INSERT INTO embedding_sync_errors AS e
    (source_table, source_column, value_hash, model, message, attempts, next_retry_at)
SELECT $1, $2, t.h, t.m, t.msg, 1, now() + interval '5 minutes'
FROM unnest($3::text[], $4::text[], $5::text[]) AS t(h, m, msg)
ON CONFLICT (source_table, source_column, value_hash) DO UPDATE
SET model = EXCLUDED.model,
    message = EXCLUDED.message,
    attempts = e.attempts + 1,
    last_failed_at = now(),
    next_retry_at = now() + least(interval '5 minutes' * power(4, least(e.attempts, 8)), interval '1 day')";

/// Whether the mass-delete guard holds a removal back, as a condition on the counts `c.total`
/// (values the source has), `c.had` (its links) and `c.stale` (links to values it no longer
/// has): `$3` the guard is on (bool), `$4` its minimum (int8), `$5` its largest share (float8).
/// The same rule as [`crate::sync::DeleteGuard::holds`]; the store tests hold the two to it.
pub const MASS_DELETE_HELD: &str = "($3 AND c.stale >= $4 AND c.had > 0 AND (c.total = 0 OR c.stale::float8 > $5 * c.had::float8))";

/// Removes what a source no longer has, in one statement (one snapshot of the source), unless
/// the mass-delete guard ([`MASS_DELETE_HELD`]) holds it back, in which case nothing is
/// removed: unlinks the values it no longer has, records those of embsync's rows that no other
/// source links as orphan candidates (`embedding_sync_orphans`, with this source), gives
/// embsync's own rows that named this source another source that has the value, and drops the
/// source's errors of values it no longer has. One row: `total`, `had`, `stale`, `held` (bool),
/// `unlinked` (int8 the others).
///
/// It deletes no cache row: a value that left this source may be in a source planned later in
/// the run, which links it then (and pays nothing). [`delete_orphans`] deletes the candidates
/// still unlinked once every source of the run has been planned.
///
/// After the unlink, every step looks only at the unlinked hashes, one index probe each
/// (`= ANY` of the hashes, and subqueries per hash that the planner cannot turn into joins), so
/// it costs the stale values, not the size of the cache, whatever the planner knows of the
/// tables' sizes (measured on tables never analyzed, see `tests/stale.rs` of the store).
///
/// Locks: ROW EXCLUSIVE on `embedding_cache` (rows it updates are embsync's own) and on
/// embsync's tables.
pub fn remove_stale(source: &Source) -> String {
    format!(
        "WITH src AS MATERIALIZED (\n    {src}\n),\n\
         c AS MATERIALIZED (\n    \
         SELECT (SELECT count(*) FROM src) AS total, count(*) AS had,\n           \
         count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)) AS stale\n    \
         FROM embedding_cache_sources l WHERE l.source_table = $1 AND l.source_column = $2\n\
         ),\n\
         go AS MATERIALIZED (SELECT NOT {MASS_DELETE_HELD} AS ok FROM c),\n\
         gone AS (\n    \
         DELETE FROM embedding_cache_sources l\n    \
         WHERE l.source_table = $1 AND l.source_column = $2 AND (SELECT ok FROM go)\n      \
         AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)\n    \
         RETURNING l.value_hash AS h\n\
         ),\n\
         gone_hashes AS MATERIALIZED (SELECT coalesce(array_agg(h), '{{}}') AS hs FROM gone),\n\
         orphan AS (\n    \
         INSERT INTO embedding_sync_orphans AS k (value_hash, source_table, source_column)\n    \
         SELECT g.h, $1, $2 FROM gone g\n    \
         WHERE (SELECT x.value_hash FROM embedding_cache_sources x\n           \
         WHERE x.value_hash = g.h AND (x.source_table <> $1 OR x.source_column <> $2) LIMIT 1) IS NULL\n      \
         AND (SELECT o.value_hash FROM embedding_cache_owned o WHERE o.value_hash = g.h) IS NOT NULL\n    \
         ON CONFLICT (value_hash) DO UPDATE\n    \
         SET source_table = EXCLUDED.source_table, source_column = EXCLUDED.source_column, unlinked_at = now()\n\
         ),\n\
         reassigned AS (\n    \
         UPDATE embedding_cache r\n    \
         SET source_table = other.source_table, source_column = other.source_column\n    \
         FROM embedding_cache_owned o,\n         \
         LATERAL (SELECT x.source_table, x.source_column FROM embedding_cache_sources x\n                  \
         WHERE x.value_hash = o.value_hash AND (x.source_table <> $1 OR x.source_column <> $2)\n                  \
         ORDER BY x.linked_at, x.source_table, x.source_column LIMIT 1) other\n    \
         WHERE r.value_hash = ANY ((SELECT hs FROM gone_hashes)::text[]) AND o.value_hash = ANY ((SELECT hs FROM gone_hashes)::text[])\n      \
         AND o.value_hash = r.value_hash AND o.cache_id = r.id AND r.source_table = $1 AND r.source_column = $2\n\
         ),\n\
         errors AS (\n    \
         DELETE FROM embedding_sync_errors e\n    \
         WHERE e.source_table = $1 AND e.source_column = $2 AND (SELECT ok FROM go)\n      \
         AND NOT EXISTS (SELECT 1 FROM src s WHERE s.h = e.value_hash)\n\
         )\n\
         SELECT c.total, c.had, c.stale, NOT go.ok AS held, (SELECT count(*) FROM gone) AS unlinked\n\
         FROM c, go",
        src = source_values(source),
    )
}

/// Deletes embsync's rows of the orphan candidates ([`remove_stale`]) that no source links and
/// no enabled source (`sources`) has now, and forgets the candidates that are linked again or
/// were deleted, adding the rows deleted to the counters of run `$1`'s source that unlinked each
/// (`deleted`). Run once every source of the run has been planned (linked what it has) and had
/// its stale values removed, so a value that moved from one source to another is linked by then
/// and kept. A candidate that a source has but has not linked yet (it came in after that source
/// was planned) is kept, as a candidate: the next run links it, or deletes it if it left again.
/// One row per source that unlinked a deleted row: `source_table`, `source_column`, `deleted`
/// (int8).
///
/// The candidates cost index probes: the candidate table is read whole (it holds only them),
/// and each candidate is one probe of `embedding_cache_sources`, `embedding_cache_owned` and
/// `embedding_cache`, whatever the planner knows (see `tests/stale.rs` of the store). Whether a
/// source has a candidate's value is one scan of each enabled source (the trimmed text compared
/// with the candidates' values, nothing hashed); [`ORPHANS_WAITING`] spares it when there are no
/// candidates. A row is deleted only while its ownership record names its `id`.
///
/// Locks: ROW EXCLUSIVE on `embedding_cache` (rows it deletes are embsync's own) and on
/// embsync's tables; ACCESS SHARE on the sources.
pub fn delete_orphans(sources: &[&Source]) -> String {
    let mut present: Vec<String> = sources
        .iter()
        .map(|s| {
            let col = s.column.quoted();
            format!(
                "SELECT btrim(s.{col}::text, ' ') AS v FROM {table} s WHERE btrim(s.{col}::text, ' ') IN (SELECT v FROM cand WHERE NOT linked)",
                table = s.table.quoted()
            )
        })
        .collect();
    if present.is_empty() {
        present.push("SELECT NULL::text AS v WHERE false".to_owned());
    }
    format!(
        "WITH cand AS MATERIALIZED (\n    \
         SELECT k.value_hash AS h, k.source_table, k.source_column,\n           \
         (SELECT x.value_hash FROM embedding_cache_sources x WHERE x.value_hash = k.value_hash LIMIT 1) IS NOT NULL AS linked,\n           \
         (SELECT c.value FROM embedding_cache c WHERE c.value_hash = k.value_hash) AS v\n    \
         FROM embedding_sync_orphans k\n\
         ),\n\
         present AS MATERIALIZED (\n    {present}\n),\n\
         orphan AS MATERIALIZED (\n    \
         SELECT coalesce(array_agg(k.h), '{{}}') AS hs FROM cand k\n    \
         WHERE NOT k.linked AND NOT EXISTS (SELECT 1 FROM present p WHERE p.v = k.v)\n\
         ),\n\
         settled AS MATERIALIZED (\n    \
         SELECT coalesce(array_agg(k.h), '{{}}') AS hs FROM cand k\n    \
         WHERE k.linked OR k.h = ANY ((SELECT hs FROM orphan)::text[])\n\
         ),\n\
         forgotten AS (\n    \
         DELETE FROM embedding_sync_orphans k WHERE k.value_hash = ANY ((SELECT hs FROM settled)::text[])\n\
         ),\n\
         deleted AS (\n    \
         DELETE FROM embedding_cache d USING embedding_cache_owned o\n    \
         WHERE d.value_hash = ANY ((SELECT hs FROM orphan)::text[]) AND o.value_hash = ANY ((SELECT hs FROM orphan)::text[])\n      \
         AND o.value_hash = d.value_hash AND o.cache_id = d.id\n    \
         RETURNING d.value_hash\n\
         ),\n\
         disowned AS (\n    \
         DELETE FROM embedding_cache_owned o WHERE o.value_hash = ANY ((SELECT hs FROM orphan)::text[])\n\
         ),\n\
         counted AS MATERIALIZED (\n    \
         SELECT k.source_table, k.source_column, count(*)::int8 AS n FROM deleted d JOIN cand k ON k.h = d.value_hash\n    \
         GROUP BY k.source_table, k.source_column\n\
         ),\n\
         added AS (\n    \
         UPDATE embedding_sync_run_sources r SET deleted = r.deleted + n.n\n    \
         FROM counted n\n    \
         WHERE r.run_id = $1 AND r.source_table = n.source_table AND r.source_column = n.source_column\n\
         )\n\
         SELECT source_table, source_column, n FROM counted ORDER BY source_table, source_column",
        present = present.join("\n    UNION\n    "),
    )
}

/// Whether any orphan candidate waits ([`delete_orphans`]).
pub const ORPHANS_WAITING: &str = "SELECT EXISTS (SELECT 1 FROM embedding_sync_orphans)";

/// Adds the reasons `$2` (text[]) the provider refused a model's requests to run `$1`, each
/// once.
pub const RECORD_REFUSED: &str = "\
UPDATE embedding_sync_runs
SET refused = refused || ARRAY(SELECT DISTINCT r FROM unnest($2::text[]) AS r WHERE r <> ALL (refused) ORDER BY r),
    updated_at = now()
WHERE run_id = $1 AND finished_at IS NULL";

/// Whether the source (`$1`, `$2`) has any recorded errors (a probe of the errors' key).
pub const HAS_ERRORS: &str = "\
SELECT EXISTS (SELECT 1 FROM embedding_sync_errors WHERE source_table = $1 AND source_column = $2)";

/// Refreshes the planner's statistics of embsync's own tables after large writes (autovacuum
/// would, later). Takes SHARE UPDATE EXCLUSIVE on them, which no reader or writer waits for.
pub const ANALYZE_OWN: &str = "ANALYZE embedding_cache_sources, embedding_cache_owned";

/// An ANALYZE waits at most a second for its lock (another ANALYZE or a VACUUM holds it).
pub const ANALYZE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '1s'";

/// Likewise for the run's snapshot of pending values.
pub const ANALYZE_PENDING: &str = "ANALYZE embedding_sync_pending";

/// Likewise for `embedding_cache` when embsync created it (the columns its statements look
/// up, not the vectors).
pub const ANALYZE_CACHE: &str = "ANALYZE embedding_cache (id, value_hash, source_table, source_column)";

/// pgvector's `vector` type and its array type, as the statements see them (by the search path):
/// `oid`, `array_oid` (both oid) and `schema` (text). The worker declares the types of the
/// vectors it binds with these, since it sends every statement unnamed with typed parameters.
pub const VECTOR_TYPES: &str = "\
SELECT t.oid, t.typarray, n.nspname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = 'vector'::regtype";

/// Whether `embedding_cache` exists, read before [`migration`] to know whether embsync
/// creates it.
pub const CACHE_EXISTS: &str = "SELECT to_regclass('embedding_cache') IS NOT NULL";

/// Marks `embedding_cache` as embsync's, in the transaction that created it: only then does
/// embsync manage indexes on it (see [`crate::index`]).
pub const MARK_CACHE_OURS: &str = "\
COMMENT ON TABLE embedding_cache IS 'embsync: created by embsync, which keeps the embsync_hnsw_* indexes on it when vectorIndexes is enabled'";

/// What [`crate::index::plan`] needs, one row: `ours` (embsync created the table, as
/// `embedding_sync_schema` records, or its comment starts with `embsync:`), `building` (a `CREATE INDEX` on the table is running), the declared dimensions of
/// `embedding_large` and `embedding_small` (`atttypmod`), and every index on the table as
/// `names` (text[]) and `valid` (bool[], `pg_index.indisvalid`), in name order.
pub const INDEX_STATE: &str = "\
SELECT coalesce(obj_description('embedding_cache'::regclass, 'pg_class'), '') LIKE 'embsync:%'
         OR coalesce((SELECT cache_created FROM embedding_sync_schema), false) AS ours,
       EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.relid = 'embedding_cache'::regclass) AS building,
       (SELECT atttypmod FROM pg_attribute WHERE attrelid = 'embedding_cache'::regclass
          AND attname = 'embedding_large' AND NOT attisdropped) AS large,
       (SELECT atttypmod FROM pg_attribute WHERE attrelid = 'embedding_cache'::regclass
          AND attname = 'embedding_small' AND NOT attisdropped) AS small,
       coalesce(array_agg(c.relname::text ORDER BY c.relname) FILTER (WHERE c.oid IS NOT NULL), '{}') AS names,
       coalesce(array_agg(i.indisvalid ORDER BY c.relname) FILTER (WHERE c.oid IS NOT NULL), '{}') AS valid
FROM (SELECT 1) one
LEFT JOIN pg_index i ON i.indrelid = 'embedding_cache'::regclass
LEFT JOIN pg_class c ON c.oid = i.indexrelid";

/// Builds an HNSW cosine index on one embedding column without blocking writes. Runs outside a
/// transaction (`CONCURRENTLY`); `IF NOT EXISTS` makes a repeat a no-op.
pub fn create_hnsw_index(name: &Ident, slot: ModelSlot, target: IndexTarget, options: VectorIndexes) -> String {
    let column = format!("embedding_{}", slot.key());
    let (expression, opclass) = match target {
        IndexTarget::Column => (column, "vector_cosine_ops"),
        IndexTarget::VectorCast(dims) => (format!("({column}::vector({dims}))"), "vector_cosine_ops"),
        IndexTarget::HalfvecCast(dims) => (format!("({column}::halfvec({dims}))"), "halfvec_cosine_ops"),
    };
    format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON embedding_cache USING hnsw ({expression} {opclass}) \
         WITH (m = {m}, ef_construction = {ef})",
        name = name.quoted(),
        m = options.m,
        ef = options.ef_construction,
    )
}

/// Drops one of embsync's indexes without blocking writes; outside a transaction.
pub fn drop_index(name: &Ident) -> String {
    format!("DROP INDEX CONCURRENTLY IF EXISTS {}", name.quoted())
}

// ---------------------------------------------------------------------------------------------
// Sources that left the config (see `crate::prune`) and bounded run history. Every statement
// about which cache rows a prune deletes is here, over the ownership table as it is now.

/// The recorded sources (in `embedding_cache_sources` or `embedding_sync_errors`) that are not
/// among the enabled ones (`$1` tables, `$2` columns, text[]), with `links`, `errors` and `rows`
/// (cache rows embsync wrote that no other source links), in name order. The recorded keys are
/// found by a loose index scan of each primary key (one probe per source, not a scan of the
/// links); the counts cost what the left sources hold.
pub fn left_sources(state: SchemaState) -> String {
    // Before the schema is migrated (a `/status` read after an upgrade), ownership is by hash.
    let owned_row = if state.owned_by_row { " AND o.cache_id = c.id" } else { "" };
    format!(
        "\
WITH RECURSIVE linked AS (
    (SELECT source_table, source_column FROM embedding_cache_sources ORDER BY source_table, source_column LIMIT 1)
    UNION ALL
    SELECT n.source_table, n.source_column FROM linked k,
        LATERAL (SELECT l.source_table, l.source_column FROM embedding_cache_sources l
                 WHERE (l.source_table, l.source_column) > (k.source_table, k.source_column)
                 ORDER BY l.source_table, l.source_column LIMIT 1) n
),
failed AS (
    (SELECT source_table, source_column FROM embedding_sync_errors ORDER BY source_table, source_column LIMIT 1)
    UNION ALL
    SELECT n.source_table, n.source_column FROM failed k,
        LATERAL (SELECT e.source_table, e.source_column FROM embedding_sync_errors e
                 WHERE (e.source_table, e.source_column) > (k.source_table, k.source_column)
                 ORDER BY e.source_table, e.source_column LIMIT 1) n
),
gone AS (
    SELECT source_table, source_column FROM linked UNION SELECT source_table, source_column FROM failed
    EXCEPT SELECT t, c FROM unnest($1::text[], $2::text[]) AS enabled(t, c)
)
SELECT g.source_table, g.source_column,
       (SELECT count(*) FROM embedding_cache_sources l
        WHERE l.source_table = g.source_table AND l.source_column = g.source_column) AS links,
       (SELECT count(*) FROM embedding_sync_errors e
        WHERE e.source_table = g.source_table AND e.source_column = g.source_column) AS errors,
       (SELECT count(*) FROM embedding_cache_sources l
        JOIN embedding_cache c ON c.value_hash = l.value_hash
        JOIN embedding_cache_owned o ON o.value_hash = l.value_hash{owned_row}
        WHERE l.source_table = g.source_table AND l.source_column = g.source_column
          AND NOT EXISTS (SELECT 1 FROM embedding_cache_sources x WHERE x.value_hash = l.value_hash
                            AND (x.source_table <> g.source_table OR x.source_column <> g.source_column))) AS rows
FROM gone g
ORDER BY g.source_table, g.source_column"
    )
}

/// For each table of `$1` (quoted names, text[]), the 1-based position in `$2` (quoted names of
/// the enabled sources' tables, text[]) of the first that is the same relation in the catalog,
/// or NULL (also for a table that does not exist): `i`, `j` (int8).
pub const SAME_TABLES: &str = "\
SELECT l.i, (SELECT min(e.j) FROM unnest($2::text[]) WITH ORDINALITY AS e(name, j)
             WHERE to_regclass(e.name) = to_regclass(l.name))
FROM unnest($1::text[]) WITH ORDINALITY AS l(name, i)";

/// The sources a prune removes (`$1` tables, `$2` columns, text[]) as `t`, and as `doomed` the
/// values whose cache rows it deletes: linked by one of them, written by embsync, and linked by
/// no other source.
const PRUNED: &str = "\
t AS (
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
)";

/// The cache rows a prune of `$1`/`$2` deletes (one row, int8).
pub fn prune_rows() -> String {
    format!("WITH {PRUNED}\nSELECT count(*)::int8 FROM doomed")
}

/// Deletes the cache rows a prune of `$1`/`$2` deletes (see [`prune_rows`]) and their ownership
/// rows; one row: the number of cache rows deleted (int8). Takes ROW EXCLUSIVE on the cache and
/// row locks on embsync's own rows only.
pub fn prune_delete_rows() -> String {
    format!(
        "WITH {PRUNED},\n\
         gone AS (\n    DELETE FROM embedding_cache c USING doomed d WHERE c.id = d.id RETURNING c.id\n),\n\
         disowned AS (\n    DELETE FROM embedding_cache_owned o USING doomed d WHERE o.cache_id = d.id\n)\n\
         SELECT count(*)::int8 FROM gone"
    )
}

/// Rows embsync wrote that name a pruned source (`$1`/`$2`) as theirs and that another source
/// still links get that source, so `source_table`/`source_column` stay true (as
/// [`REASSIGN_SOURCE`] does for stale values). Reached through the pruned links, not a scan of
/// the cache. Run before [`PRUNE_UNLINK`].
pub const PRUNE_REASSIGN: &str = "\
WITH t AS (
    SELECT * FROM unnest($1::text[], $2::text[]) AS t(source_table, source_column)
)
UPDATE embedding_cache c
SET source_table = other.source_table, source_column = other.source_column
FROM embedding_cache_sources l
JOIN t ON t.source_table = l.source_table AND t.source_column = l.source_column
JOIN embedding_cache_owned o ON o.value_hash = l.value_hash,
LATERAL (SELECT x.source_table, x.source_column FROM embedding_cache_sources x
         WHERE x.value_hash = l.value_hash
           AND NOT EXISTS (SELECT 1 FROM t WHERE t.source_table = x.source_table AND t.source_column = x.source_column)
         ORDER BY x.linked_at, x.source_table, x.source_column LIMIT 1) other
WHERE c.value_hash = l.value_hash AND o.cache_id = c.id AND c.source_table = l.source_table AND c.source_column = l.source_column";

/// Removes the links of the pruned sources (`$1`/`$2`). Rows affected = links removed.
pub const PRUNE_UNLINK: &str = "\
DELETE FROM embedding_cache_sources l USING unnest($1::text[], $2::text[]) AS t(source_table, source_column)
WHERE l.source_table = t.source_table AND l.source_column = t.source_column";

/// Removes the errors of the pruned sources (`$1`/`$2`). Rows affected = errors removed.
pub const PRUNE_ERRORS: &str = "\
DELETE FROM embedding_sync_errors e USING unnest($1::text[], $2::text[]) AS t(source_table, source_column)
WHERE e.source_table = t.source_table AND e.source_column = t.source_column";

/// Keeps the newest `$1` (int8) finished runs and deletes the older ones with their sources
/// and any snapshot left of them. Run when a run finishes: it deletes what one run added, read
/// through [`RUNS_FINISHED_INDEX`].
pub const DELETE_OLD_RUNS: &str = "\
WITH old AS (
    SELECT run_id FROM embedding_sync_runs
    WHERE finished_at IS NOT NULL
    ORDER BY finished_at DESC
    OFFSET $1
),
sources AS (
    DELETE FROM embedding_sync_run_sources s USING old WHERE s.run_id = old.run_id
),
pending AS (
    DELETE FROM embedding_sync_pending p USING old WHERE p.run_id = old.run_id
)
DELETE FROM embedding_sync_runs r USING old WHERE r.run_id = old.run_id";

/// The index [`LAST_RUNS`] and [`DELETE_OLD_RUNS`] read finished runs by, newest first. DDL on
/// embsync's own table, a step of [`migration`].
pub const RUNS_FINISHED_INDEX: &str = "\
CREATE INDEX IF NOT EXISTS embedding_sync_runs_finished_idx ON embedding_sync_runs (finished_at DESC) WHERE finished_at IS NOT NULL;";

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
    fn migration_sql() {
        let config = Config::parse(
            r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
            "sources":[{"name":"A","table":"a","column":"b"}]}"#,
        )
        .unwrap();
        let locks = |existed| migration(&config.models, existed).iter().map(|s| s.locks).collect::<Vec<_>>().join(", ");
        // On a cache that exists (maybe another pipeline's) no step names it: it is only read.
        expect!["the vector extension, embedding_cache_sources, embedding_cache_owned, embedding_cache_owned, embedding_sync_errors, embedding_sync_runs, embedding_sync_run_sources, embedding_sync_pending, embedding_sync_orphans, embedding_sync_lease, embedding_sync_runs, embedding_sync_schema"].assert_eq(&locks(true));
        expect!["the vector extension, embedding_cache, embedding_cache_sources, embedding_cache_owned, embedding_cache_owned, embedding_sync_errors, embedding_sync_runs, embedding_sync_run_sources, embedding_sync_pending, embedding_sync_orphans, embedding_sync_lease, embedding_sync_runs, embedding_sync_schema"].assert_eq(&locks(false));
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
        expect!["embedding_cache.id is uuid, but embsync records the rows it inserted by an integer id: use a bigint id (id bigserial PRIMARY KEY)"].assert_eq(&shape(true, Some("uuid")));
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
            SELECT s.h, s.v, s.n, coalesce((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)), false) AS has_large, coalesce((c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)), false) AS has_small
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
            SELECT s.h, s.v, s.n, coalesce((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)), false) AS has_large, coalesce((c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4)), false) AS has_small
            FROM (SELECT value_hash AS h, value AS v, occurrences AS n FROM embedding_sync_pending
                  WHERE run_id = $5 AND source_table = $1 AND source_column = $2 AND value_hash > $6) s
            LEFT JOIN embedding_cache c ON c.value_hash = s.h AND c.value_hash > $6
                LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.value_hash > $6 AND o.cache_id = c.id
            WHERE NOT (coalesce(((c.embedding_large IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.large_model, $3) = $3)) AND (c.embedding_small IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.small_model, $4) = $4))), false)
                       AND EXISTS (SELECT 1 FROM embedding_cache_sources l
                                   WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))
              AND NOT EXISTS (SELECT 1 FROM embedding_sync_errors e
                              WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = s.h
                                AND e.next_retry_at > now())
            ORDER BY s.h
            LIMIT $7"#]].assert_eq(&pending_snapshot_page());
        expect![[r#"
            WITH src AS MATERIALIZED (
                SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n
                FROM (SELECT btrim("title"::text, ' ') AS v, count(*) AS n FROM "app"."Items" WHERE "title" IS NOT NULL GROUP BY 1) d
                WHERE d.v <> ''
            ),
            c AS MATERIALIZED (
                SELECT (SELECT count(*) FROM src) AS total, count(*) AS had,
                       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM src s WHERE s.h = l.value_hash)) AS stale
                FROM embedding_cache_sources l WHERE l.source_table = $1 AND l.source_column = $2
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
            WHERE c.value_hash = w.h AND (w.put_l OR w.put_s)"#]].assert_eq(UPSERT_BATCH);
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
        let models = Config::parse(include_str!("../../../embedding-sources.json")).unwrap().models;
        assert!(migration(&models, false).iter().any(|s| s.sql == RUNS_FINISHED_INDEX), "the runs index is part of the migration");
    }
}
