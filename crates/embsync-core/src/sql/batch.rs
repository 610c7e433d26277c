//! Writing one batch: the cache rows, the source's links, and the source's errors.

use super::*;
use crate::sync::{EmbeddedValue, ValueFailure};

/// Writes one batch: inserts new cache rows (recording them as embsync's own by their `id`, with
/// the model tags) and, in rows that exist, writes an embedding where the column is NULL or, in
/// embsync's own rows, was made by another model. Never overwrites a vector in a row it did not
/// write (a row is embsync's only when its ownership record names its `id`), and never adds
/// columns to `embedding_cache`: the tags live in `embedding_cache_owned`. A record left from
/// a row of embsync's that someone deleted is replaced when embsync inserts the value again.
///
/// `$1` source table key, `$2` source column key, `$3` large tag, `$4` small tag, `$5` hashes
/// (text[]), `$6` values (text[]), `$7` source row counts (int4[]), `$8` large vectors
/// (vector[], NULL where not embedded), `$9` small vectors (vector[]).
pub const UPSERT_BATCH: Text<9> = Text::fixed(
    "\
WITH t AS (
    SELECT * FROM unnest($5::text[], $6::text[], $7::int4[], $8::vector[], $9::vector[]) AS t(h, v, n, l, s)
),
ins AS (
    INSERT INTO embedding_cache
        (value, value_hash, embedding_large, embedding_small, source_table, source_column, usage_count, created_at)
    SELECT t.v, t.h, t.l, t.s, $1, $2, t.n, now() FROM t
    ON CONFLICT (value_hash) DO NOTHING
    RETURNING id, value_hash
),
own AS (
    INSERT INTO embedding_cache_owned AS o (value_hash, cache_id, large_model, small_model, created_at)
    SELECT ins.value_hash, ins.id, CASE WHEN t.l IS NULL THEN NULL ELSE $3 END, CASE WHEN t.s IS NULL THEN NULL ELSE $4 END, now()
    FROM ins JOIN t ON t.h = ins.value_hash
    WHERE ins.id IS NOT NULL
    ON CONFLICT (value_hash) DO UPDATE
    SET cache_id = EXCLUDED.cache_id, large_model = EXCLUDED.large_model, small_model = EXCLUDED.small_model,
        created_at = EXCLUDED.created_at
),
w AS (
    SELECT t.h, t.l, t.s, o.value_hash IS NOT NULL AS owned,
           t.l IS NOT NULL AND (c.embedding_large IS NULL
               OR (o.value_hash IS NOT NULL AND coalesce(o.large_model, $3) <> $3)) AS put_l,
           t.s IS NOT NULL AND (c.embedding_small IS NULL
               OR (o.value_hash IS NOT NULL AND coalesce(o.small_model, $4) <> $4)) AS put_s
    FROM t
    JOIN embedding_cache c ON c.value_hash = t.h
    LEFT JOIN embedding_cache_owned o ON o.value_hash = t.h AND o.cache_id = c.id
),
tags AS (
    UPDATE embedding_cache_owned o
    SET large_model = CASE WHEN w.put_l THEN $3 ELSE o.large_model END,
        small_model = CASE WHEN w.put_s THEN $4 ELSE o.small_model END
    FROM w
    WHERE o.value_hash = w.h AND w.owned AND (w.put_l OR w.put_s)
)
UPDATE embedding_cache c
SET embedding_large = CASE WHEN w.put_l THEN w.l ELSE c.embedding_large END,
    embedding_small = CASE WHEN w.put_s THEN w.s ELSE c.embedding_small END
FROM w
WHERE c.value_hash = w.h AND (w.put_l OR w.put_s)",
);

/// Links this source to the given hashes (`$3`, text[]): every value the batch wrote.
pub const LINK_VALUES: Text<3> = Text::fixed(
    "\
INSERT INTO embedding_cache_sources (value_hash, source_table, source_column)
SELECT h, $1, $2 FROM unnest($3::text[]) AS h
ON CONFLICT DO NOTHING",
);

/// Forgets earlier failures of the given hashes (`$3`, text[]) for this source: they are done.
pub const CLEAR_ERRORS: Text<3> = Text::fixed(
    "\
DELETE FROM embedding_sync_errors
WHERE source_table = $1 AND source_column = $2 AND value_hash = ANY($3::text[])",
);

/// Records failures for this source: `$3` hashes, `$4` models, `$5` messages (text[] each). A
/// value that fails again waits longer: 5 minutes after the first failure, then 4 times longer
/// each time, at most a day.
pub const RECORD_ERRORS: Text<5> = Text::fixed(
    "\
INSERT INTO embedding_sync_errors AS e
    (source_table, source_column, value_hash, model, message, attempts, next_retry_at)
SELECT $1, $2, t.h, t.m, t.msg, 1, now() + interval '5 minutes'
FROM unnest($3::text[], $4::text[], $5::text[]) AS t(h, m, msg)
ON CONFLICT (source_table, source_column, value_hash) DO UPDATE
SET model = EXCLUDED.model,
    message = EXCLUDED.message,
    attempts = e.attempts + 1,
    last_failed_at = now(),
    next_retry_at = now() + least(interval '5 minutes' * power(4, least(e.attempts, 8)), interval '1 day')",
);

/// [`UPSERT_BATCH`]: one batch's cache rows.
#[derive(Debug)]
pub struct UpsertBatch<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured model tags.
    pub tags: &'a ModelTags,
    /// The batch.
    pub batch: &'a [EmbeddedValue],
}

impl Statement<9> for UpsertBatch<'_> {
    fn text(&self) -> Text<9> {
        UPSERT_BATCH
    }
    fn params(&self) -> [Param<'_>; 9] {
        let b = self.batch;
        let [t, c, l, s] = param::source_tags(self.source, self.tags);
        [
            t,
            c,
            l,
            s,
            param::texts(b.iter().map(|v| v.hash.as_str())),
            param::texts(b.iter().map(|v| v.value.as_str())),
            Param::Int4Array(b.iter().map(|v| v.occurrences).collect()),
            Param::VectorArray(b.iter().map(|v| v.large.as_ref()).collect()),
            Param::VectorArray(b.iter().map(|v| v.small.as_ref()).collect()),
        ]
    }
}

/// [`LINK_VALUES`]: links the source to every value of a batch.
#[derive(Debug)]
pub struct LinkValues<'a> {
    /// The source.
    pub source: &'a Source,
    /// The batch.
    pub batch: &'a [EmbeddedValue],
}

impl Statement<3> for LinkValues<'_> {
    fn text(&self) -> Text<3> {
        LINK_VALUES
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, param::texts(self.batch.iter().map(|v| v.hash.as_str()))]
    }
}

/// [`CLEAR_ERRORS`]: forgets the source's errors of the values of a batch that are done now
/// (both embeddings, [`EmbeddedValue::complete`]).
#[derive(Debug)]
pub struct ClearErrors<'a> {
    /// The source.
    pub source: &'a Source,
    /// The batch.
    pub batch: &'a [EmbeddedValue],
}

impl Statement<3> for ClearErrors<'_> {
    fn text(&self) -> Text<3> {
        CLEAR_ERRORS
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, param::texts(self.batch.iter().filter(|v| v.complete).map(|v| v.hash.as_str()))]
    }
}

/// [`RECORD_ERRORS`].
#[derive(Debug)]
pub struct RecordErrors<'a> {
    /// The source.
    pub source: &'a Source,
    /// The failures.
    pub failures: &'a [ValueFailure],
}

impl Statement<5> for RecordErrors<'_> {
    fn text(&self) -> Text<5> {
        RECORD_ERRORS
    }
    fn params(&self) -> [Param<'_>; 5] {
        let f = self.failures;
        let [t, c] = param::keys(self.source);
        [
            t,
            c,
            param::texts(f.iter().map(|f| f.hash.as_str())),
            param::texts(f.iter().map(|f| f.model.as_str())),
            param::texts(f.iter().map(|f| f.message.as_str())),
        ]
    }
}
