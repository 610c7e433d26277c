//! Harness for the end-to-end tests of embsync.
//!
//! Every test gets real parts: a fresh database in the shared Postgres 18 + pgvector cluster
//! ([`TestDb`]), the local OpenAI-compatible provider ([`Provider`]) and the real worker under
//! `wrangler dev` ([`Worker`]). Nothing is mocked but the embeddings provider.
//!
//! The environment comes from `scripts/test.sh`: `EMBSYNC_TEST_PG_URL`, `EMBSYNC_PROVIDER_BIN`,
//! `EMBSYNC_REPO`, `EMBSYNC_NODE`, `EMBSYNC_WRANGLER_JS` and `EMBSYNC_CHROMIUM` (the headless
//! browser that [`Browser`] runs).
//!
//! Each part cleans up on `Drop`. When a test fails (the thread is panicking), the worker's and
//! the provider's logs are kept and their tails printed, so the failure can be read in context.
//!
//! One module per part the harness drives, all re-exported here (the tests `use embsync_e2e::*`):
//! `pg` (throwaway databases and their queries, a private cluster), `pgbouncer` (Hyperdrive's
//! stand-in), `provider` (the local provider process, its admin API and request log), `wrangler`
//! (`wrangler dev`: starting and stopping the worker, its HTTP routes, cron, local KV), `events`
//! (the worker's captured log and structured events), `http` (the HTTP client), `browser`
//! (headless Chromium), `sources` and `report` (the config the tests give and the reports they
//! read), `values` (hashes, vectors, base64) and `util` (environment, names, temp files, polling).

/// The bearer token the tests configure as `SYNC_API_TOKEN`.
pub const TOKEN: &str = "e2e-sync-token-0123456789";
/// The API key the tests give the worker and the provider.
pub const API_KEY: &str = "sk-e2e-test-key";
/// Dimensions of the two models.
pub const LARGE_DIMS: usize = 3072;
pub const SMALL_DIMS: usize = 1536;
pub const LARGE_MODEL: &str = "text-embedding-3-large";
pub const SMALL_MODEL: &str = "text-embedding-3-small";

mod browser;
mod events;
mod http;
mod pg;
mod pgbouncer;
mod provider;
mod report;
mod sources;
mod util;
mod values;
mod wrangler;

pub use browser::*;
pub use http::HttpResponse;
pub use pg::*;
pub use pgbouncer::*;
pub use provider::*;
pub use report::*;
pub use sources::*;
pub use util::*;
pub use values::*;
pub use wrangler::*;
