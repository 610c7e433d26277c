//! The worker's own code as WebAssembly (wasm-bindgen-test, run under Node by
//! `scripts/test.sh`): settings and secrets read from a real `Env` object, `handle` (routing,
//! methods, query, authentication, request bodies) on real `Request`s, the KV cursor over a KV
//! binding kept in a JS object, the provider request `OpenAi` builds and sends through the
//! global `fetch` (replaced by a recorder), and the fan-out's `POST /enqueue` and queue handler
//! over a queue binding and message batches kept in JS objects. What needs Postgres or workerd
//! is left to the end-to-end tests.

use crate::openai::OpenAi;
use crate::settings::{self, Database, SettingsError};
use crate::{handle, read_cursor, WorkerRuntime, CURSOR_KEY};
use embsync_core::config::Config;
use embsync_core::sync::{Cursor, Embedder};
use embsync_core::vector::encode_base64_f32;
use wasm_bindgen_test::wasm_bindgen_test;
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::{js_sys, Env, Headers, Method, Request, RequestInit, Response};

/// An `Env` whose string bindings are `vars`.
fn env(vars: &[(&str, &str)]) -> Env {
    let object = js_sys::Object::new();
    for (k, v) in vars {
        js_sys::Reflect::set(&object, &(*k).into(), &(*v).into()).unwrap();
    }
    object.unchecked_into()
}

fn set(target: &JsValue, key: &str, value: &JsValue) {
    js_sys::Reflect::set(target, &key.into(), value).unwrap();
}

/// Runs JS `body` as a function of `args` and returns what it returns.
fn js(args: &str, body: &str, values: &[&JsValue]) -> JsValue {
    let f = js_sys::Function::new_with_args(args, body);
    let array = js_sys::Array::new();
    for v in values {
        array.push(v);
    }
    f.apply(&JsValue::NULL, &array).unwrap()
}

#[wasm_bindgen_test]
fn blank_settings_are_unset_and_secrets_never_show() {
    let env = env(&[("A", "x"), ("B", "  "), ("OPENAI_API_KEY", "sk-secret")]);
    assert_eq!(settings::string(&env, "A").as_deref(), Some("x"));
    assert_eq!(settings::string(&env, "B"), None);
    assert_eq!(settings::string(&env, "C"), None);
    let key = settings::api_key(&env).unwrap();
    assert_eq!(key.expose(), "sk-secret");
    assert_eq!(format!("{key:?}"), "Redacted(***)");
    let missing = settings::api_key(&self::env(&[])).unwrap_err().to_string();
    assert_eq!(missing, "OPENAI_API_KEY is not set: set it with `wrangler secret put OPENAI_API_KEY`");
}

#[wasm_bindgen_test]
fn the_config_comes_from_embedding_sources_or_the_built_in_file() {
    let built_in = settings::config(&env(&[])).unwrap();
    assert_eq!(built_in, Config::parse(settings::BUILT_IN_CONFIG).unwrap());
    let err = settings::config(&env(&[("EMBEDDING_SOURCES", r#"{"version": "1.0", "sources": 3}"#)])).unwrap_err();
    assert!(matches!(err, SettingsError::Config { origin: "EMBEDDING_SOURCES", .. }), "{err}");
    assert!(err.to_string().contains("sources"), "names the field: {err}");
}

#[wasm_bindgen_test]
fn the_database_is_database_url_unless_a_hyperdrive_binding_is_there() {
    let url = "postgres://u:pw@db.example:5432/app";
    match settings::database(&env(&[("DATABASE_URL", url)])).unwrap() {
        Database::Url(u) => assert_eq!(u.expose(), url),
        Database::Hyperdrive { .. } => panic!("no binding was given"),
    }
    let none = settings::database(&env(&[])).err().expect("neither is set").to_string();
    assert!(none.contains("DATABASE_URL"), "{none}");
    assert!(!none.contains("pw"));
    // A binding named by HYPERDRIVE_BINDING that is a plain string is not a Hyperdrive binding.
    let wrong = settings::database(&env(&[("HYPERDRIVE_BINDING", "DB"), ("DB", "x"), ("DATABASE_URL", url)])).err();
    assert!(wrong.is_some(), "a named binding that is not Hyperdrive is an error, not a fallback");
}

/// A request to `path` with `method`, and the headers given.
fn request(method: Method, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Request {
    let h = Headers::new();
    for (k, v) in headers {
        h.set(k, v).unwrap();
    }
    let mut init = RequestInit::new();
    init.with_method(method).with_headers(h);
    if let Some(body) = body {
        init.with_body(Some(JsValue::from_str(body)));
    }
    Request::new_with_init(&format!("https://embsync.example{path}"), &init).unwrap()
}

async fn answer(req: Request, env: Env) -> (u16, String, Response) {
    let mut response = handle(req, env).await.unwrap();
    let body = response.text().await.unwrap();
    (response.status_code(), body, response)
}

#[wasm_bindgen_test]
async fn routing_methods_and_query_are_checked_before_anything_else() {
    let (status, body, _) = answer(request(Method::Get, "/nope", &[], None), env(&[])).await;
    assert_eq!(status, 404);
    assert!(body.contains("GET /health"), "{body}");
    let (status, body, _) = answer(request(Method::Get, "/sync", &[], None), env(&[])).await;
    assert_eq!((status, body.as_str()), (405, r#"{"error":"method not allowed: use POST /sync"}"#));
    let (status, body, _) = answer(request(Method::Get, "/status?x=1", &[], None), env(&[])).await;
    assert_eq!((status, body.as_str()), (400, r#"{"error":"/status takes no query parameters"}"#));
    let (status, body, _) = answer(request(Method::Get, "/health", &[], None), env(&[])).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""status":"ok""#), "{body}");
}

#[wasm_bindgen_test]
async fn endpoints_need_the_token() {
    // No token configured: closed, and says how to open them.
    let (status, body, _) = answer(request(Method::Get, "/dry-run", &[], None), env(&[])).await;
    assert_eq!(status, 503);
    assert!(body.contains("wrangler secret put SYNC_API_TOKEN"), "{body}");
    let token = [("SYNC_API_TOKEN", "t0ken")];
    let (status, body, r) = answer(request(Method::Get, "/dry-run", &[], None), env(&token)).await;
    assert_eq!(status, 401);
    assert!(body.contains("missing bearer token"), "{body}");
    assert_eq!(r.headers().get("www-authenticate").unwrap(), None, "JSON endpoints do not ask a browser");
    let (status, body, _) = answer(request(Method::Get, "/dry-run", &[("authorization", "Bearer wrong")], None), env(&token)).await;
    assert_eq!((status, body.as_str()), (401, r#"{"error":"invalid token"}"#));
    // The HTML page asks for Basic credentials.
    let (status, _, r) = answer(request(Method::Get, "/status.html", &[], None), env(&token)).await;
    assert_eq!(status, 401);
    assert!(r.headers().get("www-authenticate").unwrap().is_some_and(|v| v.starts_with("Basic")));
    // With the token, a body on /sync is refused, and /prune's body is parsed.
    let auth = [("authorization", "Bearer t0ken")];
    let (status, body, _) = answer(request(Method::Post, "/sync", &auth, Some("run please")), env(&token)).await;
    assert_eq!((status, body.as_str()), (400, r#"{"error":"/sync takes no request body (or an empty JSON object)"}"#));
    let (status, _, _) = answer(request(Method::Post, "/prune", &auth, Some("not json")), env(&token)).await;
    assert_eq!(status, 400);
    // Authorized, the dry run reads its settings: no database is a 500 that says what to set.
    let (status, body, _) = answer(request(Method::Get, "/dry-run", &auth, None), env(&token)).await;
    assert_eq!(status, 500);
    assert!(body.contains("DATABASE_URL"), "{body}");
}

/// An `Env` with a KV binding `SYNC_STATE` over the JS object `store`.
fn env_with_kv(store: &js_sys::Object) -> Env {
    let kv = js(
        "store",
        "return {
            get: (k, o) => Promise.resolve(k in store ? store[k] : null),
            getWithMetadata: (k, o) => Promise.resolve({ value: k in store ? store[k] : null, metadata: null }),
            put: (k, v, o) => { store[k] = v; return Promise.resolve(); },
            list: () => Promise.resolve({ keys: [], list_complete: true }),
            delete: (k) => { delete store[k]; return Promise.resolve(); },
        };",
        &[store],
    );
    let env = env(&[]);
    set(&env, "SYNC_STATE", &kv);
    env
}

#[wasm_bindgen_test]
async fn the_kv_cursor_is_read_back_and_a_garbage_one_is_ignored() {
    let store = js_sys::Object::new();
    let env = env_with_kv(&store);
    let kv = env.kv("SYNC_STATE").unwrap();
    let rt = WorkerRuntime;
    assert_eq!(read_cursor(Some(&kv), &rt).await, None, "no cursor yet");
    let cursor =
        Cursor { run_id: "run-1".into(), source: 2, phase: "embed".into(), after: Some("ab".repeat(32)), totals: Default::default() };
    crate::kv_put(Some(&kv), CURSOR_KEY, serde_json::to_string(&cursor).unwrap(), &rt).await;
    let stored = js_sys::Reflect::get(&store, &CURSOR_KEY.into()).unwrap().as_string().unwrap();
    assert!(stored.contains(r#""runId":"run-1""#), "{stored}");
    assert_eq!(read_cursor(Some(&kv), &rt).await, Some(cursor));
    set(&store, CURSOR_KEY, &"{not a cursor".into());
    assert_eq!(read_cursor(Some(&kv), &rt).await, None, "garbage is no cursor");
    crate::clear_cursor(Some(&kv), &rt).await;
    assert!(!js_sys::Reflect::has(&store, &CURSOR_KEY.into()).unwrap(), "cleared");
    assert_eq!(read_cursor(None, &rt).await, None, "no KV binding, no cursor");
}

#[wasm_bindgen_test]
async fn the_provider_request_carries_the_key_model_and_inputs_and_its_answer_is_decoded() {
    let models = settings::config(&env(&[])).unwrap().models;
    let endpoint = settings::endpoint(&env(&[("OPENAI_BASE_URL", "https://provider.example/v1")]), &models).unwrap();
    let provider = OpenAi::new(endpoint, settings::api_key(&env(&[("OPENAI_API_KEY", "sk-test")])).unwrap());
    let model = &models.small;
    let dims = model.dimensions() as usize;
    let second: Vec<f32> = (0..dims).map(|i| -(i as f32) / 4096.0).collect();
    let vectors = [encode_base64_f32(&vec![0.5; dims]), encode_base64_f32(&second)];
    let body = format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":"{}"}},{{"object":"embedding","index":1,"embedding":"{}"}}],"model":"m","usage":{{"prompt_tokens":3,"total_tokens":3}}}}"#,
        vectors[0], vectors[1]
    );
    // The global fetch records what it is sent and answers `body`.
    let seen = js(
        "body",
        "const seen = [];
        globalThis.fetch = async (req) => {
            seen.push({ url: req.url, method: req.method, auth: req.headers.get('authorization'),
                        type: req.headers.get('content-type'), body: await req.text() });
            return new Response(body, { status: 200, headers: { 'content-type': 'application/json' } });
        };
        return seen;",
        &[&JsValue::from_str(&body)],
    );
    let embeddings = provider.embed(model, &["hello", "world"]).await.unwrap();
    let sent: js_sys::Array = seen.unchecked_into();
    assert_eq!(sent.length(), 1);
    let req = sent.get(0);
    let field = |k: &str| js_sys::Reflect::get(&req, &k.into()).unwrap().as_string();
    assert_eq!(field("url").as_deref(), Some("https://provider.example/v1/embeddings"));
    assert_eq!(field("method").as_deref(), Some("POST"));
    assert_eq!(field("auth").as_deref(), Some("Bearer sk-test"));
    assert_eq!(field("type").as_deref(), Some("application/json"));
    let sent_body: serde_json::Value = serde_json::from_str(&field("body").unwrap()).unwrap();
    assert_eq!(sent_body["input"], serde_json::json!(["hello", "world"]));
    assert_eq!(sent_body["model"], model.name());
    assert_eq!(sent_body["encoding_format"], "base64");
    assert_eq!(embeddings.vectors.len(), 2);
    assert_eq!(embeddings.vectors[1].to_f32(), second);
}

/// An `Env` with the token and a queue binding `SYNC_QUEUE` (a `WorkerQueue` whose `send` and
/// `sendBatch` record their messages in `sent`).
fn env_with_queue(sent: &js_sys::Array) -> Env {
    let queue = js(
        "sent",
        "class WorkerQueue { \
           async send(body, options) { sent.push(body); } \
           async sendBatch(messages, options) { for (const m of messages) sent.push(m.body); } \
         } \
         return new WorkerQueue();",
        &[sent],
    );
    let env = env(&[("SYNC_API_TOKEN", "t0ken")]);
    set(&env, "SYNC_QUEUE", &queue);
    env
}

#[wasm_bindgen_test]
async fn enqueue_sends_one_range_message_and_refuses_anything_else() {
    let auth = [("authorization", "Bearer t0ken")];
    let sent = js_sys::Array::new();
    let body = r#"{"run": "run-1", "range": 7}"#;
    let (status, answer_body, _) = answer(request(Method::Post, "/enqueue", &auth, Some(body)), env_with_queue(&sent)).await;
    assert_eq!((status, answer_body.as_str()), (200, r#"{"enqueued":{"range":7,"run":"run-1"}}"#));
    assert_eq!(sent.length(), 1);
    let message = js_sys::JSON::stringify(&sent.get(0)).unwrap().as_string().unwrap();
    assert_eq!(message, r#"{"run":"run-1","range":7}"#, "the body the queue carries is the range message as JSON");
    // Not a range message: 400, nothing sent.
    for bad in ["", "{}", r#"{"run": "run-1"}"#, r#"{"run": "run-1", "range": "7"}"#, "[1]"] {
        let (status, answer_body, _) = answer(request(Method::Post, "/enqueue", &auth, Some(bad)), env_with_queue(&sent)).await;
        assert_eq!(status, 400, "{bad:?}: {answer_body}");
        assert!(answer_body.contains("range message"), "{answer_body}");
    }
    assert_eq!(sent.length(), 1);
    // Without the binding there is no fan-out: 409, saying so. Without the token: 401.
    let (status, answer_body, _) = answer(request(Method::Post, "/enqueue", &auth, Some(body)), env(&[("SYNC_API_TOKEN", "t0ken")])).await;
    assert_eq!(status, 409);
    assert!(answer_body.contains("SYNC_QUEUE"), "{answer_body}");
    let (status, _, _) = answer(request(Method::Post, "/enqueue", &[], Some(body)), env_with_queue(&sent)).await;
    assert_eq!(status, 401);
    assert_eq!(sent.length(), 1);
}

/// A `MessageBatch` of `queue` with one message per body of `bodies` (JS values); each message
/// records `ack` or `retry` in `settled` as `[index, what]`.
fn batch(queue: &str, bodies: &js_sys::Array, settled: &js_sys::Array) -> worker::MessageBatch<serde_json::Value> {
    let sys = js(
        "queue, bodies, settled",
        "return { queue, messages: bodies.map((body, i) => ({ \
           id: 'm' + i, timestamp: new Date(0), body, attempts: 1, \
           ack() { settled.push([i, 'ack']); }, retry() { settled.push([i, 'retry']); } })), \
           ackAll() { settled.push(['all', 'ack']); }, retryAll() { settled.push(['all', 'retry']); } };",
        &[&queue.into(), bodies, settled],
    );
    worker::MessageBatch::from(sys.unchecked_into::<worker::worker_sys::MessageBatch>())
}

#[wasm_bindgen_test]
async fn the_queue_handler_acks_what_is_not_a_range_message_and_retries_what_fails() {
    let bodies = js_sys::Array::new();
    for body in [r#""not json""#, r#"{"range": 1}"#, "42", r#"{"run": "run-1", "range": 3}"#] {
        bodies.push(&js_sys::JSON::parse(body).unwrap());
    }
    // No database: every real message fails, and is retried; the others are acked, never retried.
    for queue in ["embsync-ranges", "embsync-ranges-dlq"] {
        let settled = js_sys::Array::new();
        crate::queues::handle(batch(queue, &bodies, &settled), &env(&[])).await;
        let got = js_sys::JSON::stringify(&settled).unwrap().as_string().unwrap();
        let mut got: Vec<(u32, String)> = serde_json::from_str(&got).unwrap();
        got.sort();
        let want = [(0, "ack"), (1, "ack"), (2, "ack"), (3, "retry")].map(|(i, w)| (i, w.to_string()));
        assert_eq!(got, want, "{queue}: each message settled once, on its own");
    }
}

/// `PgSocket` over a socket kept in a JS object: its readable side yields a chunk larger than the
/// reader's buffer, an empty one and a last one, then ends; its writable side records what is
/// written and whether it was closed.
#[wasm_bindgen_test]
async fn the_postgres_socket_reads_across_chunks_and_writes_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let written = js_sys::Array::new();
    let fixture = js(
        "written",
        "const chunks = [new Uint8Array([1, 2, 3, 4, 5]), new Uint8Array([]), new Uint8Array([6, 7])];
        return {
          readable: new ReadableStream({ pull(c) { const next = chunks.shift(); if (next) c.enqueue(next); else c.close(); } }),
          writable: new WritableStream({ write(chunk) { written.push(Array.from(chunk)); }, close() { written.push('closed'); } }),
        };",
        &[&written],
    );
    let mut socket = crate::socket::PgSocket::new(fixture.unchecked_into()).unwrap();
    let mut two = [0u8; 2];
    socket.read_exact(&mut two).await.unwrap();
    assert_eq!(two, [1, 2], "the start of a chunk larger than the buffer");
    let mut rest = Vec::new();
    socket.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, [3, 4, 5, 6, 7], "the rest of the first chunk, the empty one skipped, the last one, then the end");
    socket.write_all(b"ab").await.unwrap();
    socket.write_all(b"c").await.unwrap();
    socket.shutdown().await.unwrap();
    let seen: Vec<String> = written.iter().map(|v| String::from(js_sys::JSON::stringify(&v).unwrap())).collect();
    assert_eq!(seen, ["[97,98]", "[99]", "\"closed\""], "each write once, in order, then the close");
}

/// A client of `https://provider.example/v1` with key `sk-test`, whose global fetch records
/// each request (`url`, `method`, `auth`, `type`, `body` as text) in the array it returns and
/// answers with `respond(req)` (JS, returning a `Response`).
fn batch_client(respond: &str) -> (OpenAi, js_sys::Array) {
    let models = settings::config(&env(&[])).unwrap().models;
    let endpoint = settings::endpoint(&env(&[("OPENAI_BASE_URL", "https://provider.example/v1")]), &models).unwrap();
    let client = OpenAi::new(endpoint, settings::api_key(&env(&[("OPENAI_API_KEY", "sk-test")])).unwrap());
    let seen = js(
        "",
        &format!(
            "const seen = [];
            const respond = {respond};
            globalThis.fetch = async (req) => {{
                seen.push({{ url: req.url, method: req.method, auth: req.headers.get('authorization'),
                            type: req.headers.get('content-type'), body: await req.text() }});
                return respond(req);
            }};
            return seen;"
        ),
        &[],
    );
    (client, seen.unchecked_into())
}

fn field(req: &JsValue, k: &str) -> Option<String> {
    js_sys::Reflect::get(req, &k.into()).unwrap().as_string()
}

const BATCH_JSON: &str = r#"{"id":"batch_1","object":"batch","endpoint":"/v1/embeddings","input_file_id":"file-in","status":"in_progress","output_file_id":null,"error_file_id":null,"request_counts":{"total":3,"completed":1,"failed":0}}"#;

#[wasm_bindgen_test]
async fn the_batch_api_calls_go_to_the_base_url_with_the_key_and_read_their_answers() {
    use embsync_core::batch_api::{upload_body, BatchApi, BatchStatus};
    let (client, seen) = batch_client(&format!(
        r#"(req) => {{
            const u = new URL(req.url);
            const json = (body) => new Response(body, {{ status: 200, headers: {{ 'content-type': 'application/json' }} }});
            if (u.pathname === '/v1/files' ) return json('{{"id":"file-in","object":"file","purpose":"batch"}}');
            if (u.pathname === '/v1/batches' && req.method === 'GET')
                return json('{{"object":"list","data":[{BATCH_JSON}],"first_id":"batch_1","last_id":"batch_1","has_more":true}}');
            if (u.pathname.startsWith('/v1/files/')) return json('{{"id":"file-in","object":"file","deleted":true}}');
            return json('{BATCH_JSON}');
        }}"#
    ));
    assert!(client.has_batch_api());
    let upload = upload_body("embsync-run-1-large-0.jsonl", b"{\"custom_id\":\"a\"}\n");
    assert_eq!(client.upload(&upload).await.unwrap(), "file-in");
    let created = client.create(r#"{"input_file_id":"file-in"}"#).await.unwrap();
    assert_eq!((created.id.as_str(), created.input_file_id.as_str(), created.status), ("batch_1", "file-in", BatchStatus::InProgress));
    assert_eq!(created.request_counts.completed, 1);
    assert_eq!(client.retrieve("batch_1").await.unwrap().id, "batch_1");
    assert_eq!(client.cancel("batch_1").await.unwrap().id, "batch_1");
    let page = client.list(None, 20).await.unwrap();
    assert_eq!((page.data.len(), page.has_more, page.last_id.as_deref()), (1, true, Some("batch_1")));
    client.list(Some("batch_1"), 5).await.unwrap();
    client.delete_file("file/../x").await.unwrap();

    let sent: Vec<(String, String, String, String)> = (0..seen.length())
        .map(|i| {
            let r = seen.get(i);
            (
                field(&r, "method").unwrap(),
                field(&r, "url").unwrap(),
                field(&r, "auth").unwrap_or_default(),
                field(&r, "type").unwrap_or_default(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String, String)> = [
        ("POST", "https://provider.example/v1/files", upload.content_type.as_str()),
        ("POST", "https://provider.example/v1/batches", "application/json"),
        ("GET", "https://provider.example/v1/batches/batch_1", ""),
        ("POST", "https://provider.example/v1/batches/batch_1/cancel", ""),
        ("GET", "https://provider.example/v1/batches?limit=20", ""),
        ("GET", "https://provider.example/v1/batches?limit=5&after=batch_1", ""),
        // An id is one path segment, whatever it holds.
        ("DELETE", "https://provider.example/v1/files/file%2F..%2Fx", ""),
    ]
    .iter()
    .map(|(m, u, t)| (m.to_string(), u.to_string(), "Bearer sk-test".to_owned(), t.to_string()))
    .collect();
    assert_eq!(sent, expected);
    // The upload's body is the multipart body as it was built, byte for byte.
    assert_eq!(field(&seen.get(0), "body").unwrap().as_bytes(), upload.body.as_slice());
    assert_eq!(field(&seen.get(1), "body").as_deref(), Some(r#"{"input_file_id":"file-in"}"#));
}

#[wasm_bindgen_test]
async fn a_files_content_arrives_chunk_by_chunk_and_a_cut_one_is_an_error() {
    use embsync_core::batch_api::BatchApi;
    // Three chunks, as a server streams them; `cut` announces more bytes than it sends.
    let (client, seen) = batch_client(
        r#"(req) => {
            const parts = ['{"custom_id":"a"}\n{"cus', 'tom_id":"b"}\n', '{"custom_id":"c"}\n'];
            const stream = new ReadableStream({
                start(c) { for (const p of parts) c.enqueue(new TextEncoder().encode(p)); c.close(); }
            });
            const whole = parts.join('').length;
            const length = req.url.includes('cut') ? whole + 10 : whole;
            return new Response(stream, { status: 200, headers: { 'content-length': String(length) } });
        }"#,
    );
    let mut content = client.content("file-out").await.unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = content.next_chunk().await.unwrap() {
        chunks.push(String::from_utf8(chunk).unwrap());
    }
    assert_eq!(
        chunks,
        ["{\"custom_id\":\"a\"}\n{\"cus", "tom_id\":\"b\"}\n", "{\"custom_id\":\"c\"}\n"],
        "one chunk at a time, as they came"
    );
    assert_eq!(field(&seen.get(0), "url").as_deref(), Some("https://provider.example/v1/files/file-out/content"));
    assert_eq!(field(&seen.get(0), "method").as_deref(), Some("GET"));

    let mut cut = client.content("file-cut").await.unwrap();
    let mut result = Ok(Some(Vec::new()));
    for _ in 0..4 {
        result = cut.next_chunk().await;
        if !matches!(result, Ok(Some(_))) {
            break;
        }
    }
    let err = result.unwrap_err();
    assert!(err.is_retryable() && err.to_string().contains("ended after 54 of its 64 bytes"), "{err}");
}

#[wasm_bindgen_test]
async fn batch_api_errors_decode_like_the_embeddings_endpoints() {
    use embsync_core::batch_api::{is_not_found, BatchApi};
    use embsync_core::provider::ProviderError;
    let (client, _) = batch_client(
        r#"(req) => {
            const err = (status, message, headers) => new Response(
                JSON.stringify({ error: { message, type: 'invalid_request_error', param: null, code: null } }),
                { status, headers: Object.assign({ 'content-type': 'application/json' }, headers || {}) });
            if (req.url.endsWith('/gone')) return err(404, "No batch found with id 'gone'.");
            if (req.url.endsWith('/busy')) return err(429, 'Rate limit reached', { 'retry-after': '7' });
            if (req.url.endsWith('/down')) return err(503, 'overloaded');
            if (req.url.endsWith('/junk')) return new Response('{"nope":1}', { status: 200 });
            return err(401, 'Incorrect API key provided');
        }"#,
    );
    let gone = client.retrieve("gone").await.unwrap_err();
    assert!(is_not_found(&gone), "{gone:?}");
    let busy = client.retrieve("busy").await.unwrap_err();
    assert!(matches!(&busy, ProviderError::RateLimited { retry_after: Some(d), .. } if d.as_secs() == 7), "{busy:?}");
    assert!(client.retrieve("down").await.unwrap_err().is_retryable());
    assert!(matches!(client.retrieve("junk").await.unwrap_err(), ProviderError::Malformed(_)));
    assert!(matches!(client.content("key").await.err(), Some(ProviderError::Unauthorized { status: 401 })));

    // Azure OpenAI: no Batch API; nothing is sent.
    let models = settings::config(&env(&[])).unwrap().models;
    let azure = settings::endpoint(&env(&[("AZURE_OPENAI_ENDPOINT", "https://acme.openai.azure.com")]), &models).unwrap();
    let azure = OpenAi::new(azure, settings::api_key(&env(&[("OPENAI_API_KEY", "k")])).unwrap());
    assert!(!azure.has_batch_api());
    let refused = azure.retrieve("b").await.unwrap_err();
    assert!(refused.to_string().contains("OpenAI only"), "{refused}");
}
