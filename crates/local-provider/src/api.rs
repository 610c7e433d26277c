//! The OpenAI embeddings API surface: models, request validation, error bodies
//! and response rendering. Everything here is pure; the HTTP plumbing, the
//! request log and fault injection live in [`crate::app`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tokens::count_tokens;
use crate::vectors;

/// Most inputs accepted in one request.
pub const MAX_INPUTS: usize = 2048;

/// Most tokens accepted in one input.
pub const MAX_INPUT_TOKENS: usize = 8192;

/// The `x-ratelimit-limit-requests` value (requests per minute).
pub const RATE_LIMIT_REQUESTS: u64 = 10_000;

/// The `x-ratelimit-limit-tokens` value (tokens per minute).
pub const RATE_LIMIT_TOKENS: u64 = 10_000_000;

/// The embedding models this provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    TextEmbedding3Large,
    TextEmbedding3Small,
    TextEmbeddingAda002,
}

impl Model {
    /// All served models.
    pub const ALL: [Model; 3] = [Model::TextEmbedding3Large, Model::TextEmbedding3Small, Model::TextEmbeddingAda002];

    /// The model with this API name, if served.
    pub fn from_name(name: &str) -> Option<Model> {
        Model::ALL.into_iter().find(|model| model.name() == name)
    }

    /// The API name, for example `text-embedding-3-small`.
    pub fn name(self) -> &'static str {
        match self {
            Model::TextEmbedding3Large => "text-embedding-3-large",
            Model::TextEmbedding3Small => "text-embedding-3-small",
            Model::TextEmbeddingAda002 => "text-embedding-ada-002",
        }
    }

    /// The size of the model's full vectors.
    pub fn native_dimensions(self) -> usize {
        match self {
            Model::TextEmbedding3Large => 3072,
            Model::TextEmbedding3Small | Model::TextEmbeddingAda002 => 1536,
        }
    }

    /// Whether the model accepts the `dimensions` parameter.
    pub fn supports_dimensions(self) -> bool {
        self != Model::TextEmbeddingAda002
    }
}

/// The `encoding_format` of the returned vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// JSON arrays of numbers (the default).
    Float,
    /// Base64 of the little-endian `f32` bytes.
    Base64,
}

/// An error answered in OpenAI's format:
/// `{"error":{"message":..,"type":..,"param":..,"code":..}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// The `type` field, for example `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param, code: None }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The body could not be parsed as JSON (OpenAI's wording).
    pub fn unparsable_json() -> Self {
        ApiError::invalid(
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON. If you have trouble figuring out how to fix \
             this, please contact us through our help center at help.openai.com.)",
        )
    }

    /// No usable `Authorization: Bearer` header.
    pub fn missing_api_key() -> Self {
        ApiError {
            status: 401,
            message: "You didn't provide an API key. You need to provide your API key in an \
                      Authorization header using Bearer auth (i.e. Authorization: Bearer \
                      YOUR_KEY), or as the password field (with blank username) if you're \
                      accessing the API from your browser and are prompted for a username and \
                      password. You can obtain an API key from \
                      https://platform.openai.com/account/api-keys."
                .to_string(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// A bearer token that is not the configured key; the token is masked.
    pub fn incorrect_api_key(token: &str) -> Self {
        ApiError {
            status: 401,
            message: format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(token)
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// `encoding_format: "base64"` refused, as by a compatible server that
    /// only returns JSON floats (`--no-base64`, `rejectBase64`).
    pub fn base64_unsupported() -> Self {
        ApiError::invalid(Some("encoding_format"), "Invalid value for 'encoding_format': 'base64' is not supported")
    }

    /// The requested model is not served (404).
    pub fn model_not_found(name: &str) -> Self {
        ApiError {
            status: 404,
            message: format!("The model `{name}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: None,
            code: Some("model_not_found"),
        }
    }

    /// An error injected by a fault rule, worded like OpenAI's error of the
    /// same status. `retry_in` is the client-facing wait for 429s.
    pub fn injected(status: u16, model: &str, token: Option<&str>, retry_in: Option<&str>) -> Self {
        match status {
            401 => match token {
                Some(token) => ApiError::incorrect_api_key(token),
                None => ApiError::missing_api_key(),
            },
            404 => ApiError::model_not_found(model),
            429 => ApiError {
                status,
                message: format!(
                    "Rate limit reached for {model} in organization org-local-provider on \
                     requests per min (RPM): Limit {RATE_LIMIT_REQUESTS}, Used \
                     {RATE_LIMIT_REQUESTS}, Requested 1. Please try again in {}.",
                    retry_in.unwrap_or("1s")
                ),
                kind: "requests",
                param: None,
                code: Some("rate_limit_exceeded"),
            },
            500 => ApiError {
                status,
                message: "The server had an error while processing your request. Sorry about that!".to_string(),
                kind: "server_error",
                param: None,
                code: None,
            },
            503 => ApiError {
                status,
                message: "The engine is currently overloaded, please try again later.".to_string(),
                kind: "server_error",
                param: None,
                code: None,
            },
            400..=499 => ApiError {
                status,
                message: format!("Injected fault: HTTP {status}."),
                kind: "invalid_request_error",
                param: None,
                code: None,
            },
            _ => ApiError { status, message: format!("Injected fault: HTTP {status}."), kind: "server_error", param: None, code: None },
        }
    }

    /// The error blamed on an input, as OpenAI names the field of a refusal (`"param":
    /// "input"`): what a rule with `inputContains` answers, for a 4xx that is not about the
    /// key (401), the model (404) or the rate (429).
    pub fn about_input(mut self) -> Self {
        if (400..=499).contains(&self.status) && !matches!(self.status, 401 | 404 | 429) {
            self.param = Some("input");
        }
        self
    }

    /// The JSON body, with OpenAI's field order.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorDetail { message: &self.message, kind: self.kind, param: self.param, code: self.code } }
    }
}

/// The body of an error response: `{"error": {...}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// The fields of an error, serialised in the order OpenAI uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// Masks an API key the way OpenAI's error messages do: the first three and
/// the last four characters stay visible, only when the key is long enough
/// that this reveals little; shorter keys are masked completely.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

/// The bearer token of an `Authorization` header value, if there is one.
pub fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Checks the `Authorization` header against the configured key. Without a
/// configured key any bearer token is accepted.
pub fn check_auth(authorization: Option<&str>, expected_key: Option<&str>) -> Result<(), ApiError> {
    let token = bearer_token(authorization).ok_or_else(ApiError::missing_api_key)?;
    match expected_key {
        Some(expected) if expected != token => Err(ApiError::incorrect_api_key(token)),
        _ => Ok(()),
    }
}

/// Request fields as sent, extracted leniently for the request log (even from
/// requests that fail validation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestSummary {
    pub model: Option<String>,
    /// The inputs; non-string array items are logged as their JSON text.
    pub inputs: Vec<String>,
    pub dimensions: Option<i64>,
    pub encoding_format: Option<String>,
}

impl RequestSummary {
    fn from_value(value: &Value) -> Self {
        let field = |name: &str| value.get(name);
        let inputs = match field("input") {
            Some(Value::String(text)) => vec![text.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect(),
            _ => Vec::new(),
        };
        RequestSummary {
            model: field("model").and_then(Value::as_str).map(str::to_string),
            inputs,
            dimensions: field("dimensions").and_then(Value::as_i64),
            encoding_format: field("encoding_format").and_then(Value::as_str).map(str::to_string),
        }
    }
}

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    pub model: Model,
    pub inputs: Vec<String>,
    /// The requested size, if `dimensions` was given.
    pub dimensions: Option<usize>,
    pub encoding: EncodingFormat,
    /// Token count summed over all inputs.
    pub prompt_tokens: usize,
}

impl EmbeddingRequest {
    /// The size of the returned vectors.
    pub fn output_dimensions(&self) -> usize {
        self.dimensions.unwrap_or(self.model.native_dimensions())
    }

    /// The vectors for all inputs, in input order.
    pub fn vectors(&self) -> Vec<Vec<f32>> {
        let dims = self.output_dimensions();
        self.inputs.iter().map(|input| vectors::embedding(self.model.name(), input, dims)).collect()
    }
}

/// Parses and validates a request body. The summary is always available for
/// logging; the request only when it is valid.
pub fn parse_request(body: &[u8]) -> (RequestSummary, Result<EmbeddingRequest, ApiError>) {
    parse_request_as(body, None)
}

/// [`parse_request`] for a request whose model is already known (`Some`: an Azure
/// deployment's): the body's `model` is then not read, and the summary names `model`.
pub fn parse_request_as(body: &[u8], model: Option<Model>) -> (RequestSummary, Result<EmbeddingRequest, ApiError>) {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => {
            let mut summary = RequestSummary::from_value(&value);
            if let Some(model) = model {
                summary.model = Some(model.name().to_string());
            }
            (summary, validate(&value, model))
        }
        Err(_) => (RequestSummary::default(), Err(ApiError::unparsable_json())),
    }
}

/// Validates an already parsed request body (a batch input line's `body`).
pub fn parse_value(value: &Value) -> Result<EmbeddingRequest, ApiError> {
    validate(value, None)
}

/// A field that must be absent, `null` or a string.
fn optional_string<'a>(fields: &'a Map<String, Value>, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(ApiError::invalid(Some(name), format!("{other} is not of type 'string' - '{name}'"))),
    }
}

/// OpenAI's error for an `input` of the wrong shape, or an empty one.
fn invalid_input() -> ApiError {
    ApiError::invalid(
        Some("input"),
        "'$.input' is invalid. Please check the API reference: \
         https://platform.openai.com/docs/api-reference.",
    )
}

/// The `input` field as a list of strings.
fn parse_inputs(input: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match input {
        None | Some(Value::Null) => {
            Err(ApiError::invalid(Some("input"), "Missing required parameter: 'input'.").with_code("missing_required_parameter"))
        }
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(invalid_input());
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text.clone()),
                    Value::Number(_) | Value::Array(_) => {
                        Err(ApiError::invalid(Some("input"), "Token arrays are not supported by this local provider; send strings."))
                    }
                    _ => Err(invalid_input()),
                })
                .collect()
        }
        Some(_) => Err(invalid_input()),
    }
}

/// Validates a parsed JSON request body.
fn validate(value: &Value, known_model: Option<Model>) -> Result<EmbeddingRequest, ApiError> {
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid(None, "The request body must be a JSON object."));
    };

    let model_name = match known_model {
        Some(model) => model.name(),
        None => optional_string(fields, "model")?.ok_or_else(|| {
            ApiError::invalid(Some("model"), "you must provide a model parameter").with_code("missing_required_parameter")
        })?,
    };
    let inputs = parse_inputs(fields.get("input"))?;
    let encoding = match optional_string(fields, "encoding_format")? {
        None | Some("float") => EncodingFormat::Float,
        Some("base64") => EncodingFormat::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("'{other}' is not one of ['float', 'base64'] - 'encoding_format'"),
            ))
        }
    };
    let requested_dimensions = match fields.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(d), _) => Some(d),
            // Beyond i64: certainly larger than any model's size.
            (None, Some(_)) => Some(i64::MAX),
            (None, None) => return Err(ApiError::invalid(Some("dimensions"), format!("{n} is not of type 'integer' - 'dimensions'"))),
        },
        Some(other) => return Err(ApiError::invalid(Some("dimensions"), format!("{other} is not of type 'integer' - 'dimensions'"))),
    };
    optional_string(fields, "user")?;

    let model = Model::from_name(model_name).ok_or_else(|| ApiError::model_not_found(model_name))?;

    let dimensions = match requested_dimensions {
        None => None,
        Some(_) if !model.supports_dimensions() => {
            return Err(ApiError::invalid(Some("dimensions"), "This model does not support specifying dimensions."))
        }
        Some(d) if d < 1 => return Err(ApiError::invalid(Some("dimensions"), format!("{d} is less than the minimum of 1 - 'dimensions'"))),
        Some(d) => match usize::try_from(d) {
            Ok(d) if d <= model.native_dimensions() => Some(d),
            _ => {
                return Err(ApiError::invalid(
                    Some("dimensions"),
                    format!("Invalid value for 'dimensions' = {d}. The maximum for {} is {}.", model.name(), model.native_dimensions()),
                ))
            }
        },
    };

    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            Some("input"),
            format!(
                "Too many inputs: {} were given, the maximum is {MAX_INPUTS}. Please reduce \
                 the number of inputs.",
                inputs.len()
            ),
        ));
    }
    let mut prompt_tokens = 0;
    for input in &inputs {
        if input.is_empty() {
            return Err(invalid_input());
        }
        let tokens = count_tokens(input);
        if tokens > MAX_INPUT_TOKENS {
            return Err(ApiError::invalid(
                Some("input"),
                format!(
                    "This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however \
                     you requested {tokens} tokens ({tokens} in your prompt; 0 for the \
                     completion). Please reduce your prompt; or completion length."
                ),
            ));
        }
        prompt_tokens += tokens;
    }

    Ok(EmbeddingRequest { model, inputs, dimensions, encoding, prompt_tokens })
}

/// A successful embeddings response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingList {
    /// Always `"list"`.
    pub object: String,
    pub data: Vec<EmbeddingItem>,
    pub model: String,
    pub usage: Usage,
}

/// One vector of an [`EmbeddingList`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingItem {
    /// Always `"embedding"`.
    pub object: String,
    pub index: usize,
    pub embedding: EmbeddingData,
}

/// A vector as floats or as base64 (see [`vectors::encode_base64`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

/// Token usage of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

impl EmbeddingList {
    /// The response for `request` carrying `vectors` (normally
    /// [`EmbeddingRequest::vectors`]; fault injection may alter them).
    pub fn new(request: &EmbeddingRequest, vectors: Vec<Vec<f32>>) -> Self {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| EmbeddingItem {
                object: "embedding".to_string(),
                index,
                embedding: match request.encoding {
                    EncodingFormat::Float => EmbeddingData::Float(vector),
                    EncodingFormat::Base64 => EmbeddingData::Base64(vectors::encode_base64(&vector)),
                },
            })
            .collect();
        EmbeddingList {
            object: "list".to_string(),
            data,
            model: request.model.name().to_string(),
            usage: Usage { prompt_tokens: request.prompt_tokens, total_tokens: request.prompt_tokens },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<EmbeddingRequest, ApiError> {
        parse_request(body.to_string().as_bytes()).1
    }

    /// Asserts that `body` is rejected with `status` and `param`.
    fn check_rejected(body: Value, status: u16, param: Option<&str>) {
        match parse(body.clone()) {
            Ok(request) => panic!("{body} was accepted: {request:?}"),
            Err(err) => {
                assert_eq!(err.status, status, "{body}: {err:?}");
                assert_eq!(err.param, param, "{body}: {err:?}");
                assert_eq!(err.kind, "invalid_request_error", "{body}");
            }
        }
    }

    #[test]
    fn model_table() {
        assert_eq!(Model::from_name("text-embedding-3-large").map(Model::native_dimensions), Some(3072));
        assert_eq!(Model::from_name("text-embedding-3-small").map(Model::native_dimensions), Some(1536));
        assert_eq!(Model::from_name("text-embedding-ada-002").map(Model::native_dimensions), Some(1536));
        assert_eq!(Model::from_name("gpt-4"), None);
        assert!(!Model::TextEmbeddingAda002.supports_dimensions());
    }

    #[test]
    fn accepts_valid_requests() {
        let request = parse(json!({
            "model": "text-embedding-3-small", "input": ["a b", "c"],
            "dimensions": 256, "encoding_format": "base64", "user": "u", "extra": {"ignored": true}
        }))
        .unwrap();
        assert_eq!(request.model, Model::TextEmbedding3Small);
        assert_eq!(request.inputs, ["a b", "c"]);
        assert_eq!(request.output_dimensions(), 256);
        assert_eq!(request.encoding, EncodingFormat::Base64);
        assert_eq!(request.prompt_tokens, 3);

        let single = parse(json!({"model": "text-embedding-3-large", "input": "x"})).unwrap();
        assert_eq!(single.inputs, ["x"]);
        assert_eq!(single.encoding, EncodingFormat::Float);
        assert_eq!(single.output_dimensions(), 3072);
        let full = parse(json!({"model": "text-embedding-3-large", "input": "x", "dimensions": 3072}));
        assert_eq!(full.unwrap().output_dimensions(), 3072);
        let ada = parse(json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": null}));
        assert_eq!(ada.unwrap().output_dimensions(), 1536);
    }

    #[test]
    fn rejects_invalid_requests() {
        let m = "text-embedding-3-small";
        assert_eq!(parse_request(b"{not json").1.unwrap_err(), ApiError::unparsable_json());
        check_rejected(json!([1, 2]), 400, None);
        check_rejected(json!({"input": "x"}), 400, Some("model"));
        check_rejected(json!({"model": 5, "input": "x"}), 400, Some("model"));
        check_rejected(json!({"model": m}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": ""}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": []}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": ["ok", ""]}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": [1, 2, 3]}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": [[1, 2]]}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": {"a": 1}}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": vec!["x"; MAX_INPUTS + 1]}), 400, Some("input"));
        check_rejected(json!({"model": m, "input": "x", "dimensions": 0}), 400, Some("dimensions"));
        check_rejected(json!({"model": m, "input": "x", "dimensions": -3}), 400, Some("dimensions"));
        check_rejected(json!({"model": m, "input": "x", "dimensions": 1537}), 400, Some("dimensions"));
        check_rejected(json!({"model": m, "input": "x", "dimensions": u64::MAX}), 400, Some("dimensions"));
        check_rejected(json!({"model": m, "input": "x", "dimensions": 1.5}), 400, Some("dimensions"));
        check_rejected(json!({"model": m, "input": "x", "dimensions": "8"}), 400, Some("dimensions"));
        check_rejected(json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": 8}), 400, Some("dimensions"));
        check_rejected(json!({"model": m, "input": "x", "encoding_format": "hex"}), 400, Some("encoding_format"));
        check_rejected(json!({"model": m, "input": "x", "user": 1}), 400, Some("user"));
        let too_long = "word ".repeat(MAX_INPUT_TOKENS + 1);
        check_rejected(json!({"model": m, "input": ["fine", too_long]}), 400, Some("input"));
        // Exactly the limit is fine.
        assert!(parse(json!({"model": m, "input": vec!["x"; MAX_INPUTS]})).is_ok());
        assert!(parse(json!({"model": m, "input": "abc ".repeat(MAX_INPUT_TOKENS).trim_end()})).is_ok());
    }

    #[test]
    fn unknown_model_is_404() {
        let err = parse(json!({"model": "nope", "input": "x"})).unwrap_err();
        assert_eq!(err.status, 404);
        assert_eq!(err.code, Some("model_not_found"));
        assert_eq!(
            serde_json::to_string(&err.body()).unwrap(),
            concat!(
                r#"{"error":{"message":"The model `nope` does not exist or you do not have "#,
                r#"access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#
            )
        );
    }

    #[test]
    fn summary_is_lenient() {
        let (summary, result) =
            parse_request(json!({"model": "m", "input": ["a", 7], "dimensions": 3, "encoding_format": "base64"}).to_string().as_bytes());
        assert!(result.is_err());
        assert_eq!(
            summary,
            RequestSummary {
                model: Some("m".into()),
                inputs: vec!["a".into(), "7".into()],
                dimensions: Some(3),
                encoding_format: Some("base64".into()),
            }
        );
        assert_eq!(parse_request(b"garbage").0, RequestSummary::default());
    }

    #[test]
    fn auth_checks_and_masks_keys() {
        assert_eq!(check_auth(Some("Bearer sk-right"), Some("sk-right")), Ok(()));
        assert_eq!(check_auth(Some("bearer  anything "), None), Ok(()));
        for header in [None, Some(""), Some("Bearer"), Some("Bearer   "), Some("Basic abc")] {
            let err = check_auth(header, None).unwrap_err();
            assert_eq!((err.status, err.code), (401, Some("invalid_api_key")), "{header:?}");
        }
        let wrong = "sk-proj-0123456789abcdefWXYZ";
        let err = check_auth(Some(&format!("Bearer {wrong}")), Some("sk-right")).unwrap_err();
        assert_eq!(err.status, 401);
        assert!(!err.message.contains(wrong));
        assert!(err.message.starts_with("Incorrect API key provided: sk-*********************WXYZ."));
        assert_eq!(mask_key("short"), "*****");
        assert_eq!(mask_key("sk-abcdefghij"), "sk-******ghij");
    }

    #[test]
    fn injected_errors_look_like_openai() {
        let limited = ApiError::injected(429, "text-embedding-3-small", None, Some("2s"));
        assert_eq!(limited.code, Some("rate_limit_exceeded"));
        assert!(limited.message.contains("Please try again in 2s."));
        assert_eq!(ApiError::injected(500, "m", None, None).kind, "server_error");
        assert_eq!(ApiError::injected(503, "m", None, None).status, 503);
        assert_eq!(ApiError::injected(400, "m", None, None).param, None);
        assert_eq!(ApiError::injected(400, "m", None, None).about_input().param, Some("input"));
        assert_eq!(ApiError::injected(404, "m", None, None).about_input().param, None);
        assert_eq!(ApiError::injected(401, "m", Some("sk-abcdefghijklmn"), None).code, Some("invalid_api_key"));
        assert_eq!(ApiError::injected(418, "m", None, None).kind, "invalid_request_error");
    }

    #[test]
    fn response_body_shape() {
        let request = parse(json!({"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 2})).unwrap();
        let list = EmbeddingList::new(&request, request.vectors());
        let body = serde_json::to_value(&list).unwrap();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "text-embedding-3-small");
        assert_eq!(body["usage"], json!({"prompt_tokens": 2, "total_tokens": 2}));
        assert_eq!(body["data"][1]["object"], "embedding");
        assert_eq!(body["data"][1]["index"], 1);
        assert_eq!(body["data"][1]["embedding"].as_array().map(Vec::len), Some(2));

        // Floats are printed so that they parse back to the same f32.
        let text = serde_json::to_string(&list).unwrap();
        let parsed: EmbeddingList = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, list);

        let base64 = parse(json!({"model": "text-embedding-3-small", "input": "a", "encoding_format": "base64"})).unwrap();
        let list = EmbeddingList::new(&base64, base64.vectors());
        let EmbeddingData::Base64(encoded) = &list.data[0].embedding else {
            panic!("expected base64, got {:?}", list.data[0].embedding);
        };
        assert_eq!(vectors::decode_base64(encoded), Some(base64.vectors().remove(0)));
    }
}
