//! The embsync worker: Workers handlers and adapters, wiring only.
//!
//! - `fetch`: `GET /health`, `GET /dry-run`, `POST /sync`, `GET /status` (JSON, or the HTML page
//!   for `Accept: text/html`), `GET /status.html`, `POST /prune` (see README).
//! - `queue`: the consumer of the fan-out's ranges queue and its dead-letter queue (see
//!   [`queues`]).
//! - `scheduled`: the cron trigger runs the same sync as `POST /sync`: invocations of the
//!   current run, each within the invocation budget, one after another while the run pauses at
//!   its budget and `SYNC_CHAIN_SECONDS` of wall time last (see [`Chain`]).
//!
//! The rules live in `embsync-core`; this crate turns the Workers platform (env, sockets,
//! `fetch`, KV, timers, console) into the core's [`Store`](embsync_core::sync::Store),
//! [`Embedder`](embsync_core::sync::Embedder) and [`Runtime`](embsync_core::sync::Runtime).

mod openai;
mod pg;
mod queues;
mod settings;
mod socket;
#[cfg(all(test, target_arch = "wasm32"))]
mod wasm_tests;

use embsync_core::auth::{self, AuthOutcome};
use embsync_core::log::{Level, LogEvent};
use embsync_core::prune::{PruneOutcome, PruneRequest};
use embsync_core::report::{RunReport, Trigger};
use embsync_core::status::{CursorState, Status};
use embsync_core::sync::{
    self, Budget, BudgetError, Chain, Cursor, Invocation, Outcome, RetryPolicy, RunId, Runtime, StoreError, SyncError,
};
use pg::Db;
use settings::SettingsError;
use std::time::Duration;
use worker::{
    console_error, console_log, console_warn, event, Context, Date, Delay, Env, Method, Request, Response, ScheduleContext, ScheduledEvent,
};

/// The KV key holding the last finished run's report.
const LAST_RUN_KEY: &str = "last-run";

/// The KV key holding the cursor of a paused run: a hint for the next invocation.
const CURSOR_KEY: &str = "cursor";

/// Time, randomness and logs from the Workers runtime.
struct WorkerRuntime;

impl Runtime for WorkerRuntime {
    fn now_ms(&self) -> f64 {
        Date::now().as_millis() as f64
    }

    async fn sleep(&self, duration: Duration) {
        Delay::from(duration).await;
    }

    fn random(&self) -> f64 {
        js_sys::Math::random()
    }

    fn log(&self, event: LogEvent) {
        log_event(event);
    }
}

/// Writes one log event: one JSON object per line (Workers Logs indexes its fields); warnings
/// and errors through `console.warn` and `console.error`, so their level shows. Every log line
/// of the worker goes through here.
pub(crate) fn log_event(event: LogEvent) {
    let line = event.to_json();
    match event.level {
        Level::Info => console_log!("{line}"),
        Level::Warn => console_warn!("{line}"),
        Level::Error => console_error!("{line}"),
    }
}

/// Why a request or run failed, with the status the HTTP API answers.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("a sync run is already in progress (lease held by {holder} for {secs:.0} more seconds unless renewed); try again later")]
    Busy { holder: String, secs: f64 },
    #[error("database: {0}")]
    Database(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("could not send the run's ranges to the queue ({0}); they are saved, and the next cron trigger sends them again")]
    Queue(String),
}

impl AppError {
    fn status(&self) -> u16 {
        match self {
            AppError::Settings(_) | AppError::Budget(_) => 500,
            AppError::Busy { .. } => 409,
            AppError::Sync(SyncError::LeaseLost(_)) => 409,
            AppError::Database(e) if e.is_lease_lost() => 409,
            AppError::Database(_) | AppError::Sync(_) | AppError::Queue(_) => 502,
        }
    }
}

fn json_error(status: u16, message: &str) -> worker::Result<Response> {
    Ok(Response::from_json(&serde_json::json!({ "error": message }))?.with_status(status))
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    handle(req, env).await
}

/// Routing, method and query checks, authentication and the request body, then the endpoint:
/// everything `fetch` does (a plain function, so the wasm tests can call it).
async fn handle(mut req: Request, env: Env) -> worker::Result<Response> {
    let path = req.path();
    let method = req.method();
    let (needs_token, allowed) = match path.as_str() {
        "/health" => (false, Method::Get),
        "/dry-run" => (true, Method::Get),
        "/sync" => (true, Method::Post),
        "/status" | "/status.html" => (true, Method::Get),
        "/prune" | "/enqueue" => (true, Method::Post),
        _ => {
            return json_error(
                404,
                "not found: the endpoints are GET /health, GET /dry-run, POST /sync, GET /status, GET /status.html, POST /prune and POST /enqueue",
            )
        }
    };
    // The status page for people: at its own path, or `/status` for a client that asks for HTML.
    let page = path == "/status.html"
        || (path == "/status" && embsync_core::html::prefers_html(req.headers().get("accept").ok().flatten().as_deref()));
    if method != allowed {
        return json_error(405, &format!("method not allowed: use {allowed} {path}"));
    }
    // No endpoint takes parameters: anything else is a mistake worth saying so.
    if req.url().is_ok_and(|url| url.query().is_some_and(|q| !q.is_empty())) {
        return json_error(400, &format!("{path} takes no query parameters"));
    }
    if !needs_token {
        return Response::from_json(&serde_json::json!({
            "status": "ok", "service": "embsync", "version": env!("CARGO_PKG_VERSION"),
        }));
    }
    let configured = settings::secret(&env, "SYNC_API_TOKEN");
    let header = req.headers().get("authorization").ok().flatten();
    // A browser cannot send a bearer token when it opens a page, but it can send Basic
    // credentials: the page takes the token as their password, and its 401 asks for them.
    let accepts = if page { auth::Accepts::BearerOrBasic } else { auth::Accepts::Bearer };
    let unauthorized = |message: &str| {
        let response = json_error(401, message)?;
        if page {
            response.headers().set("www-authenticate", auth::BASIC_CHALLENGE)?;
        }
        Ok(response)
    };
    match auth::check(header.as_deref(), configured.as_ref().map(|t| t.expose()), accepts) {
        AuthOutcome::Allowed => {}
        AuthOutcome::NotConfigured => {
            return json_error(
                503,
                "SYNC_API_TOKEN is not configured, so the endpoints are closed: set it with `wrangler secret put SYNC_API_TOKEN`",
            )
        }
        AuthOutcome::Missing if page => {
            return unauthorized("missing credentials: sign in with SYNC_API_TOKEN as the password (any user name), or send `Authorization: Bearer <SYNC_API_TOKEN>`")
        }
        AuthOutcome::Missing => return unauthorized("missing bearer token: send `Authorization: Bearer <SYNC_API_TOKEN>`"),
        AuthOutcome::Wrong => return unauthorized("invalid token"),
    }
    let mut prune_request = None;
    if method == Method::Post {
        let body = req.text().await.unwrap_or_default();
        let trimmed = body.trim();
        if path == "/enqueue" {
            return enqueue(&env, trimmed).await;
        }
        if path == "/prune" {
            match PruneRequest::parse(trimmed) {
                Ok(request) => prune_request = Some(request),
                Err(e) => return json_error(400, &e.to_string()),
            }
        } else if !(trimmed.is_empty() || trimmed == "{}") {
            return json_error(400, &format!("{path} takes no request body (or an empty JSON object)"));
        }
    }
    if let Some(request) = prune_request {
        return match prune(&env, &request).await {
            Ok(response) => response,
            Err(e) => {
                WorkerRuntime
                    .log(LogEvent::error("failed", format!("{path} failed: {e}")).field("path", &path).field("status", e.status()));
                json_error(e.status(), &e.to_string())
            }
        };
    }
    let result = match path.as_str() {
        "/dry-run" => dry_run(&env).await.map(|plan| Response::from_json(&plan)),
        "/status" | "/status.html" if page => status(&env).await.map(|s| html_response(&s)),
        "/status" => status(&env).await.map(|s| Response::from_json(&s).and_then(vary_accept)),
        _ => run_sync(&env, Trigger::Http).await.map(|report| Response::from_json(&report)),
    };
    match result {
        Ok(response) => response,
        Err(e) => {
            WorkerRuntime.log(LogEvent::error("failed", format!("{path} failed: {e}")).field("path", &path).field("status", e.status()));
            json_error(e.status(), &e.to_string())
        }
    }
}

/// `POST /enqueue`: sends one range message (`{"run": "...", "range": n}`) to the ranges queue,
/// e.g. again after it went to the dead-letter queue. Harmless: a range that is done, claimed by
/// a live consumer or of a finished run is skipped by its consumer.
async fn enqueue(env: &Env, body: &str) -> worker::Result<Response> {
    let msg: embsync_core::fanout::RangeMessage = match serde_json::from_str(body) {
        Ok(msg) => msg,
        Err(e) => return json_error(400, &format!("POST /enqueue takes a range message, {{\"run\": \"<run id>\", \"range\": <n>}}: {e}")),
    };
    let Some(queue) = queues::producer(env) else {
        return json_error(409, &format!("there is no fan-out: the worker has no {} queue binding (see wrangler.toml)", queues::BINDING));
    };
    match queues::send(&queue, std::slice::from_ref(&msg)).await {
        Ok(()) => Response::from_json(&serde_json::json!({ "enqueued": msg })),
        Err(e) => json_error(e.status(), &e.to_string()),
    }
}

/// The status page, with headers that keep it from being cached, sniffed, framed or extended.
fn html_response(status: &Status) -> worker::Result<Response> {
    let response = Response::from_html(embsync_core::html::render(status))?;
    let headers = response.headers();
    for (name, value) in embsync_core::html::response_headers() {
        headers.set(name, &value)?;
    }
    vary_accept(response)
}

/// `/status` answers JSON or HTML by the `Accept` header, so caches must key on it.
fn vary_accept(response: Response) -> worker::Result<Response> {
    response.headers().set("vary", "Accept")?;
    Ok(response)
}

#[event(queue)]
async fn queue(batch: worker::MessageBatch<serde_json::Value>, env: Env, _ctx: Context) -> worker::Result<()> {
    queues::handle(batch, &env).await;
    Ok(())
}

#[event(scheduled)]
async fn scheduled(_event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    if let Err(e) = run_sync(&env, Trigger::Cron).await {
        WorkerRuntime.log(LogEvent::error("failed", format!("Sync failed: {e}")).field("trigger", "cron"));
    }
}

/// Connects to the database and logs which connection it is (`database` event, no password).
async fn connect(db: &settings::Database, config: &embsync_core::Config) -> Result<Db, AppError> {
    let db = Db::connect(db, config).await?;
    WorkerRuntime.log(db.endpoint().log_event());
    Ok(db)
}

async fn dry_run(env: &Env) -> Result<embsync_core::report::DryRunReport, AppError> {
    let config = settings::config(env)?;
    let db = settings::database(env)?;
    let mut conn = connect(&db, &config).await?;
    let plan = sync::dry_run(&config, &mut conn.store).await;
    conn.close().await;
    Ok(plan)
}

/// A fresh id: epoch milliseconds and randomness, in hex.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:x}-{:08x}", Date::now().as_millis(), (js_sys::Math::random() * f64::from(u32::MAX)) as u32)
}

/// The invocation budget: `SYNC_MAX_BATCHES`, `SYNC_MAX_SECONDS` and `SYNC_LEASE_SECONDS`
/// override the defaults, checked by [`Budget::from_settings`].
fn budget(env: &Env) -> Result<Budget, BudgetError> {
    Budget::from_settings(|name| settings::string(env, name))
}

/// How long one trigger goes on with a paused run: `SYNC_CHAIN_SECONDS`, checked by
/// [`Chain::from_settings`].
fn chain(env: &Env) -> Result<Chain, BudgetError> {
    Chain::from_settings(|name| settings::string(env, name))
}

/// Removes the KV cursor: the run it pointed into is over.
async fn clear_cursor(kv: Option<&worker::KvStore>, rt: &WorkerRuntime) {
    if let Some(kv) = kv {
        if let Err(e) = kv.delete(CURSOR_KEY).await {
            rt.log(LogEvent::warn("kv", format!("Could not clear the cursor in KV: {e}")));
        }
    }
}

/// The KV cursor, if one is stored and readable. A missing or unreadable one is no cursor (it
/// is only a hint).
async fn read_cursor(kv: Option<&worker::KvStore>, rt: &WorkerRuntime) -> Option<Cursor> {
    let text = kv?.get(CURSOR_KEY).text().await.ok().flatten()?;
    match serde_json::from_str::<Cursor>(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            rt.log(LogEvent::warn("cursor", format!("Ignoring an unreadable cursor in KV ({e}); Postgres knows where the run stands")));
            None
        }
    }
}

async fn kv_put(kv: Option<&worker::KvStore>, key: &str, value: String, rt: &WorkerRuntime) {
    let Some(kv) = kv else { return };
    let result = match kv.put(key, value) {
        Ok(put) => put.execute().await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        rt.log(LogEvent::warn("kv", format!("Could not write {key} to KV: {e}")));
    }
}

async fn run_sync(env: &Env, trigger: Trigger) -> Result<RunReport, AppError> {
    let config = settings::config(env)?;
    let budget = budget(env)?;
    let db = settings::database(env)?;
    let endpoint = settings::endpoint(env, &config.models)?;
    let embedder = openai::OpenAi::new(endpoint, settings::api_key(env)?);
    let rt = WorkerRuntime;
    let kv = match env.kv("SYNC_STATE") {
        Ok(kv) => Some(kv),
        Err(e) => {
            rt.log(LogEvent::warn("kv", format!("KV binding SYNC_STATE is missing ({e}); going on without a cursor")));
            None
        }
    };
    let chain = chain(env)?;
    // The Batch API over the same client (key, base URL); not with Azure OpenAI.
    let batch_api: Option<&dyn embsync_core::batch_api::BatchApi> = embedder.has_batch_api().then_some(&embedder);
    if config.batch_api.is_some() && batch_api.is_none() {
        rt.log(LogEvent::warn(
            "batch_api",
            "batchApi is set but the provider is Azure OpenAI, whose Batch API embsync does not use: every model goes the synchronous way",
        ));
    }
    // Fan-out only with the queue's producer binding: without it, runs go exactly as before.
    let queue = queues::producer(env);
    let fanout = match queue {
        Some(_) => Some(queues::settings(env, &config)?),
        None => None,
    };
    let began = rt.now_ms();
    let mut hint = read_cursor(kv.as_ref(), &rt).await;
    let mut conn = connect(&db, &config).await?;
    // Invocations one after another while the run pauses at its budget and the trigger's wall
    // time lasts: each with its own lease, budget and run state read from Postgres, and the
    // previous one's cursor as its hint. KV is written once, at the end.
    let mut invocations = 0;
    let result = loop {
        let (run_id, holder) = (RunId(new_id("run")), new_id("inv"));
        let inv = Invocation {
            trigger,
            retry: RetryPolicy::default(),
            budget,
            new_run: &run_id,
            holder: &holder,
            hint: hint.as_ref(),
            fanout,
            batch_api,
        };
        let result = sync::invoke(&config, &mut conn.store, &embedder, &rt, &inv).await;
        invocations += 1;
        match result {
            Ok(outcome) if chain.goes_on(&outcome, rt.now_ms() - began, invocations, &budget) => {
                if let Outcome::Paused(_, cursor) = outcome {
                    rt.log(
                        LogEvent::info(
                            "chain",
                            format!(
                                "Run {} paused at its invocation budget; invocation {} of this trigger goes on at once (SYNC_CHAIN_SECONDS)",
                                cursor.run_id,
                                invocations + 1
                            ),
                        )
                        .run(&cursor.run_id)
                        .field("invocation", invocations + 1),
                    );
                    hint = Some(cursor);
                }
            }
            other => break other,
        }
    };
    conn.close().await;
    // The isolate's WebAssembly memory after the trigger's invocations (it only grows: its
    // high-water mark), for the benchmarks and to see how near a Worker's 128 MB it came.
    #[cfg(target_arch = "wasm32")]
    {
        let bytes = core::arch::wasm32::memory_size::<0>() * 65_536;
        rt.log(
            LogEvent::info("memory", format!("WebAssembly memory: {:.1} MiB", bytes as f64 / 1_048_576.0)).field("wasmBytes", bytes),
        );
    }
    // A run that failed is over: its cursor goes, as a finished run's does (below).
    if let Err(SyncError::Provider(_)) = &result {
        clear_cursor(kv.as_ref(), &rt).await;
    }
    match result? {
        Outcome::Finished(report) => {
            let json = serde_json::to_string(&report).unwrap_or_default();
            let t = &report.totals;
            rt.log(
                LogEvent::info(
                    "report",
                    format!(
                        "Sync report: run {} finished: {} embedded, {} deleted, {} errors",
                        report.run_id, t.embedded, t.deleted, t.errors
                    ),
                )
                .run(&report.run_id)
                .field("report", &report),
            );
            kv_put(kv.as_ref(), LAST_RUN_KEY, json, &rt).await;
            // Whether or not this invocation read a cursor: one may have been written by an
            // earlier invocation and not yet be visible here (KV takes up to 60 s).
            clear_cursor(kv.as_ref(), &rt).await;
            Ok(report)
        }
        Outcome::Paused(report, cursor) => {
            rt.log(
                LogEvent::info("paused", format!("Sync paused: run {} goes on in the next invocation", cursor.run_id))
                    .run(&cursor.run_id)
                    .field("cursor", &cursor),
            );
            kv_put(kv.as_ref(), CURSOR_KEY, serde_json::to_string(&cursor).unwrap_or_default(), &rt).await;
            Ok(report)
        }
        Outcome::FannedOut { report, messages } => {
            // The consumers do the work from here; the last one finishes the run.
            let Some(queue) = queue else { return Ok(report) };
            queues::send(&queue, &messages).await?;
            rt.log(
                LogEvent::info("enqueued", format!("Run {} fanned out: {} ranges sent to the queue", report.run_id, messages.len()))
                    .run(&report.run_id)
                    .field("ranges", messages.len()),
            );
            Ok(report)
        }
        Outcome::Busy { holder, expires_in_secs } => {
            let e = AppError::Busy { holder, secs: expires_in_secs };
            rt.log(LogEvent::warn("skipped", format!("Sync skipped: {e}")));
            Err(e)
        }
    }
}

/// `GET /status`: the KV cursor, the unfinished run, the last finished runs and per-source
/// coverage. Read-only.
async fn status(env: &Env) -> Result<Status, AppError> {
    let config = settings::config(env)?;
    let db = settings::database(env)?;
    let kv = env.kv("SYNC_STATE").ok();
    let cursor_text = match &kv {
        Some(kv) => kv.get(CURSOR_KEY).text().await.ok().flatten(),
        None => None,
    };
    let mut conn = connect(&db, &config).await?;
    let store = &mut conn.store;
    let result = async {
        let mut out = Status {
            cursor: CursorState::from_kv(cursor_text.as_deref()),
            current_run: None,
            last_runs: Vec::new(),
            sources: Vec::new(),
            disabled: config.sources.iter().filter(|s| !s.enabled).map(|s| s.name.clone()).collect(),
            left_config: Vec::new(),
            orphans: Default::default(),
            pending_batches: Vec::new(),
        };
        if store.has_run_tables().await? {
            out.current_run = store.current_run().await?;
            out.last_runs = store.last_runs(10).await?;
            out.left_config = store.left_sources(&config).await?;
            out.orphans = store.waiting_orphans().await?;
            out.pending_batches = store.pending_batches().await?;
        }
        for source in config.enabled_sources() {
            out.sources.push(store.coverage(source).await);
        }
        Ok::<_, StoreError>(out)
    }
    .await;
    conn.close().await;
    Ok(result?)
}

/// `POST /prune`: removes what the sources that left the config still hold, as `request` says
/// (see `embsync_core::prune`): 200 with the report, a refusal's status with its message and
/// counts, 409 while a sync holds the lease.
async fn prune(env: &Env, request: &PruneRequest) -> Result<worker::Result<Response>, AppError> {
    let config = settings::config(env)?;
    let db = settings::database(env)?;
    let lease_ttl = budget(env)?.lease_ttl;
    let mut conn = connect(&db, &config).await?;
    let holder = new_id("prune");
    let result = conn.store.prune(&config, request, &holder, lease_ttl).await;
    conn.close().await;
    let rt = WorkerRuntime;
    match result? {
        PruneOutcome::Done(report) => {
            let what = if report.dry_run { "Prune (dry run) would delete" } else { "Pruned" };
            rt.log(
                LogEvent::info(
                    "prune",
                    format!(
                        "{what} {} cache rows, {} links and {} errors of sources that left the config",
                        report.rows, report.links, report.errors
                    ),
                )
                .field("report", &report),
            );
            Ok(Response::from_json(&report))
        }
        PruneOutcome::Refused(refusal) => {
            rt.log(LogEvent::warn("prune", format!("Prune refused: {refusal}")).field("status", refusal.status()));
            let body = serde_json::json!({ "error": refusal.to_string(), "prune": refusal.report() });
            Ok(Response::from_json(&body).map(|r| r.with_status(refusal.status())))
        }
        PruneOutcome::Busy { holder, expires_in_secs } => Err(AppError::Busy { holder, secs: expires_in_secs }),
    }
}
