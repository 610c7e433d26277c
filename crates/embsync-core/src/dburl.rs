//! `DATABASE_URL` as the Workers socket API can use it, and the TLS negotiation's pure parts.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require`; libpq and Neon also use
//! `verify-ca` and `verify-full`, and Neon URLs carry `channel_binding=require`, which cannot work
//! over the socket API (it does not expose the TLS channel). workerd always verifies the server's
//! certificate against the host name of the URL, and sends that name as SNI (which is how Neon
//! finds the endpoint), so every TLS connection gets what libpq calls `verify-full`: this module
//! maps the `verify-*` modes to `require` and drops `channel_binding`.
//!
//! The worker negotiates TLS itself, the way libpq does: it sends [`SSL_REQUEST`] in plain text,
//! reads the server's one-byte answer ([`ssl_answer`]) and only then lets workerd start the TLS
//! handshake. So a server without TLS is told apart from a refused certificate, and neither is
//! ever downgraded to plain text.

/// How the socket is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Plain TCP: `sslmode=disable`, `allow`, `prefer`, or no `sslmode`. libpq's `prefer` encrypts
    /// without checking the certificate when the server offers TLS; workerd cannot skip the check,
    /// so a `prefer` that tried TLS would fail against the self-signed servers libpq accepts. Ask
    /// for TLS with `require`.
    Off,
    /// TLS with a verified certificate, or no connection (`require`, `verify-ca`, `verify-full`).
    Required,
}

/// The SSLRequest message: length 8, then the request code 80877103 (1234 << 16 | 5679), both
/// big-endian. A client sends it in plain text to ask the server to switch to TLS.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Why a TLS connection to Postgres could not be set up. `endpoint` is `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The server answered the SSLRequest with `N`: it does not accept TLS.
    #[error(
        "the server at {endpoint} does not accept TLS connections, and DATABASE_URL asks for TLS \
         (sslmode=require, verify-ca or verify-full): turn on ssl on the server, or, only on a \
         network you trust, set sslmode=disable"
    )]
    NotSupported {
        /// `host:port` of the server.
        endpoint: String,
    },
    /// The server answered the SSLRequest with something other than `S` or `N`.
    #[error("the server at {endpoint} answered the TLS request with byte 0x{byte:02x}, not S or N: is it a Postgres server?")]
    UnexpectedAnswer {
        /// `host:port` of the server.
        endpoint: String,
        /// The byte it sent.
        byte: u8,
    },
    /// workerd's TLS handshake failed; workerd does not say why, but a certificate it refuses
    /// (not signed by a CA it trusts, not valid for the host name, expired) is the usual cause.
    #[error(
        "the TLS handshake with {endpoint} failed ({detail}): workerd verifies the server's \
         certificate whatever the sslmode, so it must be valid for the host name {host:?} and \
         signed by a CA workerd trusts (a public CA when deployed; for a private CA in local \
         development, start wrangler dev with NODE_EXTRA_CA_CERTS=/path/to/ca.pem)"
    )]
    Handshake {
        /// `host:port` of the server.
        endpoint: String,
        /// The host name the certificate was checked against (and sent as SNI).
        host: String,
        /// What workerd reported.
        detail: String,
    },
}

/// Reads the server's one-byte answer to [`SSL_REQUEST`]: `Ok` for `S` (go on with the TLS
/// handshake).
///
/// # Errors
/// [`TlsError::NotSupported`] for `N`, [`TlsError::UnexpectedAnswer`] for anything else. There is
/// no plain-text fallback: [`Tls::Required`] means TLS or nothing.
pub fn ssl_answer(byte: u8, endpoint: &str) -> Result<(), TlsError> {
    match byte {
        b'S' => Ok(()),
        b'N' => Err(TlsError::NotSupported { endpoint: endpoint.to_owned() }),
        byte => Err(TlsError::UnexpectedAnswer { endpoint: endpoint.to_owned(), byte }),
    }
}

/// Why a `DATABASE_URL` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseUrlError {
    /// Not a `postgres://` or `postgresql://` URL (a libpq key=value string, say). The value is
    /// not shown: it may hold the password.
    #[error("DATABASE_URL is not a postgres:// URL: write it as postgres://user:password@host:port/database?sslmode=require")]
    NotAUrl,
    /// An `sslmode` libpq does not know.
    #[error("DATABASE_URL has sslmode={0:?}: use disable, prefer, require, verify-ca or verify-full")]
    SslMode(String),
    /// An `sslrootcert` file: a Worker has no files, and workerd picks the CAs it trusts.
    #[error(
        "DATABASE_URL has sslrootcert={0:?}, but a Worker cannot read certificate files: workerd \
         checks the server's certificate against the CAs it trusts; remove sslrootcert (or write \
         sslrootcert=system)"
    )]
    RootCertFile(String),
}

/// Rewrites a `postgres://` URL for tokio-postgres and says how to secure the socket: `verify-*`
/// become `require`, `channel_binding` and `sslrootcert=system` are dropped. Other forms
/// (libpq's key=value strings) are refused, so that no `sslmode` in them can be missed.
///
/// # Errors
/// [`DatabaseUrlError`] for something else than a URL, an unknown `sslmode` or an `sslrootcert`
/// file.
pub fn normalize(url: &str) -> Result<(String, Tls), DatabaseUrlError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DatabaseUrlError::NotAUrl);
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Tls::Off));
    };
    let mut tls = Tls::Off;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                let mode = match value {
                    "disable" | "allow" | "prefer" => {
                        tls = Tls::Off;
                        "disable"
                    }
                    "require" | "verify-ca" | "verify-full" => {
                        tls = Tls::Required;
                        "require"
                    }
                    other => return Err(DatabaseUrlError::SslMode(other.to_owned())),
                };
                kept.push(format!("sslmode={mode}"));
            }
            "channel_binding" => {}
            // libpq's "use the system's CAs", which is what workerd does anyway.
            "sslrootcert" if value == "system" => {}
            "sslrootcert" => return Err(DatabaseUrlError::RootCertFile(value.to_owned())),
            _ => kept.push(pair.to_owned()),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((url, tls))
}

/// `url` (a `postgres://` URL) with its database replaced by `database`, the query kept: how the
/// tests reach the databases they create next to the one they are given.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    format!("{base}/{database}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expect: &str) {
        let actual = match normalize(url) {
            Ok((u, tls)) => format!("{tls:?} {u}"),
            Err(e) => format!("err {e}"),
        };
        assert_eq!(actual, expect);
    }

    #[test]
    fn modes() {
        check("postgres://u:p@h/db", "Off postgres://u:p@h/db");
        check(
            "postgresql://u:p@ep-x-123.eu-central-1.aws.neon.tech/neondb?sslmode=require&channel_binding=require",
            "Required postgresql://u:p@ep-x-123.eu-central-1.aws.neon.tech/neondb?sslmode=require",
        );
        check(
            "postgres://h/db?sslmode=verify-full&application_name=embsync",
            "Required postgres://h/db?sslmode=require&application_name=embsync",
        );
        check("postgres://h/db?sslmode=verify-ca", "Required postgres://h/db?sslmode=require");
        check("postgres://h/db?sslmode=prefer", "Off postgres://h/db?sslmode=disable");
        check("postgres://h/db?channel_binding=require", "Off postgres://h/db");
        check(
            "postgres://h/db?sslmode=bogus",
            "err DATABASE_URL has sslmode=\"bogus\": use disable, prefer, require, verify-ca or verify-full",
        );
        check("postgres://h/db?sslmode=allow", "Off postgres://h/db?sslmode=disable");
        check("postgres://h/db?sslmode=disable", "Off postgres://h/db?sslmode=disable");
        check("postgres://h/db?sslmode=require", "Required postgres://h/db?sslmode=require");
    }

    #[test]
    fn root_certificates() {
        check("postgres://h/db?sslmode=verify-full&sslrootcert=system", "Required postgres://h/db?sslmode=require");
        check(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca.pem",
            "err DATABASE_URL has sslrootcert=\"/etc/ssl/certs/ca.pem\", but a Worker cannot read certificate files: \
             workerd checks the server's certificate against the CAs it trusts; remove sslrootcert (or write sslrootcert=system)",
        );
    }

    #[test]
    fn only_urls_are_accepted() {
        let refused = "err DATABASE_URL is not a postgres:// URL: write it as postgres://user:password@host:port/database?sslmode=require";
        // A key=value string's sslmode would otherwise be lost; its password must not be echoed.
        check("host=h user=u password=hunter2 sslmode=require", refused);
        check("mysql://u:p@h/db", refused);
        check("", refused);
        check("postgresql://u@h:6543/db", "Off postgresql://u@h:6543/db");
    }

    fn answer(byte: u8) -> String {
        match ssl_answer(byte, "db.example.com:5432") {
            Ok(()) => "tls".to_owned(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ssl_request_is_the_protocol_constant() {
        let length = u32::from_be_bytes(SSL_REQUEST[..4].try_into().unwrap());
        let code = u32::from_be_bytes(SSL_REQUEST[4..].try_into().unwrap());
        assert_eq!((length, code), (8, 80_877_103));
        assert_eq!(code, (1234 << 16) | 5679);
    }

    #[test]
    fn ssl_answers() {
        assert_eq!(answer(b'S'), "tls");
        assert_eq!(
            answer(b'N'),
            "the server at db.example.com:5432 does not accept TLS connections, and DATABASE_URL asks for TLS \
             (sslmode=require, verify-ca or verify-full): turn on ssl on the server, or, only on a network you trust, \
             set sslmode=disable"
        );
        // An ErrorResponse ('E') from a server too old for SSLRequest, or something that is not Postgres.
        assert_eq!(
            answer(b'E'),
            "the server at db.example.com:5432 answered the TLS request with byte 0x45, not S or N: is it a Postgres server?"
        );
    }

    #[test]
    fn handshake_errors_name_the_host_and_the_fix() {
        let e = TlsError::Handshake {
            endpoint: "localhost:5432".to_owned(),
            host: "localhost".to_owned(),
            detail: "Error: internal error".to_owned(),
        };
        assert_eq!(
            e.to_string(),
            "the TLS handshake with localhost:5432 failed (Error: internal error): workerd verifies the server's \
             certificate whatever the sslmode, so it must be valid for the host name \"localhost\" and signed by a CA \
             workerd trusts (a public CA when deployed; for a private CA in local development, start wrangler dev with \
             NODE_EXTRA_CA_CERTS=/path/to/ca.pem)"
        );
    }

    #[test]
    fn the_database_is_replaced() {
        assert_eq!(with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"), "postgres://postgres@127.0.0.1:5432/x");
        assert_eq!(with_database("postgres://u:p@h:1/db?sslmode=disable", "y"), "postgres://u:p@h:1/y?sslmode=disable");
        assert_eq!(with_database("postgres://h:1", "z"), "postgres://h:1/z");
    }
}
