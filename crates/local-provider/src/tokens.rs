//! Token counts as OpenAI makes them for `text-embedding-3-*`: the `cl100k_base` byte-pair
//! encoding, exactly (tiktoken-rs, the vocabulary compiled in). The counts go into `usage` and
//! decide the 8,192-token input limit, so a value the worker's estimate lets through that OpenAI
//! would refuse is refused here too.

use std::sync::LazyLock;

use tiktoken_rs::CoreBPE;

static CL100K_BASE: LazyLock<&'static CoreBPE> = LazyLock::new(tiktoken_rs::cl100k_base_singleton);

/// Loads the vocabulary (about 0.2 s), so that the first request does not wait for it.
pub fn warm_up() {
    LazyLock::force(&CL100K_BASE);
}

/// Counts the tokens of one input string.
pub fn count_tokens(text: &str) -> usize {
    CL100K_BASE.encode_ordinary(text).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_cl100k_base() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens("a, b."), 4);
        assert_eq!(count_tokens("Cloudflare"), 2);
        // cl100k splits numbers into pieces of at most three digits.
        assert_eq!(count_tokens("1234567"), 3);
    }

    #[test]
    fn cjk_costs_about_a_token_per_character_not_a_quarter_of_its_bytes() {
        let text = "东京是日本的首都，也是世界上人口最多的都市圈之一。";
        let chars = text.chars().count();
        let tokens = count_tokens(text);
        assert!(tokens >= chars * 9 / 10, "{tokens} tokens for {chars} characters");
        assert!(tokens > text.len().div_ceil(4), "more than ceil(bytes / 4)");
    }
}
