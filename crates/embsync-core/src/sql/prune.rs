//! Sources that left the config: what `/status` lists of them and what `POST /prune` removes.

use super::*;
use crate::prune::LeftSource;

/// The recorded sources (in `embedding_cache_sources`, `embedding_sync_errors` or, with
/// `batches`, `embedding_sync_batch_values`) that are not among the enabled ones (`$1` tables,
/// `$2` columns, text[]), with `links`, `errors`, `rows` (cache rows embsync wrote that no other
/// source links) and `batch_values` (its values recorded in Batch API files, 0 without
/// `batches`), in name order. The keys of links and errors are found by a loose index scan of
/// each primary key (one probe per source, not a scan of the links); the batch values, which
/// exist only while a batch is pending, are scanned; the counts cost what the left sources hold.
pub fn left_sources(state: SchemaState, batches: bool) -> Text<2> {
    // Before the schema is migrated (a `/status` read after an upgrade), ownership is by hash.
    let owned_row = if state.owned_by_row { " AND o.cache_id = c.id" } else { "" };
    // Before schema version 4 there is no batch table.
    let (batched, batch_values) = if batches {
        (
            " UNION SELECT DISTINCT source_table, source_column FROM embedding_sync_batch_values",
            "(SELECT count(*) FROM embedding_sync_batch_values v
                     WHERE v.source_table = g.source_table AND v.source_column = g.source_column)",
        )
    } else {
        ("", "0::int8")
    };
    Text::built(format!(
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
    SELECT source_table, source_column FROM linked UNION SELECT source_table, source_column FROM failed{batched}
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
                            AND (x.source_table <> g.source_table OR x.source_column <> g.source_column))) AS rows,
       {batch_values} AS batch_values
FROM gone g
ORDER BY g.source_table, g.source_column"
    ))
}

/// For each table of `$1` (quoted names, text[]), the 1-based position in `$2` (quoted names of
/// the enabled sources' tables, text[]) of the first that is the same relation in the catalog,
/// or NULL (also for a table that does not exist): `i`, `j` (int8).
pub const SAME_TABLES: Text<2> = Text::fixed(
    "\
SELECT l.i, (SELECT min(e.j) FROM unnest($2::text[]) WITH ORDINALITY AS e(name, j)
             WHERE to_regclass(e.name) = to_regclass(l.name))
FROM unnest($1::text[]) WITH ORDINALITY AS l(name, i)",
);

/// The sources a prune removes (`$1` tables, `$2` columns, text[]) as `t`, and as `doomed` the
/// values whose cache rows it deletes: linked by one of them, written by embsync, and linked by
/// no other source.
pub(super) const PRUNED: &str = "\
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
pub fn prune_rows() -> Text<2> {
    Text::built(format!("WITH {PRUNED}\nSELECT count(*)::int8 FROM doomed"))
}

/// Deletes the cache rows a prune of `$1`/`$2` deletes (see [`prune_rows`]) and their ownership
/// rows; one row: the number of cache rows deleted (int8). Takes ROW EXCLUSIVE on the cache and
/// row locks on embsync's own rows only.
pub fn prune_delete_rows() -> Text<2> {
    Text::built(format!(
        "WITH {PRUNED},\n\
         gone AS (\n    DELETE FROM embedding_cache c USING doomed d WHERE c.id = d.id RETURNING c.id\n),\n\
         disowned AS (\n    DELETE FROM embedding_cache_owned o USING doomed d WHERE o.cache_id = d.id\n)\n\
         SELECT count(*)::int8 FROM gone"
    ))
}

/// Rows embsync wrote that name a pruned source (`$1`/`$2`) as theirs and that another source
/// still links get that source, so `source_table`/`source_column` stay true (as
/// [`REASSIGN_SOURCE`] does for stale values). Reached through the pruned links, not a scan of
/// the cache. Run before [`PRUNE_UNLINK`].
pub const PRUNE_REASSIGN: Text<2> = Text::fixed(
    "\
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
WHERE c.value_hash = l.value_hash AND o.cache_id = c.id AND c.source_table = l.source_table AND c.source_column = l.source_column",
);

/// Removes the links of the pruned sources (`$1`/`$2`). Rows affected = links removed.
pub const PRUNE_UNLINK: Text<2> = Text::fixed(
    "\
DELETE FROM embedding_cache_sources l USING unnest($1::text[], $2::text[]) AS t(source_table, source_column)
WHERE l.source_table = t.source_table AND l.source_column = t.source_column",
);

/// Removes the errors of the pruned sources (`$1`/`$2`). Rows affected = errors removed.
pub const PRUNE_ERRORS: Text<2> = Text::fixed(
    "\
DELETE FROM embedding_sync_errors e USING unnest($1::text[], $2::text[]) AS t(source_table, source_column)
WHERE e.source_table = t.source_table AND e.source_column = t.source_column",
);

/// The Batch API's values a prune of `$1`/`$2` removes from `embedding_sync_batch_values`: the
/// pruned sources' values in pending files (their vectors would not be stored: the source is
/// not synced), and any row of a file embsync is done with or has no record of (none are left
/// by the sync, which forgets a file's values when it ends it). Their vectors, if the batch
/// brings them, are not stored; a value an enabled source also has is no longer held back from
/// the synchronous way by the pruned source's file.
const PRUNED_BATCH_VALUES: &str = "\
embedding_sync_batch_values v
WHERE (v.source_table, v.source_column) IN (SELECT * FROM unnest($1::text[], $2::text[]))
   OR NOT EXISTS (SELECT 1 FROM embedding_sync_batches b WHERE b.input_file_id = v.input_file_id AND b.finished_at IS NULL)";

/// How many rows of `embedding_sync_batch_values` a prune of `$1`/`$2` removes (one row, int8).
pub fn prune_batch_values_count() -> Text<2> {
    Text::built(format!("SELECT count(*)::int8 FROM {PRUNED_BATCH_VALUES}"))
}

/// Removes them. Rows affected = rows removed.
pub fn prune_batch_values() -> Text<2> {
    Text::built(format!("DELETE FROM {PRUNED_BATCH_VALUES}"))
}

/// [`prune_batch_values_count`] of the pruned sources.
#[derive(Debug)]
pub struct PruneBatchValuesCount<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneBatchValuesCount<'_> {
    fn text(&self) -> Text<2> {
        prune_batch_values_count()
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}

/// [`prune_batch_values`] of the pruned sources.
#[derive(Debug)]
pub struct PruneBatchValues<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneBatchValues<'_> {
    fn text(&self) -> Text<2> {
        prune_batch_values()
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}

/// [`left_sources`]: the recorded sources that are not among `enabled`.
#[derive(Debug)]
pub struct LeftSources<'a> {
    /// What exists.
    pub state: SchemaState,
    /// Whether the Batch API's tables exist (schema version 4).
    pub batches: bool,
    /// The config's enabled sources.
    pub enabled: &'a [&'a Source],
}

impl Statement<2> for LeftSources<'_> {
    fn text(&self) -> Text<2> {
        left_sources(self.state, self.batches)
    }
    fn params(&self) -> [Param<'_>; 2] {
        param::key_arrays(self.enabled.iter().map(|s| (Cow::Owned(s.table_key()), Cow::Borrowed(s.column_key()))))
    }
}

/// [`SAME_TABLES`]: which of the left sources' tables is an enabled source's table.
#[derive(Debug)]
pub struct SameTables<'a> {
    /// The left sources' tables, quoted ([`LeftSource::quoted_table`]).
    pub left: &'a [String],
    /// The config's enabled sources.
    pub enabled: &'a [&'a Source],
}

impl Statement<2> for SameTables<'_> {
    fn text(&self) -> Text<2> {
        SAME_TABLES
    }
    fn params(&self) -> [Param<'_>; 2] {
        let enabled = self.enabled.iter().map(|s| Cow::Owned(s.table.quoted())).collect();
        [param::texts(self.left.iter().map(String::as_str)), Param::TextArray(enabled)]
    }
}

/// The pruned sources' keys as `$1` (tables) and `$2` (columns).
fn pruned(targets: &[LeftSource]) -> [Param<'_>; 2] {
    param::key_arrays(targets.iter().map(|t| (Cow::Borrowed(t.table.as_str()), Cow::Borrowed(t.column.as_str()))))
}

/// [`prune_rows`] of the pruned sources.
#[derive(Debug)]
pub struct PruneRows<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneRows<'_> {
    fn text(&self) -> Text<2> {
        prune_rows()
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}

/// [`prune_delete_rows`] of the pruned sources.
#[derive(Debug)]
pub struct PruneDeleteRows<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneDeleteRows<'_> {
    fn text(&self) -> Text<2> {
        prune_delete_rows()
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}

/// [`PRUNE_REASSIGN`] of the pruned sources.
#[derive(Debug)]
pub struct PruneReassign<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneReassign<'_> {
    fn text(&self) -> Text<2> {
        PRUNE_REASSIGN
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}

/// [`PRUNE_UNLINK`] of the pruned sources.
#[derive(Debug)]
pub struct PruneUnlink<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneUnlink<'_> {
    fn text(&self) -> Text<2> {
        PRUNE_UNLINK
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}

/// [`PRUNE_ERRORS`] of the pruned sources.
#[derive(Debug)]
pub struct PruneErrors<'a> {
    /// The sources pruned.
    pub targets: &'a [LeftSource],
}

impl Statement<2> for PruneErrors<'_> {
    fn text(&self) -> Text<2> {
        PRUNE_ERRORS
    }
    fn params(&self) -> [Param<'_>; 2] {
        pruned(self.targets)
    }
}
