//! End-to-end tests of the server over real TCP connections: each test starts
//! its own server on a free port and talks raw HTTP/1.1 to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{EmbeddingData, EmbeddingList};
use crate::client::Reply;
use crate::server::{Config, Server};
use crate::vectors;

const KEY: &str = "sk-test-key-0123456789";

fn start(config: Config) -> SocketAddr {
    Server::bind(&config).unwrap().spawn().unwrap()
}

fn start_with_key() -> SocketAddr {
    start(Config { api_key: Some(KEY.to_string()), ..Config::default() })
}

/// A raw HTTP/1.1 client on one connection.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn send_raw(&mut self, raw: &[u8]) {
        self.writer.write_all(raw).unwrap();
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "line not CRLF-terminated: {line:?}");
        line.truncate(line.len() - 2);
        line
    }

    /// Reads one response framed by its Content-Length.
    fn read_reply(&mut self) -> Reply {
        let status_line = self.read_line();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status: u16 = parts.next().unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.read_line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(": ").unwrap();
            headers.push((name.to_string(), value.to_string()));
        }
        let mut reply = Reply { status, headers, body: Vec::new() };
        let length: usize = reply.header("content-length").expect("content-length").parse().unwrap();
        reply.body = vec![0; length];
        self.reader.read_exact(&mut reply.body).unwrap();
        reply
    }

    /// Sends a request with a Content-Length body and reads the reply.
    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        self.send_raw(raw.as_bytes());
        self.read_reply()
    }

    fn embed(&mut self, body: Value) -> Reply {
        let auth = format!("Bearer {KEY}");
        self.request("POST", "/v1/embeddings", &[("Authorization", &auth), ("Content-Type", "application/json")], &body.to_string())
    }

    /// Whether the server closed the connection (EOF on read).
    fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }
}

fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    Client::connect(addr).request(method, path, &[("Connection", "close")], body)
}

fn small(input: Value) -> Value {
    json!({"model": "text-embedding-3-small", "input": input})
}

#[test]
fn keep_alive_with_content_length_and_chunked_bodies() {
    let addr = start_with_key();
    let mut client = Client::connect(addr);

    let health = client.request("GET", "/health", &[], "");
    assert_eq!((health.status, health.json()), (200, json!({"status": "ok"})));
    assert_eq!(health.header("connection"), None);

    let first = client.embed(small(json!(["hello", "world"])));
    assert_eq!(first.status, 200);
    let list: EmbeddingList = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(list.data.len(), 2);
    assert_eq!(list.model, "text-embedding-3-small");

    // The same request again, as a chunked body split mid-JSON.
    let body = small(json!(["hello", "world"])).to_string();
    let (a, b) = body.split_at(10);
    let raw = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    client.send_raw(raw.as_bytes());
    let second = client.read_reply();
    assert_eq!(second.status, 200);
    let again: EmbeddingList = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(again.data, list.data, "same input, same vectors");

    // Pipelined requests are answered in order.
    let health_raw = "GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    client.send_raw(format!("{health_raw}GET /nope HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    assert_eq!(client.read_reply().status, 200);
    assert_eq!(client.read_reply().status, 404);

    let log = admin(addr, "GET", "/_admin/requests", "").json();
    let seqs: Vec<_> = log.as_array().unwrap().iter().map(|e| e["seq"].clone()).collect();
    assert_eq!(seqs, [json!(1), json!(2)]);
}

#[test]
fn connection_close_and_http_1_0() {
    let addr = start(Config::default());
    let mut client = Client::connect(addr);
    let reply = client.request("GET", "/health", &[("Connection", "close")], "");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.is_closed());

    let mut old = Client::connect(addr);
    old.send_raw(b"GET /health HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    old.reader.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n{\"status\":\"ok\"}"), "{text}");
}

#[test]
fn malformed_requests_get_400_and_close() {
    let addr = start(Config::default());
    let mut client = Client::connect(addr);
    client.send_raw(b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.is_closed());
}

#[test]
fn oversized_bodies_get_413() {
    let addr = start(Config::default());
    let mut client = Client::connect(addr);
    let too_big = crate::http::MAX_BODY_BYTES + 1;
    client.send_raw(format!("POST /v1/embeddings HTTP/1.1\r\nContent-Length: {too_big}\r\n\r\n{{").as_bytes());
    let reply = client.read_reply();
    assert_eq!(reply.status, 413);
    assert!(client.is_closed());
}

#[test]
fn hang_is_logged_before_the_late_answer() {
    let addr = start(Config::default());
    admin(addr, "POST", "/_admin/faults", r#"{"rules":[{"body":"hang","times":1}]}"#);
    let mut client = Client::connect(addr);
    // Reader and writer share one socket, so this applies to both.
    let socket = client.reader.get_ref();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let body = small(json!("slow")).to_string();
    client.send_raw(
        format!("POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
    );
    let mut byte = [0u8; 1];
    let read = client.reader.read(&mut byte);
    assert!(read.is_err(), "expected no answer yet, got {read:?}");
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    assert_eq!(log[0]["fault"], "rules[0]: body hang");
    assert_eq!(log[0]["status"], 200);
    // The rule fired once; other connections are served normally meanwhile.
    let mut other = Client::connect(addr);
    let reply = other.request("POST", "/v1/embeddings", &[("Authorization", "Bearer k")], &body);
    assert_eq!(reply.status, 200);
}

#[test]
fn expect_100_continue() {
    let addr = start(Config::default());
    let mut client = Client::connect(addr);
    let body = small(json!("x")).to_string();
    client.send_raw(
        format!(
            "POST /embeddings HTTP/1.1\r\nAuthorization: Bearer any\r\nExpect: 100-continue\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(client.read_line(), "HTTP/1.1 100 Continue");
    assert_eq!(client.read_line(), "");
    client.send_raw(body.as_bytes());
    assert_eq!(client.read_reply().status, 200);
}

#[test]
fn success_headers_and_base64() {
    let addr = start_with_key();
    let mut client = Client::connect(addr);
    let request = json!({"model": "text-embedding-3-large", "input": ["a", "b c"], "dimensions": 8});
    let floats = client.embed(request.clone());
    assert_eq!(floats.status, 200);
    for header in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "openai-processing-ms",
    ] {
        assert!(floats.header(header).is_some(), "missing {header}");
    }
    assert!(floats.header("x-request-id").is_some_and(|id| id.starts_with("req_")));
    assert_eq!(floats.header("content-type"), Some("application/json"));
    let body = floats.json();
    assert_eq!(body["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));

    let mut base64_request = request;
    base64_request["encoding_format"] = json!("base64");
    let encoded: EmbeddingList = serde_json::from_slice(&client.embed(base64_request).body).unwrap();
    let float_list: EmbeddingList = serde_json::from_value(body).unwrap();
    for (b64, float) in encoded.data.iter().zip(&float_list.data) {
        let (EmbeddingData::Base64(text), EmbeddingData::Float(values)) = (&b64.embedding, &float.embedding) else {
            panic!("unexpected encodings: {b64:?} / {float:?}");
        };
        assert_eq!(vectors::decode_base64(text).as_ref(), Some(values));
        assert_eq!(values.len(), 8);
    }
}

#[test]
fn auth_errors_and_log_entries() {
    let addr = start_with_key();
    let mut client = Client::connect(addr);
    let body = small(json!("x")).to_string();

    let missing = client.request("POST", "/v1/embeddings", &[], &body);
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");

    let wrong_key = "sk-wrong-key-abcdefghijklmnop";
    let wrong = client.request("POST", "/v1/embeddings", &[("Authorization", &format!("Bearer {wrong_key}"))], &body);
    assert_eq!(wrong.status, 401);
    let error = wrong.json()["error"].clone();
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["param"], Value::Null);
    assert!(error["message"].as_str().unwrap().starts_with("Incorrect API key provided: sk-"));
    assert!(!String::from_utf8_lossy(&wrong.body).contains(wrong_key));

    let unknown = client.embed(json!({"model": "x", "input": "y"}));
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");

    let mut log = admin(addr, "GET", "/_admin/requests", "").json();
    // The times: set, in order, and taken out before the comparison.
    for entry in log.as_array_mut().unwrap() {
        let entry = entry.as_object_mut().unwrap();
        let started = entry.remove("startedMs").unwrap().as_u64().unwrap();
        let ended = entry.remove("endedMs").unwrap().as_u64().unwrap();
        assert!(started > 1_700_000_000_000 && started <= ended, "{started} {ended}");
    }
    assert_eq!(
        log,
        json!([
            {"seq": 1, "path": "/v1/embeddings", "model": "text-embedding-3-small", "inputs": ["x"],
             "dimensions": null, "encodingFormat": null, "status": 401, "fault": null, "authorized": false,
             "key": null, "tokens": null, "rateLimit": null},
            {"seq": 2, "path": "/v1/embeddings", "model": "text-embedding-3-small", "inputs": ["x"],
             "dimensions": null, "encodingFormat": null, "status": 401, "fault": null, "authorized": false,
             "key": "sk-**********************mnop", "tokens": null, "rateLimit": null},
            {"seq": 3, "path": "/v1/embeddings", "model": "x", "inputs": ["y"],
             "dimensions": null, "encodingFormat": null, "status": 404, "fault": null, "authorized": true,
             "key": "sk-***************6789", "tokens": null, "rateLimit": null},
        ])
    );
    assert_eq!(admin(addr, "DELETE", "/_admin/requests", "").json(), json!({"cleared": 3}));
    client.embed(small(json!("again")));
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    assert_eq!(log[0]["seq"], 1);
    assert_eq!(log.as_array().map(Vec::len), Some(1));
}

#[test]
fn fault_rules_over_http() {
    let addr = start_with_key();
    let config = json!({
        "latencyMs": 0,
        "remainingRequests": 7,
        "rules": [
            {"status": 429, "retryAfter": "1", "retryAfterMs": 250, "nth": [2]},
            {"body": "wrongCount", "nth": [3]},
            {"body": "wrongDims", "nth": [4]},
            {"body": "malformed", "nth": [5]},
            {"status": 500, "inputContains": "explode", "times": 1},
        ]
    });
    let set = admin(addr, "POST", "/_admin/faults", &config.to_string());
    assert_eq!(set.status, 200);
    assert_eq!(admin(addr, "GET", "/_admin/faults", "").json()["rules"][0]["retryAfter"], "1");

    let mut client = Client::connect(addr);
    let request = json!({"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 4});
    let ok = client.embed(request.clone());
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-ratelimit-remaining-requests"), Some("7"));

    let limited = client.embed(request.clone());
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(limited.header("retry-after-ms"), Some("250"));
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");

    let short = client.embed(request.clone()).json();
    assert_eq!(short["data"].as_array().map(Vec::len), Some(1));
    let thin = client.embed(request.clone()).json();
    assert_eq!(thin["data"][0]["embedding"].as_array().map(Vec::len), Some(3));
    let broken = client.embed(request.clone());
    assert_eq!(broken.status, 200);
    assert!(serde_json::from_slice::<Value>(&broken.body).is_err());

    assert_eq!(client.embed(small(json!("explode"))).status, 500);
    assert_eq!(client.embed(small(json!("explode"))).status, 200, "times: 1");

    let log = admin(addr, "GET", "/_admin/requests", "").json();
    let faults: Vec<_> = log.as_array().unwrap().iter().map(|e| e["fault"].clone()).collect();
    assert_eq!(
        faults,
        [
            Value::Null,
            json!("rules[0]: status 429"),
            json!("rules[1]: body wrongCount"),
            json!("rules[2]: body wrongDims"),
            json!("rules[3]: body malformed"),
            json!("rules[4]: status 500"),
            Value::Null,
        ]
    );

    let bad = admin(addr, "POST", "/_admin/faults", r#"{"rules":[{"status":429,"nht":[1]}]}"#);
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"].as_str().unwrap().contains("nht"));
    assert_eq!(admin(addr, "DELETE", "/_admin/faults", "").json()["rules"], json!([]));
    assert_eq!(client.embed(request).status, 200);
}

#[test]
fn latency_delays_answers() {
    let addr = start(Config { latency: Duration::from_millis(30), ..Config::default() });
    admin(addr, "POST", "/_admin/faults", r#"{"latencyMs": 40}"#);
    let mut client = Client::connect(addr);
    let started = std::time::Instant::now();
    let reply = client.request("POST", "/v1/embeddings", &[("Authorization", "Bearer k")], &small(json!("x")).to_string());
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(70));
    let processing: u64 = reply.header("openai-processing-ms").unwrap().parse().unwrap();
    assert!(processing >= 70, "{processing}");
}

#[test]
fn unknown_paths_and_methods() {
    let addr = start(Config::default());
    let mut client = Client::connect(addr);
    let missing = client.request("GET", "/v1/models", &[], "");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["message"], "Invalid URL (GET /v1/models)");
    let wrong = client.request("GET", "/v1/embeddings", &[], "");
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("POST"));
    // The connection survives error answers.
    assert_eq!(client.request("GET", "/health?probe=1", &[], "").status, 200);
}

#[test]
fn log_file_gets_json_lines() {
    let path = std::env::temp_dir().join(format!("local-provider-test-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let addr = start(Config { log_file: Some(path.clone()), ..Config::default() });
    let mut client = Client::connect(addr);
    let auth = [("Authorization", "Bearer k")];
    client.request("POST", "/v1/embeddings", &auth, &small(json!("one")).to_string());
    client.request("POST", "/v1/embeddings", &auth, "not json");
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["seq"].clone(), lines[0]["status"].clone()), (json!(1), json!(200)));
    assert_eq!((lines[1]["seq"].clone(), lines[1]["status"].clone()), (json!(2), json!(400)));
}

#[test]
fn base64_can_be_refused() {
    let expected = json!({"error": {
        "message": "Invalid value for 'encoding_format': 'base64' is not supported",
        "type": "invalid_request_error", "param": "encoding_format", "code": null}});
    let mut b64 = small(json!(["a", "b"]));
    b64["encoding_format"] = json!("base64");
    let mut float = small(json!(["a", "b"]));
    float["encoding_format"] = json!("float");

    // `--no-base64`.
    let addr = start(Config { api_key: Some(KEY.to_string()), reject_base64: true, ..Config::default() });
    let mut client = Client::connect(addr);
    let refused = client.embed(b64.clone());
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json(), expected);
    assert_eq!(client.embed(float.clone()).status, 200);
    assert_eq!(client.embed(small(json!("x"))).status, 200);
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    assert_eq!(log[0]["fault"], "rejectBase64");
    assert_eq!(log[0]["encodingFormat"], "base64");
    assert_eq!(log[0]["status"], 400);
    assert_eq!(log[1]["fault"], Value::Null);

    // `rejectBase64` in the fault config: before the rules (which do not count it as fired).
    let addr = start_with_key();
    let mut client = Client::connect(addr);
    assert_eq!(client.embed(b64.clone()).status, 200);
    let set = admin(addr, "POST", "/_admin/faults", r#"{"rejectBase64": true, "rules": [{"status": 500, "times": 1}]}"#);
    assert_eq!(set.status, 200);
    assert_eq!(set.json()["rejectBase64"], true);
    let refused = client.embed(b64.clone());
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json(), expected);
    assert_eq!(client.embed(float.clone()).status, 500);
    assert_eq!(client.embed(float).status, 200);
    admin(addr, "DELETE", "/_admin/faults", "");
    assert_eq!(client.embed(b64).status, 200);
}

fn start_azure() -> SocketAddr {
    start(Config {
        api_key: Some(KEY.to_string()),
        azure: Some(crate::azure::Deployments::new(vec![
            ("emb-large".into(), crate::api::Model::TextEmbedding3Large),
            ("emb-small".into(), crate::api::Model::TextEmbedding3Small),
        ])),
        ..Config::default()
    })
}

/// An Azure error body's code and message.
fn azure_error(reply: &Reply) -> (u16, String, String) {
    let error = reply.json()["error"].clone();
    (reply.status, error["code"].as_str().unwrap_or_default().to_string(), error["message"].as_str().unwrap_or_default().to_string())
}

#[test]
fn azure_mode_serves_deployments_with_the_api_key_header() {
    let addr = start_azure();
    let mut client = Client::connect(addr);
    let body = json!({"input": ["hello"], "encoding_format": "float"}).to_string();
    let key = [("api-key", KEY), ("Content-Type", "application/json")];
    let deployment = "/openai/deployments/emb-large/embeddings?api-version=2024-10-21";

    // The deployment picks the model; `model` in the body is ignored, as Azure ignores it.
    let ok = client.request("POST", deployment, &key, &body);
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let list: EmbeddingList = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(list.model, "text-embedding-3-large");
    assert_eq!(list.data[0].embedding, EmbeddingData::Float(vectors::embedding("text-embedding-3-large", "hello", 3072)));
    let with_model = json!({"model": "text-embedding-3-small", "input": "hello"}).to_string();
    let ignored = client.request("POST", deployment, &key, &with_model);
    assert_eq!(ignored.json()["model"], "text-embedding-3-large");

    // The v1 API: the body's `model` names the deployment; api-version optional.
    let v1 = json!({"model": "emb-small", "input": "hello"}).to_string();
    for path in ["/openai/v1/embeddings", "/openai/v1/embeddings?api-version=v1"] {
        let reply = client.request("POST", path, &key, &v1);
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.json()["model"], "text-embedding-3-small");
    }

    // A bearer token is not Azure's key header: 401, Azure-shaped.
    let bearer = format!("Bearer {KEY}");
    let denied = client.request("POST", deployment, &[("Authorization", &bearer)], &body);
    let (status, code, message) = azure_error(&denied);
    assert_eq!((status, code.as_str()), (401, "401"));
    assert!(message.starts_with("Access denied due to invalid subscription key"));
    let wrong = client.request("POST", deployment, &[("api-key", "sk-wrong")], &body);
    assert_eq!(azure_error(&wrong).0, 401);

    // Unknown deployment; missing and unknown api-version; OpenAI's own paths.
    let unknown = client.request("POST", "/openai/deployments/text-embedding-3-large/embeddings?api-version=2024-10-21", &key, &body);
    let (status, code, message) = azure_error(&unknown);
    assert_eq!((status, code.as_str()), (404, "DeploymentNotFound"));
    assert!(message.starts_with("The API deployment for this resource does not exist."));
    let v1_unknown =
        client.request("POST", "/openai/v1/embeddings", &key, &json!({"model": "text-embedding-3-large", "input": "x"}).to_string());
    assert_eq!(azure_error(&v1_unknown).1, "DeploymentNotFound");
    let no_version = client.request("POST", "/openai/deployments/emb-large/embeddings", &key, &body);
    assert_eq!(azure_error(&no_version), (404, "404".to_string(), "Resource not found".to_string()));
    let bad_version = client.request("POST", "/openai/deployments/emb-large/embeddings?api-version=latest", &key, &body);
    assert_eq!(azure_error(&bad_version), (400, "BadRequest".to_string(), "API version not supported".to_string()));
    let openai_path = client.request("POST", "/v1/embeddings", &key, &with_model);
    assert_eq!(azure_error(&openai_path), (404, "404".to_string(), "Resource not found".to_string()));

    // The log records whether the key was accepted, the deployment, the api-version and which
    // key headers came.
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    let facts: Vec<Value> = log.as_array().unwrap().iter().map(|e| json!([e["status"], e["model"], e["authorized"], e["azure"]])).collect();
    assert_eq!(
        facts,
        vec![
            json!([200, "text-embedding-3-large", true, {"deployment": "emb-large", "apiVersion": "2024-10-21", "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([200, "text-embedding-3-large", true, {"deployment": "emb-large", "apiVersion": "2024-10-21", "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([200, "text-embedding-3-small", true, {"deployment": "emb-small", "apiVersion": null, "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([200, "text-embedding-3-small", true, {"deployment": "emb-small", "apiVersion": "v1", "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([401, null, false, {"deployment": null, "apiVersion": "2024-10-21", "apiKeyHeader": false, "authorizationHeader": true}]),
            json!([401, null, false, {"deployment": null, "apiVersion": "2024-10-21", "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([404, null, true, {"deployment": "text-embedding-3-large", "apiVersion": "2024-10-21", "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([404, "text-embedding-3-large", true, {"deployment": "text-embedding-3-large", "apiVersion": null, "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([404, null, true, {"deployment": null, "apiVersion": null, "apiKeyHeader": true, "authorizationHeader": false}]),
            json!([400, null, true, {"deployment": null, "apiVersion": "latest", "apiKeyHeader": true, "authorizationHeader": false}]),
        ]
    );
}

#[test]
fn azure_paths_are_unknown_to_an_openai_server() {
    let addr = start_with_key();
    let mut client = Client::connect(addr);
    let reply = client.request("POST", "/openai/deployments/emb-large/embeddings?api-version=2024-10-21", &[("api-key", KEY)], "{}");
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
}

fn start_rate_limited(rpm: u64, tpm: u64) -> SocketAddr {
    start(Config {
        rate_limits: crate::ratelimit::RateLimitConfig { enabled: true, rpm: Some(rpm), tpm: Some(tpm), models: Default::default() },
        ..Config::default()
    })
}

fn embed_as(client: &mut Client, key: &str, body: &Value) -> Reply {
    client.request("POST", "/v1/embeddings", &[("Authorization", &format!("Bearer {key}"))], &body.to_string())
}

fn header_u64(reply: &Reply, name: &str) -> u64 {
    reply.header(name).unwrap_or_else(|| panic!("no {name}")).parse().unwrap()
}

#[test]
fn rate_limit_mode_refuses_past_the_requests_per_minute() {
    let addr = start_rate_limited(2, 1_000_000);
    let mut client = Client::connect(addr);
    let key = "sk-rate-limited-key-0001";
    let body = small(json!(["one two", "three"]));
    let first = embed_as(&mut client, key, &body);
    assert_eq!(first.status, 200);
    let tokens = first.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(header_u64(&first, "x-ratelimit-limit-requests"), 2);
    assert_eq!(header_u64(&first, "x-ratelimit-limit-tokens"), 1_000_000);
    assert_eq!(header_u64(&first, "x-ratelimit-remaining-requests"), 1);
    assert_eq!(header_u64(&first, "x-ratelimit-remaining-tokens"), 1_000_000 - tokens);
    // 2 RPM: a request comes back in 30 s.
    assert_eq!(first.header("x-ratelimit-reset-requests"), Some("30s"));
    let second = embed_as(&mut client, key, &body);
    assert_eq!(second.status, 200);
    assert_eq!(header_u64(&second, "x-ratelimit-remaining-requests"), 0);

    let third = embed_as(&mut client, key, &body);
    assert_eq!(third.status, 429);
    let error = third.json()["error"].clone();
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["type"], "requests");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for text-embedding-3-small in organization org-local-provider \
             on requests per min (RPM): Limit 2, Used 2, Requested 1. Please try again in 2"
        ),
        "{message}"
    );
    assert_eq!(header_u64(&third, "x-ratelimit-remaining-requests"), 0);
    // The first request's slot comes back 30 s after it: a little less than 30 s from now.
    assert_eq!(third.header("retry-after"), Some("30"));
    let retry_ms = header_u64(&third, "retry-after-ms");
    assert!((25_000..=30_000).contains(&retry_ms), "{retry_ms}");
    assert!(third.header("x-ratelimit-reset-tokens").is_some());

    // Another key has buckets of its own.
    assert_eq!(embed_as(&mut client, "sk-other-key-000000002", &body).status, 200);

    let log = admin(addr, "GET", "/_admin/requests", "").json();
    let statuses: Vec<_> = log.as_array().unwrap().iter().map(|e| e["status"].clone()).collect();
    assert_eq!(statuses, [json!(200), json!(200), json!(429), json!(200)]);
    assert_eq!(log[2]["fault"], "rateLimit: requests");
    assert_eq!(log[2]["key"], "sk-*****************0001");
    assert_eq!(log[2]["tokens"], tokens);
    assert_eq!(log[1]["rateLimit"]["remainingRequests"], 0);
    assert_eq!(log[1]["rateLimit"]["limitRequests"], 2);
    assert_eq!(log[3]["rateLimit"]["remainingRequests"], 1);
}

#[test]
fn rate_limits_change_at_run_time() {
    let addr = start_rate_limited(100, 1_000_000);
    let mut client = Client::connect(addr);
    let config = admin(addr, "GET", "/_admin/ratelimit", "").json();
    assert_eq!(config, json!({"enabled": true, "rpm": 100, "tpm": 1_000_000, "models": {}}));
    // 60 tokens per minute for the small model: a token a second.
    let set = admin(addr, "POST", "/_admin/ratelimit", r#"{"models":{"text-embedding-3-small":{"tpm":60}}}"#);
    assert_eq!(set.status, 200);
    let long = "word ".repeat(70).trim_end().to_string();
    let too_large = embed_as(&mut client, "k", &small(json!(long)));
    assert_eq!(too_large.status, 429);
    let message = too_large.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with("Request too large for text-embedding-3-small") && message.contains("Limit 60, Requested 70."),
        "{message}"
    );
    assert_eq!(too_large.header("retry-after"), None);

    let forty = "word ".repeat(40).trim_end().to_string();
    let ok = embed_as(&mut client, "k", &small(json!(forty)));
    assert_eq!(ok.status, 200);
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-tokens"), 60);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-tokens"), 20);
    // 40 tokens used at a token a second: full again in 40 s.
    let reset = ok.header("x-ratelimit-reset-tokens").unwrap();
    assert!(reset.starts_with("39.9") || reset == "40s", "{reset}");
    // The default limits apply to the other model (the defaults of the mode, 10,000 RPM).
    let large = embed_as(&mut client, "k", &json!({"model": "text-embedding-3-large", "input": "x"}));
    assert_eq!(header_u64(&large, "x-ratelimit-limit-requests"), 10_000);

    let refused = embed_as(&mut client, "k", &small(json!(forty)));
    assert_eq!(refused.status, 429);
    let error = refused.json()["error"].clone();
    assert_eq!(error["type"], "tokens");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("on tokens per min (TPM): Limit 60, Used 40, Requested 40. Please try again in 19.9"));
    assert_eq!(refused.header("retry-after"), Some("20"));

    let bad = admin(addr, "POST", "/_admin/ratelimit", r#"{"rpm":0}"#);
    assert_eq!(bad.status, 400);
    // DELETE goes back to the command line's limits, with full buckets.
    let restored = admin(addr, "DELETE", "/_admin/ratelimit", "").json();
    assert_eq!(restored["rpm"], 100);
    assert_eq!(embed_as(&mut client, "k", &small(json!(forty))).status, 200);
    // Off: the fixed headers of a server without the mode.
    admin(addr, "POST", "/_admin/ratelimit", r#"{"enabled":false,"rpm":1}"#);
    for _ in 0..3 {
        let reply = embed_as(&mut client, "k", &small(json!("x")));
        assert_eq!(reply.status, 200);
        assert_eq!(header_u64(&reply, "x-ratelimit-limit-requests"), 10_000);
        assert_eq!(reply.header("x-ratelimit-reset-requests"), Some("6ms"));
    }
}

#[test]
fn latency_grows_with_the_inputs() {
    let addr = start(Config { latency_per_input: Duration::from_millis(15), ..Config::default() });
    admin(addr, "POST", "/_admin/faults", r#"{"latencyPerInputMs": 5}"#);
    let mut client = Client::connect(addr);
    let one = embed_as(&mut client, "k", &small(json!(["a"])));
    let ten = embed_as(&mut client, "k", &small(json!(vec!["a"; 10])));
    assert_eq!((one.status, ten.status), (200, 200));
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    let took = |entry: &Value| entry["endedMs"].as_u64().unwrap() - entry["startedMs"].as_u64().unwrap();
    assert!(took(&log[0]) >= 20, "{log}");
    assert!(took(&log[1]) >= 200, "{log}");
    assert!(header_u64(&ten, "openai-processing-ms") >= 200);
}

/// Latency waits do not hold up other connections: N requests in flight at once, each waiting
/// 300 ms, all overlap in time.
#[test]
fn concurrent_requests_wait_in_parallel() {
    const N: usize = 16;
    let addr = start(Config { latency: Duration::from_millis(300), ..Config::default() });
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..N)
        .map(|i| {
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                embed_as(&mut client, "k", &small(json!(format!("input {i}")))).status
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), 200);
    }
    let elapsed = started.elapsed();
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    let entries = log.as_array().unwrap();
    assert_eq!(entries.len(), N);
    let latest_start = entries.iter().map(|e| e["startedMs"].as_u64().unwrap()).max().unwrap();
    let earliest_end = entries.iter().map(|e| e["endedMs"].as_u64().unwrap()).min().unwrap();
    assert!(latest_start < earliest_end, "every request started before any ended: {log}");
    // Served one after another they would take N * 300 ms.
    assert!(elapsed * 2 < Duration::from_millis(300) * N as u32, "{N} requests of 300 ms took {elapsed:?}");
}

#[test]
fn malformed_request_heads_get_400_and_close() {
    let addr = start(Config::default());
    for raw in ["GET /\r\n\r\n", "GET / HTTP/1.1\r\nNoColon\r\n\r\n"] {
        let mut client = Client::connect(addr);
        client.send_raw(raw.as_bytes());
        let mut text = String::new();
        let _ = client.reader.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 400 "), "{raw:?}: {text:?}");
    }
    // The server still serves.
    assert_eq!(admin(addr, "GET", "/health", "").status, 200);
}

#[test]
fn drop_closes_the_connection_without_an_answer() {
    let addr = start(Config::default());
    admin(addr, "POST", "/_admin/faults", r#"{"latencyMs": 50, "rules":[{"body":"drop","times":1}]}"#);
    let mut client = Client::connect(addr);
    let body = small(json!("dropped")).to_string();
    client.send_raw(
        format!("POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
    );
    let mut rest = Vec::new();
    let read = client.reader.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no answer expected, got {:?}", String::from_utf8_lossy(&rest));
    // EOF or a reset: either way, nothing came.
    drop(read);
    let log = admin(addr, "GET", "/_admin/requests", "").json();
    assert_eq!(log[0]["fault"], "rules[0]: body drop");
    assert_eq!(log[0]["status"], 0);
    assert!(log[0]["endedMs"].as_u64().unwrap() >= log[0]["startedMs"].as_u64().unwrap() + 50);
    // The rule fired once: a new connection is answered.
    let mut again = Client::connect(addr);
    assert_eq!(embed_as(&mut again, "k", &small(json!("dropped"))).status, 200);
}
