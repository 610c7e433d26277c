//! Sources that left the config: what they still hold, and pruning it when asked (`POST /prune`).
//!
//! A source removed from the config, renamed (`items` and `public.items` are recorded as two
//! sources, see [`Source::table_key`]) or disabled is no longer synced, but its links, the cache
//! rows only it holds and its errors stay. `GET /status` lists them ([`LeftSource`]); a prune
//! removes them for one named source or for all of them, and only on request: the request names
//! the source, and the deletion must be confirmed with the number of cache rows it deletes (what
//! a dry run reports), so nothing is deleted that the user has not seen counted.
//!
//! ```
//! use embsync_core::prune::{PruneRequest, PruneTarget};
//!
//! let request = PruneRequest::parse(r#"{"table": "items", "column": "title", "dryRun": true}"#).unwrap();
//! assert_eq!(request.target, PruneTarget::Source { table: "items".into(), column: "title".into() });
//! assert!(request.dry_run);
//! assert!(PruneRequest::parse(r#"{"all": false}"#).is_err());
//! ```

use crate::config::{Config, Source};
use serde::{Deserialize, Serialize};

/// A source recorded in embsync's tables (links or errors) that no enabled source of the config
/// has: removed, renamed or disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeftSource {
    /// `source_table` as recorded.
    pub table: String,
    /// `source_column` as recorded.
    pub column: String,
    /// Why it is not synced.
    pub reason: LeftReason,
    /// The source's name, when the config still lists it (disabled).
    pub name: Option<String>,
    /// Its links (`embedding_cache_sources`): values it had when it was last synced.
    pub links: u64,
    /// Its rows in `embedding_sync_errors`.
    pub errors: u64,
    /// Cache rows embsync wrote that no other source links: what pruning it alone deletes.
    pub rows: u64,
    /// Its values recorded in Batch API request files (`embedding_sync_batch_values`) of
    /// batches not over yet: their vectors are not stored for it (it is not synced), and a
    /// prune forgets them.
    pub batch_values: u64,
    /// The enabled source that reads the same column under another spelling of the table
    /// (`items` and `public.items`): a rename. Until that source has been synced, the rows only
    /// this one holds are its rows too, and pruning them would cost their embeddings again.
    pub same_as: Option<String>,
}

/// Why a recorded source is not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LeftReason {
    /// The config lists it with `"enabled": false`.
    Disabled,
    /// The config does not list it (removed, or renamed: another spelling of the table is
    /// another source).
    Removed,
}

impl LeftReason {
    /// How the status page says it.
    pub fn as_str(self) -> &'static str {
        match self {
            LeftReason::Disabled => "disabled",
            LeftReason::Removed => "removed",
        }
    }
}

/// The configured source recorded as (`table`, `column`), if any.
fn configured<'a>(config: &'a Config, table: &str, column: &str) -> Option<&'a Source> {
    config.sources.iter().find(|s| s.table_key() == table && s.column_key() == column)
}

impl LeftSource {
    /// A recorded source with its counts, named and explained by the config.
    pub fn new(config: &Config, table: String, column: String, links: u64, errors: u64, rows: u64) -> LeftSource {
        let source = configured(config, &table, &column);
        LeftSource {
            reason: if source.is_some() { LeftReason::Disabled } else { LeftReason::Removed },
            name: source.map(|s| s.name.clone()),
            table,
            column,
            links,
            errors,
            rows,
            batch_values: 0,
            same_as: None,
        }
    }

    /// The table as SQL text (quoted), to compare with the enabled sources' tables in the
    /// catalog; `None` when the recorded key is not a table name.
    pub fn quoted_table(&self) -> Option<String> {
        crate::ident::TableName::parse(&self.table).ok().map(|t| t.quoted())
    }

    /// `table.column`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.table, self.column)
    }
}

/// What `POST /prune` is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneRequest {
    /// Which sources.
    pub target: PruneTarget,
    /// Only count, delete nothing (and take no lease).
    pub dry_run: bool,
    /// The number of cache rows the prune deletes, as a dry run reported it: a prune that would
    /// delete another number deletes nothing.
    pub confirm: Option<u64>,
}

/// Which sources a prune removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneTarget {
    /// Every source that left the config.
    All,
    /// One recorded source, by `source_table` and `source_column` as `GET /status` lists it.
    Source {
        /// `source_table`.
        table: String,
        /// `source_column`.
        column: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequest {
    table: Option<String>,
    column: Option<String>,
    all: Option<bool>,
    dry_run: Option<bool>,
    confirm: Option<u64>,
}

/// Why a `POST /prune` body was rejected; the message says what to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PruneRequestError(String);

const USAGE: &str = r#"send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#;

impl PruneRequest {
    /// Parses a `POST /prune` body.
    ///
    /// # Errors
    /// [`PruneRequestError`] for a body that is not such a JSON object, has unknown keys, names
    /// no source, or names a source and `all` together.
    pub fn parse(body: &str) -> Result<PruneRequest, PruneRequestError> {
        let raw: RawRequest = serde_json::from_str(body).map_err(|e| PruneRequestError(format!("bad prune request: {e}: {USAGE}")))?;
        let target = match (raw.table, raw.column, raw.all) {
            (None, None, Some(true)) => PruneTarget::All,
            (Some(_), Some(_), Some(_)) => {
                return Err(PruneRequestError(format!("bad prune request: name one source or \"all\": true, not both: {USAGE}")))
            }
            (Some(table), Some(column), None) if !table.is_empty() && !column.is_empty() => PruneTarget::Source { table, column },
            (Some(_), Some(_), None) => {
                return Err(PruneRequestError(format!("bad prune request: table and column must not be empty: {USAGE}")))
            }
            (None, None, Some(false)) => {
                return Err(PruneRequestError(format!("bad prune request: \"all\": false prunes nothing: {USAGE}")))
            }
            (Some(_), None, _) => return Err(PruneRequestError(format!("bad prune request: missing column: {USAGE}"))),
            (None, Some(_), _) => return Err(PruneRequestError(format!("bad prune request: missing table: {USAGE}"))),
            (None, None, None) => return Err(PruneRequestError(format!("bad prune request: no source named: {USAGE}"))),
        };
        Ok(PruneRequest { target, dry_run: raw.dry_run.unwrap_or(false), confirm: raw.confirm })
    }

    /// The recorded sources this request prunes, out of those that left the config (`left`).
    ///
    /// # Errors
    /// [`PruneRefusal::EnabledSource`] for a source the config enables, and
    /// [`PruneRefusal::NotRecorded`] for one nothing is recorded for.
    pub fn targets(&self, config: &Config, left: &[LeftSource]) -> Result<Vec<LeftSource>, PruneRefusal> {
        match &self.target {
            PruneTarget::All => Ok(left.to_vec()),
            PruneTarget::Source { table, column } => {
                if let Some(source) = configured(config, table, column).filter(|s| s.enabled) {
                    return Err(PruneRefusal::EnabledSource { key: format!("{table}.{column}"), name: source.name.clone() });
                }
                match left.iter().find(|l| &l.table == table && &l.column == column) {
                    Some(found) => Ok(vec![found.clone()]),
                    None => Err(PruneRefusal::NotRecorded {
                        key: format!("{table}.{column}"),
                        left: if left.is_empty() { "none".into() } else { left.iter().map(LeftSource::key).collect::<Vec<_>>().join(", ") },
                    }),
                }
            }
        }
    }

    /// Whether the prune that `report` counts may go ahead: only when confirmed with its number
    /// of cache rows.
    ///
    /// # Errors
    /// [`PruneRefusal::Unconfirmed`] without `confirm`, [`PruneRefusal::Mismatch`] when it
    /// differs from the rows the prune deletes now.
    pub fn check_confirmed(&self, report: &PruneReport) -> Result<(), PruneRefusal> {
        match self.confirm {
            None => Err(PruneRefusal::Unconfirmed { report: report.clone() }),
            Some(n) if n != report.rows => Err(PruneRefusal::Mismatch { confirm: n, report: report.clone() }),
            Some(_) => Ok(()),
        }
    }
}

/// What a prune did, or would do (a dry run, or a refused prune: nothing was deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    /// Whether this only counted.
    pub dry_run: bool,
    /// Whether anything was deleted.
    pub pruned: bool,
    /// The sources pruned, with their counts before.
    pub sources: Vec<LeftSource>,
    /// Cache rows deleted (or that would be): rows embsync wrote that only these sources linked.
    pub rows: u64,
    /// Links removed (or that would be).
    pub links: u64,
    /// Error rows removed (or that would be).
    pub errors: u64,
    /// Rows of `embedding_sync_batch_values` removed (or that would be): the pruned sources'
    /// values in pending Batch API files, and any left of a file embsync is done with.
    pub batch_values: u64,
}

impl PruneReport {
    /// The counts of a prune of `sources` that deletes `rows` cache rows, before it runs.
    pub fn planned(dry_run: bool, sources: Vec<LeftSource>, rows: u64) -> PruneReport {
        let links = sources.iter().map(|s| s.links).sum();
        let errors = sources.iter().map(|s| s.errors).sum();
        let batch_values = sources.iter().map(|s| s.batch_values).sum();
        PruneReport { dry_run, pruned: false, sources, rows, links, errors, batch_values }
    }

    fn what(&self) -> String {
        let keys: Vec<String> = self.sources.iter().map(LeftSource::key).collect();
        let batched = match self.batch_values {
            0 => String::new(),
            n => format!(" (and forgets {n} of their values in pending Batch API files)"),
        };
        format!(
            "{} cache rows, {} links and {} errors of {}{batched}",
            self.rows,
            self.links,
            self.errors,
            if keys.is_empty() { "no source".into() } else { keys.join(", ") }
        )
    }
}

/// Why a prune deleted nothing although it was well-formed. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PruneRefusal {
    /// The named source is enabled: the sync keeps it.
    #[error("{key} is the enabled source {name:?}: remove it from the config or disable it first; a prune only removes sources that left the config")]
    EnabledSource {
        /// `table.column`.
        key: String,
        /// The source's name.
        name: String,
    },
    /// Nothing is recorded for the named source.
    #[error("nothing is recorded for {key}; the sources that left the config are: {left} (GET /status lists them under leftConfig)")]
    NotRecorded {
        /// `table.column`.
        key: String,
        /// The recorded sources that left the config, comma-separated, or `none`.
        left: String,
    },
    /// Not confirmed.
    #[error("this prune deletes {}: send the same request with \"confirm\": {} to do it, or \"dryRun\": true to count only", .report.what(), .report.rows)]
    Unconfirmed {
        /// What it would delete.
        report: PruneReport,
    },
    /// Confirmed with another number of rows than it deletes now.
    #[error("\"confirm\" is {confirm} but this prune now deletes {}; nothing was deleted: check again with \"dryRun\": true", .report.what())]
    Mismatch {
        /// What the request said.
        confirm: u64,
        /// What it would delete now.
        report: PruneReport,
    },
}

impl PruneRefusal {
    /// The HTTP status `POST /prune` answers with.
    pub fn status(&self) -> u16 {
        match self {
            PruneRefusal::EnabledSource { .. } | PruneRefusal::Unconfirmed { .. } => 400,
            PruneRefusal::NotRecorded { .. } => 404,
            PruneRefusal::Mismatch { .. } => 409,
        }
    }

    /// The counts, when the refusal has them.
    pub fn report(&self) -> Option<&PruneReport> {
        match self {
            PruneRefusal::Unconfirmed { report } | PruneRefusal::Mismatch { report, .. } => Some(report),
            _ => None,
        }
    }
}

/// What a prune came to.
#[derive(Debug, Clone, PartialEq)]
pub enum PruneOutcome {
    /// Done, or counted (a dry run).
    Done(PruneReport),
    /// Well-formed but refused: nothing was deleted.
    Refused(PruneRefusal),
    /// A sync holds the lease; nothing was done.
    Busy {
        /// Its holder.
        holder: String,
        /// Seconds until it expires unless renewed.
        expires_in_secs: f64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};

    fn config() -> Config {
        Config::parse(
            r#"{"version":"1.0","models":{"large":"text-embedding-3-large","small":"text-embedding-3-small"},
            "sources":[{"name":"Items","table":"public.items","column":"title"},
                       {"name":"Old","table":"notes","column":"body","enabled":false}]}"#,
        )
        .unwrap()
    }

    fn check(body: &str, expect: Expect) {
        let actual = match PruneRequest::parse(body) {
            Ok(r) => format!("{r:?}"),
            Err(e) => format!("err {e}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn requests() {
        check(
            r#"{"table":"items","column":"title"}"#,
            expect![[r#"PruneRequest { target: Source { table: "items", column: "title" }, dry_run: false, confirm: None }"#]],
        );
        check(r#"{"all":true,"dryRun":true}"#, expect!["PruneRequest { target: All, dry_run: true, confirm: None }"]);
        check(r#"{"all":true,"confirm":12}"#, expect!["PruneRequest { target: All, dry_run: false, confirm: Some(12) }"]);
        check(
            r#"{"all":false}"#,
            expect![[
                r#"err bad prune request: "all": false prunes nothing: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            "",
            expect![[
                r#"err bad prune request: EOF while parsing a value at line 1 column 0: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            "{}",
            expect![[
                r#"err bad prune request: no source named: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            r#"{"table":"items"}"#,
            expect![[
                r#"err bad prune request: missing column: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            r#"{"table":"items","column":"title","all":true}"#,
            expect![[
                r#"err bad prune request: name one source or "all": true, not both: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            r#"{"table":"items","column":"title","force":true}"#,
            expect![[
                r#"err bad prune request: unknown field `force`, expected one of `table`, `column`, `all`, `dryRun`, `confirm` at line 1 column 41: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            r#"{"all":true,"confirm":-1}"#,
            expect![[
                r#"err bad prune request: invalid value: integer `-1`, expected u64 at line 1 column 24: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
        check(
            r#"{"table":"","column":"title"}"#,
            expect![[
                r#"err bad prune request: table and column must not be empty: send {"table": "...", "column": "..."} as GET /status lists it under leftConfig, or {"all": true}; add "dryRun": true to count only, and "confirm": <rows> to delete"#
            ]],
        );
    }

    #[test]
    fn left_sources_are_named_by_the_config() {
        let c = config();
        let renamed = LeftSource::new(&c, "items".into(), "title".into(), 3, 1, 0);
        assert_eq!((renamed.reason, renamed.name.as_deref()), (LeftReason::Removed, None));
        let disabled = LeftSource::new(&c, "notes".into(), "body".into(), 2, 0, 2);
        assert_eq!((disabled.reason, disabled.name.as_deref()), (LeftReason::Disabled, Some("Old")));
        expect![[r#"{"table":"notes","column":"body","reason":"disabled","name":"Old","links":2,"errors":0,"rows":2,"batchValues":0,"sameAs":null}"#]]
            .assert_eq(&serde_json::to_string(&disabled).unwrap());
    }

    #[test]
    fn targets_and_the_confirmation() {
        let c = config();
        let left =
            vec![LeftSource::new(&c, "items".into(), "title".into(), 3, 1, 0), LeftSource::new(&c, "notes".into(), "body".into(), 2, 0, 2)];
        let request = |body: &str| PruneRequest::parse(body).unwrap();
        assert_eq!(request(r#"{"all":true}"#).targets(&c, &left).unwrap(), left);
        assert_eq!(request(r#"{"table":"notes","column":"body"}"#).targets(&c, &left).unwrap(), vec![left[1].clone()]);
        let enabled = request(r#"{"table":"public.items","column":"title"}"#).targets(&c, &left).unwrap_err();
        expect![[r#"public.items.title is the enabled source "Items": remove it from the config or disable it first; a prune only removes sources that left the config"#]]
            .assert_eq(&enabled.to_string());
        assert_eq!(enabled.status(), 400);
        let unknown = request(r#"{"table":"nope","column":"x"}"#).targets(&c, &left).unwrap_err();
        expect!["nothing is recorded for nope.x; the sources that left the config are: items.title, notes.body (GET /status lists them under leftConfig)"]
            .assert_eq(&unknown.to_string());
        assert_eq!(unknown.status(), 404);

        let report = PruneReport::planned(false, left.clone(), 2);
        assert_eq!((report.links, report.errors), (5, 1));
        let unconfirmed = request(r#"{"all":true}"#).check_confirmed(&report).unwrap_err();
        expect![[r#"this prune deletes 2 cache rows, 5 links and 1 errors of items.title, notes.body: send the same request with "confirm": 2 to do it, or "dryRun": true to count only"#]]
            .assert_eq(&unconfirmed.to_string());
        assert_eq!((unconfirmed.status(), unconfirmed.report()), (400, Some(&report)));
        let mismatch = request(r#"{"all":true,"confirm":1}"#).check_confirmed(&report).unwrap_err();
        expect![[r#""confirm" is 1 but this prune now deletes 2 cache rows, 5 links and 1 errors of items.title, notes.body; nothing was deleted: check again with "dryRun": true"#]]
            .assert_eq(&mismatch.to_string());
        assert_eq!(mismatch.status(), 409);
        assert_eq!(request(r#"{"all":true,"confirm":2}"#).check_confirmed(&report), Ok(()));
    }
}
