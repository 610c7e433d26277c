//! Packing values into provider requests by the provider's real limits.
//!
//! OpenAI takes at most 2,048 inputs and about 300,000 tokens per embeddings request, and at
//! most 8,192 tokens per input. Tokens are estimated from UTF-8 bytes, never counted exactly
//! (a tokenizer would cost more wasm and CPU than it saves):
//! - [`estimate_tokens`] is the expected count, ceil(bytes / 4), about right for English and
//!   used for dry-run estimates and cost;
//! - [`limit_tokens`] is the conservative count, ceil(bytes / 3), used to pack requests so that
//!   text with many multi-byte characters does not push a request over the limit.
//!
//! Policy for long inputs: a value whose expected count is over 8,192 tokens is not sent; it is
//! recorded as an error for that value (with the estimate in the message) and never blocks the
//! other values. A value under the estimate that the provider still refuses is isolated by
//! bisection and recorded the same way.

/// The most inputs in one request.
pub const MAX_INPUTS_PER_REQUEST: usize = 2048;
/// The most tokens in one request.
pub const MAX_TOKENS_PER_REQUEST: u64 = 300_000;
/// The most tokens in one input.
pub const MAX_TOKENS_PER_INPUT: u64 = 8192;

/// The most decoded vector bytes (both models) one batch may hold. A Worker has 128 MB; at its
/// peak a batch holds each vector about four times (the base64 body, the decoded floats, the
/// pgvector parameters, the request buffer), so 8 MiB of vectors keeps a batch near 40 MB.
pub const MAX_VECTOR_BYTES_PER_BATCH: usize = 8 << 20;

/// The most values one batch may hold for models of `large` and `small` dimensions: the
/// configured batch size, capped so the batch fits the Worker's memory (455 values for the
/// 3072 + 1536 dimensions of the two OpenAI models).
pub fn max_values_per_batch(batch_size: usize, large: u32, small: u32) -> usize {
    let per_value = (large as usize + small as usize).max(1) * 4;
    batch_size.min(MAX_VECTOR_BYTES_PER_BATCH / per_value).max(1)
}

/// The expected token count of `text`: ceil(UTF-8 bytes / 4), at least 1.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// A conservative token count of `text` for packing requests: ceil(UTF-8 bytes / 3), at least 1.
pub fn limit_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(3).max(1)
}

/// The conservative token count of a whole request.
pub fn limit_tokens_all(texts: &[&str]) -> u64 {
    texts.iter().map(|t| limit_tokens(t)).sum()
}

/// Whether `text` is too long to send at all.
pub fn too_long(text: &str) -> bool {
    estimate_tokens(text) > MAX_TOKENS_PER_INPUT
}

/// Splits `texts` (in order) into consecutive ranges of at most `max_inputs` inputs and at most
/// `max_tokens` conservative tokens each. A single text over `max_tokens` gets a range of its own.
pub fn pack<'a>(texts: impl IntoIterator<Item = &'a str>, max_inputs: usize, max_tokens: u64) -> Vec<std::ops::Range<usize>> {
    let max_inputs = max_inputs.clamp(1, MAX_INPUTS_PER_REQUEST);
    let mut out = Vec::new();
    let (mut start, mut count, mut tokens) = (0, 0, 0u64);
    for (i, text) in texts.into_iter().enumerate() {
        let t = limit_tokens(text);
        if count > 0 && (count == max_inputs || tokens + t > max_tokens) {
            out.push(start..i);
            (start, count, tokens) = (i, 0, 0);
        }
        count += 1;
        tokens += t;
    }
    if count > 0 {
        out.push(start..start + count);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sizes: &[usize], max_inputs: usize, max_tokens: u64, expect: &[std::ops::Range<usize>]) {
        let texts: Vec<String> = sizes.iter().map(|&n| "x".repeat(n)).collect();
        assert_eq!(pack(texts.iter().map(|s| s.as_str()), max_inputs, max_tokens), expect);
    }

    #[test]
    fn packing_at_the_limits() {
        check(&[], 10, 100, &[]);
        check(&[3; 5], 2, 100, &[0..2, 2..4, 4..5]);
        // 30 bytes = 10 conservative tokens each.
        check(&[30; 5], 100, 20, &[0..2, 2..4, 4..5]);
        check(&[30; 5], 100, 19, &[0..1, 1..2, 2..3, 3..4, 4..5]);
        // An input over the request limit is alone, never merged, never dropped.
        check(&[3, 300, 3], 100, 50, &[0..1, 1..2, 2..3]);
        // 2048 inputs at most, whatever is asked.
        let texts = vec!["a"; 5000];
        let ranges = pack(texts.iter().copied(), 10_000, u64::MAX);
        assert_eq!(ranges, [0..2048, 2048..4096, 4096..5000]);
        // 300,000 tokens: 150 inputs of 6,000 bytes (2,000 conservative tokens) fill one request.
        let big = vec!["y".repeat(6000); 151];
        let ranges = pack(big.iter().map(|s| s.as_str()), 2048, MAX_TOKENS_PER_REQUEST);
        assert_eq!(ranges, [0..150, 150..151]);
    }

    #[test]
    fn batches_fit_the_workers_memory() {
        assert_eq!(max_values_per_batch(100, 3072, 1536), 100);
        assert_eq!(max_values_per_batch(2048, 3072, 1536), 455);
        assert_eq!(max_values_per_batch(2048, 48, 24), 2048);
    }

    #[test]
    fn estimates() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(limit_tokens("日本"), 2);
        assert!(!too_long(&"a".repeat(32_768)));
        assert!(too_long(&"a".repeat(32_769)));
    }
}
