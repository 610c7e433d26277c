//! The HNSW indexes embsync keeps on the embedding columns (`vectorIndexes` in the config):
//! which should exist, decided from what the catalog says. No IO: the store reads an
//! [`IndexState`] and runs the statements of the [`IndexPlan`].
//!
//! - A column of more than 2000 dimensions (pgvector's HNSW limit for `vector`) gets an
//!   expression index over `embedding_large::halfvec(N)` with `halfvec_cosine_ops` (up to 4000);
//!   up to 2000 dimensions, a plain `vector_cosine_ops` index (or one over `::vector(N)` when the
//!   column is an unconstrained `vector`).
//! - Names are `embsync_hnsw_<slot>_<dims>_<hash>`, the hash covering the model tag, the indexed
//!   expression and the build parameters: a change of model, dimensions or parameters wants a
//!   new index, which is built before the old one is dropped, so search keeps an index.
//! - Only indexes named `embsync_hnsw_*` are embsync's: no other index is ever dropped.
//! - Nothing is done on an `embedding_cache` embsync did not create (it is another pipeline's
//!   table), nor while any index build on it is in progress (another invocation's, or a
//!   person's).
//! - An index left INVALID by an interrupted `CREATE INDEX CONCURRENTLY` is dropped and built
//!   again.

use crate::config::{ModelSlot, ModelSpec, Models, VectorIndexes};
use crate::ident::Ident;
use crate::sql;
use sha2::{Digest, Sha256};

/// Every index embsync makes is named with this prefix, and only those are ever dropped.
pub const INDEX_PREFIX: &str = "embsync_hnsw_";

/// pgvector's HNSW takes `vector` columns of at most this many dimensions.
pub const MAX_VECTOR_HNSW_DIMS: u32 = 2000;

/// pgvector's HNSW takes `halfvec` of at most this many dimensions.
pub const MAX_HALFVEC_HNSW_DIMS: u32 = 4000;

/// What the catalog says about `embedding_cache`, read by the store in one query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexState {
    /// embsync created `embedding_cache` (its table comment says so).
    pub cache_is_ours: bool,
    /// Some `CREATE INDEX` on `embedding_cache` is running right now.
    pub build_in_progress: bool,
    /// Declared dimensions of `embedding_large` (`atttypmod`: -1 unconstrained, `None` missing).
    pub large_typmod: Option<i32>,
    /// Declared dimensions of `embedding_small`, likewise.
    pub small_typmod: Option<i32>,
    /// Every index on `embedding_cache`, whoever made it.
    pub indexes: Vec<ExistingIndex>,
}

impl IndexState {
    fn typmod(&self, slot: ModelSlot) -> Option<i32> {
        match slot {
            ModelSlot::Large => self.large_typmod,
            ModelSlot::Small => self.small_typmod,
        }
    }
}

/// An index on `embedding_cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingIndex {
    /// Its name.
    pub name: String,
    /// `pg_index.indisvalid`: false after an interrupted concurrent build.
    pub valid: bool,
}

/// What an index covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexTarget {
    /// The column itself, a `vector(N)` of at most 2000 dimensions: `vector_cosine_ops`.
    Column,
    /// `column::vector(N)`, for an unconstrained `vector` column: `vector_cosine_ops`.
    VectorCast(u32),
    /// `column::halfvec(N)`, for more than 2000 dimensions: `halfvec_cosine_ops`.
    HalfvecCast(u32),
}

/// An index embsync wants on one embedding column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedIndex {
    /// Which column.
    pub slot: ModelSlot,
    /// `embsync_hnsw_<slot>_<dims>_<hash>`.
    pub name: Ident,
    /// What it covers.
    pub target: IndexTarget,
    /// The build parameters.
    pub options: VectorIndexes,
}

impl WantedIndex {
    /// `CREATE INDEX CONCURRENTLY IF NOT EXISTS ...`.
    pub fn create_sql(&self) -> String {
        sql::create_hnsw_index(&self.name, self.slot, self.target, self.options)
    }
}

/// One step of an [`IndexPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexAction {
    /// Build an index that is missing.
    Create(WantedIndex),
    /// Drop one of embsync's indexes.
    Drop {
        /// The index.
        name: Ident,
        /// Why.
        reason: DropReason,
    },
}

/// Why embsync drops one of its indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// An interrupted build left it INVALID; it is built again right after.
    Invalid,
    /// The config wants another index now (model, dimensions or parameters changed).
    Replaced,
}

impl IndexAction {
    /// The statement to run, outside a transaction.
    pub fn sql(&self) -> String {
        match self {
            IndexAction::Create(wanted) => wanted.create_sql(),
            IndexAction::Drop { name, .. } => sql::drop_index(name),
        }
    }

    /// The index the action is about.
    pub fn name(&self) -> &str {
        match self {
            IndexAction::Create(wanted) => wanted.name.as_str(),
            IndexAction::Drop { name, .. } => name.as_str(),
        }
    }
}

/// What to do, in order: drops of invalid indexes, builds, then drops of replaced indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexPlan {
    /// The statements to run, in order.
    pub actions: Vec<IndexAction>,
    /// Wanted indexes that exist and are valid.
    pub kept: Vec<String>,
    /// Why something wanted is not built (the whole step, or one column).
    pub skipped: Vec<String>,
}

/// The index embsync wants for one model, or why there is none.
///
/// # Errors
/// A message saying why the column gets no index (too many dimensions, a column of another
/// size than the model's).
pub fn wanted(slot: ModelSlot, model: &ModelSpec, typmod: Option<i32>, options: VectorIndexes) -> Result<WantedIndex, String> {
    let dims = model.dimensions();
    let column = format!("embedding_{}", slot.key());
    let target = match typmod {
        None => return Err(format!("{column}: the column is missing")),
        Some(_) if dims > MAX_HALFVEC_HNSW_DIMS => {
            return Err(format!(
                "{column}: {dims} dimensions is more than an HNSW index takes ({MAX_HALFVEC_HNSW_DIMS} as halfvec); index it yourself"
            ))
        }
        Some(_) if dims > MAX_VECTOR_HNSW_DIMS => IndexTarget::HalfvecCast(dims),
        Some(-1) => IndexTarget::VectorCast(dims),
        Some(t) if t == dims as i32 => IndexTarget::Column,
        Some(t) => return Err(format!("{column}: the column is vector({t}) but models.{} makes {dims} dimensions", slot.key())),
    };
    let definition = sql::create_hnsw_index(&Ident::parse("x").expect("a valid identifier"), slot, target, options);
    let digest = Sha256::digest(format!("{}\n{definition}", model.tag()).as_bytes());
    let name = format!("{INDEX_PREFIX}{}_{dims}_{}", slot.key(), &hex::encode(digest)[..8]);
    let name = Ident::parse(&name).expect("index names are ASCII letters, digits and _");
    Ok(WantedIndex { slot, name, target, options })
}

/// Decides what to build and drop so that `embedding_cache` has exactly the wanted indexes
/// among embsync's own; every other index is left alone.
pub fn plan(options: VectorIndexes, models: &Models, state: &IndexState) -> IndexPlan {
    let mut plan = IndexPlan::default();
    if !state.cache_is_ours {
        plan.skipped.push(
            "embedding_cache was not created by embsync (it has no 'embsync:' table comment), so embsync does not change its \
             indexes: create them yourself (see README, Indexing), or mark the table with \
             COMMENT ON TABLE embedding_cache IS 'embsync: managed' to let embsync manage them"
                .to_owned(),
        );
        return plan;
    }
    if state.build_in_progress {
        plan.skipped.push("an index build on embedding_cache is in progress; the next finished run checks again".to_owned());
        return plan;
    }
    let mut wanted_names = Vec::new();
    let mut replaced = Vec::new();
    for slot in ModelSlot::ALL {
        let want = match wanted(slot, models.get(slot), state.typmod(slot), options) {
            Ok(want) => want,
            Err(why) => {
                plan.skipped.push(why);
                continue;
            }
        };
        wanted_names.push(want.name.as_str().to_owned());
        match state.indexes.iter().find(|i| i.name == want.name.as_str()) {
            Some(existing) if existing.valid => plan.kept.push(existing.name.clone()),
            Some(_) => {
                plan.actions.push(IndexAction::Drop { name: want.name.clone(), reason: DropReason::Invalid });
                plan.actions.push(IndexAction::Create(want));
            }
            None => plan.actions.push(IndexAction::Create(want)),
        }
    }
    for existing in &state.indexes {
        if existing.name.starts_with(INDEX_PREFIX) && !wanted_names.contains(&existing.name) {
            // Only names this module makes carry the prefix, and those always parse.
            if let Ok(name) = Ident::parse(&existing.name) {
                replaced.push(IndexAction::Drop { name, reason: DropReason::Replaced });
            }
        }
    }
    plan.actions.extend(replaced);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use expect_test::{expect, Expect};

    fn models(large: &str, small: &str) -> Models {
        let json = format!(
            r#"{{"version":"1.0","models":{{"large":{large},"small":{small}}},"sources":[{{"name":"A","table":"t","column":"c"}}]}}"#
        );
        Config::parse(&json).unwrap().models
    }

    const OPTIONS: VectorIndexes = VectorIndexes { m: 16, ef_construction: 64 };

    fn ours(indexes: &[(&str, bool)]) -> IndexState {
        IndexState {
            cache_is_ours: true,
            build_in_progress: false,
            large_typmod: Some(3072),
            small_typmod: Some(1536),
            indexes: indexes.iter().map(|(name, valid)| ExistingIndex { name: (*name).to_owned(), valid: *valid }).collect(),
        }
    }

    fn check(models: &Models, state: &IndexState, expect: Expect) {
        let plan = plan(OPTIONS, models, state);
        let mut out: Vec<String> = plan.actions.iter().map(IndexAction::sql).collect();
        out.extend(plan.kept.iter().map(|k| format!("keep {k}")));
        out.extend(plan.skipped.iter().map(|s| format!("skip {s}")));
        expect.assert_eq(&out.join("\n"));
    }

    fn default_models() -> Models {
        models(r#""text-embedding-3-large""#, r#""text-embedding-3-small""#)
    }

    #[test]
    fn a_fresh_cache_gets_a_halfvec_index_for_3072_and_a_plain_one_for_1536() {
        check(
            &default_models(),
            &ours(&[("embedding_cache_pkey", true), ("embedding_cache_value_hash_key", true)]),
            expect![[r#"
                CREATE INDEX CONCURRENTLY IF NOT EXISTS "embsync_hnsw_large_3072_5a0e9db2" ON embedding_cache USING hnsw ((embedding_large::halfvec(3072)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64)
                CREATE INDEX CONCURRENTLY IF NOT EXISTS "embsync_hnsw_small_1536_9b518bcc" ON embedding_cache USING hnsw (embedding_small vector_cosine_ops) WITH (m = 16, ef_construction = 64)"#]],
        );
    }

    #[test]
    fn valid_indexes_are_kept_and_an_invalid_one_is_rebuilt() {
        check(
            &default_models(),
            &ours(&[("embsync_hnsw_large_3072_5a0e9db2", true), ("embsync_hnsw_small_1536_9b518bcc", false)]),
            expect![[r#"
                DROP INDEX CONCURRENTLY IF EXISTS "embsync_hnsw_small_1536_9b518bcc"
                CREATE INDEX CONCURRENTLY IF NOT EXISTS "embsync_hnsw_small_1536_9b518bcc" ON embedding_cache USING hnsw (embedding_small vector_cosine_ops) WITH (m = 16, ef_construction = 64)
                keep embsync_hnsw_large_3072_5a0e9db2"#]],
        );
    }

    #[test]
    fn a_dimensions_change_builds_the_new_index_then_drops_only_embsyncs_old_one() {
        let mut state = ours(&[
            ("embsync_hnsw_large_3072_5a0e9db2", true),
            ("embsync_hnsw_small_1536_9b518bcc", true),
            ("my_own_large_index", true),
            ("embedding_large_hnsw", false),
        ]);
        state.large_typmod = Some(1024);
        check(
            &models(r#"{"name":"text-embedding-3-large","dimensions":1024}"#, r#""text-embedding-3-small""#),
            &state,
            expect![[r#"
                CREATE INDEX CONCURRENTLY IF NOT EXISTS "embsync_hnsw_large_1024_3a13edb8" ON embedding_cache USING hnsw (embedding_large vector_cosine_ops) WITH (m = 16, ef_construction = 64)
                DROP INDEX CONCURRENTLY IF EXISTS "embsync_hnsw_large_3072_5a0e9db2"
                keep embsync_hnsw_small_1536_9b518bcc"#]],
        );
    }

    #[test]
    fn a_model_or_parameter_change_is_a_new_name() {
        let base = wanted(ModelSlot::Large, default_models().get(ModelSlot::Large), Some(3072), OPTIONS).unwrap();
        let other_model = models(r#"{"name":"my-model","dimensions":3072}"#, r#""text-embedding-3-small""#);
        let renamed = wanted(ModelSlot::Large, other_model.get(ModelSlot::Large), Some(3072), OPTIONS).unwrap();
        let m32 =
            wanted(ModelSlot::Large, default_models().get(ModelSlot::Large), Some(3072), VectorIndexes { m: 32, ef_construction: 64 })
                .unwrap();
        assert_ne!(base.name, renamed.name);
        assert_ne!(base.name, m32.name);
        assert!(base.name.as_str().len() <= crate::ident::MAX_IDENT_LEN);
    }

    #[test]
    fn unconstrained_and_oversized_columns() {
        let mut state = ours(&[]);
        state.small_typmod = Some(-1);
        check(
            &models(r#"{"name":"big-model","dimensions":4096}"#, r#""text-embedding-3-small""#),
            &state,
            expect![[r#"
                CREATE INDEX CONCURRENTLY IF NOT EXISTS "embsync_hnsw_small_1536_bc826631" ON embedding_cache USING hnsw ((embedding_small::vector(1536)) vector_cosine_ops) WITH (m = 16, ef_construction = 64)
                skip embedding_large: 4096 dimensions is more than an HNSW index takes (4000 as halfvec); index it yourself"#]],
        );
    }

    #[test]
    fn a_cache_embsync_did_not_create_or_a_build_in_progress_is_left_alone() {
        let mut foreign = ours(&[("embsync_hnsw_large_3072_00000000", true)]);
        foreign.cache_is_ours = false;
        check(
            &default_models(),
            &foreign,
            expect![[
                r#"skip embedding_cache was not created by embsync (it has no 'embsync:' table comment), so embsync does not change its indexes: create them yourself (see README, Indexing), or mark the table with COMMENT ON TABLE embedding_cache IS 'embsync: managed' to let embsync manage them"#
            ]],
        );
        let mut busy = ours(&[("embsync_hnsw_large_3072_5a0e9db2", false)]);
        busy.build_in_progress = true;
        check(
            &default_models(),
            &busy,
            expect!["skip an index build on embedding_cache is in progress; the next finished run checks again"],
        );
    }
}
