//! embsync's store: the [`Store`] the sync driver runs on, over any [`tokio_postgres::Client`].
//!
//! The worker connects over the Workers socket API (or a Hyperdrive binding) and hands the
//! client to [`PgStore::new`]; the tests connect natively over TCP to a throwaway Postgres and run
//! the same code, so what the SQL means is tested against Postgres itself.

use bytes::BytesMut;
use embsync_core::config::{Config, Source};
use embsync_core::hash::ValueHash;
use embsync_core::index::{ExistingIndex, IndexState};
use embsync_core::report::{iso8601, IndexReport, ModelUsage, RunReport, RunStatus, SourceReport, Trigger};
use embsync_core::sql::{self, SchemaState};
use embsync_core::status::{Coverage, CurrentRun, FinishedRun, OpenRunSource};
use embsync_core::sync::{
    EmbeddedValue, Lease, PendingValue, Progress, RunId, RunState, SourceCounts, SourceState, StaleOutcome, Store, StoreError, ValueFailure,
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
    /// The configured model tags (large, small), bound as `$3` and `$4`.
    tags: (String, String),
    /// pgvector's `vector[]` type, looked up once per connection (its OID depends on the
    /// database).
    vector_array: Option<Type>,
    /// The lease [`Store::acquire_lease`] took: the fencing token of every write.
    lease: Option<LeaseToken>,
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

/// Begins a transaction that writes for the invocation holding `lease`: its limits, then the
/// fence. When the lease is not this invocation's any more (taken over, expired or released),
/// the transaction is rolled back and the error is [`StoreError::lease_lost`]: nothing is written.
async fn fenced<'a>(client: &'a mut Client, lease: Option<&LeaseToken>, what: &str) -> Result<Transaction<'a>, StoreError> {
    let Some(lease) = lease else {
        return Err(StoreError::lease_lost(format!("{what}: this invocation holds no sync lease; nothing was written")));
    };
    let tx = client.transaction().await.map_err(|e| err("starting a transaction", e))?;
    let (statement, lock, idle) = lease.limits();
    tx.execute_typed(sql::WRITE_LIMITS, &typed(&[&statement, &lock, &idle])).await.map_err(|e| err("setting the timeouts", e))?;
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
        let tags = (config.models.large.tag(), config.models.small.tag());
        PgStore { client, schema: None, tags, vector_array: None, lease: None }
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

    async fn schema_state(&mut self) -> Result<SchemaState, StoreError> {
        if let Some(s) = self.schema {
            return Ok(s);
        }
        let row = self.client.query_typed_one(sql::SCHEMA_STATE, &[]).await.map_err(|e| err("checking the schema", e))?;
        let state = SchemaState { cache: row.get(0), links: row.get::<_, Option<bool>>(1).unwrap_or(false) };
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
    f64 => Type::FLOAT8,
    Vec<String> => Type::TEXT_ARRAY,
    Vec<&str> => Type::TEXT_ARRAY,
    Vec<i32> => Type::INT4_ARRAY,
}

/// The parameters of a statement with their declared types.
fn typed<'a>(params: &[&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.as_sql(), p.pg_type())).collect()
}

fn keys(source: &Source) -> (String, String) {
    (source.table_key(), source.column_key().to_owned())
}

fn hashes(failures: &[ValueFailure]) -> Vec<&str> {
    failures.iter().map(|f| f.hash.as_str()).collect()
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
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.execute_typed(sql::LOCK_SCHEMA, &[]).await.map_err(|e| err("locking the schema", e))?;
        let existed: bool = tx.query_typed_one(sql::CACHE_EXISTS, &[]).await.map_err(|e| err("checking the schema", e))?.get(0);
        tx.batch_execute(&sql::ensure_schema(&config.models)).await.map_err(|e| err("creating tables", e))?;
        if !existed {
            tx.batch_execute(sql::MARK_CACHE_OURS).await.map_err(|e| err("marking embedding_cache as embsync's", e))?;
        }
        let dims = tx.query_typed_one(sql::COLUMN_DIMS, &[]).await.map_err(|e| err("reading the embedding columns", e))?;
        sql::check_column_dims(&config.models, dims.get(0), dims.get(1)).map_err(StoreError::new)?;
        tx.commit().await.map_err(|e| err("committing the schema", e))?;
        self.schema = Some(SchemaState { cache: true, links: true });
        Ok(())
    }

    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError> {
        let state = self.schema_state().await?;
        let (t, c) = keys(source);
        let (lt, st) = (&self.tags.0, &self.tags.1);
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.batch_execute(sql::PLAN_WORK_MEM).await.map_err(|e| err("setting work_mem", e))?;
        let row = tx.query_typed_one(&sql::plan(source, state), &typed(&[&t, &c, lt, st])).await.map_err(|e| err("counting", e))?;
        tx.commit().await.map_err(|e| err("committing the count", e))?;
        let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        Ok(SourceCounts { total: n(0), new: n(1), reusable: n(2), embed_tokens: n(3), stale: n(4), deferred: n(5) })
    }

    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError> {
        let (t, c) = keys(source);
        let (lt, st) = (&self.tags.0, &self.tags.1);
        let tx = fenced(&mut self.client, self.lease.as_ref(), "linking reusable values").await?;
        let linked = tx.execute_typed(&sql::link_reusable(source), &typed(&[&t, &c, lt, st])).await.map_err(|e| err("linking", e))?;
        tx.commit().await.map_err(|e| err("committing the links", e))?;
        Ok(linked)
    }

    async fn pending(
        &mut self,
        source: &Source,
        run: &RunId,
        after: Option<&ValueHash>,
        limit: usize,
    ) -> Result<Vec<PendingValue>, StoreError> {
        let (t, c) = keys(source);
        let after = after.map_or("", |h| h.as_str()).to_owned();
        let limit = limit as i64;
        let snapshot: bool = self
            .client
            .query_typed_one(sql::HAS_SNAPSHOT, &typed(&[&run.0, &t, &c]))
            .await
            .map_err(|e| err("looking for the snapshot", e))?
            .get(0);
        let rows = if snapshot {
            self.client
                .query_typed(&sql::pending_snapshot_page(), &typed(&[&t, &c, &self.tags.0, &self.tags.1, &run.0, &after, &limit]))
                .await
                .map_err(|e| err("listing", e))?
        } else {
            self.client
                .query_typed(&sql::pending_page(source), &typed(&[&t, &c, &self.tags.0, &self.tags.1, &after, &limit]))
                .await
                .map_err(|e| err("listing", e))?
        };
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
        let (t, c) = keys(source);
        let hashes: Vec<&str> = batch.iter().map(|v| v.hash.as_str()).collect();
        let values: Vec<&str> = batch.iter().map(|v| v.value.as_str()).collect();
        let counts: Vec<i32> = batch.iter().map(|v| v.occurrences).collect();
        let large: Vec<Option<PgVector>> = batch.iter().map(|v| v.large.as_ref().map(PgVector)).collect();
        let small: Vec<Option<PgVector>> = batch.iter().map(|v| v.small.as_ref().map(PgVector)).collect();
        let vector_array = self.vector_array_type().await?;
        let tx = fenced(&mut self.client, self.lease.as_ref(), "writing a batch").await?;
        let mut params = typed(&[&t, &c, &self.tags.0, &self.tags.1, &hashes, &values, &counts]);
        params.push((&large, vector_array.clone()));
        params.push((&small, vector_array));
        tx.execute_typed(sql::UPSERT_BATCH, &params).await.map_err(|e| err("writing embeddings", e))?;
        tx.execute_typed(sql::LINK_VALUES, &typed(&[&t, &c, &hashes])).await.map_err(|e| err("linking values", e))?;
        let done: Vec<&str> = batch.iter().filter(|v| v.complete).map(|v| v.hash.as_str()).collect();
        tx.execute_typed(sql::CLEAR_ERRORS, &typed(&[&t, &c, &done])).await.map_err(|e| err("clearing errors", e))?;
        let (l, sm) = &progress.usage;
        let n = |v: u64| v as i64;
        tx.execute_typed(
            sql::ADD_PROGRESS,
            &typed(&[
                &progress.run.0,
                &t,
                &c,
                &n(progress.embedded),
                &n(progress.reused),
                &n(progress.batches),
                &n(l.prompt_tokens),
                &n(l.requests),
                &n(sm.prompt_tokens),
                &n(sm.requests),
            ]),
        )
        .await
        .map_err(|e| err("counting the batch", e))?;
        tx.commit().await.map_err(|e| err("committing a batch", e))
    }

    async fn remove_stale(&mut self, source: &Source, run: &RunId, known_clean: bool) -> Result<StaleOutcome, StoreError> {
        let (t, c) = keys(source);
        let tx = fenced(&mut self.client, self.lease.as_ref(), "removing stale values").await?;
        let unlinked = if known_clean {
            0
        } else {
            tx.execute_typed(&sql::unlink_stale(source), &typed(&[&t, &c])).await.map_err(|e| err("unlinking", e))?
        };
        let mut deleted = 0;
        if unlinked > 0 {
            let row = tx.query_typed_one(sql::DELETE_ORPHANS, &[]).await.map_err(|e| err("deleting", e))?;
            deleted = row.get::<_, i64>(0).max(0) as u64;
            tx.execute_typed(sql::REASSIGN_SOURCE, &typed(&[&t, &c])).await.map_err(|e| err("reassigning", e))?;
        }
        tx.execute_typed(sql::SOURCE_DONE, &typed(&[&run.0, &t, &c, &(unlinked as i64), &(deleted as i64)]))
            .await
            .map_err(|e| err("marking the source done", e))?;
        tx.execute_typed(sql::DROP_SNAPSHOT, &typed(&[&run.0, &t, &c])).await.map_err(|e| err("dropping the snapshot", e))?;
        tx.commit().await.map_err(|e| err("committing stale removal", e))?;
        Ok(StaleOutcome { unlinked, deleted })
    }

    async fn record_errors(&mut self, source: &Source, failures: &[ValueFailure], run: &RunId) -> Result<(), StoreError> {
        let (t, c) = keys(source);
        let models: Vec<&str> = failures.iter().map(|f| f.model.as_str()).collect();
        let messages: Vec<&str> = failures.iter().map(|f| f.message.as_str()).collect();
        let tx = fenced(&mut self.client, self.lease.as_ref(), "recording errors").await?;
        tx.execute_typed(sql::RECORD_ERRORS, &typed(&[&t, &c, &hashes(failures), &models, &messages]))
            .await
            .map_err(|e| err("recording errors", e))?;
        tx.execute_typed(sql::ADD_ERRORS, &typed(&[&run.0, &t, &c, &(failures.len() as i64)]))
            .await
            .map_err(|e| err("counting errors", e))?;
        tx.commit().await.map_err(|e| err("committing errors", e))
    }

    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.lease = None;
        let secs = ttl.as_secs_f64();
        let token = LeaseToken { holder: holder.to_owned(), generation: 0, ttl };
        let (statement, lock, idle) = token.limits();
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.execute_typed(sql::WRITE_LIMITS, &typed(&[&statement, &lock, &idle])).await.map_err(|e| err("setting the timeouts", e))?;
        // A fenced transaction of the holder in flight locks the row: waiting past the lock
        // timeout means the lease is in use.
        match tx.query_typed_opt(sql::ACQUIRE_LEASE, &typed(&[&holder, &secs])).await {
            Ok(Some(row)) => {
                tx.commit().await.map_err(|e| err("committing the sync lease", e))?;
                self.lease = Some(LeaseToken { generation: row.get(0), ..token });
                return Ok(Lease::Acquired);
            }
            Ok(None) => tx.commit().await.map_err(|e| err("committing the sync lease", e))?,
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => tx.rollback().await.map_err(|e| err("rolling back", e))?,
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
        let (statement, lock, idle) = lease.limits();
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.execute_typed(sql::WRITE_LIMITS, &typed(&[&statement, &lock, &idle])).await.map_err(|e| err("setting the timeouts", e))?;
        tx.execute_typed(sql::RELEASE_LEASE, &typed(&[&lease.holder.as_str(), &lease.generation]))
            .await
            .map_err(|e| err("releasing the sync lease", e))?;
        tx.commit().await.map_err(|e| err("committing the release", e))
    }

    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError> {
        let tx = fenced(&mut self.client, self.lease.as_ref(), "opening the run").await?;
        let mut resumed = tx.query_typed_opt(sql::RESUME_RUN, &[]).await.map_err(|e| err("resuming the run", e))?;
        if let Some(row) = &resumed {
            let id: String = row.get(0);
            let rows = tx.query_typed(sql::RUN_SOURCES, &typed(&[&id])).await.map_err(|e| err("reading the run", e))?;
            let same = rows.len() == sources.len()
                && rows.iter().zip(sources).all(|(r, s)| r.get::<_, String>(0) == s.table_key() && r.get::<_, String>(1) == s.column_key());
            if !same {
                // The config changed mid-run: that run ends here and a new one starts.
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
                let row =
                    tx.query_typed_one(sql::START_RUN, &typed(&[&new_id.0, &trigger_text])).await.map_err(|e| err("starting a run", e))?;
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
        Ok(RunState { id: RunId(id), trigger, started_at_ms: row.get(2), invocations: row.get::<_, i32>(3).max(0) as u64, sources: states })
    }

    async fn save_plan(&mut self, run: &RunId, source: &Source, plan: &SourceReport, snapshot: bool) -> Result<(), StoreError> {
        let (t, c) = keys(source);
        let n = |v: u64| v as i64;
        let tx = fenced(&mut self.client, self.lease.as_ref(), "saving the plan").await?;
        tx.execute_typed(
            sql::SAVE_PLAN,
            &typed(&[
                &run.0,
                &t,
                &c,
                &n(plan.total),
                &n(plan.new),
                &n(plan.unchanged),
                &n(plan.reused),
                &n(plan.deferred),
                &n(plan.batches),
            ]),
        )
        .await
        .map_err(|e| err("saving the plan", e))?;
        if snapshot {
            tx.execute_typed(&sql::snapshot_pending(source), &typed(&[&t, &c, &self.tags.0, &self.tags.1, &run.0]))
                .await
                .map_err(|e| err("snapshotting pending values", e))?;
        }
        tx.commit().await.map_err(|e| err("committing the plan", e))
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
}
