//! Azure OpenAI mode (`--azure`, `--azure-deployment NAME=MODEL`): the embeddings API as an
//! Azure OpenAI resource serves it.
//!
//! - `POST /openai/deployments/{deployment}/embeddings?api-version=YYYY-MM-DD[-preview]`: the
//!   deployment picks the model; `model` in the body is ignored, as Azure ignores it.
//! - `POST /openai/v1/embeddings` (the v1 API): `model` in the body names the deployment;
//!   `api-version` may be left out, or be `v1` or `preview`.
//!
//! The key travels in the `api-key` header (an `Authorization` header is not read). Errors have
//! Azure's shape, `{"error": {"code": ..., "message": ...}}`: 401 for a missing or wrong key, 404
//! `DeploymentNotFound` for a deployment the resource does not have, 404 `Resource not found`
//! for a path it does not serve (also a dated path without `api-version`, as Azure answers),
//! and 400 `API version not supported` for a version it does not know.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::Model;
use crate::http::{RequestHead, Response};

/// The deployments of the fake resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployments(Vec<(String, Model)>);

impl Deployments {
    /// Each served model as a deployment of its own name (`--azure` alone).
    pub fn named_like_models() -> Self {
        Deployments(Model::ALL.into_iter().map(|m| (m.name().to_string(), m)).collect())
    }

    /// The given deployments (`--azure-deployment NAME=MODEL`, in order).
    pub fn new(deployments: Vec<(String, Model)>) -> Self {
        Deployments(deployments)
    }

    /// The model a deployment serves.
    pub fn model(&self, deployment: &str) -> Option<Model> {
        self.0.iter().find(|(name, _)| name == deployment).map(|(_, model)| *model)
    }
}

/// Parses `NAME=MODEL` (`--azure-deployment`).
pub fn parse_deployment(text: &str) -> Result<(String, Model), String> {
    let (name, model) = text.split_once('=').ok_or_else(|| format!("--azure-deployment: expected NAME=MODEL, got {text:?}"))?;
    if name.is_empty() || name.contains('/') {
        return Err(format!("--azure-deployment: {name:?} is not a deployment name"));
    }
    let model = Model::from_name(model).ok_or_else(|| format!("--azure-deployment: unknown model {model:?}"))?;
    Ok((name.to_string(), model))
}

/// What the request log records of an Azure request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AzureFacts {
    /// The deployment asked for (path, or `model` with the v1 API).
    pub deployment: Option<String>,
    /// The `api-version` query parameter as sent.
    pub api_version: Option<String>,
    /// Whether an `api-key` header was sent.
    pub api_key_header: bool,
    /// Whether an `Authorization` header was sent (Azure's key does not go there).
    pub authorization_header: bool,
}

/// The outcome of routing one request: the model the deployment serves (`None`: the body's
/// `model` is read as usual), or Azure's error.
pub struct Routed {
    pub result: Result<Option<Model>, Response>,
    /// Whether the `api-key` header was accepted.
    pub authorized: bool,
    pub facts: AzureFacts,
}

/// An Azure-shaped error response.
fn error(status: u16, code: &str, message: &str) -> Response {
    Response::json(status, &json!({"error": {"code": code, "message": message}}))
}

/// Azure's answer for a path it does not serve.
pub fn resource_not_found() -> Response {
    error(404, "404", "Resource not found")
}

fn access_denied() -> Response {
    error(
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
         provide a valid key for an active subscription and use a correct regional API endpoint \
         for your resource.",
    )
}

fn deployment_not_found() -> Response {
    error(
        404,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment \
         within the last 5 minutes, please wait a moment and try again.",
    )
}

fn version_not_supported() -> Response {
    error(400, "BadRequest", "API version not supported")
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`.
fn is_dated_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

/// The value of query parameter `name` of a request target (not percent-decoded: the
/// values Azure takes here need no escapes).
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query.split('&').filter_map(|pair| pair.split_once('=').or(Some((pair, "")))).find(|(key, _)| *key == name).map(|(_, value)| value)
}

/// Which Azure API a path is.
enum AzurePath<'a> {
    Deployment(&'a str),
    V1,
}

fn azure_path(path: &str) -> Option<AzurePath<'_>> {
    if path == "/openai/v1/embeddings" {
        return Some(AzurePath::V1);
    }
    let deployment = path.strip_prefix("/openai/deployments/")?.strip_suffix("/embeddings")?;
    (!deployment.is_empty() && !deployment.contains('/')).then_some(AzurePath::Deployment(deployment))
}

impl Deployments {
    /// Routes an embeddings request: checks the key (`expected_key`; any non-empty key when
    /// `None`), the path, `api-version` and the deployment.
    pub fn route(&self, head: &RequestHead, expected_key: Option<&str>, body: &[u8]) -> Routed {
        let api_key = head.header("api-key");
        let mut facts = AzureFacts {
            deployment: None,
            api_version: query_param(&head.target, "api-version").map(str::to_string),
            api_key_header: api_key.is_some(),
            authorization_header: head.header("authorization").is_some(),
        };
        let authorized = match (api_key, expected_key) {
            (None, _) => false,
            (Some(key), _) if key.trim().is_empty() => false,
            (Some(key), Some(expected)) => key == expected,
            (Some(_), None) => true,
        };
        let result = (|| {
            if !authorized {
                return Err(access_denied());
            }
            let path = azure_path(head.path()).ok_or_else(resource_not_found)?;
            let version = facts.api_version.as_deref();
            let deployment = match path {
                AzurePath::Deployment(deployment) => {
                    match version {
                        None => return Err(resource_not_found()),
                        Some(v) if !is_dated_version(v) => return Err(version_not_supported()),
                        Some(_) => {}
                    }
                    deployment.to_string()
                }
                AzurePath::V1 => {
                    if !matches!(version, None | Some("v1" | "preview")) {
                        return Err(version_not_supported());
                    }
                    let model = serde_json::from_slice::<Value>(body).ok().and_then(|v| v.get("model")?.as_str().map(str::to_string));
                    // Without a deployment named, the body's validation answers.
                    match model {
                        Some(model) => model,
                        None => return Ok(None),
                    }
                }
            };
            facts.deployment = Some(deployment.clone());
            self.model(&deployment).map(Some).ok_or_else(deployment_not_found)
        })();
        Routed { result, authorized, facts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_and_versions() {
        assert_eq!(parse_deployment("emb-large=text-embedding-3-large"), Ok(("emb-large".to_string(), Model::TextEmbedding3Large)));
        assert!(parse_deployment("emb-large").is_err());
        assert!(parse_deployment("=text-embedding-3-large").is_err());
        assert!(parse_deployment("a/b=text-embedding-3-large").is_err());
        assert!(parse_deployment("x=gpt-4").is_err());
        assert!(is_dated_version("2024-10-21"));
        assert!(is_dated_version("2025-04-01-preview"));
        assert!(!is_dated_version("v1"));
        assert!(!is_dated_version("2024-10"));
        assert_eq!(query_param("/p?a=1&api-version=2024-10-21", "api-version"), Some("2024-10-21"));
        assert_eq!(query_param("/p?api-version", "api-version"), Some(""));
        assert_eq!(query_param("/p", "api-version"), None);
    }
}
