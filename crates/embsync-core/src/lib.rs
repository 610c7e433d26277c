//! The pure core of embsync: everything that decides what to do, and nothing that does IO.
//!
//! - [`auth`]: token checks for the endpoints (bearer, and Basic for the HTML page).
//! - [`batch`]: packing values into requests by token and input limits.
//! - [`batch_api`]: OpenAI's Batch API: request files, output lines, the way and the price.
//! - [`batch_flow`]: the Batch API's driver flow: submit, poll, read the output.
//! - [`config`]: `embedding-sources.json` parsed once into [`Config`].
//! - [`ident`]: the only way a table or column name reaches SQL.
//! - [`dburl`]: `DATABASE_URL` modes (`sslmode`, `channel_binding`) for the socket API.
//! - [`database`]: a Hyperdrive binding or `DATABASE_URL`: which one is used, and the log line.
//! - [`hash`]: the value hash contract.
//! - [`index`]: which HNSW indexes the sync keeps on the embedding columns (`vectorIndexes`).
//! - [`sql`]: every statement, as text with bound parameters.
//! - [`provider`]: OpenAI embeddings request encoding and response decoding.
//! - [`rate`]: how much provider work an invocation keeps in flight.
//! - [`prune`]: sources that left the config, and pruning them on request.
//! - [`fanout`]: a large source's pending values split into ranges for queue consumers.
//! - [`endpoint`]: where requests go and how they carry the key (OpenAI or Azure OpenAI).
//! - [`vector`]: base64 float32 and pgvector binary encodings.
//! - [`sync`]: the driver, over the [`sync::Store`], [`sync::Embedder`] and [`sync::Runtime`] traits.
//! - [`report`]: run and dry-run reports.
//! - [`log`]: structured log events (one JSON object per line).
//! - [`status`]: what `GET /status` answers; [`html`] renders it as a page for people.
//!
//! ```
//! use embsync_core::{config::Config, hash::Value};
//!
//! let config = Config::parse(include_str!("../../../embedding-sources.json")).unwrap();
//! assert_eq!(config.enabled_sources().count(), 3);
//! let v = Value::normalize("  hello ").unwrap();
//! assert_eq!(v.as_str(), "hello");
//! assert_eq!(v.hash().as_str(), "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
//! ```

#![warn(missing_docs)]

pub mod auth;
pub mod batch;
pub mod batch_api;
pub mod batch_flow;
pub mod config;
pub mod database;
pub mod dburl;
pub mod endpoint;
pub mod fanout;
pub mod hash;
pub mod html;
pub mod ident;
pub mod index;
pub mod log;
pub mod provider;
pub mod prune;
pub mod rate;
pub mod report;
pub mod sql;
pub mod status;
pub mod sync;
pub mod vector;

pub use config::Config;
pub use fanout::{consume, dead_letter, Consume, Consumed, FanOut, RangeMessage};

