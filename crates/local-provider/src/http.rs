//! Requests and responses as the application sees them: plain data, with no
//! IO. The server ([`crate::server`], on hyper) turns hyper's types into these
//! and back, so the handlers and their tests need neither hyper nor a socket.

/// Largest accepted request body. 2048 inputs of 8192 tokens is about 64 MiB
/// of text; this leaves room for JSON escaping.
pub const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// The request line and header fields of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent, for example `/v1/embeddings?x=1`.
    pub target: String,
    /// Header fields in order of arrival.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The value of the first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The path of the target, without the query string.
    pub fn path(&self) -> &str {
        match self.target.split_once('?') {
            Some((path, _query)) => path,
            None => &self.target,
        }
    }
}

/// An HTTP response with a complete body. The server adds `Content-Length`
/// (the body's exact length) and `Connection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Extra header fields.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_responses() {
        let head = RequestHead {
            method: "POST".into(),
            target: "/v1/embeddings?a=b".into(),
            headers: vec![("X-Thing".into(), "1".into()), ("x-thing".into(), "2".into())],
        };
        assert_eq!(head.path(), "/v1/embeddings");
        assert_eq!(head.header("x-THING"), Some("1"));
        assert_eq!(head.header("missing"), None);
        let response = Response::json(200, &serde_json::json!({"ok": true})).with_header("x-a", "1");
        assert_eq!(response.body, b"{\"ok\":true}");
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        assert_eq!(response.header("X-A"), Some("1"));
    }
}
