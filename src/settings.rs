//! The worker's environment, read once per invocation into [`Settings`].

use embsync_core::config::Models;
use embsync_core::config::{Config, ConfigError};
use embsync_core::database::{self, BindingName, BindingState, Choice, DatabaseError, Found};
use embsync_core::endpoint::{EndpointError, EndpointVars, ProviderEndpoint};
use std::fmt;
use worker::{Env, Hyperdrive};

/// The config compiled into the worker; `EMBEDDING_SOURCES` replaces it.
pub const BUILT_IN_CONFIG: &str = include_str!("../embedding-sources.json");

/// A secret string: never shown by `Debug` or `Display`.
#[derive(Clone)]
pub struct Redacted(String);

impl Redacted {
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Redacted(***)")
    }
}

/// A setting that is missing or unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A required secret or variable is not set.
    #[error("{name} is not set: {hint}")]
    Missing {
        /// The variable name.
        name: &'static str,
        /// How to set it.
        hint: &'static str,
    },
    /// No usable database connection (Hyperdrive binding or `DATABASE_URL`).
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// The provider endpoint settings are unusable.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The embedding sources config is invalid.
    #[error("invalid embedding sources config ({origin}): {source}")]
    Config {
        /// `EMBEDDING_SOURCES` or `embedding-sources.json`.
        origin: &'static str,
        /// What is wrong.
        source: ConfigError,
    },
}

/// Reads a string binding (a var or a secret); empty counts as unset.
pub fn string(env: &Env, name: &str) -> Option<String> {
    env.var(name).ok().map(|v| v.to_string()).filter(|v| !v.trim().is_empty())
}

/// Reads a secret binding.
pub fn secret(env: &Env, name: &str) -> Option<Redacted> {
    string(env, name).map(Redacted)
}

/// Parses the config: `EMBEDDING_SOURCES` when set, else the built-in file.
///
/// # Errors
/// [`SettingsError::Config`] naming the origin and the field.
pub fn config(env: &Env) -> Result<Config, SettingsError> {
    match string(env, "EMBEDDING_SOURCES") {
        Some(json) => Config::parse(&json).map_err(|source| SettingsError::Config { origin: "EMBEDDING_SOURCES", source }),
        None => Config::parse(BUILT_IN_CONFIG).map_err(|source| SettingsError::Config { origin: "embedding-sources.json", source }),
    }
}

/// The database connection: a Hyperdrive binding, or `DATABASE_URL`.
pub enum Database {
    /// The Hyperdrive binding (which wins when `DATABASE_URL` is set too).
    Hyperdrive {
        /// Its name.
        binding: BindingName,
        /// The binding.
        hyperdrive: Hyperdrive,
        /// `DATABASE_URL` is set as well, and not used.
        url_ignored: bool,
    },
    /// `DATABASE_URL`.
    Url(Redacted),
}

/// The database connection: the Hyperdrive binding named by `HYPERDRIVE_BINDING` (default
/// `HYPERDRIVE`) when the worker has it, else `DATABASE_URL` (see [`embsync_core::database`]).
///
/// # Errors
/// [`SettingsError::Database`] when there is neither, or the binding named is missing or not a
/// Hyperdrive binding.
pub fn database(env: &Env) -> Result<Database, SettingsError> {
    let named = string(env, database::BINDING_VAR);
    let binding = match &named {
        Some(name) => BindingName::parse(name.trim())?,
        None => BindingName::default_name(),
    };
    let present = js_sys::Reflect::get(env, &binding.as_str().into()).is_ok_and(|v| !v.is_undefined());
    let (state, hyperdrive) = if !present {
        (BindingState::Absent, None)
    } else {
        match env.hyperdrive(binding.as_str()) {
            Ok(hd) => (BindingState::Hyperdrive, Some(hd)),
            Err(e) => (BindingState::Other(e.to_string()), None),
        }
    };
    let url = secret(env, "DATABASE_URL");
    let found = Found { binding, named: named.is_some(), state, database_url: url.is_some() };
    match (database::choose(&found)?, hyperdrive, url) {
        (Choice::Hyperdrive { binding, url_ignored }, Some(hyperdrive), _) => Ok(Database::Hyperdrive { binding, hyperdrive, url_ignored }),
        (Choice::DatabaseUrl, _, Some(url)) => Ok(Database::Url(url)),
        // `choose` only picks what was found.
        _ => Err(DatabaseError::NoDatabase.into()),
    }
}

/// `OPENAI_API_KEY`.
///
/// # Errors
/// [`SettingsError::Missing`] when unset.
pub fn api_key(env: &Env) -> Result<Redacted, SettingsError> {
    secret(env, "OPENAI_API_KEY")
        .ok_or(SettingsError::Missing { name: "OPENAI_API_KEY", hint: "set it with `wrangler secret put OPENAI_API_KEY`" })
}

/// The provider endpoint: Azure OpenAI when `AZURE_OPENAI_ENDPOINT` is set (with
/// `AZURE_OPENAI_API_VERSION` and the models' deployments), else `OPENAI_BASE_URL`.
///
/// # Errors
/// [`SettingsError::Endpoint`] naming the variable and the fix.
pub fn endpoint(env: &Env, models: &Models) -> Result<ProviderEndpoint, SettingsError> {
    let (base_url, azure_endpoint, azure_api_version) =
        (string(env, "OPENAI_BASE_URL"), string(env, "AZURE_OPENAI_ENDPOINT"), string(env, "AZURE_OPENAI_API_VERSION"));
    let vars = EndpointVars {
        openai_base_url: base_url.as_deref(),
        azure_endpoint: azure_endpoint.as_deref(),
        azure_api_version: azure_api_version.as_deref(),
    };
    Ok(ProviderEndpoint::from_vars(&vars, models)?)
}
