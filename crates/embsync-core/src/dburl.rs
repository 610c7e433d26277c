//! `DATABASE_URL` as the Workers socket API can use it.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require`; libpq and Neon also use
//! `verify-ca` and `verify-full`, and Neon URLs carry `channel_binding=require`, which cannot work
//! over the socket API (it does not expose the TLS channel). workerd always verifies the server's
//! certificate and sends the hostname as SNI, so `verify-full` is what every TLS connection gets:
//! this module maps the `verify-*` modes to `require` and drops `channel_binding`.

/// How the socket is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Plain TCP (`sslmode=disable`, `allow`, `prefer` or none: the socket API cannot fall back
    /// from TLS to plain text, so "prefer" means plain).
    Off,
    /// StartTls with a verified certificate (`require`, `verify-ca`, `verify-full`).
    Required,
}

/// Why a `DATABASE_URL` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseUrlError {
    /// An `sslmode` libpq does not know.
    #[error("DATABASE_URL has sslmode={0:?}: use disable, prefer, require, verify-ca or verify-full")]
    SslMode(String),
}

/// Rewrites a `postgres://` URL for tokio-postgres and says how to secure the socket. Other
/// forms (key=value strings) pass through unchanged with [`Tls::Off`] unless they say
/// `sslmode=require`.
///
/// # Errors
/// [`DatabaseUrlError`] for an unknown `sslmode`.
pub fn normalize(url: &str) -> Result<(String, Tls), DatabaseUrlError> {
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
            _ => kept.push(pair.to_owned()),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((url, tls))
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
    }
}
