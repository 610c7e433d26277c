//! OpenAI's Batch API for embeddings, as pure encode and decode: which way a model's pending
//! values go, the JSONL request files, the output file read one line at a time, and the price.
//!
//! A request file holds one model's `POST /v1/embeddings` requests, one JSON line each:
//! `{"custom_id", "method": "POST", "url": "/v1/embeddings", "body"}`. Its requests are packed
//! like the embeddings endpoint's ([`crate::batch::pack`]: 2,048 inputs and 300,000
//! conservative tokens at most), and fewer inputs when the vectors of one answer would pass
//! [`MAX_VECTOR_BYTES_PER_BATCH`], so one output line stays within what a batch of the
//! synchronous path holds. A file stops at [`FileLimits`]: OpenAI's 50,000 requests, 50,000
//! inputs and 200 MB, and a byte size the worker can hold ([`FileLimits::WORKER`]). A
//! request's `custom_id` ([`CustomId`]) names the run, the model slot and a sequence number;
//! the values of each request are recorded in Postgres, not in the id.
//!
//! The output (and error) file is read as it arrives: [`Lines`] cuts the chunks into lines,
//! holding only an unfinished line, and [`OutputLine::parse`] reads one line, whose response
//! body goes to [`crate::provider::decode_response`] (the same decoder, fast path and
//! errors as the synchronous answers). The whole file is never needed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::batch::{self, MAX_INPUTS_PER_REQUEST, MAX_TOKENS_PER_REQUEST, MAX_VECTOR_BYTES_PER_BATCH};
use crate::config::{Config, ModelSlot, ModelSpec};
use crate::provider::{EmbeddingRequest, Embeddings, EncodingFormat, ProviderError};
use crate::sync::RunId;

/// The endpoint of every request in a file.
pub const ENDPOINT: &str = "/v1/embeddings";

/// The only completion window OpenAI offers.
pub const COMPLETION_WINDOW: &str = "24h";

/// The Batch API's price as a share of the list price.
pub const PRICE_FACTOR: f64 = 0.5;

/// The longest output line [`Lines`] holds (a line of 2,048 vectors of 3,072 floats in JSON
/// text is about 80 MB; ours, base64 and at most [`MAX_VECTOR_BYTES_PER_BATCH`] of vectors,
/// about 11 MB).
pub const MAX_LINE_BYTES: usize = 32 << 20;

/// Which way a model's pending values go in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Way {
    /// `POST /v1/embeddings`, batch by batch.
    Embeddings,
    /// The Batch API: request files, a batch, its output read later.
    BatchApi,
}

/// The way for a model with `pending` values: the Batch API when `batchApi` is on and they
/// reach its `minValues`.
pub fn way(config: &Config, pending: u64) -> Way {
    match config.batch_api {
        Some(batch_api) if pending >= batch_api.min_values => Way::BatchApi,
        _ => Way::Embeddings,
    }
}

/// The Batch API's price of a model, in US dollars per million tokens.
pub fn batch_price_per_million(model: &ModelSpec) -> f64 {
    model.price_per_million() * PRICE_FACTOR
}

/// A request's `custom_id`: `embsync:{run}:{large|small}:{seq}`. The run may itself hold `:`;
/// the id is read from the right.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomId {
    /// The run that built the request.
    pub run: RunId,
    /// The model slot it is for.
    pub slot: ModelSlot,
    /// Its number within the run and slot.
    pub seq: u64,
}

impl fmt::Display for CustomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "embsync:{}:{}:{}", self.run.0, self.slot.key(), self.seq)
    }
}

/// A `custom_id` that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("custom_id {0:?} is not one embsync made (embsync:RUN:large|small:SEQ)")]
pub struct ForeignCustomId(pub String);

impl FromStr for CustomId {
    type Err = ForeignCustomId;

    fn from_str(text: &str) -> Result<CustomId, ForeignCustomId> {
        let foreign = || ForeignCustomId(text.to_owned());
        let rest = text.strip_prefix("embsync:").ok_or_else(foreign)?;
        let mut parts = rest.rsplitn(3, ':');
        let seq = parts.next().and_then(|seq| seq.parse::<u64>().ok()).ok_or_else(foreign)?;
        let slot = match parts.next() {
            Some("large") => ModelSlot::Large,
            Some("small") => ModelSlot::Small,
            _ => return Err(foreign()),
        };
        let run = parts.next().filter(|run| !run.is_empty()).ok_or_else(foreign)?;
        Ok(CustomId { run: RunId(run.to_owned()), slot, seq })
    }
}

/// How large one request file may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimits {
    /// Requests (lines).
    pub max_requests: usize,
    /// Embedding inputs over all requests.
    pub max_inputs: usize,
    /// Bytes of JSONL.
    pub max_bytes: usize,
}

impl FileLimits {
    /// OpenAI's limits: 50,000 requests, 50,000 embedding inputs, 200 MB.
    pub const OPENAI: FileLimits = FileLimits { max_requests: 50_000, max_inputs: 50_000, max_bytes: 200_000_000 };

    /// What the worker builds: OpenAI's limits, and at most 8 MiB, since the file is held in a
    /// Worker's 128 MB while it is uploaded, with the multipart body made of it and fetch's copy
    /// (three copies: 24 MiB at most). More, smaller files cost nothing more at the provider.
    pub const WORKER: FileLimits = FileLimits { max_bytes: 8 << 20, ..FileLimits::OPENAI };
}

/// One request of a file: its id and the values it embeds (indices into the texts given to
/// [`build_file`], in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    /// Its `custom_id`.
    pub custom_id: CustomId,
    /// Indices into the texts, in input order.
    pub values: std::ops::Range<usize>,
}

/// A request file: its JSONL, its requests, and how many of the texts it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFile {
    /// The file's bytes, one request per line, each ending in `\n`.
    pub jsonl: Vec<u8>,
    /// Its requests, in file order.
    pub requests: Vec<FileRequest>,
    /// The texts it took: `texts[..taken]`. The rest go into the next file.
    pub taken: usize,
}

/// The most inputs in one request for vectors of `dimensions`: 2,048, and no more than
/// [`MAX_VECTOR_BYTES_PER_BATCH`] of vectors in its answer (682 at 3,072 dimensions).
pub fn max_inputs_per_request(dimensions: u32) -> usize {
    (MAX_VECTOR_BYTES_PER_BATCH / (dimensions.max(1) as usize * 4)).clamp(1, MAX_INPUTS_PER_REQUEST)
}

/// One line of a request file.
#[derive(Serialize)]
struct RequestLine<'a> {
    custom_id: String,
    method: &'static str,
    url: &'static str,
    body: EmbeddingRequest<'a>,
}

/// Builds the next request file for `model` (in `slot`) from `texts`, numbering its requests
/// from `first_seq`: as many of the texts, in order, as fit `limits` (at least one request).
/// The texts must be sendable (not [`batch::too_long`]); an empty `texts` gives an empty file.
pub fn build_file(run: &RunId, slot: ModelSlot, model: &ModelSpec, texts: &[&str], first_seq: u64, limits: FileLimits) -> RequestFile {
    let mut file = RequestFile { jsonl: Vec::new(), requests: Vec::new(), taken: 0 };
    // Packing looks no further than one file's inputs.
    let window = &texts[..texts.len().min(limits.max_inputs)];
    let ranges = batch::pack(window.iter().copied(), max_inputs_per_request(model.dimensions()), MAX_TOKENS_PER_REQUEST);
    let mut line = Vec::new();
    for range in ranges {
        if file.requests.len() == limits.max_requests || range.end > limits.max_inputs {
            break;
        }
        let custom_id = CustomId { run: run.clone(), slot, seq: first_seq + file.requests.len() as u64 };
        let input: Vec<&str> = texts[range.clone()].to_vec();
        let request = RequestLine {
            custom_id: custom_id.to_string(),
            method: "POST",
            url: ENDPOINT,
            body: EmbeddingRequest {
                model: model.name(),
                input: &input,
                dimensions: model.requested_dimensions(),
                encoding_format: EncodingFormat::Base64,
            },
        };
        line.clear();
        serde_json::to_writer(&mut line, &request).expect("a request line always serialises");
        line.push(b'\n');
        if !file.requests.is_empty() && file.jsonl.len() + line.len() > limits.max_bytes {
            break;
        }
        file.jsonl.extend_from_slice(&line);
        file.taken = range.end;
        file.requests.push(FileRequest { custom_id, values: range });
    }
    file
}

/// Cuts a body that arrives in chunks into lines, holding only the unfinished one.
#[derive(Debug)]
pub struct Lines {
    partial: Vec<u8>,
    /// The longest line it holds ([`MAX_LINE_BYTES`]; less in tests).
    max: usize,
}

impl Default for Lines {
    fn default() -> Lines {
        Lines { partial: Vec::new(), max: MAX_LINE_BYTES }
    }
}

/// An output file line longer than [`MAX_LINE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a line of the batch output is longer than {MAX_LINE_BYTES} bytes")]
pub struct LineTooLong;

impl Lines {
    /// A cutter with nothing held.
    pub fn new() -> Lines {
        Lines::default()
    }

    /// Feeds a chunk; calls `each` with every line it completes (without its `\n`; blank lines
    /// are skipped). A line wholly inside the chunk is passed without a copy.
    ///
    /// # Errors
    /// [`LineTooLong`], or what `each` returns; nothing more is read then.
    pub fn push<E: From<LineTooLong>>(&mut self, mut chunk: &[u8], mut each: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            if self.partial.is_empty() {
                emit(&chunk[..end], &mut each)?;
            } else {
                self.hold(&chunk[..end])?;
                let line = std::mem::take(&mut self.partial);
                emit(&line, &mut each)?;
            }
            chunk = &chunk[end + 1..];
        }
        self.hold(chunk)?;
        Ok(())
    }

    /// Ends the body: the last line, if it had no `\n`.
    ///
    /// # Errors
    /// What `each` returns.
    pub fn finish<E>(self, mut each: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        emit(&self.partial, &mut each)
    }

    fn hold(&mut self, piece: &[u8]) -> Result<(), LineTooLong> {
        if self.partial.len() + piece.len() > self.max {
            return Err(LineTooLong);
        }
        self.partial.extend_from_slice(piece);
        Ok(())
    }
}

fn emit<E>(line: &[u8], each: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    each(line)
}

/// One line of a batch's output or error file.
#[derive(Debug)]
pub struct OutputLine<'a> {
    /// The request it answers.
    pub custom_id: CustomId,
    outcome: Outcome<'a>,
}

#[derive(Debug)]
enum Outcome<'a> {
    /// The request ran: its status and body (borrowed from the line).
    Response { status: u16, body: &'a RawValue },
    /// It never ran (`batch_expired`, `batch_cancelled`) or failed without a response.
    Error { code: String, message: String },
}

#[derive(Deserialize)]
struct RawLine<'a> {
    custom_id: String,
    #[serde(borrow, default)]
    response: Option<RawResponse<'a>>,
    #[serde(default)]
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    status_code: u16,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Why an output line's request has no vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The request ran and failed, classified as a synchronous answer of that status and body
    /// would be ([`ProviderError::is_request_level`], [`ProviderError::Rejected`] for a
    /// refused input, ...), or its 200 body was malformed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The request never ran (the batch expired or was cancelled, code `batch_expired` or
    /// `batch_cancelled`) or failed without an answer: its values go the synchronous way.
    #[error("the batch did not run the request ({code}): {message}")]
    NotRun {
        /// OpenAI's code.
        code: String,
        /// OpenAI's message.
        message: String,
    },
}

/// A line that is not the documented shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputLineError {
    /// Not JSON, or not `{custom_id, response, error}`.
    #[error("malformed batch output line: {0}")]
    Malformed(String),
    /// A `custom_id` embsync did not make.
    #[error(transparent)]
    Foreign(#[from] ForeignCustomId),
}

impl<'a> OutputLine<'a> {
    /// Reads one line (see [`Lines`]); the response body stays borrowed from it.
    ///
    /// # Errors
    /// [`OutputLineError`] for a line of the wrong shape or another's `custom_id`.
    pub fn parse(line: &'a [u8]) -> Result<OutputLine<'a>, OutputLineError> {
        let raw: RawLine<'a> = serde_json::from_slice(line).map_err(|e| OutputLineError::Malformed(e.to_string()))?;
        let custom_id = raw.custom_id.parse::<CustomId>()?;
        let outcome = match (raw.response, raw.error) {
            (Some(response), _) => Outcome::Response { status: response.status_code, body: response.body },
            (None, Some(error)) => {
                Outcome::Error { code: error.code.unwrap_or_else(|| "unknown".to_owned()), message: error.message.unwrap_or_default() }
            }
            (None, None) => return Err(OutputLineError::Malformed("neither a response nor an error".to_owned())),
        };
        Ok(OutputLine { custom_id, outcome })
    }

    /// The vectors of a request of `inputs` texts for vectors of `dimensions` values.
    ///
    /// # Errors
    /// [`LineError`]: the request failed (as [`crate::provider::decode_response`] classifies
    /// its status and body), its body was malformed, or it never ran.
    pub fn decode(&self, inputs: usize, dimensions: u32) -> Result<Embeddings, LineError> {
        match &self.outcome {
            Outcome::Response { status, body } => {
                Ok(crate::provider::decode_response(*status, |_| None, body.get().as_bytes(), inputs, dimensions)?)
            }
            Outcome::Error { code, message } => Err(LineError::NotRun { code: code.clone(), message: message.clone() }),
        }
    }
}

/// A `POST /v1/files` body: `multipart/form-data` with `purpose=batch` and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The `Content-Type` header, with the boundary.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

/// The upload of a request file named `filename` (ASCII letters, digits, `.`, `-`, `_`). The
/// boundary is derived from the content and checked not to occur in it.
pub fn upload_body(filename: &str, jsonl: &[u8]) -> Upload {
    use sha2::{Digest, Sha256};
    let filename: String = filename.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).collect();
    let mut salt = 0u32;
    let boundary = loop {
        let digest = Sha256::new().chain_update(salt.to_le_bytes()).chain_update(jsonl).finalize();
        let boundary = format!("embsync-{}", hex::encode(&digest[..16]));
        if memchr::memmem::find(jsonl, boundary.as_bytes()).is_none() {
            break boundary;
        }
        salt += 1;
    };
    let mut body = Vec::with_capacity(jsonl.len() + 400);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(jsonl);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Upload { content_type: format!("multipart/form-data; boundary={boundary}"), body }
}

/// The `POST /v1/batches` body for an uploaded file, with the run in its metadata.
pub fn create_body(input_file_id: &str, run: &RunId) -> String {
    serde_json::json!({
        "input_file_id": input_file_id,
        "endpoint": ENDPOINT,
        "completion_window": COMPLETION_WINDOW,
        "metadata": {"embsync_run": run.0},
    })
    .to_string()
}

/// A file object's `id` (the answer to `POST /v1/files`).
///
/// # Errors
/// [`BatchObjectError`] when the body is not a file object.
pub fn file_id(body: &[u8]) -> Result<String, BatchObjectError> {
    #[derive(Deserialize)]
    struct File {
        id: String,
    }
    serde_json::from_slice::<File>(body).map(|f| f.id).map_err(|e| BatchObjectError(format!("not a file object: {e}")))
}

/// A batch's status.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// The input file is being validated.
    Validating,
    /// Validation failed (see [`Batch::errors`]); nothing ran.
    Failed,
    /// Requests are running.
    InProgress,
    /// The results are being prepared.
    Finalizing,
    /// Done: the output and error files are ready.
    Completed,
    /// The completion window ran out: what finished is in the output file.
    Expired,
    /// A cancel is under way.
    Cancelling,
    /// Cancelled: what finished is in the output file.
    Cancelled,
}

impl BatchStatus {
    /// Its name in OpenAI's objects (`in_progress`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the batch has ended (its files, if any, are final).
    pub fn is_over(&self) -> bool {
        matches!(self, BatchStatus::Failed | BatchStatus::Completed | BatchStatus::Expired | BatchStatus::Cancelled)
    }
}

/// `request_counts` of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RequestCounts {
    /// Requests in the batch.
    #[serde(default)]
    pub total: u64,
    /// Requests that succeeded so far.
    #[serde(default)]
    pub completed: u64,
    /// Requests that failed so far.
    #[serde(default)]
    pub failed: u64,
}

/// A batch object, as `POST /v1/batches` and `GET /v1/batches/{id}` answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Its id.
    pub id: String,
    /// The request file it was made of.
    pub input_file_id: String,
    /// Its status.
    pub status: BatchStatus,
    /// The output file (successful requests), once there is one.
    pub output_file_id: Option<String>,
    /// The error file (failed and unrun requests), once there is one.
    pub error_file_id: Option<String>,
    /// Its request counts (zero when absent).
    pub request_counts: RequestCounts,
    /// Why validation failed (`errors.data[].message`), for a failed batch.
    pub errors: Vec<String>,
}

/// A body that is not a batch or file object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Batch API answer: {0}")]
pub struct BatchObjectError(pub String);

impl Batch {
    /// Reads a batch object.
    ///
    /// # Errors
    /// [`BatchObjectError`] when the body is not one (an unknown status included).
    pub fn parse(body: &[u8]) -> Result<Batch, BatchObjectError> {
        #[derive(Deserialize)]
        struct Raw {
            id: String,
            #[serde(default)]
            input_file_id: String,
            status: BatchStatus,
            #[serde(default)]
            output_file_id: Option<String>,
            #[serde(default)]
            error_file_id: Option<String>,
            #[serde(default)]
            request_counts: Option<RequestCounts>,
            #[serde(default)]
            errors: Option<Errors>,
        }
        #[derive(Deserialize)]
        struct Errors {
            #[serde(default)]
            data: Vec<ErrorItem>,
        }
        #[derive(Deserialize)]
        struct ErrorItem {
            #[serde(default)]
            message: String,
        }
        let raw: Raw = serde_json::from_slice(body).map_err(|e| BatchObjectError(format!("not a batch object: {e}")))?;
        Ok(Batch {
            id: raw.id,
            input_file_id: raw.input_file_id,
            status: raw.status,
            output_file_id: raw.output_file_id,
            error_file_id: raw.error_file_id,
            request_counts: raw.request_counts.unwrap_or_default(),
            errors: raw.errors.map(|e| e.data.into_iter().map(|i| i.message).collect()).unwrap_or_default(),
        })
    }
}

/// A page of `GET /v1/batches`: the key's batches, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPage {
    /// The batches of the page.
    pub data: Vec<Batch>,
    /// Whether older batches follow (ask again with `after` = [`BatchPage::last_id`]).
    pub has_more: bool,
    /// The last batch's id.
    pub last_id: Option<String>,
}

impl BatchPage {
    /// Reads a list object (`{"object": "list", "data": [batch, ...], "has_more", "last_id"}`).
    ///
    /// # Errors
    /// [`BatchObjectError`] when the body is not one, or one of its batches is not a batch.
    pub fn parse(body: &[u8]) -> Result<BatchPage, BatchObjectError> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            #[serde(borrow)]
            data: Vec<&'a RawValue>,
            #[serde(default)]
            has_more: bool,
            #[serde(default)]
            last_id: Option<String>,
        }
        let raw: Raw<'_> = serde_json::from_slice(body).map_err(|e| BatchObjectError(format!("not a list of batches: {e}")))?;
        let data = raw.data.iter().map(|b| Batch::parse(b.get().as_bytes())).collect::<Result<Vec<_>, _>>()?;
        Ok(BatchPage { data, has_more: raw.has_more, last_id: raw.last_id })
    }
}

/// The error of a Batch API answer with a status other than 2xx, by the embeddings endpoint's
/// rules ([`crate::provider::decode_response`]): 401/403 [`ProviderError::Unauthorized`], 404
/// [`ProviderError::RequestRejected`] (see [`is_not_found`]), 429 and 5xx retryable.
pub fn error_of(status: u16, header: impl Fn(&str) -> Option<String>, body: &[u8]) -> ProviderError {
    crate::provider::classify_error(status, &header, body)
}

/// Whether the provider does not know the object asked for (404): a batch or file it forgot.
pub fn is_not_found(e: &ProviderError) -> bool {
    matches!(e, ProviderError::RequestRejected { status: 404, .. })
}

/// What a [`BatchApi`] call returns: a boxed future, so that the transport can be held as
/// `&dyn BatchApi` (by [`crate::sync::Invocation::batch_api`]) without a type parameter.
pub type Call<'a, T> = futures::future::LocalBoxFuture<'a, Result<T, ProviderError>>;

/// The Batch API's HTTP calls: one request each, no retries (the driver retries, as for
/// embeddings). Errors are the provider's ([`ProviderError`], decoded by [`error_of`]: 401/403
/// fatal, 404 an unknown object ([`is_not_found`]), 429/5xx and transport failures retryable).
///
/// An implementation writes `fn upload<'a>(&'a self, upload: &'a Upload) -> Call<'a, String> {
/// Box::pin(async move { ... }) }`.
pub trait BatchApi {
    /// `POST /v1/files` (purpose `batch`) with `upload` ([`upload_body`]): the file's id
    /// ([`file_id`] of the answer).
    fn upload<'a>(&'a self, upload: &'a Upload) -> Call<'a, String>;
    /// `POST /v1/batches` with `body` ([`create_body`], JSON): the batch ([`Batch::parse`]).
    fn create<'a>(&'a self, body: &'a str) -> Call<'a, Batch>;
    /// `GET /v1/batches/{batch_id}`.
    fn retrieve<'a>(&'a self, batch_id: &'a str) -> Call<'a, Batch>;
    /// `POST /v1/batches/{batch_id}/cancel`.
    fn cancel<'a>(&'a self, batch_id: &'a str) -> Call<'a, Batch>;
    /// `GET /v1/batches?limit={limit}[&after={after}]`: one page of the key's batches, newest
    /// first ([`BatchPage::parse`]); finds the batch of a file left between upload and create
    /// by its `input_file_id`.
    fn list<'a>(&'a self, after: Option<&'a str>, limit: u32) -> Call<'a, BatchPage>;
    /// `GET /v1/files/{file_id}/content`, streamed: never the whole file in memory.
    fn content<'a>(&'a self, file_id: &'a str) -> Call<'a, Box<dyn ContentStream + 'a>>;
    /// `DELETE /v1/files/{file_id}` (cleanup; the driver ignores a 404).
    fn delete_file<'a>(&'a self, file_id: &'a str) -> Call<'a, ()>;
}

/// A file's content as it arrives.
pub trait ContentStream {
    /// The next chunk, `None` at the end. An error mid-stream is retryable: the driver reads the
    /// file again from the start, and skips the requests already stored.
    fn next_chunk(&mut self) -> Call<'_, Option<Vec<u8>>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::Vector;

    fn config(batch_api: &str) -> Config {
        Config::parse(&format!(
            r#"{{"version": "1.0", "models": {{"large": "text-embedding-3-large", "small": {{"name": "text-embedding-3-small", "dimensions": 4}}}},
            {batch_api} "sources": [{{"name": "a", "table": "t", "column": "c"}}]}}"#
        ))
        .unwrap()
    }

    fn run() -> RunId {
        RunId("run-7:x".to_owned())
    }

    #[test]
    fn the_way_and_the_price() {
        let off = config("");
        assert_eq!(way(&off, 1_000_000), Way::Embeddings);
        let on = config(r#""batchApi": {"enabled": true, "minValues": 100},"#);
        assert_eq!(way(&on, 99), Way::Embeddings);
        assert_eq!(way(&on, 100), Way::BatchApi);
        assert_eq!(batch_price_per_million(&on.models.large), 0.065);
        assert_eq!(batch_price_per_million(&on.models.small), 0.01);
    }

    #[test]
    fn custom_ids_round_trip_and_refuse_others() {
        let id = CustomId { run: run(), slot: ModelSlot::Small, seq: 42 };
        assert_eq!(id.to_string(), "embsync:run-7:x:small:42");
        assert_eq!("embsync:run-7:x:small:42".parse::<CustomId>(), Ok(id));
        for foreign in ["request-1", "embsync:r:medium:1", "embsync:r:large:x", "embsync::large:1", "embsync:large:1", "embsync:r:large:-1"]
        {
            assert_eq!(foreign.parse::<CustomId>(), Err(ForeignCustomId(foreign.to_owned())), "{foreign}");
        }
    }

    #[test]
    fn request_files() {
        let config = config("");
        let small = &config.models.small;
        let texts = ["alpha", "beta \"quoted\"", "gamma"];
        let file = build_file(&run(), ModelSlot::Small, small, &texts, 5, FileLimits::OPENAI);
        expect_test::expect![[r#"
            {"custom_id":"embsync:run-7:x:small:5","method":"POST","url":"/v1/embeddings","body":{"model":"text-embedding-3-small","input":["alpha","beta \"quoted\"","gamma"],"dimensions":4,"encoding_format":"base64"}}
        "#]]
        .assert_eq(std::str::from_utf8(&file.jsonl).unwrap());
        assert_eq!(file.taken, 3);
        assert_eq!(file.requests, [FileRequest { custom_id: CustomId { run: run(), slot: ModelSlot::Small, seq: 5 }, values: 0..3 }]);
        // The large model at its full size sends no `dimensions`, and at most 682 inputs a request.
        assert_eq!(max_inputs_per_request(3072), 682);
        assert_eq!(max_inputs_per_request(4), 2048);
        let many: Vec<String> = (0..1500).map(|n| format!("value {n}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let large = build_file(&run(), ModelSlot::Large, &config.models.large, &many, 0, FileLimits::OPENAI);
        let sizes: Vec<usize> = large.requests.iter().map(|r| r.values.len()).collect();
        assert_eq!(sizes, [682, 682, 136]);
        assert!(!std::str::from_utf8(&large.jsonl).unwrap().contains("dimensions"));
        assert_eq!(large.jsonl.iter().filter(|&&b| b == b'\n').count(), 3);
        assert!(build_file(&run(), ModelSlot::Small, small, &[], 0, FileLimits::OPENAI).requests.is_empty());
    }

    #[test]
    fn files_stop_at_each_limit() {
        let config = config("");
        let small = &config.models.small;
        let texts: Vec<String> = (0..5000).map(|n| format!("value {n}")).collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let build = |limits| build_file(&run(), ModelSlot::Small, small, &texts, 0, limits);
        // Requests: 2,048 inputs each; two requests at most.
        let by_requests = build(FileLimits { max_requests: 2, ..FileLimits::OPENAI });
        assert_eq!((by_requests.requests.len(), by_requests.taken), (2, 4096));
        // Inputs: packing sees only the file's inputs, so the last request is cut short.
        let by_inputs = build(FileLimits { max_inputs: 3000, ..FileLimits::OPENAI });
        assert_eq!((by_inputs.requests.len(), by_inputs.taken), (2, 3000));
        assert_eq!(by_inputs.requests[1].values, 2048..3000);
        // Bytes: a request that would pass the size waits for the next file...
        let one = build(FileLimits { max_requests: 1, ..FileLimits::OPENAI });
        let by_bytes = build(FileLimits { max_bytes: one.jsonl.len() + 10, ..FileLimits::OPENAI });
        assert_eq!((by_bytes.requests.len(), by_bytes.taken), (1, 2048));
        // ... but a file always takes one, so it cannot get stuck.
        let tiny = build(FileLimits { max_bytes: 10, ..FileLimits::OPENAI });
        assert_eq!(tiny.requests.len(), 1);
        // The next file goes on where this one stopped, numbering on.
        let next = build_file(&run(), ModelSlot::Small, small, &texts[by_bytes.taken..], 1, FileLimits::OPENAI);
        assert_eq!(next.requests[0].custom_id.seq, 1);
        assert_eq!(next.taken, 5000 - 2048);
    }

    #[test]
    fn lines_are_cut_across_chunks() {
        let body = b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\":\n3}\n{\"d\":4}";
        for size in 1..body.len() {
            let mut lines = Lines::new();
            let mut seen: Vec<Vec<u8>> = Vec::new();
            for chunk in body.chunks(size) {
                lines
                    .push::<LineTooLong>(chunk, |line| {
                        seen.push(line.to_vec());
                        Ok(())
                    })
                    .unwrap();
            }
            lines
                .finish::<LineTooLong>(|line| {
                    seen.push(line.to_vec());
                    Ok(())
                })
                .unwrap();
            let expected: [&[u8]; 5] = [b"{\"a\":1}", b"{\"b\":2}", b"{\"c\":", b"3}", b"{\"d\":4}"];
            assert_eq!(seen, expected, "chunks of {size}");
        }
        // The limit, on a cutter with a small one (a line of 32 MiB crashed Node's wasm runtime
        // in the wasm32-wasip1 tier), whether the line comes whole or in pieces.
        let mut lines = Lines { max: 16, ..Lines::new() };
        assert_eq!(lines.push(&[b'x'; 16], |_| Ok::<(), LineTooLong>(())), Ok(()));
        assert_eq!(lines.push(b"x", |_| Ok::<(), LineTooLong>(())), Err(LineTooLong));
        let mut lines = Lines { max: 16, ..Lines::new() };
        assert_eq!(lines.push(&[b'x'; 17], |_| Ok::<(), LineTooLong>(())), Err(LineTooLong));
        let mut lines = Lines { max: 16, ..Lines::new() };
        assert_eq!(lines.push(b"0123456789abcdef\n0123456789abcdef\n", |_| Ok::<(), LineTooLong>(())), Ok(()));
        assert_eq!(Lines::new().max, MAX_LINE_BYTES);
    }

    #[test]
    fn uploads_creates_and_batch_objects() {
        let upload = upload_body("run 1/large.jsonl", b"{\"a\":1}\n");
        let boundary = upload.content_type.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8(upload.body.clone()).unwrap();
        assert!(text.starts_with(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n")));
        assert!(text.contains("filename=\"run1large.jsonl\""), "{text}");
        assert!(text.ends_with(&format!("\r\n\r\n{{\"a\":1}}\n\r\n--{boundary}--\r\n")), "{text}");
        // A file that holds the first boundary gets another one.
        let tricky = format!("{boundary}\n");
        let other = upload_body("f.jsonl", tricky.as_bytes());
        assert!(!other.content_type.ends_with(boundary));

        let create: serde_json::Value = serde_json::from_str(&create_body("file-1", &run())).unwrap();
        assert_eq!(
            create,
            serde_json::json!({"input_file_id": "file-1", "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": {"embsync_run": "run-7:x"}})
        );
        assert_eq!(file_id(br#"{"id":"file-9","object":"file"}"#), Ok("file-9".to_owned()));
        assert!(file_id(b"{}").is_err());

        let batch = Batch::parse(
            br#"{"id":"batch_1","object":"batch","status":"completed","output_file_id":"file-o","error_file_id":null,
                "request_counts":{"total":3,"completed":2,"failed":1},"errors":null}"#,
        )
        .unwrap();
        assert_eq!(batch.status, BatchStatus::Completed);
        assert!(batch.status.is_over());
        assert_eq!((batch.output_file_id.as_deref(), batch.error_file_id.as_deref()), (Some("file-o"), None));
        assert_eq!(batch.request_counts, RequestCounts { total: 3, completed: 2, failed: 1 });
        let failed =
            Batch::parse(br#"{"id":"b","status":"failed","errors":{"object":"list","data":[{"code":"x","message":"bad line"}]}}"#).unwrap();
        assert_eq!((failed.status, failed.errors), (BatchStatus::Failed, vec!["bad line".to_owned()]));
        assert!(!Batch::parse(br#"{"id":"b","status":"in_progress"}"#).unwrap().status.is_over());
        assert!(Batch::parse(br#"{"id":"b","status":"paused"}"#).is_err(), "an unknown status is not guessed at");
        let page = BatchPage::parse(
            br#"{"object":"list","data":[{"id":"b2","input_file_id":"file-2","status":"in_progress"},{"id":"b1","input_file_id":"file-1","status":"completed"}],
                "first_id":"b2","last_id":"b1","has_more":true}"#,
        )
        .unwrap();
        let ids: Vec<(&str, &str)> = page.data.iter().map(|b| (b.id.as_str(), b.input_file_id.as_str())).collect();
        assert_eq!((ids, page.has_more, page.last_id.as_deref()), (vec![("b2", "file-2"), ("b1", "file-1")], true, Some("b1")));
        assert!(BatchPage::parse(br#"{"data":[{"id":"b"}]}"#).is_err(), "a batch without a status is refused");
        let gone = error_of(
            404,
            |_| None,
            br#"{"error":{"message":"No batch found with id 'b'.","type":"invalid_request_error","param":null,"code":null}}"#,
        );
        assert!(is_not_found(&gone), "{gone:?}");
        assert!(!is_not_found(&error_of(500, |_| None, b"oops")));
        assert!(matches!(error_of(401, |_| None, b"{}"), ProviderError::Unauthorized { status: 401 }));
    }

    /// A line with `body` as the response, as the Batch API writes it.
    fn line(custom_id: &str, status: u16, body: &str) -> String {
        format!(
            r#"{{"id":"batch_req_1","custom_id":"{custom_id}","response":{{"status_code":{status},"request_id":"req_1","body":{body}}},"error":null}}"#
        )
    }

    #[test]
    fn output_lines_decode_like_synchronous_answers() {
        let v = |x: f32| Vector::from_f32(&[x, 0.0]).unwrap();
        let ok = line(
            "embsync:r:large:3",
            200,
            r#"{"object":"list","data":[{"object":"embedding","index":1,"embedding":"AAAAQAAAAAA="},{"object":"embedding","index":0,"embedding":[1.0,0.0]}],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#,
        );
        let parsed = OutputLine::parse(ok.as_bytes()).unwrap();
        assert_eq!(parsed.custom_id, CustomId { run: RunId("r".into()), slot: ModelSlot::Large, seq: 3 });
        let embeddings = parsed.decode(2, 2).unwrap();
        assert_eq!(embeddings.vectors, [v(1.0), v(2.0)]);
        assert_eq!(embeddings.prompt_tokens, 7);
        // The request's shape is checked as for a synchronous answer.
        assert!(matches!(parsed.decode(3, 2), Err(LineError::Provider(ProviderError::Malformed(_)))));
        assert!(matches!(parsed.decode(2, 3), Err(LineError::Provider(ProviderError::Malformed(_)))));

        let refused = line(
            "embsync:r:small:4",
            400,
            r#"{"error":{"message":"Injected fault: HTTP 400.","type":"invalid_request_error","param":"input","code":null}}"#,
        );
        let refused = OutputLine::parse(refused.as_bytes()).unwrap().decode(1, 2).unwrap_err();
        assert!(matches!(refused, LineError::Provider(ProviderError::Rejected { status: 400, .. })), "{refused:?}");
        let server = line("embsync:r:small:5", 500, r#"{"error":{"message":"oops","type":"server_error","param":null,"code":null}}"#);
        let server = OutputLine::parse(server.as_bytes()).unwrap().decode(1, 2).unwrap_err();
        assert!(matches!(&server, LineError::Provider(e) if e.is_retryable()), "{server:?}");

        let expired = r#"{"id":"batch_req_2","custom_id":"embsync:r:small:6","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}"#;
        let expired = OutputLine::parse(expired.as_bytes()).unwrap();
        assert_eq!(expired.custom_id.seq, 6);
        assert!(matches!(expired.decode(1, 2), Err(LineError::NotRun { code, .. }) if code == "batch_expired"));

        for bad in
            ["not json", r#"{"custom_id":"embsync:r:small:1"}"#, r#"{"custom_id":"embsync:r:small:1","response":{"status_code":200}}"#]
        {
            assert!(matches!(OutputLine::parse(bad.as_bytes()), Err(OutputLineError::Malformed(_))), "{bad}");
        }
        let foreign = line("someone-else-1", 200, "{}");
        assert!(matches!(OutputLine::parse(foreign.as_bytes()), Err(OutputLineError::Foreign(_))));
    }
}
