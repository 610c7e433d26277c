//! Every SQL statement embsync runs, as text, by what it serves: [`schema`] (version, migration,
//! checks, statistics), [`plan`] (counts, reusable links, pending pages, snapshots), [`batch`] (a
//! batch's write), [`batches`] (the Batch API's files, batches and their values), [`stale`]
//! (stale removal, orphans), [`runs`] (the lease and fence, run bookkeeping), [`fanout`] (ranges,
//! claims, the sweeper), [`capture`] (change capture), [`status`], [`prune`] and [`indexes`]. This module holds the fragments they
//! share (a source's values, what *has* an embedding, the cache join). Every item is re-exported
//! here, so callers name `sql::X`.
//!
//! Architecture Invariant: table and column names enter these strings only through
//! [`TableName::quoted`](crate::ident::TableName::quoted) and
//! [`Ident::quoted`](crate::ident::Ident::quoted); every value is a bound parameter. Statements
//! hold no session state (no temp tables, no session advisory locks, no prepared-statement
//! names), so they also work through a transaction-pooling proxy such as Hyperdrive.
//!
//! Source statements take `$1` = source table key and `$2` = source column key, the strings
//! recorded in `embedding_cache_sources` (see [`Source::table_key`]), and `$3` / `$4` = the
//! configured model tags of the large and small model ([`ModelSpec::tag`]).
//!
//! A row *has* a model's embedding when the column is not NULL and, for rows embsync wrote, the
//! tag recorded in `embedding_cache_owned` is the configured one (no tag counts as current). Rows written by someone else are judged by NULL-ness only: embsync never
//! overwrites their vectors.
//!
//! [`ModelSpec::tag`]: crate::config::ModelSpec::tag

use crate::config::{ModelSlot, Models, Source, VectorIndexes};
use crate::ident::{Ident, TableName};
use crate::index::IndexTarget;
#[allow(unused_imports)] // for the statement modules (`use super::*`)
use crate::{hash::ValueHash, sync::RunId};
use param::Param;
use std::borrow::Cow;

mod batch;
mod batches;
mod fanout;
mod capture;
mod indexes;
pub mod param;
mod plan;
mod prune;
mod runs;
mod schema;
mod stale;
mod status;

pub use batch::*;
pub use batches::*;
pub use fanout::*;
pub use capture::*;
pub use indexes::*;
pub use param::{ModelTags, PgType, Statement, Text};
pub use plan::*;
pub use prune::*;
pub use runs::*;
pub use schema::*;
pub use stale::*;
pub use status::*;

/// The distinct non-empty trimmed values of a source with their hash and row count, as a CTE
/// body: columns `h` (hash), `v` (trimmed value), `n` (source rows holding it).
///
/// A captured source (`"changes": "capture"`) reads embsync's copy of its values
/// (`embedding_sync_capture_values`, kept by the fold of the change log and the reconcile, see
/// [`capture`]) instead of the table, once a reconcile has filled it; before that (or when
/// capture was turned on in the middle of a run) it scans the table: the scan's branch is a
/// one-time filter, not run when the copy is used. Needs `$1`, `$2` (the source's keys).
fn source_values(source: &Source) -> String {
    if !source.changes.is_capture() {
        return scan_values(source);
    }
    let filled = "EXISTS (SELECT 1 FROM embedding_sync_capture k\n            \
                  WHERE k.source_table = $1 AND k.source_column = $2 AND k.reconciled_at IS NOT NULL)";
    format!(
        "SELECT m.value_hash AS h, m.value AS v, m.n FROM embedding_sync_capture_values m\n    \
         WHERE {filled}\n      \
         AND m.capture_id = (SELECT k.capture_id FROM embedding_sync_capture k WHERE k.source_table = $1 AND k.source_column = $2)\n      \
         AND m.n > 0\n    \
         UNION ALL\n    \
         SELECT s.h, s.v, s.n FROM (\n    {scan}\n    ) s WHERE NOT {filled}",
        scan = scan_values(source),
    )
}

/// [`source_values`] by a scan of the source's table, whatever its mode.
fn scan_values(source: &Source) -> String {
    let col = source.column.quoted();
    format!(
        "SELECT encode(sha256(convert_to(d.v, 'UTF8')), 'hex') AS h, d.v, d.n\n    \
         FROM (SELECT btrim({col}::text, ' ') AS v, count(*) AS n FROM {table} WHERE {col} IS NOT NULL GROUP BY 1) d\n    \
         WHERE d.v <> ''",
        table = source.table.quoted(),
    )
}

/// What exists decides how a dry run can count without creating anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaState {
    /// `embedding_cache` exists (ours, or another pipeline's).
    pub cache: bool,
    /// All of embsync's own tables and columns exist.
    pub links: bool,
    /// Ownership records name the cache row (`cache_id`): the schema is at
    /// [`SCHEMA_VERSION`] 2 or later. Before that (a deployment not yet migrated, read by a dry
    /// run), a record is matched by the value hash alone.
    pub owned_by_row: bool,
}

/// `c` has the configured large (`$3`) or small (`$4`) embedding; needs `c` (the cache row) and
/// `o` (its `embedding_cache_owned` row, LEFT JOINed) in scope.
fn has(slot: &str, state: SchemaState) -> String {
    let tag = if slot == "large" { "$3" } else { "$4" };
    if state.links {
        format!("(c.embedding_{slot} IS NOT NULL AND (o.value_hash IS NULL OR coalesce(o.{slot}_model, {tag}) = {tag}))")
    } else {
        format!("(c.embedding_{slot} IS NOT NULL AND {tag}::text IS NOT NULL)")
    }
}

fn complete(state: SchemaState) -> String {
    format!("({} AND {})", has("large", state), has("small", state))
}

/// Joins the cache row `c` and its ownership record `o` for the value `s.h`: the record counts
/// only when it names that very row (its `id`), so a row another pipeline wrote after embsync's
/// was deleted is not embsync's.
fn join_cache(state: SchemaState) -> &'static str {
    match (state.links, state.owned_by_row) {
        (true, true) => "LEFT JOIN embedding_cache c ON c.value_hash = s.h\n    LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h AND o.cache_id = c.id",
        (true, false) => "LEFT JOIN embedding_cache c ON c.value_hash = s.h\n    LEFT JOIN embedding_cache_owned o ON o.value_hash = s.h",
        _ => "LEFT JOIN embedding_cache c ON c.value_hash = s.h",
    }
}

const FULL: SchemaState = SchemaState { cache: true, links: true, owned_by_row: true };

/// `s.h` is not done for the source (`$1`, `$2`): its row lacks a current embedding, or the
/// source is not linked to it. Needs `c` and `o` from [`join_cache`].
fn not_done() -> String {
    format!(
        "NOT (coalesce({complete}, false)\n           \
         AND EXISTS (SELECT 1 FROM embedding_cache_sources l\n                       \
         WHERE l.source_table = $1 AND l.source_column = $2 AND l.value_hash = s.h))",
        complete = complete(FULL)
    )
}

/// `s.h` is not waiting for a retry after an error in the source (`$1`, `$2`).
const NOT_DEFERRED: &str = "NOT EXISTS (SELECT 1 FROM embedding_sync_errors e\n                  \
     WHERE e.source_table = $1 AND e.source_column = $2 AND e.value_hash = s.h\n                    \
     AND e.next_retry_at > now())";

#[cfg(test)]
mod tests;
