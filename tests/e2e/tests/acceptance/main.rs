//! End-to-end acceptance tests of issues 2 and 4: real Postgres 18 + pgvector, the real worker under
//! `wrangler dev`, real HTTP; the only stand-in is the local embeddings provider.
//!
//! One test binary, so that `cargo test -- --test-threads=N` runs the tests in parallel. Every
//! test has its own database, provider and worker. Run them through `scripts/test.sh`, which
//! starts Postgres, builds the worker and exports the `EMBSYNC_*` variables.

mod auth;
mod batch_api;
mod batches;
mod capture;
mod config;
mod cron;
mod guards;
mod hashing;
mod indexes;
mod html;
mod hyperdrive;
mod provider;
mod prune;
mod queues;
mod runs;
mod sync;
mod tls;
