//! The core's Batch API encoding and decoding (`embsync_core::batch_api`) against this server
//! over real HTTP: a request file built by the core is accepted, the batch it makes is read by
//! the core's parser, and the output file, fed to the core's line reader in small chunks, gives
//! the embeddings endpoint's vectors; a line the server fails comes back as the synchronous
//! path's error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use embsync_core::batch_api::{self, Batch, BatchStatus, FileLimits, LineError, LineTooLong, Lines, OutputLine};
use embsync_core::config::{Config, ModelSlot};
use embsync_core::provider::ProviderError;
use embsync_core::sync::RunId;
use local_provider::{vectors, Config as ServerConfig, Server};

/// One request on a new connection, read to the end: status and de-chunked body.
fn send(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer sk-test\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut raw = &answer[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return (status, raw.to_vec());
    }
    let mut body = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap(), 16).unwrap();
        raw = &raw[end + 2..];
        if size == 0 {
            return (status, body);
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn config() -> Config {
    Config::parse(
        r#"{"version": "1.0", "models": {"large": "text-embedding-3-large", "small": {"name": "text-embedding-3-small", "dimensions": 8}},
            "sources": [{"name": "a", "table": "t", "column": "c"}]}"#,
    )
    .unwrap()
}

/// Uploads the core's file of `texts` and creates a batch; polls it until it is over.
fn run_batch(addr: SocketAddr, texts: &[&str], limits: FileLimits) -> (Batch, batch_api::RequestFile) {
    let config = config();
    let run = RunId("run-1".into());
    let file = batch_api::build_file(&run, ModelSlot::Small, &config.models.small, texts, 0, limits);
    let upload = batch_api::upload_body("run-1-small-0.jsonl", &file.jsonl);
    let (status, body) = send(addr, "POST", "/v1/files", &upload.content_type, &upload.body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let input_file_id = batch_api::file_id(&body).unwrap();
    let (status, body) = send(addr, "POST", "/v1/batches", "application/json", batch_api::create_body(&input_file_id, &run).as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let created = Batch::parse(&body).unwrap();
    assert_eq!(created.status, BatchStatus::Validating);
    for _ in 0..200 {
        let (status, body) = send(addr, "GET", &format!("/v1/batches/{}", created.id), "application/json", b"");
        assert_eq!(status, 200);
        let batch = Batch::parse(&body).unwrap();
        if batch.status.is_over() {
            return (batch, file);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the batch never ended");
}

/// Reads a file's content through the core's line reader, 7 bytes at a time: its lines.
fn read_lines(addr: SocketAddr, file_id: &str) -> Vec<Vec<u8>> {
    let (status, body) = send(addr, "GET", &format!("/v1/files/{file_id}/content"), "application/json", b"");
    assert_eq!(status, 200);
    let mut lines = Lines::new();
    let mut out = Vec::new();
    for chunk in body.chunks(7) {
        lines
            .push::<LineTooLong>(chunk, |line| {
                out.push(line.to_vec());
                Ok(())
            })
            .unwrap();
    }
    lines
        .finish::<LineTooLong>(|line| {
            out.push(line.to_vec());
            Ok(())
        })
        .unwrap();
    out
}

#[test]
fn the_cores_files_round_trip_through_the_local_provider() {
    let addr = Server::bind(&ServerConfig::default()).unwrap().spawn().unwrap();
    let texts: Vec<String> = (0..5).map(|n| format!("value {n} \"quoted\" é")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (batch, file) = run_batch(addr, &texts, FileLimits::OPENAI);
    assert_eq!(batch.status, BatchStatus::Completed);
    assert_eq!(file.requests.len(), 1, "one request holds all five");
    assert_eq!(batch.request_counts.total, 1);
    let lines = read_lines(addr, batch.output_file_id.as_deref().unwrap());
    assert_eq!(lines.len(), 1);
    let line = OutputLine::parse(&lines[0]).unwrap();
    assert_eq!(line.custom_id, file.requests[0].custom_id);
    let embeddings = line.decode(texts.len(), 8).unwrap();
    for (vector, text) in embeddings.vectors.iter().zip(&texts) {
        assert_eq!(vector.to_f32(), vectors::embedding("text-embedding-3-small", text, 8), "{text}");
    }
    assert!(embeddings.prompt_tokens > 0);
}

#[test]
fn a_failed_line_comes_back_as_the_synchronous_paths_error() {
    let addr = Server::bind(&ServerConfig::default()).unwrap().spawn().unwrap();
    let (status, _) = send(addr, "POST", "/_admin/batch", "application/json", br#"{"failInputContains": "poison"}"#);
    assert_eq!(status, 200);
    // 2,048 inputs a request at 8 dimensions: the poison makes the second request fail.
    let texts: Vec<String> = (0..2100).map(|n| if n == 2090 { "a poison value".to_owned() } else { format!("v{n}") }).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (batch, file) = run_batch(addr, &texts, FileLimits::OPENAI);
    assert_eq!(file.requests.len(), 2);
    assert_eq!((batch.request_counts.completed, batch.request_counts.failed), (1, 1));
    let errors = read_lines(addr, batch.error_file_id.as_deref().unwrap());
    let line = OutputLine::parse(&errors[0]).unwrap();
    assert_eq!(line.custom_id, file.requests[1].custom_id);
    let refused = line.decode(file.requests[1].values.len(), 8).unwrap_err();
    assert!(matches!(refused, LineError::Provider(ProviderError::Rejected { status: 400, .. })), "{refused:?}");
    let output = read_lines(addr, batch.output_file_id.as_deref().unwrap());
    let ok = OutputLine::parse(&output[0]).unwrap();
    assert_eq!(ok.decode(2048, 8).unwrap().vectors.len(), 2048);
}
