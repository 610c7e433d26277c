//! The Batch API's driver flow (see [`crate::batch_api`] for the encoding): submitting a run's
//! values in batches at its plan, polling the open batches in later invocations, and reading
//! their output into the cache. Every write goes through the [`Store`], fenced by the lease.
//!
//! The steps, each crash-safe on its own:
//! 1. **Submit** ([`submit`], at a run's plan, before any source is planned): a model whose
//!    pending values (those a pending batch does not bring already) reach `batchApi.minValues`
//!    gets request files. Each file is uploaded, then recorded with its values
//!    ([`Store::record_batch_file`]) *before* its batch is created, then the batch id is
//!    recorded ([`Store::set_batch_created`]). A file uploaded but not recorded (a cut between
//!    the two) costs nothing: its values are still pending and the provider never runs it.
//! 2. **Poll** ([`service`], every invocation with a transport, before the sources): a file
//!    with no batch id (a cut between record and create) finds its batch in
//!    `GET /v1/batches` by its `input_file_id`, else creates it; a batch not over records its
//!    state; a batch the provider does not know (404) ends, its values going the synchronous
//!    way.
//! 3. **Read** an ended batch's output and error files, streamed line by line: a line's
//!    vectors are stored in one transaction with the run's counters
//!    ([`Store::store_batch_request`]), which forgets the request, so a cut mid-file resumes
//!    with the requests not stored yet; a line refused for its input records its values in
//!    the error table ([`Store::record_batch_request_errors`]); a line that never ran
//!    (expired, cancelled) or failed otherwise is left, and once both files are read the batch
//!    ends ([`Store::set_batch_state`] `finished`), which releases those values to the
//!    synchronous way (the next run's pending pages).
//!
//! A run that submitted batches stays open (status `paused`, [`RunReport::pending_batches`])
//! until every open batch is over; its report counts what came through batches, at the batch
//! price.
//!
//! [`RunReport::pending_batches`]: crate::report::RunReport::pending_batches

use std::collections::HashMap;

use crate::batch;
use crate::batch_api::{self, BatchApi, BatchStatus, Call, FileLimits, LineError, Lines, OutputLine};
use crate::config::{Config, ModelSlot, Source};
use crate::hash::ValueHash;
use crate::log::LogEvent;
use crate::provider::ProviderError;
use crate::sql::{BatchValue, SetBatchState};
use crate::sync::{RetryPolicy, RunId, RunState, Runtime, Store, StoreError};

/// Pending values read per page while the values are gathered for the Batch API (a page of
/// the source's values, not of a run's snapshot, is a scan of the source).
pub const GATHER_PAGE: usize = 50_000;

/// Pages of `GET /v1/batches` (of [`LIST_PAGE`]) searched for the batch of a file whose batch
/// id was not recorded.
pub const LIST_PAGES: u32 = 10;

/// Batches per page of `GET /v1/batches`.
pub const LIST_PAGE: u32 = 100;

/// How long a file recorded without its batch id is looked up before it is given up (its values
/// go the synchronous way): twice the completion window, so any batch made of it has ended.
pub const GIVE_UP_LOOKUP_SECS: f64 = 48.0 * 3600.0;

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Per source of the request (table key, column key): values written, and whether the
    /// request's tokens were counted for it (the first source of the config it has; none when
    /// the request was stored already).
    pub sources: Vec<SourceStored>,
}

/// A source's share of a stored request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStored {
    /// [`Source::table_key`].
    pub table: String,
    /// [`Source::column_key`].
    pub column: String,
    /// Values written for it.
    pub written: u64,
    /// Of those, the values the write completed (both embeddings now): the run's `embedded`.
    pub embedded: u64,
    /// The request's tokens, when they were counted for this source (else 0).
    pub tokens: u64,
    /// 1 when the request was counted for this source, else 0.
    pub requests: u64,
}

/// One provider call with the driver's retries: a retryable error (429, 5xx, no answer) is
/// tried again after the policy's backoff, up to its attempts.
async fn with_retries<'a, T, R: Runtime>(rt: &R, retry: RetryPolicy, mut call: impl FnMut() -> Call<'a, T>) -> Result<T, ProviderError> {
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(answer) => return Ok(answer),
            Err(e) if e.is_retryable() && attempt + 1 < retry.max_attempts => {
                rt.sleep(retry.delay(attempt, e.retry_after(), rt.random())).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A value gathered for a batch.
struct Gathered {
    hash: ValueHash,
    value: String,
    occurrences: i32,
}

/// Submits, for each model whose pending values (over all `sources`, those a pending batch
/// brings left out) reach `batchApi.minValues`, its values in batches: build, upload, record,
/// create (once: a create whose answer is lost may have made the batch), record the id, file
/// after file. A failed upload leaves the model's values not submitted yet to the synchronous
/// way, a failed create leaves the recorded file to the next invocation; only a store error
/// stops it.
///
/// Two passes of pending pages: one counts each model's values, and for the models that go the
/// Batch API's way one gathers them source by source, a file's worth at a time (at most
/// [`FileLimits::WORKER`]'s inputs held per model), so a backfill of any size fits a Worker's
/// memory. A source's files are recorded before the next source's pages are read, which then
/// leave out the values they share (a pending batch brings them).
///
/// # Errors
/// [`StoreError`] (a lost lease included).
pub async fn submit<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    api: &dyn BatchApi,
    rt: &R,
    retry: RetryPolicy,
    run: &RunId,
    sources: &[&Source],
) -> Result<(), StoreError> {
    let Some(settings) = config.batch_api else { return Ok(()) };
    let mut counts = [0u64; 2];
    for source in sources {
        pages(store, run, source, |v| {
            for (n, has) in counts.iter_mut().zip([v.has_large, v.has_small]) {
                *n += u64::from(!has);
            }
        })
        .await?;
    }
    let mut going = [false; 2];
    for slot in ModelSlot::ALL {
        let n = counts[slot_index(slot)];
        going[slot_index(slot)] = n >= settings.min_values;
        if n >= settings.min_values {
            let model = config.models.get(slot);
            rt.log(
                LogEvent::info(
                    "batch_api",
                    format!(
                        "Model {}: {n} pending values go through the Batch API (batchApi.minValues {})",
                        model.name(),
                        settings.min_values
                    ),
                )
                .run(&run.0)
                .field("model", model.name())
                .field("values", n),
            );
        }
    }
    if going == [false; 2] {
        return Ok(());
    }
    let mut seq = [0u64; 2];
    for source in sources {
        if going == [false; 2] {
            break;
        }
        let (table, column) = (source.table_key(), source.column_key().to_owned());
        let mut held: [Vec<Gathered>; 2] = [Vec::new(), Vec::new()];
        let mut after: Option<ValueHash> = None;
        loop {
            let page = store.pending(source, run, after.as_ref(), GATHER_PAGE).await?;
            let full = page.len() == GATHER_PAGE;
            after = page.last().map(|v| v.hash.clone());
            for v in page {
                if batch::too_long(&v.value) {
                    continue;
                }
                let lacks = [going[0] && !v.has_large, going[1] && !v.has_small];
                match lacks {
                    [false, false] => {}
                    [true, true] => {
                        held[0].push(Gathered { hash: v.hash.clone(), value: v.value.clone(), occurrences: v.occurrences });
                        held[1].push(Gathered { hash: v.hash, value: v.value, occurrences: v.occurrences });
                    }
                    [l, _] => held[usize::from(!l)].push(Gathered { hash: v.hash, value: v.value, occurrences: v.occurrences }),
                }
            }
            for slot in ModelSlot::ALL {
                let i = slot_index(slot);
                let last = !full;
                if going[i] && (last || held[i].len() >= FileLimits::WORKER.max_inputs) {
                    let target = SubmitTarget { run, slot, table: &table, column: &column };
                    going[i] = submit_files(config, store, api, rt, retry, &target, &mut held[i], &mut seq[i], last).await?;
                }
            }
            if !full {
                break;
            }
        }
    }
    Ok(())
}

/// Where [`submit_files`]'s values belong.
struct SubmitTarget<'a> {
    run: &'a RunId,
    slot: ModelSlot,
    table: &'a str,
    column: &'a str,
}

/// Builds and submits files of `held` (all of them when `last`, else whole files only), each
/// numbered on from `seq`; the values submitted leave `held`. Whether the model goes on the
/// Batch API's way (not after a failed upload: its values go the synchronous way).
#[allow(clippy::too_many_arguments)]
async fn submit_files<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    api: &dyn BatchApi,
    rt: &R,
    retry: RetryPolicy,
    target: &SubmitTarget<'_>,
    held: &mut Vec<Gathered>,
    seq: &mut u64,
    last: bool,
) -> Result<bool, StoreError> {
    let (run, slot) = (target.run, target.slot);
    let model = config.models.get(slot);
    let mut offset = 0;
    while offset < held.len() {
        let texts: Vec<&str> = held[offset..].iter().map(|g| g.value.as_str()).collect();
        let file = batch_api::build_file(run, slot, model, &texts, *seq, FileLimits::WORKER);
        drop(texts);
        if file.requests.is_empty() || (!last && file.taken == held.len() - offset && file.taken < FileLimits::WORKER.max_inputs) {
            // Not a whole file yet: it waits for more values.
            break;
        }
        let name = format!("embsync-{}-{}-{}.jsonl", run.0, slot.key(), *seq);
        let upload = batch_api::upload_body(&name, &file.jsonl);
        let input_file_id = match with_retries(rt, retry, || api.upload(&upload)).await {
            Ok(id) => id,
            Err(e) => {
                rt.log(
                    LogEvent::warn(
                        "batch_api",
                        format!("Could not upload a request file for {} ({e}); its values go the synchronous way", model.name()),
                    )
                    .run(&run.0),
                );
                held.clear();
                return Ok(false);
            }
        };
        drop(upload);
        let ids: Vec<String> = file.requests.iter().map(|r| r.custom_id.to_string()).collect();
        let mut values = Vec::with_capacity(file.taken);
        for (request, id) in file.requests.iter().zip(&ids) {
            for (position, at) in request.values.clone().enumerate() {
                let g = &held[offset + at];
                values.push(BatchValue {
                    custom_id: id,
                    position: position as i32,
                    hash: &g.hash,
                    value: &g.value,
                    occurrences: g.occurrences,
                    source_table: target.table,
                    source_column: target.column,
                });
            }
        }
        store.record_batch_file(&input_file_id, run, slot, file.requests.len() as u64, &values).await?;
        drop(values);
        // Created once, without retries: a create whose answer was lost may have made the
        // batch, and a second would be paid twice. The next invocation looks for it first.
        let body = batch_api::create_body(&input_file_id, run);
        match api.create(&body).await {
            Ok(created) => store.set_batch_created(&input_file_id, &created.id).await?,
            Err(e) => rt.log(
                LogEvent::warn(
                    "batch_api",
                    format!("Could not create the batch of file {input_file_id} ({e}); the next invocation finds or creates it"),
                )
                .run(&run.0),
            ),
        }
        rt.log(
            LogEvent::info(
                "batch_api",
                format!("File {input_file_id}: {} requests, {} values of {}", file.requests.len(), file.taken, model.name()),
            )
            .run(&run.0)
            .field("file", &input_file_id),
        );
        offset += file.taken;
        *seq += file.requests.len() as u64;
    }
    held.drain(..offset);
    Ok(true)
}

fn slot_index(slot: ModelSlot) -> usize {
    match slot {
        ModelSlot::Large => 0,
        ModelSlot::Small => 1,
    }
}

/// Calls `each` with every pending value of `source` (not too long to send), page by page.
async fn pages<S: Store>(
    store: &mut S,
    run: &RunId,
    source: &Source,
    mut each: impl FnMut(&crate::sync::PendingValue),
) -> Result<(), StoreError> {
    let mut after: Option<ValueHash> = None;
    loop {
        let page = store.pending(source, run, after.as_ref(), GATHER_PAGE).await?;
        for v in page.iter().filter(|v| !batch::too_long(&v.value)) {
            each(v);
        }
        if page.len() < GATHER_PAGE {
            return Ok(());
        }
        after = page.last().map(|v| v.hash.clone());
    }
}

/// How reading a file ended.
enum ReadEnd {
    /// Read to its end.
    Done,
    /// The file could not be fetched, or broke off.
    Broken(ProviderError),
    /// The invocation's time is up: the rest waits for the next one.
    OutOfTime,
}

/// Polls every open batch and reads the output of those that ended (see the module's steps),
/// adding what it stores to `run`'s sources (`config`'s enabled sources, in order). Reading
/// stops at `deadline_ms` (the invocation's time budget, on `rt`'s clock); the next invocation
/// goes on. Returns how many ended batches are left partly read.
///
/// # Errors
/// [`StoreError`] (a lost lease included); a provider error only leaves the batch for the next
/// invocation.
#[allow(clippy::too_many_arguments)]
pub async fn service<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    api: &dyn BatchApi,
    rt: &R,
    retry: RetryPolicy,
    run: &mut RunState,
    deadline_ms: f64,
) -> Result<u64, StoreError> {
    let mut unread = 0;
    for open in store.open_batches().await? {
        if rt.now_ms() >= deadline_ms {
            break;
        }
        if service_one(config, store, api, rt, retry, run, &open, deadline_ms).await? == Left::Unread {
            unread += 1;
        }
    }
    Ok(unread)
}

/// What [`service_one`] left of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// Nothing: embsync is done with it.
    Nothing,
    /// It is not over, or could not be polled.
    Open,
    /// It is over and its files are not read to their end.
    Unread,
}

/// One open batch.
#[allow(clippy::too_many_arguments)]
async fn service_one<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    api: &dyn BatchApi,
    rt: &R,
    retry: RetryPolicy,
    run: &mut RunState,
    open: &OpenBatch,
    deadline_ms: f64,
) -> Result<Left, StoreError> {
    let log_run = run.id.0.clone();
    let warn = |message: String| rt.log(LogEvent::warn("batch_api", message).run(&log_run).field("file", &open.input_file_id));
    let batch_id = match &open.batch_id {
        Some(id) => id.clone(),
        None => match find_or_create(store, api, rt, retry, open).await? {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(Left::Nothing),
            Err(e) => {
                warn(format!("Could not find or create the batch of file {} ({e}); the next invocation tries again", open.input_file_id));
                return Ok(Left::Open);
            }
        },
    };
    let batch = match with_retries(rt, retry, || api.retrieve(&batch_id)).await {
        Ok(batch) => batch,
        Err(e) if batch_api::is_not_found(&e) => {
            warn(format!("The provider does not know batch {batch_id} any more; its values go the synchronous way"));
            end(store, &batch_id, "unknown", None, None, "{}").await?;
            return Ok(Left::Nothing);
        }
        Err(e) => {
            warn(format!("Could not poll batch {batch_id} ({e}); the next invocation polls it again"));
            return Ok(Left::Open);
        }
    };
    let c = batch.request_counts;
    let counts = format!(r#"{{"total": {}, "completed": {}, "failed": {}}}"#, c.total, c.completed, c.failed);
    let (output, errors) = (batch.output_file_id.as_deref(), batch.error_file_id.as_deref());
    if !batch.status.is_over() {
        let state = SetBatchState {
            batch_id: &batch_id,
            state: batch.status.name(),
            output_file_id: output,
            error_file_id: errors,
            request_counts: &counts,
            finished: false,
        };
        store.set_batch_state(&state).await?;
        return Ok(Left::Open);
    }
    if batch.status == BatchStatus::Failed {
        warn(format!("Batch {batch_id} failed ({}); its values go the synchronous way", batch.errors.join("; ")));
    }
    // The output first, then the error file; a cut in either leaves the batch open, and the
    // next invocation reads again what is not stored.
    for file in [output, errors].into_iter().flatten() {
        match read_file(config, store, api, rt, retry, run, open, file, deadline_ms).await? {
            ReadEnd::Done => {}
            ReadEnd::Broken(e) => {
                warn(format!("Reading file {file} of batch {batch_id} stopped ({e}); the next invocation goes on with what is not stored"));
                return Ok(Left::Unread);
            }
            ReadEnd::OutOfTime => return Ok(Left::Unread),
        }
    }
    // Every completed request's line was read (and its request forgotten) unless the download
    // ended early at a line boundary, which looks like the end of the file: then the batch stays
    // open and the next invocation reads the output again, rather than release the unread
    // requests to the synchronous way and pay for them twice.
    if output.is_some() {
        let left = store.batch_requests(&open.input_file_id).await?.len() as u64;
        let unrun = c.total.saturating_sub(c.completed);
        if left > unrun {
            warn(format!(
                "Batch {batch_id}'s output ended with {left} requests not stored, more than the {unrun} that did not complete \
                 (request_counts {counts}): the download was cut; the next invocation reads it again"
            ));
            return Ok(Left::Unread);
        }
    }
    end(store, &batch_id, batch.status.name(), output, errors, &counts).await?;
    rt.log(
        LogEvent::info(
            "batch_api",
            format!("Batch {batch_id} is {} and read; what it did not bring goes the synchronous way", batch.status.name()),
        )
        .run(&run.id.0)
        .field("batch", &batch_id)
        .field("requestCounts", [c.total, c.completed, c.failed]),
    );
    // Cleanup: the provider keeps files for a while; embsync needs them no more.
    for file in [Some(open.input_file_id.as_str()), output, errors].into_iter().flatten() {
        if let Err(e) = api.delete_file(file).await {
            if !batch_api::is_not_found(&e) {
                warn(format!("Could not delete file {file} at the provider ({e}); it expires there by itself"));
            }
        }
    }
    Ok(Left::Nothing)
}

/// Records that embsync is done with a batch: its values still recorded go the synchronous way.
async fn end<S: Store>(
    store: &mut S,
    batch_id: &str,
    state: &str,
    output: Option<&str>,
    errors: Option<&str>,
    counts: &str,
) -> Result<(), StoreError> {
    let state = SetBatchState { batch_id, state, output_file_id: output, error_file_id: errors, request_counts: counts, finished: true };
    store.set_batch_state(&state).await
}

/// The batch of a file recorded without one (an invocation stopped between upload and create):
/// found in the key's batches by its `input_file_id`, else created now. `Ok(None)` when the
/// provider refuses to make one of it (the file ends, its values go the synchronous way).
async fn find_or_create<S: Store, R: Runtime>(
    store: &mut S,
    api: &dyn BatchApi,
    rt: &R,
    retry: RetryPolicy,
    open: &OpenBatch,
) -> Result<Result<Option<String>, ProviderError>, StoreError> {
    let mut after: Option<String> = None;
    for _ in 0..LIST_PAGES {
        let page = match with_retries(rt, retry, || api.list(after.as_deref(), LIST_PAGE)).await {
            Ok(page) => page,
            Err(e) if open.age_secs > GIVE_UP_LOOKUP_SECS => {
                // Any batch made of it has ended long ago; the run must not wait forever.
                rt.log(
                    LogEvent::error(
                        "batch_api",
                        format!(
                            "The batch of file {} could not be looked up for {} hours ({e}); its values go the synchronous way",
                            open.input_file_id,
                            GIVE_UP_LOOKUP_SECS / 3600.0
                        ),
                    )
                    .run(&open.run.0),
                );
                store.finish_batch_file(&open.input_file_id, "abandoned").await?;
                return Ok(Ok(None));
            }
            Err(e) => return Ok(Err(e)),
        };
        if let Some(found) = page.data.iter().find(|b| b.input_file_id == open.input_file_id) {
            store.set_batch_created(&open.input_file_id, &found.id).await?;
            return Ok(Ok(Some(found.id.clone())));
        }
        match (page.has_more, page.last_id) {
            (true, Some(last)) => after = Some(last),
            _ => break,
        }
    }
    // Once, as at the submission: the next invocation looks again before another create.
    let body = batch_api::create_body(&open.input_file_id, &open.run);
    match api.create(&body).await {
        Ok(created) => {
            store.set_batch_created(&open.input_file_id, &created.id).await?;
            Ok(Ok(Some(created.id)))
        }
        Err(e) if !e.is_retryable() && !matches!(e, ProviderError::Unauthorized { .. }) => {
            rt.log(
                LogEvent::warn(
                    "batch_api",
                    format!("No batch could be made of file {} ({e}); its values go the synchronous way", open.input_file_id),
                )
                .run(&open.run.0),
            );
            store.finish_batch_file(&open.input_file_id, "abandoned").await?;
            Ok(Ok(None))
        }
        Err(e) => Ok(Err(e)),
    }
}

/// Reads one output or error file of `open`'s batch, streamed, storing each request not stored
/// yet, until its end or `deadline_ms`.
#[allow(clippy::too_many_arguments)]
async fn read_file<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    api: &dyn BatchApi,
    rt: &R,
    retry: RetryPolicy,
    run: &mut RunState,
    open: &OpenBatch,
    file_id: &str,
    deadline_ms: f64,
) -> Result<ReadEnd, StoreError> {
    let waiting: HashMap<String, u32> = store.batch_requests(&open.input_file_id).await?.into_iter().collect();
    if waiting.is_empty() {
        return Ok(ReadEnd::Done);
    }
    let mut stream = match with_retries(rt, retry, || api.content(file_id)).await {
        Ok(stream) => stream,
        Err(e) => return Ok(ReadEnd::Broken(e)),
    };
    let dimensions = config.models.get(open.slot).dimensions();
    let mut lines = Lines::new();
    let mut ready: Vec<Vec<u8>> = Vec::new();
    loop {
        let chunk = match stream.next_chunk().await {
            Ok(chunk) => chunk,
            Err(e) => return Ok(ReadEnd::Broken(e)),
        };
        let last = chunk.is_none();
        let collect = |line: &[u8]| -> Result<(), batch_api::LineTooLong> {
            ready.push(line.to_vec());
            Ok(())
        };
        let cut = match chunk {
            Some(chunk) => lines.push(&chunk, collect),
            None => std::mem::take(&mut lines).finish(collect),
        };
        if let Err(e) = cut {
            return Ok(ReadEnd::Broken(ProviderError::Malformed(e.to_string())));
        }
        for line in ready.drain(..) {
            store_line(config, store, rt, run, open, &waiting, dimensions, &line).await?;
            if rt.now_ms() >= deadline_ms {
                return Ok(ReadEnd::OutOfTime);
            }
        }
        if last {
            return Ok(ReadEnd::Done);
        }
    }
}

/// One line of an output or error file.
#[allow(clippy::too_many_arguments)]
async fn store_line<S: Store, R: Runtime>(
    config: &Config,
    store: &mut S,
    rt: &R,
    run: &mut RunState,
    open: &OpenBatch,
    waiting: &HashMap<String, u32>,
    dimensions: u32,
    line: &[u8],
) -> Result<(), StoreError> {
    let parsed = match OutputLine::parse(line) {
        Ok(parsed) => parsed,
        Err(e) => {
            rt.log(LogEvent::warn("batch_api", format!("Skipped a line of batch file {}: {e}", open.input_file_id)).run(&run.id.0));
            return Ok(());
        }
    };
    let custom_id = parsed.custom_id.to_string();
    // A request stored already (before a cut), or not of this file.
    let Some(&inputs) = waiting.get(&custom_id) else { return Ok(()) };
    match parsed.decode(inputs as usize, dimensions) {
        Ok(embeddings) => {
            let stored = store
                .store_batch_request(config, &run.id, &open.input_file_id, &custom_id, &embeddings.vectors, embeddings.prompt_tokens)
                .await?;
            let keys: Vec<(String, String)> = config.enabled_sources().map(|s| (s.table_key(), s.column_key().to_owned())).collect();
            for s in &stored.sources {
                let Some(i) = keys.iter().position(|(t, c)| *t == s.table && *c == s.column) else { continue };
                let Some(state) = run.sources.get_mut(i) else { continue };
                state.report.embedded += s.embedded;
                let usage = match open.slot {
                    ModelSlot::Large => &mut state.usage.0,
                    ModelSlot::Small => &mut state.usage.1,
                };
                usage.prompt_tokens += s.tokens;
                usage.batch_prompt_tokens += s.tokens;
                usage.requests += s.requests;
                usage.batch_requests += s.requests;
            }
        }
        Err(LineError::Provider(e @ ProviderError::Rejected { .. })) => {
            let recorded = store.record_batch_request_errors(config, &run.id, &open.input_file_id, &custom_id, &e.to_string()).await?;
            let keys: Vec<(String, String)> = config.enabled_sources().map(|s| (s.table_key(), s.column_key().to_owned())).collect();
            for (table, column, n) in recorded {
                if let Some(state) = keys.iter().position(|(t, c)| *t == table && *c == column).and_then(|i| run.sources.get_mut(i)) {
                    state.report.errors += n;
                }
            }
        }
        // Not run (expired, cancelled), failed otherwise, or malformed: its values go the
        // synchronous way once the batch ends.
        Err(_) => {}
    }
    Ok(())
}
