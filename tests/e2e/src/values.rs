//! What the tests compute to compare with: the contract's value hashes, pgvector's text form,
//! base64 and vector norms.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

/// The hash the contract promises: lowercase hex SHA-256 of the UTF-8 bytes of `v` trimmed of
/// leading and trailing U+0020 only; `None` when nothing is left after trimming.
pub fn expected_hash(v: &str) -> Option<String> {
    let t = v.trim_matches(' ');
    if t.is_empty() {
        None
    } else {
        Some(hex::encode(Sha256::digest(t.as_bytes())))
    }
}

/// The distinct trimmed non-empty values of a list of raw column values.
pub fn distinct_trimmed<'a>(values: impl IntoIterator<Item = &'a Option<&'a str>>) -> BTreeSet<String> {
    values.into_iter().flatten().map(|v| v.trim_matches(' ').to_string()).filter(|v| !v.is_empty()).collect()
}

/// Hashes of a set of values (which must be non-empty after trimming).
pub fn hashes_of<'a>(values: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    values.into_iter().map(|v| expected_hash(v).expect("non-empty value")).collect()
}

/// Parses pgvector's text form `[1,2.5,-3e-05]`.
pub fn parse_vector(text: &str) -> Vec<f32> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    if inner.trim().is_empty() {
        return Vec::new();
    }
    inner.split(',').map(|x| x.trim().parse::<f32>().unwrap_or_else(|e| panic!("bad component {x:?}: {e}"))).collect()
}

/// Decodes standard, padded base64.
pub fn decode_base64(text: &str) -> Vec<u8> {
    fn sextet(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not a base64 character: {:?}", c as char),
        }
    }
    let trimmed = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// An `Authorization` value with HTTP Basic credentials: `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Euclidean norm.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TOKEN;

    #[test]
    fn expected_hash_trims_spaces_only() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(expected_hash("abc").as_deref(), Some(abc));
        assert_eq!(expected_hash("  abc   ").as_deref(), Some(abc));
        assert_ne!(expected_hash("\tabc").as_deref(), Some(abc));
        assert_eq!(expected_hash("   "), None);
        assert_eq!(expected_hash(""), None);
        // U+00E9 is two UTF-8 bytes.
        assert_eq!(expected_hash("\u{e9}"), Some(hex::encode(Sha256::digest([0xc3, 0xa9]))));
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64(""), b"");
        assert_eq!(decode_base64("Zg=="), b"f");
        assert_eq!(decode_base64("Zm8="), b"fo");
        assert_eq!(decode_base64("Zm9v"), b"foo");
        assert_eq!(decode_base64("Zm9vYmFy"), b"foobar");
        assert_eq!(decode_base64("AACAPw=="), 1.0f32.to_le_bytes());
        assert_eq!(decode_base64("+/8="), [0xfb, 0xff]);
    }

    #[test]
    fn basic_credentials_encode_as_rfc_4648_base64() {
        assert_eq!(basic_auth("reader", ""), "Basic cmVhZGVyOg==");
        assert_eq!(basic_auth("reader", "x"), "Basic cmVhZGVyOng=");
        assert_eq!(basic_auth("reader", "xy"), "Basic cmVhZGVyOnh5");
        assert_eq!(decode_base64(&basic_auth("ann", TOKEN)[6..]), format!("ann:{TOKEN}").as_bytes());
    }

    #[test]
    fn vectors_parse_from_pgvector_text() {
        assert_eq!(parse_vector("[1,-2.5,3e-05]"), vec![1.0, -2.5, 3e-5]);
        assert_eq!(parse_vector("[]"), Vec::<f32>::new());
    }

    #[test]
    fn distinct_values_merge_padding_and_skip_blanks() {
        let got = distinct_trimmed(&[Some(" x "), Some("x"), None, Some("  "), Some("y")]);
        assert_eq!(got, BTreeSet::from(["x".to_string(), "y".to_string()]));
    }
}
