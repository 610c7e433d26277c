//! The worker's Postgres connection: a socket from the Workers TCP API (or a Hyperdrive binding)
//! driven by tokio-postgres, handed to [`embsync_store::PgStore`].

use crate::settings::Database;
use embsync_core::config::Config;
use embsync_core::database::Endpoint;
use embsync_core::dburl::{self, Tls, TlsError};
use embsync_core::sync::StoreError;
use embsync_store::{pg_message, PgStore};
use futures::channel::oneshot;
use std::str::FromStr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding, Host, SslMode};
use tokio_postgres::NoTls;
use worker::wasm_bindgen::JsValue;

use crate::socket::{js_message, PgSocket, Transport};

/// A Postgres connection for one invocation: the store over it, and the task that drives it.
pub struct Db {
    /// The store over this connection.
    pub store: PgStore,
    closed: oneshot::Receiver<()>,
    /// Which connection this is (for the log).
    endpoint: Endpoint,
}

fn err(what: &str, e: tokio_postgres::Error) -> StoreError {
    StoreError::new(pg_message(what, e))
}


/// Opens a socket to `host:port`, secured as `tls` says.
///
/// For [`Tls::Required`] it negotiates like libpq: the SSLRequest goes out in plain text and only
/// the server's `S` lets workerd start the TLS handshake, which verifies the certificate against
/// `host` and sends `host` as SNI (Neon routes on it). A server that answers `N` is an error, never
/// a plain-text fallback; so is a handshake workerd gives up on, which is waited for here so that
/// the error says so instead of surfacing as an I/O error in the startup message.
async fn open_socket(host: &str, port: u16, tls: Tls) -> Result<PgSocket, StoreError> {
    let endpoint = format!("{host}:{port}");
    let transport = match tls {
        Tls::Required => Transport::StartTls,
        Tls::Off => Transport::Off,
    };
    let js = |what: &str, e: JsValue| StoreError::new(format!("{what} {endpoint}: {}", js_message(&e)));
    let mut socket = PgSocket::connect(host, port, transport).map_err(|e| js("opening a socket to", e))?;
    if tls == Tls::Off {
        return Ok(socket);
    }
    let io = |what: &str, e: std::io::Error| StoreError::new(format!("connecting to Postgres at {endpoint}: {what}: {e}"));
    socket.write_all(&dburl::SSL_REQUEST).await.map_err(|e| io("sending the TLS request", e))?;
    socket.flush().await.map_err(|e| io("sending the TLS request", e))?;
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.map_err(|e| io("reading the answer to the TLS request", e))?;
    dburl::ssl_answer(answer[0], &endpoint).map_err(|e| StoreError::new(e.to_string()))?;
    let secure = socket.start_tls().map_err(|e| js("starting TLS with", e))?;
    match secure.opened().await {
        Ok(()) => Ok(secure),
        Err(e) => {
            let error = TlsError::Handshake { endpoint, host: host.to_owned(), detail: js_message(&e) };
            Err(StoreError::new(error.to_string()))
        }
    }
}

impl Db {
    /// Connects to the database `db` names: through its Hyperdrive binding, or to `DATABASE_URL`.
    ///
    /// Through Hyperdrive the socket is the binding's own (plain TCP to Hyperdrive's proxy, which
    /// does TLS to the origin) and the credentials are the binding's fields. To `DATABASE_URL`,
    /// `sslmode=require`, `verify-ca` or `verify-full` make the connection TLS or nothing (see
    /// [`open_socket`]); `channel_binding` is turned off because the socket API does not expose the
    /// TLS channel.
    ///
    /// # Errors
    /// [`StoreError`] when the URL cannot be parsed, the server cannot be reached, refuses TLS or
    /// fails the TLS handshake, or the login fails; the message names the binding or the host,
    /// never the password.
    pub async fn connect(db: &Database, sources: &Config) -> Result<Db, StoreError> {
        let (endpoint, (client, connection)) = match db {
            Database::Hyperdrive { binding, hyperdrive, url_ignored } => {
                let endpoint = Endpoint::Hyperdrive {
                    binding: binding.as_str().to_owned(),
                    user: hyperdrive.user(),
                    database: hyperdrive.database(),
                    database_url_ignored: *url_ignored,
                };
                let what = format!("connecting to Postgres through the Hyperdrive binding {}", binding.as_str());
                // The fields, not `connectionString`: workerd does not percent-encode the password
                // in it. The socket is plain TCP (`database::HYPERDRIVE_TLS`).
                let mut config = tokio_postgres::Config::new();
                config.user(hyperdrive.user()).password(hyperdrive.password()).dbname(hyperdrive.database());
                config.ssl_mode(SslMode::Disable).channel_binding(ChannelBinding::Disable);
                let socket = PgSocket::hyperdrive(hyperdrive).map_err(|e| StoreError::new(format!("{what}: {}", js_message(&e))))?;
                (endpoint, config.connect_raw(socket, NoTls).await.map_err(|e| err(&what, e))?)
            }
            Database::Url(url) => {
                let (url, tls) = embsync_core::dburl::normalize(url.expose()).map_err(|e| StoreError::new(e.to_string()))?;
                let mut config = tokio_postgres::Config::from_str(&url)
                    .map_err(|e| StoreError::new(format!("DATABASE_URL is not a valid postgres:// URL: {e}")))?;
                let host = match config.get_hosts().first() {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => return Err(StoreError::new("DATABASE_URL has no TCP host")),
                };
                let port = config.get_ports().first().copied().unwrap_or(5432);
                let endpoint = Endpoint::DatabaseUrl {
                    user: config.get_user().unwrap_or_default().to_owned(),
                    host: host.clone(),
                    port,
                    database: config.get_dbname().or(config.get_user()).unwrap_or_default().to_owned(),
                    tls: tls == Tls::Required,
                };
                let socket = open_socket(&host, port, endpoint.tls()).await?;
                // The socket is already secured as asked: tokio-postgres must not negotiate again.
                config.ssl_mode(SslMode::Disable);
                config.channel_binding(ChannelBinding::Disable);
                let what = format!("connecting to Postgres at {host}:{port}");
                (endpoint, config.connect_raw(socket, NoTls).await.map_err(|e| err(&what, e))?)
            }
        };
        let (tx, closed) = oneshot::channel();
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = connection.await {
                crate::log_event(embsync_core::log::LogEvent::error("postgres", format!("Postgres connection error: {e}")));
            }
            let _ = tx.send(());
        });
        Ok(Db { store: PgStore::new(client, sources), closed, endpoint })
    }

    /// Which connection this is, for the log.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Closes the connection cleanly (Terminate), waiting for the connection task to end.
    pub async fn close(self) {
        drop(self.store.into_client());
        let _ = self.closed.await;
    }
}
