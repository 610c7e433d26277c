//! Planning a source: its counts, the reusable values it links, and the pages of pending values (from the source, or from the run's snapshot).

use super::*;

/// Gives the plan query room to hash and join a large source in memory instead of spilling to
/// disk; transaction-scoped (`SET LOCAL`), so it also works through a transaction-pooling proxy.
pub const PLAN_WORK_MEM: &str = "SET LOCAL work_mem = '64MB'";

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
pub fn plan(source: &Source, state: SchemaState) -> Text<4> {
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
    Text::built(format!(
        "WITH src AS MATERIALIZED (\n    {src}\n),\n\
         fresh AS MATERIALIZED (\n    {fresh}\n)\n\
         SELECT\n    \
         (SELECT count(*) FROM src) AS total,\n    \
         (SELECT count(*) FROM fresh) AS new,\n    \
         (SELECT count(*) FROM fresh WHERE complete) AS reusable,\n    \
         (SELECT coalesce(sum((19 * octet_length(v)::int8 - 9 * char_length(v) + 39) / 40), 0)::int8 FROM fresh WHERE NOT complete) AS embed_tokens,\n    \
         ({stale}) AS stale,\n    \
         ({deferred}) AS deferred",
        // A database without embsync's tables (a dry run before the first sync) has no copy of a
        // captured source's values.
        src = if state.links { source_values(source) } else { scan_values(source) },
    ))
}

/// Links this source to every value it has whose cache row already holds both embeddings
/// (ours or another pipeline's): no provider call. A linked value is done, so its error record
/// for the source goes. One row: the values reused (int8).
pub fn link_reusable(source: &Source) -> Text<4> {
    Text::built(format!(
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
    ))
}

/// One page of values that still need an embedding, in hash order after `$5` (use `''` for the
/// first page), at most `$6` (int8) rows: `h`, `v`, `n`, `has_large`, `has_small`. Values whose
/// last failure asked for a later retry are left out until then. A model whose embedding of the
/// value is on its way in a pending batch ([`in_batch`]) counts as had: a value is left out when
/// batches cover every embedding it lacks, and is not sent for those it has or awaits.
pub fn pending_page(source: &Source) -> Text<6> {
    Text::built(format!(
        "WITH src AS (\n    {src}\n)\n\
         SELECT s.h, s.v, s.n, {has_large} AS has_large, {has_small} AS has_small\n\
         FROM src s\n\
         {join}\n\
         WHERE s.h > $5\n  \
         AND {not_done}\n  \
         AND {NOT_DEFERRED}\n  \
         AND {not_awaited}\n\
         ORDER BY s.h\n\
         LIMIT $6",
        src = source_values(source),
        has_large = had("large"),
        has_small = had("small"),
        not_done = not_done(),
        not_awaited = not_awaited(),
        join = join_cache(FULL),
    ))
}

/// A pending batch of the Batch API (not finished, for the configured tag `$3`/`$4` of `slot`)
/// has `s.h` (see [`super::batches`]): an index probe of `embedding_sync_batch_values`.
fn in_batch(slot: &str) -> String {
    let tag = if slot == "large" { "$3" } else { "$4" };
    format!(
        "EXISTS (SELECT 1 FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id\n           \
         WHERE bv.value_hash = s.h AND b.finished_at IS NULL AND b.slot = '{slot}' AND b.model = {tag})"
    )
}

/// The row has the `slot` embedding, or a pending batch brings it (a page's `has_*` column).
fn had(slot: &str) -> String {
    format!("(coalesce({}, false) OR {})", has(slot, FULL), in_batch(slot))
}

/// Not every embedding `s.h` lacks is on its way in a pending batch. A complete value (which may
/// only need its link) is never left out.
fn not_awaited() -> String {
    format!("(coalesce({complete}, false) OR NOT ({l} AND {s}))", complete = complete(FULL), l = had("large"), s = had("small"))
}

/// Snapshots a source's pending values for run `$5` (same condition as [`pending_page`]): one
/// scan of the source per run instead of one per page.
pub fn snapshot_pending(source: &Source) -> Text<5> {
    Text::built(format!(
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
    ))
}

/// One page of the snapshot of run `$5` (see [`snapshot_pending`]) after `$6`, at most `$7`
/// (int8) rows, leaving out values done since the snapshot and values waiting for a retry (before
/// the limit, so a short page is the last one) and values pending batches cover; same columns as
/// [`pending_page`]. An ordered
/// range scan of the snapshot's primary key.
///
/// Only values up to `$8` (a fan-out range's inclusive upper bound) unless it is empty: the
/// statement is unnamed, so Postgres plans it with the values bound and folds the test away.
pub fn pending_snapshot_page() -> Text<8> {
    Text::built(format!(
        "SELECT s.h, s.v, s.n, {has_large} AS has_large, {has_small} AS has_small\n\
         FROM (SELECT value_hash AS h, value AS v, occurrences AS n FROM embedding_sync_pending\n      \
         WHERE run_id = $5 AND source_table = $1 AND source_column = $2 AND value_hash > $6\n        AND ($8 = '' OR value_hash <= $8)) s\n\
         {join}\n\
         WHERE {not_done}\n  \
         AND {NOT_DEFERRED}\n  \
         AND {not_awaited}\n\
         ORDER BY s.h\n\
         LIMIT $7",
        has_large = had("large"),
        has_small = had("small"),
        not_done = not_done(),
        not_awaited = not_awaited(),
        // The range bound on the joined tables lets their merge joins start at the page
        // instead of reading every row before it (measured: 313 ms -> 8.5 ms a page with
        // 300,000 rows done).
        join = "LEFT JOIN embedding_cache c ON c.value_hash = s.h AND c.value_hash > $6\n    \
                LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.value_hash > $6 AND o.cache_id = c.id",
    ))
}

/// Whether run `$1` has a snapshot for the source (`$2`, `$3`).
pub const HAS_SNAPSHOT: Text<3> = Text::fixed(
    "\
SELECT EXISTS (SELECT 1 FROM embedding_sync_pending WHERE run_id = $1 AND source_table = $2 AND source_column = $3)",
);

/// Drops run `$1`'s snapshot of the source (`$2`, `$3`): it is done.
pub const DROP_SNAPSHOT: Text<3> =
    Text::fixed("DELETE FROM embedding_sync_pending WHERE run_id = $1 AND source_table = $2 AND source_column = $3");

/// Drops snapshots of runs that are over (finished, failed or abandoned).
pub const DROP_OLD_SNAPSHOTS: &str = "\
DELETE FROM embedding_sync_pending p USING embedding_sync_runs r WHERE r.run_id = p.run_id AND r.finished_at IS NOT NULL";

/// [`plan`]: a source's counts.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The source.
    pub source: &'a Source,
    /// What exists.
    pub state: SchemaState,
    /// The configured model tags.
    pub tags: &'a ModelTags,
}

impl Statement<4> for Plan<'_> {
    fn text(&self) -> Text<4> {
        plan(self.source, self.state)
    }
    fn params(&self) -> [Param<'_>; 4] {
        param::source_tags(self.source, self.tags)
    }
}

/// [`link_reusable`].
#[derive(Debug)]
pub struct LinkReusable<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured model tags.
    pub tags: &'a ModelTags,
}

impl Statement<4> for LinkReusable<'_> {
    fn text(&self) -> Text<4> {
        link_reusable(self.source)
    }
    fn params(&self) -> [Param<'_>; 4] {
        param::source_tags(self.source, self.tags)
    }
}

/// [`pending_page`]: a page read from the source.
#[derive(Debug)]
pub struct PendingPage<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured model tags.
    pub tags: &'a ModelTags,
    /// The last hash of the previous page (`None` for the first page).
    pub after: Option<&'a ValueHash>,
    /// At most this many rows.
    pub limit: i64,
}

impl Statement<6> for PendingPage<'_> {
    fn text(&self) -> Text<6> {
        pending_page(self.source)
    }
    fn params(&self) -> [Param<'_>; 6] {
        let [t, c, l, s] = param::source_tags(self.source, self.tags);
        [t, c, l, s, param::hash(self.after), Param::Int8(self.limit)]
    }
}

/// [`snapshot_pending`]: the run's snapshot of a source's pending values.
#[derive(Debug)]
pub struct SnapshotPending<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured model tags.
    pub tags: &'a ModelTags,
    /// The run.
    pub run: &'a RunId,
}

impl Statement<5> for SnapshotPending<'_> {
    fn text(&self) -> Text<5> {
        snapshot_pending(self.source)
    }
    fn params(&self) -> [Param<'_>; 5] {
        let [t, c, l, s] = param::source_tags(self.source, self.tags);
        [t, c, l, s, param::run(self.run)]
    }
}

/// [`pending_snapshot_page`]: a page read from the run's snapshot.
#[derive(Debug)]
pub struct PendingSnapshotPage<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured model tags.
    pub tags: &'a ModelTags,
    /// The run whose snapshot it reads.
    pub run: &'a RunId,
    /// The last hash of the previous page (`None` for the first page).
    pub after: Option<&'a ValueHash>,
    /// At most this many rows.
    pub limit: i64,
    /// Only values up to this hash (inclusive): a fan-out range's upper bound.
    pub upto: Option<&'a ValueHash>,
}

impl Statement<8> for PendingSnapshotPage<'_> {
    fn text(&self) -> Text<8> {
        pending_snapshot_page()
    }
    fn params(&self) -> [Param<'_>; 8] {
        let [t, c, l, s] = param::source_tags(self.source, self.tags);
        [t, c, l, s, param::run(self.run), param::hash(self.after), Param::Int8(self.limit), param::hash(self.upto)]
    }
}

/// [`HAS_SNAPSHOT`].
#[derive(Debug)]
pub struct HasSnapshot<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
}

impl Statement<3> for HasSnapshot<'_> {
    fn text(&self) -> Text<3> {
        HAS_SNAPSHOT
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c]
    }
}

/// [`DROP_SNAPSHOT`].
#[derive(Debug)]
pub struct DropSnapshot<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
}

impl Statement<3> for DropSnapshot<'_> {
    fn text(&self) -> Text<3> {
        DROP_SNAPSHOT
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c]
    }
}
