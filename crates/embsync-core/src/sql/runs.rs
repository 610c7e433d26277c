//! Runs and the lease: the fence of every write, a run's bookkeeping, and its history's retention.

use super::*;
use crate::report::{IndexReport, RunReport, SourceReport, Trigger};
use crate::sync::Progress;
use param::int8;
use std::time::Duration;

/// Takes the sync lease for `$1` (holder) for `$2` (float8 seconds) unless someone else holds
/// it unexpired. One row when taken: the lease's new `generation` (int8), which with the holder
/// is this invocation's fencing token ([`FENCE`]); none when not. Every acquisition starts a new
/// generation, also when the holder id is the same, so a token is never valid twice. The row is
/// never deleted (a release expires it), so generations only grow.
pub const ACQUIRE_LEASE: Text<2> = Text::fixed(
    "\
INSERT INTO embedding_sync_lease AS l (name, holder, expires_at, generation)
VALUES ('sync', $1, now() + make_interval(secs => $2), 1)
ON CONFLICT (name) DO UPDATE
SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, generation = l.generation + 1
WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
RETURNING generation",
);

/// Who holds the lease and for how many more seconds: `holder`, `secs` (float8).
pub const LEASE_HOLDER: &str = "\
SELECT holder, extract(epoch FROM expires_at - now())::float8 FROM embedding_sync_lease WHERE name = 'sync'";

/// The fence: the first statement of every transaction that writes for an invocation. Extends
/// the lease of the token `$1` (holder), `$2` (generation, int8) by `$3` (float8) seconds from
/// now; 0 rows when the token no longer holds it unexpired, and then the transaction writes
/// nothing. The row lock it takes is held until the transaction ends, so nobody takes the lease
/// over while a fenced transaction is in flight.
pub const FENCE: Text<3> = Text::fixed(
    "\
UPDATE embedding_sync_lease SET expires_at = now() + make_interval(secs => $3)
WHERE name = 'sync' AND holder = $1 AND generation = $2 AND expires_at > now()",
);

/// Gives up the lease of the token `$1` (holder), `$2` (generation): it expires now (the row
/// stays, keeping its generation). A token that no longer holds it changes nothing.
pub const RELEASE_LEASE: Text<2> = Text::fixed(
    "\
UPDATE embedding_sync_lease SET expires_at = now()
WHERE name = 'sync' AND holder = $1 AND generation = $2 AND expires_at > now()",
);

/// The limits of a fenced transaction, transaction-scoped (`set_config(.., true)` is
/// `SET LOCAL`): `$1` `statement_timeout`, `$2` `lock_timeout`, `$3`
/// `idle_in_transaction_session_timeout`, each in milliseconds as text.
pub const WRITE_LIMITS: Text<3> = Text::fixed(
    "\
SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true),
       set_config('idle_in_transaction_session_timeout', $3, true)",
);

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
pub const START_RUN: Text<3> = Text::fixed(
    "\
INSERT INTO embedding_sync_runs (run_id, trigger, invocations, models) VALUES ($1, $2, 1, $3)
RETURNING run_id, trigger, (extract(epoch FROM started_at) * 1000)::float8, invocations, models, refused",
);

/// Adds the run's sources: `$1` run, `$2` tables, `$3` columns, `$4` names (text[]).
pub const START_RUN_SOURCES: Text<4> = Text::fixed(
    "\
INSERT INTO embedding_sync_run_sources (run_id, source_table, source_column, name, position)
SELECT $1, t, c, n, (p - 1)::int4 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u(t, c, n, p)",
);

/// A run's sources in config order.
pub const RUN_SOURCES: Text<1> = Text::fixed(
    "\
SELECT source_table, source_column, name, planned, done, planned_batches, total, new, unchanged, reused,
       embedded, stale, deleted, errors, deferred, batches, tokens_large, requests_large, tokens_small, requests_small,
       batch_tokens_large, batch_requests_large, batch_tokens_small, batch_requests_small
FROM embedding_sync_run_sources WHERE run_id = $1 ORDER BY position",
);

/// Ends a run whose sources no longer match the config (it was changed mid-run): `$1` run.
pub const ABANDON_RUN: Text<1> = Text::fixed(
    "\
UPDATE embedding_sync_runs SET status = 'abandoned', finished_at = now(), updated_at = now() WHERE run_id = $1",
);

/// Saves a source's plan: `$1` run, `$2` table, `$3` column, `$4` total, `$5` new,
/// `$6` unchanged, `$7` reused, `$8` deferred, `$9` planned batches (int8 each).
pub const SAVE_PLAN: Text<9> = Text::fixed(
    "\
UPDATE embedding_sync_run_sources
SET planned = true, total = $4, new = $5, unchanged = $6, reused = $7, deferred = $8, planned_batches = $9
WHERE run_id = $1 AND source_table = $2 AND source_column = $3",
);

/// Adds one batch to a source's counters: `$1` run, `$2` table, `$3` column, `$4` embedded,
/// `$5` reused, `$6` batches, `$7` large tokens, `$8` large requests, `$9` small tokens,
/// `$10` small requests (int8 each).
pub const ADD_PROGRESS: Text<10> = Text::fixed(
    "\
UPDATE embedding_sync_run_sources
SET embedded = embedded + $4, reused = reused + $5, batches = batches + $6,
    tokens_large = tokens_large + $7, requests_large = requests_large + $8,
    tokens_small = tokens_small + $9, requests_small = requests_small + $10
WHERE run_id = $1 AND source_table = $2 AND source_column = $3",
);

/// Adds `$4` (int8) errors to a source's counters.
pub const ADD_ERRORS: Text<4> = Text::fixed(
    "\
UPDATE embedding_sync_run_sources SET errors = errors + $4
WHERE run_id = $1 AND source_table = $2 AND source_column = $3",
);

/// Marks a source done with its stale count `$4` (int8). Its `deleted` count grows when the
/// run's orphans are deleted ([`delete_orphans`](super::delete_orphans)).
pub const SOURCE_DONE: Text<4> = Text::fixed(
    "\
UPDATE embedding_sync_run_sources SET stale = $4, done = true
WHERE run_id = $1 AND source_table = $2 AND source_column = $3",
);

/// Ends run `$1` with its report `$2` (JSON text) and status `$3` (`finished` or `failed`).
pub const FINISH_RUN: Text<3> = Text::fixed(
    "\
UPDATE embedding_sync_runs SET status = $3, finished_at = now(), updated_at = now(), report = $2::text::jsonb
WHERE run_id = $1 AND finished_at IS NULL",
);

/// Adds the index step (`$2`, JSON text) to the stored report of finished run `$1`.
pub const RECORD_INDEXES: Text<2> = Text::fixed(
    "\
UPDATE embedding_sync_runs SET report = jsonb_set(report, '{indexes}', $2::text::jsonb), updated_at = now()
WHERE run_id = $1 AND report IS NOT NULL",
);

/// Adds the reasons `$2` (text[]) the provider refused a model's requests to run `$1`, each
/// once.
pub const RECORD_REFUSED: Text<2> = Text::fixed(
    "\
UPDATE embedding_sync_runs
SET refused = refused || ARRAY(SELECT DISTINCT r FROM unnest($2::text[]) AS r WHERE r <> ALL (refused) ORDER BY r),
    updated_at = now()
WHERE run_id = $1 AND finished_at IS NULL",
);

/// Keeps the newest `$1` (int8) finished runs and deletes the older ones with their sources
/// and any snapshot left of them. Run when a run finishes: it deletes what one run added, read
/// through [`RUNS_FINISHED_INDEX`](super::RUNS_FINISHED_INDEX).
pub const DELETE_OLD_RUNS: Text<1> = Text::fixed(
    "\
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
DELETE FROM embedding_sync_runs r USING old WHERE r.run_id = old.run_id",
);

/// [`ACQUIRE_LEASE`].
#[derive(Debug)]
pub struct AcquireLease<'a> {
    /// Who takes it (the invocation's id).
    pub holder: &'a str,
    /// For how long.
    pub ttl: Duration,
}

impl Statement<2> for AcquireLease<'_> {
    fn text(&self) -> Text<2> {
        ACQUIRE_LEASE
    }
    fn params(&self) -> [Param<'_>; 2] {
        [param::text(self.holder), param::secs(self.ttl)]
    }
}

/// [`FENCE`]: the lease token's check and renewal.
#[derive(Debug)]
pub struct Fence<'a> {
    /// The token's holder.
    pub holder: &'a str,
    /// The token's generation ([`ACQUIRE_LEASE`] returned it).
    pub generation: i64,
    /// The lease is extended by this much from now.
    pub ttl: Duration,
}

impl Statement<3> for Fence<'_> {
    fn text(&self) -> Text<3> {
        FENCE
    }
    fn params(&self) -> [Param<'_>; 3] {
        [param::text(self.holder), Param::Int8(self.generation), param::secs(self.ttl)]
    }
}

/// [`RELEASE_LEASE`].
#[derive(Debug)]
pub struct ReleaseLease<'a> {
    /// The token's holder.
    pub holder: &'a str,
    /// The token's generation.
    pub generation: i64,
}

impl Statement<2> for ReleaseLease<'_> {
    fn text(&self) -> Text<2> {
        RELEASE_LEASE
    }
    fn params(&self) -> [Param<'_>; 2] {
        [param::text(self.holder), Param::Int8(self.generation)]
    }
}

/// [`WRITE_LIMITS`]: a fenced transaction's timeouts (bound in milliseconds).
#[derive(Debug)]
pub struct WriteLimits {
    /// `statement_timeout`.
    pub statement: Duration,
    /// `lock_timeout`.
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout`.
    pub idle: Duration,
}

impl Statement<3> for WriteLimits {
    fn text(&self) -> Text<3> {
        WRITE_LIMITS
    }
    fn params(&self) -> [Param<'_>; 3] {
        [param::millis(self.statement), param::millis(self.lock), param::millis(self.idle)]
    }
}

/// [`START_RUN`].
#[derive(Debug)]
pub struct StartRun<'a> {
    /// The new run's id.
    pub run: &'a RunId,
    /// What started it.
    pub trigger: Trigger,
    /// The configured model tags, recorded with it ([`ModelTags::recorded`]).
    pub tags: &'a ModelTags,
}

impl Statement<3> for StartRun<'_> {
    fn text(&self) -> Text<3> {
        START_RUN
    }
    fn params(&self) -> [Param<'_>; 3] {
        [param::run(self.run), param::text(self.trigger.as_str()), Param::Text(self.tags.recorded().into())]
    }
}

/// [`START_RUN_SOURCES`]: the run's sources, in config order.
#[derive(Debug)]
pub struct StartRunSources<'a> {
    /// The run.
    pub run: &'a RunId,
    /// Its sources.
    pub sources: &'a [&'a Source],
}

impl Statement<4> for StartRunSources<'_> {
    fn text(&self) -> Text<4> {
        START_RUN_SOURCES
    }
    fn params(&self) -> [Param<'_>; 4] {
        let keys = self.sources.iter().map(|s| (Cow::Owned(s.table_key()), Cow::Borrowed(s.column_key())));
        let [tables, columns] = param::key_arrays(keys);
        [param::run(self.run), tables, columns, param::texts(self.sources.iter().map(|s| s.name.as_str()))]
    }
}

/// [`RUN_SOURCES`].
#[derive(Debug)]
pub struct RunSources<'a> {
    /// The run.
    pub run: &'a RunId,
}

impl Statement<1> for RunSources<'_> {
    fn text(&self) -> Text<1> {
        RUN_SOURCES
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::run(self.run)]
    }
}

/// [`ABANDON_RUN`].
#[derive(Debug)]
pub struct AbandonRun<'a> {
    /// The run.
    pub run: &'a RunId,
}

impl Statement<1> for AbandonRun<'_> {
    fn text(&self) -> Text<1> {
        ABANDON_RUN
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::run(self.run)]
    }
}

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

impl Statement<9> for SavePlan<'_> {
    fn text(&self) -> Text<9> {
        SAVE_PLAN
    }
    fn params(&self) -> [Param<'_>; 9] {
        let p = self.plan;
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c, int8(p.total), int8(p.new), int8(p.unchanged), int8(p.reused), int8(p.deferred), int8(p.batches)]
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

impl Statement<10> for AddProgress<'_> {
    fn text(&self) -> Text<10> {
        ADD_PROGRESS
    }
    fn params(&self) -> [Param<'_>; 10] {
        let p = self.progress;
        let (l, s) = &p.usage;
        let [t, c] = param::keys(self.source);
        [
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

/// [`ADD_ERRORS`]: errors recorded for a source of a run.
#[derive(Debug)]
pub struct AddErrors<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
    /// How many.
    pub errors: u64,
}

impl Statement<4> for AddErrors<'_> {
    fn text(&self) -> Text<4> {
        ADD_ERRORS
    }
    fn params(&self) -> [Param<'_>; 4] {
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c, int8(self.errors)]
    }
}

/// [`SOURCE_DONE`]: a source of a run is done, with its stale count.
#[derive(Debug)]
pub struct SourceDone<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
    /// The stale values it unlinked.
    pub stale: u64,
}

impl Statement<4> for SourceDone<'_> {
    fn text(&self) -> Text<4> {
        SOURCE_DONE
    }
    fn params(&self) -> [Param<'_>; 4] {
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c, int8(self.stale)]
    }
}

/// [`FINISH_RUN`]: the run's report (stored as JSON) and its status.
#[derive(Debug)]
pub struct FinishRun<'a> {
    /// The run.
    pub run: &'a RunId,
    /// Its report.
    pub report: &'a RunReport,
}

impl Statement<3> for FinishRun<'_> {
    fn text(&self) -> Text<3> {
        FINISH_RUN
    }
    fn params(&self) -> [Param<'_>; 3] {
        let json = serde_json::to_string(self.report).unwrap_or_else(|_| "null".into());
        [param::run(self.run), Param::Text(json.into()), param::text(self.report.status.as_str())]
    }
}

/// [`RECORD_INDEXES`]: the index step, added to a finished run's stored report.
#[derive(Debug)]
pub struct RecordIndexes<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The index step.
    pub indexes: &'a IndexReport,
}

impl Statement<2> for RecordIndexes<'_> {
    fn text(&self) -> Text<2> {
        RECORD_INDEXES
    }
    fn params(&self) -> [Param<'_>; 2] {
        let json = serde_json::to_string(self.indexes).unwrap_or_else(|_| "null".into());
        [param::run(self.run), Param::Text(json.into())]
    }
}

/// [`RECORD_REFUSED`].
#[derive(Debug)]
pub struct RecordRefused<'a> {
    /// The run.
    pub run: &'a RunId,
    /// Why the provider refused a model's requests.
    pub reasons: &'a [String],
}

impl Statement<2> for RecordRefused<'_> {
    fn text(&self) -> Text<2> {
        RECORD_REFUSED
    }
    fn params(&self) -> [Param<'_>; 2] {
        [param::run(self.run), param::texts(self.reasons.iter().map(String::as_str))]
    }
}

/// [`DELETE_OLD_RUNS`].
#[derive(Debug)]
pub struct DeleteOldRuns {
    /// Finished runs kept (`retention.runs`).
    pub keep: u64,
}

impl Statement<1> for DeleteOldRuns {
    fn text(&self) -> Text<1> {
        DELETE_OLD_RUNS
    }
    fn params(&self) -> [Param<'_>; 1] {
        [int8(self.keep)]
    }
}
