//! What `/status` and `POST /prune` read and do: coverage, runs, sources that left the config, the prune's transaction.

use super::*;
use embsync_core::status::{ModelBatches, PendingBatch};

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
            changes: embsync_core::report::ChangesMode::of(source.changes),
            capture: None,
        };
        if source.changes.is_capture() {
            match self.info(source).await {
                Ok(info) => out.capture = Some(info),
                Err(e) => out.error = Some(e.to_string()),
            }
        }
        match query_one(&self.client, &Bound::new(&sql::SourceCoverage { source })).await {
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
    pub async fn last_runs(&mut self, n: u64) -> Result<Vec<FinishedRun>, StoreError> {
        let rows = query(&self.client, &Bound::new(&sql::LastRuns { n })).await.map_err(|e| err("reading the runs", e))?;
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
        let run = RunId(r.get(0));
        let sources =
            query(&self.client, &Bound::new(&sql::RunSources { run: &run })).await.map_err(|e| err("reading the current run", e))?;
        let lease = self.client.query_typed_opt(sql::LEASE_HOLDER, &[]).await.map_err(|e| err("reading the sync lease", e))?;
        let lease_held = lease.is_some_and(|l| l.get::<_, f64>(1) > 0.0);
        let ranges = self.client.query_typed(sql::RANGES_STATUS, &[]).await.map_err(|e| err("reading the run's ranges", e))?;
        let ranges_of = |table: &str, column: &str| -> Option<SourceRanges> {
            let mine: Vec<_> = ranges.iter().filter(|g| g.get::<_, &str>(0) == table && g.get::<_, &str>(1) == column).collect();
            if mine.is_empty() {
                return None;
            }
            let mut out = SourceRanges::default();
            for g in mine {
                let n = g.get::<_, i64>(3).max(0) as u64;
                match g.get::<_, &str>(2) {
                    "queued" => out.queued += n,
                    "done" => out.done += n,
                    "dead" => out.dead += n,
                    _ => out.dead_ranges.push(DeadRange {
                        range: g.get::<_, Option<i64>>(4).unwrap_or_default(),
                        error: g.get::<_, Option<String>>(5).unwrap_or_default(),
                    }),
                }
            }
            out.dead_ranges.sort_by_key(|d| d.range);
            Some(out)
        };
        Ok(Some(CurrentRun {
            status: CurrentRun::status_now(run_status(r.get(1))?, lease_held),
            trigger: trigger_of(r.get(2)),
            invocations: r.get::<_, i32>(3).max(0) as u64,
            started_at: iso8601(r.get(4)),
            sources: sources
                .iter()
                .map(|row| {
                    let state = source_state(row);
                    let ranges = ranges_of(&state.report.table, &state.report.column);
                    OpenRunSource { report: state.report, planned: state.planned, done: state.done, ranges }
                })
                .collect(),
            run_id: run.0,
        }))
    }

    /// The orphan candidates waiting for the end of a run (read-only; none before the table
    /// exists).
    ///
    /// # Errors
    /// [`StoreError`] when the table cannot be read.
    pub async fn waiting_orphans(&mut self) -> Result<WaitingOrphans, StoreError> {
        let exists: bool =
            self.client.query_typed_one(sql::HAS_ORPHANS_TABLE, &[]).await.map_err(|e| err("checking the schema", e))?.get(0);
        if !exists {
            return Ok(WaitingOrphans::default());
        }
        let row = self.client.query_typed_one(sql::ORPHANS_WAITING_COUNT, &[]).await.map_err(|e| err("counting orphans", e))?;
        Ok(WaitingOrphans { rows: row.get::<_, i64>(0).max(0) as u64, oldest: row.get::<_, Option<f64>>(1).map(iso8601) })
    }

    /// Whether the Batch API's tables exist (schema version 4).
    async fn has_batch_tables(&mut self) -> Result<bool, StoreError> {
        Ok(self.client.query_typed_one(sql::HAS_BATCH_TABLES, &[]).await.map_err(|e| err("checking the schema", e))?.get(0))
    }

    /// The Batch API files embsync has not finished with, per model (large first), each model's
    /// oldest first, with their state and `request_counts` as last polled (read-only; none
    /// before the tables exist).
    ///
    /// # Errors
    /// [`StoreError`] when the tables cannot be read.
    pub async fn pending_batches(&mut self) -> Result<Vec<ModelBatches>, StoreError> {
        if !self.has_batch_tables().await? {
            return Ok(Vec::new());
        }
        let rows = self.client.query_typed(sql::PENDING_BATCHES, &[]).await.map_err(|e| err("reading the pending batches", e))?;
        let n = |r: &tokio_postgres::Row, i: usize| r.get::<_, i32>(i).max(0) as u64;
        let batches = rows
            .iter()
            .map(|r| {
                let counts: Option<String> = r.get(9);
                let batch = PendingBatch {
                    batch_id: r.get(2),
                    input_file_id: r.get(3),
                    run_id: r.get(4),
                    state: r.get(5),
                    created_at: iso8601(r.get(6)),
                    age_seconds: r.get::<_, f64>(7).max(0.0) as u64,
                    polled_at: r.get::<_, Option<f64>>(8).map(iso8601),
                    request_counts: counts.and_then(|c| serde_json::from_str(&c).ok()),
                    requests: n(r, 10),
                    values: n(r, 11),
                    waiting: r.get::<_, i64>(12).max(0) as u64,
                };
                (r.get::<_, String>(0), r.get::<_, String>(1), batch)
            })
            .collect();
        Ok(ModelBatches::group(batches))
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
        let batches = self.has_batch_tables().await?;
        read_left_sources(&self.client, config, state, batches).await
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
        let batches = self.has_batch_tables().await;
        let lease = if request.dry_run { None } else { self.fence.clone() };
        let result = match batches {
            Ok(batches) => prune_leased(&mut self.client, config, request, lease.as_ref(), batches).await,
            Err(e) => Err(e),
        };
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
    batches: bool,
) -> Result<Vec<LeftSource>, StoreError> {
    let enabled: Vec<&Source> = config.enabled_sources().collect();
    let rows = query(client, &Bound::new(&sql::LeftSources { state, batches, enabled: &enabled }))
        .await
        .map_err(|e| err("reading the sources that left the config", e))?;
    let n = |r: &tokio_postgres::Row, i: usize| r.get::<_, i64>(i).max(0) as u64;
    let mut left: Vec<LeftSource> = rows
        .iter()
        .map(|r| LeftSource { batch_values: n(r, 5), ..LeftSource::new(config, r.get(0), r.get(1), n(r, 2), n(r, 3), n(r, 4)) })
        .collect();
    // A rename: the same table, spelled another way, with the same column, is enabled.
    let named: Vec<(usize, String)> = left.iter().enumerate().filter_map(|(i, l)| l.quoted_table().map(|q| (i, q))).collect();
    if named.is_empty() || enabled.is_empty() {
        return Ok(left);
    }
    let quoted: Vec<String> = named.iter().map(|(_, q)| q.clone()).collect();
    let same =
        query(client, &Bound::new(&sql::SameTables { left: &quoted, enabled: &enabled })).await.map_err(|e| err("comparing tables", e))?;
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
    lease: Option<&Fence>,
    batches: bool,
) -> Result<PruneOutcome, StoreError> {
    let tx = match lease {
        Some(_) => fenced(client, lease, None, "pruning").await?,
        None => client.transaction().await.map_err(|e| err("starting a transaction", e))?,
    };
    let left = read_left_sources(&tx, config, SchemaState { cache: true, links: true, owned_by_row: true }, batches).await?;
    let targets = match request.targets(config, &left) {
        Ok(targets) => targets,
        Err(refusal) => return Ok(PruneOutcome::Refused(refusal)),
    };
    let rows: i64 = query_one(&tx, &Bound::new(&sql::PruneRows { targets: &targets }))
        .await
        .map_err(|e| err("counting what the prune deletes", e))?
        .get(0);
    let mut report = PruneReport::planned(request.dry_run, targets.clone(), rows.max(0) as u64);
    if batches {
        let count = query_one(&tx, &Bound::new(&sql::PruneBatchValuesCount { targets: &targets }))
            .await
            .map_err(|e| err("counting the batch values the prune forgets", e))?;
        report.batch_values = count.get::<_, i64>(0).max(0) as u64;
    }
    if request.dry_run {
        return Ok(PruneOutcome::Done(report));
    }
    if let Err(refusal) = request.check_confirmed(&report) {
        return Ok(PruneOutcome::Refused(refusal));
    }
    let deleted: i64 =
        query_one(&tx, &Bound::new(&sql::PruneDeleteRows { targets: &targets })).await.map_err(|e| err("deleting cache rows", e))?.get(0);
    if deleted != rows {
        // Nothing else deletes embsync's rows while it holds the lease; if something did, the
        // confirmed count no longer holds and the transaction is rolled back.
        return Err(StoreError::new(format!(
            "the prune would have deleted {deleted} cache rows, not the {rows} it counted; nothing was deleted: try again"
        )));
    }
    execute(&tx, &Bound::new(&sql::PruneReassign { targets: &targets })).await.map_err(|e| err("reassigning cache rows", e))?;
    report.links = execute(&tx, &Bound::new(&sql::PruneUnlink { targets: &targets })).await.map_err(|e| err("unlinking", e))?;
    report.errors = execute(&tx, &Bound::new(&sql::PruneErrors { targets: &targets })).await.map_err(|e| err("removing errors", e))?;
    if batches {
        report.batch_values =
            execute(&tx, &Bound::new(&sql::PruneBatchValues { targets: &targets })).await.map_err(|e| err("forgetting batch values", e))?;
    }
    tx.commit().await.map_err(|e| err("committing the prune", e))?;
    report.pruned = true;
    Ok(PruneOutcome::Done(report))
}
