//! The HNSW indexes embsync manages on a cache it created.

use super::*;

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
