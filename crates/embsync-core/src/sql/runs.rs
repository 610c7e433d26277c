//! Runs and the lease: the fence of every write, a run's bookkeeping, and its history's retention.

use super::*;
use crate::report::SourceReport;
use crate::sync::Progress;
use param::int8;

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
/// run's orphans are deleted ([`delete_orphans`](super::delete_orphans)).
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

/// Adds the reasons `$2` (text[]) the provider refused a model's requests to run `$1`, each
/// once.
pub const RECORD_REFUSED: &str = "\
UPDATE embedding_sync_runs
SET refused = refused || ARRAY(SELECT DISTINCT r FROM unnest($2::text[]) AS r WHERE r <> ALL (refused) ORDER BY r),
    updated_at = now()
WHERE run_id = $1 AND finished_at IS NULL";

/// Keeps the newest `$1` (int8) finished runs and deletes the older ones with their sources
/// and any snapshot left of them. Run when a run finishes: it deletes what one run added, read
/// through [`RUNS_FINISHED_INDEX`](super::RUNS_FINISHED_INDEX).
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

/// [`SAVE_PLAN`]: a source's plan.
#[derive(Debug)]
pub struct SavePlan<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
    /// Its plan's counts.
    pub plan: &'a SourceReport,
}

impl Statement for SavePlan<'_> {
    fn text(&self) -> Cow<'static, str> {
        SAVE_PLAN.into()
    }
    fn params(&self) -> Vec<Param<'_>> {
        let p = self.plan;
        let [t, c] = param::keys(self.source);
        vec![param::run(self.run), t, c, int8(p.total), int8(p.new), int8(p.unchanged), int8(p.reused), int8(p.deferred), int8(p.batches)]
    }
}

/// [`ADD_PROGRESS`]: one batch's counters.
#[derive(Debug)]
pub struct AddProgress<'a> {
    /// The source.
    pub source: &'a Source,
    /// The batch's progress (with its run).
    pub progress: &'a Progress<'a>,
}

impl Statement for AddProgress<'_> {
    fn text(&self) -> Cow<'static, str> {
        ADD_PROGRESS.into()
    }
    fn params(&self) -> Vec<Param<'_>> {
        let p = self.progress;
        let (l, s) = &p.usage;
        let [t, c] = param::keys(self.source);
        vec![
            param::run(p.run),
            t,
            c,
            int8(p.embedded),
            int8(p.reused),
            int8(p.batches),
            int8(l.prompt_tokens),
            int8(l.requests),
            int8(s.prompt_tokens),
            int8(s.requests),
        ]
    }
}

/// [`ADD_ERRORS`] (`count` errors) or [`SOURCE_DONE`] (`count` stale values): a count for one
/// source of a run.
#[derive(Debug)]
pub struct SourceCount<'a> {
    /// [`ADD_ERRORS`] or [`SOURCE_DONE`].
    pub statement: &'static str,
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
    /// The count.
    pub count: u64,
}

impl Statement for SourceCount<'_> {
    fn text(&self) -> Cow<'static, str> {
        self.statement.into()
    }
    fn params(&self) -> Vec<Param<'_>> {
        let [t, c] = param::keys(self.source);
        vec![param::run(self.run), t, c, int8(self.count)]
    }
}
