//! What a source no longer has: stale removal under the mass-delete guard, and the run's orphans.

use super::*;
use crate::sync::DeleteGuard;

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
pub fn remove_stale(source: &Source) -> Text<5> {
    Text::built(format!(
        "WITH src AS MATERIALIZED (\n    {src}\n),\n\
         c AS MATERIALIZED (\n    \
         SELECT (SELECT count(*) FROM src) AS total, count(*) AS had, count(*) FILTER (WHERE s.h IS NULL) AS stale\n    \
         FROM embedding_cache_sources l LEFT JOIN src s ON s.h = l.value_hash\n    \
         WHERE l.source_table = $1 AND l.source_column = $2\n\
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
    ))
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
pub fn delete_orphans(sources: &[&Source]) -> Text<1> {
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
    Text::built(format!(
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
    ))
}

/// Whether any orphan candidate waits ([`delete_orphans`]).
pub const ORPHANS_WAITING: &str = "SELECT EXISTS (SELECT 1 FROM embedding_sync_orphans)";

/// Whether the source (`$1`, `$2`) has any recorded errors (a probe of the errors' key).
pub const HAS_ERRORS: Text<2> = Text::fixed(
    "\
SELECT EXISTS (SELECT 1 FROM embedding_sync_errors WHERE source_table = $1 AND source_column = $2)",
);

/// [`remove_stale`], with the mass-delete guard's parameters.
#[derive(Debug)]
pub struct RemoveStale<'a> {
    /// The source.
    pub source: &'a Source,
    /// The guard (`None`: off).
    pub guard: Option<DeleteGuard>,
}

impl Statement<5> for RemoveStale<'_> {
    fn text(&self) -> Text<5> {
        remove_stale(self.source)
    }
    fn params(&self) -> [Param<'_>; 5] {
        let (on, minimum, share) = match self.guard {
            Some(g) => (true, g.minimum.min(i64::MAX as u64) as i64, g.max_share),
            None => (false, 0, 1.0),
        };
        let [t, c] = param::keys(self.source);
        [t, c, Param::Bool(on), Param::Int8(minimum), Param::Float8(share)]
    }
}

/// [`delete_orphans`] at the end of run `run`, over the run's sources.
#[derive(Debug)]
pub struct DeleteOrphans<'a> {
    /// The run whose sources' counters count the deletions.
    pub run: &'a RunId,
    /// The run's sources.
    pub sources: &'a [&'a Source],
}

impl Statement<1> for DeleteOrphans<'_> {
    fn text(&self) -> Text<1> {
        delete_orphans(self.sources)
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::run(self.run)]
    }
}

/// [`HAS_ERRORS`].
#[derive(Debug)]
pub struct HasErrors<'a> {
    /// The source.
    pub source: &'a Source,
}

impl Statement<2> for HasErrors<'_> {
    fn text(&self) -> Text<2> {
        HAS_ERRORS
    }
    fn params(&self) -> [Param<'_>; 2] {
        param::keys(self.source)
    }
}
