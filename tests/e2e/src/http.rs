//! The HTTP client the harness talks to the worker and the provider with.

use std::time::Duration;

use serde_json::Value;

/// How long a sync request may take before the HTTP client gives up.
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(HTTP_TIMEOUT).build()
}

/// An HTTP answer with its headers.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends a GET with `headers`; returns the status, headers and body, or a transport error.
pub(crate) fn send_get_full(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Err(format!("GET {url}: {e}")),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| {
            let v = resp.header(&n)?.to_string();
            Some((n.to_ascii_lowercase(), v))
        })
        .collect();
    let body = resp.into_string().map_err(|e| format!("read body: {e}"))?;
    Ok(HttpResponse { status, headers, body })
}

/// Sends a request; returns status and body text, or a transport error message.
pub(crate) fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Result<(u16, String), String> {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match res {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.into_string().map_err(|e| format!("read body: {e}"))?;
            Ok((status, text))
        }
        Err(ureq::Error::Status(status, resp)) => Ok((status, resp.into_string().unwrap_or_default())),
        Err(e) => Err(format!("{method} {url}: {e}")),
    }
}

/// JSON of a body, or the body as a JSON string when it is not JSON.
pub(crate) fn to_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}
