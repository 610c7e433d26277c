-- embsync's schema before it recorded a version (schema version 1), with vector(4) and vector(2)
-- for the tests' models: what a deployment of that version has. Copied from sql::ensure_schema then.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS embedding_cache (
    id bigserial PRIMARY KEY,
    value text NOT NULL,
    value_hash text NOT NULL UNIQUE,
    embedding_large vector(4),
    embedding_small vector(2),
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
    large_model text,
    small_model text,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Columns added to embsync's own tables after they were first created.
ALTER TABLE embedding_cache_owned ADD COLUMN IF NOT EXISTS large_model text;
ALTER TABLE embedding_cache_owned ADD COLUMN IF NOT EXISTS small_model text;
CREATE TABLE IF NOT EXISTS embedding_sync_errors (
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
);
CREATE TABLE IF NOT EXISTS embedding_sync_runs (
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
CREATE TABLE IF NOT EXISTS embedding_sync_run_sources (
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
);
CREATE TABLE IF NOT EXISTS embedding_sync_pending (
    run_id text NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    value_hash text NOT NULL,
    value text NOT NULL,
    occurrences bigint NOT NULL,
    PRIMARY KEY (run_id, source_table, source_column, value_hash)
);
CREATE TABLE IF NOT EXISTS embedding_sync_lease (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE embedding_cache IS 'embsync: created by embsync, which keeps the embsync_hnsw_* indexes on it when vectorIndexes is enabled';
