//! Packing values into provider requests by the provider's real limits.
//!
//! OpenAI takes at most 2,048 inputs and about 300,000 tokens per embeddings request, and at
//! most 8,192 tokens per input, counted by the model's tokenizer (`cl100k_base` for
//! `text-embedding-3-*`). The worker estimates tokens instead of counting them: the exact
//! tokenizer (tiktoken-rs) would add about 1.2 MB to the worker's gzip size and cost about 0.6 s
//! of CPU to load and 20 ms per batch of 100 values of 500 bytes as wasm (BENCHMARKS.md, "Token
//! counts"), against about 0.5 ms for decoding that batch's embeddings.
//! - [`estimate_tokens`] is the expected count, from the shape of `cl100k_base`'s
//!   pre-tokenizer and a cost per character by script (Unicode ranges): word runs of Latin
//!   letters cost one token per 6 letters, of other alphabets (Cyrillic, Greek, Arabic, ...) one
//!   per 2 letters; digits one per 3; a run of punctuation one per 2 characters; whitespace one
//!   per run, none for the single space in front of a word; a CJK, Hangul, kana, Indic or Thai
//!   character (3 UTF-8 bytes) 1.25; an emoji (4 bytes) 3. `tests/tokens.rs` prints its error
//!   against `cl100k_base` on English, code, CJK, Cyrillic and emoji samples and holds it to
//!   bounds. It is used for the per-input limit, the error message and pacing.
//! - [`limit_tokens`] is the conservative count, a quarter over the estimate, used to pack
//!   requests so that an underestimate does not push a request over the limit.
//!
//! Policy for long inputs: a value whose expected count is over 8,192 tokens is not sent; it is
//! recorded as an error for that value (with the estimate in the message) and never blocks the
//! other values. A value under the estimate that the provider still refuses is isolated by
//! bisection and recorded the same way. The dry run's counts come from SQL, which has no
//! per-character classes: see [`crate::sql::plan`] for its estimate.

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

/// What one character is to the estimate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// An ASCII letter.
    Latin,
    /// A letter of two UTF-8 bytes (accented Latin, Greek, Cyrillic, Hebrew, Arabic, ...).
    Letter2,
    Digit,
    Space,
    /// ASCII punctuation and symbols, and other characters of two bytes.
    Punct,
    /// A character of three UTF-8 bytes: CJK ideographs, kana, Hangul, Indic scripts, Thai,
    /// full-width punctuation, most symbols.
    Wide,
    /// A character of four UTF-8 bytes: emoji, rare CJK ideographs.
    Astral,
}

impl Class {
    fn of(c: char) -> Class {
        match c.len_utf8() {
            1 if c.is_ascii_alphabetic() => Class::Latin,
            1 if c.is_ascii_digit() => Class::Digit,
            1 if c.is_ascii_whitespace() => Class::Space,
            1 => Class::Punct,
            2 if c.is_alphabetic() => Class::Letter2,
            2 if c.is_whitespace() => Class::Space,
            2 => Class::Punct,
            3 => Class::Wide,
            _ => Class::Astral,
        }
    }

    /// Whether the class forms runs (a word, a number, a stretch of punctuation or space).
    fn is_run(self) -> bool {
        matches!(self, Class::Latin | Class::Letter2 | Class::Digit | Class::Space | Class::Punct)
    }
}

/// Sixtieths of a token, the estimate's unit: every per-character cost below is a whole number
/// of them.
const UNIT: u64 = 60;

/// The expected `cl100k_base` token count of `text`, at least 1 (see the module docs).
pub fn estimate_tokens(text: &str) -> u64 {
    let mut units: u64 = 0;
    let mut chars = text.chars().peekable();
    while let Some(first) = chars.next() {
        let class = Class::of(first);
        if !class.is_run() {
            units += if class == Class::Wide { UNIT * 11 / 10 } else { UNIT * 5 / 2 };
            continue;
        }
        // A word may mix Latin letters and letters of two bytes ("Größe").
        let word = |c: Class| matches!(c, Class::Latin | Class::Letter2);
        let (mut latin, mut other, mut len) = (0u64, 0u64, 0u64);
        let mut count = |c: Class| match c {
            Class::Latin => latin += 1,
            Class::Letter2 => other += 1,
            _ => len += 1,
        };
        count(class);
        while let Some(&next) = chars.peek() {
            let next_class = Class::of(next);
            if next_class != class && !(word(class) && word(next_class)) {
                break;
            }
            count(next_class);
            chars.next();
        }
        units += match class {
            // Whole tokens per run: a word's pieces are whole tokens.
            Class::Latin | Class::Letter2 => (latin * UNIT / 8 + other * UNIT / 2).div_ceil(UNIT) * UNIT,
            Class::Digit => len.div_ceil(3) * UNIT,
            // One punctuation character in front of a word joins it ("_cache", "'s").
            Class::Punct if len == 1 && chars.peek().is_some_and(|c| c.is_alphabetic()) => 0,
            Class::Punct => len.div_ceil(2) * UNIT,
            _ => {
                // One space in front of a word or of punctuation joins it.
                let joins = len == 1 && first == ' ' && chars.peek().is_some_and(|&c| c.is_alphabetic() || Class::of(c) == Class::Punct);
                if joins {
                    0
                } else {
                    UNIT
                }
            }
        };
    }
    units.div_ceil(UNIT).max(1)
}

/// The dry run's estimate, which [`crate::sql::plan`] computes in SQL over a whole source from a
/// value's UTF-8 `bytes` and `chars` (characters) alone: ceil((19 bytes - 9 chars) / 40), a
/// quarter of a token per byte and 0.225 more per byte past a character's first. That is 4 bytes
/// per token for ASCII (+24% on English prose, -17% on code against `cl100k_base`), 1.2 per CJK
/// character (+16% on Chinese; ceil(bytes / 4), the estimate before it, gave -27%), 0.725 per
/// Cyrillic letter (+40%) and 1.675 per emoji (under); `tests/tokens.rs` prints the figures.
pub fn sql_estimate_tokens(bytes: u64, chars: u64) -> u64 {
    (19 * bytes - 9 * chars).div_ceil(40)
}

/// A conservative token count of `text` for packing requests: a quarter over
/// [`estimate_tokens`], at least 1.
pub fn limit_tokens(text: &str) -> u64 {
    (estimate_tokens(text) * 5).div_ceil(4)
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

    /// A text of `n` one-letter words: an estimate of `n` tokens, a limit of ceil(5n / 4).
    fn words(n: usize) -> String {
        vec!["x"; n].join(" ")
    }

    fn check(sizes: &[usize], max_inputs: usize, max_tokens: u64, expect: &[std::ops::Range<usize>]) {
        let texts: Vec<String> = sizes.iter().map(|&n| words(n)).collect();
        assert_eq!(pack(texts.iter().map(|s| s.as_str()), max_inputs, max_tokens), expect);
    }

    #[test]
    fn packing_at_the_limits() {
        check(&[], 10, 100, &[]);
        check(&[3; 5], 2, 100, &[0..2, 2..4, 4..5]);
        // 8 words = 10 conservative tokens each.
        assert_eq!(limit_tokens(&words(8)), 10);
        check(&[8; 5], 100, 20, &[0..2, 2..4, 4..5]);
        check(&[8; 5], 100, 19, &[0..1, 1..2, 2..3, 3..4, 4..5]);
        // An input over the request limit is alone, never merged, never dropped.
        check(&[3, 300, 3], 100, 50, &[0..1, 1..2, 2..3]);
        // 2048 inputs at most, whatever is asked.
        let texts = vec!["a"; 5000];
        let ranges = pack(texts.iter().copied(), 10_000, u64::MAX);
        assert_eq!(ranges, [0..2048, 2048..4096, 4096..5000]);
        // 300,000 tokens: 150 inputs of 2,000 conservative tokens fill one request.
        let big = vec![words(1600); 151];
        assert_eq!(limit_tokens(&big[0]), 2000);
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
    fn estimates_by_script() {
        assert_eq!(estimate_tokens(""), 1);
        // Words: one token per 8 Latin letters, the space in front joins them.
        assert_eq!(estimate_tokens("word"), 1);
        assert_eq!(estimate_tokens("hello world"), 2);
        assert_eq!(estimate_tokens("Cloudflare"), 2);
        assert_eq!(estimate_tokens(&words(100)), 100);
        // Other alphabets: one token per two letters; accented Latin letters join the word.
        assert_eq!(estimate_tokens("Москва"), 3);
        assert_eq!(estimate_tokens("Größe"), 2);
        // Digits by three, punctuation by two, one character of it joins the word after it.
        assert_eq!(estimate_tokens("1234567"), 3);
        assert_eq!(estimate_tokens("a, b."), 4);
        assert_eq!(estimate_tokens("value_hash"), 2);
        // Whitespace runs: one token each (indentation, newlines).
        assert_eq!(estimate_tokens("a\n    b"), 3);
        // CJK: 1.1 per character (ceil(bytes / 4) gave 0.75); emoji 2.5.
        assert_eq!(estimate_tokens(&"日".repeat(100)), 110);
        assert_eq!(estimate_tokens(&"🎉".repeat(10)), 25);
        assert_eq!(limit_tokens(&"日".repeat(100)), 138);
        assert!(!too_long(&words(8192)));
        assert!(too_long(&words(8193)));
        // 7,448 Chinese characters are 22,344 bytes: ceil(bytes / 4) said 5,586 tokens.
        assert!(too_long(&"日".repeat(7448)));
        assert!(!too_long(&"日".repeat(7447)));
    }
}
