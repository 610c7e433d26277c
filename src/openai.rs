//! [`Embedder`] over `fetch`: the core encodes and decodes, this sends.

use crate::settings::Redacted;
use embsync_core::config::ModelSpec;
use embsync_core::endpoint::ProviderEndpoint;
use embsync_core::log::LogEvent;
use embsync_core::provider::{EmbeddingRequest, Embeddings, EncodingFormat, ProviderError};
use embsync_core::sync::Embedder;
use futures::future::{select, Either};
use std::cell::Cell;
use std::time::Duration;
use worker::wasm_bindgen::JsValue;
use worker::{js_sys, wasm_bindgen_futures, web_sys};
use worker::{Delay, Fetch, Headers, Method, Request, RequestInit};

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
