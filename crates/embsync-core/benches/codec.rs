//! Worker-side CPU per 1,000 dual embeddings (one 3072-d and one 1536-d vector per value),
//! measured natively on the pure core: the provider's 200 body in, the bytes bound for Postgres
//! out. Issue 4's target is at most 5 ms per 1,000 dual embeddings on the base64 path.
//!
//! Paths, each over the same 1,000 values (10 bodies of 100 items per model, like the batches
//! the worker sends):
//! - `base64`: `decode_response` on `encoding_format: "base64"` bodies (which decodes each
//!   vector straight into pgvector's binary format), then every vector bound as a parameter
//!   (one copy into the statement's buffer, as `PgVector::to_sql` does).
//! - `float`: the same on `encoding_format: "float"` bodies (JSON arrays of numbers).
//! - `text`: the float bodies decoded, then every vector formatted as pgvector text
//!   `[v1,v2,...]`, as a naive client sends it.
//!
//! A plain `harness = false` bench: `cargo bench -p embsync-core --bench codec`, or
//! `bench/codec.sh` (which also counts instructions under callgrind with `--callgrind`).
//! Options after `--`:
//! - `--runs N`: timed runs per row, default 15 (the halves get half as many, after 1 warm-up);
//! - `--warmup N`: untimed runs first, default 2;
//! - `--values N`: values per run, a multiple of 100, default 1000 (figures are per 1,000);
//! - `--path KEY`: only that row: `base64`, `float`, `text`, or a half alone: `decode-base64`,
//!   `decode-float`, `encode-binary`, `encode-text`;
//! - `--quiet`: no table (for callgrind, which counts only what runs inside `measured`);
//! - `--trim`: keep glibc's heap trimming (see [`keep_heap`]), to see what it costs.
//!
//! Without `--bench` (as `cargo test --benches` runs it) it only checks, once and on 100 values,
//! that every path gives back the vectors it was given.

use embsync_core::provider::decode_response;
use embsync_core::vector::{encode_base64_f32, Vector};
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The two models of a dual embedding.
const LARGE: (&str, usize) = ("text-embedding-3-large", 3072);
const SMALL: (&str, usize) = ("text-embedding-3-small", 1536);
/// Items per provider body, as in a batch.
const PER_BODY: usize = 100;

/// The headers a real OpenAI answer carries, so `decode_response` reads them as it would.
const HEADERS: [(&str, &str); 5] = [
    ("content-type", "application/json"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "9994200"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "34ms"),
];

fn header(name: &str) -> Option<String> {
    HEADERS.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// A unit-length vector of roughly normal components, like a real embedding (each value
    /// about ±1/sqrt(dims): -0.0123..., 0.00456...).
    fn embedding(&mut self, dims: usize) -> Vec<f32> {
        let raw: Vec<f64> = (0..dims).map(|_| self.unit() + self.unit() + self.unit() + self.unit()).collect();
        let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        raw.iter().map(|x| (x / norm) as f32).collect()
    }
}

/// How the provider encodes vectors in a body.
#[derive(Clone, Copy)]
enum Format {
    Base64,
    Float,
}

/// An OpenAI 200 body for `vectors`, laid out as the API sends it (pretty-printed, one number a
/// line in float arrays, as in OpenAI's API reference).
fn body(model: &str, vectors: &[Vec<f32>], format: Format) -> Vec<u8> {
    let mut s = String::from("{\n  \"object\": \"list\",\n  \"data\": [\n");
    for (i, v) in vectors.iter().enumerate() {
        s.push_str("    {\n      \"object\": \"embedding\",\n");
        write!(s, "      \"index\": {i},\n      \"embedding\": ").unwrap();
        match format {
            Format::Base64 => write!(s, "\"{}\"", encode_base64_f32(v)).unwrap(),
            Format::Float => {
                s.push_str("[\n");
                for (j, x) in v.iter().enumerate() {
                    // f32's shortest round-trip form, as the API prints them: -0.012345679.
                    writeln!(s, "        {x}{}", if j + 1 < v.len() { "," } else { "" }).unwrap();
                }
                s.push_str("      ]");
            }
        }
        s.push_str(if i + 1 < vectors.len() { "\n    },\n" } else { "\n    }\n" });
    }
    let tokens = vectors.len() * 9;
    write!(
        s,
        "  ],\n  \"model\": \"{model}\",\n  \"usage\": {{\n    \"prompt_tokens\": {tokens},\n    \"total_tokens\": {tokens}\n  }}\n}}\n"
    )
    .unwrap();
    s.into_bytes()
}

/// pgvector's text form, `[v1,v2,...]`, with f32's shortest round-trip formatting: what a naive
/// client sends.
fn pgvector_text(values: impl ExactSizeIterator<Item = f32>) -> String {
    let mut s = String::with_capacity(values.len() * 12 + 2);
    s.push('[');
    for (i, v) in values.enumerate() {
        if i > 0 {
            s.push(',');
        }
        write!(s, "{v}").unwrap();
    }
    s.push(']');
    s
}

/// The provider bodies for one run: per model, `values / 100` bodies of 100 items.
struct Bodies {
    /// (dimensions, bodies) for the large then the small model.
    models: Vec<(usize, Vec<Vec<u8>>)>,
}

impl Bodies {
    fn bytes(&self) -> usize {
        self.models.iter().flat_map(|(_, b)| b).map(Vec::len).sum()
    }
}

/// A model (name, dimensions) and its vectors.
type ModelVectors = ((&'static str, usize), Vec<Vec<f32>>);

/// The vectors of each model, `values` of each, deterministic.
fn vectors(values: usize) -> Vec<ModelVectors> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    [LARGE, SMALL].into_iter().map(|m| (m, (0..values).map(|_| rng.embedding(m.1)).collect())).collect()
}

fn bodies(vectors: &[ModelVectors], format: Format) -> Bodies {
    Bodies {
        models: vectors
            .iter()
            .map(|((name, dims), vs)| (*dims, vs.chunks(PER_BODY).map(|chunk| body(name, chunk, format)).collect()))
            .collect(),
    }
}

/// Decodes every body and hands each vector to `sink`; returns the bytes `sink` produced.
#[inline(always)]
fn path(bodies: &Bodies, mut sink: impl FnMut(&Vector) -> usize) -> usize {
    let mut sent = 0;
    for (dims, list) in &bodies.models {
        for body in list {
            let e = decode_response(200, header, black_box(body), PER_BODY, *dims as u32).expect("the body decodes");
            for v in &e.vectors {
                sent += sink(v);
            }
        }
    }
    sent
}

/// Binds a vector as the worker does (`PgVector::to_sql` copies its bytes into the statement's
/// buffer; a fresh buffer per parameter here, which costs at least as much).
#[inline(always)]
fn bind_binary(v: &Vector) -> usize {
    let bytes = v.as_pgvector_binary();
    let mut buf = Vec::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    black_box(&buf);
    buf.len()
}

/// The float path's encode alone: floats to pgvector's binary format, then bound.
#[inline(always)]
fn encode_binary(v: &[f32]) -> usize {
    bind_binary(&Vector::from_f32(v).expect("finite"))
}

/// Drops a decoded vector: the decode half alone.
fn discard(v: &Vector) -> usize {
    black_box(v);
    0
}

#[inline(always)]
fn bind_text(v: impl ExactSizeIterator<Item = f32>) -> usize {
    let s = pgvector_text(v);
    black_box(&s);
    s.len()
}

/// Every timed call goes through here, never inlined, so that callgrind can count exactly the
/// measured work (`--toggle-collect=codec::measured`) and nothing of the setup.
#[inline(never)]
fn measured(f: &mut dyn FnMut() -> usize) -> usize {
    f()
}

struct Options {
    runs: usize,
    warmup: usize,
    values: usize,
    path: Option<String>,
    quiet: bool,
    bench: bool,
    trim: bool,
}

fn options() -> Options {
    let mut o = Options { runs: 15, warmup: 2, values: 1000, path: None, quiet: false, bench: false, trim: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> usize { args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} needs a number")) };
        match a.as_str() {
            "--bench" => o.bench = true,
            "--runs" => o.runs = num("--runs").max(1),
            "--warmup" => o.warmup = num("--warmup"),
            "--values" => o.values = num("--values"),
            "--path" => o.path = Some(args.next().expect("--path needs base64, float or text")),
            "--quiet" => o.quiet = true,
            "--trim" => o.trim = true,
            // Filters and flags that cargo or libtest conventions pass along are ignored.
            _ => {}
        }
    }
    assert!(o.values >= PER_BODY && o.values.is_multiple_of(PER_BODY), "--values must be a multiple of {PER_BODY}");
    o
}

/// Figures of one row: wall-clock median and min, and the last result.
struct Timing {
    median: Duration,
    min: Duration,
    out: usize,
}

/// Times `f` over `runs` runs after `warmup`.
fn time(runs: usize, warmup: usize, mut f: impl FnMut() -> usize) -> Timing {
    for _ in 0..warmup {
        black_box(measured(&mut f));
    }
    let mut out = 0;
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            out = black_box(measured(&mut f));
            start.elapsed()
        })
        .collect();
    times.sort();
    Timing { median: times[times.len() / 2], min: times[0], out }
}

/// Checks that each path gives back exactly the vectors it was given.
fn check(vectors: &[ModelVectors], b64: &Bodies, float: &Bodies) {
    let all: Vec<&Vec<f32>> = vectors.iter().flat_map(|(_, vs)| vs).collect();
    for (name, bodies) in [("base64", b64), ("float", float)] {
        let mut i = 0;
        path(bodies, |v| {
            assert_eq!(
                Vector::from_pgvector_binary(v.as_pgvector_binary()).map(|v| v.to_f32()).as_ref(),
                Some(all[i]),
                "{name} path, vector {i}"
            );
            let text = pgvector_text(v.iter());
            let back: Vec<f32> = text[1..text.len() - 1].split(',').map(|x| x.parse().unwrap()).collect();
            assert_eq!(&back, all[i], "text form of vector {i}");
            i += 1;
            0
        });
        assert_eq!(i, all.len());
    }
}

/// The rows of the table: (key for `--path`, label, whether it needs base64 bodies, float
/// bodies, decoded vectors).
const ROWS: [(&str, &str, bool, bool, bool); 7] = [
    ("base64", "base64 -> pgvector binary", true, false, false),
    ("float", "JSON floats -> pgvector binary", false, true, false),
    ("text", "JSON floats -> pgvector text", false, true, false),
    ("decode-base64", "  part: decode_response, base64", true, false, false),
    ("decode-float", "  part: decode_response, floats", false, true, false),
    ("encode-binary", "  part: floats -> Vector, bound", false, false, true),
    ("encode-text", "  part: pgvector text only", false, false, true),
];

/// Stops glibc from giving freed heap memory back to the kernel (`M_TRIM_THRESHOLD`).
///
/// A body's 200 vectors (3.7 MB) are freed once they are bound; glibc then trims the heap top
/// and the next body page-faults the same memory back in: 4,500 faults per 1,000 values, which
/// cost three times the decoding itself (13 ms against 4 ms per 1,000 values on our 2-core machine). The worker's wasm
/// memory never shrinks, so those faults never happen there; the bench measures the codec, not
/// the kernel's page allocator. `--trim` keeps glibc's default.
fn keep_heap() -> &'static str {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        // SAFETY: mallopt is glibc's documented tuning call; any value is accepted.
        if unsafe { mallopt(M_TRIM_THRESHOLD, i32::MAX) } == 1 {
            return "heap trimming off, as in wasm";
        }
    }
    "allocator default"
}

fn main() {
    let o = options();
    let heap = if o.bench && !o.trim { keep_heap() } else { "allocator default" };
    if !o.bench {
        // `cargo test --benches`: a quick correctness check, no timing.
        let v = vectors(PER_BODY);
        check(&v, &bodies(&v, Format::Base64), &bodies(&v, Format::Float));
        println!("codec bench: checked 1 passed, 0 failed");
        return;
    }
    let rows: Vec<_> = ROWS.iter().filter(|r| o.path.as_deref().is_none_or(|p| p == r.0)).collect();
    assert!(!rows.is_empty(), "unknown --path; one of: {}", ROWS.map(|r| r.0).join(", "));
    let vectors = vectors(o.values);
    let none = || Bodies { models: vec![] };
    let b64 = if rows.iter().any(|r| r.2) { bodies(&vectors, Format::Base64) } else { none() };
    let float = if rows.iter().any(|r| r.3) { bodies(&vectors, Format::Float) } else { none() };
    let flat: Vec<Vec<f32>> =
        if rows.iter().any(|r| r.4) { vectors.iter().flat_map(|(_, vs)| vs.iter().cloned()).collect() } else { vec![] };
    if o.path.is_none() {
        // Every path must give back exactly what the provider sent; one body per model is enough.
        let first: Vec<_> = vectors.iter().map(|(m, vs)| (*m, vs[..PER_BODY].to_vec())).collect();
        check(&first, &bodies(&first, Format::Base64), &bodies(&first, Format::Float));
    }

    let scale = 1000.0 / o.values as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3 * scale;
    let mb = |bytes: usize| format!("{:.1}", bytes as f64 * scale / 1e6);
    let mut table = Vec::new();
    for &&(key, label, _, _, _) in &rows {
        // The halves only explain the paths: fewer runs keep the whole bench well under a minute.
        let (runs, warmup) = if key.contains('-') && o.path.is_none() { (o.runs.div_ceil(2), 1) } else { (o.runs, o.warmup) };
        let (t, body) = match key {
            "base64" => (time(runs, warmup, || path(&b64, bind_binary)), mb(b64.bytes())),
            "float" => (time(runs, warmup, || path(&float, bind_binary)), mb(float.bytes())),
            "text" => (time(runs, warmup, || path(&float, |v| bind_text(v.iter()))), mb(float.bytes())),
            "decode-base64" => (time(runs, warmup, || path(&b64, discard)), mb(b64.bytes())),
            "decode-float" => (time(runs, warmup, || path(&float, discard)), mb(float.bytes())),
            "encode-binary" => (time(runs, warmup, || flat.iter().map(|v| encode_binary(black_box(v))).sum()), "-".into()),
            "encode-text" => (time(runs, warmup, || flat.iter().map(|v| bind_text(black_box(v).iter().copied())).sum()), "-".into()),
            _ => unreachable!(),
        };
        let sent = if t.out == 0 { "-".into() } else { mb(t.out) };
        table.push(format!("| {label} | {:.2} | {:.2} | {body} | {sent} |", ms(t.median), ms(t.min)));
    }
    if o.quiet {
        return;
    }
    println!(
        "per 1,000 dual embeddings (1 x {} + 1 x {} dims each; {PER_BODY} items per body; {} values a run; median and min of {} runs after {} warm-up, parts {} after 1; {heap})",
        LARGE.1,
        SMALL.1,
        o.values,
        o.runs,
        o.warmup,
        o.runs.div_ceil(2)
    );
    println!();
    println!("| path | median ms | min ms | provider body MB | sent to Postgres MB |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for line in table {
        println!("{line}");
    }
}
