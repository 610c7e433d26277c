//! The local provider process: starting it, its admin API (request log, faults) and direct
//! embeddings requests.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;

use serde_json::{json, Value};

use crate::http::{send, to_json};
use crate::util::{env_var, keep_logs, port_of, tail_of, temp_dir};
use crate::values::decode_base64;

/// The local OpenAI-compatible provider (`embsync-local-provider`), killed on drop.
pub struct Provider {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    pub port: u16,
    pub api_key: Option<String>,
    dir: PathBuf,
}

impl Provider {
    /// Starts the provider on a free port, optionally requiring `api_key`.
    pub fn start(api_key: Option<&str>) -> Provider {
        Provider::start_with(api_key, &[])
    }

    /// Like [`Provider::start`], with extra command-line options (e.g. `--no-base64`).
    pub fn start_with(api_key: Option<&str>, extra_args: &[&str]) -> Provider {
        let bin = env_var("EMBSYNC_PROVIDER_BIN");
        let dir = temp_dir("embsync-e2e-provider");
        let mut cmd = Command::new(&bin);
        cmd.arg("--port").arg("0").arg("--log").arg(dir.join("requests.log"));
        if let Some(k) = api_key {
            cmd.arg("--api-key").arg(k);
        }
        cmd.args(extra_args);
        let stderr = File::create(dir.join("stderr.log")).expect("provider stderr file");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("read provider stdout");
        let origin = match first.trim().strip_prefix("listening on ") {
            Some(o) => o.trim_end_matches('/').to_string(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "provider did not print `listening on http://...` first but {first:?}; stderr:\n{}",
                    tail_of(&dir.join("stderr.log"), 40)
                );
            }
        };
        let port = port_of(&origin);
        // Keep draining stdout so the provider never blocks on a full pipe.
        let mut out = File::create(dir.join("stdout.log")).expect("provider stdout file");
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = out.write_all(&buf[..n]);
            }
        });
        Provider { child, origin, port, api_key: api_key.map(str::to_string), dir }
    }

    /// The base URL the worker gets as `OPENAI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin)
    }

    fn admin(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let url = format!("{}{path}", self.origin);
        let (status, text) = send(method, &url, &[], body).unwrap_or_else(|e| panic!("provider admin: {e}"));
        assert!((200..300).contains(&status), "provider {method} {path} -> {status}: {text}");
        to_json(&text)
    }

    /// The provider's request log (`GET /_admin/requests`), oldest first.
    pub fn requests(&self) -> Vec<Value> {
        match self.admin("GET", "/_admin/requests", None) {
            Value::Array(a) => a,
            v => panic!("unexpected /_admin/requests answer (want an array): {v:#}"),
        }
    }

    /// The embedding requests in the log: `(model, inputs)` each. An entry of the provider's log
    /// looks like `{"seq":1,"path":"/v1/embeddings","model":"...","inputs":["..."],
    /// "dimensions":null,"encodingFormat":"float","status":200,"fault":null,"authorized":true}`.
    pub fn embedding_requests(&self) -> Vec<(String, Vec<String>)> {
        self.requests()
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/embeddings")))
            .map(|r| {
                let model = r["model"].as_str().unwrap_or_default().to_string();
                let inputs = r["inputs"]
                    .as_array()
                    .unwrap_or_else(|| panic!("provider log entry without inputs[]: {r}"))
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().to_string())
                    .collect();
                (model, inputs)
            })
            .collect()
    }

    /// Every input sent for `model`, with repetitions.
    pub fn inputs_for(&self, model: &str) -> Vec<String> {
        self.embedding_requests().into_iter().filter(|(m, _)| m == model).flat_map(|(_, i)| i).collect()
    }

    /// Empties the request log.
    pub fn clear(&self) {
        self.admin("DELETE", "/_admin/requests", None);
    }

    /// Sets fault switches (`POST /_admin/faults`).
    pub fn set_faults(&self, faults: &Value) {
        self.admin("POST", "/_admin/faults", Some(&faults.to_string()));
    }

    /// Sets the Batch API's switches for the batches created from now on (`POST
    /// /_admin/batch`: `completionMs`, `validatingMs`, `finalizingMs`, `failEvery`,
    /// `failInputContains`, `expireAfterLines`, `failValidation`, `lineDelayMs`).
    pub fn set_batch(&self, switches: &Value) {
        self.admin("POST", "/_admin/batch", Some(&switches.to_string()));
    }

    /// The batches the provider holds (`GET /_admin/batches`): `id`, `status`, `inputFileId`,
    /// `model`, `requests`, `inputs` each.
    pub fn batches(&self) -> Vec<Value> {
        match self.admin("GET", "/_admin/batches", None) {
            Value::Array(a) => a,
            v => panic!("unexpected /_admin/batches answer (want an array): {v:#}"),
        }
    }

    /// The inputs of batch `id`'s requests, in file order.
    pub fn batch_inputs(&self, id: &str) -> Vec<String> {
        match self.admin("GET", &format!("/_admin/batches/{id}/inputs"), None) {
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap_or_default().to_string()).collect(),
            v => panic!("unexpected inputs of batch {id} (want an array): {v:#}"),
        }
    }

    /// Every input of the batches created for `model`, with repetitions.
    pub fn batch_inputs_for(&self, model: &str) -> Vec<String> {
        self.batches()
            .iter()
            .filter(|b| b["model"] == model)
            .flat_map(|b| self.batch_inputs(b["id"].as_str().expect("a batch id")))
            .collect()
    }

    /// `GET {base_url}/{path}` with the key, as a client would; asserts 200.
    fn get_api(&self, path: &str) -> String {
        let auth = self.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let url = format!("{}/{path}", self.base_url());
        let (status, text) = send("GET", &url, &headers, None).unwrap_or_else(|e| panic!("provider GET {path}: {e}"));
        assert_eq!(status, 200, "provider GET {path}: {text:.500}");
        text
    }

    /// Batch `id` as `GET /v1/batches/{id}` answers it.
    pub fn batch_object(&self, id: &str) -> Value {
        to_json(&self.get_api(&format!("batches/{id}")))
    }

    /// A file's content as the provider serves it (`GET /v1/files/{id}/content`), as lines.
    pub fn file_lines(&self, file_id: &str) -> Vec<Value> {
        self.get_api(&format!("files/{file_id}/content")).lines().filter(|l| !l.trim().is_empty()).map(to_json).collect()
    }

    /// Sends an embeddings request directly (it shows in the request log); returns the answer.
    fn post_embeddings(&self, body: &Value) -> Value {
        let auth = self.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let url = format!("{}/embeddings", self.base_url());
        let (status, text) = send("POST", &url, &headers, Some(&body.to_string())).expect("provider embed");
        assert_eq!(status, 200, "provider embed: {text:.500}");
        to_json(&text)
    }

    /// The exact `f32` embedding of `input`, asked for in base64 (no decimal rounding on the
    /// way). The request shows in the request log.
    pub fn embed_exact(&self, model: &str, input: &str, dimensions: Option<u64>) -> Vec<f32> {
        let v = self.post_embeddings(&embeddings_body(model, input, dimensions, "base64"));
        let b64 = v["data"][0]["embedding"].as_str().unwrap_or_else(|| panic!("no base64 data[0].embedding in {v:.500}"));
        let bytes = decode_base64(b64);
        assert_eq!(bytes.len() % 4, 0, "base64 embedding of {} bytes", bytes.len());
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// The provider's own `usage.prompt_tokens` for `inputs` (one request; it shows in the
    /// request log).
    pub fn prompt_tokens(&self, model: &str, inputs: &[String]) -> i64 {
        let v = self.post_embeddings(&json!({"model": model, "input": inputs, "encoding_format": "base64"}));
        v["usage"]["prompt_tokens"].as_i64().unwrap_or_else(|| panic!("no usage.prompt_tokens in {v:.500}"))
    }

    /// Asks the provider directly for the embedding of `input` (float encoding).
    pub fn embed(&self, model: &str, input: &str, dimensions: Option<u64>) -> Vec<f32> {
        let v = self.post_embeddings(&embeddings_body(model, input, dimensions, "float"));
        v["data"][0]["embedding"]
            .as_array()
            .unwrap_or_else(|| panic!("no data[0].embedding in {v:.500}"))
            .iter()
            .map(|x| x.as_f64().expect("float component") as f32)
            .collect()
    }
}

/// An embeddings request for the one `input`, with `dimensions` when given.
fn embeddings_body(model: &str, input: &str, dimensions: Option<u64>, encoding_format: &str) -> Value {
    let mut body = json!({"model": model, "input": [input], "encoding_format": encoding_format});
    if let Some(d) = dimensions {
        body["dimensions"] = json!(d);
    }
    body
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if keep_logs() {
            eprintln!("--- provider files kept in {} ---", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
