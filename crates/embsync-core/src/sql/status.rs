//! What `GET /status` reads: the open run, the last runs, a source's coverage.

use super::*;

/// The unfinished run, if any: `run_id`, `status`, `trigger`, `invocations` (int4),
/// `started_at` (epoch milliseconds, float8).
pub const CURRENT_RUN: &str = "\
SELECT run_id, status, trigger, invocations, (extract(epoch FROM started_at) * 1000)::float8
FROM embedding_sync_runs WHERE finished_at IS NULL";

/// Whether `embedding_sync_orphans` exists (schema version 3; a `/status` read before a sync has
/// migrated an older schema finds none).
pub const HAS_ORPHANS_TABLE: &str = "SELECT to_regclass('embedding_sync_orphans') IS NOT NULL";

/// The orphan candidates waiting: `rows` (int8) and, when any, the oldest `unlinked_at` (epoch
/// milliseconds, float8).
pub const ORPHANS_WAITING_COUNT: &str =
    "SELECT count(*)::int8, (extract(epoch FROM min(unlinked_at)) * 1000)::float8 FROM embedding_sync_orphans";

/// The last `$1` (int8) finished runs, newest first: `run_id`, `status`, `report` (JSON text),
/// `finished_at` (epoch milliseconds, float8).
pub const LAST_RUNS: Text<1> = Text::fixed(
    "\
SELECT run_id, status, coalesce(report::text, 'null'), (extract(epoch FROM finished_at) * 1000)::float8 FROM embedding_sync_runs
WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT $1",
);

/// Coverage of one source: `total`, `embedded_large`, `embedded_small`, `errors` (int8 each;
/// errors of values the source still has); `$1`, `$2` the source's keys.
pub fn coverage(source: &Source) -> Text<2> {
    Text::built(format!(
        "WITH src AS MATERIALIZED (\n    {src}\n)\n\
         SELECT (SELECT count(*) FROM src),\n       \
         (SELECT count(*) FROM src s JOIN embedding_cache c ON c.value_hash = s.h WHERE c.embedding_large IS NOT NULL),\n       \
         (SELECT count(*) FROM src s JOIN embedding_cache c ON c.value_hash = s.h WHERE c.embedding_small IS NOT NULL),\n       \
         (SELECT count(*) FROM embedding_sync_errors e JOIN src s ON s.h = e.value_hash\n         \
         WHERE e.source_table = $1 AND e.source_column = $2)",
        src = source_values(source),
    ))
}

/// [`LAST_RUNS`].
#[derive(Debug)]
pub struct LastRuns {
    /// How many.
    pub n: u64,
}

impl Statement<1> for LastRuns {
    fn text(&self) -> Text<1> {
        LAST_RUNS
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::int8(self.n)]
    }
}

/// [`coverage`] of one source.
#[derive(Debug)]
pub struct SourceCoverage<'a> {
    /// The source.
    pub source: &'a Source,
}

impl Statement<2> for SourceCoverage<'_> {
    fn text(&self) -> Text<2> {
        coverage(self.source)
    }
    fn params(&self) -> [Param<'_>; 2] {
        param::keys(self.source)
    }
}

/// The Batch API files embsync has not finished with, oldest first: `slot`, `model`,
/// `batch_id` (NULL before the batch is created), `input_file_id`, `run_id`, `state`,
/// `created_at` (epoch milliseconds, float8), the age in seconds (float8), `polled_at` (epoch
/// milliseconds, float8, NULL before the first poll), `request_counts` (JSON text or NULL),
/// `requests`, `value_count` (int4), and the values still recorded for it (int8: an index scan
/// of the values' primary key by file).
pub const PENDING_BATCHES: &str = "\
SELECT b.slot, b.model, b.batch_id, b.input_file_id, b.run_id, b.state,
       (extract(epoch FROM b.created_at) * 1000)::float8, extract(epoch FROM now() - b.created_at)::float8,
       (extract(epoch FROM b.polled_at) * 1000)::float8, b.request_counts::text, b.requests, b.value_count,
       (SELECT count(*) FROM embedding_sync_batch_values v WHERE v.input_file_id = b.input_file_id)
FROM embedding_sync_batches b WHERE b.finished_at IS NULL ORDER BY b.created_at, b.input_file_id";
