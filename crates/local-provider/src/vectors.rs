//! Deterministic pseudo-random embedding vectors and their wire encodings.
//!
//! For a `(model, input)` pair the full-size vector is derived as follows:
//!
//! 1. `digest = SHA-256(model + "\n" + input)`;
//! 2. the four little-endian `u64` words of the digest are XOR-ed into the seed
//!    of a [SplitMix64] generator;
//! 3. each component is drawn as a uniform value in `[-1, 1)` (53 random bits);
//! 4. the vector is scaled to unit L2 length (computed in `f64`, stored as `f32`).
//!
//! Asking for `d` dimensions gives the first `d` components of the raw vector,
//! normalised: the same direction as truncating the full unit vector and
//! renormalising it, which is what OpenAI does for the `dimensions` parameter.
//!
//! [SplitMix64]: https://prng.di.unimi.it/splitmix64.c

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The SplitMix64 generator: tiny, fast and good enough for test vectors.
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `[-1, 1)`.
    fn next_signed_unit(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        (self.next_u64() >> 11) as f64 * SCALE * 2.0 - 1.0
    }
}

/// The generator seed for a `(model, input)` pair.
fn seed(model: &str, input: &str) -> u64 {
    let digest = Sha256::new().chain_update(model.as_bytes()).chain_update(b"\n").chain_update(input.as_bytes()).finalize();
    digest.chunks_exact(8).fold(0u64, |acc, chunk| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        acc ^ u64::from_le_bytes(word)
    })
}

/// The embedding of `input` under `model`, with `dimensions` components and
/// unit L2 length. `dimensions` is the model's native size for a full vector.
pub fn embedding(model: &str, input: &str, dimensions: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed(model, input));
    let raw: Vec<f64> = (0..dimensions).map(|_| rng.next_signed_unit()).collect();
    normalize(&raw)
}

/// Scales `values` to unit L2 length (a zero vector is returned unchanged).
pub fn normalize(values: &[f64]) -> Vec<f32> {
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 1.0 };
    values.iter().map(|v| (v * scale) as f32).collect()
}

/// The L2 length of a vector (used by tests and sanity checks).
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

/// Encodes a vector as OpenAI does for `encoding_format: "base64"`: standard
/// base64 (with padding) of the little-endian `f32` bytes.
pub fn encode_base64(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    STANDARD.encode(bytes)
}

/// Decodes [`encode_base64`] output; `None` if it is not valid base64 or its
/// length is not a multiple of four bytes.
pub fn decode_base64(text: &str) -> Option<Vec<f32>> {
    let bytes = STANDARD.decode(text).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "text-embedding-3-small";

    #[test]
    fn deterministic_per_model_and_input() {
        let a = embedding(MODEL, "hello", 1536);
        assert_eq!(a, embedding(MODEL, "hello", 1536));
        assert_ne!(a, embedding(MODEL, "hello ", 1536));
        assert_ne!(a, embedding("text-embedding-3-large", "hello", 1536));
        // Pin the derivation so an accidental change is noticed: vectors stored
        // by earlier runs (for example in a demo database) must stay valid.
        // The expected values were computed independently (Python, hashlib).
        assert_eq!(seed(MODEL, "pin"), 0xd436_fff3_3f25_c9d0);
        let expected = [-0.757_032_096_385_955_8_f64, 0.647_204_995_155_334_5, -0.089_599_899_947_643_28];
        let expected: Vec<f32> = expected.iter().map(|&v| v as f32).collect();
        assert_eq!(embedding(MODEL, "pin", 3), expected);
    }

    #[test]
    fn vectors_have_unit_length_and_bounded_values() {
        for (input, dims) in [("a", 3072), ("b", 1536), ("c", 256), ("d", 1)] {
            let v = embedding(MODEL, input, dims);
            assert_eq!(v.len(), dims);
            assert!((l2_norm(&v) - 1.0).abs() < 1e-5, "norm of {input}");
            assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn dimensions_truncate_and_renormalise() {
        let full = embedding(MODEL, "truncate me", 1536);
        let short = embedding(MODEL, "truncate me", 256);
        let prefix: Vec<f64> = full[..256].iter().map(|&v| f64::from(v)).collect();
        let renormalised = normalize(&prefix);
        for (a, b) in short.iter().zip(&renormalised) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Same direction: cosine similarity with the full vector's prefix is 1.
        let dot: f64 = short.iter().zip(&full).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        let prefix_norm = l2_norm(&full[..256]);
        assert!((dot / prefix_norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn base64_is_little_endian_f32_and_round_trips() {
        assert_eq!(encode_base64(&[1.0]), "AACAPw==");
        assert_eq!(encode_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
        let v = embedding(MODEL, "round trip", 1536);
        assert_eq!(decode_base64(&encode_base64(&v)), Some(v));
        assert_eq!(decode_base64("AACA"), None);
        assert_eq!(decode_base64("not base64!"), None);
    }

    #[test]
    fn zero_vector_stays_zero() {
        assert_eq!(normalize(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
