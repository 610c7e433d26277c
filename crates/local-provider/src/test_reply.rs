//! What the server tests share: a response as the test client read it off the socket.

use serde_json::Value;

/// A response as the client saw it (a chunked body de-chunked by the client that read it).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| panic!("invalid JSON ({err}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as JSON lines.
    pub(crate) fn lines(&self) -> Vec<Value> {
        let text = std::str::from_utf8(&self.body).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "a JSONL file ends with a newline");
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }
}
