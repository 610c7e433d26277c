//! Typed statements: one definition per statement, its text and its parameters together, so a
//! wrong bind does not compile.
//!
//! # The pattern (follow it for a new statement)
//!
//! 1. **The text**, with its arity `N` in its type ([`Text<N>`]): a constant
//!    `pub const X: Text<N> = Text::fixed("... $1 ... $N ...")` when the text is fixed (the
//!    compiler checks that it numbers exactly `$1` to `$N`, each at least once: a text with one
//!    parameter too many or too few, or a gap, does not compile), or a function returning
//!    `Text::built(format!(..))` when it splices in quoted identifiers (checked by the test of
//!    step 4).
//! 2. **A struct named for the statement** (`FENCE`'s is `Fence`), whose fields are its
//!    parameters with their own types (`&RunId`, `&Source`, `Option<&ValueHash>`, `Duration`,
//!    ...): one struct per statement, never a statement's text as a field.
//! 3. **`impl Statement<N> for X`**: `text()` returns the `Text<N>` of step 1 (a `Text` of
//!    another arity is a type error) and `params()` returns `[Param<'_>; N]`, the parameters in
//!    the order the text numbers them (an array of another length is a type error). Each
//!    [`Param`] carries its Postgres type ([`Param::pg_type`]), so the store declares every
//!    parameter's type (unnamed statements, `query_typed`) without a second list.
//! 4. **A line in `sql/tests.rs`**'s `typed_statements_bind_every_parameter_their_text_numbers`,
//!    which checks every statement's text with the same [`numbered`] the compiler runs on the
//!    fixed ones (the built texts are only known at run time).
//! 5. **The store runs it** through `embsync-store`'s `bind.rs`:
//!    `query_one(&tx, &Bound::new(&sql::X { .. }))` (also `query`, `query_opt`, `execute`;
//!    `Bound::with_vectors` for a statement that binds vectors).
//!
//! Statements without parameters stay `&str` constants, run with an empty parameter list.
//! Fragments shared by several texts ([`super::MASS_DELETE_HELD`]) are `&str` too: only a whole
//! statement has an arity.
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
//!
//! ```compile_fail
//! // A fixed text that numbers two parameters is not a statement of one.
//! use embsync_core::sql::param::Text;
//! const ONE: Text<1> = Text::fixed("SELECT $1::text, $2::text");
//! ```
//!
//! ```compile_fail
//! // A statement of three parameters cannot hand over two.
//! use embsync_core::sql::{param::{Param, Text}, Statement};
//! use std::borrow::Cow;
//! struct Three;
//! impl Statement<3> for Three {
//!     fn text(&self) -> Text<3> {
//!         Text::fixed("SELECT $1::text, $2::text, $3::text")
//!     }
//!     fn params(&self) -> [Param<'_>; 3] {
//!         [Param::Text(Cow::Borrowed("a")), Param::Text(Cow::Borrowed("b"))]
//!     }
//! }
//! ```

use crate::config::{Models, Source};
use crate::hash::ValueHash;
use crate::sync::RunId;
use crate::vector::Vector;
use std::borrow::Cow;
use std::time::Duration;

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
    TextArray(Vec<Cow<'a, str>>),
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

/// A statement's text that numbers `N` parameters, `$1` to `$N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<const N: usize>(Cow<'static, str>);

impl<const N: usize> Text<N> {
    /// A fixed text. In a constant (`const X: Text<N> = Text::fixed(..)`) it is checked when it
    /// compiles: a text that does not number exactly `$1` to `$N` fails to compile.
    ///
    /// # Panics
    /// When `text` does not number exactly `$1` to `$N` (at compile time in a constant).
    pub const fn fixed(text: &'static str) -> Text<N> {
        match numbered(text) {
            Some(n) if n == N => Text(Cow::Borrowed(text)),
            _ => panic!("the statement's text does not number exactly $1 to $N, its arity"),
        }
    }

    /// A text built at run time (quoted identifiers spliced in); `sql/tests.rs` checks that it
    /// numbers `$1` to `$N`.
    pub fn built(text: String) -> Text<N> {
        Text(Cow::Owned(text))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> std::ops::Deref for Text<N> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The highest `$n` that `text` numbers when it numbers each of `$1` to `$n` at least once
/// (`Some(0)` for none); `None` when it skips a number (or numbers past `$63`). A `$` not
/// followed by a digit (dollar quoting) is not a parameter.
pub const fn numbered(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut seen: u64 = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let mut n: usize = 0;
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                n = n * 10 + (b[j] - b'0') as usize;
                if n > 63 {
                    return None;
                }
                j += 1;
            }
            if j > i + 1 {
                if n == 0 {
                    return None;
                }
                seen |= 1 << (n - 1);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    // At most bit 62 is set ($63), so the shift does not overflow.
    let max = (u64::BITS - seen.leading_zeros()) as usize;
    if seen == (1u64 << max) - 1 {
        Some(max)
    } else {
        None
    }
}

/// A statement of `N` parameters: its text and its parameters, `$1` first. See the module's
/// documentation for the pattern.
pub trait Statement<const N: usize> {
    /// Its text (identifiers only through the checked, quoted types; values as `$n`).
    fn text(&self) -> Text<N>;
    /// Its parameters, `$1` first.
    fn params(&self) -> [Param<'_>; N];
}

/// A count as `int8` (saturating).
pub fn int8(n: u64) -> Param<'static> {
    Param::Int8(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Milliseconds as `text` (what `set_config` takes for a timeout).
pub fn millis(d: Duration) -> Param<'static> {
    Param::Text(Cow::Owned(d.as_millis().to_string()))
}

/// Seconds as `float8`.
pub fn secs(d: Duration) -> Param<'static> {
    Param::Float8(d.as_secs_f64())
}

/// Borrowed text.
pub fn text(s: &str) -> Param<'_> {
    Param::Text(Cow::Borrowed(s))
}

/// Borrowed texts as `text[]`.
pub fn texts<'a>(items: impl IntoIterator<Item = &'a str>) -> Param<'a> {
    Param::TextArray(items.into_iter().map(Cow::Borrowed).collect())
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

    /// As a run records them (`embedding_sync_runs.models`): large and small, a line each.
    pub fn recorded(&self) -> String {
        format!("{}\n{}", self.large, self.small)
    }
}

/// `$1` source table key, `$2` source column key, `$3` / `$4` the model tags: the first
/// parameters of every source statement.
pub(super) fn source_tags<'a>(source: &Source, tags: &'a ModelTags) -> [Param<'a>; 4] {
    let [t, c] = keys(source);
    [t, c, text(&tags.large), text(&tags.small)]
}

/// A source's keys (table, column).
pub(super) fn keys(source: &Source) -> [Param<'static>; 2] {
    [Param::Text(Cow::Owned(source.table_key())), Param::Text(Cow::Owned(source.column_key().to_owned()))]
}

/// Sources' keys as two `text[]`: tables, columns.
pub(super) fn key_arrays<'a>(keys: impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)>) -> [Param<'a>; 2] {
    let (tables, columns) = keys.unzip();
    [Param::TextArray(tables), Param::TextArray(columns)]
}

pub(super) fn run(run: &RunId) -> Param<'_> {
    text(&run.0)
}

pub(super) fn hash(after: Option<&ValueHash>) -> Param<'_> {
    text(after.map_or("", |h| h.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_counts_dense_parameters_only() {
        assert_eq!(numbered("SELECT 1"), Some(0));
        assert_eq!(numbered("SELECT $1, $2, $1"), Some(2));
        assert_eq!(numbered("SELECT $2"), None, "skips $1");
        assert_eq!(numbered("SELECT $1, $3"), None, "skips $2");
        assert_eq!(numbered("SELECT $0"), None);
        let ten = (1..=10).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        assert_eq!(numbered(&ten), Some(10));
        assert_eq!(numbered("SELECT $$a$$, $tag$b$tag$, $1"), Some(1), "dollar quotes are not parameters");
        assert_eq!(numbered("SELECT $64"), None);
        let all = (1..=63).map(|i| format!("${i}")).collect::<Vec<_>>().join(",");
        assert_eq!(numbered(&all), Some(63));
    }
}
