//! Vector encodings: the provider's base64 little-endian float32 and pgvector's binary format.
//!
//! pgvector's binary wire format for `vector` is an int16 dimension count, an int16 zero, then
//! the float4 values, all in network byte order. A [`Vector`] holds exactly those bytes, so a
//! decoded embedding is bound as a query parameter with one copy and no per-value work.
//!
//! The base64 path is the hot one (a 3072-d embedding is 16 KiB of text): it decodes with
//! `base64-simd` (AVX2/SSE4.1 found at run time natively; wasm `simd128` when the worker is built
//! with it) straight into the vector's buffer, then turns each little-endian float into network
//! order and checks it is finite in one pass over data that is still in cache.

use base64::Engine as _;
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

    /// Decodes OpenAI's `encoding_format: "base64"`: little-endian float32 values.
    ///
    /// # Errors
    /// [`VectorDecodeError`] on bad base64, a length that is not a multiple of 4, too many
    /// values, or a value that is not finite.
    pub fn from_base64_f32(text: &str) -> Result<Vector, VectorDecodeError> {
        let src = text.as_bytes();
        let engine = base64_simd::STANDARD;
        let len = engine.decoded_length(src).map_err(|_| base64_error(src))?;
        if len % 4 != 0 {
            return Err(VectorDecodeError::Length(len));
        }
        let mut bytes = header(len / 4)?;
        // Appends into the reserved capacity: no zero-fill of the 12 KiB first.
        engine.decode_append(src, &mut bytes).map_err(|_| base64_error(src))?;
        debug_assert_eq!(bytes.len(), 4 + len);
        let (words, rest) = bytes[4..].as_chunks_mut::<4>();
        debug_assert!(rest.is_empty());
        let bad = swap::le_to_be_checking_finite(words);
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
        let ok = dims <= Self::MAX_DIMS && bytes[2..4.min(bytes.len())] == [0, 0] && bytes.len() == 4 + dims * 4;
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

/// Little-endian float32 words to network order in place, in one pass that also notes whether
/// any is NaN or infinite. LLVM does not vectorise the plain loop (x86-64's baseline SSE2 has no
/// byte shuffle), so the hot targets get explicit SIMD: AVX2 when the CPU has it (checked once
/// at run time), wasm `simd128` when the worker is built with it. Everything else, and the
/// tails, take the scalar loop; a test checks every path against it.
mod swap {
    use super::EXPONENT;

    /// Swaps every word to big-endian; returns whether any was NaN or infinite.
    pub fn le_to_be_checking_finite(words: &mut [[u8; 4]]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { avx2(words) };
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            return simd128(words);
        }
        #[allow(unreachable_code)]
        scalar(words)
    }

    pub(super) fn scalar(words: &mut [[u8; 4]]) -> bool {
        let mut bad = false;
        for w in words {
            let x = u32::from_le_bytes(*w);
            bad |= x & EXPONENT == EXPONENT;
            *w = x.to_be_bytes();
        }
        bad
    }

    /// Reverses the bytes of each 32-bit lane.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    const SHUFFLE: [u8; 16] = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12];

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(super) fn avx2(words: &mut [[u8; 4]]) -> bool {
        use std::arch::x86_64::*;
        let (blocks, rest) = words.as_chunks_mut::<8>();
        let shuffle = _mm256_broadcastsi128_si256(_mm_setr_epi8(3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12));
        let exponent = _mm256_set1_epi32(EXPONENT as i32);
        let mut bad = _mm256_setzero_si256();
        for block in blocks {
            let p = block.as_mut_ptr().cast::<__m256i>();
            // SAFETY: `block` is 32 initialised bytes we hold exclusively; unaligned load/store.
            let v = unsafe { _mm256_loadu_si256(p) };
            // x86 is little-endian: each lane holds the float's bits as they are.
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(v, exponent), exponent));
            // SAFETY: as above.
            unsafe { _mm256_storeu_si256(p, _mm256_shuffle_epi8(v, shuffle)) };
        }
        scalar(rest) | (_mm256_movemask_epi8(bad) != 0)
    }

    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    pub(super) fn simd128(words: &mut [[u8; 4]]) -> bool {
        use std::arch::wasm32::*;
        let (blocks, rest) = words.as_chunks_mut::<4>();
        let shuffle = u8x16(
            SHUFFLE[0],
            SHUFFLE[1],
            SHUFFLE[2],
            SHUFFLE[3],
            SHUFFLE[4],
            SHUFFLE[5],
            SHUFFLE[6],
            SHUFFLE[7],
            SHUFFLE[8],
            SHUFFLE[9],
            SHUFFLE[10],
            SHUFFLE[11],
            SHUFFLE[12],
            SHUFFLE[13],
            SHUFFLE[14],
            SHUFFLE[15],
        );
        let exponent = u32x4_splat(EXPONENT);
        let mut bad = u32x4_splat(0);
        for block in blocks {
            let p = block.as_mut_ptr().cast::<v128>();
            // SAFETY: `block` is 16 initialised bytes we hold exclusively; wasm loads and stores
            // need no alignment.
            let v = unsafe { v128_load(p) };
            // wasm is little-endian: each lane holds the float's bits as they are.
            bad = v128_or(bad, u32x4_eq(v128_and(v, exponent), exponent));
            // SAFETY: as above.
            unsafe { v128_store(p, i8x16_swizzle(v, shuffle)) };
        }
        scalar(rest) | v128_any_true(bad)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Words covering whole SIMD blocks and tails, with a NaN or infinity at `bad`.
        fn words(n: usize, bad: Option<usize>) -> Vec<[u8; 4]> {
            (0..n).map(|i| if Some(i) == bad { [0, 0, 0xc0, 0x7f] } else { ((i as f32 - 7.5) / 3.0).to_le_bytes() }).collect()
        }

        #[test]
        fn every_path_agrees_with_the_scalar_loop() {
            for n in 0..40 {
                for bad in std::iter::once(None).chain((0..n).map(Some)) {
                    let mut expected = words(n, bad);
                    let expected_bad = scalar(&mut expected);
                    assert_eq!(expected_bad, bad.is_some());
                    let mut w = words(n, bad);
                    assert_eq!(le_to_be_checking_finite(&mut w), expected_bad, "{n} words, bad at {bad:?}");
                    assert_eq!(w, expected, "{n} words");
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        let mut w = words(n, bad);
                        // SAFETY: the CPU supports AVX2.
                        assert_eq!(unsafe { avx2(&mut w) }, expected_bad, "avx2, {n} words, bad at {bad:?}");
                        assert_eq!(w, expected, "avx2, {n} words");
                    }
                }
            }
        }
    }
}

/// A buffer holding pgvector's 4-byte header for `dims` values.
fn header(dims: usize) -> Result<Vec<u8>, VectorDecodeError> {
    if dims > Vector::MAX_DIMS {
        return Err(VectorDecodeError::TooLong(dims));
    }
    let mut bytes = Vec::with_capacity(4 + dims * 4);
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
