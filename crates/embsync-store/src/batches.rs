//! The Batch API's bookkeeping (see `embsync_core::batch_api` and `sql::batches`): a request
//! file and its values, the batch made of it and its state, and storing one request's vectors
//! from the output. Every write is fenced by the lease, like the sync's.
//!
//! These are `PgStore`'s own methods, not yet the `Store` trait's: the driver that submits,
//! polls and ingests batches is still to come.

use super::*;
use embsync_core::config::ModelSlot;
use embsync_core::sql::BatchValue;

/// A request file embsync has not finished with.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenBatch {
    /// The provider's id of the uploaded file (the record's key).
    pub input_file_id: String,
    /// The batch made of it; `None` when the invocation stopped between upload and create.
    pub batch_id: Option<String>,
    /// The run that built it.
    pub run: RunId,
    /// The model slot.
    pub slot: ModelSlot,
    /// The model tag it was built for.
    pub model: String,
    /// The state last seen (`uploaded`, then the provider's status).
    pub state: String,
    /// Its output file, once known.
    pub output_file_id: Option<String>,
    /// Its error file, once known.
    pub error_file_id: Option<String>,
    /// Its requests.
    pub requests: u32,
    /// Its values.
    pub values: u32,
    /// Seconds since it was recorded.
    pub age_secs: f64,
}

/// What storing one request's vectors did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestStored {
    /// Values whose vector went through the batch write (a value already done keeps its
    /// vector: the write fills only what is missing or was made by another model).
    pub written: u64,
    /// Values recorded for the request that their source no longer has (or whose source left
    /// the config): not written.
    pub gone: u64,
    /// The request's values were left unwritten because the model of the slot changed since
    /// the file was built.
    pub model_changed: bool,
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
    pub async fn record_batch_file(
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
    pub async fn set_batch_created(&mut self, input_file_id: &str, batch_id: &str) -> Result<(), StoreError> {
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
    pub async fn set_batch_state(&mut self, state: &sql::SetBatchState<'_>) -> Result<(), StoreError> {
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
    pub async fn finish_batch_file(&mut self, input_file_id: &str, state: &str) -> Result<(), StoreError> {
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
    pub async fn record_batch_request_errors(
        &mut self,
        config: &Config,
        input_file_id: &str,
        custom_id: &str,
        message: &str,
    ) -> Result<u64, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "recording a batch request's errors").await?;
        let model = query(&tx, &Bound::new(&sql::BatchModel { input_file_id })).await.map_err(|e| err("reading the batch", e))?;
        let Some(model) = model.first() else {
            return Err(StoreError::new(format!("no batch file {input_file_id} is recorded")));
        };
        let model: String = model.get(1);
        let sources = query(&tx, &Bound::new(&sql::RequestSources { input_file_id, custom_id }))
            .await
            .map_err(|e| err("reading the request's sources", e))?;
        let mut recorded = 0;
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
            execute(&tx, &Bound::new(&sql::RecordErrors { source, failures: &failures })).await.map_err(|e| err("recording errors", e))?;
            recorded += failures.len() as u64;
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
    pub async fn open_batches(&mut self) -> Result<Vec<OpenBatch>, StoreError> {
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
    pub async fn store_batch_request(
        &mut self,
        config: &Config,
        input_file_id: &str,
        custom_id: &str,
        vectors: &[Vector],
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
        for row in &sources {
            let (table, column): (String, String) = (row.get(0), row.get(1));
            let Some(source) = config.enabled_sources().find(|s| s.table_key() == table && s.column_key() == column) else {
                continue;
            };
            let rows = query(&tx, &Bound::new(&sql::RequestValues { source, input_file_id, custom_id }))
                .await
                .map_err(|e| err("reading the request's values", e))?;
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
            execute(&tx, &Bound::with_vectors(&upsert, vector_array.clone())).await.map_err(|e| err("writing embeddings", e))?;
            execute(&tx, &Bound::new(&link)).await.map_err(|e| err("linking values", e))?;
            outcome.written += batch.len() as u64;
        }
        let recorded = execute(&tx, &Bound::new(&forget)).await.map_err(|e| err("forgetting the request", e))?;
        tx.commit().await.map_err(|e| err("committing a batch request", e))?;
        outcome.gone = recorded.saturating_sub(outcome.written);
        self.written += outcome.written;
        Ok(outcome)
    }
}
