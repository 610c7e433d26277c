//! A deterministic approximation of OpenAI's `cl100k_base` token counts.
//!
//! The real tokenizer is a byte-pair encoding with a 100k vocabulary; shipping
//! it would be heavy and pointless for a test double. This counter follows the
//! shape of cl100k's pre-tokenizer instead, which gives about one token per four
//! bytes of English prose:
//!
//! * a maximal run of letters costs one token per started group of
//!   [`LETTERS_PER_TOKEN`] letters. "Letters" are alphabetic characters of at
//!   most two UTF-8 bytes (Latin, Greek, Cyrillic, ...);
//! * a maximal run of ASCII digits costs one token per started group of
//!   [`DIGITS_PER_TOKEN`] digits (cl100k splits numbers into 1-3 digit pieces);
//! * a maximal run of whitespace costs one token, except that a single space
//!   directly in front of a letter run belongs to that word and costs nothing
//!   (in a longer run that space is absorbed too, the rest still costs one);
//! * every other character (punctuation, symbols, emoji, CJK ideographs, ...)
//!   costs `ceil(utf8_len / 2)` tokens: 1 for ASCII punctuation, 2 for a CJK
//!   character or an emoji;
//! * a non-empty input costs at least one token; the empty string costs zero.

/// Letters covered by one token of a letter run.
pub const LETTERS_PER_TOKEN: usize = 6;

/// Digits covered by one token of a digit run.
pub const DIGITS_PER_TOKEN: usize = 3;

/// The class of a character, as far as the counter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Digit,
    Whitespace,
    Other,
}

impl CharClass {
    fn of(c: char) -> CharClass {
        if c.is_ascii_digit() {
            CharClass::Digit
        } else if c.is_whitespace() {
            CharClass::Whitespace
        } else if c.is_alphabetic() && c.len_utf8() <= 2 {
            CharClass::Letter
        } else {
            CharClass::Other
        }
    }
}

/// Counts the tokens of one input string (see the module docs for the rules).
pub fn count_tokens(text: &str) -> usize {
    let mut tokens = 0;
    let mut chars = text.chars().peekable();
    while let Some(first) = chars.next() {
        let class = CharClass::of(first);
        // Letters, digits and whitespace form runs; other chars stand alone.
        let mut run_len: usize = 1;
        let mut last = first;
        if class != CharClass::Other {
            while let Some(&next) = chars.peek() {
                if CharClass::of(next) != class {
                    break;
                }
                last = next;
                run_len += 1;
                chars.next();
            }
        }
        tokens += match class {
            CharClass::Other => first.len_utf8().div_ceil(2),
            CharClass::Letter => run_len.div_ceil(LETTERS_PER_TOKEN),
            CharClass::Digit => run_len.div_ceil(DIGITS_PER_TOKEN),
            CharClass::Whitespace => {
                let before_word = last == ' ' && chars.peek().is_some_and(|&c| CharClass::of(c) == CharClass::Letter);
                if before_word && run_len == 1 {
                    0
                } else {
                    1
                }
            }
        };
    }
    if text.is_empty() {
        0
    } else {
        tokens.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_minimum() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens(" "), 1);
        assert_eq!(count_tokens("a"), 1);
        assert_eq!(count_tokens("\n\n"), 1);
    }

    #[test]
    fn words_absorb_one_leading_space() {
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens("hello  world"), 3);
        assert_eq!(count_tokens("hello\nworld"), 3);
        // Long words cost one token per started group of six letters.
        assert_eq!(count_tokens("abcdef"), 1);
        assert_eq!(count_tokens("abcdefg"), 2);
        assert_eq!(count_tokens("Cloudflare"), 2);
    }

    #[test]
    fn digits_punctuation_and_wide_chars() {
        assert_eq!(count_tokens("123"), 1);
        assert_eq!(count_tokens("1234"), 2);
        assert_eq!(count_tokens("1234567"), 3);
        assert_eq!(count_tokens("a, b."), 4);
        assert_eq!(count_tokens("中文"), 4);
        assert_eq!(count_tokens("🙂"), 2);
        // Accented Latin letters are letters, not "other".
        assert_eq!(count_tokens("café"), 1);
    }

    #[test]
    fn english_prose_is_about_four_bytes_per_token() {
        let prose = "The quick brown fox jumps over the lazy dog. Keeps pgvector \
                     embeddings of Postgres column values in sync, as a Cloudflare \
                     Worker. Values are hashed, cached and reused across sources.";
        let tokens = count_tokens(prose);
        let bytes_per_token = prose.len() as f64 / tokens as f64;
        assert!((3.0..=6.0).contains(&bytes_per_token), "{bytes_per_token} bytes per token ({tokens} tokens)");
    }

    #[test]
    fn deterministic_and_additive_over_separated_parts() {
        let text = "Größe: 42 Einträge (ok)";
        assert_eq!(count_tokens(text), count_tokens(text));
        assert_eq!(count_tokens("ab.cd"), count_tokens("ab") + 1 + count_tokens("cd"));
    }
}
