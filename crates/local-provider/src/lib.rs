//! `local-provider`: an OpenAI-compatible embeddings server for embsync's
//! tests and the local demo.
//!
//! It answers `POST /v1/embeddings` like the OpenAI API does (same request
//! fields, validation errors, error bodies, headers and response shape) with
//! deterministic vectors, records every embeddings request for tests to
//! inspect, and injects faults (errors, broken bodies, latency) on demand.
//! See `README.md` beside this crate for the HTTP interface.
//!
//! Modules, from the wire inwards:
//! * [`server`]: the HTTP/1.1 server (hyper on tokio) and the faults it injects on the wire;
//! * [`http`]: requests and responses as the handlers see them (plain data);
//! * [`app`]: routing and endpoint handlers;
//! * [`api`]: the OpenAI request/response/error formats and validation;
//! * [`batch`]: the Batch API (`/v1/files`, `/v1/batches`) and its switches;
//! * [`azure`]: Azure OpenAI mode (its paths, `api-key`, `api-version`, deployments);
//! * [`faults`]: fault rules and their selection;
//! * [`log`]: the request log;
//! * [`ratelimit`]: the rate-limit mode (OpenAI's per-minute request and token limits);
//! * [`vectors`] and [`tokens`]: deterministic vectors and token counts;
//! * [`cli`]: command-line parsing.

pub mod api;
pub mod app;
pub mod azure;
pub mod batch;
pub mod cli;
pub mod faults;
pub mod http;
pub mod log;
pub mod ratelimit;
pub mod server;
pub mod tokens;
pub mod vectors;

pub use server::{Config, Server};

pub mod client;

#[cfg(test)]
mod batch_server_tests;
#[cfg(test)]
mod server_tests;
