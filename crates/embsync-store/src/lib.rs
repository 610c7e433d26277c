//! embsync's store: the [`Store`] the sync driver runs on, over any [`tokio_postgres::Client`].
//!
//! The worker connects over the Workers socket API (or a Hyperdrive binding) and hands the
//! client to [`PgStore::new`]; the tests connect natively over TCP to a throwaway Postgres and run
//! the same code, so what the SQL means is tested against Postgres itself.

use bytes::BytesMut;
use embsync_core::config::{Config, Source};
use embsync_core::hash::ValueHash;
use embsync_core::index::{ExistingIndex, IndexState};
use embsync_core::prune::{self, LeftSource, PruneOutcome, PruneReport, PruneRequest};
use embsync_core::report::{iso8601, IndexReport, ModelUsage, RunReport, RunStatus, SourceReport, Trigger};
use embsync_core::sql::param::Param as SqlParam;
use embsync_core::sql::{self, ModelTags, PgType, SchemaState, Statement};
use embsync_core::status::{Coverage, CurrentRun, FinishedRun, OpenRunSource};
use embsync_core::sync::{
    DeleteGuard, EmbeddedValue, Lease, OrphansDeleted, PendingValue, Progress, RunId, RunState, SourceCounts, SourceState, StaleOutcome,
    Store, StoreError, ValueFailure,
};
use embsync_core::vector::Vector;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, Transaction};

/// embsync's tables in one Postgres database, over one connection.
pub struct PgStore {
    client: Client,
    schema: Option<SchemaState>,
    /// The configured model tags, bound as `$3` and `$4`.
    tags: ModelTags,
    /// pgvector's `vector[]` type, looked up once per connection (its OID depends on the
    /// database).
    vector_array: Option<Type>,
    /// Finished runs kept (`retention.runs`).
    retention_runs: i64,
    /// Whether embsync created `embedding_cache` (from `embedding_sync_schema`), so that it may
    /// analyze it too.
    cache_created: bool,
    /// Rows written to embsync's tables since this store last analyzed them.
    written: u64,
    /// The lease [`Store::acquire_lease`] took: the fencing token of every write.
    lease: Option<LeaseToken>,
}

/// After this many rows written, the store analyzes embsync's tables before it relies on their
/// plans (stale removal), instead of waiting for autovacuum; the run's snapshot is analyzed
/// when it holds this many rows.
pub const ANALYZE_AFTER_ROWS: u64 = 10_000;

/// A lock wait that ran out (`lock_timeout`, SQLSTATE 55P03).
fn lock_timed_out(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

/// A lease this store took: who, which generation, for how long. Every write checks that the
/// lease row still holds exactly this holder and generation, unexpired ([`sql::FENCE`]).
#[derive(Debug, Clone)]
struct LeaseToken {
    holder: String,
    generation: i64,
    ttl: Duration,
}

impl LeaseToken {
    /// The limits of each fenced transaction, in milliseconds as text (see [`sql::WRITE_LIMITS`]).
    ///
    /// - `statement_timeout`, a third of the lease: a statement still running when its
    ///   invocation was killed holds the lease row (locked by the fence) no longer than that, and
    ///   one that stalls is cut off long before the lease it renewed expires.
    /// - `idle_in_transaction_session_timeout`, the same: a client that stalls or dies inside a
    ///   transaction is disconnected by the server, so the lease row is free again before the
    ///   lease expires, and a killed invocation blocks the next one no longer than the lease.
    /// - `lock_timeout`, 5 s (at most half the statement timeout): in steady state embsync waits
    ///   for no lock (the lease serialises its writers); a wait means another pipeline holds rows of
    ///   `embedding_cache`, or a DDL statement (queued behind a long reader such as pg_dump)
    ///   holds a table: the statement fails and the next run retries, rather than queueing
    ///   behind it and making every later reader queue behind embsync.
    fn limits(&self) -> (String, String, String) {
        let statement = (self.ttl / 3).max(Duration::from_millis(1));
        let lock = (statement / 2).min(Duration::from_secs(5));
        let ms = |d: Duration| d.as_millis().to_string();
        (ms(statement), ms(lock), ms(statement))
    }
}

/// Begins a transaction with `lease`'s limits ([`LeaseToken::limits`]), `SET LOCAL`.
async fn limited<'a>(client: &'a mut Client, lease: &LeaseToken) -> Result<Transaction<'a>, StoreError> {
    let tx = client.transaction().await.map_err(|e| err("starting a transaction", e))?;
    let (statement, lock, idle) = lease.limits();
    tx.execute_typed(sql::WRITE_LIMITS, &typed(&[&statement, &lock, &idle])).await.map_err(|e| err("setting the timeouts", e))?;
    Ok(tx)
}

/// Begins a transaction that writes for the invocation holding `lease`: its limits, then the
/// fence. When the lease is not this invocation's any more (taken over, expired or released),
/// the transaction is rolled back and the error is [`StoreError::lease_lost`]: nothing is written.
async fn fenced<'a>(client: &'a mut Client, lease: Option<&LeaseToken>, what: &str) -> Result<Transaction<'a>, StoreError> {
    let Some(lease) = lease else {
        return Err(StoreError::lease_lost(format!("{what}: this invocation holds no sync lease; nothing was written")));
    };
    let tx = limited(client, lease).await?;
    let ttl = lease.ttl.as_secs_f64();
    let held = tx
        .execute_typed(sql::FENCE, &typed(&[&lease.holder.as_str(), &lease.generation, &ttl]))
        .await
        .map_err(|e| err("checking the sync lease", e))?;
    if held == 0 {
        tx.rollback().await.map_err(|e| err("rolling back", e))?;
        return Err(StoreError::lease_lost(format!(
            "{what}: the sync lease expired or was taken over by another invocation; nothing was written"
        )));
    }
    Ok(tx)
}

/// See [`PgStore::schema_version`]; also read inside the migration's transaction.
async fn read_schema_version(client: &impl tokio_postgres::GenericClient) -> Result<Option<(i32, bool)>, StoreError> {
    let exists: bool = client.query_typed_one(sql::HAS_SCHEMA_VERSION, &[]).await.map_err(|e| err("checking the schema", e))?.get(0);
    if !exists {
        return Ok(None);
    }
    let row = client.query_typed_opt(sql::SCHEMA_VERSION_ROW, &[]).await.map_err(|e| err("reading the schema version", e))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

fn err(what: &str, e: tokio_postgres::Error) -> StoreError {
    StoreError::new(pg_message(what, e))
}

/// `what` and the error with its chain (`{:#}`-style: tokio-postgres puts the server's message
/// in the source).
pub fn pg_message(what: &str, e: tokio_postgres::Error) -> String {
    let mut msg = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

impl PgStore {
    /// The store over `client`, for the models `config` names.
    pub fn new(client: Client, config: &Config) -> PgStore {
        let tags = ModelTags::of(&config.models);
        let retention_runs = i64::try_from(config.retention_runs).unwrap_or(i64::MAX);
        PgStore { client, schema: None, tags, vector_array: None, retention_runs, cache_created: false, written: 0, lease: None }
    }

    /// The connection, given back (e.g. to close it).
    pub fn into_client(self) -> Client {
        self.client
    }

    /// pgvector's `vector[]`, whose OID the binary array format names (looked up once).
    async fn vector_array_type(&mut self) -> Result<Type, StoreError> {
        if let Some(t) = &self.vector_array {
            return Ok(t.clone());
        }
        let row = self.client.query_typed_one(sql::VECTOR_TYPES, &[]).await.map_err(|e| err("looking up pgvector's vector type", e))?;
        let schema: String = row.get(2);
        let vector = Type::new("vector".into(), row.get(0), Kind::Simple, schema.clone());
        let array = Type::new("_vector".into(), row.get(1), Kind::Array(vector), schema);
        self.vector_array = Some(array.clone());
        Ok(array)
    }

    /// The recorded schema version and whether embsync created `embedding_cache`; `None` before
    /// the version was recorded (or on an empty database).
    async fn schema_version(&mut self) -> Result<Option<(i32, bool)>, StoreError> {
        read_schema_version(&self.client).await
    }

    /// Brings the schema to [`sql::SCHEMA_VERSION`] in one transaction whose every lock wait is
    /// bounded by [`sql::MIGRATION_LOCK_TIMEOUT_SECS`].
    ///
    /// # Errors
    /// When a lock is not granted in time, an error that names what holds it up (nothing is
    /// left waiting: the transaction is rolled back).
    async fn migrate(&mut self, config: &Config) -> Result<(), StoreError> {
        let timed_out = |what: &str| {
            StoreError::new(format!(
                "could not get a lock on {what} within {} s; something holds it (a pg_dump?): retry later (the next invocation tries again)",
                sql::MIGRATION_LOCK_TIMEOUT_SECS
            ))
        };
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.batch_execute(&sql::migration_lock_timeout()).await.map_err(|e| err("setting lock_timeout", e))?;
        tx.execute_typed(sql::LOCK_SCHEMA, &[]).await.map_err(|e| {
            if lock_timed_out(&e) {
                timed_out("embsync's schema lock (another invocation is migrating)")
            } else {
                err("locking the schema", e)
            }
        })?;
        // Another invocation may have migrated while this one waited for the lock.
        let current = read_schema_version(&tx).await?.is_some_and(|(version, _)| version >= sql::SCHEMA_VERSION);
        if current {
            return tx.commit().await.map_err(|e| err("committing the schema", e));
        }
        let existed: bool = tx.query_typed_one(sql::CACHE_EXISTS, &[]).await.map_err(|e| err("checking the schema", e))?.get(0);
        if existed {
            let shape = tx.query_typed_one(sql::CACHE_SHAPE, &[]).await.map_err(|e| err("reading embedding_cache", e))?;
            sql::check_cache_shape(shape.get(0), shape.get(1)).map_err(StoreError::new)?;
        }
        for step in sql::migration(&config.models, existed) {
            tx.batch_execute(&step.sql).await.map_err(|e| {
                if lock_timed_out(&e) {
                    timed_out(step.locks)
                } else {
                    err(&format!("migrating {}", step.locks), e)
                }
            })?;
        }
        tx.commit().await.map_err(|e| err("committing the schema", e))
    }

    /// Refreshes the planner's statistics (one of the `ANALYZE_*` statements) without waiting
    /// for a lock. A failure is only a missed refresh: autovacuum analyzes the tables later.
    async fn analyze(&mut self, statement: &str) {
        let Ok(tx) = self.client.transaction().await else { return };
        if tx.batch_execute(sql::ANALYZE_LOCK_TIMEOUT).await.is_err() || tx.batch_execute(statement).await.is_err() {
            let _ = tx.rollback().await;
            return;
        }
        let _ = tx.commit().await;
    }

    async fn schema_state(&mut self) -> Result<SchemaState, StoreError> {
        if let Some(s) = self.schema {
            return Ok(s);
        }
        let row = self.client.query_typed_one(sql::SCHEMA_STATE, &[]).await.map_err(|e| err("checking the schema", e))?;
        let state = SchemaState {
            cache: row.get(0),
            links: row.get::<_, Option<bool>>(1).unwrap_or(false),
            owned_by_row: row.get::<_, Option<bool>>(2).unwrap_or(false),
        };
        self.schema = Some(state);
        Ok(state)
    }
}

/// A vector bound as pgvector's binary format.
#[derive(Debug)]
struct PgVector<'a>(&'a Vector);

impl ToSql for PgVector<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_pgvector_binary());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }

    to_sql_checked!();
}

/// A value bound as a parameter, with the Postgres type it is declared as.
///
/// Every statement goes out unnamed with its parameter types declared (tokio-postgres's
/// `query_typed`/`execute_typed`: Parse, Bind, Describe, Execute and Sync in one message, one
/// round trip). A named prepared statement (what `query(&str)` does: `s0`, `s1`, ... prepared in
/// one round trip and executed in the next) would tie two messages to one server connection,
/// which a transaction-mode pooler (Hyperdrive, PgBouncer) does not promise outside a
/// transaction; the unnamed statement lives and dies within one Sync, so it works through any
/// pooler, and it saves a round trip per statement everywhere.
trait Param: ToSql + Sync {
    /// The declared type: the one Postgres would infer, which the Rust type must match anyway.
    fn pg_type(&self) -> Type;
    /// Itself as a bindable value.
    fn as_sql(&self) -> &(dyn ToSql + Sync);
}

macro_rules! param {
    ($($rust:ty => $pg:expr),* $(,)?) => {$(
        impl Param for $rust {
            fn pg_type(&self) -> Type {
                $pg
            }
            fn as_sql(&self) -> &(dyn ToSql + Sync) {
                self
            }
        }
    )*};
}

param! {
    String => Type::TEXT,
    &str => Type::TEXT,
    i64 => Type::INT8,
    bool => Type::BOOL,
    f64 => Type::FLOAT8,
    Vec<String> => Type::TEXT_ARRAY,
    Vec<&str> => Type::TEXT_ARRAY,
    Vec<i32> => Type::INT4_ARRAY,
}

/// A core [`SqlParam`] bound with tokio-postgres.
#[derive(Debug)]
struct Bind<'a>(&'a SqlParam<'a>);

impl ToSql for Bind<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            SqlParam::Text(v) => v.as_ref().to_sql(ty, out),
            SqlParam::Int8(v) => v.to_sql(ty, out),
            SqlParam::Bool(v) => v.to_sql(ty, out),
            SqlParam::Float8(v) => v.to_sql(ty, out),
            SqlParam::TextArray(v) => v.to_sql(ty, out),
            SqlParam::Int4Array(v) => v.to_sql(ty, out),
            SqlParam::VectorArray(v) => v.iter().map(|v| v.map(PgVector)).collect::<Vec<_>>().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // The type is the one the parameter declares (`bound`).
        true
    }

    to_sql_checked!();
}

/// A typed statement's text and its parameters bound with their declared types; `vector_array`
/// is pgvector's `vector[]` ([`PgStore::vector_array_type`]), needed only by statements that bind
/// vectors.
struct Bound<'a> {
    text: std::borrow::Cow<'static, str>,
    params: Vec<SqlParam<'a>>,
    vector_array: Option<Type>,
}

impl<'a> Bound<'a> {
    fn new(statement: &'a impl Statement) -> Bound<'a> {
        Bound { text: statement.text(), params: statement.params(), vector_array: None }
    }

    fn with_vectors(statement: &'a impl Statement, vector_array: Type) -> Bound<'a> {
        Bound { vector_array: Some(vector_array), ..Bound::new(statement) }
    }

    fn binds(&self) -> (Vec<Bind<'_>>, Vec<Type>) {
        let types = self
            .params
            .iter()
            .map(|p| match p.pg_type() {
                PgType::Text => Type::TEXT,
                PgType::Int8 => Type::INT8,
                PgType::Bool => Type::BOOL,
                PgType::Float8 => Type::FLOAT8,
                PgType::TextArray => Type::TEXT_ARRAY,
                PgType::Int4Array => Type::INT4_ARRAY,
                PgType::VectorArray => self.vector_array.clone().expect("a statement that binds vectors is bound with_vectors"),
            })
            .collect();
        (self.params.iter().map(Bind).collect(), types)
    }
}

/// Runs a typed statement: rows.
async fn query<'a>(client: &impl tokio_postgres::GenericClient, b: &Bound<'a>) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let (binds, types) = b.binds();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = binds.iter().zip(types).map(|(b, t)| (b as &(dyn ToSql + Sync), t)).collect();
    client.query_typed(&b.text, &params).await
}

/// Runs a typed statement: one row.
async fn query_one<'a>(client: &impl tokio_postgres::GenericClient, b: &Bound<'a>) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    let (binds, types) = b.binds();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = binds.iter().zip(types).map(|(b, t)| (b as &(dyn ToSql + Sync), t)).collect();
    client.query_typed_one(&b.text, &params).await
}

/// Runs a typed statement: rows affected.
async fn execute<'a>(client: &impl tokio_postgres::GenericClient, b: &Bound<'a>) -> Result<u64, tokio_postgres::Error> {
    let (binds, types) = b.binds();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = binds.iter().zip(types).map(|(b, t)| (b as &(dyn ToSql + Sync), t)).collect();
    client.execute_typed(&b.text, &params).await
}

/// The parameters of a statement with their declared types.
fn typed<'a>(params: &[&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.as_sql(), p.pg_type())).collect()
}

fn keys(source: &Source) -> (String, String) {
    (source.table_key(), source.column_key().to_owned())
}

/// A row of [`sql::RUN_SOURCES`].
fn source_state(r: &tokio_postgres::Row) -> SourceState {
    let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
    SourceState {
        report: SourceReport {
            table: r.get(0),
            column: r.get(1),
            name: r.get(2),
            total: n(6),
            new: n(7),
            unchanged: n(8),
            reused: n(9),
            embedded: n(10),
            stale: n(11),
            deleted: n(12),
            errors: n(13),
            deferred: n(14),
            batches: n(15),
            duration_ms: 0,
            error: None,
            warning: None,
        },
        planned: r.get(3),
        done: r.get(4),
        planned_batches: n(5),
        usage: (ModelUsage { prompt_tokens: n(16), requests: n(17) }, ModelUsage { prompt_tokens: n(18), requests: n(19) }),
    }
}

/// `embedding_sync_runs.trigger`.
fn trigger_of(text: &str) -> Trigger {
    if text == "http" {
        Trigger::Http
    } else {
        Trigger::Cron
    }
}

/// `embedding_sync_runs.status`, which only embsync writes.
fn run_status(text: &str) -> Result<RunStatus, StoreError> {
    RunStatus::parse(text).ok_or_else(|| StoreError::new(format!("embedding_sync_runs has a status this version does not know: {text:?}")))
}

impl Store for PgStore {
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError> {
        // Steady state: catalog reads and one read of embsync's own version row; no DDL, so no
        // lock that waits for a pg_dump or makes readers of the user's tables queue.
        let mut version = self.schema_version().await?;
        if version.is_none_or(|(v, _)| v < sql::SCHEMA_VERSION) {
            self.migrate(config).await?;
            version = self.schema_version().await?;
        }
        let (version, cache_created) = version.unwrap_or((0, false));
        if version > sql::SCHEMA_VERSION {
            return Err(StoreError::new(format!(
                "the database's embsync schema is version {version}, newer than this embsync knows ({}): deploy the embsync that migrated it",
                sql::SCHEMA_VERSION
            )));
        }
        self.cache_created = cache_created;
        let dims = self.client.query_typed_one(sql::COLUMN_DIMS, &[]).await.map_err(|e| err("reading the embedding columns", e))?;
        sql::check_column_dims(&config.models, dims.get(0), dims.get(1)).map_err(StoreError::new)?;
        self.schema = Some(SchemaState { cache: true, links: true, owned_by_row: true });
        Ok(())
    }

    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError> {
        let state = self.schema_state().await?;
        let plan = sql::Plan { source, state, tags: &self.tags };
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.batch_execute(sql::PLAN_WORK_MEM).await.map_err(|e| err("setting work_mem", e))?;
        let row = query_one(&tx, &Bound::new(&plan)).await.map_err(|e| err("counting", e))?;
        tx.commit().await.map_err(|e| err("committing the count", e))?;
        let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        Ok(SourceCounts { total: n(0), new: n(1), reusable: n(2), embed_tokens: n(3), stale: n(4), deferred: n(5) })
    }

    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError> {
        let link = sql::LinkReusable { source, tags: &self.tags };
        let tx = fenced(&mut self.client, self.lease.as_ref(), "linking reusable values").await?;
        let row = query_one(&tx, &Bound::new(&link)).await.map_err(|e| err("linking", e))?;
        tx.commit().await.map_err(|e| err("committing the links", e))?;
        let linked = row.get::<_, i64>(0).max(0) as u64;
        self.written += linked;
        Ok(linked)
    }

    async fn pending(
        &mut self,
        source: &Source,
        run: &RunId,
        after: Option<&ValueHash>,
        limit: usize,
    ) -> Result<Vec<PendingValue>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let tags = &self.tags;
        let snapshot: bool = query_one(&self.client, &Bound::new(&sql::HasSnapshot { run, source }))
            .await
            .map_err(|e| err("looking for the snapshot", e))?
            .get(0);
        let rows = if snapshot {
            query(&self.client, &Bound::new(&sql::PendingSnapshotPage { source, tags, run, after, limit })).await
        } else {
            query(&self.client, &Bound::new(&sql::PendingPage { source, tags, after, limit })).await
        }
        .map_err(|e| err("listing", e))?;
        rows.into_iter()
            .map(|row| {
                let h: String = row.get(0);
                Ok(PendingValue {
                    hash: ValueHash::from_hex(&h).ok_or_else(|| StoreError::new(format!("bad hash {h:?} from the database")))?,
                    value: row.get(1),
                    occurrences: row.get::<_, i64>(2).clamp(0, i64::from(i32::MAX)) as i32,
                    has_large: row.get(3),
                    has_small: row.get(4),
                })
            })
            .collect()
    }

    async fn store(&mut self, source: &Source, batch: &[EmbeddedValue], progress: &Progress<'_>) -> Result<(), StoreError> {
        let vector_array = self.vector_array_type().await?;
        let upsert = sql::UpsertBatch { source, tags: &self.tags, batch };
        let hashes = batch.iter().map(|v| v.hash.as_str()).collect();
        let link = sql::SourceHashes { statement: sql::LINK_VALUES, source, hashes };
        let done = batch.iter().filter(|v| v.complete).map(|v| v.hash.as_str()).collect();
        let clear = sql::SourceHashes { statement: sql::CLEAR_ERRORS, source, hashes: done };
        let tx = fenced(&mut self.client, self.lease.as_ref(), "writing a batch").await?;
        execute(&tx, &Bound::with_vectors(&upsert, vector_array)).await.map_err(|e| err("writing embeddings", e))?;
        execute(&tx, &Bound::new(&link)).await.map_err(|e| err("linking values", e))?;
        execute(&tx, &Bound::new(&clear)).await.map_err(|e| err("clearing errors", e))?;
        execute(&tx, &Bound::new(&sql::AddProgress { source, progress })).await.map_err(|e| err("counting the batch", e))?;
        tx.commit().await.map_err(|e| err("committing a batch", e))?;
        self.written += batch.len() as u64;
        Ok(())
    }

    async fn remove_stale(
        &mut self,
        source: &Source,
        run: &RunId,
        known_clean: bool,
        guard: Option<DeleteGuard>,
    ) -> Result<StaleOutcome, StoreError> {
        if self.written >= ANALYZE_AFTER_ROWS {
            self.analyze(sql::ANALYZE_OWN).await;
            if self.cache_created {
                self.analyze(sql::ANALYZE_CACHE).await;
            }
            self.written = 0;
        }
        let tx = fenced(&mut self.client, self.lease.as_ref(), "removing stale values").await?;
        let clean = known_clean
            && !query_one(&tx, &Bound::new(&sql::HasErrors { source })).await.map_err(|e| err("looking for errors", e))?.get::<_, bool>(0);
        let mut outcome = StaleOutcome::default();
        if !clean {
            // The guard's counts and the removal are one statement: one snapshot of the source.
            let row =
                query_one(&tx, &Bound::new(&sql::RemoveStale { source, guard })).await.map_err(|e| err("removing stale values", e))?;
            let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
            let (total, had, stale, held) = (n(0), n(1), n(2), row.get::<_, bool>(3));
            if held {
                outcome.held_back = Some(
                    guard
                        .and_then(|g| g.check(total, had, stale))
                        .unwrap_or_else(|| format!("{stale} of its {had} embedded values look stale; nothing was deleted")),
                );
            } else {
                outcome.unlinked = n(4);
            }
        }
        let done = sql::SourceCount { statement: sql::SOURCE_DONE, run, source, count: outcome.unlinked };
        execute(&tx, &Bound::new(&done)).await.map_err(|e| err("marking the source done", e))?;
        execute(&tx, &Bound::new(&sql::DropSnapshot { run, source })).await.map_err(|e| err("dropping the snapshot", e))?;
        tx.commit().await.map_err(|e| err("committing stale removal", e))?;
        Ok(outcome)
    }

    async fn delete_orphans(&mut self, run: &RunId, sources: &[&Source]) -> Result<Vec<OrphansDeleted>, StoreError> {
        let tx = fenced(&mut self.client, self.lease.as_ref(), "deleting orphaned cache rows").await?;
        // Most runs have no candidate: then no source is scanned and nothing is deleted.
        let waiting: bool = tx.query_typed_one(sql::ORPHANS_WAITING, &[]).await.map_err(|e| err("looking for orphans", e))?.get(0);
        if !waiting {
            tx.commit().await.map_err(|e| err("committing", e))?;
            return Ok(Vec::new());
        }
        let rows =
            query(&tx, &Bound::new(&sql::DeleteOrphans { run, sources })).await.map_err(|e| err("deleting orphaned cache rows", e))?;
        tx.commit().await.map_err(|e| err("committing the orphans' deletion", e))?;
        Ok(rows.iter().map(|r| OrphansDeleted { table: r.get(0), column: r.get(1), rows: r.get::<_, i64>(2).max(0) as u64 }).collect())
    }

    async fn record_refused(&mut self, run: &RunId, reasons: &[String]) -> Result<(), StoreError> {
        let reasons = reasons.to_vec();
        let tx = fenced(&mut self.client, self.lease.as_ref(), "recording a refused model").await?;
        tx.execute_typed(sql::RECORD_REFUSED, &typed(&[&run.0, &reasons])).await.map_err(|e| err("recording a refused model", e))?;
        tx.commit().await.map_err(|e| err("committing the refusal", e))
    }

    async fn record_errors(&mut self, source: &Source, failures: &[ValueFailure], run: &RunId) -> Result<(), StoreError> {
        let count = sql::SourceCount { statement: sql::ADD_ERRORS, run, source, count: failures.len() as u64 };
        let tx = fenced(&mut self.client, self.lease.as_ref(), "recording errors").await?;
        execute(&tx, &Bound::new(&sql::RecordErrors { source, failures })).await.map_err(|e| err("recording errors", e))?;
        execute(&tx, &Bound::new(&count)).await.map_err(|e| err("counting errors", e))?;
        tx.commit().await.map_err(|e| err("committing errors", e))
    }

    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.lease = None;
        let secs = ttl.as_secs_f64();
        let token = LeaseToken { holder: holder.to_owned(), generation: 0, ttl };
        let tx = limited(&mut self.client, &token).await?;
        // A fenced transaction of the holder in flight locks the row: waiting past the lock
        // timeout means the lease is in use.
        match tx.query_typed_opt(sql::ACQUIRE_LEASE, &typed(&[&holder, &secs])).await {
            Ok(Some(row)) => {
                tx.commit().await.map_err(|e| err("committing the sync lease", e))?;
                self.lease = Some(LeaseToken { generation: row.get(0), ..token });
                return Ok(Lease::Acquired);
            }
            Ok(None) => tx.commit().await.map_err(|e| err("committing the sync lease", e))?,
            Err(e) if lock_timed_out(&e) => tx.rollback().await.map_err(|e| err("rolling back", e))?,
            Err(e) => return Err(err("taking the sync lease", e)),
        }
        let row = self.client.query_typed_opt(sql::LEASE_HOLDER, &[]).await.map_err(|e| err("reading the sync lease", e))?;
        Ok(match row {
            Some(row) => Lease::Held { holder: row.get(0), expires_in_secs: row.get::<_, f64>(1).max(0.0) },
            None => Lease::Held { holder: "unknown".into(), expires_in_secs: 0.0 },
        })
    }

    async fn release_lease(&mut self) -> Result<(), StoreError> {
        let Some(lease) = self.lease.take() else { return Ok(()) };
        let tx = limited(&mut self.client, &lease).await?;
        tx.execute_typed(sql::RELEASE_LEASE, &typed(&[&lease.holder.as_str(), &lease.generation]))
            .await
            .map_err(|e| err("releasing the sync lease", e))?;
        tx.commit().await.map_err(|e| err("committing the release", e))
    }

    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError> {
        let models = format!("{}\n{}", self.tags.large, self.tags.small);
        let tx = fenced(&mut self.client, self.lease.as_ref(), "opening the run").await?;
        let mut resumed = tx.query_typed_opt(sql::RESUME_RUN, &[]).await.map_err(|e| err("resuming the run", e))?;
        if let Some(row) = &resumed {
            let id: String = row.get(0);
            let rows = tx.query_typed(sql::RUN_SOURCES, &typed(&[&id])).await.map_err(|e| err("reading the run", e))?;
            let same = rows.len() == sources.len()
                && rows.iter().zip(sources).all(|(r, s)| r.get::<_, String>(0) == s.table_key() && r.get::<_, String>(1) == s.column_key())
                && row.get::<_, String>(4) == models;
            if !same {
                // The config changed mid-run (its sources or a model): that run ends here and a
                // new one starts, planned under the new config.
                tx.execute_typed(sql::ABANDON_RUN, &typed(&[&id])).await.map_err(|e| err("abandoning the run", e))?;
                resumed = None;
            }
        }
        let row = match resumed {
            Some(row) => row,
            None => {
                let trigger_text = match trigger {
                    Trigger::Cron => "cron",
                    Trigger::Http => "http",
                };
                let row = tx
                    .query_typed_one(sql::START_RUN, &typed(&[&new_id.0, &trigger_text, &models]))
                    .await
                    .map_err(|e| err("starting a run", e))?;
                let tables: Vec<String> = sources.iter().map(|s| s.table_key()).collect();
                let columns: Vec<&str> = sources.iter().map(|s| s.column_key()).collect();
                let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                tx.execute_typed(sql::START_RUN_SOURCES, &typed(&[&new_id.0, &tables, &columns, &names]))
                    .await
                    .map_err(|e| err("starting a run", e))?;
                row
            }
        };
        let id: String = row.get(0);
        let trigger = trigger_of(&row.get::<_, String>(1));
        let rows = tx.query_typed(sql::RUN_SOURCES, &typed(&[&id])).await.map_err(|e| err("reading the run", e))?;
        tx.commit().await.map_err(|e| err("committing the run", e))?;
        let states = rows.iter().map(source_state).collect();
        Ok(RunState {
            id: RunId(id),
            trigger,
            started_at_ms: row.get(2),
            invocations: row.get::<_, i32>(3).max(0) as u64,
            sources: states,
            refused: row.get(5),
        })
    }

    async fn save_plan(&mut self, run: &RunId, source: &Source, plan: &SourceReport, snapshot: bool) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.lease.as_ref(), "saving the plan").await?;
        execute(&tx, &Bound::new(&sql::SavePlan { run, source, plan })).await.map_err(|e| err("saving the plan", e))?;
        let mut snapshotted = 0;
        if snapshot {
            snapshotted = execute(&tx, &Bound::new(&sql::SnapshotPending { source, tags: &self.tags, run }))
                .await
                .map_err(|e| err("snapshotting pending values", e))?;
        }
        tx.commit().await.map_err(|e| err("committing the plan", e))?;
        if snapshotted >= ANALYZE_AFTER_ROWS {
            // The pages read from the snapshot are planned on its statistics.
            self.analyze(sql::ANALYZE_PENDING).await;
        }
        Ok(())
    }

    async fn index_state(&mut self) -> Result<IndexState, StoreError> {
        let row = self.client.query_typed_one(sql::INDEX_STATE, &[]).await.map_err(|e| err("reading the indexes", e))?;
        let names: Vec<String> = row.get(4);
        let valid: Vec<bool> = row.get(5);
        Ok(IndexState {
            cache_is_ours: row.get(0),
            build_in_progress: row.get(1),
            large_typmod: row.get(2),
            small_typmod: row.get(3),
            indexes: names.into_iter().zip(valid).map(|(name, valid)| ExistingIndex { name, valid }).collect(),
        })
    }

    async fn index_ddl(&mut self, statement: &str) -> Result<(), StoreError> {
        // CONCURRENTLY cannot run in a transaction, so the fence is checked (and the lease
        // renewed) in one just before. It gets no timeouts: only a session-level SET could give
        // it any, which a transaction-pooling proxy would leak to other clients. It takes SHARE
        // UPDATE EXCLUSIVE, which blocks no reads or writes, and runs only on a table embsync
        // created; the next invocation sees a build still running and leaves it alone.
        fenced(&mut self.client, self.lease.as_ref(), "building an index").await?.commit().await.map_err(|e| err("committing", e))?;
        // The simple query protocol runs it on its own, outside a transaction, as CONCURRENTLY needs.
        self.client.batch_execute(statement).await.map_err(|e| err("running the index statement", e))
    }

    async fn record_indexes(&mut self, run: &RunId, indexes: &IndexReport) -> Result<(), StoreError> {
        let json = serde_json::to_string(indexes).unwrap_or_else(|_| "null".into());
        let tx = fenced(&mut self.client, self.lease.as_ref(), "recording the index step").await?;
        tx.execute_typed(sql::RECORD_INDEXES, &typed(&[&run.0, &json])).await.map_err(|e| err("recording the index step", e))?;
        tx.commit().await.map_err(|e| err("committing the index step", e))
    }

    async fn finish_run(&mut self, run: &RunId, report: &RunReport) -> Result<(), StoreError> {
        let json = serde_json::to_string(report).unwrap_or_else(|_| "null".into());
        let tx = fenced(&mut self.client, self.lease.as_ref(), "finishing the run").await?;
        tx.execute_typed(sql::FINISH_RUN, &typed(&[&run.0, &json, &report.status.as_str()]))
            .await
            .map_err(|e| err("finishing the run", e))?;
        tx.execute_typed(sql::DROP_OLD_SNAPSHOTS, &[]).await.map_err(|e| err("dropping old snapshots", e))?;
        tx.execute_typed(sql::DELETE_OLD_RUNS, &typed(&[&self.retention_runs]))
            .await
            .map_err(|e| err("deleting runs beyond the retention", e))?;
        tx.commit().await.map_err(|e| err("committing the finished run", e))
    }
}

impl PgStore {
    /// Coverage of one source (read-only).
    pub async fn coverage(&mut self, source: &Source) -> Coverage {
        let mut out = Coverage {
            name: source.name.clone(),
            table: source.table_key(),
            column: source.column_key().to_owned(),
            distinct_values: 0,
            embedded_large: 0,
            embedded_small: 0,
            pending: 0,
            errors: 0,
            error: None,
        };
        let (t, c) = keys(source);
        match self.client.query_typed_one(&sql::coverage(source), &typed(&[&t, &c])).await {
            Ok(row) => {
                let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
                (out.distinct_values, out.embedded_large, out.embedded_small, out.errors) = (n(0), n(1), n(2), n(3));
            }
            Err(e) => out.error = Some(pg_message("reading coverage", e)),
        }
        match self.counts(source).await {
            Ok(counts) => out.pending = counts.new,
            Err(e) => out.error = out.error.or(Some(e.to_string())),
        }
        out
    }

    /// The last `n` finished runs, newest first, with their stored reports.
    ///
    /// # Errors
    /// [`StoreError`] when the runs table cannot be read.
    pub async fn last_runs(&mut self, n: i64) -> Result<Vec<FinishedRun>, StoreError> {
        let rows = self.client.query_typed(sql::LAST_RUNS, &typed(&[&n])).await.map_err(|e| err("reading the runs", e))?;
        rows.iter()
            .map(|r| {
                Ok(FinishedRun {
                    run_id: r.get(0),
                    status: run_status(r.get(1))?,
                    report: serde_json::from_str(r.get::<_, &str>(2)).unwrap_or(serde_json::Value::Null),
                    finished_at: iso8601(r.get(3)),
                })
            })
            .collect()
    }

    /// The unfinished run with its per-source counters so far, if there is one.
    ///
    /// # Errors
    /// [`StoreError`] when the runs tables cannot be read.
    pub async fn current_run(&mut self) -> Result<Option<CurrentRun>, StoreError> {
        let Some(r) = self.client.query_typed_opt(sql::CURRENT_RUN, &[]).await.map_err(|e| err("reading the current run", e))? else {
            return Ok(None);
        };
        let run_id: String = r.get(0);
        let sources = self.client.query_typed(sql::RUN_SOURCES, &typed(&[&run_id])).await.map_err(|e| err("reading the current run", e))?;
        let lease = self.client.query_typed_opt(sql::LEASE_HOLDER, &[]).await.map_err(|e| err("reading the sync lease", e))?;
        let lease_held = lease.is_some_and(|l| l.get::<_, f64>(1) > 0.0);
        Ok(Some(CurrentRun {
            status: CurrentRun::status_now(run_status(r.get(1))?, lease_held),
            trigger: trigger_of(r.get(2)),
            invocations: r.get::<_, i32>(3).max(0) as u64,
            started_at: iso8601(r.get(4)),
            sources: sources
                .iter()
                .map(|row| {
                    let state = source_state(row);
                    OpenRunSource { report: state.report, planned: state.planned, done: state.done }
                })
                .collect(),
            run_id,
        }))
    }

    /// Whether embsync's tables exist (so `/status` can say "never run" instead of failing).
    ///
    /// # Errors
    /// [`StoreError`] when the catalog cannot be read.
    pub async fn has_run_tables(&mut self) -> Result<bool, StoreError> {
        Ok(self.schema_state().await?.links)
    }

    /// The sources recorded in embsync's tables that no enabled source of `config` has, with
    /// what they still hold (read-only; none before the first run).
    ///
    /// # Errors
    /// [`StoreError`] when the tables cannot be read.
    pub async fn left_sources(&mut self, config: &Config) -> Result<Vec<LeftSource>, StoreError> {
        let state = self.schema_state().await?;
        if !state.links {
            return Ok(Vec::new());
        }
        read_left_sources(&self.client, config, state).await
    }

    /// Prunes the sources that left the config that `request` names: deletes the cache rows
    /// embsync wrote that only they link, gives rows that other sources still link another
    /// source, removes their links and their errors, in one transaction that holds the sync
    /// lease (taken for `holder` for `ttl`, renewed in the transaction, released at the end),
    /// so it never runs alongside a sync. The counts it is confirmed against are read in that
    /// transaction. A dry run only counts, without the lease.
    ///
    /// # Errors
    /// [`StoreError`] when the database fails (nothing is deleted then) or the lease was lost.
    pub async fn prune(
        &mut self,
        config: &Config,
        request: &PruneRequest,
        holder: &str,
        ttl: Duration,
    ) -> Result<PruneOutcome, StoreError> {
        let state = self.schema_state().await?;
        if state.links && !state.owned_by_row {
            return Err(StoreError::new(
                "embsync's tables are from an earlier version: run a sync first (POST /sync or the cron trigger), which migrates them, then prune",
            ));
        }
        if !state.links {
            // Never synced: nothing is recorded.
            return Ok(match request.targets(config, &[]) {
                Ok(_) => PruneOutcome::Done(PruneReport::planned(request.dry_run, Vec::new(), 0)),
                Err(refusal) => PruneOutcome::Refused(refusal),
            });
        }
        if !request.dry_run {
            match self.acquire_lease(holder, ttl).await? {
                Lease::Acquired => {}
                Lease::Held { holder, expires_in_secs } => return Ok(PruneOutcome::Busy { holder, expires_in_secs }),
            }
        }
        let lease = if request.dry_run { None } else { self.lease.clone() };
        let result = prune_leased(&mut self.client, config, request, lease.as_ref()).await;
        if !request.dry_run {
            // A failed release leaves the lease to expire by itself.
            let _ = self.release_lease().await;
        }
        result
    }
}

async fn read_left_sources(
    client: &impl tokio_postgres::GenericClient,
    config: &Config,
    state: SchemaState,
) -> Result<Vec<LeftSource>, StoreError> {
    let (tables, columns) = prune::enabled_keys(config);
    let rows = client
        .query_typed(&sql::left_sources(state), &typed(&[&tables, &columns]))
        .await
        .map_err(|e| err("reading the sources that left the config", e))?;
    let n = |r: &tokio_postgres::Row, i: usize| r.get::<_, i64>(i).max(0) as u64;
    let mut left: Vec<LeftSource> = rows.iter().map(|r| LeftSource::new(config, r.get(0), r.get(1), n(r, 2), n(r, 3), n(r, 4))).collect();
    // A rename: the same table, spelled another way, with the same column, is enabled.
    let named: Vec<(usize, String)> = left.iter().enumerate().filter_map(|(i, l)| l.quoted_table().map(|q| (i, q))).collect();
    let enabled: Vec<_> = config.enabled_sources().collect();
    if named.is_empty() || enabled.is_empty() {
        return Ok(left);
    }
    let quoted: Vec<String> = named.iter().map(|(_, q)| q.clone()).collect();
    let enabled_quoted: Vec<String> = enabled.iter().map(|s| s.table.quoted()).collect();
    let same = client.query_typed(sql::SAME_TABLES, &typed(&[&quoted, &enabled_quoted])).await.map_err(|e| err("comparing tables", e))?;
    for row in same {
        let (i, j): (i64, Option<i64>) = (row.get(0), row.get(1));
        let Some(&(at, _)) = named.get((i - 1) as usize) else { continue };
        let source = j.and_then(|j| enabled.get((j - 1) as usize)).filter(|s| s.column_key() == left[at].column);
        left[at].same_as = source.map(|s| s.name.clone());
    }
    Ok(left)
}

/// The transaction of [`PgStore::prune`]: fenced by `lease` (a dry run has none and writes
/// nothing).
async fn prune_leased(
    client: &mut Client,
    config: &Config,
    request: &PruneRequest,
    lease: Option<&LeaseToken>,
) -> Result<PruneOutcome, StoreError> {
    let tx = match lease {
        Some(_) => fenced(client, lease, "pruning").await?,
        None => client.transaction().await.map_err(|e| err("starting a transaction", e))?,
    };
    let left = read_left_sources(&tx, config, SchemaState { cache: true, links: true, owned_by_row: true }).await?;
    let targets = match request.targets(config, &left) {
        Ok(targets) => targets,
        Err(refusal) => return Ok(PruneOutcome::Refused(refusal)),
    };
    let tables: Vec<String> = targets.iter().map(|t| t.table.clone()).collect();
    let columns: Vec<String> = targets.iter().map(|t| t.column.clone()).collect();
    let keys = typed(&[&tables, &columns]);
    let rows: i64 = tx.query_typed_one(&sql::prune_rows(), &keys).await.map_err(|e| err("counting what the prune deletes", e))?.get(0);
    let mut report = PruneReport::planned(request.dry_run, targets, rows.max(0) as u64);
    if request.dry_run {
        return Ok(PruneOutcome::Done(report));
    }
    if let Err(refusal) = request.check_confirmed(&report) {
        return Ok(PruneOutcome::Refused(refusal));
    }
    let deleted: i64 = tx.query_typed_one(&sql::prune_delete_rows(), &keys).await.map_err(|e| err("deleting cache rows", e))?.get(0);
    if deleted != rows {
        // Nothing else deletes embsync's rows while it holds the lease; if something did, the
        // confirmed count no longer holds and the transaction is rolled back.
        return Err(StoreError::new(format!(
            "the prune would have deleted {deleted} cache rows, not the {rows} it counted; nothing was deleted: try again"
        )));
    }
    tx.execute_typed(sql::PRUNE_REASSIGN, &keys).await.map_err(|e| err("reassigning cache rows", e))?;
    report.links = tx.execute_typed(sql::PRUNE_UNLINK, &keys).await.map_err(|e| err("unlinking", e))?;
    report.errors = tx.execute_typed(sql::PRUNE_ERRORS, &keys).await.map_err(|e| err("removing errors", e))?;
    tx.commit().await.map_err(|e| err("committing the prune", e))?;
    report.pruned = true;
    Ok(PruneOutcome::Done(report))
}
