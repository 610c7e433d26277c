//! The Batch API for embeddings: `/v1/files` (upload, retrieve, content, delete) and
//! `/v1/batches` (create, retrieve, cancel), as OpenAI serves them, plus the admin switches
//! that make a batch slow, fail per line, expire, fail validation or be forgotten.
//!
//! An uploaded file is held in memory (at most [`MAX_FILE_BYTES`]); its lines are checked at
//! upload (the JSONL shape, one model, the request and input limits) and their bodies when a
//! batch is created (as `POST /v1/embeddings` checks them: a line that would be refused goes
//! to the error file). A batch's state is a function of the time since its creation and the
//! switches it was created under ([`BatchConfig`]): `validating`, `in_progress` (lines finish
//! in order, at an even pace), `finalizing`, then `completed`; or `failed`, `expired`,
//! `cancelling`/`cancelled`. Its output and error files are generated line by line while they
//! are sent, never held whole: a line's vectors are the same as `POST /v1/embeddings` gives
//! (see [`crate::vectors`]), with its `dimensions` and `encoding_format`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api::{self, ApiError, EmbeddingList};
use crate::http::{RequestHead, Response};

/// Largest batch input file: 200 MB.
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;

/// Most requests (lines) in one batch input file.
pub const MAX_BATCH_REQUESTS: usize = 50_000;

/// Most embedding inputs over all requests of one batch.
pub const MAX_BATCH_INPUTS: usize = 50_000;

/// The only endpoint served through batches.
pub const EMBEDDINGS_ENDPOINT: &str = "/v1/embeddings";

/// A batch's completion window, `24h`, in seconds.
const COMPLETION_WINDOW_SECONDS: u64 = 24 * 3600;

/// Output lines per chunk of a streamed file body.
const LINES_PER_CHUNK: usize = 16;

/// The switches set through `/_admin/batch` (and `--batch-completion-ms`). A batch keeps the
/// switches it was created under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchConfig {
    /// How long a batch stays `validating`.
    #[serde(default)]
    pub validating_ms: u64,
    /// How long a batch stays `in_progress` (its lines finish at an even pace over it).
    #[serde(default)]
    pub completion_ms: u64,
    /// How long a batch stays `finalizing`.
    #[serde(default)]
    pub finalizing_ms: u64,
    /// How long a cancelled batch stays `cancelling`.
    #[serde(default)]
    pub cancelling_ms: u64,
    /// Partial failure: every n-th line (1-based) goes to the error file (a 500).
    #[serde(default)]
    pub fail_every: Option<u64>,
    /// Partial failure: a line with an input containing this goes to the error file (a 400
    /// about the input).
    #[serde(default)]
    pub fail_input_contains: Option<String>,
    /// Expiry: the batch ends `expired` once in progress, with only its first n lines done (the
    /// others in the error file as `batch_expired`).
    #[serde(default)]
    pub expire_after_lines: Option<u64>,
    /// The batch ends `failed` at validation.
    #[serde(default)]
    pub fail_validation: bool,
    /// A slow download: the output and error files are sent one line per chunk, each after
    /// this many milliseconds (a client can be stopped in the middle of reading one).
    #[serde(default)]
    pub line_delay_ms: u64,
}

/// A body produced piece by piece while it is sent (a file's content).
pub struct Chunks(pub Box<dyn Iterator<Item = Vec<u8>> + Send>);

impl fmt::Debug for Chunks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Chunks(..)")
    }
}

/// Seconds since the Unix epoch.
fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or_default()
}

/// An uploaded batch input file, its lines checked.
#[derive(Debug)]
struct InputFile {
    content: Bytes,
    /// The byte range of each request line (blank lines left out).
    lines: Vec<(usize, usize)>,
    model: String,
    inputs: usize,
}

impl InputFile {
    /// The parsed line `index` (it parsed at upload).
    fn line(&self, index: usize) -> Value {
        let (start, end) = self.lines[index];
        serde_json::from_slice(&self.content[start..end]).unwrap_or(Value::Null)
    }
}

/// What a stored file holds.
#[derive(Debug, Clone)]
enum Content {
    Input(Arc<InputFile>),
    /// A batch's output (`errors: false`) or error file, generated when read.
    Output {
        batch: Arc<Batch>,
        errors: bool,
    },
}

/// A stored file.
#[derive(Debug, Clone)]
struct File {
    id: String,
    filename: String,
    created_at: u64,
    content: Content,
}

impl File {
    fn purpose(&self) -> &'static str {
        match self.content {
            Content::Input(_) => "batch",
            Content::Output { .. } => "batch_output",
        }
    }

    fn bytes(&self) -> usize {
        match &self.content {
            Content::Input(input) => input.content.len(),
            Content::Output { batch, errors } => batch.file_bytes(*errors),
        }
    }

    fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes(),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose(),
            "status": "processed",
            "expires_at": null,
            "status_details": null,
        })
    }

    /// The content, in chunks made while it is sent.
    fn chunks(&self) -> Chunks {
        match &self.content {
            Content::Input(input) => {
                let content = input.content.clone();
                let pieces =
                    (0..content.len()).step_by(64 * 1024).map(move |start| content[start..(start + 64 * 1024).min(content.len())].to_vec());
                Chunks(Box::new(pieces))
            }
            Content::Output { batch, errors } => {
                let batch = Arc::clone(batch);
                let errors = *errors;
                let lines: Vec<usize> = batch.file_lines(errors);
                let delay = Duration::from_millis(batch.config.line_delay_ms);
                let per_chunk = if delay.is_zero() { LINES_PER_CHUNK } else { 1 };
                let pieces = (0..lines.len()).step_by(per_chunk).map(move |start| {
                    // The chunks are made on a blocking thread as the connection takes them.
                    std::thread::sleep(delay);
                    let mut chunk = Vec::new();
                    for &index in &lines[start..(start + per_chunk).min(lines.len())] {
                        batch.write_line(index, &mut chunk);
                    }
                    chunk
                });
                Chunks(Box::new(pieces))
            }
        }
    }
}

/// How one line of a batch ends once it is run.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok,
    /// Refused, with this error (its status and body go to the error file).
    Refused(ApiError),
}

/// A batch's state at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the batch has ended (its files, if any, can be read).
    fn is_terminal(self) -> bool {
        matches!(self, Status::Failed | Status::Completed | Status::Expired | Status::Cancelled)
    }
}

/// A batch's state at a moment: its status, how many lines are done, and when each status
/// began (offsets from creation).
#[derive(Debug, Clone, Copy)]
struct Phase {
    status: Status,
    done: usize,
    in_progress_at: Option<Duration>,
    finalizing_at: Option<Duration>,
    ended_at: Option<Duration>,
    cancelling_at: Option<Duration>,
}

/// A batch.
#[derive(Debug)]
struct Batch {
    id: String,
    input_file_id: String,
    output_file_id: String,
    error_file_id: String,
    created: Instant,
    created_at: u64,
    config: BatchConfig,
    input: Arc<InputFile>,
    metadata: Value,
    /// Why validation failed (`errors.data`), empty when it passed.
    validation_errors: Vec<Value>,
    /// Each line's outcome, in line order.
    outcomes: Vec<Outcome>,
    /// When a cancel was asked for (offset from creation).
    cancelled: Mutex<Option<Duration>>,
    /// The sizes of the output and error files, computed when first asked for.
    sizes: OnceLock<(usize, usize)>,
}

impl Batch {
    fn cancel_offset(&self) -> Option<Duration> {
        *self.cancelled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lines done at `offset` after creation, for a batch that validated.
    fn done_at(&self, offset: Duration) -> usize {
        let total = self.outcomes.len();
        let validating = Duration::from_millis(self.config.validating_ms);
        if offset <= validating {
            return 0;
        }
        let done = match self.config.completion_ms {
            0 => total,
            ms => ((total as u128 * (offset - validating).as_millis() / u128::from(ms)) as usize).min(total),
        };
        // Expiry caps the lines done, with no completion time too.
        match self.config.expire_after_lines {
            Some(limit) => done.min(limit as usize),
            None => done,
        }
    }

    /// The state at `offset` after creation.
    fn phase_at(&self, offset: Duration) -> Phase {
        let validating = Duration::from_millis(self.config.validating_ms);
        let in_progress_end = validating + Duration::from_millis(self.config.completion_ms);
        let finalizing_end = in_progress_end + Duration::from_millis(self.config.finalizing_ms);
        let mut phase =
            Phase { status: Status::Validating, done: 0, in_progress_at: None, finalizing_at: None, ended_at: None, cancelling_at: None };
        let failed = !self.validation_errors.is_empty();
        if let Some(cancel) = self.cancel_offset() {
            // A cancel stops the lines where they are; lines done by then stay in the output.
            phase.done = if failed { 0 } else { self.done_at(cancel) };
            phase.in_progress_at = (cancel > validating && !failed).then_some(validating);
            phase.cancelling_at = Some(cancel);
            let cancelled = cancel + Duration::from_millis(self.config.cancelling_ms);
            if offset < cancelled {
                phase.status = Status::Cancelling;
            } else {
                phase.status = Status::Cancelled;
                phase.ended_at = Some(cancelled);
            }
            return phase;
        }
        if offset < validating {
            return phase;
        }
        if failed {
            phase.status = Status::Failed;
            phase.ended_at = Some(validating);
            return phase;
        }
        phase.in_progress_at = Some(validating);
        phase.done = self.done_at(offset);
        if offset < in_progress_end {
            phase.status = Status::InProgress;
            return phase;
        }
        if self.config.expire_after_lines.is_some() {
            phase.status = Status::Expired;
            phase.ended_at = Some(in_progress_end);
            return phase;
        }
        phase.finalizing_at = Some(in_progress_end);
        if offset < finalizing_end {
            phase.status = Status::Finalizing;
            return phase;
        }
        phase.status = Status::Completed;
        phase.ended_at = Some(finalizing_end);
        phase
    }

    fn phase(&self) -> Phase {
        self.phase_at(self.created.elapsed())
    }

    /// The lines of the output file (`errors: false`) or of the error file, at the end.
    fn file_lines(&self, errors: bool) -> Vec<usize> {
        let phase = self.phase();
        if !phase.status.is_terminal() {
            return Vec::new();
        }
        (0..self.outcomes.len())
            .filter(|&index| {
                let ok = index < phase.done && self.outcomes[index] == Outcome::Ok;
                ok != errors
            })
            .collect()
    }

    /// The sizes of the output and error files (generated once to count them).
    fn file_bytes(&self, errors: bool) -> usize {
        // Only an ended batch's files are final (and only they are served).
        if !self.phase().status.is_terminal() {
            return 0;
        }
        let (output, error) = *self.sizes.get_or_init(|| {
            let count = |errors: bool| {
                let mut total = 0;
                let mut line = Vec::new();
                for index in self.file_lines(errors) {
                    line.clear();
                    self.write_line(index, &mut line);
                    total += line.len();
                }
                total
            };
            (count(false), count(true))
        });
        if errors {
            error
        } else {
            output
        }
    }

    /// A deterministic id for line `index` (`batch_req_...`, `req_...`).
    fn line_id(&self, prefix: &str, index: usize) -> String {
        let digest = Sha256::new().chain_update(prefix).chain_update(&self.id).chain_update(index.to_le_bytes()).finalize();
        format!("{prefix}{}", hex::encode(&digest[..16]))
    }

    /// Appends line `index` of the output or error file, with its newline.
    fn write_line(&self, index: usize, out: &mut Vec<u8>) {
        let line = self.input.line(index);
        let custom_id = line.get("custom_id").cloned().unwrap_or(Value::Null);
        let id = self.line_id("batch_req_", index);
        let request_id = self.line_id("req_", index);
        let done = self.phase().done;
        let value = if index >= done {
            let (code, message) = if self.phase().status == Status::Expired {
                ("batch_expired", "This request could not be executed before the completion window expired.")
            } else {
                ("batch_cancelled", "This request was not executed because the batch was cancelled.")
            };
            json!({"id": id, "custom_id": custom_id, "response": null, "error": {"code": code, "message": message}})
        } else {
            match &self.outcomes[index] {
                Outcome::Refused(error) => json!({
                    "id": id,
                    "custom_id": custom_id,
                    "response": {"status_code": error.status, "request_id": request_id, "body": error.body()},
                    "error": null,
                }),
                Outcome::Ok => {
                    let body = match api::parse_value(line.get("body").unwrap_or(&Value::Null)) {
                        Ok(request) => serde_json::to_value(EmbeddingList::new(&request, request.vectors())).unwrap_or(Value::Null),
                        Err(error) => serde_json::to_value(error.body()).unwrap_or(Value::Null),
                    };
                    json!({
                        "id": id,
                        "custom_id": custom_id,
                        "response": {"status_code": 200, "request_id": request_id, "body": body},
                        "error": null,
                    })
                }
            }
        };
        // Serialising a `Value` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, &value);
        out.push(b'\n');
    }

    /// The batch object at this moment.
    fn object(&self) -> Value {
        self.object_in(self.phase())
    }

    /// The batch object as it is just created: `validating`, as OpenAI answers a create,
    /// whatever the switches.
    fn created_object(&self) -> Value {
        let validating =
            Phase { status: Status::Validating, done: 0, in_progress_at: None, finalizing_at: None, ended_at: None, cancelling_at: None };
        self.object_in(validating)
    }

    /// The batch object in `phase`.
    fn object_in(&self, phase: Phase) -> Value {
        let at = |offset: Option<Duration>| offset.map(|offset| self.created_at + offset.as_secs());
        let ended = |status: Status| if phase.status == status { at(phase.ended_at) } else { None };
        let terminal = phase.status.is_terminal() && phase.status != Status::Failed;
        let (completed, failed) = if phase.status == Status::Failed {
            (0, 0)
        } else {
            let completed = self.outcomes[..phase.done].iter().filter(|outcome| **outcome == Outcome::Ok).count();
            let mut failed = phase.done - completed;
            if terminal {
                // Lines an expiry or a cancel left undone end in the error file too.
                failed += self.outcomes.len() - phase.done;
            }
            (completed, failed)
        };
        let has = |errors: bool| terminal && self.file_bytes(errors) > 0;
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": EMBEDDINGS_ENDPOINT,
            "errors": if self.validation_errors.is_empty() || phase.status != Status::Failed {
                Value::Null
            } else {
                json!({"object": "list", "data": self.validation_errors})
            },
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": phase.status.name(),
            "output_file_id": has(false).then(|| self.output_file_id.clone()),
            "error_file_id": has(true).then(|| self.error_file_id.clone()),
            "created_at": self.created_at,
            "in_progress_at": at(phase.in_progress_at),
            "expires_at": self.created_at + COMPLETION_WINDOW_SECONDS,
            "finalizing_at": at(phase.finalizing_at),
            "completed_at": ended(Status::Completed),
            "failed_at": ended(Status::Failed),
            "expired_at": ended(Status::Expired),
            "cancelling_at": at(phase.cancelling_at),
            "cancelled_at": ended(Status::Cancelled),
            "request_counts": {"total": self.outcomes.len(), "completed": completed, "failed": failed},
            "metadata": self.metadata,
        })
    }
}

/// Ids unique per process run: `file-` and 24 hex digits, `batch_` and 32.
#[derive(Debug)]
struct Ids {
    seed: u64,
    counter: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_nanos() as u64).unwrap_or_default();
        Ids { seed: nanos ^ u64::from(std::process::id()), counter: AtomicU64::new(0) }
    }

    fn next(&self, prefix: &str, digits: usize) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::new().chain_update(self.seed.to_le_bytes()).chain_update(n.to_le_bytes()).finalize();
        format!("{prefix}{}", &hex::encode(digest)[..digits])
    }
}

/// What the Batch API holds: files, batches and the switches.
#[derive(Debug)]
struct Store {
    config: BatchConfig,
    files: BTreeMap<String, File>,
    batches: BTreeMap<String, Arc<Batch>>,
    /// Batch ids in the order they were created (`GET /v1/batches` lists them newest first).
    created: Vec<String>,
}

/// The Batch API's state and handlers.
#[derive(Debug)]
pub struct Batches {
    /// The switches of the command line, restored by `DELETE /_admin/batch`.
    default_config: BatchConfig,
    store: Mutex<Store>,
    ids: Ids,
}

/// An answer: a response and, for file content, its body made while it is sent.
pub type Answer = (Response, Option<Chunks>);

fn error(error: &ApiError) -> Answer {
    (Response::json(error.status, &error.body()), None)
}

fn not_found(message: String, param: Option<&'static str>) -> Answer {
    error(&ApiError { status: 404, message, kind: "invalid_request_error", param, code: None })
}

fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Answer {
    error(&ApiError::invalid(param, message))
}

fn ok(value: &Value) -> Answer {
    (Response::json(200, value), None)
}

fn method_not_allowed(method: &str, path: &str, allowed: &'static str) -> Answer {
    let error = ApiError {
        status: 405,
        message: format!("Method {method} is not allowed for {path}."),
        kind: "invalid_request_error",
        param: None,
        code: None,
    };
    (Response::json(405, &error.body()).with_header("allow", allowed), None)
}

impl Batches {
    /// The Batch API with these switches (`--batch-completion-ms`).
    pub fn new(config: BatchConfig) -> Self {
        Batches {
            default_config: config.clone(),
            store: Mutex::new(Store { config, files: BTreeMap::new(), batches: BTreeMap::new(), created: Vec::new() }),
            ids: Ids::new(),
        }
    }

    /// Whether `path` is the Batch API's or its admin API's.
    pub fn serves(path: &str) -> bool {
        ["/v1/files", "/v1/batches", "/_admin/batch"].iter().any(|prefix| path == *prefix || path.starts_with(&format!("{prefix}/")))
            || path == "/_admin/batches"
            || path.starts_with("/_admin/batches/")
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers a request to one of the paths [`Batches::serves`]; `api_key` as for embeddings.
    pub fn handle(&self, head: &RequestHead, body: &[u8], api_key: Option<&str>) -> Answer {
        let path = head.path();
        let method = head.method.as_str();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if segments[0] == "_admin" {
            return self.admin(method, path, &segments[1..], body);
        }
        if let Err(refused) = api::check_auth(head.header("authorization"), api_key) {
            return error(&refused);
        }
        match (segments.as_slice(), method) {
            (["v1", "files"], "POST") => self.upload(head, body),
            (["v1", "files"], _) => method_not_allowed(method, path, "POST"),
            (["v1", "files", id], "GET") => self.with_file(id, |file| ok(&file.object())),
            (["v1", "files", id], "DELETE") => self.delete_file(id),
            (["v1", "files", _], _) => method_not_allowed(method, path, "GET, DELETE"),
            (["v1", "files", id, "content"], "GET") => self.with_file(id, |file| {
                (Response::new(200, Vec::new()).with_header("content-type", "application/octet-stream"), Some(file.chunks()))
            }),
            (["v1", "files", _, "content"], _) => method_not_allowed(method, path, "GET"),
            (["v1", "batches"], "POST") => self.create(body),
            (["v1", "batches"], "GET") => self.list(head),
            (["v1", "batches"], _) => method_not_allowed(method, path, "GET, POST"),
            (["v1", "batches", id], "GET") => self.with_batch(id, |batch| ok(&batch.object())),
            (["v1", "batches", _], _) => method_not_allowed(method, path, "GET"),
            (["v1", "batches", id, "cancel"], "POST") => self.cancel(id),
            (["v1", "batches", _, "cancel"], _) => method_not_allowed(method, path, "POST"),
            _ => not_found(format!("Invalid URL ({method} {path})"), None),
        }
    }

    fn with_file(&self, id: &str, answer: impl FnOnce(&File) -> Answer) -> Answer {
        let file = self.store().files.get(id).cloned();
        // A batch's output and error files exist once it has ended.
        let file = file.filter(|file| match &file.content {
            Content::Output { batch, .. } => batch.phase().status.is_terminal(),
            Content::Input(_) => true,
        });
        match file {
            Some(file) => answer(&file),
            None => not_found(format!("No such File object: {id}"), Some("id")),
        }
    }

    fn with_batch(&self, id: &str, answer: impl FnOnce(&Batch) -> Answer) -> Answer {
        let batch = self.store().batches.get(id).cloned();
        match batch {
            Some(batch) => answer(&batch),
            None => not_found(format!("No batch found with id '{id}'."), None),
        }
    }

    fn delete_file(&self, id: &str) -> Answer {
        match self.store().files.remove(id) {
            Some(_) => ok(&json!({"id": id, "object": "file", "deleted": true})),
            None => not_found(format!("No such File object: {id}"), Some("id")),
        }
    }

    /// `POST /v1/files`: a multipart upload with `purpose=batch` and the JSONL `file`.
    fn upload(&self, head: &RequestHead, body: &[u8]) -> Answer {
        let boundary = match head.header("content-type").map(multer::parse_boundary) {
            Some(Ok(boundary)) => boundary,
            _ => return invalid(None, "Expected a multipart/form-data body with the fields 'purpose' and 'file'."),
        };
        let (purpose, file) = match read_form(body, boundary) {
            Ok(fields) => fields,
            Err(message) => return invalid(None, message),
        };
        let Some(purpose) = purpose else {
            return error(&ApiError::invalid(Some("purpose"), "Missing required parameter: 'purpose'."));
        };
        let Some((filename, content)) = file else {
            return error(&ApiError::invalid(Some("file"), "Missing required parameter: 'file'."));
        };
        if purpose != "batch" {
            return invalid(
                Some("purpose"),
                format!("Invalid value for 'purpose': '{purpose}'. This local provider serves only 'batch' files."),
            );
        }
        if content.len() > MAX_FILE_BYTES {
            return invalid(
                Some("file"),
                format!("File is too large: {} bytes; a batch input file may have at most {MAX_FILE_BYTES} bytes.", content.len()),
            );
        }
        let input = match check_input(content) {
            Ok(input) => input,
            Err(message) => return invalid(Some("file"), message),
        };
        let file = File {
            id: self.ids.next("file-", 24),
            filename,
            created_at: unix_seconds(SystemTime::now()),
            content: Content::Input(Arc::new(input)),
        };
        let object = file.object();
        self.store().files.insert(file.id.clone(), file);
        ok(&object)
    }

    /// `POST /v1/batches`.
    fn create(&self, body: &[u8]) -> Answer {
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return error(&ApiError::unparsable_json());
        };
        let text = |name: &'static str| match fields.get(name) {
            Some(Value::String(text)) => Ok(text.as_str()),
            None | Some(Value::Null) => Err(ApiError::invalid(Some(name), format!("Missing required parameter: '{name}'."))),
            Some(other) => Err(ApiError::invalid(Some(name), format!("{other} is not of type 'string' - '{name}'"))),
        };
        let (input_file_id, endpoint, window) = match (text("input_file_id"), text("endpoint"), text("completion_window")) {
            (Ok(file), Ok(endpoint), Ok(window)) => (file, endpoint, window),
            (Err(refused), _, _) | (_, Err(refused), _) | (_, _, Err(refused)) => return error(&refused),
        };
        if endpoint != EMBEDDINGS_ENDPOINT {
            return invalid(
                Some("endpoint"),
                format!("Invalid value for 'endpoint': '{endpoint}'. This local provider serves only '{EMBEDDINGS_ENDPOINT}'."),
            );
        }
        if window != "24h" {
            return invalid(
                Some("completion_window"),
                format!("Invalid value for 'completion_window': '{window}'. Supported values are: '24h'."),
            );
        }
        let metadata = fields.get("metadata").cloned().unwrap_or(Value::Null);
        let (input, config) = {
            let store = self.store();
            match store.files.get(input_file_id).map(|file| &file.content) {
                Some(Content::Input(input)) => (Arc::clone(input), store.config.clone()),
                Some(Content::Output { .. }) => {
                    return invalid(Some("input_file_id"), format!("File {input_file_id} has purpose 'batch_output', not 'batch'."))
                }
                None => return not_found(format!("No such File object: {input_file_id}"), Some("input_file_id")),
            }
        };
        let mut validation_errors = Vec::new();
        if config.fail_validation {
            validation_errors.push(json!({
                "code": "failed_validation",
                "message": "The batch failed validation (the failValidation switch of the local provider).",
                "param": null,
                "line": null,
            }));
        }
        // Each line is run as `POST /v1/embeddings` would: a request it would refuse, or one a
        // partial-failure switch picks, ends in the error file.
        let outcomes = (0..input.lines.len())
            .map(|index| {
                let line = input.line(index);
                let request = match api::parse_value(line.get("body").unwrap_or(&Value::Null)) {
                    Ok(request) => request,
                    Err(refused) => return Outcome::Refused(refused),
                };
                if config.fail_every.is_some_and(|every| every > 0 && (index as u64 + 1).is_multiple_of(every)) {
                    return Outcome::Refused(ApiError::injected(500, request.model.name(), None, None));
                }
                if let Some(needle) = &config.fail_input_contains {
                    if request.inputs.iter().any(|input| input.contains(needle.as_str())) {
                        return Outcome::Refused(ApiError::injected(400, request.model.name(), None, None).about_input());
                    }
                }
                Outcome::Ok
            })
            .collect();
        let batch = Arc::new(Batch {
            id: self.ids.next("batch_", 32),
            input_file_id: input_file_id.to_string(),
            output_file_id: self.ids.next("file-", 24),
            error_file_id: self.ids.next("file-", 24),
            created: Instant::now(),
            created_at: unix_seconds(SystemTime::now()),
            config,
            input,
            metadata,
            validation_errors,
            outcomes,
            cancelled: Mutex::new(None),
            sizes: OnceLock::new(),
        });
        let mut store = self.store();
        for (file_id, errors) in [(&batch.output_file_id, false), (&batch.error_file_id, true)] {
            let suffix = if errors { "error" } else { "output" };
            store.files.insert(
                file_id.clone(),
                File {
                    id: file_id.clone(),
                    filename: format!("{}_{suffix}.jsonl", batch.id),
                    created_at: batch.created_at,
                    content: Content::Output { batch: Arc::clone(&batch), errors },
                },
            );
        }
        store.batches.insert(batch.id.clone(), Arc::clone(&batch));
        store.created.push(batch.id.clone());
        drop(store);
        ok(&batch.created_object())
    }

    /// `GET /v1/batches?limit=&after=`: the batches newest first, `limit` (1 to 100, default 20)
    /// of them after the batch `after`, as OpenAI's list object (`data`, `first_id`, `last_id`,
    /// `has_more`).
    fn list(&self, head: &RequestHead) -> Answer {
        let query = head.target.split_once('?').map_or("", |(_, query)| query);
        let mut limit = 20usize;
        let mut after: Option<&str> = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "limit" => match value.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => limit = n,
                    _ => return invalid(Some("limit"), format!("Invalid 'limit': integer between 1 and 100 expected, got '{value}'.")),
                },
                "after" => after = Some(value),
                _ => {}
            }
        }
        let batches: Vec<Arc<Batch>> = {
            let store = self.store();
            store.created.iter().rev().filter_map(|id| store.batches.get(id).cloned()).collect()
        };
        let start = match after {
            Some(after) => match batches.iter().position(|batch| batch.id == after) {
                Some(at) => at + 1,
                None => return not_found(format!("No batch found with id '{after}'."), Some("after")),
            },
            None => 0,
        };
        let page: Vec<&Arc<Batch>> = batches.iter().skip(start).take(limit).collect();
        ok(&json!({
            "object": "list",
            "data": page.iter().map(|batch| batch.object()).collect::<Vec<Value>>(),
            "first_id": page.first().map(|batch| batch.id.clone()),
            "last_id": page.last().map(|batch| batch.id.clone()),
            "has_more": start + page.len() < batches.len(),
        }))
    }

    /// `POST /v1/batches/{id}/cancel`.
    fn cancel(&self, id: &str) -> Answer {
        self.with_batch(id, |batch| {
            let offset = batch.created.elapsed();
            let phase = batch.phase_at(offset);
            match phase.status {
                Status::Validating | Status::InProgress | Status::Finalizing => {
                    *batch.cancelled.lock().unwrap_or_else(PoisonError::into_inner) = Some(offset);
                    ok(&batch.object())
                }
                Status::Cancelling => ok(&batch.object()),
                status => error(&ApiError {
                    status: 409,
                    message: format!("Cannot cancel a batch with status '{}'.", status.name()),
                    kind: "invalid_request_error",
                    param: None,
                    code: None,
                }),
            }
        })
    }

    /// The admin API: `/_admin/batch` (the switches) and `/_admin/batches` (list, inputs,
    /// forget).
    fn admin(&self, method: &str, path: &str, segments: &[&str], body: &[u8]) -> Answer {
        match (segments, method) {
            (["batch"], "GET") => ok(&json!(self.store().config)),
            (["batch"], "POST" | "PUT") => match serde_json::from_slice::<BatchConfig>(body) {
                Ok(config) => {
                    self.store().config = config.clone();
                    ok(&json!(config))
                }
                Err(err) => invalid(None, format!("invalid batch config: {err}")),
            },
            (["batch"], "DELETE") => {
                self.store().config = self.default_config.clone();
                ok(&json!(self.default_config))
            }
            (["batch"], _) => method_not_allowed(method, path, "GET, POST, PUT, DELETE"),
            (["batches"], "GET") => {
                let batches: Vec<Arc<Batch>> = self.store().batches.values().cloned().collect();
                let list: Vec<Value> = batches
                    .iter()
                    .map(|batch| {
                        json!({
                            "id": batch.id,
                            "status": batch.phase().status.name(),
                            "inputFileId": batch.input_file_id,
                            "model": batch.input.model,
                            "requests": batch.outcomes.len(),
                            "inputs": batch.input.inputs,
                        })
                    })
                    .collect();
                ok(&json!(list))
            }
            (["batches"], "DELETE") => {
                let mut store = self.store();
                let forgotten = store.batches.len();
                store.batches.clear();
                store.created.clear();
                store.files.retain(|_, file| matches!(file.content, Content::Input(_)));
                ok(&json!({"forgotten": forgotten}))
            }
            (["batches"], _) => method_not_allowed(method, path, "GET, DELETE"),
            (["batches", id], "DELETE") => {
                let mut store = self.store();
                match store.batches.remove(*id) {
                    Some(batch) => {
                        store.files.remove(&batch.output_file_id);
                        store.files.remove(&batch.error_file_id);
                        ok(&json!({"forgotten": 1}))
                    }
                    None => not_found(format!("No batch found with id '{id}'."), None),
                }
            }
            (["batches", _], _) => method_not_allowed(method, path, "DELETE"),
            (["batches", id, "inputs"], "GET") => self.with_batch(id, |batch| {
                let inputs: Vec<Value> = (0..batch.input.lines.len())
                    .flat_map(|index| match batch.input.line(index).pointer("/body/input").cloned() {
                        Some(Value::Array(items)) => items,
                        Some(other) => vec![other],
                        None => Vec::new(),
                    })
                    .collect();
                ok(&json!(inputs))
            }),
            _ => not_found(format!("Invalid URL ({method} {path})"), None),
        }
    }
}

/// The `purpose` field and the `file` part (its filename and bytes) of an upload, as sent.
type Form = (Option<String>, Option<(String, Bytes)>);

/// Reads the `purpose` field and the `file` part of a multipart body.
fn read_form(body: &[u8], boundary: String) -> Result<Form, String> {
    let body = Bytes::copy_from_slice(body);
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    // The body is in memory: every step completes at once.
    futures::executor::block_on(async move {
        let mut purpose = None;
        let mut file = None;
        while let Some(field) = multipart.next_field().await.map_err(|err| format!("malformed multipart body: {err}"))? {
            match field.name() {
                Some("purpose") => purpose = Some(field.text().await.map_err(|err| err.to_string())?),
                Some("file") => {
                    let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                    file = Some((filename, field.bytes().await.map_err(|err| err.to_string())?));
                }
                _ => {}
            }
        }
        Ok((purpose, file))
    })
}

/// The number of embedding inputs in a request body's `input` (a string is one).
fn count_inputs(body: &Value) -> usize {
    match body.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    }
}

/// Checks a batch input file: JSONL whose every line is `{custom_id, method: "POST", url:
/// "/v1/embeddings", body}` with a unique `custom_id`, one `body.model` for all, at most
/// [`MAX_BATCH_REQUESTS`] lines and [`MAX_BATCH_INPUTS`] inputs. Errors name the line.
fn check_input(content: Bytes) -> Result<InputFile, String> {
    let mut lines = Vec::new();
    let mut custom_ids = HashSet::new();
    let mut model: Option<String> = None;
    let mut inputs = 0;
    let mut start = 0;
    for (number, raw) in content.split(|&byte| byte == b'\n').enumerate() {
        let number = number + 1;
        let end = start + raw.len();
        let range = (start, end);
        start = end + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |what: &str| format!("Invalid batch input file, line {number}: {what}");
        let Ok(Value::Object(line)) = serde_json::from_slice::<Value>(raw) else {
            return Err(bad("not a JSON object"));
        };
        match line.get("custom_id") {
            Some(Value::String(id)) if !id.is_empty() => {
                if !custom_ids.insert(id.clone()) {
                    return Err(bad(&format!("duplicate custom_id '{id}'; each request needs a unique custom_id")));
                }
            }
            _ => return Err(bad("'custom_id' must be a non-empty string")),
        }
        if line.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(bad("'method' must be 'POST'"));
        }
        if line.get("url").and_then(Value::as_str) != Some(EMBEDDINGS_ENDPOINT) {
            return Err(bad(&format!("'url' must be '{EMBEDDINGS_ENDPOINT}'")));
        }
        let Some(body @ Value::Object(_)) = line.get("body") else {
            return Err(bad("'body' must be a JSON object"));
        };
        let Some(line_model) = body.get("model").and_then(Value::as_str) else {
            return Err(bad("'body.model' must be a string"));
        };
        match &model {
            None => model = Some(line_model.to_string()),
            Some(first) if first != line_model => {
                return Err(bad(&format!(
                    "model '{line_model}' differs from '{first}' of the first line; a batch file may use one model only"
                )))
            }
            Some(_) => {}
        }
        inputs += count_inputs(body);
        lines.push(range);
        if lines.len() > MAX_BATCH_REQUESTS {
            return Err(format!("Invalid batch input file: more than {MAX_BATCH_REQUESTS} requests"));
        }
    }
    if inputs > MAX_BATCH_INPUTS {
        return Err(format!("Invalid batch input file: {inputs} embedding inputs; a batch may have at most {MAX_BATCH_INPUTS}"));
    }
    let Some(model) = model else {
        return Err("Invalid batch input file: it has no requests".to_string());
    };
    Ok(InputFile { content, lines, model, inputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, model: &str, input: Value) -> String {
        json!({"custom_id": id, "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": input}}).to_string()
    }

    #[test]
    fn input_files_are_checked_line_by_line() {
        let small = "text-embedding-3-small";
        let good = format!("{}\n\n{}\n", line("a", small, json!(["x", "y"])), line("b", small, json!("z")));
        let input = check_input(Bytes::from(good)).unwrap();
        assert_eq!((input.lines.len(), input.inputs, input.model.as_str()), (2, 3, small));
        assert_eq!(input.line(1)["custom_id"], "b");

        let cases = [
            ("{not json".to_string(), "line 1: not a JSON object"),
            (format!("{}\n{}", line("a", small, json!("x")), line("a", small, json!("y"))), "line 2: duplicate custom_id 'a'"),
            (line("", small, json!("x")), "line 1: 'custom_id' must be"),
            (json!({"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}}).to_string(), "'method' must be 'POST'"),
            (json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(), "'url' must be"),
            (json!({"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}).to_string(), "'body' must be"),
            (json!({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}).to_string(), "'body.model'"),
            (format!("{}\n{}", line("a", small, json!("x")), line("b", "text-embedding-3-large", json!("y"))), "line 2: model"),
            ("\n \n".to_string(), "no requests"),
            (line("a", small, json!(vec!["x"; MAX_BATCH_INPUTS + 1])), "embedding inputs"),
        ];
        for (content, expected) in cases {
            let err = check_input(Bytes::from(content.clone())).unwrap_err();
            assert!(err.contains(expected), "{content}: {err}");
        }
        let many: Vec<String> = (0..=MAX_BATCH_REQUESTS).map(|n| line(&n.to_string(), small, json!("x"))).collect();
        assert!(check_input(Bytes::from(many.join("\n"))).unwrap_err().contains("more than 50000 requests"));
        // Exactly the limits pass.
        let most: Vec<String> = (0..MAX_BATCH_REQUESTS).map(|n| line(&n.to_string(), small, json!("x"))).collect();
        assert_eq!(check_input(Bytes::from(most.join("\n"))).unwrap().inputs, MAX_BATCH_INPUTS);
    }

    fn batch(config: BatchConfig, lines: usize) -> Batch {
        let content: Vec<String> = (0..lines).map(|n| line(&n.to_string(), "text-embedding-3-small", json!("x"))).collect();
        let input = Arc::new(check_input(Bytes::from(content.join("\n"))).unwrap());
        Batch {
            id: "batch_test".into(),
            input_file_id: "file-in".into(),
            output_file_id: "file-out".into(),
            error_file_id: "file-err".into(),
            created: Instant::now(),
            created_at: 1_000,
            config,
            outcomes: vec![Outcome::Ok; lines],
            input,
            metadata: Value::Null,
            validation_errors: Vec::new(),
            cancelled: Mutex::new(None),
            sizes: OnceLock::new(),
        }
    }

    #[test]
    fn a_batch_goes_through_its_states_in_time() {
        let config = BatchConfig { validating_ms: 100, completion_ms: 1000, finalizing_ms: 100, ..BatchConfig::default() };
        let b = batch(config, 10);
        let ms = Duration::from_millis;
        let at = |offset| {
            let phase = b.phase_at(ms(offset));
            (phase.status, phase.done)
        };
        assert_eq!(at(0), (Status::Validating, 0));
        assert_eq!(at(99), (Status::Validating, 0));
        assert_eq!(at(100), (Status::InProgress, 0));
        assert_eq!(at(600), (Status::InProgress, 5));
        assert_eq!(at(1100), (Status::Finalizing, 10));
        assert_eq!(at(1200), (Status::Completed, 10));
        let end = b.phase_at(ms(5000));
        assert_eq!((end.in_progress_at, end.finalizing_at, end.ended_at), (Some(ms(100)), Some(ms(1100)), Some(ms(1200))));

        let expiring = batch(BatchConfig { completion_ms: 1000, expire_after_lines: Some(3), ..BatchConfig::default() }, 10);
        assert_eq!(expiring.phase_at(ms(900)).done, 3, "an expiring batch never gets past its limit");
        assert_eq!(expiring.phase_at(ms(1000)).status, Status::Expired);

        let cancelled = batch(BatchConfig { completion_ms: 1000, cancelling_ms: 50, ..BatchConfig::default() }, 10);
        *cancelled.cancelled.lock().unwrap() = Some(ms(400));
        assert_eq!((cancelled.phase_at(ms(420)).status, cancelled.phase_at(ms(420)).done), (Status::Cancelling, 4));
        assert_eq!((cancelled.phase_at(ms(450)).status, cancelled.phase_at(ms(5000)).done), (Status::Cancelled, 4));

        // A file's size asked for before the end is not kept as its final size.
        let quick = batch(BatchConfig { completion_ms: 30, ..BatchConfig::default() }, 2);
        assert_eq!(quick.file_bytes(false), 0);
        std::thread::sleep(ms(40));
        assert_eq!(quick.phase().status, Status::Completed);
        assert!(quick.file_bytes(false) > 0);
        assert_eq!(quick.file_bytes(true), 0);

        let mut failing = batch(BatchConfig { validating_ms: 10, ..BatchConfig::default() }, 2);
        failing.validation_errors.push(json!({"code": "x"}));
        assert_eq!(failing.phase_at(ms(5)).status, Status::Validating);
        assert_eq!(failing.phase_at(ms(10)).status, Status::Failed);
    }
}
