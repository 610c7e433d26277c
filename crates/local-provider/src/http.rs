//! A small HTTP/1.1 implementation: request parsing and response writing.
//!
//! It covers what HTTP clients send to an API server: a request line, headers,
//! and a body framed by `Content-Length` or `Transfer-Encoding: chunked`
//! (chunk extensions and trailers are accepted and ignored). Persistent
//! connections follow RFC 9112: HTTP/1.1 keeps the connection open unless
//! `Connection: close` is sent, HTTP/1.0 closes it unless `Connection:
//! keep-alive` is sent. Every response carries an exact `Content-Length`.

use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Longest accepted request line, header line or chunk-size line, in bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Most header fields accepted in one request (or in a chunked trailer).
pub const MAX_HEADERS: usize = 128;

/// Largest accepted request body. 2048 inputs of 8192 tokens is about 64 MiB
/// of text; this leaves room for JSON escaping.
pub const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// The HTTP version of a request; responses answer with the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The connection failed or ended in the middle of a request.
    Io(io::Error),
    /// The request violates the HTTP syntax (answered with 400).
    Malformed(String),
    /// The request line or the header section is too large (431).
    HeadersTooLarge,
    /// The body is larger than [`MAX_BODY_BYTES`] (413).
    BodyTooLarge,
    /// A transfer coding other than `chunked` (501).
    UnsupportedTransferCoding(String),
    /// An HTTP version other than 1.0 and 1.1 (505).
    UnsupportedVersion(String),
}

impl HttpError {
    /// The status code to answer with, or `None` when the connection is gone.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Io(_) => None,
            HttpError::Malformed(_) => Some(400),
            HttpError::HeadersTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::UnsupportedTransferCoding(_) => Some(501),
            HttpError::UnsupportedVersion(_) => Some(505),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(err) => write!(f, "connection error: {err}"),
            HttpError::Malformed(what) => write!(f, "malformed request: {what}"),
            HttpError::HeadersTooLarge => f.write_str("request header section too large"),
            HttpError::BodyTooLarge => {
                write!(f, "request body larger than {MAX_BODY_BYTES} bytes")
            }
            HttpError::UnsupportedTransferCoding(coding) => {
                write!(f, "unsupported transfer coding: {coding}")
            }
            HttpError::UnsupportedVersion(version) => {
                write!(f, "unsupported HTTP version: {version}")
            }
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(err: io::Error) -> Self {
        HttpError::Io(err)
    }
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes follow the header section.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The request line and header fields of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent, for example `/v1/embeddings?x=1`.
    pub target: String,
    pub version: Version,
    /// Header fields in order of arrival; names as sent.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The value of the first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// All values of the header fields called `name`, in order.
    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (like `Connection`) lists `token`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name).flat_map(|value| value.split(',')).any(|item| item.trim().eq_ignore_ascii_case(token))
    }

    /// The path of the target, without the query string.
    pub fn path(&self) -> &str {
        match self.target.split_once('?') {
            Some((path, _query)) => path,
            None => &self.target,
        }
    }

    /// Whether the connection stays open after the response.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.has_token("connection", "close"),
            Version::Http10 => self.has_token("connection", "keep-alive"),
        }
    }

    /// Whether the client waits for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.version == Version::Http11 && self.has_token("expect", "100-continue")
    }

    /// How the body is delimited, from `Transfer-Encoding` and `Content-Length`.
    pub fn body_framing(&self) -> Result<BodyFraming, HttpError> {
        let codings: Vec<String> = self
            .header_values("transfer-encoding")
            .flat_map(|value| value.split(','))
            .map(|coding| coding.trim().to_ascii_lowercase())
            .filter(|coding| !coding.is_empty())
            .collect();
        if let Some(last) = codings.last() {
            // Transfer-Encoding overrides Content-Length (RFC 9112, 6.3).
            return if codings.len() == 1 && last == "chunked" {
                Ok(BodyFraming::Chunked)
            } else {
                Err(HttpError::UnsupportedTransferCoding(codings.join(", ")))
            };
        }
        let mut length: Option<usize> = None;
        for value in self.header_values("content-length") {
            // Repeated fields (or a list) must all carry the same number.
            for item in value.split(',') {
                let item = item.trim();
                if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(malformed(format!("invalid Content-Length: {value:?}")));
                }
                let parsed: usize = item.parse().map_err(|_| HttpError::BodyTooLarge)?;
                if length.is_some_and(|known| known != parsed) {
                    return Err(malformed("conflicting Content-Length values"));
                }
                length = Some(parsed);
            }
        }
        match length {
            None | Some(0) => Ok(BodyFraming::Empty),
            Some(n) if n > MAX_BODY_BYTES => Err(HttpError::BodyTooLarge),
            Some(n) => Ok(BodyFraming::Length(n)),
        }
    }
}

/// Reads one line terminated by LF (an optional CR before it is dropped).
/// Returns `None` at end of input before any byte of the line.
fn read_line<R: BufRead>(reader: &mut R) -> Result<Option<String>, HttpError> {
    let mut buf = Vec::new();
    let limit = (MAX_LINE_BYTES + 2) as u64;
    reader.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return if buf.len() as u64 >= limit {
            Err(HttpError::HeadersTooLarge)
        } else {
            Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()))
        };
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map(Some).map_err(|_| malformed("line is not valid UTF-8"))
}

/// Like [`read_line`], but the end of input is an error.
fn read_required_line<R: BufRead>(reader: &mut R) -> Result<String, HttpError> {
    read_line(reader)?.ok_or_else(|| HttpError::Io(io::ErrorKind::UnexpectedEof.into()))
}

/// Reads header fields up to and including the empty line that ends them.
fn read_fields<R: BufRead>(reader: &mut R) -> Result<Vec<(String, String)>, HttpError> {
    let mut fields = Vec::new();
    loop {
        let line = read_required_line(reader)?;
        if line.is_empty() {
            return Ok(fields);
        }
        if fields.len() == MAX_HEADERS {
            return Err(HttpError::HeadersTooLarge);
        }
        if line.starts_with([' ', '\t']) {
            return Err(malformed("obsolete header line folding"));
        }
        let (name, value) = line.split_once(':').ok_or_else(|| malformed(format!("header line without colon: {line:?}")))?;
        let valid_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !valid_name {
            return Err(malformed(format!("invalid header name: {name:?}")));
        }
        fields.push((name.to_string(), value.trim_matches([' ', '\t']).to_string()));
    }
}

/// Reads the request line and header section of the next request.
///
/// Returns `Ok(None)` when the connection is closed cleanly before a request
/// starts (the normal end of a keep-alive connection). Empty lines before the
/// request line are skipped, as RFC 9112 recommends.
pub fn read_head<R: BufRead>(reader: &mut R) -> Result<Option<RequestHead>, HttpError> {
    let request_line = loop {
        match read_line(reader)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed(format!("invalid request line: {request_line:?}")));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(malformed(format!("invalid method: {method:?}")));
    }
    if target.is_empty() {
        return Err(malformed("empty request target"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        other if other.starts_with("HTTP/") => return Err(HttpError::UnsupportedVersion(other.to_string())),
        other => return Err(malformed(format!("invalid HTTP version: {other:?}"))),
    };
    let headers = read_fields(reader)?;
    Ok(Some(RequestHead { method: method.to_string(), target: target.to_string(), version, headers }))
}

/// Reads a request body delimited as `framing` says.
pub fn read_body<R: BufRead>(reader: &mut R, framing: BodyFraming) -> Result<Vec<u8>, HttpError> {
    match framing {
        BodyFraming::Empty => Ok(Vec::new()),
        BodyFraming::Length(length) => {
            let mut body = Vec::with_capacity(length.min(1024 * 1024));
            reader.by_ref().take(length as u64).read_to_end(&mut body)?;
            if body.len() != length {
                return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(body)
        }
        BodyFraming::Chunked => read_chunked(reader),
    }
}

/// Reads a chunked body: `size[;ext] CRLF data CRLF` ... `0 CRLF trailers CRLF`.
fn read_chunked<R: BufRead>(reader: &mut R) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line = read_required_line(reader)?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(format!("invalid chunk size: {line:?}")));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::BodyTooLarge)?;
        if size == 0 {
            // Trailer fields are read and dropped.
            read_fields(reader)?;
            return Ok(body);
        }
        if body.len().saturating_add(size) > MAX_BODY_BYTES {
            return Err(HttpError::BodyTooLarge);
        }
        let start = body.len();
        reader.by_ref().take(size as u64).read_to_end(&mut body)?;
        if body.len() - start != size {
            return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if !read_required_line(reader)?.is_empty() {
            return Err(malformed("chunk data longer than its size"));
        }
    }
}

/// The standard reason phrase of a status code.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// An HTTP response with a complete body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Extra header fields; `Content-Length` and `Connection` are added when
    /// the response is written.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a body and no extra headers.
    pub fn new(status: u16, body: Vec<u8>) -> Self {
        Response { status, headers: Vec::new(), body }
    }

    /// A JSON response.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status, body).with_header("content-type", "application/json"),
            // Our response types always serialise; this is a last resort.
            Err(err) => Response::new(500, format!("response serialisation failed: {err}").into())
                .with_header("content-type", "text/plain; charset=utf-8"),
        }
    }

    /// Adds a header field.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// The value of the first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Writes the response. `keep_alive` says whether the connection stays
    /// open afterwards; it is announced in a `Connection` header when it
    /// differs from the version's default.
    pub fn write_to<W: Write>(&self, writer: &mut W, version: Version, keep_alive: bool) -> io::Result<()> {
        let mut head = format!("{} {} {}\r\n", version.as_str(), self.status, reason_phrase(self.status));
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n", self.body.len()));
        match (version, keep_alive) {
            (Version::Http11, false) => head.push_str("connection: close\r\n"),
            (Version::Http10, true) => head.push_str("connection: keep-alive\r\n"),
            _ => {}
        }
        head.push_str("\r\n");
        writer.write_all(head.as_bytes())?;
        writer.write_all(&self.body)?;
        writer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn head(raw: &str) -> RequestHead {
        match read_head(&mut Cursor::new(raw.as_bytes())) {
            Ok(Some(head)) => head,
            other => panic!("expected a request head, got {other:?}"),
        }
    }

    /// Parses one complete request (head and body) from `raw`.
    fn request(raw: &[u8]) -> Result<(RequestHead, Vec<u8>), HttpError> {
        let mut reader = Cursor::new(raw);
        let head = read_head(&mut reader)?.ok_or_else(|| malformed("no request"))?;
        let body = read_body(&mut reader, head.body_framing()?)?;
        Ok((head, body))
    }

    #[test]
    fn parses_request_line_and_headers() {
        let h = head("\r\nPOST /v1/embeddings?a=b HTTP/1.1\r\nHost: x\r\nX-Thing:  spaced value \r\n\r\n");
        assert_eq!(h.method, "POST");
        assert_eq!(h.target, "/v1/embeddings?a=b");
        assert_eq!(h.path(), "/v1/embeddings");
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.header("x-thing"), Some("spaced value"));
        assert_eq!(h.header("HOST"), Some("x"));
        assert_eq!(h.header("missing"), None);
        // Bare LF line endings are accepted too.
        assert_eq!(head("GET / HTTP/1.0\nA: b\n\n").header("a"), Some("b"));
    }

    #[test]
    fn clean_end_of_input_is_not_an_error() {
        assert!(matches!(read_head(&mut Cursor::new(&b""[..])), Ok(None)));
        assert!(matches!(read_head(&mut Cursor::new(&b"\r\n"[..])), Ok(None)));
        // ...but a request cut off in its header section is.
        assert!(matches!(read_head(&mut Cursor::new(&b"GET / HTTP/1.1\r\nHost: x\r\n"[..])), Err(HttpError::Io(_))));
    }

    #[test]
    fn rejects_malformed_heads() {
        for raw in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "get / HTTP/1.1\r\n\r\n",
            "GET / FTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        ] {
            let result = read_head(&mut Cursor::new(raw.as_bytes()));
            assert!(matches!(result, Err(HttpError::Malformed(_))), "{raw:?}: {result:?}");
        }
        let result = read_head(&mut Cursor::new(&b"GET / HTTP/2.0\r\n\r\n"[..]));
        assert!(matches!(result, Err(HttpError::UnsupportedVersion(_))));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE_BYTES));
        let result = read_head(&mut Cursor::new(long.as_bytes()));
        assert!(matches!(result, Err(HttpError::HeadersTooLarge)));
    }

    #[test]
    fn keep_alive_defaults_per_version() {
        assert!(head("GET / HTTP/1.1\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: TE, Close\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive());
    }

    #[test]
    fn content_length_body() {
        let (h, body) = request(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloEXTRA").unwrap();
        assert_eq!(h.body_framing().unwrap(), BodyFraming::Length(5));
        assert_eq!(body, b"hello");
        let (_, body) = request(b"POST /x HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc").unwrap();
        assert_eq!(body, b"abc");
        assert!(matches!(request(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort"), Err(HttpError::Io(_))));
        for bad in ["-1", "abc", "1, 2", ""] {
            let raw = format!("POST /x HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert!(matches!(request(raw.as_bytes()), Err(HttpError::Malformed(_))), "{bad:?}");
        }
        let huge = format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert!(matches!(request(huge.as_bytes()), Err(HttpError::BodyTooLarge)));
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let raw = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 999\r\n\r\n\
                    5;name=value\r\nhello\r\n7\r\n, world\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let mut reader = Cursor::new(&raw[..]);
        let h = read_head(&mut reader).unwrap().unwrap();
        assert_eq!(h.body_framing().unwrap(), BodyFraming::Chunked);
        let body = read_body(&mut reader, BodyFraming::Chunked).unwrap();
        assert_eq!(body, b"hello, world0123456789");
        // The reader stops exactly at the end of the message.
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn rejects_bad_chunked_bodies() {
        let bad_size = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(request(bad_size), Err(HttpError::Malformed(_))));
        let overlong = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n";
        assert!(matches!(request(overlong), Err(HttpError::Malformed(_))));
        let truncated = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(matches!(request(truncated), Err(HttpError::Io(_))));
        let gzip = b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert!(matches!(request(gzip), Err(HttpError::UnsupportedTransferCoding(_))));
    }

    #[test]
    fn writes_responses_with_content_length() {
        let response = Response::json(200, &serde_json::json!({"ok": true})).with_header("x-a", "1");
        let mut out = Vec::new();
        response.write_to(&mut out, Version::Http11, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-a: 1\r\ncontent-length: 11\r\n\r\n{\"ok\":true}");
        let mut out = Vec::new();
        Response::new(404, Vec::new()).write_to(&mut out, Version::Http11, false).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let mut out = Vec::new();
        Response::new(200, b"x".to_vec()).write_to(&mut out, Version::Http10, true).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("connection: keep-alive\r\n"));
    }
}
