//! embsync's store: the [`Store`] the sync driver runs on, over any [`tokio_postgres::Client`].
//!
//! The worker connects over the Workers socket API (or a Hyperdrive binding) and hands the
//! client to [`PgStore::new`]; the tests connect natively over TCP to a throwaway Postgres and run
//! the same code, so what the SQL means is tested against Postgres itself.

use bytes::BytesMut;
use embsync_core::config::{Config, Source};
use embsync_core::fanout::{ClaimedRange, RangeClaim, RangeEnd, RangeTally};
use embsync_core::hash::ValueHash;
use embsync_core::index::{ExistingIndex, IndexState};
use embsync_core::prune::{LeftSource, PruneOutcome, PruneReport, PruneRequest};
use embsync_core::report::{iso8601, IndexReport, ModelUsage, RunReport, RunStatus, SourceReport, Trigger};
use embsync_core::sql::param::Param as SqlParam;
use embsync_core::sql::{self, ModelTags, PgType, SchemaState, Statement};
use embsync_core::status::{Coverage, CurrentRun, DeadRange, FinishedRun, OpenRunSource, SourceRanges, WaitingOrphans};
use embsync_core::sync::{
    DeleteGuard, EmbeddedValue, Lease, OrphansDeleted, PendingValue, Progress, RunId, RunState, SourceCounts, SourceState, StaleOutcome,
    Store, StoreError, ValueFailure,
};
use embsync_core::vector::Vector;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, Transaction};

mod batches;
pub mod bind;
mod capture;
mod lease;
mod status;

pub use embsync_core::batch_flow::{OpenBatch, RequestStored};

use bind::*;
use lease::*;

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
    retention_runs: u64,
    /// Whether embsync created `embedding_cache` (from `embedding_sync_schema`), so that it may
    /// analyze it too.
    cache_created: bool,
    /// Rows written to embsync's tables since this store last analyzed them.
    written: u64,
    /// The lease [`Store::acquire_lease`] took, or the range [`Store::claim_range`] claimed:
    /// the fencing token of every write.
    fence: Option<Fence>,
}

/// After this many rows written, the store analyzes embsync's tables before it relies on their
/// plans (stale removal), instead of waiting for autovacuum; the run's snapshot is analyzed
/// when it holds this many rows.
pub const ANALYZE_AFTER_ROWS: u64 = 10_000;

/// A lock wait that ran out (`lock_timeout`, SQLSTATE 55P03).
fn lock_timed_out(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
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
        PgStore {
            client,
            schema: None,
            tags,
            vector_array: None,
            retention_runs: config.retention_runs,
            cache_created: false,
            written: 0,
            fence: None,
        }
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
        usage: (
            ModelUsage { prompt_tokens: n(16), requests: n(17), batch_prompt_tokens: n(20), batch_requests: n(21) },
            ModelUsage { prompt_tokens: n(18), requests: n(19), batch_prompt_tokens: n(22), batch_requests: n(23) },
        ),
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
        // A captured source on a database without the capture's tables yet (a dry run before
        // the migration) has no copy of its values: its table is the truth.
        let scanned;
        let source = if source.changes.is_capture() && !self.has_capture_tables().await? {
            scanned = Source { changes: embsync_core::config::Changes::Scan, ..source.clone() };
            &scanned
        } else {
            source
        };
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
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "linking reusable values").await?;
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
        // A claimed range reads its part of the snapshot only (none when the snapshot is gone).
        let upto = match &self.fence {
            Some(Fence::Range(claim)) => Some(&claim.hi),
            _ => None,
        };
        let snapshot: bool = upto.is_some()
            || query_one(&self.client, &Bound::new(&sql::HasSnapshot { run, source }))
                .await
                .map_err(|e| err("looking for the snapshot", e))?
                .get(0);
        let rows = if snapshot {
            query(&self.client, &Bound::new(&sql::PendingSnapshotPage { source, tags, run, after, limit, upto })).await
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
        // Under a range claim the batch also moves the range's progress past its values.
        let last = batch.iter().map(|v| &v.hash).max_by(|a, b| a.as_str().cmp(b.as_str()));
        let tx = fenced(&mut self.client, self.fence.as_ref(), last, "writing a batch").await?;
        execute(&tx, &Bound::with_vectors(&upsert, vector_array)).await.map_err(|e| err("writing embeddings", e))?;
        execute(&tx, &Bound::new(&sql::LinkValues { source, batch })).await.map_err(|e| err("linking values", e))?;
        execute(&tx, &Bound::new(&sql::ClearErrors { source, batch })).await.map_err(|e| err("clearing errors", e))?;
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
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "removing stale values").await?;
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
        execute(&tx, &Bound::new(&sql::SourceDone { run, source, stale: outcome.unlinked }))
            .await
            .map_err(|e| err("marking the source done", e))?;
        if source.changes.is_capture() {
            // When everything this run planned for the source is done (read from its snapshot,
            // before it is dropped), a later run whose log holds nothing for it may skip it.
            execute(&tx, &Bound::new(&sql::SettleCapture { source, tags: &self.tags, run }))
                .await
                .map_err(|e| err("recording the capture settled", e))?;
        }
        execute(&tx, &Bound::new(&sql::DropSnapshot { run, source })).await.map_err(|e| err("dropping the snapshot", e))?;
        tx.commit().await.map_err(|e| err("committing stale removal", e))?;
        Ok(outcome)
    }

    async fn delete_orphans(&mut self, run: &RunId, sources: &[&Source]) -> Result<Vec<OrphansDeleted>, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "deleting orphaned cache rows").await?;
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

    async fn capture(&mut self, source: &Source) -> Result<embsync_core::sync::CaptureStep, StoreError> {
        self.capture_step(source).await
    }

    async fn release_captures(&mut self, captured: &[&Source]) -> Result<Vec<String>, StoreError> {
        self.release(captured).await
    }

    async fn capture_info(&mut self, source: &Source) -> Result<embsync_core::report::CaptureInfo, StoreError> {
        self.info(source).await
    }

    async fn record_refused(&mut self, run: &RunId, reasons: &[String]) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording a refused model").await?;
        execute(&tx, &Bound::new(&sql::RecordRefused { run, reasons })).await.map_err(|e| err("recording a refused model", e))?;
        tx.commit().await.map_err(|e| err("committing the refusal", e))
    }

    async fn record_errors(&mut self, source: &Source, failures: &[ValueFailure], run: &RunId) -> Result<(), StoreError> {
        let count = sql::AddErrors { run, source, errors: failures.len() as u64 };
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording errors").await?;
        execute(&tx, &Bound::new(&sql::RecordErrors { source, failures })).await.map_err(|e| err("recording errors", e))?;
        execute(&tx, &Bound::new(&count)).await.map_err(|e| err("counting errors", e))?;
        tx.commit().await.map_err(|e| err("committing errors", e))
    }

    async fn acquire_lease(&mut self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.fence = None;
        let token = LeaseToken { holder: holder.to_owned(), generation: 0, ttl };
        let tx = limited(&mut self.client, &token).await?;
        // A fenced transaction of the holder in flight locks the row: waiting past the lock
        // timeout means the lease is in use.
        match query_opt(&tx, &Bound::new(&sql::AcquireLease { holder, ttl })).await {
            Ok(Some(row)) => {
                tx.commit().await.map_err(|e| err("committing the sync lease", e))?;
                self.fence = Some(Fence::Lease(LeaseToken { generation: row.get(0), ..token }));
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
        let Some(Fence::Lease(lease)) = self.fence.take() else { return Ok(()) };
        let tx = limited(&mut self.client, &lease).await?;
        execute(&tx, &Bound::new(&sql::ReleaseLease { holder: &lease.holder, generation: lease.generation }))
            .await
            .map_err(|e| err("releasing the sync lease", e))?;
        tx.commit().await.map_err(|e| err("committing the release", e))
    }

    async fn open_run(&mut self, new_id: &RunId, trigger: Trigger, sources: &[&Source]) -> Result<RunState, StoreError> {
        let models = self.tags.recorded();
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "opening the run").await?;
        let mut resumed = tx.query_typed_opt(sql::RESUME_RUN, &[]).await.map_err(|e| err("resuming the run", e))?;
        if let Some(row) = &resumed {
            let run = RunId(row.get(0));
            let rows = query(&tx, &Bound::new(&sql::RunSources { run: &run })).await.map_err(|e| err("reading the run", e))?;
            let same = rows.len() == sources.len()
                && rows.iter().zip(sources).all(|(r, s)| r.get::<_, String>(0) == s.table_key() && r.get::<_, String>(1) == s.column_key())
                && row.get::<_, String>(4) == models;
            if !same {
                // The config changed mid-run (its sources or a model): that run ends here and a
                // new one starts, planned under the new config.
                execute(&tx, &Bound::new(&sql::AbandonRun { run: &run })).await.map_err(|e| err("abandoning the run", e))?;
                resumed = None;
            }
        }
        let row = match resumed {
            Some(row) => row,
            None => {
                let start = sql::StartRun { run: new_id, trigger, tags: &self.tags };
                let row = query_one(&tx, &Bound::new(&start)).await.map_err(|e| err("starting a run", e))?;
                execute(&tx, &Bound::new(&sql::StartRunSources { run: new_id, sources })).await.map_err(|e| err("starting a run", e))?;
                row
            }
        };
        let id = RunId(row.get(0));
        let trigger = trigger_of(&row.get::<_, String>(1));
        let rows = query(&tx, &Bound::new(&sql::RunSources { run: &id })).await.map_err(|e| err("reading the run", e))?;
        tx.commit().await.map_err(|e| err("committing the run", e))?;
        let states = rows.iter().map(source_state).collect();
        Ok(RunState {
            id,
            trigger,
            started_at_ms: row.get(2),
            invocations: row.get::<_, i32>(3).max(0) as u64,
            sources: states,
            refused: row.get(5),
        })
    }

    async fn save_plan(&mut self, run: &RunId, source: &Source, plan: &SourceReport, snapshot: bool) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "saving the plan").await?;
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
        fenced(&mut self.client, self.fence.as_ref(), None, "building an index").await?.commit().await.map_err(|e| err("committing", e))?;
        // The simple query protocol runs it on its own, outside a transaction, as CONCURRENTLY needs.
        self.client.batch_execute(statement).await.map_err(|e| err("running the index statement", e))
    }

    async fn record_indexes(&mut self, run: &RunId, indexes: &IndexReport) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording the index step").await?;
        execute(&tx, &Bound::new(&sql::RecordIndexes { run, indexes })).await.map_err(|e| err("recording the index step", e))?;
        tx.commit().await.map_err(|e| err("committing the index step", e))
    }

    async fn finish_run(&mut self, run: &RunId, report: &RunReport) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "finishing the run").await?;
        execute(&tx, &Bound::new(&sql::FinishRun { run, report })).await.map_err(|e| err("finishing the run", e))?;
        tx.execute_typed(sql::DROP_OLD_SNAPSHOTS, &[]).await.map_err(|e| err("dropping old snapshots", e))?;
        tx.execute_typed(sql::DROP_OLD_RANGES, &[]).await.map_err(|e| err("dropping old ranges", e))?;
        execute(&tx, &Bound::new(&sql::DeleteOldRuns { keep: self.retention_runs }))
            .await
            .map_err(|e| err("deleting runs beyond the retention", e))?;
        tx.commit().await.map_err(|e| err("committing the finished run", e))
    }

    async fn plan_ranges(&mut self, run: &RunId, source: &Source, range_values: u64) -> Result<u64, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "splitting the snapshot into ranges").await?;
        let n = execute(&tx, &Bound::new(&sql::PlanRanges { run, source, per_range: range_values }))
            .await
            .map_err(|e| err("splitting the snapshot into ranges", e))?;
        tx.commit().await.map_err(|e| err("committing the ranges", e))?;
        Ok(n)
    }

    async fn range_tally(&mut self, run: &RunId) -> Result<Vec<RangeTally>, StoreError> {
        let rows = query(&self.client, &Bound::new(&sql::RangeTallies { run })).await.map_err(|e| err("reading the run's ranges", e))?;
        let n = |r: &tokio_postgres::Row, i: usize| r.get::<_, i64>(i).max(0) as u64;
        Ok(rows.iter().map(|r| RangeTally { table: r.get(0), column: r.get(1), queued: n(r, 2), done: n(r, 3), dead: r.get(5) }).collect())
    }

    async fn sweep_ranges(&mut self, run: &RunId, resend_after: Duration) -> Result<Vec<i64>, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "sweeping the ranges").await?;
        let rows = query(&tx, &Bound::new(&sql::SweepRanges { run, resend_after })).await.map_err(|e| err("sweeping the ranges", e))?;
        tx.commit().await.map_err(|e| err("committing the sweep", e))?;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn claim_range(&mut self, run: &RunId, range: i64, holder: &str, ttl: Duration) -> Result<RangeClaim, StoreError> {
        self.fence = None;
        let limits = LeaseToken { holder: holder.to_owned(), generation: 0, ttl };
        let tx = limited(&mut self.client, &limits).await?;
        let claimed = match query_opt(&tx, &Bound::new(&sql::ClaimRange { range, run, holder, ttl, tags: &self.tags })).await {
            Ok(row) => {
                tx.commit().await.map_err(|e| err("committing the claim", e))?;
                row
            }
            // A consumer's write in flight locks the range's row: it is in use.
            Err(e) if lock_timed_out(&e) => {
                tx.rollback().await.map_err(|e| err("rolling back", e))?;
                return Ok(RangeClaim::Skipped(format!("range {range} is being written by another consumer")));
            }
            Err(e) => return Err(err("claiming the range", e)),
        };
        if let Some(row) = claimed {
            let hash = |text: String| {
                if text.is_empty() {
                    Ok(None)
                } else {
                    ValueHash::from_hex(&text)
                        .map(Some)
                        .ok_or_else(|| StoreError::new(format!("bad hash {text:?} in embedding_sync_ranges")))
                }
            };
            let hi = hash(row.get(4))?.ok_or_else(|| StoreError::new(format!("range {range} has no upper bound")))?;
            self.fence =
                Some(Fence::Range(ClaimToken { run: run.0.clone(), range, holder: holder.to_owned(), generation: row.get(0), ttl, hi }));
            return Ok(RangeClaim::Claimed(ClaimedRange {
                table: row.get(1),
                column: row.get(2),
                next: hash(row.get(3))?,
                run_tokens: row.get::<_, i64>(5).max(0) as u64,
            }));
        }
        let state = query_opt(&self.client, &Bound::new(&sql::RangeState { range, run })).await.map_err(|e| err("reading the range", e))?;
        let why = match state {
            None => format!("range {range} of run {} is unknown (its run is over, or it never existed)", run.0),
            Some(r) => {
                let (state, live, open, error): (String, bool, bool, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
                match state.as_str() {
                    "done" => format!("range {range} is done"),
                    "dead" => format!("range {range} was given up: {error}"),
                    _ if !open => format!("the run of range {range} is over"),
                    _ if live => format!("range {range} is held by another consumer"),
                    _ => format!("range {range}'s run was started under other models; the next sync abandons it"),
                }
            }
        };
        Ok(RangeClaim::Skipped(why))
    }

    async fn end_claim(&mut self, end: RangeEnd) -> Result<bool, StoreError> {
        let Some(Fence::Range(claim)) = self.fence.clone() else {
            return Err(StoreError::lease_lost("ending a range's claim: this store holds no claim; nothing was written"));
        };
        let (state, error) = match end {
            RangeEnd::Done => ("done", String::new()),
            RangeEnd::HandOn(error) => ("queued", error.unwrap_or_default()),
            RangeEnd::Dead(error) => ("dead", error),
        };
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "ending the range's claim").await?;
        execute(&tx, &Bound::new(&sql::EndClaim { range: claim.range, state, error: &error }))
            .await
            .map_err(|e| err("ending the range's claim", e))?;
        tx.commit().await.map_err(|e| err("committing the range's end", e))?;
        self.fence = None;
        if state == "queued" {
            return Ok(false);
        }
        let ready = query_one(&self.client, &Bound::new(&sql::RunReady { run: &RunId(claim.run.clone()) }))
            .await
            .map_err(|e| err("reading the run's ranges", e))?;
        Ok(ready.get(0))
    }

    async fn dead_letter(&mut self, run: &RunId, range: i64, reason: &str) -> Result<bool, StoreError> {
        let n = execute(&self.client, &Bound::new(&sql::DeadLetter { range, run, reason }))
            .await
            .map_err(|e| err("marking the range dead", e))?;
        Ok(n == 1)
    }

    async fn record_batch_file(
        &mut self,
        input_file_id: &str,
        run: &RunId,
        slot: embsync_core::config::ModelSlot,
        requests: u64,
        values: &[sql::BatchValue<'_>],
    ) -> Result<(), StoreError> {
        self.pg_record_batch_file(input_file_id, run, slot, requests, values).await
    }

    async fn set_batch_created(&mut self, input_file_id: &str, batch_id: &str) -> Result<(), StoreError> {
        self.pg_set_batch_created(input_file_id, batch_id).await
    }

    async fn set_batch_state(&mut self, state: &sql::SetBatchState<'_>) -> Result<(), StoreError> {
        self.pg_set_batch_state(state).await
    }

    async fn finish_batch_file(&mut self, input_file_id: &str, state: &str) -> Result<(), StoreError> {
        self.pg_finish_batch_file(input_file_id, state).await
    }

    async fn open_batches(&mut self) -> Result<Vec<OpenBatch>, StoreError> {
        self.pg_open_batches().await
    }

    async fn batch_requests(&mut self, input_file_id: &str) -> Result<Vec<(String, u32)>, StoreError> {
        self.pg_batch_requests(input_file_id).await
    }

    async fn store_batch_request(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        vectors: &[Vector],
        prompt_tokens: u64,
    ) -> Result<RequestStored, StoreError> {
        self.pg_store_batch_request(config, run, input_file_id, custom_id, vectors, prompt_tokens).await
    }

    async fn record_batch_request_errors(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        message: &str,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        self.pg_record_batch_request_errors(config, run, input_file_id, custom_id, message).await
    }

    async fn awaited_values(&mut self, source: &Source) -> Result<(u64, u64), StoreError> {
        self.pg_awaited_values(source).await
    }
}
