//! Vector encodings: the provider's base64 little-endian float32 and pgvector's binary format.
//!
//! pgvector's binary wire format for `vector` is an int16 dimension count, an int16 zero, then
//! the float4 values, all in network byte order. A [`Vector`] holds exactly those bytes, so a
//! decoded embedding is bound as a query parameter with one copy and no per-value work.
//!
//! The base64 path is the hot one (a 3072-d embedding is 16 KiB of text): a SIMD kernel
//! (`kernel.rs`: AVX2 natively, wasm `simd128` in the worker) decodes it straight into network
//! order floats in the vector's buffer, checking on the way that every value is finite.

use base64::Engine as _;

mod kernel;
use std::fmt;

/// Why an embedding could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VectorDecodeError {
    /// Not valid base64.
    #[error("embedding is not valid base64: {0}")]
    Base64(String),
    /// The byte count is not a whole number of float32 values.
    #[error("embedding has {0} bytes, not a multiple of 4")]
    Length(usize),
    /// A value is NaN or infinite, which pgvector rejects.
    #[error("embedding value {index} is not finite")]
    NotFinite {
        /// The position of the bad value.
        index: usize,
    },
    /// More values than pgvector stores.
    #[error("embedding has {0} dimensions; pgvector stores at most 16000")]
    TooLong(usize),
}

/// An embedding in pgvector's binary format: what is bound for a `vector` parameter.
#[derive(Clone, PartialEq, Eq)]
pub struct Vector {
    /// Header (dimensions, zero) and big-endian float32 values; always well formed.
    bytes: Vec<u8>,
}

impl Vector {
    /// The most dimensions a pgvector `vector` holds.
    pub const MAX_DIMS: usize = 16_000;

    /// A vector of `values`.
    ///
    /// # Errors
    /// [`VectorDecodeError::NotFinite`] or [`VectorDecodeError::TooLong`]: pgvector would refuse it.
    pub fn from_f32(values: &[f32]) -> Result<Vector, VectorDecodeError> {
        let mut bytes = header(values.len())?;
        bytes.resize(4 + values.len() * 4, 0);
        let (words, _) = bytes[4..].as_chunks_mut::<4>();
        for (w, v) in words.iter_mut().zip(values) {
            *w = v.to_be_bytes();
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(VectorDecodeError::NotFinite { index });
        }
        Ok(Vector { bytes })
    }

    /// Decodes OpenAI's `encoding_format: "base64"`: little-endian float32 values. Takes bytes
    /// so that a JSON scanner can pass a string it has not checked: every byte outside the
    /// base64 alphabet is refused here.
    ///
    /// # Errors
    /// [`VectorDecodeError`] on bad base64, a length that is not a multiple of 4, too many
    /// values, or a value that is not finite.
    pub fn from_base64_f32(text: impl AsRef<[u8]>) -> Result<Vector, VectorDecodeError> {
        let src = text.as_ref();
        let len = decoded_len(src).ok_or_else(|| base64_error(src))?;
        if len % 4 != 0 {
            return Err(VectorDecodeError::Length(len));
        }
        let mut bytes = header(len / 4)?;
        let (done, mut bad) = kernel::decode_blocks(src, &mut bytes);
        // The rest (the padded end, or everything without SIMD) through the reference decoder.
        let tail = base64::engine::general_purpose::STANDARD.decode(&src[done..]).map_err(|_| base64_error(src))?;
        for c in tail.as_chunks::<4>().0 {
            let x = u32::from_le_bytes(*c);
            bad |= x & EXPONENT == EXPONENT;
            bytes.extend_from_slice(&x.to_be_bytes());
        }
        if bytes.len() != 4 + len {
            return Err(base64_error(src));
        }
        let vector = Vector { bytes };
        if bad {
            let index = vector.iter().position(|v| !v.is_finite()).expect("a value was not finite");
            return Err(VectorDecodeError::NotFinite { index });
        }
        Ok(vector)
    }

    /// Reads pgvector's binary format; `None` when `bytes` is not a well-formed vector.
    pub fn from_pgvector_binary(bytes: &[u8]) -> Option<Vector> {
        let dims = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]) as usize;
        let ok = dims <= Self::MAX_DIMS && bytes.get(2..4) == Some(&[0, 0][..]) && bytes.len() == 4 + dims * 4;
        ok.then(|| Vector { bytes: bytes.to_vec() })
    }

    /// The number of values.
    pub fn dims(&self) -> usize {
        (self.bytes.len() - 4) / 4
    }

    /// The bytes to bind for a `vector` parameter.
    pub fn as_pgvector_binary(&self) -> &[u8] {
        &self.bytes
    }

    /// The values, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.bytes[4..].chunks_exact(4).map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// The values as floats.
    pub fn to_f32(&self) -> Vec<f32> {
        self.iter().collect()
    }
}

impl fmt::Debug for Vector {
    /// The dimension count and the first values: a 3072-d vector is not worth printing whole.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vector({} dims: [", self.dims())?;
        for (i, v) in self.iter().take(4).enumerate() {
            write!(f, "{}{v}", if i > 0 { ", " } else { "" })?;
        }
        f.write_str(if self.dims() > 4 { ", ...])" } else { "])" })
    }
}

/// The exponent bits of a float32: all set for NaN and the infinities.
const EXPONENT: u32 = 0x7f80_0000;

/// The byte count of strict, padded base64 text; `None` when its length cannot be base64.
fn decoded_len(src: &[u8]) -> Option<usize> {
    if src.len() % 4 != 0 {
        return None;
    }
    let padding = src.iter().rev().take(2).take_while(|&&c| c == b'=').count();
    Some(src.len() / 4 * 3 - padding)
}

/// A buffer holding pgvector's 4-byte header for `dims` values.
fn header(dims: usize) -> Result<Vec<u8>, VectorDecodeError> {
    if dims > Vector::MAX_DIMS {
        return Err(VectorDecodeError::TooLong(dims));
    }
    // The SIMD kernel's stores write up to 8 bytes past the last value: room for them, so that
    // it never reallocates.
    let mut bytes = Vec::with_capacity(4 + dims * 4 + kernel::STORE_SLACK);
    bytes.extend_from_slice(&(dims as u16).to_be_bytes());
    bytes.extend_from_slice(&[0, 0]);
    Ok(bytes)
}

/// The error for text the fast decoder refused, with the `base64` crate's precise message.
#[cold]
fn base64_error(src: &[u8]) -> VectorDecodeError {
    match base64::engine::general_purpose::STANDARD.decode(src) {
        Err(e) => VectorDecodeError::Base64(e.to_string()),
        // Both decoders are strict RFC 4648 with padding; should they ever disagree, say so.
        Ok(_) => VectorDecodeError::Base64("rejected by the fast decoder".to_owned()),
    }
}

/// Encodes a vector as OpenAI's base64 (little-endian float32); the inverse of
/// [`Vector::from_base64_f32`], used by tests and benchmarks.
pub fn encode_base64_f32(values: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<Vec<f32>, VectorDecodeError> {
        Vector::from_base64_f32(text).map(|v| v.to_f32())
    }

    #[test]
    fn base64_round_trip() {
        let v = vec![0.5f32, -1.25, 3.0e-7, 0.0];
        assert_eq!(decode(&encode_base64_f32(&v)), Ok(v));
        // 0.5f32 little-endian is 00 00 00 3f.
        assert_eq!(encode_base64_f32(&[0.5]), "AAAAPw==");
    }

    #[test]
    fn base64_agrees_with_the_reference_decoder_at_every_length() {
        // Lengths around the SIMD blocks (16, 24 and 32 bytes of text), and odd values.
        for n in (0..=70).chain([1535, 1536, 3072]) {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7319 - 3.0) / (1.0 + i as f32)).collect();
            let text = encode_base64_f32(&v);
            let reference: Vec<f32> = base64::engine::general_purpose::STANDARD
                .decode(&text)
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(decode(&text), Ok(reference), "{n} values");
            assert_eq!(decode(&text), Ok(v), "{n} values");
        }
    }

    #[test]
    fn base64_errors() {
        assert_eq!(decode("AAAA"), Err(VectorDecodeError::Length(3)));
        expect_test::expect![[r#"Err(Base64("Invalid symbol 33, offset 0."))"#]].assert_eq(&format!("{:?}", decode("!!")));
        assert_eq!(decode(&encode_base64_f32(&[1.0, f32::NAN])), Err(VectorDecodeError::NotFinite { index: 1 }));
        assert_eq!(decode(&encode_base64_f32(&[1.0, 2.0, 3.0, f32::NEG_INFINITY])), Err(VectorDecodeError::NotFinite { index: 3 }));
        // A bad character deep inside a long vector, where the SIMD blocks run.
        let mut text = encode_base64_f32(&[1.0; 3072]);
        text.replace_range(5000..5001, "*");
        expect_test::expect![[r#"Err(Base64("Invalid symbol 42, offset 5000."))"#]].assert_eq(&format!("{:?}", decode(&text)));
        // Missing padding and a JSON escape that was not undone are refused, not misread.
        assert!(decode("AAAAPw").is_err());
        assert!(decode("AAAAPw\\u003d\\u003d").is_err());
        let too_long = encode_base64_f32(&vec![0.0; Vector::MAX_DIMS + 1]);
        assert_eq!(decode(&too_long), Err(VectorDecodeError::TooLong(Vector::MAX_DIMS + 1)));
    }

    #[test]
    fn pgvector_binary() {
        let v = Vector::from_f32(&[1.0, -2.0]).unwrap();
        assert_eq!(v.as_pgvector_binary(), [0, 2, 0, 0, 0x3f, 0x80, 0, 0, 0xc0, 0, 0, 0]);
        assert_eq!(v.dims(), 2);
        assert_eq!(Vector::from_pgvector_binary(v.as_pgvector_binary()), Some(v.clone()));
        assert_eq!(Vector::from_pgvector_binary(&v.as_pgvector_binary()[..7]), None);
        assert_eq!(Vector::from_pgvector_binary(&[0, 1, 0, 1, 0, 0, 0, 0]), None);
        assert_eq!(Vector::from_f32(&[0.0, f32::INFINITY]), Err(VectorDecodeError::NotFinite { index: 1 }));
        // The base64 path produces exactly the bytes of the float path.
        let values = [0.25f32, -0.0, 1e-38, -3.5];
        assert_eq!(Vector::from_base64_f32(&encode_base64_f32(&values)), Vector::from_f32(&values));
        assert_eq!(format!("{v:?}"), "Vector(2 dims: [1, -2])");
    }
}
