//! Where an embeddings request goes and how it carries the key: OpenAI (or any
//! OpenAI-compatible server), or Azure OpenAI. Chosen once from the environment
//! ([`ProviderEndpoint::from_vars`]); the worker only sends what [`ProviderEndpoint::target`]
//! says and decodes the answer with [`ProviderEndpoint::decode_response`].
//!
//! - OpenAI: `POST {OPENAI_BASE_URL}/embeddings` with `Authorization: Bearer <key>` and the
//!   model's name as `model`.
//! - Azure OpenAI, dated API versions (`AZURE_OPENAI_API_VERSION=2024-10-21`):
//!   `POST {AZURE_OPENAI_ENDPOINT}/openai/deployments/{deployment}/embeddings?api-version=...`
//!   with `api-key: <key>`. Each model is served by its own deployment (the model's
//!   `deployment` in the config, by default its name).
//! - Azure OpenAI, the v1 API (`AZURE_OPENAI_API_VERSION=v1`, the default):
//!   `POST {AZURE_OPENAI_ENDPOINT}/openai/v1/embeddings` with `api-key: <key>` and the
//!   deployment's name as `model`; no `api-version`.
//!
//! ```
//! use embsync_core::{config::Config, endpoint::{EndpointVars, ProviderEndpoint}};
//!
//! let config = Config::parse(include_str!("../../../embedding-sources.json")).unwrap();
//! let vars = EndpointVars {
//!     azure_endpoint: Some("https://acme.openai.azure.com/"),
//!     azure_api_version: Some("2024-10-21"),
//!     ..EndpointVars::default()
//! };
//! let endpoint = ProviderEndpoint::from_vars(&vars, &config.models).unwrap();
//! let target = endpoint.target(&config.models.small);
//! assert_eq!(
//!     target.url,
//!     "https://acme.openai.azure.com/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
//! );
//! assert_eq!(target.auth.header_name(), "api-key");
//! ```

use crate::config::{Deployment, ModelSlot, ModelSpec, Models};
use crate::provider::{self, Embeddings, ProviderError};

/// The default `OPENAI_BASE_URL`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The environment variables that choose the endpoint, as read (unset or blank: `None`).
#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointVars<'a> {
    /// `OPENAI_BASE_URL`.
    pub openai_base_url: Option<&'a str>,
    /// `AZURE_OPENAI_ENDPOINT`: its presence selects Azure OpenAI.
    pub azure_endpoint: Option<&'a str>,
    /// `AZURE_OPENAI_API_VERSION`.
    pub azure_api_version: Option<&'a str>,
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEndpoint {
    /// OpenAI or a server that speaks its API: `{base_url}/embeddings`.
    OpenAi {
        /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
        base_url: String,
    },
    /// Azure OpenAI.
    Azure {
        /// The resource's endpoint without a trailing slash, e.g. `https://acme.openai.azure.com`.
        endpoint: String,
        /// Which of Azure's APIs.
        api: AzureApi,
    },
}

/// Azure OpenAI's two embeddings APIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureApi {
    /// `/openai/v1/embeddings`, the deployment named in `model`, no `api-version`.
    V1,
    /// `/openai/deployments/{deployment}/embeddings?api-version={version}`.
    Dated {
        /// E.g. `2024-10-21` or `2025-04-01-preview`.
        version: String,
    },
}

/// How the key travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <key>` (OpenAI).
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

impl Auth {
    /// The header's name.
    pub fn header_name(self) -> &'static str {
        match self {
            Auth::Bearer => "authorization",
            Auth::ApiKey => "api-key",
        }
    }

    /// The header's value for `key`. The key is only ever put together here, at the moment of
    /// sending; nothing in the core holds it.
    pub fn header_value(self, key: &str) -> String {
        match self {
            Auth::Bearer => format!("Bearer {key}"),
            Auth::ApiKey => key.to_owned(),
        }
    }
}

/// One request's destination: what the worker sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL to POST to.
    pub url: String,
    /// How the key is sent.
    pub auth: Auth,
    /// The `model` field of the body.
    pub model: String,
}

/// An endpoint setting that is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Both providers are configured.
    #[error(
        "OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT are both set: set AZURE_OPENAI_ENDPOINT for Azure OpenAI or OPENAI_BASE_URL for another provider, not both"
    )]
    Both,
    /// An Azure setting without the Azure endpoint.
    #[error("AZURE_OPENAI_API_VERSION is set but AZURE_OPENAI_ENDPOINT is not: set AZURE_OPENAI_ENDPOINT to the resource's endpoint (https://NAME.openai.azure.com) or unset AZURE_OPENAI_API_VERSION")]
    VersionWithoutEndpoint,
    /// A URL that cannot be used.
    #[error("{name} is not usable: {reason}")]
    Url {
        /// The variable.
        name: &'static str,
        /// What is wrong and what to set.
        reason: String,
    },
    /// An `api-version` that Azure does not have.
    #[error("AZURE_OPENAI_API_VERSION {0:?} is not an API version: use v1 (the default) or a dated version such as 2024-10-21")]
    Version(String),
    /// A model whose name cannot be a deployment name, with no `deployment` given.
    #[error("models.{slot}: {message}: set \"deployment\" to the name of the Azure deployment that serves it")]
    Deployment {
        /// `large` or `small`.
        slot: &'static str,
        /// Why the model's name does not do.
        message: String,
    },
}

impl ProviderEndpoint {
    /// Chooses the endpoint: Azure OpenAI when `AZURE_OPENAI_ENDPOINT` is set, else
    /// `OPENAI_BASE_URL` (default [`DEFAULT_BASE_URL`]).
    ///
    /// # Errors
    /// [`EndpointError`]: both providers set, an Azure setting without the endpoint, a URL that
    /// is not `http(s)://host[/path]` (or, for Azure, that already holds the `/openai/...`
    /// part), an API version that is neither `v1` nor dated, or (Azure) a model with no
    /// `deployment` whose name cannot be one.
    pub fn from_vars(vars: &EndpointVars<'_>, models: &Models) -> Result<ProviderEndpoint, EndpointError> {
        let Some(raw) = vars.azure_endpoint else {
            if vars.azure_api_version.is_some() {
                return Err(EndpointError::VersionWithoutEndpoint);
            }
            let base_url = http_url("OPENAI_BASE_URL", vars.openai_base_url.unwrap_or(DEFAULT_BASE_URL))?;
            return Ok(ProviderEndpoint::OpenAi { base_url });
        };
        if vars.openai_base_url.is_some() {
            return Err(EndpointError::Both);
        }
        let endpoint = http_url("AZURE_OPENAI_ENDPOINT", raw)?;
        let path = endpoint.splitn(4, '/').nth(3).unwrap_or_default();
        if path.split('/').any(|segment| segment == "openai") {
            return Err(EndpointError::Url {
                name: "AZURE_OPENAI_ENDPOINT",
                reason: format!(
                    "{endpoint} already holds the API path: give the resource's endpoint only (https://NAME.openai.azure.com), embsync adds /openai/..."
                ),
            });
        }
        let api = match vars.azure_api_version.map(str::trim) {
            None | Some("v1") => AzureApi::V1,
            Some(v) if is_dated_version(v) => AzureApi::Dated { version: v.to_owned() },
            Some(v) => return Err(EndpointError::Version(v.to_owned())),
        };
        for slot in ModelSlot::ALL {
            let spec = models.get(slot);
            Deployment::parse(spec.deployment()).map_err(|message| EndpointError::Deployment { slot: slot.key(), message })?;
        }
        Ok(ProviderEndpoint::Azure { endpoint, api })
    }

    /// Where a request for `model` goes, how it carries the key, and what it names as `model`.
    pub fn target(&self, model: &ModelSpec) -> Target {
        match self {
            ProviderEndpoint::OpenAi { base_url } => {
                Target { url: format!("{base_url}/embeddings"), auth: Auth::Bearer, model: model.name().to_owned() }
            }
            ProviderEndpoint::Azure { endpoint, api: AzureApi::V1 } => {
                Target { url: format!("{endpoint}/openai/v1/embeddings"), auth: Auth::ApiKey, model: model.deployment().to_owned() }
            }
            ProviderEndpoint::Azure { endpoint, api: AzureApi::Dated { version } } => Target {
                url: format!("{endpoint}/openai/deployments/{}/embeddings?api-version={version}", model.deployment()),
                auth: Auth::ApiKey,
                // Azure takes the deployment from the path; the SDKs send its name here too.
                model: model.deployment().to_owned(),
            },
        }
    }

    /// [`provider::decode_response`], with Azure's request-level refusals explained: a 404
    /// names the deployment and the model and says what to create or set.
    ///
    /// # Errors
    /// As [`provider::decode_response`].
    pub fn decode_response(
        &self,
        model: &ModelSpec,
        status: u16,
        header: impl Fn(&str) -> Option<String>,
        body: &[u8],
        inputs: usize,
    ) -> Result<Embeddings, ProviderError> {
        let mut result = provider::decode_response(status, header, body, inputs, model.dimensions());
        if let (ProviderEndpoint::Azure { endpoint, api }, Err(error)) = (self, &mut result) {
            if let Some((404, message)) = error.refusal_mut() {
                *message = explain_azure_404(endpoint, api, model, message, body);
            }
        }
        result
    }

    /// The endpoint in words, for messages (it never holds the key).
    pub fn describe(&self) -> String {
        match self {
            ProviderEndpoint::OpenAi { base_url } => format!("OpenAI-compatible at {base_url}"),
            ProviderEndpoint::Azure { endpoint, api: AzureApi::V1 } => format!("Azure OpenAI at {endpoint} (v1 API)"),
            ProviderEndpoint::Azure { endpoint, api: AzureApi::Dated { version } } => {
                format!("Azure OpenAI at {endpoint} (api-version {version})")
            }
        }
    }
}

/// Azure answers 404 `DeploymentNotFound` for a deployment the resource does not have, and
/// 404 `Resource not found` for a path it does not serve (a wrong endpoint, or an API version
/// it does not know).
fn explain_azure_404(endpoint: &str, api: &AzureApi, model: &ModelSpec, message: &str, body: &[u8]) -> String {
    let deployment = model.deployment();
    if provider::error_code(body).as_deref() == Some("DeploymentNotFound") {
        return format!(
            "Azure OpenAI at {endpoint} has no deployment {deployment:?} for model {} (DeploymentNotFound: {message}): deploy the model under that name, or set the model's \"deployment\" in the config to the name of its deployment",
            model.name()
        );
    }
    let version = match api {
        AzureApi::V1 => "the v1 API".to_owned(),
        AzureApi::Dated { version } => format!("api-version {version}"),
    };
    format!(
        "Azure OpenAI at {endpoint} does not serve {version} for deployment {deployment:?} ({message}): check AZURE_OPENAI_ENDPOINT (https://NAME.openai.azure.com) and AZURE_OPENAI_API_VERSION"
    )
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`.
fn is_dated_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

/// An `http://` or `https://` URL without query, fragment or trailing slash.
fn http_url(name: &'static str, raw: &str) -> Result<String, EndpointError> {
    let url = raw.trim().trim_end_matches('/');
    let bad = |reason: String| EndpointError::Url { name, reason };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad(format!("{url:?} does not start with https:// (or http://)")))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad(format!("{url:?} has no host")));
    }
    if url.contains(['?', '#']) || url.contains(char::is_whitespace) {
        return Err(bad(format!("{url:?} holds a query, a fragment or spaces: give only the scheme, host and path")));
    }
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use expect_test::{expect, Expect};

    fn models(large: &str, small: &str) -> Models {
        let json = format!(
            r#"{{"version":"1.0","models":{{"large":{large},"small":{small}}},"sources":[{{"name":"a","table":"t","column":"c"}}]}}"#
        );
        Config::parse(&json).unwrap().models
    }

    fn default_models() -> Models {
        models(r#""text-embedding-3-large""#, r#""text-embedding-3-small""#)
    }

    /// The endpoint the variables choose, and the request of each model as sent (with the key
    /// `KEY`), or the error.
    fn check(vars: EndpointVars<'_>, models: &Models, expect: Expect) {
        let actual = match ProviderEndpoint::from_vars(&vars, models) {
            Err(e) => format!("err {e}"),
            Ok(endpoint) => {
                let mut out = format!("{}\n", endpoint.describe());
                for slot in ModelSlot::ALL {
                    let t = endpoint.target(models.get(slot));
                    out.push_str(&format!(
                        "{}: POST {}\n  {}: {}\n  model: {}\n",
                        slot.key(),
                        t.url,
                        t.auth.header_name(),
                        t.auth.header_value("KEY"),
                        t.model
                    ));
                }
                out
            }
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn openai() {
        check(
            EndpointVars::default(),
            &default_models(),
            expect![[r#"
                OpenAI-compatible at https://api.openai.com/v1
                large: POST https://api.openai.com/v1/embeddings
                  authorization: Bearer KEY
                  model: text-embedding-3-large
                small: POST https://api.openai.com/v1/embeddings
                  authorization: Bearer KEY
                  model: text-embedding-3-small
            "#]],
        );
        // A compatible server; deployments are Azure's and are ignored here.
        check(
            EndpointVars { openai_base_url: Some(" http://127.0.0.1:8080/v1/ "), ..EndpointVars::default() },
            &models(r#"{"name":"text-embedding-3-large","deployment":"big"}"#, r#""text-embedding-3-small""#),
            expect![[r#"
                OpenAI-compatible at http://127.0.0.1:8080/v1
                large: POST http://127.0.0.1:8080/v1/embeddings
                  authorization: Bearer KEY
                  model: text-embedding-3-large
                small: POST http://127.0.0.1:8080/v1/embeddings
                  authorization: Bearer KEY
                  model: text-embedding-3-small
            "#]],
        );
    }

    #[test]
    fn azure_deployments_with_a_dated_api_version() {
        check(
            EndpointVars {
                azure_endpoint: Some("https://acme.openai.azure.com/"),
                azure_api_version: Some("2024-10-21"),
                ..EndpointVars::default()
            },
            &models(
                r#"{"name":"text-embedding-3-large","deployment":"emb-large"}"#,
                r#"{"name":"text-embedding-3-small","dimensions":512,"deployment":"emb.small_2"}"#,
            ),
            expect![[r#"
                Azure OpenAI at https://acme.openai.azure.com (api-version 2024-10-21)
                large: POST https://acme.openai.azure.com/openai/deployments/emb-large/embeddings?api-version=2024-10-21
                  api-key: KEY
                  model: emb-large
                small: POST https://acme.openai.azure.com/openai/deployments/emb.small_2/embeddings?api-version=2024-10-21
                  api-key: KEY
                  model: emb.small_2
            "#]],
        );
        // Without `deployment`, a deployment named like the model; a preview version.
        check(
            EndpointVars {
                azure_endpoint: Some("https://acme.openai.azure.com"),
                azure_api_version: Some("2025-04-01-preview"),
                ..EndpointVars::default()
            },
            &default_models(),
            expect![[r#"
                Azure OpenAI at https://acme.openai.azure.com (api-version 2025-04-01-preview)
                large: POST https://acme.openai.azure.com/openai/deployments/text-embedding-3-large/embeddings?api-version=2025-04-01-preview
                  api-key: KEY
                  model: text-embedding-3-large
                small: POST https://acme.openai.azure.com/openai/deployments/text-embedding-3-small/embeddings?api-version=2025-04-01-preview
                  api-key: KEY
                  model: text-embedding-3-small
            "#]],
        );
    }

    #[test]
    fn azure_v1() {
        for version in [None, Some("v1")] {
            check(
                EndpointVars {
                    azure_endpoint: Some("https://acme.openai.azure.com"),
                    azure_api_version: version,
                    ..EndpointVars::default()
                },
                &models(r#"{"name":"text-embedding-3-large","deployment":"emb-large"}"#, r#""text-embedding-3-small""#),
                expect![[r#"
                    Azure OpenAI at https://acme.openai.azure.com (v1 API)
                    large: POST https://acme.openai.azure.com/openai/v1/embeddings
                      api-key: KEY
                      model: emb-large
                    small: POST https://acme.openai.azure.com/openai/v1/embeddings
                      api-key: KEY
                      model: text-embedding-3-small
                "#]],
            );
        }
    }

    #[test]
    fn unusable_settings() {
        let azure = |endpoint: &'static str, version: Option<&'static str>| EndpointVars {
            azure_endpoint: Some(endpoint),
            azure_api_version: version,
            ..EndpointVars::default()
        };
        let m = default_models();
        check(
            EndpointVars { openai_base_url: Some("https://api.openai.com/v1"), ..azure("https://acme.openai.azure.com", None) },
            &m,
            expect!["err OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT are both set: set AZURE_OPENAI_ENDPOINT for Azure OpenAI or OPENAI_BASE_URL for another provider, not both"],
        );
        check(
            EndpointVars { azure_api_version: Some("2024-10-21"), ..EndpointVars::default() },
            &m,
            expect!["err AZURE_OPENAI_API_VERSION is set but AZURE_OPENAI_ENDPOINT is not: set AZURE_OPENAI_ENDPOINT to the resource's endpoint (https://NAME.openai.azure.com) or unset AZURE_OPENAI_API_VERSION"],
        );
        check(
            azure("acme.openai.azure.com", None),
            &m,
            expect![[r#"err AZURE_OPENAI_ENDPOINT is not usable: "acme.openai.azure.com" does not start with https:// (or http://)"#]],
        );
        check(
            azure("https://acme.openai.azure.com/openai/deployments/emb/embeddings", None),
            &m,
            expect!["err AZURE_OPENAI_ENDPOINT is not usable: https://acme.openai.azure.com/openai/deployments/emb/embeddings already holds the API path: give the resource's endpoint only (https://NAME.openai.azure.com), embsync adds /openai/..."],
        );
        check(
            azure("https://acme.openai.azure.com/?api-version=2024-10-21", None),
            &m,
            expect![[
                r#"err AZURE_OPENAI_ENDPOINT is not usable: "https://acme.openai.azure.com/?api-version=2024-10-21" holds a query, a fragment or spaces: give only the scheme, host and path"#
            ]],
        );
        // A host or path that merely contains "openai" is fine.
        assert!(ProviderEndpoint::from_vars(&azure("https://openai-prod.openai.azure.com/openai-gw", None), &m).is_ok());
        check(
            azure("https://", None),
            &m,
            expect![[r#"err AZURE_OPENAI_ENDPOINT is not usable: "https:" does not start with https:// (or http://)"#]],
        );
        for version in ["2024-10", "preview", "latest", "2024-10-21-beta"] {
            let e = ProviderEndpoint::from_vars(&azure("https://acme.openai.azure.com", Some(version)), &m).unwrap_err();
            assert_eq!(e, EndpointError::Version(version.into()));
        }
        check(
            azure("https://acme.openai.azure.com", Some("2024-1O-21")),
            &m,
            expect![[
                r#"err AZURE_OPENAI_API_VERSION "2024-1O-21" is not an API version: use v1 (the default) or a dated version such as 2024-10-21"#
            ]],
        );
        check(
            EndpointVars { openai_base_url: Some("api.openai.com/v1"), ..EndpointVars::default() },
            &m,
            expect![[r#"err OPENAI_BASE_URL is not usable: "api.openai.com/v1" does not start with https:// (or http://)"#]],
        );
        // A model name that cannot be a deployment name needs `deployment` on Azure, and only there.
        let odd = models(r#""text-embedding-3-large""#, r#"{"name":"org/embed:v2","dimensions":768}"#);
        check(
            azure("https://acme.openai.azure.com", None),
            &odd,
            expect![[
                r#"err models.small: "org/embed:v2" is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit: set "deployment" to the name of the Azure deployment that serves it"#
            ]],
        );
        assert!(ProviderEndpoint::from_vars(&EndpointVars::default(), &odd).is_ok());
    }

    fn decode(endpoint: &ProviderEndpoint, model: &ModelSpec, status: u16, body: &str) -> String {
        match endpoint.decode_response(model, status, |_| None, body.as_bytes(), 1) {
            Ok(e) => format!("ok {:?}", e.vectors),
            Err(e) => format!("err {e} retryable={} fatal={}", e.is_retryable(), e.is_fatal()),
        }
    }

    #[test]
    fn azure_errors_name_the_deployment_and_the_fix() {
        let m = models(r#"{"name":"text-embedding-3-large","deployment":"emb-large"}"#, r#""text-embedding-3-small""#);
        let dated = ProviderEndpoint::Azure {
            endpoint: "https://acme.openai.azure.com".into(),
            api: AzureApi::Dated { version: "2024-10-21".into() },
        };
        // Azure's bodies, as its REST API sends them.
        let not_found = r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}"#;
        expect![[r#"err the provider refused the request itself (404): Azure OpenAI at https://acme.openai.azure.com has no deployment "emb-large" for model text-embedding-3-large (DeploymentNotFound: The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.): deploy the model under that name, or set the model's "deployment" in the config to the name of its deployment retryable=false fatal=false"#]]
            .assert_eq(&decode(&dated, &m.large, 404, not_found));
        let resource = r#"{"error":{"code":"404","message":"Resource not found"}}"#;
        expect![[r#"err the provider refused the request itself (404): Azure OpenAI at https://acme.openai.azure.com does not serve api-version 2024-10-21 for deployment "text-embedding-3-small" (Resource not found): check AZURE_OPENAI_ENDPOINT (https://NAME.openai.azure.com) and AZURE_OPENAI_API_VERSION retryable=false fatal=false"#]]
            .assert_eq(&decode(&dated, &m.small, 404, resource));
        let v1 = ProviderEndpoint::Azure { endpoint: "https://acme.openai.azure.com".into(), api: AzureApi::V1 };
        expect![[r#"err the provider refused the request itself (404): Azure OpenAI at https://acme.openai.azure.com does not serve the v1 API for deployment "emb-large" (Resource not found): check AZURE_OPENAI_ENDPOINT (https://NAME.openai.azure.com) and AZURE_OPENAI_API_VERSION retryable=false fatal=false"#]]
            .assert_eq(&decode(&v1, &m.large, 404, resource));
        // 401 and 400 are decoded as for OpenAI.
        let denied = r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#;
        expect!["err the provider rejected the API key (401): check the OPENAI_API_KEY secret retryable=false fatal=true"]
            .assert_eq(&decode(&dated, &m.large, 401, denied));
        let bad_version = r#"{"error":{"code":"BadRequest","message":"API version not supported"}}"#;
        expect!["err the provider refused the request itself (400): API version not supported retryable=false fatal=false"]
            .assert_eq(&decode(&dated, &m.large, 400, bad_version));
        // OpenAI's 404 is left as it is.
        let openai = ProviderEndpoint::OpenAi { base_url: DEFAULT_BASE_URL.into() };
        expect!["err the provider refused the request itself (404): DeploymentNotFound retryable=false fatal=false"].assert_eq(&decode(
            &openai,
            &m.large,
            404,
            r#"{"error":{"code":"DeploymentNotFound","message":"DeploymentNotFound"}}"#,
        ));
    }
}
