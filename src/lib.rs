//! The embsync worker: Workers handlers and adapters, wiring only.
//!
//! - `fetch`: `GET /health`, `GET /dry-run`, `POST /sync` (see README).
//! - `scheduled`: the cron trigger runs the same sync as `POST /sync`.
//!
//! The rules live in `embsync-core`; this crate turns the Workers platform (env, sockets,
//! `fetch`, KV, timers, console) into the core's [`Store`](embsync_core::sync::Store),
//! [`Embedder`](embsync_core::sync::Embedder) and [`Runtime`](embsync_core::sync::Runtime).

mod openai;
mod pg;
mod settings;

use embsync_core::auth::{check_bearer, AuthOutcome};
use embsync_core::report::{RunReport, Trigger};
use embsync_core::sync::{self, RetryPolicy, Runtime, StoreError, SyncError};
use pg::PgStore;
use settings::SettingsError;
use std::time::Duration;
use worker::{console_log, event, Context, Date, Delay, Env, Method, Request, Response, ScheduleContext, ScheduledEvent};

/// The KV key holding the last run's report.
const LAST_RUN_KEY: &str = "last-run";

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

    fn log(&self, line: &str) {
        console_log!("{line}");
    }
}

/// Why a request or run failed, with the status the HTTP API answers.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("database: {0}")]
    Database(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] SyncError),
}

impl AppError {
    fn status(&self) -> u16 {
        match self {
            AppError::Settings(_) => 500,
            AppError::Database(_) | AppError::Sync(_) => 502,
        }
    }
}

fn json_error(status: u16, message: &str) -> worker::Result<Response> {
    Ok(Response::from_json(&serde_json::json!({ "error": message }))?.with_status(status))
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let path = req.path();
    let method = req.method();
    let (needs_token, allowed) = match path.as_str() {
        "/health" => (false, Method::Get),
        "/dry-run" => (true, Method::Get),
        "/sync" => (true, Method::Post),
        _ => return json_error(404, "not found: the endpoints are GET /health, GET /dry-run and POST /sync"),
    };
    if method != allowed {
        return json_error(405, &format!("method not allowed: use {allowed} {path}"));
    }
    if !needs_token {
        return Response::from_json(&serde_json::json!({
            "status": "ok", "service": "embsync", "version": env!("CARGO_PKG_VERSION"),
        }));
    }
    let configured = settings::secret(&env, "SYNC_API_TOKEN");
    let header = req.headers().get("authorization").ok().flatten();
    match check_bearer(header.as_deref(), configured.as_ref().map(|t| t.expose())) {
        AuthOutcome::Allowed => {}
        AuthOutcome::NotConfigured => {
            return json_error(503, "SYNC_API_TOKEN is not configured, so the endpoints are closed: set it with `wrangler secret put SYNC_API_TOKEN`")
        }
        AuthOutcome::Missing => return json_error(401, "missing bearer token: send `Authorization: Bearer <SYNC_API_TOKEN>`"),
        AuthOutcome::Wrong => return json_error(401, "invalid bearer token"),
    }
    let result = match path.as_str() {
        "/dry-run" => dry_run(&env).await.and_then(|plan| Ok(Response::from_json(&plan))),
        _ => run_sync(&env, Trigger::Http).await.map(|report| Response::from_json(&report)),
    };
    match result {
        Ok(response) => response,
        Err(e) => {
            console_log!("{path} failed: {e}");
            json_error(e.status(), &e.to_string())
        }
    }
}

#[event(scheduled)]
async fn scheduled(_event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    if let Err(e) = run_sync(&env, Trigger::Cron).await {
        console_log!("Sync failed: {e}");
    }
}

async fn dry_run(env: &Env) -> Result<embsync_core::report::DryRunReport, AppError> {
    let config = settings::config(env)?;
    let url = settings::database_url(env)?;
    let mut store = PgStore::connect(&url).await?;
    let plan = sync::dry_run(&config, &mut store).await;
    store.close().await;
    Ok(plan)
}

async fn run_sync(env: &Env, trigger: Trigger) -> Result<RunReport, AppError> {
    let config = settings::config(env)?;
    let url = settings::database_url(env)?;
    let embedder = openai::OpenAi::new(&settings::base_url(env), settings::api_key(env)?);
    let rt = WorkerRuntime;
    let mut store = PgStore::connect(&url).await?;
    let result = sync::run(&config, &mut store, &embedder, &rt, trigger, RetryPolicy::default()).await;
    store.close().await;
    let report = result?;
    let json = serde_json::to_string(&report).unwrap_or_default();
    rt.log(&format!("Sync report: {json}"));
    match env.kv("SYNC_STATE") {
        Ok(kv) => match kv.put(LAST_RUN_KEY, json) {
            Ok(put) => {
                if let Err(e) = put.execute().await {
                    rt.log(&format!("Could not save the report to KV: {e}"));
                }
            }
            Err(e) => rt.log(&format!("Could not save the report to KV: {e}")),
        },
        Err(e) => rt.log(&format!("KV binding SYNC_STATE is missing: {e}")),
    }
    Ok(report)
}
