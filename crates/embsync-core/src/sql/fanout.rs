//! Fan-out: a run's pending snapshot of a source split into hash ranges
//! (`embedding_sync_ranges`), each embedded by a queue consumer that holds a claim on it.
//!
//! A range holds the snapshot's values with `lo < value_hash <= hi` (`lo` exclusive, `''` below
//! every hash; `hi` inclusive). `next` is its progress: the consumers have written or recorded
//! everything up to it (`lo` at first). `state` is `queued` until a consumer finished it (`done`)
//! or it was given up (`dead`: the dead-letter queue, a refused model, the token budget; with
//! `last_error`). A claim is `holder`, `generation` (grows with each claim) and `expires_at`,
//! the fencing token of every write of its consumer ([`FENCE_RANGE`]).

use super::param::{self, Param, Statement, Text};
use super::ModelTags;
use crate::config::Source;
use crate::hash::ValueHash;
use crate::sync::RunId;
use std::time::Duration;

/// Splits run `$1`'s snapshot of the source (`$2` table, `$3` column) into ranges of `$4`
/// (int8) values in hash order: one statement over the snapshot. Called once, while the lease
/// is held (fenced), right after the snapshot was saved; a source that has ranges already gets
/// none more. Its row count is the number of ranges.
pub const PLAN_RANGES: Text<4> = Text::fixed(
    "\
INSERT INTO embedding_sync_ranges (run_id, source_table, source_column, lo, hi, next)
SELECT $1, $2, $3, coalesce(lag(b.hi) OVER (ORDER BY b.hi), ''), b.hi, coalesce(lag(b.hi) OVER (ORDER BY b.hi), '')
FROM (
    SELECT max(p.value_hash) AS hi
    FROM (SELECT value_hash, (row_number() OVER (ORDER BY value_hash) - 1) / $4 AS bucket
          FROM embedding_sync_pending WHERE run_id = $1 AND source_table = $2 AND source_column = $3) p
    GROUP BY p.bucket
) b
WHERE NOT EXISTS (SELECT 1 FROM embedding_sync_ranges r WHERE r.run_id = $1 AND r.source_table = $2 AND r.source_column = $3)",
);

/// Run `$1`'s ranges per source (`source_table`, `source_column`) and state: `queued`, `done`,
/// `dead` (int8 each), and the errors of the dead ones (text[], `'range <id>: <error>'`).
pub const RANGE_TALLY: Text<1> = Text::fixed(
    "\
SELECT source_table, source_column,
       count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'dead'),
       coalesce(array_agg('range ' || id || ': ' || coalesce(last_error, 'no error recorded') ORDER BY id) FILTER (WHERE state = 'dead'), '{}')
FROM embedding_sync_ranges WHERE run_id = $1 GROUP BY source_table, source_column",
);

/// The sweeper: run `$1`'s queued ranges that no consumer holds (no claim, or an expired one)
/// and that were not sent in the last `$2` (float8) seconds (or never), or whose consumer died
/// (its claim expired without being ended: `holder` is still set), are marked sent now; returns
/// their `id`s (int8), in order. The invocation holding the lease runs it (fenced) and sends a
/// message for each: a message lost, or acknowledged by a consumer that lost its claim, costs a
/// delay, never the range.
pub const SWEEP_RANGES: Text<2> = Text::fixed(
    "\
UPDATE embedding_sync_ranges SET sent_at = now(), holder = NULL
WHERE id IN (
    SELECT id FROM embedding_sync_ranges
    WHERE run_id = $1 AND state = 'queued' AND (expires_at IS NULL OR expires_at <= now())
      AND (sent_at IS NULL OR sent_at <= now() - make_interval(secs => $2) OR holder IS NOT NULL)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
RETURNING id",
);

/// Claims range `$1` (int8) of run `$2` for holder `$3` for `$4` (float8) seconds, when the run
/// is open and started under the model tags `$5` (large and small, a line each), the range is
/// queued and nobody holds it unexpired: a new generation, one more attempt. One row when
/// claimed: `generation` (int8), `source_table`, `source_column`, `next`, `hi`, and the run's
/// tokens so far (int8) and `refused` (text[]). A consumer's transaction in flight locks the
/// row, so a claim waits for it (bounded by `lock_timeout`) instead of taking a live claim over.
pub const CLAIM_RANGE: Text<5> = Text::fixed(
    "\
UPDATE embedding_sync_ranges r
SET holder = $3, generation = r.generation + 1, expires_at = now() + make_interval(secs => $4),
    attempts = r.attempts + 1, sent_at = now()
FROM embedding_sync_runs u
WHERE r.id = $1 AND r.run_id = $2 AND u.run_id = r.run_id AND u.finished_at IS NULL AND coalesce(u.models, '') = $5
  AND r.state = 'queued' AND (r.expires_at IS NULL OR r.expires_at <= now())
RETURNING r.generation, r.source_table, r.source_column, r.next, r.hi,
    (SELECT coalesce(sum(s.tokens_large + s.tokens_small), 0)::int8 FROM embedding_sync_run_sources s WHERE s.run_id = r.run_id),
    u.refused",
);

/// Why range `$1` (int8) of run `$2` cannot be claimed: `state`, whether a claim is live
/// (bool), whether its run is open (bool), and its `last_error`. No row: no such range (its run
/// finished and its ranges were dropped, or it never existed).
pub const RANGE_STATE: Text<2> = Text::fixed(
    "\
SELECT r.state, coalesce(r.expires_at > now(), false), EXISTS (SELECT 1 FROM embedding_sync_runs u WHERE u.run_id = r.run_id AND u.finished_at IS NULL),
       coalesce(r.last_error, '')
FROM embedding_sync_ranges r WHERE r.id = $1 AND r.run_id = $2",
);

/// The fence of a consumer's write: renews the claim of range `$1` (int8) held by `$2`
/// (holder), `$3` (generation, int8) by `$4` (float8) seconds, and moves its progress `next` to
/// `$5` when that is further (`''` moves nothing). 0 rows when the claim is not this consumer's
/// any more (taken over, expired, the range settled, the run over): the transaction writes
/// nothing. The row lock holds until commit, so nobody claims the range while a write is in
/// flight.
pub const FENCE_RANGE: Text<5> = Text::fixed(
    "\
UPDATE embedding_sync_ranges r SET expires_at = now() + make_interval(secs => $4), next = greatest(r.next, $5)
WHERE r.id = $1 AND r.holder = $2 AND r.generation = $3 AND r.expires_at > now() AND r.state = 'queued'
  AND EXISTS (SELECT 1 FROM embedding_sync_runs u WHERE u.run_id = r.run_id AND u.finished_at IS NULL)",
);

/// Ends the claim on range `$1` (inside a transaction fenced by it, [`FENCE_RANGE`]): `$2` the
/// new state (`queued` to hand it on, `done`, `dead`), `$3` the error to record (`''`: keep the
/// last one). The claim expires now and its holder is cleared, so the next message for the
/// range can claim it at once (a claim that expires with its holder set is a consumer that
/// died: the sweeper sends its range again at once).
pub const END_CLAIM: Text<3> = Text::fixed(
    "\
UPDATE embedding_sync_ranges SET state = $2, expires_at = now(), holder = NULL,
    last_error = CASE WHEN $3 = '' THEN last_error ELSE $3 END,
    done_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END
WHERE id = $1",
);

/// Whether no range of run `$1` is queued any more (bool). Read after the claim's end has
/// committed, so of consumers that end their ranges at the same time the last one to read sees
/// them all.
pub const RUN_READY: Text<1> = Text::fixed(
    "\
SELECT NOT EXISTS (SELECT 1 FROM embedding_sync_ranges WHERE run_id = $1 AND state = 'queued')",
);

/// The dead-letter queue's verdict on range `$1` (int8) of run `$2`: dead with the reason `$3`
/// after the error its last consumer recorded (the provider's message, which says what
/// failed), unless it is done or a consumer holds it unexpired (a duplicate message is at work
/// on it). Row count 1 when marked.
pub const DEAD_LETTER: Text<3> = Text::fixed(
    "\
UPDATE embedding_sync_ranges SET state = 'dead', last_error = concat_ws('; ', nullif(last_error, ''), $3), done_at = now()
WHERE id = $1 AND run_id = $2 AND state = 'queued' AND (expires_at IS NULL OR expires_at <= now())",
);

/// Drops the ranges of runs that are over (finished, failed or abandoned).
pub const DROP_OLD_RANGES: &str = "\
DELETE FROM embedding_sync_ranges g USING embedding_sync_runs r WHERE r.run_id = g.run_id AND r.finished_at IS NOT NULL";

/// The open run's ranges per source and state, for `/status`: `source_table`,
/// `source_column`, `state`, count (int8), and for dead ones their `id` (int8) and `last_error`
/// a row each (count 1).
pub const RANGES_STATUS: &str = "\
SELECT g.source_table, g.source_column, g.state, count(*)::int8, NULL::int8, NULL::text
FROM embedding_sync_ranges g JOIN embedding_sync_runs r ON r.run_id = g.run_id AND r.finished_at IS NULL
GROUP BY 1, 2, 3
UNION ALL
SELECT g.source_table, g.source_column, 'dead-range', 1, g.id, coalesce(g.last_error, '')
FROM embedding_sync_ranges g JOIN embedding_sync_runs r ON r.run_id = g.run_id AND r.finished_at IS NULL
WHERE g.state = 'dead'";

/// [`PLAN_RANGES`].
#[derive(Debug)]
pub struct PlanRanges<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source whose snapshot is split.
    pub source: &'a Source,
    /// Values per range.
    pub per_range: u64,
}

impl Statement<4> for PlanRanges<'_> {
    fn text(&self) -> Text<4> {
        PLAN_RANGES
    }
    fn params(&self) -> [Param<'_>; 4] {
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c, param::int8(self.per_range.max(1))]
    }
}

/// [`RANGE_TALLY`].
#[derive(Debug)]
pub struct RangeTallies<'a> {
    /// The run.
    pub run: &'a RunId,
}

impl Statement<1> for RangeTallies<'_> {
    fn text(&self) -> Text<1> {
        RANGE_TALLY
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::run(self.run)]
    }
}

/// [`SWEEP_RANGES`].
#[derive(Debug)]
pub struct SweepRanges<'a> {
    /// The run.
    pub run: &'a RunId,
    /// A range sent more recently than this is not sent again.
    pub resend_after: Duration,
}

impl Statement<2> for SweepRanges<'_> {
    fn text(&self) -> Text<2> {
        SWEEP_RANGES
    }
    fn params(&self) -> [Param<'_>; 2] {
        [param::run(self.run), param::secs(self.resend_after)]
    }
}

/// [`CLAIM_RANGE`].
#[derive(Debug)]
pub struct ClaimRange<'a> {
    /// The range's id.
    pub range: i64,
    /// Its run.
    pub run: &'a RunId,
    /// The claiming consumer.
    pub holder: &'a str,
    /// How long the claim lasts unless renewed.
    pub ttl: Duration,
    /// The model tags the consumer embeds with (the run must have started under them).
    pub tags: &'a ModelTags,
}

impl Statement<5> for ClaimRange<'_> {
    fn text(&self) -> Text<5> {
        CLAIM_RANGE
    }
    fn params(&self) -> [Param<'_>; 5] {
        [
            Param::Int8(self.range),
            param::run(self.run),
            param::text(self.holder),
            param::secs(self.ttl),
            Param::Text(self.tags.recorded().into()),
        ]
    }
}

/// [`RANGE_STATE`].
#[derive(Debug)]
pub struct RangeState<'a> {
    /// The range's id.
    pub range: i64,
    /// Its run.
    pub run: &'a RunId,
}

impl Statement<2> for RangeState<'_> {
    fn text(&self) -> Text<2> {
        RANGE_STATE
    }
    fn params(&self) -> [Param<'_>; 2] {
        [Param::Int8(self.range), param::run(self.run)]
    }
}

/// [`FENCE_RANGE`]: a range claim's check and renewal.
#[derive(Debug)]
pub struct FenceRange<'a> {
    /// The range's id.
    pub range: i64,
    /// The claim's holder.
    pub holder: &'a str,
    /// The claim's generation ([`CLAIM_RANGE`] returned it).
    pub generation: i64,
    /// The claim is extended by this much from now.
    pub ttl: Duration,
    /// The range's progress moves here when further (none: it stays).
    pub next: Option<&'a ValueHash>,
}

impl Statement<5> for FenceRange<'_> {
    fn text(&self) -> Text<5> {
        FENCE_RANGE
    }
    fn params(&self) -> [Param<'_>; 5] {
        [Param::Int8(self.range), param::text(self.holder), Param::Int8(self.generation), param::secs(self.ttl), param::hash(self.next)]
    }
}

/// [`END_CLAIM`].
#[derive(Debug)]
pub struct EndClaim<'a> {
    /// The range's id.
    pub range: i64,
    /// Its new state: `queued`, `done` or `dead`.
    pub state: &'a str,
    /// The error to record (`""`: keep the last one).
    pub error: &'a str,
}

impl Statement<3> for EndClaim<'_> {
    fn text(&self) -> Text<3> {
        END_CLAIM
    }
    fn params(&self) -> [Param<'_>; 3] {
        [Param::Int8(self.range), param::text(self.state), param::text(self.error)]
    }
}

/// [`RUN_READY`].
#[derive(Debug)]
pub struct RunReady<'a> {
    /// The run.
    pub run: &'a RunId,
}

impl Statement<1> for RunReady<'_> {
    fn text(&self) -> Text<1> {
        RUN_READY
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::run(self.run)]
    }
}

/// [`DEAD_LETTER`].
#[derive(Debug)]
pub struct DeadLetter<'a> {
    /// The range's id.
    pub range: i64,
    /// Its run.
    pub run: &'a RunId,
    /// Why it was given up.
    pub reason: &'a str,
}

impl Statement<3> for DeadLetter<'_> {
    fn text(&self) -> Text<3> {
        DEAD_LETTER
    }
    fn params(&self) -> [Param<'_>; 3] {
        [Param::Int8(self.range), param::run(self.run), param::text(self.reason)]
    }
}
