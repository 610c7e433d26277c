//! CPU of counting tokens per batch of 100 values: the worker's estimate
//! (`batch::estimate_tokens`) against the exact `cl100k_base` tokenizer (tiktoken-rs, a
//! dev-dependency, never in the worker), and what loading the exact tokenizer's vocabulary costs
//! once. The figures decide whether the worker could count exactly (BENCHMARKS.md, "Token counts").
//!
//! `bench/tokens.sh` runs it natively and as wasm32-wasip1 under Node (as the worker's code runs
//! on workerd, give or take the engine): `cargo bench -p embsync-core --bench tokens`. Options
//! after `--`: `--runs N` (default 21). Without `--bench` (`cargo test --benches`) it only checks
//! once that both counts are positive.

use embsync_core::batch::estimate_tokens;
use std::hint::black_box;
use std::time::Instant;

/// Compiled in: under WASI the bench sees no files.
const SAMPLES: [(&str, &str); 3] = [
    ("english", include_str!("../tests/tokens/english.txt")),
    ("code", include_str!("../tests/tokens/code.txt")),
    ("chinese", include_str!("../tests/tokens/chinese.txt")),
];

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let runs = args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(21usize);

    let start = Instant::now();
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    if !bench {
        assert!(estimate_tokens("hello world") > 0 && !bpe.encode_ordinary("hello world").is_empty());
        return;
    }

    println!("| 100 values of | bytes | estimate (ms) | cl100k_base, exact (ms) |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, text) in SAMPLES {
        let values: Vec<String> = (0..100).map(|i| format!("{i} {text}")).collect();
        let bytes: usize = values.iter().map(String::len).sum();
        let time = |f: &dyn Fn(&str) -> u64| {
            median(
                (0..runs)
                    .map(|_| {
                        let t = Instant::now();
                        let n: u64 = values.iter().map(|v| f(black_box(v))).sum();
                        black_box(n);
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            )
        };
        let estimate = time(&|v| estimate_tokens(v));
        let exact = time(&|v| bpe.encode_ordinary(v).len() as u64);
        println!("| {name} | {bytes} | {estimate:.3} | {exact:.3} |");
    }
    println!();
    println!("loading cl100k_base (once per isolate): {load_ms:.0} ms");
}
