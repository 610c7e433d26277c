//! The Batch API's bookkeeping (see [`crate::batch_api`]): a request file and the values of
//! each of its requests (recorded once the file is uploaded, before the batch is created, so a
//! crash between the two leaves a record to find the batch by), the batch's state as last
//! polled, and storing one request's vectors from the output.
//!
//! `embedding_sync_batches` has one row per request file, keyed by the provider's
//! `input_file_id`; `batch_id` is set once the batch is created. `embedding_sync_batch_values`
//! holds each request's values (`custom_id`, the input's position, hash, trimmed value, source
//! rows, and the source it came from). A request's rows are deleted in the transaction that
//! stores its vectors, so reading the output again (after a crash) stores nothing twice.

use super::*;
use crate::config::ModelSlot;
use crate::sync::ValueFailure;

/// The migration step of [`SCHEMA_VERSION`] 4: the two tables (idempotent).
pub const BATCH_TABLES: &str = "\
CREATE TABLE IF NOT EXISTS embedding_sync_batches (
    input_file_id text PRIMARY KEY,
    batch_id text UNIQUE,
    run_id text NOT NULL,
    slot text NOT NULL CHECK (slot IN ('large', 'small')),
    model text NOT NULL,
    state text NOT NULL DEFAULT 'uploaded',
    output_file_id text,
    error_file_id text,
    requests integer NOT NULL,
    value_count integer NOT NULL,
    request_counts jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    polled_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS embedding_sync_batches_open_idx ON embedding_sync_batches (created_at) WHERE finished_at IS NULL;
CREATE TABLE IF NOT EXISTS embedding_sync_batch_values (
    input_file_id text NOT NULL,
    custom_id text NOT NULL,
    position integer NOT NULL,
    value_hash text NOT NULL,
    value text NOT NULL,
    occurrences integer NOT NULL,
    source_table text NOT NULL,
    source_column text NOT NULL,
    PRIMARY KEY (input_file_id, custom_id, position)
);
CREATE INDEX IF NOT EXISTS embedding_sync_batch_values_hash_idx ON embedding_sync_batch_values (value_hash)";

/// Records an uploaded request file: `$1` input file id, `$2` run, `$3` slot (`large` or
/// `small`), `$4` model tag, `$5` requests, `$6` values (int8).
pub const INSERT_BATCH_FILE: Text<6> = Text::fixed(
    "\
INSERT INTO embedding_sync_batches (input_file_id, run_id, slot, model, requests, value_count)
VALUES ($1, $2, $3, $4, $5::int8::int4, $6::int8::int4)",
);

/// Records the values of a file's requests: `$1` input file id, then per value (arrays of the
/// same length) `$2` custom ids, `$3` positions (int4[]), `$4` hashes, `$5` values, `$6` source
/// rows (int4[]), `$7` source table keys, `$8` source column keys.
pub const INSERT_BATCH_VALUES: Text<8> = Text::fixed(
    "\
INSERT INTO embedding_sync_batch_values
    (input_file_id, custom_id, position, value_hash, value, occurrences, source_table, source_column)
SELECT $1, t.c, t.p, t.h, t.v, t.n, t.st, t.sc
FROM unnest($2::text[], $3::int4[], $4::text[], $5::text[], $6::int4[], $7::text[], $8::text[]) AS t(c, p, h, v, n, st, sc)",
);

/// Sets the batch created for file `$1`: its id `$2`, state `validating`.
pub const SET_BATCH_CREATED: Text<2> = Text::fixed(
    "\
UPDATE embedding_sync_batches SET batch_id = $2, state = 'validating', polled_at = now() WHERE input_file_id = $1",
);

/// Records a poll of batch `$1`: state `$2`, output and error file ids `$3`, `$4` (`''` when
/// none, stored as NULL), `request_counts` `$5` (JSON text), and whether it is over for embsync `$6` (bool).
pub const SET_BATCH_STATE: Text<6> = Text::fixed(
    "\
UPDATE embedding_sync_batches
SET state = $2, output_file_id = nullif($3, ''), error_file_id = nullif($4, ''), request_counts = $5::text::jsonb, polled_at = now(),
    finished_at = CASE WHEN $6 THEN coalesce(finished_at, now()) ELSE NULL END
WHERE batch_id = $1",
);

/// Forgets the values still recorded for batch `$1`'s file, once embsync is done with the batch
/// (stored, failed, expired, cancelled, forgotten by the provider): they go the synchronous way.
pub const DELETE_BATCH_VALUES: Text<1> = Text::fixed(
    "\
DELETE FROM embedding_sync_batch_values WHERE input_file_id = (SELECT input_file_id FROM embedding_sync_batches WHERE batch_id = $1)",
);

/// Ends file `$1` with state `$2` when no batch was made of it (an invocation stopped between
/// upload and create, and no batch of it was found): its values go the synchronous way.
pub const FINISH_BATCH_FILE: Text<2> = Text::fixed(
    "\
WITH gone AS (DELETE FROM embedding_sync_batch_values WHERE input_file_id = $1)
UPDATE embedding_sync_batches SET state = $2, finished_at = coalesce(finished_at, now()) WHERE input_file_id = $1",
);

/// The files not over yet, oldest first: `input_file_id`, `batch_id` (NULL when the batch was
/// not created), `run_id`, `slot`, `model`, `state`, `output_file_id`, `error_file_id`,
/// `requests` (int4), `value_count` (int4), the age in seconds (float8).
pub const OPEN_BATCHES: &str = "\
SELECT input_file_id, batch_id, run_id, slot, model, state, output_file_id, error_file_id, requests, value_count,
       extract(epoch FROM now() - created_at)::float8
FROM embedding_sync_batches WHERE finished_at IS NULL ORDER BY created_at, input_file_id";

/// The sources (`source_table`, `source_column`) of request `$2` of file `$1` that still wait.
pub const REQUEST_SOURCES: Text<2> = Text::fixed(
    "\
SELECT DISTINCT source_table, source_column FROM embedding_sync_batch_values WHERE input_file_id = $1 AND custom_id = $2",
);

/// The model tag and slot file `$1` was built for (one row, or none).
pub const BATCH_MODEL: Text<1> = Text::fixed("SELECT slot, model FROM embedding_sync_batches WHERE input_file_id = $1");

/// The values of request `$4` of file `$3` that came from the source (`$1`, `$2`) and that it
/// still has: `position` (int4), `value_hash`, `value`, `occurrences` (int4), by position. One
/// scan of the source (a hashed subplan).
pub fn request_values(source: &Source) -> Text<4> {
    let col = source.column.quoted();
    Text::built(format!(
        "SELECT v.position, v.value_hash, v.value, v.occurrences\n\
         FROM embedding_sync_batch_values v\n\
         WHERE v.input_file_id = $3 AND v.custom_id = $4 AND v.source_table = $1 AND v.source_column = $2\n  \
         AND v.value IN (SELECT btrim({col}::text, ' ') FROM {table} WHERE {col} IS NOT NULL)\n\
         ORDER BY v.position",
        table = source.table.quoted(),
    ))
}

/// Forgets request `$2` of file `$1`: its vectors are stored (or it will not be).
pub const DELETE_REQUEST_VALUES: Text<2> =
    Text::fixed("DELETE FROM embedding_sync_batch_values WHERE input_file_id = $1 AND custom_id = $2");

/// One value of a request, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchValue<'a> {
    /// The request's `custom_id`.
    pub custom_id: &'a str,
    /// The input's position in the request.
    pub position: i32,
    /// The value hash.
    pub hash: &'a ValueHash,
    /// The trimmed value.
    pub value: &'a str,
    /// Source rows holding it.
    pub occurrences: i32,
    /// The table key of the source it came from ([`Source::table_key`]).
    pub source_table: &'a str,
    /// Its column key ([`Source::column_key`]).
    pub source_column: &'a str,
}

/// [`INSERT_BATCH_FILE`].
#[derive(Debug)]
pub struct InsertBatchFile<'a> {
    /// The provider's id of the uploaded file.
    pub input_file_id: &'a str,
    /// The run that built it.
    pub run: &'a RunId,
    /// The model slot.
    pub slot: ModelSlot,
    /// The model's tag.
    pub model: &'a str,
    /// Its requests.
    pub requests: u64,
    /// Its values.
    pub values: u64,
}

impl Statement<6> for InsertBatchFile<'_> {
    fn text(&self) -> Text<6> {
        INSERT_BATCH_FILE
    }
    fn params(&self) -> [Param<'_>; 6] {
        [
            Param::Text(Cow::Borrowed(self.input_file_id)),
            param::run(self.run),
            Param::Text(Cow::Borrowed(self.slot.key())),
            Param::Text(Cow::Borrowed(self.model)),
            param::int8(self.requests),
            param::int8(self.values),
        ]
    }
}

/// [`INSERT_BATCH_VALUES`].
#[derive(Debug)]
pub struct InsertBatchValues<'a> {
    /// The provider's id of the uploaded file.
    pub input_file_id: &'a str,
    /// The values of its requests.
    pub values: &'a [BatchValue<'a>],
}

impl Statement<8> for InsertBatchValues<'_> {
    fn text(&self) -> Text<8> {
        INSERT_BATCH_VALUES
    }
    fn params(&self) -> [Param<'_>; 8] {
        let v = self.values;
        [
            Param::Text(Cow::Borrowed(self.input_file_id)),
            Param::TextArray(v.iter().map(|v| Cow::Borrowed(v.custom_id)).collect()),
            Param::Int4Array(v.iter().map(|v| v.position).collect()),
            Param::TextArray(v.iter().map(|v| Cow::Borrowed(v.hash.as_str())).collect()),
            Param::TextArray(v.iter().map(|v| Cow::Borrowed(v.value)).collect()),
            Param::Int4Array(v.iter().map(|v| v.occurrences).collect()),
            Param::TextArray(v.iter().map(|v| Cow::Borrowed(v.source_table)).collect()),
            Param::TextArray(v.iter().map(|v| Cow::Borrowed(v.source_column)).collect()),
        ]
    }
}

/// [`SET_BATCH_CREATED`].
#[derive(Debug)]
pub struct SetBatchCreated<'a> {
    /// The file.
    pub input_file_id: &'a str,
    /// The batch made of it.
    pub batch_id: &'a str,
}

impl Statement<2> for SetBatchCreated<'_> {
    fn text(&self) -> Text<2> {
        SET_BATCH_CREATED
    }
    fn params(&self) -> [Param<'_>; 2] {
        [Param::Text(Cow::Borrowed(self.input_file_id)), Param::Text(Cow::Borrowed(self.batch_id))]
    }
}

/// [`SET_BATCH_STATE`].
#[derive(Debug)]
pub struct SetBatchState<'a> {
    /// The batch.
    pub batch_id: &'a str,
    /// Its status as polled (`in_progress`, `completed`, ...), or embsync's own end (`stored`).
    pub state: &'a str,
    /// Its output file, if any.
    pub output_file_id: Option<&'a str>,
    /// Its error file, if any.
    pub error_file_id: Option<&'a str>,
    /// Its `request_counts`, as JSON text.
    pub request_counts: &'a str,
    /// Whether embsync is done with it.
    pub finished: bool,
}

impl Statement<6> for SetBatchState<'_> {
    fn text(&self) -> Text<6> {
        SET_BATCH_STATE
    }
    fn params(&self) -> [Param<'_>; 6] {
        [
            Param::Text(Cow::Borrowed(self.batch_id)),
            Param::Text(Cow::Borrowed(self.state)),
            Param::Text(Cow::Borrowed(self.output_file_id.unwrap_or(""))),
            Param::Text(Cow::Borrowed(self.error_file_id.unwrap_or(""))),
            Param::Text(Cow::Borrowed(self.request_counts)),
            Param::Bool(self.finished),
        ]
    }
}

/// [`REQUEST_SOURCES`].
#[derive(Debug)]
pub struct RequestSources<'a> {
    /// The file.
    pub input_file_id: &'a str,
    /// The request.
    pub custom_id: &'a str,
}

/// [`DELETE_REQUEST_VALUES`].
#[derive(Debug)]
pub struct DeleteRequestValues<'a> {
    /// The file.
    pub input_file_id: &'a str,
    /// The request.
    pub custom_id: &'a str,
}

impl Statement<2> for RequestSources<'_> {
    fn text(&self) -> Text<2> {
        REQUEST_SOURCES
    }
    fn params(&self) -> [Param<'_>; 2] {
        [param::text(self.input_file_id), param::text(self.custom_id)]
    }
}

impl Statement<2> for DeleteRequestValues<'_> {
    fn text(&self) -> Text<2> {
        DELETE_REQUEST_VALUES
    }
    fn params(&self) -> [Param<'_>; 2] {
        [param::text(self.input_file_id), param::text(self.custom_id)]
    }
}

/// [`DELETE_BATCH_VALUES`].
#[derive(Debug)]
pub struct DeleteBatchValues<'a> {
    /// The batch.
    pub batch_id: &'a str,
}

impl Statement<1> for DeleteBatchValues<'_> {
    fn text(&self) -> Text<1> {
        DELETE_BATCH_VALUES
    }
    fn params(&self) -> [Param<'_>; 1] {
        [Param::Text(Cow::Borrowed(self.batch_id))]
    }
}

/// [`FINISH_BATCH_FILE`].
#[derive(Debug)]
pub struct FinishBatchFile<'a> {
    /// The file.
    pub input_file_id: &'a str,
    /// Why it ends (e.g. `abandoned`).
    pub state: &'a str,
}

impl Statement<2> for FinishBatchFile<'_> {
    fn text(&self) -> Text<2> {
        FINISH_BATCH_FILE
    }
    fn params(&self) -> [Param<'_>; 2] {
        [Param::Text(Cow::Borrowed(self.input_file_id)), Param::Text(Cow::Borrowed(self.state))]
    }
}

/// [`BATCH_MODEL`].
#[derive(Debug)]
pub struct BatchModel<'a> {
    /// The file.
    pub input_file_id: &'a str,
}

impl Statement<1> for BatchModel<'_> {
    fn text(&self) -> Text<1> {
        BATCH_MODEL
    }
    fn params(&self) -> [Param<'_>; 1] {
        [Param::Text(Cow::Borrowed(self.input_file_id))]
    }
}

/// [`request_values`].
#[derive(Debug)]
pub struct RequestValues<'a> {
    /// The source the values came from.
    pub source: &'a Source,
    /// The file.
    pub input_file_id: &'a str,
    /// The request.
    pub custom_id: &'a str,
}

impl Statement<4> for RequestValues<'_> {
    fn text(&self) -> Text<4> {
        request_values(self.source)
    }
    fn params(&self) -> [Param<'_>; 4] {
        let [t, c] = param::keys(self.source);
        [t, c, Param::Text(Cow::Borrowed(self.input_file_id)), Param::Text(Cow::Borrowed(self.custom_id))]
    }
}

/// The requests of file `$1` whose vectors are not stored yet, with their inputs (int4: the
/// highest position recorded plus one; every input of a request is recorded).
pub const BATCH_REQUESTS: Text<1> = Text::fixed(
    "\
SELECT custom_id, (max(position) + 1)::int4 FROM embedding_sync_batch_values WHERE input_file_id = $1 GROUP BY custom_id",
);

/// [`BATCH_REQUESTS`].
#[derive(Debug)]
pub struct BatchRequests<'a> {
    /// The file.
    pub input_file_id: &'a str,
}

impl Statement<1> for BatchRequests<'_> {
    fn text(&self) -> Text<1> {
        BATCH_REQUESTS
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::text(self.input_file_id)]
    }
}

/// Adds one stored request of a batch to a source's counters of the run that read it: `$1` run,
/// `$2` table, `$3` column, `$4` values embedded, `$5` large tokens, `$6` large requests, `$7`
/// small tokens, `$8` small requests (int8 each). The tokens count in the run's usage and in its
/// batch usage (priced at the Batch API's price).
pub const ADD_BATCH_PROGRESS: Text<8> = Text::fixed(
    "\
UPDATE embedding_sync_run_sources
SET embedded = embedded + $4,
    tokens_large = tokens_large + $5, requests_large = requests_large + $6,
    tokens_small = tokens_small + $7, requests_small = requests_small + $8,
    batch_tokens_large = batch_tokens_large + $5, batch_requests_large = batch_requests_large + $6,
    batch_tokens_small = batch_tokens_small + $7, batch_requests_small = batch_requests_small + $8
WHERE run_id = $1 AND source_table = $2 AND source_column = $3",
);

/// [`ADD_BATCH_PROGRESS`].
#[derive(Debug)]
pub struct AddBatchProgress<'a> {
    /// The run that read the output.
    pub run: &'a RunId,
    /// The source's table key.
    pub table: &'a str,
    /// The source's column key.
    pub column: &'a str,
    /// The model slot of the batch.
    pub slot: ModelSlot,
    /// Values written for the source.
    pub embedded: u64,
    /// The request's tokens (`usage.prompt_tokens`), when they count for this source.
    pub tokens: u64,
    /// 1 when the request counts for this source, else 0.
    pub requests: u64,
}

impl Statement<8> for AddBatchProgress<'_> {
    fn text(&self) -> Text<8> {
        ADD_BATCH_PROGRESS
    }
    fn params(&self) -> [Param<'_>; 8] {
        let (large, small) = match self.slot {
            ModelSlot::Large => ((self.tokens, self.requests), (0, 0)),
            ModelSlot::Small => ((0, 0), (self.tokens, self.requests)),
        };
        [
            param::run(self.run),
            param::text(self.table),
            param::text(self.column),
            param::int8(self.embedded),
            param::int8(large.0),
            param::int8(large.1),
            param::int8(small.0),
            param::int8(small.1),
        ]
    }
}

/// The values of each model in pending batches of the configured tag (`$3` large, `$4` small)
/// that came from the source (`$1`, `$2`): `slot`, distinct values (int8).
pub const AWAITED_VALUES: Text<4> = Text::fixed(
    "\
SELECT b.slot, count(DISTINCT bv.value_hash)::int8
FROM embedding_sync_batch_values bv JOIN embedding_sync_batches b ON b.input_file_id = bv.input_file_id
WHERE bv.source_table = $1 AND bv.source_column = $2 AND b.finished_at IS NULL
  AND b.model = CASE b.slot WHEN 'large' THEN $3 ELSE $4 END
GROUP BY b.slot",
);

/// [`AWAITED_VALUES`].
#[derive(Debug)]
pub struct AwaitedValues<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured models' tags.
    pub tags: &'a ModelTags,
}

impl Statement<4> for AwaitedValues<'_> {
    fn text(&self) -> Text<4> {
        AWAITED_VALUES
    }
    fn params(&self) -> [Param<'_>; 4] {
        let [t, c] = param::keys(self.source);
        [t, c, param::text(&self.tags.large), param::text(&self.tags.small)]
    }
}

/// Whether the Batch API's tables exist (a catalog read: a dry run on a database embsync has
/// not migrated).
pub const HAS_BATCH_TABLES: &str = "SELECT to_regclass('embedding_sync_batch_values') IS NOT NULL";

/// Of the values `$1` (hashes), those done for both models (one row: int8): their cache row
/// holds both embeddings, of the configured tags `$2` (large) and `$3` (small) when the row is
/// embsync's. Read before and after a batch request's write: the values it completed.
pub fn complete_among() -> Text<3> {
    // The shared condition numbers the tags $3 and $4.
    let complete = complete(FULL).replace("$3", "$2").replace("$4", "$3");
    Text::built(format!(
        "SELECT count(*)::int8 FROM (SELECT unnest($1::text[]) AS h) s\n    {join}\nWHERE {complete}",
        join = join_cache(FULL),
    ))
}

/// [`complete_among`].
#[derive(Debug)]
pub struct CompleteAmong<'a> {
    /// The value hashes.
    pub hashes: &'a [&'a str],
    /// The configured models' tags.
    pub tags: &'a ModelTags,
}

impl Statement<3> for CompleteAmong<'_> {
    fn text(&self) -> Text<3> {
        complete_among()
    }
    fn params(&self) -> [Param<'_>; 3] {
        [param::texts(self.hashes.iter().copied()), param::text(&self.tags.large), param::text(&self.tags.small)]
    }
}

/// The values of `hashes` the run has already counted as errors of the source (recorded since
/// the run started, by either way), so that a value refused by both models, in two files read
/// by two invocations, or by the synchronous way and a batch, counts once, as the synchronous
/// way counts it. Runs are one at a time, so an error recorded since the run's start is this
/// run's. Read before [`RECORD_ERRORS`] in the same transaction.
pub const ERRORS_THIS_RUN: Text<4> = Text::fixed(
    "\
SELECT count(*) FROM embedding_sync_errors e
WHERE e.source_table = $2 AND e.source_column = $3 AND e.value_hash = ANY($4::text[])
  AND e.last_failed_at >= (SELECT r.started_at FROM embedding_sync_runs r WHERE r.run_id = $1)",
);

/// [`ERRORS_THIS_RUN`].
#[derive(Debug)]
pub struct ErrorsThisRun<'a> {
    /// The run.
    pub run: &'a RunId,
    /// The source.
    pub source: &'a Source,
    /// The values about to be recorded as errors.
    pub failures: &'a [ValueFailure],
}

impl Statement<4> for ErrorsThisRun<'_> {
    fn text(&self) -> Text<4> {
        ERRORS_THIS_RUN
    }
    fn params(&self) -> [Param<'_>; 4] {
        let [t, c] = param::keys(self.source);
        [param::run(self.run), t, c, param::texts(self.failures.iter().map(|f| f.hash.as_str()))]
    }
}
