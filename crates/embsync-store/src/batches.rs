//! The Batch API's bookkeeping (see `embsync_core::batch_api` and `sql::batches`): a request
//! file and its values, the batch made of it and its state, and storing one request's vectors
//! from the output. Every write is fenced by the lease, like the sync's.
//!
//! The `Store` trait's Batch API methods delegate here (see `embsync_core::batch_flow` for the
//! driver).

use super::*;
use embsync_core::batch_flow::{OpenBatch, RequestStored, SourceStored};
use embsync_core::config::ModelSlot;
use embsync_core::sql::BatchValue;

/// The one int8 of a counting statement.
async fn count_of(tx: &tokio_postgres::Transaction<'_>, statement: &sql::CompleteAmong<'_>) -> Result<u64, StoreError> {
    let rows = query(tx, &Bound::new(statement)).await.map_err(|e| err("counting complete values", e))?;
    Ok(rows.first().map_or(0, |row| row.get::<_, i64>(0).max(0) as u64))
}

fn slot_of(text: &str) -> Result<ModelSlot, StoreError> {
    match text {
        "large" => Ok(ModelSlot::Large),
        "small" => Ok(ModelSlot::Small),
        other => Err(StoreError::new(format!("bad model slot {other:?} in embedding_sync_batches"))),
    }
}

impl PgStore {
    /// The tag of `slot`'s configured model.
    fn tag(&self, slot: ModelSlot) -> &str {
        match slot {
            ModelSlot::Large => &self.tags.large,
            ModelSlot::Small => &self.tags.small,
        }
    }

    /// Records an uploaded request file of `requests` requests for `slot`'s model, with the
    /// values of each request, in one fenced transaction. Recorded before the batch is created,
    /// so an invocation cut between the two leaves the file to find the batch by.
    ///
    /// # Errors
    /// [`StoreError`], a lost lease included.
    pub(crate) async fn pg_record_batch_file(
        &mut self,
        input_file_id: &str,
        run: &RunId,
        slot: ModelSlot,
        requests: u64,
        values: &[BatchValue<'_>],
    ) -> Result<(), StoreError> {
        let model = self.tag(slot).to_owned();
        let file = sql::InsertBatchFile { input_file_id, run, slot, model: &model, requests, values: values.len() as u64 };
        let rows = sql::InsertBatchValues { input_file_id, values };
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording a batch file").await?;
        execute(&tx, &Bound::new(&file)).await.map_err(|e| err("recording the batch file", e))?;
        execute(&tx, &Bound::new(&rows)).await.map_err(|e| err("recording the batch's values", e))?;
        tx.commit().await.map_err(|e| err("committing the batch file", e))
    }

    /// Records the batch created from a file.
    ///
    /// # Errors
    /// [`StoreError`], a lost lease included.
    pub(crate) async fn pg_set_batch_created(&mut self, input_file_id: &str, batch_id: &str) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording a created batch").await?;
        execute(&tx, &Bound::new(&sql::SetBatchCreated { input_file_id, batch_id })).await.map_err(|e| err("recording the batch", e))?;
        tx.commit().await.map_err(|e| err("committing the batch", e))
    }

    /// Records a batch's state as polled, or that embsync is done with it (`finished`): then
    /// the values still recorded for it (requests not stored) are forgotten in the same
    /// transaction, and go the synchronous way.
    ///
    /// # Errors
    /// [`StoreError`], a lost lease included.
    pub(crate) async fn pg_set_batch_state(&mut self, state: &sql::SetBatchState<'_>) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording a batch's state").await?;
        execute(&tx, &Bound::new(state)).await.map_err(|e| err("recording the batch's state", e))?;
        if state.finished {
            let values = sql::DeleteBatchValues { batch_id: state.batch_id };
            execute(&tx, &Bound::new(&values)).await.map_err(|e| err("forgetting the batch's values", e))?;
        }
        tx.commit().await.map_err(|e| err("committing the batch's state", e))
    }

    /// Ends a file no batch was made of (`state`, e.g. `abandoned`); its values go the
    /// synchronous way.
    ///
    /// # Errors
    /// [`StoreError`], a lost lease included.
    pub(crate) async fn pg_finish_batch_file(&mut self, input_file_id: &str, state: &str) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "ending a batch file").await?;
        execute(&tx, &Bound::new(&sql::FinishBatchFile { input_file_id, state })).await.map_err(|e| err("ending the batch file", e))?;
        tx.commit().await.map_err(|e| err("committing", e))
    }

    /// Records a request the batch refused because of its inputs (a per-line error): each of its
    /// values that its source still has goes to `embedding_sync_errors` for that source, as a
    /// refused value of the synchronous path does (`model`: the model's tag; with the same
    /// backoff), and the request is forgotten, in one fenced transaction. Returns the values
    /// recorded.
    ///
    /// # Errors
    /// [`StoreError`], a lost lease included.
    pub(crate) async fn pg_record_batch_request_errors(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        message: &str,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording a batch request's errors").await?;
        let model = query(&tx, &Bound::new(&sql::BatchModel { input_file_id })).await.map_err(|e| err("reading the batch", e))?;
        let Some(model) = model.first() else {
            return Err(StoreError::new(format!("no batch file {input_file_id} is recorded")));
        };
        let model: String = model.get(1);
        let sources = query(&tx, &Bound::new(&sql::RequestSources { input_file_id, custom_id }))
            .await
            .map_err(|e| err("reading the request's sources", e))?;
        let mut recorded = Vec::new();
        for row in &sources {
            let (table, column): (String, String) = (row.get(0), row.get(1));
            let Some(source) = config.enabled_sources().find(|s| s.table_key() == table && s.column_key() == column) else {
                continue;
            };
            let rows = query(&tx, &Bound::new(&sql::RequestValues { source, input_file_id, custom_id }))
                .await
                .map_err(|e| err("reading the request's values", e))?;
            let mut failures: Vec<ValueFailure> = Vec::with_capacity(rows.len());
            for row in &rows {
                let h: String = row.get(1);
                let hash = ValueHash::from_hex(&h).ok_or_else(|| StoreError::new(format!("bad hash {h:?} from the database")))?;
                if failures.iter().all(|f| f.hash != hash) {
                    failures.push(ValueFailure { hash, model: model.clone(), message: message.to_owned() });
                }
            }
            if failures.is_empty() {
                continue;
            }
            let counted = query_one(&tx, &Bound::new(&sql::ErrorsThisRun { run, source, failures: &failures }))
                .await
                .map_err(|e| err("reading the run's errors", e))?
                .get::<_, i64>(0)
                .max(0) as u64;
            execute(&tx, &Bound::new(&sql::RecordErrors { source, failures: &failures })).await.map_err(|e| err("recording errors", e))?;
            // A value counts once per run, as on the synchronous way, whichever model refused it.
            let errors = (failures.len() as u64).saturating_sub(counted);
            execute(&tx, &Bound::new(&sql::AddErrors { run, source, errors })).await.map_err(|e| err("counting errors", e))?;
            recorded.push((table, column, errors));
        }
        let forget = sql::DeleteRequestValues { input_file_id, custom_id };
        execute(&tx, &Bound::new(&forget)).await.map_err(|e| err("forgetting the request", e))?;
        tx.commit().await.map_err(|e| err("committing a batch request's errors", e))?;
        Ok(recorded)
    }

    /// The request files embsync has not finished with, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub(crate) async fn pg_open_batches(&mut self) -> Result<Vec<OpenBatch>, StoreError> {
        let rows = self.client.query_typed(sql::OPEN_BATCHES, &[]).await.map_err(|e| err("listing the batches", e))?;
        rows.iter()
            .map(|row| {
                Ok(OpenBatch {
                    input_file_id: row.get(0),
                    batch_id: row.get(1),
                    run: RunId(row.get(2)),
                    slot: slot_of(row.get(3))?,
                    model: row.get(4),
                    state: row.get(5),
                    output_file_id: row.get(6),
                    error_file_id: row.get(7),
                    requests: row.get::<_, i32>(8).max(0) as u32,
                    values: row.get::<_, i32>(9).max(0) as u32,
                    age_secs: row.get(10),
                })
            })
            .collect()
    }

    /// Stores the vectors of request `custom_id` of file `input_file_id` (`vectors[i]` for the
    /// input at position `i`) in one fenced transaction: through the batch write
    /// ([`sql::UPSERT_BATCH`], which fills only a missing embedding or one of embsync's made by
    /// another model, and never another pipeline's), linking each value to the source it came
    /// from, for the values that source still has; then forgets the request, so reading the
    /// output again stores nothing twice. A request already stored, or whose file was built for
    /// another model than the slot's configured one, writes nothing (the latter's values go the
    /// synchronous way in a later run).
    ///
    /// # Errors
    /// [`StoreError`]: a lost lease, an unknown file, a vector missing for a position.
    pub(crate) async fn pg_store_batch_request(
        &mut self,
        config: &Config,
        run: &RunId,
        input_file_id: &str,
        custom_id: &str,
        vectors: &[Vector],
        prompt_tokens: u64,
    ) -> Result<RequestStored, StoreError> {
        let vector_array = self.vector_array_type().await?;
        let tags = self.tags.clone();
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "storing a batch's vectors").await?;
        let model = query(&tx, &Bound::new(&sql::BatchModel { input_file_id })).await.map_err(|e| err("reading the batch", e))?;
        let Some(model) = model.first() else {
            return Err(StoreError::new(format!("no batch file {input_file_id} is recorded")));
        };
        let slot = slot_of(model.get(0))?;
        let built_for: String = model.get(1);
        let forget = sql::DeleteRequestValues { input_file_id, custom_id };
        let current = match slot {
            ModelSlot::Large => &tags.large,
            ModelSlot::Small => &tags.small,
        };
        let mut outcome = RequestStored::default();
        if &built_for != current {
            execute(&tx, &Bound::new(&forget)).await.map_err(|e| err("forgetting the request", e))?;
            tx.commit().await.map_err(|e| err("committing", e))?;
            return Ok(RequestStored { model_changed: true, ..outcome });
        }
        let sources = query(&tx, &Bound::new(&sql::RequestSources { input_file_id, custom_id }))
            .await
            .map_err(|e| err("reading the request's sources", e))?;
        // The request's tokens count once, for the first of its sources (in config order) that
        // is enabled, whether or not a value of it is written (the provider was paid for it).
        let mut in_config: Vec<(&Source, String, String)> = Vec::new();
        for source in config.enabled_sources() {
            let (table, column) = (source.table_key(), source.column_key().to_owned());
            if sources.iter().any(|row| row.get::<_, String>(0) == table && row.get::<_, String>(1) == column) {
                in_config.push((source, table, column));
            }
        }
        let mut shares: Vec<SourceStored> = Vec::new();
        for (source, table, column) in in_config {
            let source: &Source = source;
            let rows = query(&tx, &Bound::new(&sql::RequestValues { source, input_file_id, custom_id }))
                .await
                .map_err(|e| err("reading the request's values", e))?;
            shares.push(SourceStored { table, column, ..Default::default() });
            let share = shares.last_mut().expect("just pushed");
            let mut seen = std::collections::HashSet::new();
            let mut batch = Vec::with_capacity(rows.len());
            for row in &rows {
                let position: i32 = row.get(0);
                let h: String = row.get(1);
                let hash = ValueHash::from_hex(&h).ok_or_else(|| StoreError::new(format!("bad hash {h:?} from the database")))?;
                let vector = usize::try_from(position).ok().and_then(|p| vectors.get(p)).ok_or_else(|| {
                    StoreError::new(format!("request {custom_id} of {input_file_id} has no vector for its input {position}"))
                })?;
                if !seen.insert(h) {
                    continue;
                }
                let (large, small) = match slot {
                    ModelSlot::Large => (Some(vector.clone()), None),
                    ModelSlot::Small => (None, Some(vector.clone())),
                };
                batch.push(EmbeddedValue { hash, value: row.get(2), occurrences: row.get(3), large, small, complete: false });
            }
            if batch.is_empty() {
                continue;
            }
            let upsert = sql::UpsertBatch { source, tags: &tags, batch: &batch };
            let link = sql::LinkValues { source, batch: &batch };
            let hashes: Vec<&str> = batch.iter().map(|v| v.hash.as_str()).collect();
            let complete = sql::CompleteAmong { hashes: &hashes, tags: &tags };
            let before = count_of(&tx, &complete).await?;
            execute(&tx, &Bound::with_vectors(&upsert, vector_array.clone())).await.map_err(|e| err("writing embeddings", e))?;
            execute(&tx, &Bound::new(&link)).await.map_err(|e| err("linking values", e))?;
            share.embedded = count_of(&tx, &complete).await?.saturating_sub(before);
            share.written = batch.len() as u64;
            outcome.written += batch.len() as u64;
        }
        let recorded = execute(&tx, &Bound::new(&forget)).await.map_err(|e| err("forgetting the request", e))?;
        if recorded > 0 {
            if let Some(first) = shares.first_mut() {
                (first.tokens, first.requests) = (prompt_tokens, 1);
            }
            for share in &shares {
                let progress = sql::AddBatchProgress {
                    run,
                    table: &share.table,
                    column: &share.column,
                    slot,
                    embedded: share.embedded,
                    tokens: share.tokens,
                    requests: share.requests,
                };
                execute(&tx, &Bound::new(&progress)).await.map_err(|e| err("counting the request in the run", e))?;
            }
            outcome.sources = shares;
        }
        tx.commit().await.map_err(|e| err("committing a batch request", e))?;
        outcome.gone = recorded.saturating_sub(outcome.written);
        self.written += outcome.written;
        Ok(outcome)
    }

    /// [`Store::batch_requests`].
    pub(crate) async fn pg_batch_requests(&mut self, input_file_id: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = query(&self.client, &Bound::new(&sql::BatchRequests { input_file_id }))
            .await
            .map_err(|e| err("reading a batch's requests", e))?;
        Ok(rows.iter().map(|row| (row.get(0), row.get::<_, i32>(1).max(0) as u32)).collect())
    }

    /// [`Store::awaited_values`].
    pub(crate) async fn pg_awaited_values(&mut self, source: &Source) -> Result<(u64, u64), StoreError> {
        let migrated = self.client.query_typed_one(sql::HAS_BATCH_TABLES, &[]).await.map_err(|e| err("reading the catalog", e))?;
        if !migrated.get::<_, bool>(0) {
            return Ok((0, 0));
        }
        let rows = query(&self.client, &Bound::new(&sql::AwaitedValues { source, tags: &self.tags }))
            .await
            .map_err(|e| err("counting the values pending batches bring", e))?;
        let mut awaited = (0, 0);
        for row in &rows {
            let n = row.get::<_, i64>(1).max(0) as u64;
            match slot_of(row.get(0))? {
                ModelSlot::Large => awaited.0 = n,
                ModelSlot::Small => awaited.1 = n,
            }
        }
        Ok(awaited)
    }
}
