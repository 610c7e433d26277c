//! Vector encodings: the provider's base64 little-endian float32 and pgvector's binary format.
//!
//! pgvector's binary wire format for `vector` is an int16 dimension count, an int16 zero, then
//! the float4 values, all in network byte order.

use base64::Engine as _;

/// Why a base64 embedding could not be read.
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
}

/// Decodes OpenAI's `encoding_format: "base64"`: little-endian float32 values.
///
/// Whole blocks of 16 characters (12 bytes, 3 values) are decoded straight into floats with a
/// lookup table; the short tail, and any text the fast path does not take (padding inside,
/// characters outside the alphabet), goes through the `base64` crate, which also produces the
/// error message.
///
/// # Errors
/// [`VectorDecodeError`] on bad base64, a length that is not a multiple of 4, or a non-finite value.
pub fn decode_base64_f32(text: &str) -> Result<Vec<f32>, VectorDecodeError> {
    let bytes = text.as_bytes();
    let blocks = bytes.len().saturating_sub(4) / 16;
    let mut values: Vec<f32> = Vec::with_capacity(bytes.len() / 4 * 3 / 4 + 1);
    let mut done = 0;
    // Each 16-character block is four 24-bit groups: 12 bytes, 3 little-endian floats.
    for block in bytes[..blocks * 16].chunks_exact(16) {
        let block: &[u8; 16] = block.try_into().expect("chunks_exact(16)");
        let mut n = [0u32; 4];
        let mut bad = 0u8;
        for (q, out) in n.iter_mut().enumerate() {
            let (a, b, c, d) =
                (DECODE[block[4 * q] as usize], DECODE[block[4 * q + 1] as usize], DECODE[block[4 * q + 2] as usize], DECODE[block[4 * q + 3] as usize]);
            bad |= a | b | c | d;
            *out = (u32::from(a) << 18) | (u32::from(b) << 12) | (u32::from(c) << 6) | u32::from(d);
        }
        if bad & 0x80 != 0 {
            break;
        }
        // 96 bits, big-endian per group, reassembled into three little-endian words.
        let w0 = (n[0] << 8) | (n[1] >> 16);
        let w1 = (n[1] << 16) | (n[2] >> 8);
        let w2 = (n[2] << 24) | n[3];
        values.extend([f32::from_bits(w0.swap_bytes()), f32::from_bits(w1.swap_bytes()), f32::from_bits(w2.swap_bytes())]);
        done += 16;
    }
    let tail = base64::engine::general_purpose::STANDARD.decode(&bytes[done..]).map_err(|e| VectorDecodeError::Base64(e.to_string()))?;
    if tail.len() % 4 != 0 {
        return Err(VectorDecodeError::Length(done / 4 * 3 + tail.len()));
    }
    values.extend(tail.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    check_finite(&values)?;
    Ok(values)
}

/// The standard base64 alphabet's values; 0xff marks bytes outside it.
const DECODE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut i = 0;
    while i < 64 {
        t[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Checks that every value is finite, as pgvector requires.
///
/// # Errors
/// [`VectorDecodeError::NotFinite`] naming the first bad value.
pub fn check_finite(values: &[f32]) -> Result<(), VectorDecodeError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(VectorDecodeError::NotFinite { index }),
        None => Ok(()),
    }
}

/// Encodes a vector as OpenAI's base64 (little-endian float32); the inverse of
/// [`decode_base64_f32`], used by tests and benchmarks.
pub fn encode_base64_f32(values: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Appends `values` in pgvector's binary format to `out`.
///
/// # Panics
/// Never for vectors pgvector can store (at most 16,000 dimensions); longer input is a bug.
pub fn encode_pgvector(values: &[f32], out: &mut Vec<u8>) {
    let dims = i16::try_from(values.len()).expect("pgvector stores at most 16000 dimensions");
    let start = out.len();
    out.resize(start + 4 + values.len() * 4, 0);
    let buf = &mut out[start..];
    buf[..2].copy_from_slice(&dims.to_be_bytes());
    for (chunk, v) in buf[4..].chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
}

/// Reads pgvector's binary format, the inverse of [`encode_pgvector`].
pub fn decode_pgvector(bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.len() < 4 {
        return None;
    }
    let dims = i16::from_be_bytes([bytes[0], bytes[1]]);
    let body = &bytes[4..];
    if dims < 0 || body.len() != dims as usize * 4 {
        return None;
    }
    Some(body.chunks_exact(4).map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        let v = vec![0.5f32, -1.25, 3.0e-7, 0.0];
        assert_eq!(decode_base64_f32(&encode_base64_f32(&v)), Ok(v));
        // 0.5f32 little-endian is 00 00 00 3f.
        assert_eq!(encode_base64_f32(&[0.5]), "AAAAPw==");
    }

    #[test]
    fn base64_fast_path_agrees_with_the_reference_decoder() {
        // Lengths around the 16-character blocks, and odd values, decode exactly.
        for n in [0usize, 1, 2, 3, 4, 5, 11, 12, 13, 1536] {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7319 - 3.0) / (1.0 + i as f32)).collect();
            assert_eq!(decode_base64_f32(&encode_base64_f32(&v)), Ok(v), "{n} values");
        }
        // A bad character inside the fast blocks falls back to the reference decoder's error.
        let mut text = encode_base64_f32(&[1.0; 12]);
        text.replace_range(5..6, "*");
        assert!(matches!(decode_base64_f32(&text), Err(VectorDecodeError::Base64(_))), "{:?}", decode_base64_f32(&text));
    }

    #[test]
    fn base64_errors() {
        assert_eq!(decode_base64_f32("AAAA"), Err(VectorDecodeError::Length(3)));
        assert!(matches!(decode_base64_f32("!!"), Err(VectorDecodeError::Base64(_))));
        assert_eq!(decode_base64_f32(&encode_base64_f32(&[1.0, f32::NAN])), Err(VectorDecodeError::NotFinite { index: 1 }));
    }

    #[test]
    fn pgvector_binary() {
        let mut out = Vec::new();
        encode_pgvector(&[1.0, -2.0], &mut out);
        assert_eq!(out, [0, 2, 0, 0, 0x3f, 0x80, 0, 0, 0xc0, 0, 0, 0]);
        assert_eq!(decode_pgvector(&out), Some(vec![1.0, -2.0]));
        assert_eq!(decode_pgvector(&out[..7]), None);
    }
}
