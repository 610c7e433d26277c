//! The fast path for the usual 200 body: base64 embeddings, no string escapes.
//!
//! A 100-item answer of 3072-d embeddings is 1.6 MB of base64 text. `serde_json` reads a string
//! byte by byte (escapes, control characters, then UTF-8 validation) before our visitor sees it,
//! which cost more than decoding it. This scanner finds each string's end with `memchr` (SIMD)
//! and hands embedding strings straight to [`Vector::from_base64_f32`], whose alphabet check
//! validates every byte anyway.
//!
//! It is only a fast path: it answers `Some` only for bodies that the `serde_json` path accepts
//! with the same result, and `None` for anything else (escapes, float arrays, duplicate keys,
//! exponents, bad base64, any syntax error), which then takes the `serde_json` path and gets its
//! error messages. The differential tests in `provider.rs` hold it to that.

use super::Parsed;
use crate::vector::Vector;

/// Deeper nesting than this takes the slow path (`serde_json` stops at 128).
const MAX_DEPTH: usize = 64;

/// Reads a 200 body; `None` when it is not the simple shape (see the module docs).
pub(super) fn parse(body: &[u8]) -> Option<Parsed> {
    let mut s = Scan { b: body, i: 0 };
    let mut data = None;
    let mut usage = None;
    s.object(0, |s, key| {
        match key {
            b"data" if data.is_none() => data = Some(s.items()?),
            b"usage" if usage.is_none() => usage = Some(s.usage()?),
            b"data" | b"usage" => return None,
            _ => s.skip_value(1)?,
        }
        Some(())
    })?;
    s.ws();
    if s.i != body.len() {
        return None;
    }
    Some(Parsed { items: data?.into_iter().map(|(i, v)| (i, Ok(v))).collect(), prompt_tokens: usage.flatten().unwrap_or(0) })
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    /// `data`: an array of `{"index": n, "embedding": "base64"}` objects, other keys ignored.
    fn items(&mut self) -> Option<Vec<(usize, Vector)>> {
        let mut items = Vec::new();
        self.array(1, |s| {
            let mut index = None;
            let mut embedding = None;
            s.object(2, |s, key| {
                match key {
                    b"index" if index.is_none() => index = Some(usize::try_from(s.uint()?).ok()?),
                    // Not validated as text: the decoder refuses every byte outside base64.
                    b"embedding" if embedding.is_none() => embedding = Some(Vector::from_base64_f32(s.raw_string()?).ok()?),
                    b"index" | b"embedding" => return None,
                    _ => s.skip_value(3)?,
                }
                Some(())
            })?;
            items.push((index?, embedding?));
            Some(())
        })?;
        Some(items)
    }

    /// `usage`: `null`, or an object whose `prompt_tokens` (default 0) is read.
    fn usage(&mut self) -> Option<Option<u64>> {
        if self.literal(b"null") {
            return Some(None);
        }
        let mut tokens = None;
        self.object(1, |s, key| {
            match key {
                b"prompt_tokens" if tokens.is_none() => tokens = Some(s.uint()?),
                b"prompt_tokens" => return None,
                _ => s.skip_value(2)?,
            }
            Some(())
        })?;
        Some(Some(tokens.unwrap_or(0)))
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        self.ws();
        let hit = self.b[self.i..].starts_with(word);
        self.i += if hit { word.len() } else { 0 };
        hit
    }

    /// The bytes of a string without escapes; `None` at a backslash (the slow path unescapes).
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let rest = &self.b[self.i..];
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] != b'"' {
            return None;
        }
        self.i += end + 1;
        Some(&rest[..end])
    }

    /// A string JSON allows: UTF-8 without control characters (keys and skipped values: short).
    fn string(&mut self) -> Option<&'a [u8]> {
        let s = self.raw_string()?;
        (std::str::from_utf8(s).is_ok() && !s.iter().any(|&c| c < 0x20)).then_some(s)
    }

    /// A non-negative integer without fraction or exponent (what `usize`/`u64` fields take).
    fn uint(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let digits = self.digits();
        let text = &self.b[start..self.i];
        if digits == 0 || (digits > 1 && text[0] == b'0') || matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        text.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
    }

    /// Any JSON value, checked as strictly as `serde_json` does; numbers with an exponent or
    /// more than 18 digits go to the slow path (its range rules are its own).
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth, |s, _| s.skip_value(depth + 1)),
            b'[' => self.array(depth, |s| s.skip_value(depth + 1)),
            b't' => self.literal(b"true").then_some(()),
            b'f' => self.literal(b"false").then_some(()),
            b'n' => self.literal(b"null").then_some(()),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// `-? (0 | [1-9][0-9]*) (.[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        let start = self.i;
        self.i += usize::from(self.b.get(self.i) == Some(&b'-'));
        let int = self.digits();
        if int == 0 || (int > 1 && self.b[self.i - int] == b'0') {
            return None;
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        let ok = !matches!(self.b.get(self.i), Some(b'e' | b'E')) && self.i - start <= 18;
        ok.then_some(())
    }

    fn digits(&mut self) -> usize {
        let n = self.b[self.i..].iter().take_while(|c| c.is_ascii_digit()).count();
        self.i += n;
        n
    }

    /// `{ "key": value, ... }`; `member` reads each value after its key.
    fn object(&mut self, depth: usize, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        if depth > MAX_DEPTH || !self.eat(b'{') {
            return None;
        }
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            member(self, key)?;
            if self.eat(b'}') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// `[ value, ... ]`; `element` reads each value.
    fn array(&mut self, depth: usize, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if depth > MAX_DEPTH || !self.eat(b'[') {
            return None;
        }
        if self.eat(b']') {
            return Some(());
        }
        loop {
            element(self)?;
            if self.eat(b']') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }
}
