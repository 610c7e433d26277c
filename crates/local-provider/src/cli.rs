//! Command-line parsing for `embsync-local-provider`.

use std::path::PathBuf;
use std::time::Duration;

use crate::api::Model;
use crate::azure::Deployments;
use crate::ratelimit;
use crate::server::Config;

/// The usage text printed by `--help` and after a usage error.
pub const USAGE: &str = "\
Usage: embsync-local-provider [--port P] [--host H] [--api-key KEY] [--log FILE] [--latency-ms N]
                              [--latency-per-input-ms N] [--rpm [MODEL=]N]... [--tpm [MODEL=]N]...
                              [--no-base64] [--azure] [--azure-deployment NAME=MODEL]...
                              [--batch-completion-ms N]

An OpenAI-compatible embeddings server with deterministic vectors, for tests and demos.

Options:
  --port P         port to listen on; 0 (default) picks a free one
  --host H         interface to listen on (default 127.0.0.1)
  --api-key KEY    accept only this bearer token (default: any bearer token)
  --log FILE       also append every embeddings request log entry to FILE as a JSON line
  --latency-ms N   delay every embeddings answer by N milliseconds (default 0)
  --latency-per-input-ms N
                   and by N more milliseconds per input of the request (default 0)
  --rpm [MODEL=]N  rate-limit mode: at most N requests per minute per API key and model
                   (repeatable; with MODEL= for that model only; default 10000)
  --tpm [MODEL=]N  rate-limit mode: at most N input tokens per minute per API key and model
                   (repeatable like --rpm; default 10000000). Past a limit: OpenAI's 429
  --no-base64      refuse encoding_format \"base64\" with a 400, like a float-only server
  --azure          serve Azure OpenAI's API instead: POST /openai/deployments/NAME/embeddings
                   ?api-version=YYYY-MM-DD and POST /openai/v1/embeddings, the key in an
                   `api-key` header; without --azure-deployment each model is a deployment
                   of its own name
  --azure-deployment NAME=MODEL
                   (repeatable; implies --azure) a deployment NAME serving MODEL
  --batch-completion-ms N
                   the Batch API: a batch stays in_progress N milliseconds (default 0);
                   more switches through POST /_admin/batch
  -h, --help       print this help

The first line on stdout is `listening on http://HOST:PORT`.";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the server.
    Serve(Config),
    /// Print the usage text.
    Help,
}

/// Parses the arguments (without the program name). Options take their value
/// as the next argument or after `=` (`--port 8080`, `--port=8080`).
pub fn parse_args<I>(args: I) -> Result<Command, String>
where
    I: IntoIterator,
    I::Item: Into<String>,
{
    let mut config = Config::default();
    // `--azure` / `--azure-deployment`: the deployments given (none: named like the models).
    let mut azure: Option<Vec<(String, Model)>> = None;
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        if arg == "--no-base64" {
            config.reject_base64 = true;
            continue;
        }
        if arg == "--azure" {
            azure.get_or_insert_with(Vec::new);
            continue;
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline_value.clone().or_else(|| args.next()).ok_or_else(|| format!("{name} needs a value"));
        match name.as_str() {
            "--port" => {
                let text = value()?;
                config.port = text.parse().map_err(|_| format!("--port: not a port number: {text:?}"))?;
            }
            "--host" => config.host = value()?,
            "--api-key" => {
                let key = value()?;
                if key.is_empty() {
                    return Err("--api-key must not be empty".to_string());
                }
                config.api_key = Some(key);
            }
            "--log" => config.log_file = Some(PathBuf::from(value()?)),
            "--batch-completion-ms" => {
                let text = value()?;
                config.batch.completion_ms = text.parse().map_err(|_| format!("{name}: not a number of milliseconds: {text:?}"))?;
            }
            "--latency-ms" | "--latency-per-input-ms" => {
                let text = value()?;
                let ms: u64 = text.parse().map_err(|_| format!("{name}: not a number of milliseconds: {text:?}"))?;
                if name == "--latency-ms" {
                    config.latency = Duration::from_millis(ms);
                } else {
                    config.latency_per_input = Duration::from_millis(ms);
                }
            }
            "--rpm" | "--tpm" => {
                let (model, limit) = ratelimit::parse_limit_arg(&value()?).map_err(|err| format!("{name}: {err}"))?;
                let limits = &mut config.rate_limits;
                limits.enabled = true;
                let (rpm, tpm) = match model {
                    None => (&mut limits.rpm, &mut limits.tpm),
                    Some(model) => {
                        let own = limits.models.entry(model).or_default();
                        (&mut own.rpm, &mut own.tpm)
                    }
                };
                *(if name == "--rpm" { rpm } else { tpm }) = Some(limit);
            }
            "--azure-deployment" => {
                let deployment = crate::azure::parse_deployment(&value()?)?;
                azure.get_or_insert_with(Vec::new).push(deployment);
            }
            _ => return Err(format!("unknown argument: {arg}")),
        }
    }
    config.azure = azure.map(|given| if given.is_empty() { Deployments::named_like_models() } else { Deployments::new(given) });
    Ok(Command::Serve(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Limits, RateLimitConfig};

    fn serve(args: &[&str]) -> Config {
        match parse_args(args.iter().copied()) {
            Ok(Command::Serve(config)) => config,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(serve(&[]), Config::default());
        assert_eq!(Config::default().host, "127.0.0.1");
        assert_eq!(Config::default().port, 0);
    }

    #[test]
    fn all_options() {
        let config = serve(&["--port", "8081", "--host=0.0.0.0", "--api-key", "sk-x", "--log", "/tmp/l.jsonl", "--latency-ms=25"]);
        assert_eq!(
            config,
            Config {
                host: "0.0.0.0".into(),
                port: 8081,
                api_key: Some("sk-x".into()),
                log_file: Some(PathBuf::from("/tmp/l.jsonl")),
                latency: Duration::from_millis(25),
                latency_per_input: Duration::ZERO,
                rate_limits: RateLimitConfig::default(),
                reject_base64: false,
                azure: None,
                batch: crate::batch::BatchConfig::default(),
            }
        );
        assert_eq!(serve(&["--batch-completion-ms=1500"]).batch.completion_ms, 1500);
        assert!(serve(&["--no-base64"]).reject_base64);
        assert_eq!(serve(&["--azure"]).azure, Some(Deployments::named_like_models()));
        assert_eq!(
            serve(&[
                "--azure-deployment",
                "emb-large=text-embedding-3-large",
                "--azure-deployment=emb-small=text-embedding-3-small",
                "--azure",
            ])
            .azure,
            Some(Deployments::new(vec![
                ("emb-large".into(), Model::TextEmbedding3Large),
                ("emb-small".into(), Model::TextEmbedding3Small),
            ]))
        );
        let limited = serve(&["--rpm", "3000", "--tpm=1000000", "--rpm", "text-embedding-3-large=500", "--latency-per-input-ms", "2"]);
        assert_eq!(limited.latency_per_input, Duration::from_millis(2));
        assert_eq!(
            limited.rate_limits,
            RateLimitConfig {
                enabled: true,
                rpm: Some(3000),
                tpm: Some(1_000_000),
                models: [("text-embedding-3-large".to_string(), Limits { rpm: Some(500), tpm: None })].into(),
            }
        );
        assert!(!serve(&[]).rate_limits.enabled);
        // A key may itself contain '='.
        assert_eq!(serve(&["--api-key=a=b"]).api_key.as_deref(), Some("a=b"));
    }

    #[test]
    fn help_and_errors() {
        assert_eq!(parse_args(["--help"]), Ok(Command::Help));
        assert_eq!(parse_args(["--port", "1", "-h"]), Ok(Command::Help));
        for bad in [
            &["--port"][..],
            &["--port", "99999"],
            &["--port", "x"],
            &["--latency-ms", "-1"],
            &["--latency-per-input-ms", "x"],
            &["--batch-completion-ms", "soon"],
            &["--rpm", "0"],
            &["--tpm", "gpt-4=10"],
            &["--rpm"],
            &["--api-key", ""],
            &["--verbose"],
            &["--no-base64=1"],
            &["--azure-deployment", "emb"],
            &["--azure-deployment", "emb=gpt-4"],
            &["--azure=1"],
            &["8080"],
        ] {
            assert!(parse_args(bad.iter().copied()).is_err(), "{bad:?}");
        }
    }
}
