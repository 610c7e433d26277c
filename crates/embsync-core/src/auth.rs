//! Bearer-token checks for the HTTP endpoints: fail closed, compare in constant time.

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

/// Checks `header` (the request's `Authorization` value) against the configured token.
pub fn check_bearer(header: Option<&str>, configured: Option<&str>) -> AuthOutcome {
    let Some(expected) = configured.filter(|t| !t.is_empty()) else {
        return AuthOutcome::NotConfigured;
    };
    let Some(given) = header.and_then(|h| {
        let (scheme, token) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }) else {
        return AuthOutcome::Missing;
    };
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        AuthOutcome::Allowed
    } else {
        AuthOutcome::Wrong
    }
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
}
