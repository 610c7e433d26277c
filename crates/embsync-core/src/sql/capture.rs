//! Change capture (`"changes": "capture"`): the triggers that record a source's changed values
//! in embsync's change log, their installation and removal, the fold of the log into embsync's
//! copy of the source's values, and the full reconcile by scan.
//!
//! Tables ([`capture_migration`]): `embedding_sync_capture` (one row per captured source: its
//! `capture_id`, when it was last reconciled, why a reconcile is forced, the model tags with
//! which a run last left it with nothing pending, its number of distinct values),
//! `embedding_sync_change_log` (UNLOGGED, see [`LOG_LOST`]; what the triggers append:
//! `capture_id`, `delta` (+1 or -1) and the trimmed `value`, hashed when the log is read, not by
//! the writer; a row with neither `value` nor `value_hash` marks a TRUNCATE; capture 0's row is
//! the sentinel) and `embedding_sync_capture_values` (per captured source and value hash, the
//! trimmed value and the number of source rows holding it: embsync's copy of what
//! [`super::source_values`] would compute by scanning the table).
//!
//! The triggers: INSERT and DELETE are statement-level with transition tables, one
//! `INSERT ... SELECT` per statement appending a row per row written (not grouped: the fold
//! nets them); UPDATE is a row trigger whose `WHEN` compares the old and new values, so an
//! UPDATE that leaves the column as it was (another column changed) calls no function and
//! builds no transition table, and one that changes its trimmed value appends the new value
//! (+1) and the old (-1). The log is append-only for writers (no row lock, no index, no WAL), so
//! concurrent writers never wait for each other or for embsync.

use super::*;

/// The name of a captured source's trigger function (and the prefix of its triggers).
pub fn capture_function(capture_id: i32) -> Ident {
    Ident::parse(&format!("embsync_capture_{capture_id}")).expect("a valid identifier")
}

/// The names of a captured source's four triggers: insert, update, delete, truncate.
pub fn capture_triggers(capture_id: i32) -> [Ident; 4] {
    ["insert", "update", "delete", "truncate"]
        .map(|op| Ident::parse(&format!("embsync_capture_{capture_id}_{op}")).expect("a valid identifier"))
}

/// The migration step (schema version 4, the log UNLOGGED since version 5) that creates the
/// capture tables, the log's sentinel row ([`LOG_LOST`]), and the trigger on the change log
/// that forces a reconcile of every captured source when the log is truncated (what was in it
/// is lost). Idempotent.
///
/// The log is UNLOGGED: writers append to it without WAL. A crash, a failover or a restarted
/// compute empties it, sentinel row and all, and the missing sentinel forces a reconcile of
/// every capture ([`LOG_LOST`]). A log of version 4 is made UNLOGGED here; where Postgres refuses
/// (the table was added to a publication by name) it stays logged, which is as correct, only
/// dearer for writers.
pub const CAPTURE_MIGRATION: &str = r#"CREATE TABLE IF NOT EXISTS embedding_sync_capture (
    capture_id serial PRIMARY KEY,
    source_table text NOT NULL,
    source_column text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    reconciled_at timestamptz,
    reconcile_reason text,
    settled_tags text,
    total bigint NOT NULL DEFAULT 0,
    drift_new bigint,
    drift_stale bigint,
    UNIQUE (source_table, source_column)
);
CREATE UNLOGGED TABLE IF NOT EXISTS embedding_sync_change_log (
    capture_id integer NOT NULL,
    value_hash text,
    delta integer NOT NULL,
    value text
);
DO $embsync$
BEGIN
    IF (SELECT relpersistence FROM pg_class WHERE oid = 'embedding_sync_change_log'::regclass) <> 'u' THEN
        ALTER TABLE embedding_sync_change_log SET UNLOGGED;
    END IF;
EXCEPTION
    WHEN lock_not_available THEN RAISE;
    WHEN OTHERS THEN RAISE NOTICE 'embedding_sync_change_log stays logged: %', SQLERRM;
END
$embsync$;
INSERT INTO embedding_sync_change_log (capture_id, delta)
SELECT 0, 0 WHERE NOT EXISTS (SELECT 1 FROM embedding_sync_change_log WHERE capture_id = 0);
CREATE TABLE IF NOT EXISTS embedding_sync_capture_values (
    capture_id integer NOT NULL,
    value_hash text NOT NULL,
    value text NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (capture_id, value_hash)
);
CREATE OR REPLACE FUNCTION embsync_capture_log_truncated() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $embsync$
BEGIN
    UPDATE embedding_sync_capture SET reconcile_reason = 'the change log was truncated';
    RETURN NULL;
END
$embsync$;
CREATE OR REPLACE TRIGGER embsync_capture_log_truncated AFTER TRUNCATE ON embedding_sync_change_log
FOR EACH STATEMENT EXECUTE FUNCTION embsync_capture_log_truncated();
ALTER TABLE embedding_sync_change_log ENABLE ALWAYS TRIGGER embsync_capture_log_truncated"#;

/// A dollar-quote tag that `body` does not contain.
fn dollar_tag(body: &str) -> String {
    let mut tag = "$embsync$".to_owned();
    while body.contains(&tag) {
        tag.insert(tag.len() - 1, 'x');
    }
    tag
}

/// `value` trimmed as a source value is (see [`super::source_values`]).
fn trimmed(column: &str) -> String {
    format!("btrim({column}::text, ' ')")
}

/// Creates (or replaces) the source's trigger function and its four triggers, enabled
/// `ALWAYS` (so they also fire under `session_replication_role = replica`, e.g. a logical
/// replication apply). Run in a transaction after [`migration_lock_timeout`]: `CREATE TRIGGER`
/// and `ALTER TABLE ... ENABLE ALWAYS TRIGGER` take SHARE ROW EXCLUSIVE on the table (writers
/// wait for it, and it waits for them), so this runs only when the config asks for capture
/// and the triggers are missing or not enabled always, never in a steady-state invocation.
///
/// The function is `SECURITY DEFINER` (writers need no privilege on embsync's tables) with the
/// installer's `search_path` (`SET search_path FROM CURRENT`). The UPDATE trigger has no column
/// list (`UPDATE OF`): a BEFORE trigger may change the column without naming it; its `WHEN`
/// (the values as text, untrimmed: the cheapest test, and any type has a text form) is what
/// skips an UPDATE of other columns; the function appends nothing when the trimmed values are
/// the same.
pub fn install_capture(source: &Source, capture_id: i32) -> String {
    let function = capture_function(capture_id).quoted();
    let table = source.table.quoted();
    let [insert, update, delete, truncate] = capture_triggers(capture_id).map(|t| t.quoted());
    let col = source.column.quoted();
    format!(
        "{replace};\n\
         CREATE OR REPLACE TRIGGER {insert} AFTER INSERT ON {table} REFERENCING NEW TABLE AS embsync_new\n    \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
         CREATE OR REPLACE TRIGGER {update} AFTER UPDATE ON {table}\n    \
         FOR EACH ROW WHEN ({old_value} IS DISTINCT FROM {new_value}) EXECUTE FUNCTION {function}();\n\
         CREATE OR REPLACE TRIGGER {delete} AFTER DELETE ON {table} REFERENCING OLD TABLE AS embsync_old\n    \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
         CREATE OR REPLACE TRIGGER {truncate} AFTER TRUNCATE ON {table}\n    \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER {insert}, ENABLE ALWAYS TRIGGER {update}, \
         ENABLE ALWAYS TRIGGER {delete}, ENABLE ALWAYS TRIGGER {truncate}",
        replace = replace_capture_function(source, capture_id),
        old_value = format!("OLD.{col}::text"),
        new_value = format!("NEW.{col}::text"),
    )
}

/// The body of the source's trigger function, as `pg_proc.prosrc` holds it: a function whose
/// body differs (installed by another version of embsync) is replaced, with the triggers
/// ([`install_capture`]).
pub fn capture_function_body(source: &Source, capture_id: i32) -> String {
    let log = "INSERT INTO embedding_sync_change_log (capture_id, delta, value)";
    let col = source.column.quoted();
    let (new_row, old_row) = (trimmed(&format!("NEW.{col}")), trimmed(&format!("OLD.{col}")));
    let rows = trimmed(&format!("r.{col}"));
    format!(
        "\nBEGIN\n    \
         IF TG_OP = 'UPDATE' THEN\n        \
         {log}\n        \
         SELECT {capture_id}, d.n, d.v FROM (VALUES ({new_row}, 1), ({old_row}, -1)) d (v, n)\n        \
         WHERE d.v <> '' AND {new_row} IS DISTINCT FROM {old_row};\n    \
         ELSIF TG_OP = 'INSERT' THEN\n        \
         {log}\n        \
         SELECT {capture_id}, 1, {rows} FROM embsync_new r WHERE {rows} <> '';\n    \
         ELSIF TG_OP = 'DELETE' THEN\n        \
         {log}\n        \
         SELECT {capture_id}, -1, {rows} FROM embsync_old r WHERE {rows} <> '';\n    \
         ELSE\n        \
         {log} VALUES ({capture_id}, 0, NULL);\n    \
         END IF;\n    \
         RETURN NULL;\n\
         END\n",
    )
}

/// Creates or replaces the source's trigger function (no lock on the table: a function whose
/// body changed is replaced without touching the triggers).
pub fn replace_capture_function(source: &Source, capture_id: i32) -> String {
    let body = capture_function_body(source, capture_id);
    let tag = dollar_tag(&body);
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER\n\
         SET search_path FROM CURRENT AS {tag}{body}{tag}",
        function = capture_function(capture_id).quoted()
    )
}

/// Enables the source's triggers `ALWAYS` again (someone disabled and re-enabled them, which
/// leaves them enabled for `origin` only). Same lock as [`install_capture`].
pub fn enable_capture(source: &Source, capture_id: i32) -> String {
    let [insert, update, delete, truncate] = capture_triggers(capture_id).map(|t| t.quoted());
    format!(
        "ALTER TABLE {table} ENABLE ALWAYS TRIGGER {insert}, ENABLE ALWAYS TRIGGER {update}, \
         ENABLE ALWAYS TRIGGER {delete}, ENABLE ALWAYS TRIGGER {truncate}",
        table = source.table.quoted()
    )
}

/// Drops the triggers of capture `capture_id` on `table` (when the table still exists) and its
/// function, with whatever still depends on it (only embsync's triggers can: those of a table
/// that was renamed since). `DROP TRIGGER` takes ACCESS EXCLUSIVE on the table: run in a
/// transaction with a lock timeout, only when a source stopped being captured.
pub fn drop_capture(table: Option<&TableName>, capture_id: i32) -> String {
    let mut sql = String::new();
    if let Some(table) = table {
        for t in capture_triggers(capture_id) {
            sql.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {};\n", t.quoted(), table.quoted()));
        }
    }
    sql.push_str(&format!("DROP FUNCTION IF EXISTS {}() CASCADE", capture_function(capture_id).quoted()));
    sql
}

/// Every captured source embsync has installed: `capture_id` (int4), `source_table`,
/// `source_column`, and whether the table still exists (`to_regclass` of the quoted name).
pub const CAPTURES: &str = "\
SELECT capture_id, source_table, source_column FROM embedding_sync_capture ORDER BY capture_id";

/// Whether the table `$1` (its quoted name) exists.
pub const TABLE_EXISTS: Text<1> = Text::fixed("SELECT to_regclass($1) IS NOT NULL");

/// Forgets capture `$1` (int4): its log, its copy of the values and its row.
pub const FORGET_CAPTURE: Text<1> = Text::fixed(
    "\
WITH l AS (DELETE FROM embedding_sync_change_log WHERE capture_id = $1),
     v AS (DELETE FROM embedding_sync_capture_values WHERE capture_id = $1)
DELETE FROM embedding_sync_capture WHERE capture_id = $1",
);

/// The capture's state for the source (`$1`, `$2`; `$3` its quoted table name), at most one
/// row: `capture_id` (int4), `never_reconciled`, `reconcile_reason`, `settled_tags`, `total`
/// (int8), seconds since the last reconcile (float8, NULL when never), the source's
/// triggers that exist (int8), those enabled `ALWAYS` (int8) and those disabled (int8), the
/// trigger function's body (see [`capture_function_body`]), whether
/// the log holds rows of the source, whether it holds a TRUNCATE mark, and whether the log lost
/// its sentinel ([`LOG_LOST`]). Reads the catalog
/// and embsync's tables, never the source.
pub const CAPTURE_STATE: Text<3> = Text::fixed(
    "\
SELECT c.capture_id, c.reconciled_at IS NULL, c.reconcile_reason, c.settled_tags, c.total,
       extract(epoch FROM now() - c.reconciled_at)::float8,
       t.present, t.always, t.disabled,
       (SELECT p.prosrc FROM pg_proc p WHERE p.oid = to_regprocedure('embsync_capture_' || c.capture_id || '()')),
       EXISTS (SELECT 1 FROM embedding_sync_change_log l WHERE l.capture_id = c.capture_id),
       EXISTS (SELECT 1 FROM embedding_sync_change_log l WHERE l.capture_id = c.capture_id AND l.value_hash IS NULL AND l.value IS NULL),
       NOT EXISTS (SELECT 1 FROM embedding_sync_change_log l WHERE l.capture_id = 0)
FROM embedding_sync_capture c,
     LATERAL (SELECT count(*) AS present, count(*) FILTER (WHERE g.tgenabled = 'A') AS always,
                     count(*) FILTER (WHERE g.tgenabled = 'D') AS disabled
              FROM pg_trigger g
              WHERE g.tgrelid = to_regclass($3)
                AND g.tgfoid = coalesce(to_regprocedure('embsync_capture_' || c.capture_id || '()'), 0)
                AND g.tgname IN ('embsync_capture_' || c.capture_id || '_insert', 'embsync_capture_' || c.capture_id || '_update',
                                 'embsync_capture_' || c.capture_id || '_delete', 'embsync_capture_' || c.capture_id || '_truncate')) t
WHERE c.source_table = $1 AND c.source_column = $2",
);

/// Whether the capture's tables exist (a catalog read).
pub const HAS_CAPTURE_TABLES: &str =
    "SELECT to_regclass('embedding_sync_capture') IS NOT NULL AND to_regclass('embedding_sync_change_log') IS NOT NULL";

/// What the dry run and `/status` show of the source's capture (`$1`, `$2`; `$3` its quoted
/// table name), at most one row: its triggers that exist, those enabled `ALWAYS` and those
/// disabled (int8), the last reconcile (epoch milliseconds, float8), the log's rows for it (the
/// backlog, int8), and the last reconcile's drift (int8, NULL when unknown).
pub const CAPTURE_INFO: Text<3> = Text::fixed(
    "\
SELECT t.present, t.always, t.disabled, (extract(epoch FROM c.reconciled_at) * 1000)::float8,
       (SELECT count(*) FROM embedding_sync_change_log l WHERE l.capture_id = c.capture_id),
       c.drift_new, c.drift_stale
FROM embedding_sync_capture c,
     LATERAL (SELECT count(*) AS present, count(*) FILTER (WHERE g.tgenabled = 'A') AS always,
                     count(*) FILTER (WHERE g.tgenabled = 'D') AS disabled
              FROM pg_trigger g
              WHERE g.tgrelid = to_regclass($3) AND g.tgname LIKE 'embsync\\_capture\\_' || c.capture_id || '\\_%') t
WHERE c.source_table = $1 AND c.source_column = $2",
);

/// [`CAPTURE_INFO`].
#[derive(Debug)]
pub struct CaptureInfo<'a> {
    /// The source.
    pub source: &'a Source,
}

impl Statement<3> for CaptureInfo<'_> {
    fn text(&self) -> Text<3> {
        CAPTURE_INFO
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, Param::Text(Cow::Owned(self.source.table.quoted()))]
    }
}

/// Registers the source (`$1`, `$2`) for capture (or starts it afresh): its log and its copy
/// of the values are emptied, and the next step is a reconcile (`$3`: why). One row: the
/// `capture_id` (int4).
pub const REGISTER_CAPTURE: Text<3> = Text::fixed(
    "\
WITH c AS (
    INSERT INTO embedding_sync_capture (source_table, source_column, reconcile_reason) VALUES ($1, $2, $3)
    ON CONFLICT (source_table, source_column) DO UPDATE
    SET reconcile_reason = EXCLUDED.reconcile_reason, reconciled_at = NULL, settled_tags = NULL, installed_at = now(), total = 0
    RETURNING capture_id
),
l AS (DELETE FROM embedding_sync_change_log WHERE capture_id = (SELECT capture_id FROM c)),
v AS (DELETE FROM embedding_sync_capture_values WHERE capture_id = (SELECT capture_id FROM c))
SELECT capture_id FROM c",
);

/// Whether the change log lost its sentinel row (`capture_id` 0, written by the migration):
/// the log is UNLOGGED, so a crash, a failover or a restarted compute empties it (as does
/// someone who deletes its rows). When it did, the sentinel is written again and every capture
/// is forced to reconcile, for reason `$1` (a reason already recorded stays). One row: whether
/// it was lost. Run before the capture's state is read, and again in the fold's transaction.
pub const LOG_LOST: Text<1> = Text::fixed(
    "\
WITH lost AS MATERIALIZED (SELECT NOT EXISTS (SELECT 1 FROM embedding_sync_change_log WHERE capture_id = 0) AS lost),
sentinel AS (INSERT INTO embedding_sync_change_log (capture_id, delta) SELECT 0, 0 FROM lost WHERE lost.lost),
forced AS (
    UPDATE embedding_sync_capture SET reconcile_reason = coalesce(reconcile_reason, $1) WHERE (SELECT lost.lost FROM lost)
)
SELECT lost FROM lost",
);

/// Why [`LOG_LOST`] forces a reconcile.
pub const LOG_LOST_REASON: &str = "the change log was lost (it is unlogged: a crash, a failover or a restart empties it)";

/// [`LOG_LOST`].
#[derive(Debug)]
pub struct LogLost;

impl Statement<1> for LogLost {
    fn text(&self) -> Text<1> {
        LOG_LOST
    }
    fn params(&self) -> [Param<'_>; 1] {
        [param::text(LOG_LOST_REASON)]
    }
}

/// Forces the next step of capture `$1` (int4) to be a reconcile, for reason `$2`.
pub const FORCE_RECONCILE: Text<2> = Text::fixed("UPDATE embedding_sync_capture SET reconcile_reason = $2 WHERE capture_id = $1");

/// Folds the source's change log into embsync's copy of its values (`$1`, `$2`): consumes the
/// log rows this statement sees (rows committed later stay for the next fold, whatever their
/// order), adds each value's net change to its count, keeps the distinct total, and forgets
/// the settled tags: the source is planned now, under the configured models, and is settled
/// again only by a run that leaves nothing pending (tags A, then B, then A again would
/// otherwise find A's tags settled though the run under B rewrote embeddings). One row: log rows consumed, TRUNCATE marks consumed,
/// values whose count went below zero (changes made without the capture), and the hashes
/// whose count reached zero or less (text[]), for [`DROP_GONE_VALUES`].
///
/// Costs the log rows and one probe of the copy's key per changed value: never a scan of the
/// source or of the copy.
pub const FOLD_CHANGES: Text<2> = Text::fixed(
    "\
WITH k AS (SELECT capture_id AS id FROM embedding_sync_capture WHERE source_table = $1 AND source_column = $2),
consumed AS MATERIALIZED (
    DELETE FROM embedding_sync_change_log l USING k WHERE l.capture_id = k.id
    RETURNING l.value_hash, l.delta, l.value
),
agg AS MATERIALIZED (
    SELECT a.h, a.d, a.v, coalesce(m.n, 0) AS old
    FROM (SELECT coalesce(g.value_hash, encode(sha256(convert_to(g.value, 'UTF8')), 'hex')) AS h, sum(g.d)::int8 AS d, max(g.value) AS v
          FROM (SELECT value_hash, value, sum(delta) AS d FROM consumed
                WHERE value_hash IS NOT NULL OR value IS NOT NULL GROUP BY 1, 2) g GROUP BY 1) a
    LEFT JOIN embedding_sync_capture_values m ON m.capture_id = (SELECT id FROM k) AND m.value_hash = a.h
    WHERE a.d <> 0
),
up AS (
    INSERT INTO embedding_sync_capture_values AS m (capture_id, value_hash, value, n)
    SELECT k.id, a.h, coalesce(a.v, ''), a.d FROM agg a, k
    ON CONFLICT (capture_id, value_hash) DO UPDATE
    SET n = m.n + EXCLUDED.n, value = CASE WHEN EXCLUDED.value <> '' THEN EXCLUDED.value ELSE m.value END
),
st AS (
    UPDATE embedding_sync_capture c
    SET total = c.total + (SELECT count(*) FROM agg WHERE old <= 0 AND old + d > 0) - (SELECT count(*) FROM agg WHERE old > 0 AND old + d <= 0),
        settled_tags = NULL
    FROM k WHERE c.capture_id = k.id
)
SELECT (SELECT count(*) FROM consumed)::int8,
       (SELECT count(*) FROM consumed WHERE value_hash IS NULL AND value IS NULL)::int8,
       (SELECT count(*) FROM agg WHERE old + d < 0)::int8,
       (SELECT coalesce(array_agg(h), '{}') FROM agg WHERE old + d <= 0)::text[]",
);

/// Deletes the copy's values of the source (`$1`, `$2`) among hashes `$3` (text[]) whose count
/// is zero or less: the source has them no more.
pub const DROP_GONE_VALUES: Text<3> = Text::fixed(
    "\
DELETE FROM embedding_sync_capture_values m USING embedding_sync_capture c
WHERE c.source_table = $1 AND c.source_column = $2 AND m.capture_id = c.capture_id
  AND m.value_hash = ANY ($3::text[]) AND m.n <= 0",
);

/// The full reconcile of a captured source (`$1`, `$2`): one statement, so one snapshot of the
/// source and of the log. It consumes the log rows it sees (their changes are in the scan),
/// compares the scan with what the capture recorded (the copy plus those log rows), rewrites
/// the copy where they differ, and records the reconcile, with the drift when `$3` (the log's
/// record was meant to be whole, see [`Reconcile::drift_known`]). One row: `total` (distinct values),
/// `drift_new` (values the source has that the capture did not record), `drift_stale` (values
/// the capture recorded that the source has no more) (int8 each).
pub fn reconcile(source: &Source) -> Text<3> {
    Text::built(format!(
        "WITH k AS (SELECT capture_id AS id FROM embedding_sync_capture WHERE source_table = $1 AND source_column = $2),\n\
         consumed AS MATERIALIZED (\n    \
         DELETE FROM embedding_sync_change_log l USING k WHERE l.capture_id = k.id RETURNING l.value_hash, l.delta, l.value\n\
         ),\n\
         actual AS MATERIALIZED (\n    {scan}\n),\n\
         copy AS MATERIALIZED (\n    \
         SELECT m.value_hash AS h, m.n FROM embedding_sync_capture_values m, k WHERE m.capture_id = k.id\n\
         ),\n\
         expected AS MATERIALIZED (\n    \
         SELECT x.h, sum(x.n) AS n FROM (SELECT h, n FROM copy UNION ALL\n        \
         SELECT coalesce(value_hash, encode(sha256(convert_to(value, 'UTF8')), 'hex')), delta FROM consumed\n        \
         WHERE value_hash IS NOT NULL OR value IS NOT NULL) x GROUP BY x.h\n\
         ),\n\
         drift AS MATERIALIZED (\n    \
         SELECT (SELECT count(*) FROM actual a WHERE NOT EXISTS (SELECT 1 FROM expected e WHERE e.h = a.h AND e.n > 0)) AS new,\n           \
         (SELECT count(*) FROM expected e WHERE e.n > 0 AND NOT EXISTS (SELECT 1 FROM actual a WHERE a.h = e.h)) AS stale\n\
         ),\n\
         removed AS (\n    \
         DELETE FROM embedding_sync_capture_values m USING k\n    \
         WHERE m.capture_id = k.id AND NOT EXISTS (SELECT 1 FROM actual a WHERE a.h = m.value_hash)\n\
         ),\n\
         written AS (\n    \
         INSERT INTO embedding_sync_capture_values AS m (capture_id, value_hash, value, n)\n    \
         SELECT k.id, a.h, a.v, a.n FROM actual a, k\n    \
         WHERE NOT EXISTS (SELECT 1 FROM copy c WHERE c.h = a.h AND c.n = a.n)\n    \
         ON CONFLICT (capture_id, value_hash) DO UPDATE SET n = EXCLUDED.n, value = EXCLUDED.value\n\
         ),\n\
         st AS (\n    \
         UPDATE embedding_sync_capture c\n    \
         SET reconciled_at = now(), reconcile_reason = NULL, settled_tags = NULL, total = (SELECT count(*) FROM actual),\n        \
         drift_new = CASE WHEN $3 THEN (SELECT new FROM drift) END, drift_stale = CASE WHEN $3 THEN (SELECT stale FROM drift) END\n    \
         FROM k WHERE c.capture_id = k.id\n\
         )\n\
         SELECT (SELECT count(*) FROM actual)::int8, new::int8, stale::int8 FROM drift",
        scan = scan_values(source),
    ))
}

/// A run (`$5`) is through the source (`$1`, `$2`; `$3`, `$4` the model tags): when it left
/// nothing pending (no error recorded for the source, and every value of the run's snapshot of
/// it done: not so when a model was refused), the model tags are recorded (`$6`, see
/// [`settled_tags`]), and a later run whose log holds nothing for the source skips it until
/// something changes. Run before the snapshot is dropped; costs a probe per value it held.
pub fn settle_capture() -> Text<6> {
    Text::built(format!(
        "UPDATE embedding_sync_capture SET settled_tags = $6\n\
         WHERE source_table = $1 AND source_column = $2\n  \
         AND NOT EXISTS (SELECT 1 FROM embedding_sync_errors e WHERE e.source_table = $1 AND e.source_column = $2)\n  \
         AND NOT EXISTS (\n    \
         SELECT 1 FROM (SELECT value_hash AS h FROM embedding_sync_pending WHERE run_id = $5 AND source_table = $1 AND source_column = $2) s\n    \
         {join}\n    \
         WHERE {not_done})",
        join = join_cache(FULL),
        not_done = not_done(),
    ))
}

/// The model tags as [`settle_capture`] records them.
pub fn settled_tags(tags: &ModelTags) -> String {
    format!("{}\n{}", tags.large, tags.small)
}

/// [`CAPTURE_STATE`].
#[derive(Debug)]
pub struct CaptureState<'a> {
    /// The source.
    pub source: &'a Source,
}

impl Statement<3> for CaptureState<'_> {
    fn text(&self) -> Text<3> {
        CAPTURE_STATE
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, Param::Text(Cow::Owned(self.source.table.quoted()))]
    }
}

/// [`REGISTER_CAPTURE`].
#[derive(Debug)]
pub struct RegisterCapture<'a> {
    /// The source.
    pub source: &'a Source,
    /// Why the reconcile that follows runs.
    pub why: &'a str,
}

impl Statement<3> for RegisterCapture<'_> {
    fn text(&self) -> Text<3> {
        REGISTER_CAPTURE
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, param::text(self.why)]
    }
}

/// [`FOLD_CHANGES`].
#[derive(Debug)]
pub struct FoldChanges<'a> {
    /// The source.
    pub source: &'a Source,
}

impl Statement<2> for FoldChanges<'_> {
    fn text(&self) -> Text<2> {
        FOLD_CHANGES
    }
    fn params(&self) -> [Param<'_>; 2] {
        param::keys(self.source)
    }
}

/// [`DROP_GONE_VALUES`].
#[derive(Debug)]
pub struct DropGoneValues<'a> {
    /// The source.
    pub source: &'a Source,
    /// The hashes whose count reached zero or less.
    pub hashes: Vec<&'a str>,
}

impl Statement<3> for DropGoneValues<'_> {
    fn text(&self) -> Text<3> {
        DROP_GONE_VALUES
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, param::texts(self.hashes.iter().copied())]
    }
}

/// [`reconcile`].
#[derive(Debug)]
pub struct Reconcile<'a> {
    /// The source.
    pub source: &'a Source,
    /// The log should hold every change since the last reconcile (not after an install, a
    /// TRUNCATE or a truncated log): the difference is drift, and is recorded.
    pub drift_known: bool,
}

impl Statement<3> for Reconcile<'_> {
    fn text(&self) -> Text<3> {
        reconcile(self.source)
    }
    fn params(&self) -> [Param<'_>; 3] {
        let [t, c] = param::keys(self.source);
        [t, c, Param::Bool(self.drift_known)]
    }
}

/// [`settle_capture`].
#[derive(Debug)]
pub struct SettleCapture<'a> {
    /// The source.
    pub source: &'a Source,
    /// The configured model tags.
    pub tags: &'a ModelTags,
    /// The run that is through the source.
    pub run: &'a RunId,
}

impl Statement<6> for SettleCapture<'_> {
    fn text(&self) -> Text<6> {
        settle_capture()
    }
    fn params(&self) -> [Param<'_>; 6] {
        let [t, c, l, s] = param::source_tags(self.source, self.tags);
        [t, c, l, s, param::run(self.run), Param::Text(Cow::Owned(settled_tags(self.tags)))]
    }
}

/// [`FORCE_RECONCILE`].
#[derive(Debug)]
pub struct ForceReconcile<'a> {
    /// The capture.
    pub capture_id: i32,
    /// Why.
    pub why: &'a str,
}

impl Statement<2> for ForceReconcile<'_> {
    fn text(&self) -> Text<2> {
        FORCE_RECONCILE
    }
    fn params(&self) -> [Param<'_>; 2] {
        [Param::Int8(i64::from(self.capture_id)), param::text(self.why)]
    }
}

/// [`TABLE_EXISTS`].
#[derive(Debug)]
pub struct TableExists<'a> {
    /// The table.
    pub table: &'a TableName,
}

impl Statement<1> for TableExists<'_> {
    fn text(&self) -> Text<1> {
        TABLE_EXISTS
    }
    fn params(&self) -> [Param<'_>; 1] {
        [Param::Text(Cow::Owned(self.table.quoted()))]
    }
}

/// [`FORGET_CAPTURE`].
#[derive(Debug)]
pub struct ForgetCapture {
    /// The capture.
    pub capture_id: i32,
}

impl Statement<1> for ForgetCapture {
    fn text(&self) -> Text<1> {
        FORGET_CAPTURE
    }
    fn params(&self) -> [Param<'_>; 1] {
        [Param::Int8(i64::from(self.capture_id))]
    }
}
