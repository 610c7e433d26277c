//! The HTTP server: hyper's HTTP/1.1 connections on a tokio runtime.
//!
//! hyper does the protocol (request parsing, keep-alive, `Content-Length` and
//! chunked bodies, `Expect: 100-continue`, HTTP/1.0, `Connection: close`,
//! answering malformed requests with a 400 and closing). This module turns its
//! requests into [`RequestHead`] and a body for [`App::handle`], waits the
//! answer's latency with a timer (so a wait holds up only its own connection:
//! many requests wait at once), and writes the answer back. Two pieces are
//! done by hand because hyper has no setting for them:
//!
//! * the `drop` fault closes the connection without an answer: the service
//!   returns an error, on which hyper drops the connection unanswered;
//! * a connection that ends while the client may still be sending (an answer
//!   with `Connection: close`, e.g. a 413 before an unread body) is closed
//!   gracefully: hyper would drop the socket with unread input, and the kernel
//!   then sends a reset that can destroy the answer still in flight, so the
//!   server takes the socket back (`without_shutdown`), shuts its write side
//!   and drains the input for a moment.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::api::ApiError;
use crate::app::App;
use crate::azure::Deployments;
use crate::batch::{BatchConfig, Chunks};
use crate::http::{RequestHead, Response, MAX_BODY_BYTES};
use crate::ratelimit::RateLimitConfig;

/// How long a connection may take to send a request's header section
/// (including the idle time of a keep-alive connection before it).
const HEADER_TIMEOUT: Duration = Duration::from_secs(300);

/// How long, at most, unread request bytes are drained before closing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Server settings (the command-line options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Interface to listen on.
    pub host: String,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// The only accepted bearer token; any token is accepted when `None`.
    pub api_key: Option<String>,
    /// File to append request log entries to, as JSON lines.
    pub log_file: Option<PathBuf>,
    /// Delay before every embeddings answer.
    pub latency: Duration,
    /// Further delay per input of an embeddings request.
    pub latency_per_input: Duration,
    /// The rate-limit mode's settings (`--rpm`, `--tpm`); off by default.
    pub rate_limits: RateLimitConfig,
    /// Refuse `encoding_format: "base64"` with a 400 (`--no-base64`).
    pub reject_base64: bool,
    /// Azure OpenAI mode and its deployments (`--azure`, `--azure-deployment`).
    pub azure: Option<Deployments>,
    /// The Batch API's switches at the start (`--batch-completion-ms`).
    pub batch: BatchConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".to_string(),
            port: 0,
            api_key: None,
            log_file: None,
            latency: Duration::ZERO,
            latency_per_input: Duration::ZERO,
            rate_limits: RateLimitConfig::default(),
            reject_base64: false,
            azure: None,
            batch: BatchConfig::default(),
        }
    }
}

/// A bound server, ready to accept connections.
#[derive(Debug)]
pub struct Server {
    listener: StdTcpListener,
    app: Arc<App>,
}

impl Server {
    /// Opens the log file (if any) and binds the listening socket.
    pub fn bind(config: &Config) -> io::Result<Server> {
        let log_file = config.log_file.as_ref().map(open_log_file).transpose()?;
        let listener = StdTcpListener::bind((config.host.as_str(), config.port))
            .map_err(|err| io::Error::new(err.kind(), format!("cannot listen on {}:{}: {err}", config.host, config.port)))?;
        listener.set_nonblocking(true)?;
        let app = App::new(config.api_key.clone(), config.latency, log_file)
            .latency_per_input(config.latency_per_input)
            .rate_limits(config.rate_limits.clone())
            .rejecting_base64(config.reject_base64)
            .azure(config.azure.clone())
            .batch_config(config.batch.clone());
        Ok(Server { listener, app: Arc::new(app) })
    }

    /// The address the server listens on (with the actual port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until the process ends; returns only if the runtime
    /// cannot be started.
    pub fn run(self) -> io::Error {
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("local-provider").build() {
            Ok(runtime) => runtime,
            Err(err) => return err,
        };
        runtime.block_on(self.accept_loop())
    }

    async fn accept_loop(self) -> io::Error {
        let listener = match TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(err) => return err,
        };
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(stream, Arc::clone(&self.app)));
                }
                Err(err) => {
                    // For example too many open files: back off briefly.
                    eprintln!("embsync-local-provider: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Runs the server on a background thread and returns its address
    /// (for tests that embed the provider).
    pub fn spawn(self) -> io::Result<SocketAddr> {
        let addr = self.local_addr()?;
        thread::Builder::new().name("local-provider".to_string()).spawn(move || {
            let err = self.run();
            eprintln!("embsync-local-provider: cannot run the server: {err}");
        })?;
        Ok(addr)
    }
}

fn open_log_file(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|err| io::Error::new(err.kind(), format!("cannot open log file {}: {err}", path.display())))
}

/// Why a connection is dropped without an answer (the `drop` fault).
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by a fault rule")
    }
}

impl std::error::Error for DropConnection {}

/// Serves the requests of one connection until it closes.
async fn serve_connection(stream: TcpStream, app: Arc<App>) {
    // Failing to set it only costs latency.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| handle(Arc::clone(&app), request));
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .without_shutdown();
    // An error means the client went away, sent something hyper answered with an error and
    // closed, or a `drop` fault fired: the socket is already gone then.
    if let Ok(parts) = connection.await {
        close_gracefully(parts.io.into_inner()).await;
    }
}

/// Closes the connection without losing the last answer: the write side is
/// shut down first and pending input drained for a short while (see the
/// module documentation).
async fn close_gracefully(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async { while let Ok(1..) = stream.read(&mut sink).await {} }).await;
}

/// The body of an answer: complete, or made while it is sent.
type Body = BoxBody<Bytes, Infallible>;

/// Answers one request.
async fn handle(app: Arc<App>, request: hyper::Request<Incoming>) -> Result<hyper::Response<Body>, DropConnection> {
    let (parts, body) = request.into_parts();
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Ok(closing(too_large()));
    }
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Ok(closing(too_large())),
        // A body that breaks off or is malformed (e.g. a bad chunk size).
        Err(err) => return Ok(closing(bad_request(&format!("malformed request body: {err}")))),
    };
    let head = RequestHead {
        method: parts.method.as_str().to_string(),
        target: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |target| target.as_str().to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect(),
    };
    // Building an answer is CPU work (vectors, JSON): keep it off the threads that drive
    // the connections.
    let worker = Arc::clone(&app);
    let pending = match tokio::task::spawn_blocking(move || worker.handle(&head, &body)).await {
        Ok(pending) => pending,
        Err(err) => {
            eprintln!("embsync-local-provider: request handler failed: {err}");
            return Ok(to_hyper(Response::json(500, &ApiError::injected(500, "", None, None).body())));
        }
    };
    if !pending.wait.is_zero() {
        tokio::time::sleep(pending.wait).await;
    }
    let drop_connection = pending.drop_connection;
    let mut pending = pending;
    let stream = pending.stream.take();
    let response = app.complete(pending);
    if drop_connection {
        return Err(DropConnection);
    }
    let mut response = to_hyper(response);
    if let Some(chunks) = stream {
        *response.body_mut() = streamed(chunks);
    }
    Ok(response)
}

/// A body sent as it is made: a blocking task makes the chunks (CPU work: vectors, JSON) a few
/// ahead of the connection, and stops when the client goes away.
fn streamed(chunks: Chunks) -> Body {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        for chunk in chunks.0 {
            if sender.blocking_send(Bytes::from(chunk)).is_err() {
                break;
            }
        }
    });
    let frames = futures::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), receiver))
    });
    BodyExt::boxed(StreamBody::new(frames))
}

/// An OpenAI-style 400.
fn bad_request(message: &str) -> Response {
    Response::json(400, &ApiError::invalid(None, message).body())
}

/// The 413 for a body over [`MAX_BODY_BYTES`].
fn too_large() -> Response {
    let error = ApiError { status: 413, ..ApiError::invalid(None, format!("request body larger than {MAX_BODY_BYTES} bytes")) };
    Response::json(413, &error.body())
}

/// A response after which the connection closes (the request's body may be
/// unread).
fn closing(response: Response) -> hyper::Response<Body> {
    let mut response = to_hyper(response);
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Converts the app's response; hyper adds `Content-Length`.
fn to_hyper(response: Response) -> hyper::Response<Body> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)).boxed());
    *out.status_mut() = hyper::StatusCode::from_u16(response.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = out.headers_mut();
    for (name, value) in response.headers {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value.as_bytes())) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            // Fault headers are checked when configured; this cannot happen.
            _ => eprintln!("embsync-local-provider: dropped an invalid header {name:?}"),
        }
    }
    out
}
