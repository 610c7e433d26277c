//! The Batch API's transport over real HTTP/1.1 to the local provider, started in-process on a
//! free port, with switches that cut the flow where a Worker can be cut: a create whose answer
//! is lost (the batch exists) or that never reached the provider, and a file's content that
//! breaks off after some chunks. Every call is recorded.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;

use embsync_core::batch_api::{self, Batch, BatchApi, BatchPage, Call, ContentStream, Upload};
use embsync_core::provider::ProviderError;
use local_provider::client::{send, Reply};
use serde_json::Value;

const KEY: &str = "sk-batch-flow-0123456789";

/// The transport and its switches.
pub struct HttpBatchApi {
    pub addr: SocketAddr,
    /// Bytes per content chunk (small, so lines are cut across chunks).
    pub chunk: usize,
    /// `create` fails without reaching the provider (a retryable transport error).
    pub create_unsent: Cell<bool>,
    /// `create` reaches the provider, which creates the batch, and the answer is lost.
    pub create_lost: Cell<bool>,
    /// `list` fails (a 503).
    pub list_fails: Cell<bool>,
    /// The next content stream breaks off this many bytes before its end (once).
    pub break_content_before_end: Cell<Option<usize>>,
    /// The next content stream ends, without an error, after this many whole lines (once): a
    /// download cut at a line boundary, which looks complete.
    pub end_content_after_lines: Cell<Option<usize>>,
    /// The next upload, once it succeeded, hands the sync lease to another holder in this
    /// database (URL): the invocation is cut between the upload and its record.
    pub steal_lease_after_upload: RefCell<Option<String>>,
    /// Every call: `METHOD path`.
    pub calls: RefCell<Vec<String>>,
}

impl HttpBatchApi {
    /// A local provider of its own with the Batch API's switches `switches` (JSON for
    /// `/_admin/batch`, e.g. `{}`), and a transport to it.
    pub fn start(switches: &str) -> HttpBatchApi {
        let config = local_provider::Config { api_key: Some(KEY.to_string()), ..local_provider::Config::default() };
        let addr = local_provider::Server::bind(&config).expect("bind").spawn().expect("spawn");
        let api = HttpBatchApi {
            addr,
            chunk: 700,
            create_unsent: Cell::new(false),
            create_lost: Cell::new(false),
            list_fails: Cell::new(false),
            break_content_before_end: Cell::new(None),
            end_content_after_lines: Cell::new(None),
            steal_lease_after_upload: RefCell::new(None),
            calls: RefCell::new(Vec::new()),
        };
        api.admin("POST", "/_admin/batch", switches);
        api
    }

    /// Sets the provider's Batch API switches.
    pub fn switches(&self, switches: &str) {
        self.admin("POST", "/_admin/batch", switches);
    }

    /// An admin call (no key); its JSON answer.
    pub fn admin(&self, method: &str, path: &str, body: &str) -> Value {
        let answer = send(self.addr, method, path, &[], body.as_bytes());
        assert_eq!(answer.status, 200, "{method} {path}: {}", String::from_utf8_lossy(&answer.body));
        serde_json::from_slice(&answer.body).expect("JSON")
    }

    /// The batches the provider holds (`/_admin/batches`): id, status, input file, inputs.
    pub fn batches(&self) -> Vec<Value> {
        self.admin("GET", "/_admin/batches", "").as_array().cloned().unwrap_or_default()
    }

    /// Every input the provider's batches embed (each batch's inputs, all batches).
    pub fn batch_inputs(&self) -> Vec<String> {
        let mut inputs = Vec::new();
        for batch in self.batches() {
            let id = batch["id"].as_str().unwrap().to_string();
            let listed = self.admin("GET", &format!("/_admin/batches/{id}/inputs"), "");
            inputs.extend(listed.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()));
        }
        inputs
    }

    /// The calls of the transport that start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.calls.borrow().iter().filter(|c| c.starts_with(prefix)).count()
    }

    fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Result<Reply, ProviderError> {
        self.calls.borrow_mut().push(format!("{method} {path}"));
        let mut headers = vec![("Authorization", format!("Bearer {KEY}"))];
        if let Some(content_type) = content_type {
            headers.push(("Content-Type", content_type.to_string()));
        }
        let answer = send(self.addr, method, path, &headers, body);
        if (200..300).contains(&answer.status) {
            Ok(answer)
        } else {
            Err(batch_api::error_of(answer.status, |_| None, &answer.body))
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Malformed(e.to_string())
}

impl BatchApi for HttpBatchApi {
    fn upload<'a>(&'a self, upload: &'a Upload) -> Call<'a, String> {
        Box::pin(async move {
            let answer = self.call("POST", "/v1/files", Some(&upload.content_type), &upload.body)?;
            let steal = self.steal_lease_after_upload.borrow_mut().take();
            if let Some(url) = steal {
                let client = super::connect(&url).await;
                client
                    .batch_execute("UPDATE embedding_sync_lease SET holder = 'thief', expires_at = now() + interval '1 second'")
                    .await
                    .expect("stealing the lease");
            }
            batch_api::file_id(&answer.body).map_err(malformed)
        })
    }

    fn create<'a>(&'a self, body: &'a str) -> Call<'a, Batch> {
        Box::pin(async move {
            if self.create_unsent.get() {
                self.calls.borrow_mut().push("POST /v1/batches (unsent)".to_string());
                return Err(ProviderError::Transport("connection reset before the request was sent".into()));
            }
            let answer = self.call("POST", "/v1/batches", Some("application/json"), body.as_bytes())?;
            if self.create_lost.get() {
                return Err(ProviderError::Transport("connection reset before the answer".into()));
            }
            Batch::parse(&answer.body).map_err(malformed)
        })
    }

    fn retrieve<'a>(&'a self, batch_id: &'a str) -> Call<'a, Batch> {
        Box::pin(async move {
            let answer = self.call("GET", &format!("/v1/batches/{batch_id}"), None, b"")?;
            Batch::parse(&answer.body).map_err(malformed)
        })
    }

    fn cancel<'a>(&'a self, batch_id: &'a str) -> Call<'a, Batch> {
        Box::pin(async move {
            let answer = self.call("POST", &format!("/v1/batches/{batch_id}/cancel"), None, b"")?;
            Batch::parse(&answer.body).map_err(malformed)
        })
    }

    fn list<'a>(&'a self, after: Option<&'a str>, limit: u32) -> Call<'a, BatchPage> {
        Box::pin(async move {
            let path = match after {
                Some(after) => format!("/v1/batches?limit={limit}&after={after}"),
                None => format!("/v1/batches?limit={limit}"),
            };
            if self.list_fails.get() {
                self.calls.borrow_mut().push(format!("GET {path} (503)"));
                return Err(ProviderError::Server { status: 503, message: "unavailable".into() });
            }
            let answer = self.call("GET", &path, None, b"")?;
            BatchPage::parse(&answer.body).map_err(malformed)
        })
    }

    fn content<'a>(&'a self, file_id: &'a str) -> Call<'a, Box<dyn ContentStream + 'a>> {
        Box::pin(async move {
            let mut answer = self.call("GET", &format!("/v1/files/{file_id}/content"), None, b"")?;
            if let Some(lines) = self.end_content_after_lines.take() {
                let ends = answer.body.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1);
                let cut = ends.take(lines).last().unwrap_or(0);
                answer.body.truncate(cut);
            }
            let stream: Box<dyn ContentStream + 'a> =
                Box::new(Chunked { body: answer.body, at: 0, chunk: self.chunk, break_before_end: self.break_content_before_end.take() });
            Ok(stream)
        })
    }

    fn delete_file<'a>(&'a self, file_id: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            self.call("DELETE", &format!("/v1/files/{file_id}"), None, b"")?;
            Ok(())
        })
    }
}

/// A body handed out in chunks, breaking off `break_before_end` bytes before its end if set.
struct Chunked {
    body: Vec<u8>,
    at: usize,
    chunk: usize,
    break_before_end: Option<usize>,
}

impl ContentStream for Chunked {
    fn next_chunk(&mut self) -> Call<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let len = self.body.len();
            let stop = self.break_before_end.map_or(len, |before| len.saturating_sub(before));
            if self.at >= stop && stop < len {
                return Err(ProviderError::Transport("the connection broke off mid-body".into()));
            }
            if self.at >= len {
                return Ok(None);
            }
            let end = (self.at + self.chunk).min(stop.max(self.at + 1)).min(len);
            let piece = self.body[self.at..end].to_vec();
            self.at = end;
            Ok(Some(piece))
        })
    }
}
