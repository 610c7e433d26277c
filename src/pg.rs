//! [`Store`] over tokio-postgres on the Workers TCP socket API.

use crate::settings::Redacted;
use bytes::BytesMut;
use embsync_core::config::{Config, Source};
use embsync_core::hash::ValueHash;
use embsync_core::sql::{self, SchemaState};
use embsync_core::sync::{EmbeddedValue, PendingValue, SourceCounts, StaleOutcome, Store, StoreError};
use embsync_core::vector::encode_pgvector;
use futures::channel::oneshot;
use std::str::FromStr;
use tokio_postgres::config::{ChannelBinding, Host, SslMode};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Client;
use worker::postgres_tls::PassthroughTls;
use worker::{SecureTransport, Socket};

/// A Postgres connection for one invocation.
pub struct PgStore {
    client: Client,
    closed: oneshot::Receiver<()>,
    schema: Option<SchemaState>,
}

fn err(what: &str, e: tokio_postgres::Error) -> StoreError {
    // `{:#}`-style chain: tokio-postgres puts the server's message in the source.
    let mut msg = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    StoreError(msg)
}

impl PgStore {
    /// Connects to `DATABASE_URL`. `sslmode=require` upgrades the socket with StartTls;
    /// `channel_binding` is turned off because the socket API does not expose the TLS channel.
    ///
    /// # Errors
    /// [`StoreError`] when the URL cannot be parsed or the server cannot be reached; the message
    /// names the host, never the password.
    pub async fn connect(url: &Redacted) -> Result<PgStore, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url.expose())
            .map_err(|e| StoreError(format!("DATABASE_URL is not a valid postgres:// URL: {e}")))?;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            _ => return Err(StoreError("DATABASE_URL has no TCP host".into())),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let transport = match config.get_ssl_mode() {
            SslMode::Require => SecureTransport::StartTls,
            _ => {
                config.ssl_mode(SslMode::Disable);
                SecureTransport::Off
            }
        };
        config.channel_binding(ChannelBinding::Disable);
        let socket = Socket::builder()
            .secure_transport(transport)
            .connect(host.clone(), port)
            .map_err(|e| StoreError(format!("opening a socket to {host}:{port}: {e}")))?;
        let (client, connection) = config
            .connect_raw(socket, PassthroughTls)
            .await
            .map_err(|e| err(&format!("connecting to Postgres at {host}:{port}"), e))?;
        let (tx, closed) = oneshot::channel();
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = connection.await {
                worker::console_error!("Postgres connection error: {e}");
            }
            let _ = tx.send(());
        });
        Ok(PgStore { client, closed, schema: None })
    }

    /// Closes the connection cleanly (Terminate), waiting for the connection task to end.
    pub async fn close(self) {
        drop(self.client);
        let _ = self.closed.await;
    }

    async fn schema_state(&mut self) -> Result<SchemaState, StoreError> {
        if let Some(s) = self.schema {
            return Ok(s);
        }
        let row = self.client.query_one(sql::SCHEMA_STATE, &[]).await.map_err(|e| err("checking the schema", e))?;
        let state = SchemaState { cache: row.get(0), links: row.get(1) };
        self.schema = Some(state);
        Ok(state)
    }
}

/// A vector bound as pgvector's binary format.
#[derive(Debug)]
struct PgVector<'a>(&'a [f32]);

impl ToSql for PgVector<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let mut buf = Vec::new();
        encode_pgvector(self.0, &mut buf);
        out.extend_from_slice(&buf);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }

    to_sql_checked!();
}

fn keys(source: &Source) -> (String, String) {
    (source.table_key(), source.column_key().to_owned())
}

impl Store for PgStore {
    async fn ensure_schema(&mut self, config: &Config) -> Result<(), StoreError> {
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.execute(sql::LOCK_SCHEMA, &[]).await.map_err(|e| err("locking the schema", e))?;
        tx.batch_execute(&sql::ensure_schema(&config.models)).await.map_err(|e| err("creating tables", e))?;
        tx.commit().await.map_err(|e| err("committing the schema", e))?;
        self.schema = Some(SchemaState { cache: true, links: true });
        Ok(())
    }

    async fn counts(&mut self, source: &Source) -> Result<SourceCounts, StoreError> {
        let state = self.schema_state().await?;
        let (t, c) = keys(source);
        let row = self.client.query_one(&sql::plan(source, state), &[&t, &c]).await.map_err(|e| err("counting", e))?;
        let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        Ok(SourceCounts { total: n(0), new: n(1), reusable: n(2), embed_tokens: n(3), stale: n(4) })
    }

    async fn link_reusable(&mut self, source: &Source) -> Result<u64, StoreError> {
        let (t, c) = keys(source);
        self.client.execute(&sql::link_reusable(source), &[&t, &c]).await.map_err(|e| err("linking", e))
    }

    async fn pending(&mut self, source: &Source, after: Option<&ValueHash>, limit: usize) -> Result<Vec<PendingValue>, StoreError> {
        let (t, c) = keys(source);
        let after = after.map_or("", |h| h.as_str()).to_owned();
        let limit = limit as i64;
        let rows = self
            .client
            .query(&sql::pending_page(source), &[&t, &c, &after, &limit])
            .await
            .map_err(|e| err("listing", e))?;
        rows.into_iter()
            .map(|row| {
                let h: String = row.get(0);
                Ok(PendingValue {
                    hash: ValueHash::from_hex(&h).ok_or_else(|| StoreError(format!("bad hash {h:?} from the database")))?,
                    value: row.get(1),
                    occurrences: row.get::<_, i64>(2).clamp(0, i64::from(i32::MAX)) as i32,
                    has_large: row.get(3),
                    has_small: row.get(4),
                })
            })
            .collect()
    }

    async fn store(&mut self, source: &Source, batch: &[EmbeddedValue]) -> Result<(), StoreError> {
        let (t, c) = keys(source);
        let hashes: Vec<&str> = batch.iter().map(|v| v.hash.as_str()).collect();
        let values: Vec<&str> = batch.iter().map(|v| v.value.as_str()).collect();
        let counts: Vec<i32> = batch.iter().map(|v| v.occurrences).collect();
        let large: Vec<Option<PgVector>> = batch.iter().map(|v| v.large.as_deref().map(PgVector)).collect();
        let small: Vec<Option<PgVector>> = batch.iter().map(|v| v.small.as_deref().map(PgVector)).collect();
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        tx.execute(sql::UPSERT_BATCH, &[&t, &c, &hashes, &values, &counts, &large, &small])
            .await
            .map_err(|e| err("writing embeddings", e))?;
        tx.execute(sql::LINK_VALUES, &[&t, &c, &hashes]).await.map_err(|e| err("linking values", e))?;
        tx.commit().await.map_err(|e| err("committing a batch", e))
    }

    async fn remove_stale(&mut self, source: &Source) -> Result<StaleOutcome, StoreError> {
        let (t, c) = keys(source);
        let tx = self.client.transaction().await.map_err(|e| err("starting a transaction", e))?;
        let unlinked = tx.execute(&sql::unlink_stale(source), &[&t, &c]).await.map_err(|e| err("unlinking", e))?;
        let mut deleted = 0;
        if unlinked > 0 {
            let row = tx.query_one(sql::DELETE_ORPHANS, &[]).await.map_err(|e| err("deleting", e))?;
            deleted = row.get::<_, i64>(0).max(0) as u64;
            tx.execute(sql::REASSIGN_SOURCE, &[&t, &c]).await.map_err(|e| err("reassigning", e))?;
        }
        tx.commit().await.map_err(|e| err("committing stale removal", e))?;
        Ok(StaleOutcome { unlinked, deleted })
    }
}
