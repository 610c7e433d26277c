//! The Batch API over real TCP: each test starts its own server and talks HTTP/1.1 to it
//! (one connection per request, read to its end; file content comes chunked).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{send, Reply};
use crate::server::{Config, Server};
use crate::vectors;

const KEY: &str = "sk-batch-key-0123456789";
const SMALL: &str = "text-embedding-3-small";

fn start() -> SocketAddr {
    Server::bind(&Config { api_key: Some(KEY.to_string()), ..Config::default() }).unwrap().spawn().unwrap()
}

fn auth() -> (&'static str, String) {
    ("Authorization", format!("Bearer {KEY}"))
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, &[auth()], b"")
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, &[auth(), ("Content-Type", "application/json".into())], body.to_string().as_bytes())
}

fn admin(addr: SocketAddr, method: &str, path: &str, body: &Value) -> Reply {
    let reply = send(addr, method, path, &[], body.to_string().as_bytes());
    assert_eq!(reply.status, 200, "{method} {path}: {}", String::from_utf8_lossy(&reply.body));
    reply
}

/// A multipart/form-data upload of `content` with `purpose`.
fn upload(addr: SocketAddr, purpose: &str, content: &str) -> Reply {
    let boundary = "----embsyncBoundary7MA4YWxkTrZu0gW";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    send(addr, "POST", "/v1/files", &[auth(), ("Content-Type", format!("multipart/form-data; boundary={boundary}"))], body.as_bytes())
}

fn line(id: &str, body: Value) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/embeddings", "body": body}).to_string() + "\n"
}

/// Uploads `lines` and creates a batch of them; returns the batch object.
fn create_batch(addr: SocketAddr, lines: &str) -> Value {
    let file = upload(addr, "batch", lines);
    assert_eq!(file.status, 200, "{}", String::from_utf8_lossy(&file.body));
    let created = post_json(
        addr,
        "/v1/batches",
        &json!({"input_file_id": file.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": {"run": "r1"}}),
    );
    assert_eq!(created.status, 200, "{}", String::from_utf8_lossy(&created.body));
    created.json()
}

/// Polls the batch until its status is `status` (at most 10 s).
fn wait_for(addr: SocketAddr, id: &str, status: &str) -> Value {
    for _ in 0..200 {
        let batch = get(addr, &format!("/v1/batches/{id}")).json();
        if batch["status"] == status {
            return batch;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("batch {id} never became {status}");
}

fn content(addr: SocketAddr, file_id: &Value) -> Reply {
    let reply = get(addr, &format!("/v1/files/{}/content", file_id.as_str().unwrap()));
    assert_eq!(reply.status, 200);
    reply
}

#[test]
fn files_upload_retrieve_stream_and_delete() {
    let addr = start();
    let lines = line("a", json!({"model": SMALL, "input": "x"})) + &line("b", json!({"model": SMALL, "input": ["y", "z"]}));
    let file = upload(addr, "batch", &lines);
    assert_eq!(file.status, 200);
    let object = file.json();
    let id = object["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file-"), "{id}");
    assert_eq!(object["object"], "file");
    assert_eq!(object["purpose"], "batch");
    assert_eq!(object["filename"], "requests.jsonl");
    assert_eq!(object["bytes"], lines.len());
    assert_eq!(get(addr, &format!("/v1/files/{id}")).json(), object);

    let downloaded = content(addr, &object["id"]);
    assert_eq!(downloaded.header("transfer-encoding"), Some("chunked"), "content is streamed");
    assert_eq!(downloaded.body, lines.as_bytes());

    let deleted = send(addr, "DELETE", &format!("/v1/files/{id}"), &[auth()], b"");
    assert_eq!(deleted.json(), json!({"id": id, "object": "file", "deleted": true}));
    let gone = get(addr, &format!("/v1/files/{id}"));
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["message"], format!("No such File object: {id}"));
    assert_eq!(gone.json()["error"]["type"], "invalid_request_error");
}

#[test]
fn uploads_and_batches_are_refused_like_openai() {
    let addr = start();
    let good = line("a", json!({"model": SMALL, "input": "x"}));
    let refused = |reply: Reply, status: u16, param: Value, says: &str| {
        assert_eq!(reply.status, status, "{}", String::from_utf8_lossy(&reply.body));
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], param);
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    };
    refused(upload(addr, "fine-tune", &good), 400, json!("purpose"), "'fine-tune'");
    refused(upload(addr, "batch", "{\"custom_id\": 1}\n"), 400, json!("file"), "line 1: 'custom_id'");
    let two_models = good.clone() + &line("b", json!({"model": "text-embedding-3-large", "input": "y"}));
    refused(upload(addr, "batch", &two_models), 400, json!("file"), "one model only");
    let no_key = send(addr, "POST", "/v1/files", &[], b"");
    assert_eq!((no_key.status, no_key.json()["error"]["code"].clone()), (401, json!("invalid_api_key")));
    refused(send(addr, "POST", "/v1/files", &[auth()], b"purpose=batch"), 400, Value::Null, "multipart/form-data");

    let file = upload(addr, "batch", &good).json();
    let create = |body: Value| post_json(addr, "/v1/batches", &body);
    let id = file["id"].clone();
    refused(
        create(json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
        400,
        json!("endpoint"),
        "",
    );
    refused(
        create(json!({"input_file_id": id, "endpoint": "/v1/embeddings", "completion_window": "1h"})),
        400,
        json!("completion_window"),
        "",
    );
    refused(create(json!({"endpoint": "/v1/embeddings", "completion_window": "24h"})), 400, json!("input_file_id"), "Missing");
    refused(
        create(json!({"input_file_id": "file-nope", "endpoint": "/v1/embeddings", "completion_window": "24h"})),
        404,
        json!("input_file_id"),
        "file-nope",
    );
    refused(get(addr, "/v1/batches/batch_nope"), 404, Value::Null, "batch_nope");
    let wrong = send(addr, "DELETE", "/v1/batches", &[auth()], b"");
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("GET, POST")));
}

#[test]
fn a_completed_batch_gives_the_embeddings_endpoints_vectors() {
    let addr = start();
    let lines = line("run1-0", json!({"model": SMALL, "input": ["alpha", "beta"], "dimensions": 8}))
        + &line("run1-1", json!({"model": SMALL, "input": "gamma", "encoding_format": "base64"}))
        + &line("run1-2", json!({"model": SMALL, "input": ["delta"], "dimensions": 4, "encoding_format": "base64"}));
    let created = create_batch(addr, &lines);
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("batch_"), "{id}");
    assert_eq!(created["status"], "validating");
    assert_eq!(created["endpoint"], "/v1/embeddings");
    assert_eq!(created["completion_window"], "24h");
    assert_eq!(created["metadata"], json!({"run": "r1"}));
    assert_eq!(created["expires_at"].as_u64().unwrap() - created["created_at"].as_u64().unwrap(), 86_400);

    let batch = wait_for(addr, id, "completed");
    assert_eq!(batch["request_counts"], json!({"total": 3, "completed": 3, "failed": 0}));
    assert_eq!(batch["error_file_id"], Value::Null, "no errors, no error file");
    for field in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(batch[field].is_u64(), "{field}: {batch}");
    }
    for field in ["failed_at", "expired_at", "cancelling_at", "cancelled_at"] {
        assert_eq!(batch[field], Value::Null, "{field}");
    }

    let output_id = &batch["output_file_id"];
    let file = get(addr, &format!("/v1/files/{}", output_id.as_str().unwrap())).json();
    assert_eq!(file["purpose"], "batch_output");
    let output = content(addr, output_id);
    assert_eq!(file["bytes"], output.body.len(), "the file object's size is the content's");
    let out = output.lines();
    assert_eq!(out.len(), 3);
    let decode = |embedding: &Value| match embedding {
        Value::String(text) => vectors::decode_base64(text).unwrap(),
        Value::Array(items) => items.iter().map(|v| v.as_f64().unwrap() as f32).collect(),
        other => panic!("{other}"),
    };
    let expected = [("run1-0", vec![("alpha", 8), ("beta", 8)]), ("run1-1", vec![("gamma", 1536)]), ("run1-2", vec![("delta", 4)])];
    for (line, (custom_id, inputs)) in out.iter().zip(expected) {
        assert_eq!(line["custom_id"], custom_id);
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(line["error"], Value::Null);
        let response = &line["response"];
        assert_eq!(response["status_code"], 200);
        assert!(response["request_id"].as_str().unwrap().starts_with("req_"));
        let body = &response["body"];
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], SMALL);
        assert_eq!(body["data"].as_array().unwrap().len(), inputs.len());
        for (item, (input, dims)) in body["data"].as_array().unwrap().iter().zip(inputs) {
            assert_eq!(decode(&item["embedding"]), vectors::embedding(SMALL, input, dims), "{custom_id} {input}");
        }
    }
    // The base64 line came as base64, the others as floats.
    assert!(out[1]["response"]["body"]["data"][0]["embedding"].is_string());
    assert!(out[0]["response"]["body"]["data"][0]["embedding"].is_array());
    // Read twice, the same bytes.
    assert_eq!(content(addr, output_id).body, output.body);
    let listed = admin(addr, "GET", "/_admin/batches", &Value::Null).json();
    assert_eq!(listed[0]["model"], SMALL);
    assert_eq!(listed[0]["inputs"], 4);
    let inputs = admin(addr, "GET", &format!("/_admin/batches/{id}/inputs"), &Value::Null).json();
    assert_eq!(inputs, json!(["alpha", "beta", "gamma", "delta"]));
}

#[test]
fn partial_failure_sends_lines_to_the_error_file() {
    let addr = start();
    admin(addr, "POST", "/_admin/batch", &json!({"failEvery": 3, "failInputContains": "poison"}));
    let mut lines = String::new();
    for n in 0..6 {
        let input = if n == 1 { "a poison value".to_string() } else { format!("value {n}") };
        lines += &line(&format!("c{n}"), json!({"model": SMALL, "input": [input], "dimensions": 2}));
    }
    // A line the embeddings endpoint would refuse (an empty input) fails alone, too.
    lines += &line("c6", json!({"model": SMALL, "input": [""]}));
    let created = create_batch(addr, &lines);
    let batch = wait_for(addr, created["id"].as_str().unwrap(), "completed");
    assert_eq!(batch["request_counts"], json!({"total": 7, "completed": 3, "failed": 4}));
    let out = content(addr, &batch["output_file_id"]).lines();
    let ok: Vec<&str> = out.iter().map(|line| line["custom_id"].as_str().unwrap()).collect();
    assert_eq!(ok, ["c0", "c3", "c4"]);
    let errors = content(addr, &batch["error_file_id"]).lines();
    let failed: Vec<(&str, u64, Value)> = errors
        .iter()
        .map(|line| {
            assert_eq!(line["error"], Value::Null);
            let response = &line["response"];
            (line["custom_id"].as_str().unwrap(), response["status_code"].as_u64().unwrap(), response["body"]["error"]["param"].clone())
        })
        .collect();
    assert_eq!(failed, [("c1", 400, json!("input")), ("c2", 500, Value::Null), ("c5", 500, Value::Null), ("c6", 400, json!("input"))]);
    assert_eq!(errors[1]["response"]["body"]["error"]["type"], "server_error");

    // The switches apply to batches created after them; DELETE restores the defaults.
    admin(addr, "DELETE", "/_admin/batch", &Value::Null);
    let clean = create_batch(addr, &lines);
    let clean = wait_for(addr, clean["id"].as_str().unwrap(), "completed");
    assert_eq!(clean["request_counts"], json!({"total": 7, "completed": 6, "failed": 1}));
}

#[test]
fn expiry_keeps_what_finished() {
    let addr = start();
    admin(addr, "POST", "/_admin/batch", &json!({"completionMs": 300, "expireAfterLines": 2}));
    let lines: String =
        (0..5).map(|n| line(&format!("e{n}"), json!({"model": SMALL, "input": format!("v{n}"), "dimensions": 2}))).collect();
    let created = create_batch(addr, &lines);
    let id = created["id"].as_str().unwrap();
    let running = get(addr, &format!("/v1/batches/{id}")).json();
    assert_eq!(running["status"], "in_progress", "{running}");
    assert_eq!(running["output_file_id"], Value::Null, "no output before the end");
    let batch = wait_for(addr, id, "expired");
    assert!(batch["expired_at"].is_u64());
    assert_eq!(batch["completed_at"], Value::Null);
    assert_eq!(batch["request_counts"], json!({"total": 5, "completed": 2, "failed": 3}));
    let out = content(addr, &batch["output_file_id"]).lines();
    assert_eq!(out.iter().map(|l| l["custom_id"].clone()).collect::<Vec<_>>(), [json!("e0"), json!("e1")]);
    let errors = content(addr, &batch["error_file_id"]).lines();
    assert_eq!(errors.len(), 3);
    for line in &errors {
        assert_eq!(line["response"], Value::Null);
        assert_eq!(line["error"]["code"], "batch_expired");
    }
}

#[test]
fn validation_failure_cancel_and_forgetting() {
    let addr = start();
    let lines = line("f0", json!({"model": SMALL, "input": "x"}));

    admin(addr, "POST", "/_admin/batch", &json!({"failValidation": true, "validatingMs": 100}));
    let failing = create_batch(addr, &lines);
    assert_eq!(failing["status"], "validating");
    let failed = wait_for(addr, failing["id"].as_str().unwrap(), "failed");
    assert!(failed["failed_at"].is_u64());
    assert_eq!(failed["in_progress_at"], Value::Null);
    assert_eq!(failed["errors"]["object"], "list");
    assert_eq!(failed["errors"]["data"][0]["code"], "failed_validation");
    assert_eq!((failed["output_file_id"].clone(), failed["error_file_id"].clone()), (Value::Null, Value::Null));

    admin(addr, "POST", "/_admin/batch", &json!({"completionMs": 60000, "cancellingMs": 200}));
    let lines: String = (0..4).map(|n| line(&format!("k{n}"), json!({"model": SMALL, "input": format!("v{n}")}))).collect();
    let running = create_batch(addr, &lines);
    let id = running["id"].as_str().unwrap();
    let cancelling = post_json(addr, &format!("/v1/batches/{id}/cancel"), &Value::Null).json();
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].is_u64());
    let cancelled = wait_for(addr, id, "cancelled");
    assert!(cancelled["cancelled_at"].is_u64());
    // Nothing had finished: every line is in the error file as cancelled.
    assert_eq!(cancelled["output_file_id"], Value::Null);
    let errors = content(addr, &cancelled["error_file_id"]).lines();
    assert_eq!(errors.len(), 4);
    assert!(errors.iter().all(|line| line["error"]["code"] == "batch_cancelled"));
    let again = post_json(addr, &format!("/v1/batches/{id}/cancel"), &Value::Null);
    assert_eq!(again.status, 409, "{}", again.json());

    // A batch the provider forgets answers 404, and so do its files.
    admin(addr, "DELETE", &format!("/_admin/batches/{id}"), &Value::Null);
    assert_eq!(get(addr, &format!("/v1/batches/{id}")).status, 404);
    assert_eq!(get(addr, &format!("/v1/files/{}", cancelled["error_file_id"].as_str().unwrap())).status, 404);
}

#[test]
fn batches_are_listed_newest_first_in_pages() {
    let addr = start();
    let empty = get(addr, "/v1/batches").json();
    assert_eq!(empty, json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}));
    let request = |input: &str| line("r-1", json!({"model": SMALL, "input": [input]}));
    let ids: Vec<String> =
        ["a", "b", "c"].iter().map(|input| create_batch(addr, &request(input))["id"].as_str().unwrap().to_string()).collect();
    let first = get(addr, "/v1/batches?limit=2").json();
    let page: Vec<&str> = first["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(page, [ids[2].as_str(), ids[1].as_str()], "newest first");
    assert_eq!(
        (first["first_id"].as_str(), first["last_id"].as_str(), first["has_more"].as_bool()),
        (Some(ids[2].as_str()), Some(ids[1].as_str()), Some(true))
    );
    assert_eq!(first["data"][0]["object"], "batch");
    assert!(first["data"][0]["input_file_id"].as_str().unwrap().starts_with("file-"));
    let second = get(addr, &format!("/v1/batches?limit=2&after={}", ids[1])).json();
    let page: Vec<&str> = second["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!((page, second["has_more"].as_bool()), (vec![ids[0].as_str()], Some(false)));
    assert_eq!(get(addr, "/v1/batches?limit=0").status, 400);
    assert_eq!(get(addr, "/v1/batches?after=batch_nope").status, 404);
    assert_eq!(send(addr, "GET", "/v1/batches", &[], b"").status, 401, "the key is checked");
}

#[test]
fn a_slow_download_sends_a_line_at_a_time() {
    let addr = start();
    admin(addr, "POST", "/_admin/batch", &json!({"lineDelayMs": 150}));
    let lines: String =
        (0..4).map(|n| line(&format!("s{n}"), json!({"model": SMALL, "input": format!("v{n}"), "dimensions": 2}))).collect();
    let created = create_batch(addr, &lines);
    let batch = wait_for(addr, created["id"].as_str().unwrap(), "completed");
    let started = std::time::Instant::now();
    let out = content(addr, &batch["output_file_id"]).lines();
    assert!(started.elapsed() >= Duration::from_millis(600), "4 lines at 150 ms each came in {:?}", started.elapsed());
    assert_eq!(out.iter().map(|l| l["custom_id"].clone()).collect::<Vec<_>>(), [json!("s0"), json!("s1"), json!("s2"), json!("s3")]);
    // Without the switch the same file comes at once.
    admin(addr, "DELETE", "/_admin/batch", &Value::Null);
    let fast = wait_for(addr, create_batch(addr, &lines)["id"].as_str().unwrap(), "completed");
    let started = std::time::Instant::now();
    assert_eq!(content(addr, &fast["output_file_id"]).lines().len(), 4);
    assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
}
