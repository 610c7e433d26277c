//! The TCP listener and the per-connection request loop (one thread per
//! connection, requests on a connection answered in order).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::api::ApiError;
use crate::app::App;
use crate::azure::Deployments;
use crate::http::{self, BodyFraming, HttpError, Version};
use crate::ratelimit::RateLimitConfig;

/// How long an idle keep-alive connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

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
        }
    }
}

/// A bound server, ready to accept connections.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    app: Arc<App>,
}

impl Server {
    /// Opens the log file (if any) and binds the listening socket.
    pub fn bind(config: &Config) -> io::Result<Server> {
        let log_file = config.log_file.as_ref().map(open_log_file).transpose()?;
        let listener = TcpListener::bind((config.host.as_str(), config.port))
            .map_err(|err| io::Error::new(err.kind(), format!("cannot listen on {}:{}: {err}", config.host, config.port)))?;
        let app = App::new(config.api_key.clone(), config.latency, log_file)
            .latency_per_input(config.latency_per_input)
            .rate_limits(config.rate_limits.clone())
            .rejecting_base64(config.reject_base64)
            .azure(config.azure.clone());
        Ok(Server { listener, app: Arc::new(app) })
    }

    /// The address the server listens on (with the actual port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections forever, serving each on its own thread.
    pub fn run(self) -> ! {
        loop {
            match self.listener.accept() {
                Ok((stream, _peer)) => {
                    let app = Arc::clone(&self.app);
                    let spawned = thread::Builder::new().name("connection".to_string()).spawn(move || serve_connection(stream, &app));
                    if let Err(err) = spawned {
                        eprintln!("embsync-local-provider: cannot start a connection thread: {err}");
                    }
                }
                Err(err) => {
                    // For example too many open files: back off briefly.
                    eprintln!("embsync-local-provider: accept failed: {err}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Runs the server on a background thread and returns its address
    /// (for tests that embed the provider).
    pub fn spawn(self) -> io::Result<SocketAddr> {
        let addr = self.local_addr()?;
        thread::Builder::new().name("local-provider".to_string()).spawn(move || self.run())?;
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

/// Serves the requests of one connection until it closes, asks to close, or
/// sends something unparsable.
fn serve_connection(stream: TcpStream, app: &App) {
    // Failing to set socket options only costs latency or a stuck thread.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(err) => {
            eprintln!("embsync-local-provider: cannot use connection: {err}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        match serve_one(&mut reader, &mut writer, app) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(err) => {
                if let Some(status) = err.status() {
                    let error = ApiError { status, message: err.to_string(), kind: "invalid_request_error", param: None, code: None };
                    let response = http::Response::json(status, &error.body());
                    // The client may be gone already; nothing more to do then.
                    let _ = write_response(&mut writer, &response, Version::Http11, false);
                }
                break;
            }
        }
    }
    close_gracefully(reader, &writer);
}

/// Reads one request and answers it. Returns whether the connection stays
/// open (`Ok(false)` also at a clean end of the connection).
fn serve_one(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream, app: &App) -> Result<bool, HttpError> {
    let Some(head) = http::read_head(reader)? else {
        return Ok(false);
    };
    let framing = head.body_framing()?;
    if head.expects_continue() && framing != BodyFraming::Empty {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    let body = http::read_body(reader, framing)?;
    let keep_alive = head.keep_alive();
    let pending = app.handle(&head, &body);
    if !pending.wait.is_zero() {
        thread::sleep(pending.wait);
    }
    let response = app.complete(pending);
    write_response(writer, &response, head.version, keep_alive)?;
    Ok(keep_alive)
}

fn write_response(writer: &mut TcpStream, response: &http::Response, version: Version, keep_alive: bool) -> io::Result<()> {
    let mut buffered = BufWriter::with_capacity(64 * 1024, writer);
    response.write_to(&mut buffered, version, keep_alive)
}

/// Closes the connection without losing the last response: a close with
/// unread input makes the kernel send a reset, which can discard response
/// bytes still in flight. So the write side is shut down first and pending
/// input is drained for a short while.
fn close_gracefully(mut reader: BufReader<TcpStream>, writer: &TcpStream) {
    let _ = writer.shutdown(Shutdown::Write);
    let _ = reader.get_ref().set_read_timeout(Some(DRAIN_TIMEOUT));
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut sink = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}
