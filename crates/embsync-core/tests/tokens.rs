//! The token estimate (`batch::estimate_tokens`) against the exact `cl100k_base` tokenizer of
//! `text-embedding-3-*` (tiktoken-rs, natively): prints the error per sample and holds it to
//! bounds. `cargo test -p embsync-core --test tokens -- --nocapture` shows the table.

use embsync_core::batch::{estimate_tokens, sql_estimate_tokens, too_long, MAX_TOKENS_PER_INPUT};

/// The samples in `tests/tokens/` (the weights were tuned on them) and two files they were not
/// tuned on, with the least and most the estimate may be, as a share of the
/// exact count. Undercounting CJK was the old estimate's fault (ceil(bytes / 4) gave 0.67 of the
/// exact count for Chinese): CJK may not go below 0.9. The last two bounds are the dry run's SQL
/// estimate's (bytes and characters only: wider).
const SAMPLES: &[(&str, f64, f64, f64, f64)] = &[
    ("english", 0.85, 1.25, 0.8, 1.3),
    ("code", 0.8, 1.25, 0.8, 1.3),
    ("chinese", 0.9, 1.3, 0.9, 1.3),
    ("japanese", 0.9, 1.3, 0.9, 1.3),
    ("korean", 0.9, 1.3, 0.9, 1.3),
    ("russian", 0.85, 1.3, 0.85, 1.5),
    ("emoji", 0.8, 1.4, 0.4, 1.4),
    ("README.md", 0.8, 1.3, 0.8, 1.3),
    ("batch.rs", 0.8, 1.3, 0.8, 1.3),
];

fn sample(name: &str) -> String {
    let path = match name {
        // Files the estimate was not tuned on: the README (English, Markdown) and Rust source.
        "README.md" => format!("{}/../../README.md", env!("CARGO_MANIFEST_DIR")),
        "batch.rs" => format!("{}/src/batch.rs", env!("CARGO_MANIFEST_DIR")),
        _ => format!("{}/tests/tokens/{name}.txt", env!("CARGO_MANIFEST_DIR")),
    };
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn exact(text: &str) -> u64 {
    tiktoken_rs::cl100k_base_singleton().encode_ordinary(text).len() as u64
}

#[test]
fn the_estimate_is_close_to_cl100k_base_on_every_script() {
    let mut failures = Vec::new();
    println!("| sample | bytes | cl100k_base | estimate | error | dry run (SQL) | error | ceil(bytes / 4) | error |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(name, low, high, sql_low, sql_high) in SAMPLES {
        let text = sample(name);
        let exact = exact(&text);
        let estimate = estimate_tokens(&text);
        // The SQL sums per value; one sample is one value here.
        let sql = sql_estimate_tokens(text.len() as u64, text.chars().count() as u64);
        let by_bytes = (text.len() as u64).div_ceil(4);
        let pct = |n: u64| format!("{:+.0}%", (n as f64 / exact as f64 - 1.0) * 100.0);
        println!(
            "| {name} | {} | {exact} | {estimate} | {} | {sql} | {} | {by_bytes} | {} |",
            text.len(),
            pct(estimate),
            pct(sql),
            pct(by_bytes)
        );
        for (what, n, low, high) in [("estimate", estimate, low, high), ("SQL estimate", sql, sql_low, sql_high)] {
            let ratio = n as f64 / exact as f64;
            if !(low..=high).contains(&ratio) {
                failures.push(format!("{name}: {what} {n}, exact {exact}: {ratio:.2} not in {low}..={high}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A Chinese value of about 8,700 exact tokens: ceil(bytes / 4) thought it about 6,200, under
/// the limit, so it was sent and refused by the provider. Now it is caught before sending.
#[test]
fn a_long_cjk_value_is_over_the_limit_before_sending() {
    let chinese = sample("chinese");
    let text = chinese.repeat(8700usize.div_ceil(exact(&chinese) as usize));
    let exact = exact(&text);
    assert!(exact > MAX_TOKENS_PER_INPUT, "the sample is really over the limit: {exact}");
    assert!((text.len() as u64).div_ceil(4) <= MAX_TOKENS_PER_INPUT, "and the old estimate let it through");
    assert!(too_long(&text), "caught: estimate {} for {exact} exact tokens", estimate_tokens(&text));
}

/// English a little under the limit still goes out (the estimate does not refuse what the
/// provider would take), and a little over it does not.
#[test]
fn english_near_the_limit_is_judged_as_the_provider_would() {
    let english = sample("english");
    let per = exact(&english) as usize;
    let under = english.repeat(7600 / per);
    assert!(exact(&under) < MAX_TOKENS_PER_INPUT);
    assert!(!too_long(&under), "{} exact, estimate {}", exact(&under), estimate_tokens(&under));
    let over = english.repeat(9000usize.div_ceil(per));
    assert!(exact(&over) > MAX_TOKENS_PER_INPUT);
    assert!(too_long(&over), "{} exact, estimate {}", exact(&over), estimate_tokens(&over));
}
