//! The hot loop: base64 text of little-endian float32 straight to big-endian float32 bytes,
//! checking on the way that every value is finite.
//!
//! Each 16 characters are 12 bytes, exactly three floats, so one SIMD step decodes whole
//! floats: the ASCII-to-6-bit lookup and validation of Muła and Lemire ("Faster Base64 Encoding
//! and Decoding using AVX2 Instructions", 2018), then a byte shuffle that packs the 24-bit
//! groups and puts each float in network order at once. The finite check looks at the exponent
//! bits of the packed floats. AVX2 is used when the CPU has it (checked once per call, natively);
//! wasm `simd128` when the worker is built with it (`.cargo/config.toml`). The kernels stop at
//! the first block that is not plain base64 (the padding, a bad character) and leave the rest to
//! the caller's scalar tail; a test checks them against the reference decoder at every length
//! and with every byte value at every position.

/// How many bytes past the last decoded value a kernel's stores may write: output buffers with
/// this much spare capacity are never reallocated.
pub(super) const STORE_SLACK: usize = 8;

/// Decodes whole blocks of `src` from its start, appending network-order floats to `out`.
/// Returns the characters consumed (a multiple of 16) and whether any value was NaN or infinite.
pub(super) fn decode_blocks(src: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(src, out) };
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        return simd128(src, out);
    }
    #[allow(unreachable_code)]
    (0, false)
}

/// Per low nibble: the classes of characters with that low nibble that are NOT base64.
const LUT_LO: [u8; 16] = [0x15, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x13, 0x1a, 0x1b, 0x1b, 0x1b, 0x1a];
/// Per high nibble: its class bit; a byte is invalid when its two lookups share a bit.
const LUT_HI: [u8; 16] = [0x10, 0x10, 0x01, 0x02, 0x04, 0x08, 0x04, 0x08, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10];
/// Per high nibble (minus one for '/'): what to add to the ASCII code to get the 6-bit value.
const LUT_ROLL: [i8; 16] = [0, 16, 19, 4, -65, -65, -71, -71, 0, 0, 0, 0, 0, 0, 0, 0];
/// After packing, each 32-bit lane holds one 24-bit group, first byte highest; this gathers the
/// 12 bytes of a 16-character block as three floats in network order (bytes 12..16 are zero).
/// A group's bytes are at lane offsets 2, 1, 0; the stream is 2 1 0 6 5 4 10 9 8 14 13 12, and
/// each float of it reversed is: 6 0 1 2 | 9 10 4 5 | 12 13 14 8.
const TO_BE_FLOATS: [u8; 16] = [6, 0, 1, 2, 9, 10, 4, 5, 12, 13, 14, 8, 0x80, 0x80, 0x80, 0x80];
/// The exponent bits of a network-order float, seen as a little-endian lane: all set for NaN
/// and the infinities.
const BE_EXPONENT: u32 = 0x0000_807f;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2(src: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    use std::arch::x86_64::*;
    let twice = |t: [u8; 16]| {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&t);
        b[16..].copy_from_slice(&t);
        // SAFETY: `b` is 32 readable bytes.
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    };
    let lut_lo = twice(LUT_LO);
    let lut_hi = twice(LUT_HI);
    let lut_roll = twice(LUT_ROLL.map(|v| v as u8));
    let to_be = twice(TO_BE_FLOATS);
    let mask_2f = _mm256_set1_epi8(0x2f);
    let exponent = _mm256_set1_epi32(BE_EXPONENT as i32);
    // Lanes 0-2 and 4-6 of the packed vector, in order: 24 bytes.
    let gather = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7);

    let blocks = src.len() / 32;
    // Each store writes 32 bytes of which 24 are kept: room for the last one's extra 8.
    out.reserve(blocks * 24 + STORE_SLACK);
    let start = out.len();
    let mut bad = _mm256_setzero_si256();
    let mut done = 0;
    for block in src.chunks_exact(32) {
        // SAFETY: `block` is 32 readable bytes.
        let x = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
        let hi_nibbles = _mm256_and_si256(_mm256_srli_epi32(x, 4), mask_2f);
        let lo_nibbles = _mm256_and_si256(x, mask_2f);
        let lo = _mm256_shuffle_epi8(lut_lo, lo_nibbles);
        let hi = _mm256_shuffle_epi8(lut_hi, hi_nibbles);
        if _mm256_testz_si256(lo, hi) == 0 {
            break; // padding or a character outside the alphabet: the tail decides
        }
        let eq_2f = _mm256_cmpeq_epi8(x, mask_2f);
        let roll = _mm256_shuffle_epi8(lut_roll, _mm256_add_epi8(eq_2f, hi_nibbles));
        let sextets = _mm256_add_epi8(x, roll);
        let pairs = _mm256_maddubs_epi16(sextets, _mm256_set1_epi32(0x0140_0140));
        let groups = _mm256_madd_epi16(pairs, _mm256_set1_epi32(0x0001_1000));
        let floats = _mm256_shuffle_epi8(groups, to_be);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(floats, exponent), exponent));
        let packed = _mm256_permutevar8x32_epi32(floats, gather);
        // SAFETY: `reserve` above left room for 24 bytes per block plus 8, and `done / 32`
        // blocks were written before this one.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(start + done / 32 * 24).cast(), packed) };
        done += 32;
    }
    // SAFETY: the first `done / 32 * 24` bytes after `start` were written above.
    unsafe { out.set_len(start + done / 32 * 24) };
    (done, _mm256_movemask_epi8(bad) != 0)
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn simd128(src: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    use std::arch::wasm32::*;
    // SAFETY (all loads below): each array or chunk is 16 readable bytes; wasm loads need no
    // alignment.
    let load = |t: &[u8; 16]| unsafe { v128_load(t.as_ptr().cast()) };
    let lut_lo = load(&LUT_LO);
    let lut_hi = load(&LUT_HI);
    let lut_roll = load(&LUT_ROLL.map(|v| v as u8));
    let to_be = load(&TO_BE_FLOATS);
    let low4 = u8x16_splat(0x0f);
    let slash = u8x16_splat(0x2f);
    let exponent = u32x4_splat(BE_EXPONENT);
    let ac = u32x4_splat(u32::from_le_bytes([0x3f, 0x00, 0x3f, 0x00]));
    let bd = u32x4_splat(u32::from_le_bytes([0x00, 0x3f, 0x00, 0x3f]));
    let low24 = u32x4_splat(0x00ff_ffff);

    let blocks = src.len() / 16;
    // Each store writes 16 bytes of which 12 are kept: room for the last one's extra 4.
    out.reserve(blocks * 12 + STORE_SLACK);
    let start = out.len();
    let mut bad = u32x4_splat(0);
    let mut done = 0;
    for block in src.chunks_exact(16) {
        let x = load(block.try_into().expect("chunks_exact(16)"));
        let hi_nibbles = u8x16_shr(x, 4);
        // swizzle gives 0 for indices over 15, unlike pshufb: keep exactly the low nibble.
        let lo = i8x16_swizzle(lut_lo, v128_and(x, low4));
        let hi = i8x16_swizzle(lut_hi, hi_nibbles);
        if v128_any_true(v128_and(lo, hi)) {
            break; // padding or a character outside the alphabet: the tail decides
        }
        let roll = i8x16_swizzle(lut_roll, i8x16_add(i8x16_eq(x, slash), hi_nibbles));
        let sextets = i8x16_add(x, roll);
        // {00aaaaaa|00bbbbbb|00cccccc|00dddddd} per lane to {ccdddddd|bbbbcccc|aaaaaabb|0}.
        let a_c = v128_and(sextets, ac);
        let b_d = v128_and(sextets, bd);
        let x3 = v128_or(u32x4_shl(a_c, 18), u32x4_shr(a_c, 10));
        let x4 = v128_or(u32x4_shl(b_d, 4), u32x4_shr(b_d, 24));
        let groups = v128_and(v128_or(x3, x4), low24);
        let floats = i8x16_swizzle(groups, to_be);
        bad = v128_or(bad, u32x4_eq(v128_and(floats, exponent), exponent));
        // SAFETY: `reserve` above left room for 12 bytes per block plus 4, and `done / 16`
        // blocks were written before this one.
        unsafe { v128_store(out.as_mut_ptr().add(start + done / 16 * 12).cast(), floats) };
        done += 16;
    }
    // SAFETY: the first `done / 16 * 12` bytes after `start` were written above.
    unsafe { out.set_len(start + done / 16 * 12) };
    (done, v128_any_true(bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// Whether this build and CPU have a kernel (else `decode_blocks` decodes nothing).
    fn simd() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx2");
        #[cfg(target_arch = "wasm32")]
        return cfg!(target_feature = "simd128");
        #[allow(unreachable_code)]
        false
    }

    /// The reference: the `base64` crate, then each float to network order.
    fn reference(src: &[u8]) -> Option<(Vec<u8>, bool)> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(src).ok()?;
        let mut bad = false;
        let out = bytes
            .chunks_exact(4)
            .flat_map(|c| {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                bad |= !v.is_finite();
                v.to_be_bytes()
            })
            .collect();
        Some((out, bad))
    }

    /// What the kernel gives for its blocks, finished by the reference on the rest.
    fn kernel(src: &[u8]) -> Option<(Vec<u8>, bool)> {
        let mut out = vec![0xaa]; // something before, which must stay
        let (done, bad) = decode_blocks(src, &mut out);
        assert_eq!(done % 16, 0);
        assert_eq!(out.len(), 1 + done / 16 * 12, "{done} characters decoded");
        assert_eq!(out[0], 0xaa);
        let (rest, rest_bad) = reference(&src[done..])?;
        out.extend(rest);
        Some((out[1..].to_vec(), bad | rest_bad))
    }

    fn floats(n: usize, seed: u32) -> Vec<u8> {
        (0..n).flat_map(|i| ((i as f32 * 0.731 + seed as f32) / (1.0 + i as f32) - 0.5).to_le_bytes()).collect()
    }

    #[test]
    fn the_kernel_decodes_as_the_reference_at_every_length() {
        for n in 0..80 {
            let text = base64::engine::general_purpose::STANDARD.encode(floats(n, 3));
            assert_eq!(kernel(text.as_bytes()), reference(text.as_bytes()), "{n} floats");
        }
        // A real embedding's length: the kernel takes all of it.
        let text = base64::engine::general_purpose::STANDARD.encode(floats(3072, 1));
        let mut out = Vec::new();
        let (done, _) = decode_blocks(text.as_bytes(), &mut out);
        if simd() {
            assert_eq!(done, text.len());
        }
    }

    #[test]
    fn every_byte_at_every_position_is_decoded_or_refused_as_the_reference_does() {
        // 48 characters: one whole AVX2 block and a tail; every byte value in each place.
        let text = base64::engine::general_purpose::STANDARD.encode(floats(9, 7)).into_bytes();
        assert_eq!(text.len(), 48);
        for i in 0..text.len() {
            for c in 0..=255u8 {
                let mut m = text.clone();
                m[i] = c;
                assert_eq!(kernel(&m), reference(&m), "byte {c:#04x} at {i}");
            }
        }
    }

    #[test]
    fn non_finite_values_are_noticed_in_every_slot() {
        for slot in 0..24 {
            for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                let mut bytes = floats(24, 2);
                bytes[slot * 4..slot * 4 + 4].copy_from_slice(&special.to_le_bytes());
                let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
                let got = kernel(text.as_bytes()).expect("valid base64");
                assert!(got.1, "{special} in slot {slot}");
                assert_eq!(Some(got), reference(text.as_bytes()));
            }
        }
        // The largest finite values and subnormals are not flagged.
        let edge: Vec<u8> =
            [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0, 0.0].repeat(4).iter().flat_map(|v| v.to_le_bytes()).collect();
        let text = base64::engine::general_purpose::STANDARD.encode(&edge);
        assert_eq!(kernel(text.as_bytes()).map(|k| k.1), Some(false));
    }
}
