//! The OpenAI embeddings API, as pure encode and decode.
//!
//! The worker sends [`EmbeddingRequest::to_json`] with `fetch` and hands the status, headers
//! and body to [`decode_response`]; nothing here performs IO. Any OpenAI-compatible server
//! (Azure OpenAI, a local server) speaks the same body shapes; where a request goes and how it
//! carries the key is [`crate::endpoint`]'s.

use crate::vector::{Vector, VectorDecodeError};

mod fast;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the provider should encode vectors in its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// JSON arrays of numbers.
    Float,
    /// Base64 of little-endian float32: about a quarter of the bytes and far cheaper to parse.
    Base64,
}

/// One `POST /embeddings` body.
#[derive(Debug, Serialize)]
pub struct EmbeddingRequest<'a> {
    /// The model name.
    pub model: &'a str,
    /// The texts, in order.
    pub input: &'a [&'a str],
    /// Only sent when the config sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// The vector encoding asked for.
    pub encoding_format: EncodingFormat,
}

impl EmbeddingRequest<'_> {
    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a request always serialises")
    }
}

/// A decoded answer: one vector per input, in input order, and the provider's token count.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector per input, in input order.
    pub vectors: Vec<Vector>,
    /// `usage.prompt_tokens` as the provider reported it (0 when absent).
    pub prompt_tokens: u64,
    /// The rate-limit state the provider reported, if it did.
    pub rate: Option<RateLimit>,
}

/// The `x-ratelimit-*` headers of an answer.
///
/// OpenAI's limits are buckets that refill continuously: `limit` per minute, so a request or a
/// token comes back every `60 s / limit`. `reset` is the time until the bucket is *full* again,
/// not until the next request fits: a wait for room takes only as long as the missing amount
/// takes to refill ([`refill_wait`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per minute (`x-ratelimit-limit-requests`).
    pub limit_requests: Option<u64>,
    /// Tokens per minute (`x-ratelimit-limit-tokens`).
    pub limit_tokens: Option<u64>,
    /// Requests left in the bucket.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the bucket.
    pub remaining_tokens: Option<u64>,
    /// Until the request bucket is full again.
    pub reset_requests: Option<Duration>,
    /// Until the token bucket is full again.
    pub reset_tokens: Option<Duration>,
}

impl RateLimit {
    /// Reads the headers; `None` when the provider sent none.
    pub fn from_headers(header: impl Fn(&str) -> Option<String>) -> Option<RateLimit> {
        let num = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
        let dur = |name: &str| header(name).and_then(|v| parse_reset(&v));
        let r = RateLimit {
            limit_requests: num("x-ratelimit-limit-requests"),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_requests: dur("x-ratelimit-reset-requests"),
            reset_tokens: dur("x-ratelimit-reset-tokens"),
        };
        (r.remaining_requests.is_some() || r.remaining_tokens.is_some()).then_some(r)
    }

    /// How long to wait before a next request of about `next_tokens` tokens, so that it is not
    /// throttled: until two requests and `next_tokens` tokens have refilled ([`refill_wait`]);
    /// `None` when there is room.
    pub fn pause(&self, next_tokens: u64) -> Option<Duration> {
        let requests = self.remaining_requests.and_then(|r| refill_wait(r as f64, 2.0, self.limit_requests, self.reset_requests));
        let tokens = self.remaining_tokens.and_then(|t| refill_wait(t as f64, next_tokens as f64, self.limit_tokens, self.reset_tokens));
        requests.max(tokens)
    }
}

/// How long until `need` fits in a bucket that holds `remaining` now, refills at `limit` per
/// minute, and is full again after `reset`: `(need - remaining) × 60 s / limit`, and never
/// longer than `reset` (a full bucket is the most there will be). Without `limit` (a provider
/// that does not send it) the refill rate is unknown and it is `reset`; without `reset`, a
/// second. `None` when `need` fits now.
pub fn refill_wait(remaining: f64, need: f64, limit: Option<u64>, reset: Option<Duration>) -> Option<Duration> {
    if remaining >= need {
        return None;
    }
    let full = reset.unwrap_or(Duration::from_secs(1));
    let refill = limit.filter(|&l| l > 0).map(|l| Duration::from_secs_f64((need - remaining) * 60.0 / l as f64));
    Some(refill.map_or(full, |r| r.min(full)))
}

/// Parses OpenAI's reset durations: `1s`, `6m0s`, `20ms`, `1.5s`, `1h2m3s`.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 429: slow down and retry.
    #[error("rate limited by the provider (429): {message}")]
    RateLimited {
        /// How long the provider asked us to wait (`retry-after-ms` or `retry-after`).
        retry_after: Option<Duration>,
        /// The provider's message.
        message: String,
    },
    /// 5xx: the provider failed; retry later.
    #[error("provider error ({status}): {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
    /// 401 or 403: the key is wrong; nothing will work until it is fixed.
    #[error("the provider rejected the API key ({status}): check the OPENAI_API_KEY secret")]
    Unauthorized {
        /// The HTTP status.
        status: u16,
    },
    /// A 4xx about an input (too long, invalid, filtered): this request will never succeed as
    /// it is, but one without the input may; splitting the request isolates the value.
    #[error("provider refused the request ({status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
    /// A 4xx about the request itself, not any input: the model is unknown (404), `dimensions`
    /// or another parameter is refused, the body is too large (413) or of the wrong shape.
    /// No value is to blame, and no request of this model succeeds until the config is fixed.
    #[error("the provider refused the request itself ({status}): {message}")]
    RequestRejected {
        /// The HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
    /// The body is not the documented shape.
    #[error("malformed provider response: {0}")]
    Malformed(String),
    /// The request never got an answer (network failure or timeout).
    #[error("could not reach the provider: {0}")]
    Transport(String),
}

impl ProviderError {
    /// Whether trying the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::RateLimited { .. } | ProviderError::Server { .. } | ProviderError::Transport(_))
    }

    /// Whether the provider refused `encoding_format: "base64"`, so the request should be sent
    /// again with `float`.
    pub fn is_base64_unsupported(&self) -> bool {
        matches!(self, ProviderError::Rejected { status: 400 | 422, message } | ProviderError::RequestRejected { status: 400 | 422, message }
            if message.contains("encoding_format") || message.contains("base64"))
    }

    /// Whether the provider refused the request itself rather than one of its inputs: splitting
    /// it would only repeat the refusal, and no value is to blame.
    pub fn is_request_level(&self) -> bool {
        matches!(self, ProviderError::RequestRejected { .. })
    }

    /// Whether the whole run must stop: no later request can succeed either.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ProviderError::Unauthorized { .. })
    }

    /// The status and message of a refusal (a 4xx other than 401/403/429), for the edge to add
    /// what it knows (see [`crate::endpoint`]). Every variant is listed, so that a new kind of
    /// refusal has to say whether it is one.
    pub(crate) fn refusal_mut(&mut self) -> Option<(u16, &mut String)> {
        match self {
            ProviderError::Rejected { status, message } | ProviderError::RequestRejected { status, message } => Some((*status, message)),
            ProviderError::RateLimited { .. }
            | ProviderError::Server { .. }
            | ProviderError::Unauthorized { .. }
            | ProviderError::Malformed(_)
            | ProviderError::Transport(_) => None,
        }
    }

    /// The wait the provider asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct ResponseBody {
    data: Vec<Item>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Item {
    index: usize,
    embedding: RawVector,
}

/// One `embedding`: a JSON array of numbers, or a base64 string decoded as it is read (borrowed
/// from the body, never copied). A hand-written visitor instead of `#[serde(untagged)]`, which
/// would buffer the value and, for a base64 string, format an error holding all of it first.
enum RawVector {
    Floats(Vec<f32>),
    Base64(Result<Vector, VectorDecodeError>),
}

impl<'de> Deserialize<'de> for RawVector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawVector;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of numbers or a base64 string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawVector, E> {
                Ok(RawVector::Base64(Vector::from_base64_f32(v)))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawVector, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1536));
                while let Some(v) = seq.next_element::<f32>()? {
                    out.push(v);
                }
                Ok(RawVector::Floats(out))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    /// The request field the error is about (`input`, `model`, `dimensions`), often `null`.
    #[serde(default)]
    param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`), often `null`.
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// The `error.code` of an error body (Azure's `DeploymentNotFound`, OpenAI's
/// `model_not_found`), if it has one, as text.
pub(crate) fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        error: Code,
    }
    #[derive(Deserialize)]
    struct Code {
        #[serde(default)]
        code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Body>(body).ok()?.error.code? {
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// The longest provider message kept in an error.
const MAX_MESSAGE: usize = 300;

/// Decodes an answer to a request of `inputs` texts for vectors of `dimensions` values.
///
/// `header` looks up a response header by lowercase name. Either encoding is accepted whatever
/// was asked for, so a compatible server that ignores `encoding_format` still works.
///
/// # Errors
/// [`ProviderError`] classifying the status, or [`ProviderError::Malformed`] when a 200 body has
/// the wrong shape, the wrong number of items, or vectors of the wrong length.
pub fn decode_response(
    status: u16,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    inputs: usize,
    dimensions: u32,
) -> Result<Embeddings, ProviderError> {
    if status != 200 {
        return Err(classify_error(status, &header, body));
    }
    let parsed = match fast::parse(body) {
        Some(parsed) => parsed,
        None => parse_with_serde(body)?,
    };
    if parsed.items.len() != inputs {
        return Err(ProviderError::Malformed(format!("{} embeddings for {inputs} inputs", parsed.items.len())));
    }
    let mut vectors: Vec<Option<Vector>> = vec![None; inputs];
    for (index, vector) in parsed.items {
        let vector = vector.map_err(|e| ProviderError::Malformed(e.to_string()))?;
        if vector.dims() != dimensions as usize {
            return Err(ProviderError::Malformed(format!("embedding {index} has {} dimensions, expected {dimensions}", vector.dims())));
        }
        match vectors.get_mut(index) {
            Some(slot @ None) => *slot = Some(vector),
            Some(Some(_)) => return Err(ProviderError::Malformed(format!("index {index} appears twice"))),
            None => return Err(ProviderError::Malformed(format!("index {index} is out of range for {inputs} inputs"))),
        }
    }
    let vectors = vectors.into_iter().map(|v| v.expect("every index was filled exactly once")).collect();
    Ok(Embeddings { vectors, prompt_tokens: parsed.prompt_tokens, rate: RateLimit::from_headers(header) })
}

/// A 200 body's items (index and vector, in body order) and token usage, before the checks
/// against the request.
#[derive(Debug, PartialEq)]
struct Parsed {
    items: Vec<(usize, Result<Vector, VectorDecodeError>)>,
    prompt_tokens: u64,
}

/// Reads any body `serde_json` accepts: float arrays, escapes, any layout; the reference for
/// [`fast::parse`], and the path that words the errors.
fn parse_with_serde(body: &[u8]) -> Result<Parsed, ProviderError> {
    let parsed: ResponseBody =
        serde_json::from_slice(body).map_err(|e| ProviderError::Malformed(format!("body is not the embeddings shape: {e}")))?;
    let items = parsed
        .data
        .into_iter()
        .map(|item| {
            let vector = match item.embedding {
                RawVector::Floats(v) => Vector::from_f32(&v),
                RawVector::Base64(decoded) => decoded,
            };
            (item.index, vector)
        })
        .collect();
    Ok(Parsed { items, prompt_tokens: parsed.usage.map_or(0, |u| u.prompt_tokens) })
}

pub(crate) fn classify_error(status: u16, header: &impl Fn(&str) -> Option<String>, body: &[u8]) -> ProviderError {
    let (message, param, code) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) if !b.error.message.is_empty() => {
            let code = match b.error.code {
                Some(serde_json::Value::String(c)) => Some(c),
                _ => None,
            };
            (b.error.message, b.error.param, code)
        }
        _ => (String::from_utf8_lossy(body).trim().to_owned(), None, None),
    };
    let about_an_input = is_about_an_input(param.as_deref(), code.as_deref(), &message, body);
    let message = truncate(if message.is_empty() { "no message".to_owned() } else { message });
    match status {
        429 => ProviderError::RateLimited { retry_after: retry_after(header), message },
        401 | 403 => ProviderError::Unauthorized { status },
        408 | 409 => ProviderError::Server { status, message },
        500..=599 => ProviderError::Server { status, message },
        // Not found (the model, or a wrong base URL), method not allowed, body too large: never
        // about one input.
        404 | 405 | 413 => ProviderError::RequestRejected { status, message },
        _ if about_an_input => ProviderError::Rejected { status, message },
        _ => ProviderError::RequestRejected { status, message },
    }
}

/// Whether a refusal is about an input rather than the request itself. OpenAI names the field
/// in `param` only sometimes (`"param": "input"`); its context-length and invalid-input errors
/// carry `"param": null` and say it in the message ("This model's maximum context length is
/// 8192 tokens, however you requested ...", "'$.input' is invalid", "Invalid 'input': ...");
/// Azure's content filter has `"code": "content_filter"`; FastAPI-style servers answer 422
/// with `"loc": ["body", "input", 3]`. Anything else (an unknown model, `dimensions`, an
/// unreadable body) is about the request.
fn is_about_an_input(param: Option<&str>, code: Option<&str>, message: &str, body: &[u8]) -> bool {
    if matches!(code, Some("context_length_exceeded" | "content_filter" | "invalid_input" | "string_above_max_length")) {
        return true;
    }
    if let Some(param) = param {
        return param == "input" || param.starts_with("input[") || param.starts_with("input.");
    }
    let m = message.to_lowercase();
    let says = ["context length", "context window", "'$.input'", "invalid 'input", "input length", "too many tokens", "token", "prompt"];
    says.iter().any(|s| m.contains(s)) || memchr::memmem::find(body, br#""input""#).is_some()
}

/// Reads `retry-after-ms` (milliseconds, OpenAI's own) or `retry-after` (seconds).
pub fn retry_after(header: impl Fn(&str) -> Option<String>) -> Option<Duration> {
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let secs = header("retry-after").and_then(|v| v.trim().parse::<f64>().ok())?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::encode_base64_f32;
    use expect_test::{expect, Expect};

    fn check(status: u16, headers: &[(&str, &str)], body: &str, inputs: usize, dims: u32, expect: Expect) {
        let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        let actual = match decode_response(status, lookup, body.as_bytes(), inputs, dims) {
            Ok(e) => format!("ok {:?} tokens={} rate={:?}", e.vectors, e.prompt_tokens, e.rate),
            Err(e) => format!("err {e} retryable={} fatal={} wait={:?}", e.is_retryable(), e.is_fatal(), e.retry_after()),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn request_json() {
        let input = ["hello", "wörld \"quoted\""];
        let req =
            EmbeddingRequest { model: "text-embedding-3-small", input: &input, dimensions: None, encoding_format: EncodingFormat::Base64 };
        expect![[r#"{"model":"text-embedding-3-small","input":["hello","wörld \"quoted\""],"encoding_format":"base64"}"#]]
            .assert_eq(&req.to_json());
        let req = EmbeddingRequest { dimensions: Some(512), encoding_format: EncodingFormat::Float, ..req };
        expect![[r#"{"model":"text-embedding-3-small","input":["hello","wörld \"quoted\""],"dimensions":512,"encoding_format":"float"}"#]]
            .assert_eq(&req.to_json());
    }

    #[test]
    fn ok_bodies() {
        check(
            200,
            &[],
            r#"{"object":"list","data":[{"object":"embedding","index":1,"embedding":[0.5,0.25]},{"object":"embedding","index":0,"embedding":[1.0,-1.0]}],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#,
            2,
            2,
            expect!["ok [Vector(2 dims: [1, -1]), Vector(2 dims: [0.5, 0.25])] tokens=7 rate=None"],
        );
        let b64 = encode_base64_f32(&[0.5, -2.0]);
        check(
            200,
            &[],
            &format!(r#"{{"data":[{{"index":0,"embedding":"{b64}"}}],"usage":{{"prompt_tokens":3}}}}"#),
            1,
            2,
            expect!["ok [Vector(2 dims: [0.5, -2])] tokens=3 rate=None"],
        );
    }

    /// A small body with everything the fast path reads and skips.
    fn small_body() -> String {
        let (a, b) = (encode_base64_f32(&[0.5, -2.0, 1e-3]), encode_base64_f32(&[3.0, 0.0, -0.25]));
        format!(
            r#"{{"object":"list","data":[{{"object":"embedding","index":1,"embedding":"{a}"}},
            {{ "index" : 0 , "embedding":"{b}", "x":[1,-2.5,0,true,false,null,{{"k":"vé"}},[]] }}],
            "model":"m","usage":{{"prompt_tokens":12,"total_tokens":12}}}}"#
        )
    }

    #[test]
    fn the_fast_path_reads_bodies_as_serde_does() {
        let v = encode_base64_f32(&[0.5, -2.0]);
        let bodies = [
            small_body(),
            format!(r#"{{"data":[{{"index":0,"embedding":"{v}"}}]}}"#),
            format!(r#"{{"usage":null,"data":[{{"embedding":"{v}","index":0}}]}}"#),
            format!(r#"{{"usage":{{}},"data":[]}}"#),
            format!("\n {{ \"data\" :\t[ {{\"index\":0,\"embedding\":\"{v}\"}} ] , \"usage\":{{\"prompt_tokens\":0}} }} \r\n"),
        ];
        for body in &bodies {
            let fast = fast::parse(body.as_bytes());
            assert!(fast.is_some(), "the fast path should read {body}");
            assert_eq!(fast.map(Ok), Some(parse_with_serde(body.as_bytes())), "{body}");
        }
    }

    #[test]
    fn the_fast_path_steps_aside_for_what_it_does_not_read() {
        let v = encode_base64_f32(&[0.5, -2.0]);
        for body in [
            // serde reads these (escapes, floats, exponents): the fast path leaves them to it.
            format!(r#"{{"data":[{{"index":0,"embedding":"{v}"}}],"model":"a\u0062"}}"#),
            r#"{"data":[{"index":0,"embedding":[0.5,-2.0]}]}"#.to_owned(),
            format!(r#"{{"data":[{{"index":0,"embedding":"{v}","n":1e3}}]}}"#),
            // serde refuses these; so does the fast path.
            format!(r#"{{"data":[{{"index":0,"index":0,"embedding":"{v}"}}]}}"#),
            format!(r#"{{"data":[{{"index":0,"embedding":"{v}"}}],"data":[]}}"#),
            format!(r#"{{"data":[{{"index":0.0,"embedding":"{v}"}}]}}"#),
            format!(r#"{{"data":[{{"index":0,"embedding":"{v}"}}]}} x"#),
            format!(r#"{{"data":[{{"index":0,"embedding":"{v}"}}],}}"#),
            r#"{"data":[{"index":0,"embedding":"AAA*"}]}"#.to_owned(),
            r#"{"data":[{"index":0}]}"#.to_owned(),
            // Nesting deeper than the fast path goes (serde reads it).
            format!(r#"{{"data":[],"x":{}{}}}"#, "[".repeat(70), "]".repeat(70)),
        ] {
            assert_eq!(fast::parse(body.as_bytes()), None, "{body}");
        }
    }

    #[test]
    fn the_fast_path_never_reads_a_body_differently_from_serde() {
        // Every prefix, and every byte replaced by a character that matters to JSON or base64:
        // whenever the fast path answers, serde answers the same.
        let body = small_body().into_bytes();
        let mut variants: Vec<Vec<u8>> = (0..body.len()).map(|n| body[..n].to_vec()).collect();
        for i in 0..body.len() {
            for c in b"\"\\,:{}[] \t09-.eEA/=+nt\x01\x7f\xff\xc3" {
                let mut m = body.clone();
                m[i] = *c;
                variants.push(m);
            }
            let mut m = body.clone();
            m.remove(i);
            variants.push(m);
        }
        let mut fast_reads = 0;
        for m in &variants {
            if let Some(parsed) = fast::parse(m) {
                fast_reads += 1;
                assert_eq!(Ok(parsed), parse_with_serde(m), "{}", String::from_utf8_lossy(m));
            }
        }
        // Not vacuous: many variants (whitespace, other base64 digits, skipped values) are read.
        assert!(fast_reads > 500, "the fast path read only {fast_reads} of {} variants", variants.len());
    }

    #[test]
    fn error_bodies() {
        check(
            429,
            &[("retry-after", "2")],
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            1,
            2,
            expect!["err rate limited by the provider (429): Rate limit reached retryable=true fatal=false wait=Some(2s)"],
        );
        check(
            429,
            &[("retry-after", "2"), ("retry-after-ms", "150")],
            "{}",
            1,
            2,
            expect!["err rate limited by the provider (429): {} retryable=true fatal=false wait=Some(150ms)"],
        );
        check(
            500,
            &[],
            r#"{"error":{"message":"The server had an error"}}"#,
            1,
            2,
            expect!["err provider error (500): The server had an error retryable=true fatal=false wait=None"],
        );
        check(
            400,
            &[],
            r#"{"error":{"message":"'$.input' is invalid.","type":"invalid_request_error","param":null,"code":null}}"#,
            1,
            2,
            expect!["err provider refused the request (400): '$.input' is invalid. retryable=false fatal=false wait=None"],
        );
        check(
            404,
            &[],
            r#"{"error":{"message":"The model `text-embedding-3-larg` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            1,
            2,
            expect!["err the provider refused the request itself (404): The model `text-embedding-3-larg` does not exist or you do not have access to it. retryable=false fatal=false wait=None"],
        );
        check(
            401,
            &[],
            r#"{"error":{"message":"Incorrect API key provided: sk-abc***xyz.","code":"invalid_api_key"}}"#,
            1,
            2,
            expect!["err the provider rejected the API key (401): check the OPENAI_API_KEY secret retryable=false fatal=true wait=None"],
        );
        check(
            502,
            &[],
            "<html>bad gateway</html>",
            1,
            2,
            expect!["err provider error (502): <html>bad gateway</html> retryable=true fatal=false wait=None"],
        );
    }

    /// Which refusals are about an input (split the request to isolate it) and which about the
    /// request itself (no value to blame), on bodies as OpenAI and compatible servers send them.
    #[test]
    fn refusals_are_about_an_input_or_the_request_itself() {
        let cases: &[(u16, &str, bool)] = &[
            // OpenAI: an input over the context length (`param` null), old and new wording.
            (
                400,
                r#"{"error":{"message":"This model's maximum context length is 8192 tokens, however you requested 8610 tokens (8610 in your prompt; 0 for the completion). Please reduce your prompt; or completion length.","type":"invalid_request_error","param":null,"code":null}}"#,
                true,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid 'input': maximum context length is 8192 tokens.","type":"invalid_request_error","param":null,"code":null}}"#,
                true,
            ),
            // OpenAI: an empty or invalid input.
            (
                400,
                r#"{"error":{"message":"'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.","type":"invalid_request_error","param":null,"code":null}}"#,
                true,
            ),
            // The local provider and OpenAI's newer errors name the field.
            (400, r#"{"error":{"message":"Injected fault: HTTP 400.","type":"invalid_request_error","param":"input","code":null}}"#, true),
            (400, r#"{"error":{"message":"Invalid value.","type":"invalid_request_error","param":"input[3]","code":null}}"#, true),
            // Azure OpenAI's content filter.
            (
                400,
                r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter"}}"#,
                true,
            ),
            (400, r#"{"error":{"message":"The response was filtered.","type":null,"param":null,"code":"content_filter"}}"#, true),
            // A FastAPI-style 422 about an input.
            (
                422,
                r#"{"detail":[{"loc":["body","input",2],"msg":"String should have at most 2048 characters","type":"string_too_long"}]}"#,
                true,
            ),
            // The request itself: the model, `dimensions`, the body's size or shape.
            (
                404,
                r#"{"error":{"message":"The model `nope` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
                false,
            ),
            (
                400,
                r#"{"error":{"message":"This model does not support specifying dimensions.","type":"invalid_request_error","param":null,"code":null}}"#,
                false,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid value for 'dimensions' = 5000. The maximum for text-embedding-3-small is 1536.","type":"invalid_request_error","param":"dimensions","code":null}}"#,
                false,
            ),
            (
                400,
                r#"{"error":{"message":"you must provide a model parameter","type":"invalid_request_error","param":"model","code":"missing_required_parameter"}}"#,
                false,
            ),
            (413, "<html><body>413 Request Entity Too Large</body></html>", false),
            (422, r#"{"detail":[{"loc":["body","dimensions"],"msg":"Input should be a valid integer","type":"int_parsing"}]}"#, false),
            (400, "", false),
        ];
        for &(status, body, about_an_input) in cases {
            let e = decode_response(status, |_| None, body.as_bytes(), 1, 2).unwrap_err();
            assert_eq!(!e.is_request_level(), about_an_input, "{status} {body}: {e:?}");
            assert!(!e.is_retryable() && !e.is_fatal(), "{e:?}");
        }
    }

    #[test]
    fn rate_limits() {
        // Without the limits, the refill rate is unknown: a wait lasts until the bucket is full.
        let headers = [
            ("x-ratelimit-remaining-requests", "1"),
            ("x-ratelimit-remaining-tokens", "5000"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        let r = RateLimit::from_headers(lookup).unwrap();
        assert_eq!((r.limit_requests, r.limit_tokens), (None, None));
        assert_eq!(r.pause(10), Some(Duration::from_millis(120)));
        assert_eq!(r.pause(6000), Some(Duration::from_secs(360)));
        let roomy = RateLimit { remaining_requests: Some(100), remaining_tokens: Some(100_000), ..r };
        assert_eq!(roomy.pause(6000), None);
        assert_eq!(RateLimit::from_headers(|_| None), None);
        assert_eq!(parse_reset("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("soon"), None);
    }

    #[test]
    fn pacing_waits_for_the_missing_amount_to_refill_not_for_the_whole_reset() {
        // OpenAI at 3,000 requests and 1,000,000 tokens a minute, both buckets empty: full again
        // in 60 s, but a request comes back every 20 ms and 1,000 tokens every 60 ms.
        let headers = [
            ("x-ratelimit-limit-requests", "3000"),
            ("x-ratelimit-limit-tokens", "1000000"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "5000"),
            ("x-ratelimit-reset-requests", "1m0s"),
            ("x-ratelimit-reset-tokens", "59.7s"),
        ];
        let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        let r = RateLimit::from_headers(lookup).unwrap();
        assert_eq!((r.limit_requests, r.limit_tokens), (Some(3000), Some(1_000_000)));
        // Two requests missing: 40 ms (the whole reset would be 60 s).
        assert_eq!(r.pause(10), Some(Duration::from_millis(40)));
        // 1,000 tokens missing (and the two requests): 60 ms.
        assert_eq!(r.pause(6000), Some(Duration::from_millis(60)));
        let requests_left = RateLimit { remaining_requests: Some(2), ..r };
        assert_eq!(requests_left.pause(5000), None);
        // Never longer than the reset: after it the bucket is full, the most there will be.
        let big = RateLimit { remaining_tokens: Some(0), reset_tokens: Some(Duration::from_millis(500)), ..requests_left };
        assert_eq!(big.pause(2_000_000), Some(Duration::from_millis(500)));
        assert_eq!(refill_wait(0.0, 1.0, Some(60), None), Some(Duration::from_secs(1)), "no reset: at most a second");
        assert_eq!(refill_wait(0.5, 1.0, Some(60), Some(Duration::from_secs(30))), Some(Duration::from_millis(500)));
    }

    #[test]
    fn base64_unsupported() {
        let e = ProviderError::Rejected { status: 400, message: "Invalid value for 'encoding_format': 'base64'".into() };
        assert!(e.is_base64_unsupported());
        let e = ProviderError::Rejected { status: 400, message: "'$.input' is invalid".into() };
        assert!(!e.is_base64_unsupported());
    }

    #[test]
    fn malformed_bodies() {
        check(200, &[], r#"{"data":[{"index":0,"embedding":[1.0,"#, 1, 2,
            expect!["err malformed provider response: body is not the embeddings shape: EOF while parsing a value at line 1 column 37 retryable=false fatal=false wait=None"]);
        check(
            200,
            &[],
            r#"{"data":[{"index":0,"embedding":[1.0,2.0]}]}"#,
            2,
            2,
            expect!["err malformed provider response: 1 embeddings for 2 inputs retryable=false fatal=false wait=None"],
        );
        check(
            200,
            &[],
            r#"{"data":[{"index":0,"embedding":[1.0]}]}"#,
            1,
            2,
            expect!["err malformed provider response: embedding 0 has 1 dimensions, expected 2 retryable=false fatal=false wait=None"],
        );
        check(
            200,
            &[],
            r#"{"data":[{"index":0,"embedding":[1.0,2.0]},{"index":0,"embedding":[1.0,2.0]}]}"#,
            2,
            2,
            expect!["err malformed provider response: index 0 appears twice retryable=false fatal=false wait=None"],
        );
        check(
            200,
            &[],
            r#"{"data":[{"index":3,"embedding":[1.0,2.0]}]}"#,
            1,
            2,
            expect!["err malformed provider response: index 3 is out of range for 1 inputs retryable=false fatal=false wait=None"],
        );
    }
}
