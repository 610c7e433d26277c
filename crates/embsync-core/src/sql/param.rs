//! Typed statements: each statement that takes parameters is a struct whose fields are its
//! parameters, and whose [`Statement`] impl gives its text and its parameters in the order the
//! text numbers them. The call site names fields, never positions, so a parameter cannot be
//! bound in the wrong place or left out: the struct decides the order, and `tests.rs` checks
//! that each statement's text numbers exactly as many parameters as it returns.
//!
//! A [`Param`] carries its Postgres type ([`Param::pg_type`]) with its value, so the store
//! declares every parameter's type (unnamed statements, `query_typed`) without a second list.
//!
//! ```
//! use embsync_core::{config::Source, sql::{DropSnapshot, Statement}, sync::RunId};
//! fn f(source: &Source, run: &RunId) -> usize {
//!     DropSnapshot { run, source }.params().len()
//! }
//! ```
//!
//! ```compile_fail
//! // Fields are named and typed: a hash is not a run id.
//! use embsync_core::{hash::ValueHash, sql::DropSnapshot};
//! fn f(source: &embsync_core::config::Source, hash: &ValueHash) {
//!     let _ = DropSnapshot { run: hash, source };
//! }
//! ```

use crate::config::{Models, Source};
use crate::hash::ValueHash;
use crate::sync::RunId;
use crate::vector::Vector;
use std::borrow::Cow;

/// The Postgres type a parameter is declared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgType {
    /// `text`
    Text,
    /// `int8`
    Int8,
    /// `bool`
    Bool,
    /// `float8`
    Float8,
    /// `text[]`
    TextArray,
    /// `int4[]`
    Int4Array,
    /// pgvector's `vector[]` (its OID depends on the database: the store looks it up).
    VectorArray,
}

/// One bound parameter with its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param<'a> {
    /// `text`
    Text(Cow<'a, str>),
    /// `int8`
    Int8(i64),
    /// `bool`
    Bool(bool),
    /// `float8`
    Float8(f64),
    /// `text[]`
    TextArray(Vec<&'a str>),
    /// `int4[]`
    Int4Array(Vec<i32>),
    /// `vector[]`, NULL where `None`.
    VectorArray(Vec<Option<&'a Vector>>),
}

impl Param<'_> {
    /// The type the parameter is declared as.
    pub fn pg_type(&self) -> PgType {
        match self {
            Param::Text(_) => PgType::Text,
            Param::Int8(_) => PgType::Int8,
            Param::Bool(_) => PgType::Bool,
            Param::Float8(_) => PgType::Float8,
            Param::TextArray(_) => PgType::TextArray,
            Param::Int4Array(_) => PgType::Int4Array,
            Param::VectorArray(_) => PgType::VectorArray,
        }
    }
}

/// A statement with its parameters.
pub trait Statement {
    /// Its text (identifiers only through the checked, quoted types; values as `$n`).
    fn text(&self) -> Cow<'static, str>;
    /// Its parameters, `$1` first.
    fn params(&self) -> Vec<Param<'_>>;
}

/// A count as `int8` (saturating).
pub fn int8(n: u64) -> Param<'static> {
    Param::Int8(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The configured model tags ([`crate::config::ModelSpec::tag`]), bound as `$3` (large) and `$4`
/// (small) by the source statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTags {
    /// The large model's tag.
    pub large: String,
    /// The small model's tag.
    pub small: String,
}

impl ModelTags {
    /// The tags of `models`.
    pub fn of(models: &Models) -> ModelTags {
        ModelTags { large: models.large.tag(), small: models.small.tag() }
    }
}

/// `$1` source table key, `$2` source column key, `$3` / `$4` the model tags: the first
/// parameters of every source statement.
pub(super) fn source_tags<'a>(source: &Source, tags: &'a ModelTags) -> Vec<Param<'a>> {
    vec![
        Param::Text(Cow::Owned(source.table_key())),
        Param::Text(Cow::Owned(source.column_key().to_owned())),
        Param::Text(Cow::Borrowed(&tags.large)),
        Param::Text(Cow::Borrowed(&tags.small)),
    ]
}

/// A source's keys (table, column).
pub(super) fn keys(source: &Source) -> [Param<'static>; 2] {
    [Param::Text(Cow::Owned(source.table_key())), Param::Text(Cow::Owned(source.column_key().to_owned()))]
}

pub(super) fn run(run: &RunId) -> Param<'_> {
    Param::Text(Cow::Borrowed(&run.0))
}

pub(super) fn hash(after: Option<&ValueHash>) -> Param<'_> {
    Param::Text(Cow::Borrowed(after.map_or("", |h| h.as_str())))
}
