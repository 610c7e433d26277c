//! Routing and the endpoint handlers: `/v1/embeddings`, `/health`, the Batch
//! API (`/v1/files`, `/v1/batches`, in [`crate::batch`]) and the admin API
//! (`/_admin/requests`, `/_admin/faults`, `/_admin/ratelimit`, `/_admin/batch`).

use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::{self, ApiError, EmbeddingList, EmbeddingRequest, EncodingFormat, RATE_LIMIT_REQUESTS, RATE_LIMIT_TOKENS};
use crate::azure::Deployments;
use crate::batch::{BatchConfig, Batches, Chunks};
use crate::faults::{BodyFault, FaultConfig, FaultEffect, FaultState, RequestFacts, HANG_SECONDS};
use crate::http::{RequestHead, Response};
use crate::log::{LogEntry, RequestLog, Ticket};
use crate::ratelimit::{RateLimitConfig, RateLimiter, Snapshot};

/// The endpoints, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Embeddings,
    /// `/openai/...`: Azure OpenAI's paths (served in Azure mode only).
    AzureEmbeddings,
    AdminRequests,
    AdminFaults,
    AdminRateLimit,
}

impl Route {
    fn of(path: &str) -> Option<Route> {
        match path {
            "/health" => Some(Route::Health),
            "/v1/embeddings" | "/embeddings" => Some(Route::Embeddings),
            "/_admin/requests" => Some(Route::AdminRequests),
            "/_admin/faults" => Some(Route::AdminFaults),
            "/_admin/ratelimit" => Some(Route::AdminRateLimit),
            p if p.starts_with("/openai/") => Some(Route::AzureEmbeddings),
            _ => None,
        }
    }

    fn allowed_methods(self) -> &'static str {
        match self {
            Route::Health => "GET",
            Route::Embeddings | Route::AzureEmbeddings => "POST",
            Route::AdminRequests => "GET, DELETE",
            Route::AdminFaults | Route::AdminRateLimit => "GET, POST, PUT, DELETE",
        }
    }
}

/// Mutable state shared by all connections.
#[derive(Debug, Default)]
struct State {
    log: RequestLog,
    faults: FaultState,
    limiter: RateLimiter,
}

/// Settings of the fault configuration that apply to every embeddings request.
#[derive(Debug, Clone, Copy)]
struct GlobalFaults {
    latency: Duration,
    latency_per_input: Duration,
    remaining_requests: Option<u64>,
    remaining_tokens: Option<u64>,
    reject_base64: bool,
}

impl GlobalFaults {
    fn of(config: &FaultConfig) -> Self {
        GlobalFaults {
            latency: Duration::from_millis(config.latency_ms),
            latency_per_input: Duration::from_millis(config.latency_per_input_ms),
            remaining_requests: config.remaining_requests,
            remaining_tokens: config.remaining_tokens,
            reject_base64: config.reject_base64,
        }
    }
}

/// How an embeddings request is answered, before request-independent headers.
struct Answer {
    response: Response,
    /// Description of the fault rule that fired, if any.
    fault: Option<String>,
    /// Extra wait caused by the fault (a `hang`).
    delay: Duration,
    /// The rate-limit state after the request, in the rate-limit mode.
    rate: Option<Snapshot>,
    /// Close the connection instead of answering.
    drop_connection: bool,
}

impl Answer {
    fn error(error: &ApiError) -> Self {
        Answer { response: error_response(error), fault: None, delay: Duration::ZERO, rate: None, drop_connection: false }
    }
}

/// An OpenAI-style JSON error response.
fn error_response(error: &ApiError) -> Response {
    Response::json(error.status, &error.body())
}

/// An answer waiting to be sent: the response, how long to wait first (the
/// latency and a `hang`), and for an embeddings request what
/// [`App::complete`] needs to finish its log entry.
#[derive(Debug)]
pub struct Pending {
    pub response: Response,
    pub wait: Duration,
    /// Close the connection after the wait instead of answering (the `drop`
    /// fault).
    pub drop_connection: bool,
    /// A body made while it is sent (a file's content), which follows `response`'s head.
    pub stream: Option<Chunks>,
    embeddings: Option<(Ticket, Instant, LogEntry)>,
}

impl Pending {
    /// An answer sent at once.
    fn now(response: Response) -> Self {
        Pending { response, wait: Duration::ZERO, drop_connection: false, stream: None, embeddings: None }
    }
}

/// Milliseconds since the Unix epoch.
fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or_default()
}

/// Generates `x-request-id` values: `req_` and 32 hex digits, unique per
/// process run.
#[derive(Debug)]
struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_nanos() as u64).unwrap_or_default();
        RequestIds { seed: nanos ^ u64::from(std::process::id()).rotate_left(32), counter: AtomicU64::new(0) }
    }

    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::new().chain_update(self.seed.to_le_bytes()).chain_update(n.to_le_bytes()).finalize();
        format!("req_{}", hex::encode(&digest[..16]))
    }
}

/// The application: configuration plus shared state. One instance serves all
/// connections.
#[derive(Debug)]
pub struct App {
    api_key: Option<String>,
    base_latency: Duration,
    /// `--latency-per-input-ms`: added to the latency per input of a request.
    latency_per_input: Duration,
    /// The rate limits of the command line (`--rpm`, `--tpm`), restored by
    /// `DELETE /_admin/ratelimit`.
    rate_limits: RateLimitConfig,
    /// `--no-base64`: refuse `encoding_format: "base64"`.
    reject_base64: bool,
    /// Azure OpenAI mode (`--azure`): its deployments.
    azure: Option<Deployments>,
    log_file: Option<Mutex<File>>,
    state: Mutex<State>,
    request_ids: RequestIds,
    /// The Batch API's files, batches and switches.
    batches: Batches,
}

impl App {
    /// `api_key`: the only accepted bearer token (any if `None`);
    /// `base_latency`: delay before every embeddings answer (`--latency-ms`);
    /// `log_file`: where log entries are appended as JSON lines.
    pub fn new(api_key: Option<String>, base_latency: Duration, log_file: Option<File>) -> Self {
        App {
            api_key,
            base_latency,
            latency_per_input: Duration::ZERO,
            rate_limits: RateLimitConfig::default(),
            reject_base64: false,
            azure: None,
            log_file: log_file.map(Mutex::new),
            state: Mutex::new(State::default()),
            request_ids: RequestIds::new(),
            batches: Batches::new(BatchConfig::default()),
        }
    }

    /// The Batch API's switches from the start (`--batch-completion-ms`); `DELETE
    /// /_admin/batch` comes back to them.
    pub fn batch_config(mut self, config: BatchConfig) -> Self {
        self.batches = Batches::new(config);
        self
    }

    /// Makes the server refuse `encoding_format: "base64"` with a 400, as a
    /// compatible server that only speaks `float` does (`--no-base64`).
    pub fn rejecting_base64(mut self, reject: bool) -> Self {
        self.reject_base64 = reject;
        self
    }

    /// Adds `per_input` to the latency of an answer for each input of its request
    /// (`--latency-per-input-ms`).
    pub fn latency_per_input(mut self, per_input: Duration) -> Self {
        self.latency_per_input = per_input;
        self
    }

    /// Enforces these rate limits from the start (`--rpm`, `--tpm`; see [`crate::ratelimit`]);
    /// `DELETE /_admin/ratelimit` comes back to them.
    pub fn rate_limits(mut self, config: RateLimitConfig) -> Self {
        self.state().limiter = RateLimiter::new(config.clone());
        self.rate_limits = config;
        self
    }

    /// Serves Azure OpenAI's paths and only those, with these deployments (`--azure`; see
    /// [`crate::azure`]).
    pub fn azure(mut self, deployments: Option<Deployments>) -> Self {
        self.azure = deployments;
        self
    }

    /// The shared state. A panic in another connection's thread cannot leave
    /// it inconsistent (every update is a single step), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers one request: the response, and how long to wait before sending
    /// it. Pass the result to [`App::complete`] after the wait.
    pub fn handle(&self, head: &RequestHead, body: &[u8]) -> Pending {
        // The Batch API (OpenAI's only, not Azure's).
        if self.azure.is_none() && Batches::serves(head.path()) {
            let (response, stream) = self.batches.handle(head, body, self.api_key.as_deref());
            return Pending { stream, ..Pending::now(response) };
        }
        match self.route(head) {
            Ok(Route::Embeddings | Route::AzureEmbeddings) if head.method == "POST" => self.embeddings(head, body),
            Ok(route) => Pending::now(self.admin(route, head, body)),
            Err(response) => Pending::now(response),
        }
    }

    /// The route of a request; `Err` is the answer to a path that is not served.
    fn route(&self, head: &RequestHead) -> Result<Route, Response> {
        let path = head.path();
        let route = match (Route::of(path), &self.azure) {
            // An Azure resource serves only its own paths; an OpenAI server none of them.
            (Some(Route::Embeddings), Some(_)) | (Some(Route::AzureEmbeddings), None) => None,
            (route, _) => route,
        };
        route.ok_or_else(|| {
            if self.azure.is_some() {
                return crate::azure::resource_not_found();
            }
            error_response(&ApiError {
                status: 404,
                message: format!("Invalid URL ({} {path})", head.method),
                kind: "invalid_request_error",
                param: None,
                code: None,
            })
        })
    }

    /// Answers the requests other than embeddings: `/health`, the admin API
    /// and wrong methods.
    fn admin(&self, route: Route, head: &RequestHead, body: &[u8]) -> Response {
        let path = head.path();
        match (route, head.method.as_str()) {
            (Route::Health, "GET") => Response::json(200, &json!({"status": "ok"})),
            (Route::AdminRequests, "GET") => {
                let entries = self.state().log.entries().to_vec();
                Response::json(200, &entries)
            }
            (Route::AdminRequests, "DELETE") => {
                let cleared = self.state().log.reset();
                Response::json(200, &json!({"cleared": cleared}))
            }
            (Route::AdminFaults, "GET") => Response::json(200, self.state().faults.config()),
            (Route::AdminFaults, "POST" | "PUT") => self.set_faults(body),
            (Route::AdminFaults, "DELETE") => {
                self.state().faults = FaultState::default();
                Response::json(200, &FaultConfig::default())
            }
            (Route::AdminRateLimit, "GET") => Response::json(200, self.state().limiter.config()),
            (Route::AdminRateLimit, "POST" | "PUT") => self.set_rate_limits(body),
            (Route::AdminRateLimit, "DELETE") => {
                self.state().limiter = RateLimiter::new(self.rate_limits.clone());
                Response::json(200, &self.rate_limits)
            }
            (route, method) => error_response(&ApiError {
                status: 405,
                message: format!("Method {method} is not allowed for {path}."),
                kind: "invalid_request_error",
                param: None,
                code: None,
            })
            .with_header("allow", route.allowed_methods()),
        }
    }

    /// `POST /_admin/faults`: replaces the fault configuration (and resets
    /// the rules' firing counts).
    fn set_faults(&self, body: &[u8]) -> Response {
        let parsed = serde_json::from_slice::<FaultConfig>(body)
            .map_err(|err| format!("invalid fault config: {err}"))
            .and_then(|config| FaultState::new(config).map_err(|err| format!("invalid fault config: {err}")));
        match parsed {
            Ok(faults) => {
                let response = Response::json(200, faults.config());
                self.state().faults = faults;
                response
            }
            Err(message) => error_response(&ApiError::invalid(None, message)),
        }
    }

    /// `POST /_admin/ratelimit`: replaces the rate-limit settings; every bucket starts full.
    fn set_rate_limits(&self, body: &[u8]) -> Response {
        let parsed = serde_json::from_slice::<RateLimitConfig>(body)
            .map_err(|err| err.to_string())
            .and_then(|config| config.validate().map(|()| config));
        match parsed {
            Ok(config) => {
                let response = Response::json(200, &config);
                self.state().limiter = RateLimiter::new(config);
                response
            }
            Err(err) => error_response(&ApiError::invalid(None, format!("invalid rate limit config: {err}"))),
        }
    }

    /// `POST /v1/embeddings`.
    fn embeddings(&self, head: &RequestHead, body: &[u8]) -> Pending {
        let started = Instant::now();
        let started_at = SystemTime::now();
        let (ticket, global) = {
            let mut state = self.state();
            (state.log.begin(), GlobalFaults::of(state.faults.config()))
        };
        let authorization = head.header("authorization");
        let (auth, authorized, known_model, token, azure) = match &self.azure {
            None => {
                let auth = api::check_auth(authorization, self.api_key.as_deref()).map_err(|error| Answer::error(&error));
                let authorized = auth.is_ok();
                (auth, authorized, None, api::bearer_token(authorization), None)
            }
            Some(deployments) => {
                let routed = deployments.route(head, self.api_key.as_deref(), body);
                let (auth, model) = match routed.result {
                    Ok(model) => (Ok(()), model),
                    Err(response) => {
                        (Err(Answer { response, fault: None, delay: Duration::ZERO, rate: None, drop_connection: false }), None)
                    }
                };
                let token = head.header("api-key");
                (auth, routed.authorized, model, token, Some(routed.facts))
            }
        };
        let (summary, parsed) = api::parse_request_as(body, known_model);
        let mut tokens = None;
        let answer = match auth {
            Err(answer) => answer,
            Ok(()) => match parsed {
                Err(error) => Answer::error(&error),
                Ok(request) => {
                    tokens = Some(request.prompt_tokens as u64);
                    self.answer(ticket.seq, &request, token, global)
                }
            },
        };
        let wait = self.base_latency
            + global.latency
            + (self.latency_per_input + global.latency_per_input).saturating_mul(u32::try_from(summary.inputs.len()).unwrap_or(u32::MAX))
            + answer.delay;

        let entry = LogEntry {
            seq: ticket.seq,
            path: head.path().to_string(),
            model: summary.model,
            inputs: summary.inputs,
            dimensions: summary.dimensions,
            encoding_format: summary.encoding_format,
            // Nothing is answered on a dropped connection.
            status: if answer.drop_connection { 0 } else { answer.response.status },
            fault: answer.fault,
            authorized,
            key: token.map(api::mask_key),
            tokens,
            rate_limit: answer.rate,
            started_ms: unix_millis(started_at),
            ended_ms: None,
            azure,
        };
        eprintln!(
            "embsync-local-provider: #{} {} model={} inputs={} -> {}{}",
            entry.seq,
            entry.path,
            entry.model.as_deref().unwrap_or("-"),
            entry.inputs.len(),
            entry.status,
            entry.fault.as_deref().map(|f| format!(" (fault {f})")).unwrap_or_default()
        );
        // The entry is visible before the (possibly long) wait, so tests can
        // observe a hanging request; its end time is filled in after the wait.
        self.state().log.record(ticket, entry.clone());
        Pending {
            drop_connection: answer.drop_connection,
            response: answer.response,
            wait,
            stream: None,
            embeddings: Some((ticket, started, entry)),
        }
    }

    /// Completes an answer after its wait: records the end time of an
    /// embeddings request (and appends its entry to the `--log` file) and adds
    /// the headers that depend on the time taken.
    pub fn complete(&self, pending: Pending) -> Response {
        let Some((ticket, started, mut entry)) = pending.embeddings else {
            return pending.response;
        };
        let ended = unix_millis(SystemTime::now());
        // (A request that outlived a reset of the log still goes to the file.)
        self.state().log.finish(ticket, ended);
        entry.ended_ms = Some(ended);
        self.append_to_log_file(&entry);
        pending
            .response
            .with_header("openai-processing-ms", started.elapsed().as_millis().to_string())
            .with_header("x-request-id", self.request_ids.next())
    }

    /// Answers a valid, authorised request: the rate limiter (in the
    /// rate-limit mode) first, then the first matching fault rule.
    fn answer(&self, seq: u64, request: &EmbeddingRequest, token: Option<&str>, global: GlobalFaults) -> Answer {
        if request.encoding == EncodingFormat::Base64 && (self.reject_base64 || global.reject_base64) {
            return Answer {
                response: error_response(&ApiError::base64_unsupported()),
                fault: Some("rejectBase64".to_string()),
                delay: Duration::ZERO,
                rate: None,
                drop_connection: false,
            };
        }
        let model = request.model.name();
        let tokens = request.prompt_tokens as u64;
        let decision = {
            let mut state = self.state();
            state.limiter.enabled().then(|| state.limiter.check(Instant::now(), token.unwrap_or_default(), model, tokens))
        };
        let rate = decision.map(|decision| decision.snapshot);
        if let Some(refusal) = decision.and_then(|decision| decision.refusal) {
            let snapshot = rate.expect("a refusal comes with a snapshot");
            let mut response = error_response(&refusal.error(model, &snapshot));
            response = with_rate_limit_headers(response, global, rate, tokens, false);
            for (name, value) in refusal.retry_headers().into_iter().flatten() {
                response = response.with_header(name, value);
            }
            return Answer {
                response,
                fault: Some(refusal.exceeded.description().to_string()),
                delay: Duration::ZERO,
                rate,
                drop_connection: false,
            };
        }
        let facts = RequestFacts { seq, model, inputs: &request.inputs };
        let fired = self.state().faults.select(&facts);
        let fault = fired.as_ref().map(|fired| fired.description());
        // A rule that picks requests by an input refuses that input, and says so.
        let about_input = fired.as_ref().is_some_and(|fired| {
            self.state().faults.config().rules.get(fired.rule_index).is_some_and(|rule| rule.input_contains.is_some())
        });
        let body_fault = match fired.map(|fired| fired.effect) {
            None => None,
            Some(FaultEffect::Body(body)) => Some(body),
            Some(FaultEffect::Status { status, retry_after, retry_after_ms }) => {
                let retry_in = match (&retry_after_ms, &retry_after) {
                    (Some(ms), _) => Some(format!("{ms}ms")),
                    (None, Some(seconds)) => Some(format!("{seconds}s")),
                    (None, None) => None,
                };
                let mut error = ApiError::injected(status, model, token, retry_in.as_deref());
                if about_input {
                    error = error.about_input();
                }
                let mut response = error_response(&error);
                if status == 429 {
                    response = with_rate_limit_headers(response, global, rate, tokens, true);
                }
                if let Some(seconds) = retry_after {
                    response = response.with_header("retry-after", seconds);
                }
                if let Some(ms) = retry_after_ms {
                    response = response.with_header("retry-after-ms", ms);
                }
                return Answer { response, fault, delay: Duration::ZERO, rate, drop_connection: false };
            }
        };

        let mut vectors = request.vectors();
        if body_fault == Some(BodyFault::WrongDims) {
            for vector in &mut vectors {
                vector.pop();
            }
        }
        let mut list = EmbeddingList::new(request, vectors);
        if body_fault == Some(BodyFault::WrongCount) {
            list.data.pop();
        }
        let mut response = Response::json(200, &list);
        if body_fault == Some(BodyFault::Malformed) {
            // Cutting a JSON object anywhere before its end leaves it invalid.
            response.body.truncate(response.body.len() / 2);
        }
        let delay = if body_fault == Some(BodyFault::Hang) { Duration::from_secs(HANG_SECONDS) } else { Duration::ZERO };
        Answer {
            response: with_rate_limit_headers(response, global, rate, tokens, false)
                .with_header("openai-model", model)
                .with_header("openai-organization", "local-provider")
                .with_header("openai-version", "2020-10-01"),
            fault,
            delay,
            rate,
            drop_connection: body_fault == Some(BodyFault::Drop),
        }
    }

    /// Appends `entry` to the `--log` file, if there is one.
    fn append_to_log_file(&self, entry: &LogEntry) {
        let Some(file) = &self.log_file else {
            return;
        };
        let written = serde_json::to_string(entry).map_err(|err| err.to_string()).and_then(|line| {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            writeln!(file, "{line}").map_err(|err| err.to_string())
        });
        if let Err(err) = written {
            eprintln!("embsync-local-provider: cannot write the log file: {err}");
        }
    }
}

/// Adds OpenAI's `x-ratelimit-*` headers: in the rate-limit mode those of the
/// limiter's `snapshot`, otherwise fixed generous values. The fault
/// configuration may override the remaining counts. `exhausted` (an injected
/// 429) reports no remaining requests unless overridden.
fn with_rate_limit_headers(response: Response, global: GlobalFaults, snapshot: Option<Snapshot>, tokens: u64, exhausted: bool) -> Response {
    let mut snapshot = snapshot.unwrap_or(Snapshot {
        limit_requests: RATE_LIMIT_REQUESTS,
        limit_tokens: RATE_LIMIT_TOKENS,
        remaining_requests: RATE_LIMIT_REQUESTS - 1,
        remaining_tokens: RATE_LIMIT_TOKENS.saturating_sub(tokens),
        reset_requests: Duration::from_millis(6),
        reset_tokens: Duration::ZERO,
    });
    if exhausted {
        snapshot.remaining_requests = 0;
    }
    if let Some(requests) = global.remaining_requests {
        snapshot.remaining_requests = requests;
    }
    if let Some(tokens) = global.remaining_tokens {
        snapshot.remaining_tokens = tokens;
    }
    snapshot.headers().into_iter().fold(response, |response, (name, value)| response.with_header(name, value))
}
