//! The value hash contract.
//!
//! `value_hash` is the lowercase hex SHA-256 of the UTF-8 bytes of the value with leading and
//! trailing spaces (U+0020 only) removed; in Postgres,
//! `encode(sha256(convert_to(trim(v), 'UTF8')), 'hex')`. NULL values and values that are empty
//! after trimming are skipped. The older form `sha256(trim(v)::bytea)` reads backslashes as
//! escapes and must never be used.

use sha2::{Digest, Sha256};
use std::fmt;

/// A value ready to embed: trimmed of leading and trailing spaces and not empty.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Value(String);

impl Value {
    /// Trims leading and trailing U+0020 and keeps the rest, or `None` when nothing is left.
    /// Tabs and newlines are content, not padding, exactly as Postgres `trim(v)` sees them.
    pub fn normalize(raw: &str) -> Option<Value> {
        let trimmed = raw.trim_matches(' ');
        (!trimmed.is_empty()).then(|| Value(trimmed.to_owned()))
    }

    /// The trimmed text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value's hash under the contract above.
    pub fn hash(&self) -> ValueHash {
        ValueHash(hex::encode(Sha256::digest(self.0.as_bytes())))
    }
}

/// A lowercase hex SHA-256 value hash (64 characters).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueHash(String);

impl ValueHash {
    /// Wraps a hash read back from the database, checking its shape.
    pub fn from_hex(hex: &str) -> Option<ValueHash> {
        let ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| ValueHash(hex.to_owned()))
    }

    /// The 64 hex characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ValueHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ValueHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ValueHash({})", &self.0[..12.min(self.0.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};

    fn check(raw: &str, expect: Expect) {
        let actual = match Value::normalize(raw) {
            Some(v) => format!("{:?} {}", v.as_str(), v.hash()),
            None => "skipped".to_owned(),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn contract() {
        check("hello", expect![[r#""hello" 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"#]]);
        check("  hello ", expect![[r#""hello" 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"#]]);
        check("", expect!["skipped"]);
        check("   ", expect!["skipped"]);
        check("\tx\n", expect![[r#""\tx\n" 067892f9103fd1565ad3f1792b3fcd6780f4a70adcbec69499b4833a97c72361"#]]);
        check(r"C:\temp\new", expect![[r#""C:\\temp\\new" c1f193e9081d571ecfc3f770c931bc07e31dd4a1872a4d54ce93e3509e0fb2af"#]]);
        check("日本語 😀", expect![[r#""日本語 😀" fde211ca1a740f4758ae554eb97eca48c2aa74cdf8b656adfa31266d72b6106c"#]]);
    }

    #[test]
    fn from_hex_checks_shape() {
        let h = Value::normalize("x").unwrap().hash();
        assert_eq!(ValueHash::from_hex(h.as_str()), Some(h.clone()));
        assert_eq!(ValueHash::from_hex(&h.as_str().to_uppercase()), None);
        assert_eq!(ValueHash::from_hex("abc"), None);
    }
}
