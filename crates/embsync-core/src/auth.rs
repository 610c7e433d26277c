//! Token checks for the HTTP endpoints: fail closed, compare in constant time.
//!
//! Programs send `Authorization: Bearer <token>`. A browser cannot add that header to a page it
//! opens, so the HTML page also takes HTTP Basic credentials whose password is the token (any
//! user name); its 401 carries [`BASIC_CHALLENGE`] so that the browser asks for them.

use base64::Engine;

/// The `WWW-Authenticate` value of a 401 from a page that takes Basic credentials.
pub const BASIC_CHALLENGE: &str = "Basic realm=\"embsync\"";

/// The outcome of checking an `Authorization` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The token matches.
    Allowed,
    /// No token is configured, so every request is refused.
    NotConfigured,
    /// The request carries no bearer token.
    Missing,
    /// The request's token does not match.
    Wrong,
}

/// Which credentials an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    /// `Authorization: Bearer <token>` only (the JSON endpoints).
    Bearer,
    /// A bearer token, or HTTP Basic with the token as the password (the HTML page).
    BearerOrBasic,
}

/// Checks `header` (the request's `Authorization` value) against the configured token.
pub fn check_bearer(header: Option<&str>, configured: Option<&str>) -> AuthOutcome {
    check(header, configured, Accepts::Bearer)
}

/// Checks `header` (the request's `Authorization` value) against the configured token, taking
/// the credentials `accepts` allows. A scheme the endpoint does not take counts as no
/// credentials; Basic credentials that are not `base64(user:password)` count as wrong ones.
pub fn check(header: Option<&str>, configured: Option<&str>, accepts: Accepts) -> AuthOutcome {
    let Some(expected) = configured.filter(|t| !t.is_empty()) else {
        return AuthOutcome::NotConfigured;
    };
    let Some((scheme, credentials)) = header.and_then(|h| h.trim().split_once(' ')) else {
        return AuthOutcome::Missing;
    };
    let credentials = credentials.trim();
    let given: Vec<u8> = if scheme.eq_ignore_ascii_case("bearer") {
        credentials.as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") && accepts == Accepts::BearerOrBasic {
        match basic_password(credentials) {
            Some(password) => password,
            None => return AuthOutcome::Wrong,
        }
    } else {
        return AuthOutcome::Missing;
    };
    if constant_time_eq(&given, expected.as_bytes()) {
        AuthOutcome::Allowed
    } else {
        AuthOutcome::Wrong
    }
}

/// The password of Basic credentials (`base64(user:password)`, RFC 7617): everything after the
/// first colon, as bytes. `None` when they are not base64 or have no colon.
fn basic_password(credentials: &str) -> Option<Vec<u8>> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(credentials).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        assert_eq!(check_bearer(Some("Bearer s3cret"), Some("s3cret")), AuthOutcome::Allowed);
        assert_eq!(check_bearer(Some("bearer  s3cret "), Some("s3cret")), AuthOutcome::Allowed);
        assert_eq!(check_bearer(Some("Bearer s3cre"), Some("s3cret")), AuthOutcome::Wrong);
        assert_eq!(check_bearer(Some("Bearer s3creT"), Some("s3cret")), AuthOutcome::Wrong);
        assert_eq!(check_bearer(Some("Basic s3cret"), Some("s3cret")), AuthOutcome::Missing);
        assert_eq!(check_bearer(Some("s3cret"), Some("s3cret")), AuthOutcome::Missing);
        assert_eq!(check_bearer(None, Some("s3cret")), AuthOutcome::Missing);
        assert_eq!(check_bearer(Some("Bearer "), Some("")), AuthOutcome::NotConfigured);
        assert_eq!(check_bearer(Some("Bearer x"), None), AuthOutcome::NotConfigured);
    }

    fn basic(user_password: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password))
    }

    #[test]
    fn basic_credentials_carry_the_token_as_password_on_pages_only() {
        let page = |h: &str| check(Some(h), Some("s3cret"), Accepts::BearerOrBasic);
        assert_eq!(page(&basic("user:s3cret")), AuthOutcome::Allowed);
        assert_eq!(page(&basic(":s3cret")), AuthOutcome::Allowed, "any user name, even none");
        assert_eq!(page(&basic("ann:s3cret")), AuthOutcome::Allowed);
        assert_eq!(page(&format!("basic  {} ", &basic("u:s3cret")[6..])), AuthOutcome::Allowed);
        assert_eq!(page("Bearer s3cret"), AuthOutcome::Allowed, "pages take the bearer token too");
        assert_eq!(page(&basic("user:s3cre")), AuthOutcome::Wrong);
        assert_eq!(page(&basic("user:s3cret:")), AuthOutcome::Wrong, "the password is all after the first colon");
        assert_eq!(page(&basic("s3cret:user")), AuthOutcome::Wrong, "the token is the password, not the user");
        assert_eq!(page(&basic("s3cret")), AuthOutcome::Wrong, "no colon");
        assert_eq!(page("Basic not*base64"), AuthOutcome::Wrong);
        assert_eq!(page("Digest s3cret"), AuthOutcome::Missing);
        assert_eq!(check(None, Some("s3cret"), Accepts::BearerOrBasic), AuthOutcome::Missing);
        assert_eq!(check(Some(&basic("u:")), Some(""), Accepts::BearerOrBasic), AuthOutcome::NotConfigured);
        assert_eq!(check(Some(&basic("u:x")), None, Accepts::BearerOrBasic), AuthOutcome::NotConfigured);
        // The JSON endpoints do not take Basic credentials, right or wrong.
        assert_eq!(check_bearer(Some(&basic("user:s3cret")), Some("s3cret")), AuthOutcome::Missing);
        assert_eq!(check(Some(&basic("user:x")), Some("s3cret"), Accepts::Bearer), AuthOutcome::Missing);
    }
}
