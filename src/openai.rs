//! [`Embedder`] and [`BatchApi`] over `fetch`: the core encodes and decodes, this sends.

use crate::settings::Redacted;
use embsync_core::batch_api::{self, Batch, BatchApi, BatchPage, Call, ContentStream, Upload};
use embsync_core::config::ModelSpec;
use embsync_core::endpoint::{Auth, ProviderEndpoint};
use embsync_core::log::LogEvent;
use embsync_core::provider::{EmbeddingRequest, Embeddings, EncodingFormat, ProviderError};
use embsync_core::sync::Embedder;
use futures::future::{select, Either};
use futures::StreamExt;
use std::cell::Cell;
use std::time::Duration;
use worker::wasm_bindgen::JsValue;
use worker::{js_sys, wasm_bindgen_futures, web_sys};
use worker::{ByteStream, Delay, Fetch, Headers, Method, Request, RequestInit, Response};

/// How long one request may take before it counts as failed (and is retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An embeddings endpoint: OpenAI, a compatible server or Azure OpenAI ([`ProviderEndpoint`]
/// says where each request goes and how it carries the key).
pub struct OpenAi {
    endpoint: ProviderEndpoint,
    api_key: Redacted,
    /// Base64 until the server refuses it, then float for the rest of the invocation.
    format: Cell<EncodingFormat>,
}

impl OpenAi {
    /// Requests go where `endpoint` says, with `api_key`.
    pub fn new(endpoint: ProviderEndpoint, api_key: Redacted) -> Self {
        OpenAi { endpoint, api_key, format: Cell::new(EncodingFormat::Base64) }
    }

    async fn send(&self, model: &ModelSpec, inputs: &[&str], format: EncodingFormat) -> Result<Embeddings, ProviderError> {
        let target = self.endpoint.target(model);
        let body =
            EmbeddingRequest { model: &target.model, input: inputs, dimensions: model.requested_dimensions(), encoding_format: format }
                .to_json();
        let transport = |e: worker::Error| ProviderError::Transport(e.to_string());
        let headers = Headers::new();
        headers.set(target.auth.header_name(), &target.auth.header_value(self.api_key.expose())).map_err(transport)?;
        headers.set("content-type", "application/json").map_err(transport)?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post).with_headers(headers).with_body(Some(JsValue::from_str(&body)));
        let request = Request::new_with_init(&target.url, &init).map_err(transport)?;
        let response = Fetch::Request(request).send().await.map_err(transport)?;
        let status = response.status_code();
        let headers = response.headers().clone();
        let bytes = read_body(response.into()).await.map_err(|e| ProviderError::Transport(format!("reading the answer: {e:?}")))?;
        self.endpoint.decode_response(model, status, |name| headers.get(name).ok().flatten(), &bytes, inputs.len())
    }
}

/// The whole body of `response`, read by the runtime (`arrayBuffer()`) and copied into wasm
/// memory once. `worker::Response::bytes` reads it chunk by chunk through a stream reader, a
/// promise and a copy per chunk: a quarter of the worker's CPU per batch, in a profile
/// (BENCHMARKS.md, "Where workerd's CPU goes").
async fn read_body(response: web_sys::Response) -> Result<Vec<u8>, JsValue> {
    let buffer = wasm_bindgen_futures::JsFuture::from(response.array_buffer()?).await?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

impl OpenAi {
    async fn send_with_timeout(&self, model: &ModelSpec, inputs: &[&str], format: EncodingFormat) -> Result<Embeddings, ProviderError> {
        let request = std::pin::pin!(self.send(model, inputs, format));
        let timeout = Delay::from(REQUEST_TIMEOUT);
        match select(request, timeout).await {
            Either::Left((result, _)) => result,
            Either::Right(_) => Err(ProviderError::Transport(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
        }
    }
}

impl Embedder for OpenAi {
    async fn embed(&self, model: &ModelSpec, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let format = self.format.get();
        match self.send_with_timeout(model, inputs, format).await {
            Err(e) if format == EncodingFormat::Base64 && e.is_base64_unsupported() => {
                crate::log_event(LogEvent::warn(
                    "provider",
                    format!("The provider does not take encoding_format=base64 ({e}); using float from now on"),
                ));
                self.format.set(EncodingFormat::Float);
                self.send_with_timeout(model, inputs, EncodingFormat::Float).await
            }
            other => other,
        }
    }
}

/// `future`, or a transport error once `REQUEST_TIMEOUT` has passed without it.
async fn timed<T>(what: &str, future: impl std::future::Future<Output = Result<T, ProviderError>>) -> Result<T, ProviderError> {
    let future = std::pin::pin!(future);
    match select(future, Delay::from(REQUEST_TIMEOUT)).await {
        Either::Left((result, _)) => result,
        Either::Right(_) => Err(ProviderError::Transport(format!("{what}: no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
    }
}

/// An id from the provider as one path segment: letters, digits, `-`, `_` and `.` as they are,
/// anything else percent-encoded (OpenAI's ids have none; a stand-in's might).
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A file's content as `fetch` streams it: chunk by chunk as workerd hands them over, so only
/// the chunk being read is in memory, never the whole file.
struct Content {
    stream: ByteStream,
    /// `content-length`, when the server sent one.
    expected: Option<u64>,
    /// Bytes read so far.
    read: u64,
}

impl ContentStream for Content {
    fn next_chunk(&mut self) -> Call<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let next = timed("reading a Batch API file", async { Ok(self.stream.next().await) }).await?;
            match next {
                Some(Ok(chunk)) => {
                    self.read += chunk.len() as u64;
                    Ok(Some(chunk))
                }
                Some(Err(e)) => Err(ProviderError::Transport(format!("reading a Batch API file after {} bytes: {e}", self.read))),
                // workers-rs ends the stream without an error when the connection is aborted;
                // the length the server announced tells a cut file from a whole one.
                None => match self.expected {
                    Some(n) if n != self.read => Err(ProviderError::Transport(format!(
                        "a Batch API file ended after {} of its {n} bytes (the connection was cut)",
                        self.read
                    ))),
                    _ => Ok(None),
                },
            }
        })
    }
}

impl OpenAi {
    /// Whether the Batch API can be used: OpenAI or a server that speaks its API. Azure OpenAI's
    /// batches need a deployment of the "Global Batch" type and its name in each request, which
    /// the config does not give: with Azure, every model goes the synchronous way.
    pub fn has_batch_api(&self) -> bool {
        matches!(self.endpoint, ProviderEndpoint::OpenAi { .. })
    }

    /// Sends one Batch API request to `{OPENAI_BASE_URL}/{path}` with the key, and answers the
    /// response of a 2xx; any other status is the provider's error, decoded by the embeddings
    /// endpoint's rules ([`batch_api::error_of`]).
    async fn batch_send(&self, method: Method, path: &str, body: Option<(&str, JsValue)>) -> Result<Response, ProviderError> {
        let ProviderEndpoint::OpenAi { base_url } = &self.endpoint else {
            return Err(ProviderError::RequestRejected {
                status: 400,
                message: "the Batch API is used with OpenAI only: with Azure OpenAI, remove batchApi from the config".into(),
            });
        };
        let transport = |e: worker::Error| ProviderError::Transport(e.to_string());
        let headers = Headers::new();
        headers.set(Auth::Bearer.header_name(), &Auth::Bearer.header_value(self.api_key.expose())).map_err(transport)?;
        let mut init = RequestInit::new();
        if let Some((content_type, body)) = body {
            headers.set("content-type", content_type).map_err(transport)?;
            init.with_body(Some(body));
        }
        init.with_method(method).with_headers(headers);
        let request = Request::new_with_init(&format!("{base_url}/{path}"), &init).map_err(transport)?;
        let what = format!("the Batch API ({path})");
        let mut response = timed(&what, async { Fetch::Request(request).send().await.map_err(transport) }).await?;
        let status = response.status_code();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let bytes = timed(&what, async { response.bytes().await.map_err(transport) }).await?;
        let headers = response.headers();
        Err(batch_api::error_of(status, |name| headers.get(name).ok().flatten(), &bytes))
    }

    /// [`OpenAi::batch_send`] and the whole answer (a small JSON object).
    async fn batch_json(&self, method: Method, path: &str, body: Option<(&str, JsValue)>) -> Result<Vec<u8>, ProviderError> {
        let mut response = self.batch_send(method, path, body).await?;
        timed("the Batch API", async { response.bytes().await.map_err(|e| ProviderError::Transport(e.to_string())) }).await
    }

    async fn batch_object(&self, method: Method, path: &str, body: Option<(&str, JsValue)>) -> Result<Batch, ProviderError> {
        let bytes = self.batch_json(method, path, body).await?;
        Batch::parse(&bytes).map_err(|e| ProviderError::Malformed(e.to_string()))
    }
}

impl BatchApi for OpenAi {
    fn upload<'a>(&'a self, upload: &'a Upload) -> Call<'a, String> {
        Box::pin(async move {
            // The body goes as bytes (a copy into JS memory), not as a string.
            let body = JsValue::from(worker::js_sys::Uint8Array::from(upload.body.as_slice()));
            let bytes = self.batch_json(Method::Post, "files", Some((&upload.content_type, body))).await?;
            batch_api::file_id(&bytes).map_err(|e| ProviderError::Malformed(e.to_string()))
        })
    }

    fn create<'a>(&'a self, body: &'a str) -> Call<'a, Batch> {
        Box::pin(self.batch_object(Method::Post, "batches", Some(("application/json", JsValue::from_str(body)))))
    }

    fn retrieve<'a>(&'a self, batch_id: &'a str) -> Call<'a, Batch> {
        Box::pin(async move { self.batch_object(Method::Get, &format!("batches/{}", segment(batch_id)), None).await })
    }

    fn cancel<'a>(&'a self, batch_id: &'a str) -> Call<'a, Batch> {
        Box::pin(async move { self.batch_object(Method::Post, &format!("batches/{}/cancel", segment(batch_id)), None).await })
    }

    fn list<'a>(&'a self, after: Option<&'a str>, limit: u32) -> Call<'a, BatchPage> {
        Box::pin(async move {
            let path = match after {
                Some(after) => format!("batches?limit={limit}&after={}", segment(after)),
                None => format!("batches?limit={limit}"),
            };
            let bytes = self.batch_json(Method::Get, &path, None).await?;
            BatchPage::parse(&bytes).map_err(|e| ProviderError::Malformed(e.to_string()))
        })
    }

    fn content<'a>(&'a self, file_id: &'a str) -> Call<'a, Box<dyn ContentStream + 'a>> {
        Box::pin(async move {
            let mut response = self.batch_send(Method::Get, &format!("files/{}/content", segment(file_id)), None).await?;
            let header = |name: &str| response.headers().get(name).ok().flatten();
            // The announced length is of the bytes on the wire: with a content encoding, fetch
            // hands over more, and it says nothing about what arrives.
            let encoded = header("content-encoding").is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
            let expected = if encoded { None } else { header("content-length").and_then(|n| n.trim().parse::<u64>().ok()) };
            let stream = match response.stream() {
                Ok(stream) => stream,
                // An empty body has no stream.
                Err(_) if expected.unwrap_or(0) == 0 => {
                    return Ok(Box::new(Empty) as Box<dyn ContentStream + 'a>);
                }
                Err(e) => return Err(ProviderError::Transport(format!("reading a Batch API file: {e}"))),
            };
            Ok(Box::new(Content { stream, expected, read: 0 }) as Box<dyn ContentStream + 'a>)
        })
    }

    fn delete_file<'a>(&'a self, file_id: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            self.batch_json(Method::Delete, &format!("files/{}", segment(file_id)), None).await?;
            Ok(())
        })
    }
}

/// A file with no content.
struct Empty;

impl ContentStream for Empty {
    fn next_chunk(&mut self) -> Call<'_, Option<Vec<u8>>> {
        Box::pin(async { Ok(None) })
    }
}
