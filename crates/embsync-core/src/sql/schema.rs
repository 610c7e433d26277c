//! The schema: its version, the migration, the checks of a cache embsync did not create, and the statistics it refreshes.

use super::*;

/// The version of embsync's schema this code needs, recorded in `embedding_sync_schema`.
///
/// 1 is every schema from before the version was recorded; 2 ties ownership to the cache row
/// (`embedding_cache_owned.cache_id`) and adds `embedding_sync_schema`; 3 adds
/// `embedding_sync_orphans` (rows to delete once every source has been planned) and
/// `embedding_sync_runs.refused` (a model the provider refused during the run); 4 adds
/// `embedding_sync_ranges` (fan-out: a run's pending snapshot split into ranges that queue
/// consumers claim), the change capture's tables (`embedding_sync_capture`,
/// `embedding_sync_change_log`, `embedding_sync_capture_values`, see [`super::capture`]) and the
/// Batch API's `embedding_sync_batches` and `embedding_sync_batch_values` ([`BATCH_TABLES`]); 5
/// adds the run's batch usage to `embedding_sync_run_sources` ([`BATCH_USAGE_COLUMNS`]).
pub const SCHEMA_VERSION: i32 = 5;

/// The migration step of [`SCHEMA_VERSION`] 5: the tokens and requests of each source's values
/// that came through the Batch API in a run (also counted in `tokens_*` and `requests_*`),
/// priced at the Batch API's price.
pub const BATCH_USAGE_COLUMNS: &str = "\
ALTER TABLE embedding_sync_run_sources
    ADD COLUMN IF NOT EXISTS batch_tokens_large bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS batch_requests_large bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS batch_tokens_small bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS batch_requests_small bigint NOT NULL DEFAULT 0";

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
    // Fan-out (version 4): ranges of a run's pending snapshot, claimed by queue consumers.
    steps.push(step(
        "embedding_sync_ranges",
        "CREATE TABLE IF NOT EXISTS embedding_sync_ranges (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    lo text NOT NULL,
    hi text NOT NULL,
    next text NOT NULL,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'done', 'dead')),
    holder text,
    generation bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    sent_at timestamptz,
    done_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS embedding_sync_ranges_run ON embedding_sync_ranges (run_id, source_table, source_column)",
    ));
    steps.push(step("embsync's change capture tables", CAPTURE_MIGRATION));
    // Version 4: the Batch API's request files, batches and their values.
    steps.push(step("embedding_sync_batches", BATCH_TABLES));
    // Version 5: the Batch API's usage per source of a run.
    steps.push(step("embedding_sync_run_sources", BATCH_USAGE_COLUMNS));
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

/// The index [`LAST_RUNS`] and [`DELETE_OLD_RUNS`] read finished runs by, newest first. DDL on
/// embsync's own table, a step of [`migration`].
pub const RUNS_FINISHED_INDEX: &str = "\
CREATE INDEX IF NOT EXISTS embedding_sync_runs_finished_idx ON embedding_sync_runs (finished_at DESC) WHERE finished_at IS NOT NULL;";
