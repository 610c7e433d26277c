//! Cost: the dry run's token estimate against what the provider reports, the report's usage and
//! cost, and the per-run token budget.

use std::collections::BTreeSet;

use embsync_e2e::*;
use serde_json::json;

use super::*;

/// Loads `scripts/sample-data.sql` (the product-configurator sample tables) into `db`.
fn load_sample_data(db: &mut TestDb) {
    let path = std::path::Path::new(&env_var("EMBSYNC_REPO")).join("scripts/sample-data.sql");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // psql meta-commands (`\set ...`) are not SQL.
    let sql: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    db.exec(&sql);
}

#[test]
fn dry_run_token_estimate_is_within_10_percent_of_the_provider_usage() {
    let mut db = TestDb::create();
    load_sample_data(&mut db);
    let values: Vec<String> = db
        .text_set(
            "SELECT DISTINCT btrim(description, ' ') FROM config_option \
             WHERE description IS NOT NULL AND btrim(description, ' ') <> ''",
        )
        .into_iter()
        .collect();
    assert!(
        values.len() >= 200,
        "a few hundred values, got {}",
        values.len()
    );
    let (provider, worker) = start_stack(&db, Some(sources_json(100, &[OPTION])));

    let plan = worker.dry_run();
    let entry = source_entry(&plan, OPTION.table);
    assert_counts(
        "dry run",
        entry,
        &[("toEmbed", values.len() as i64), ("deferred", 0)],
    );
    let est_large = num(&entry["estimatedTokens"], "large");
    let est_small = num(&entry["estimatedTokens"], "small");
    // The documented estimate: ceil((19 bytes - 9 characters) / 40) per value
    // (embsync_core::batch::sql_estimate_tokens).
    let by_bytes: i64 = values
        .iter()
        .map(|v| (19 * v.len() as i64 - 9 * v.chars().count() as i64 + 39) / 40)
        .sum();
    assert_eq!(
        est_large, by_bytes,
        "estimatedTokens.large = sum of ceil((19 bytes - 9 chars) / 40)"
    );
    assert_eq!(
        est_small, by_bytes,
        "estimatedTokens.small = sum of ceil((19 bytes - 9 chars) / 40)"
    );
    assert_eq!(plan["totals"]["estimatedTokens"]["large"], json!(est_large));
    // Cost at the default prices (per million tokens): 0.13 for 3-large, 0.02 for 3-small.
    let cost = &entry["estimatedCostUsd"];
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 + b * 1e-3;
    assert!(
        close(float(cost, "large"), est_large as f64 * 0.13 / 1e6),
        "{cost}"
    );
    assert!(
        close(float(cost, "small"), est_small as f64 * 0.02 / 1e6),
        "{cost}"
    );
    assert!(
        close(
            float(cost, "total"),
            float(cost, "large") + float(cost, "small")
        ),
        "{cost}"
    );
    assert!(
        close(
            float(&plan["estimatedCostUsd"], "total"),
            float(cost, "total")
        ),
        "{plan:#}"
    );

    let report = worker.sync();
    assert_counts(
        "sync",
        source_entry(&report, OPTION.table),
        &[("embedded", values.len() as i64), ("errors", 0)],
    );
    let used_large = num(&report["usage"]["large"], "promptTokens");
    let used_small = num(&report["usage"]["small"], "promptTokens");
    assert!(
        close(
            float(&report["usage"], "costUsd"),
            used_large as f64 * 0.13 / 1e6 + used_small as f64 * 0.02 / 1e6
        ),
        "usage.costUsd: {:#}",
        report["usage"]
    );

    // The provider's own count for the same values, in one request.
    let provider_large = provider.prompt_tokens(LARGE_MODEL, &values);
    let provider_small = provider.prompt_tokens(SMALL_MODEL, &values);
    assert_eq!(
        used_large, provider_large,
        "the report's usage is what the provider reported"
    );
    assert_eq!(used_small, provider_small);

    let ratio = est_large as f64 / used_large as f64;
    eprintln!(
        "token estimate: {} values, {} bytes, dry run {est_large} tokens, provider {used_large} \
         tokens, ratio {ratio:.3}",
        values.len(),
        values.iter().map(String::len).sum::<usize>()
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "dry-run estimate {est_large} vs provider usage {used_large}: ratio {ratio:.3} is outside ±10%"
    );
}

/// Single words that are one `cl100k_base` token each (the local provider counts as OpenAI does).
const WORDS: [&str; 15] = [
    "Sensor", "Label", "Tag", "Latch", "Gear", "Dock", "Mount", "Paper", "Print", "Head", "Motor",
    "Panel", "Screen", "Power", "Cover",
];

#[test]
fn a_token_budget_stops_the_run_cleanly_and_the_next_runs_continue() {
    let mut db = db_with_options(&WORDS);
    // Batches of 3 values cost 3 tokens per model, 6 in all: a budget of 10 allows 2 batches
    // (the run stops after the batch that reaches it).
    let cfg = config_with(3, &[OPTION], json!({"maxTokensPerRun": 10}));
    let (provider, worker) = start_stack(&db, Some(cfg));

    let first = worker.sync();
    let entry = source_entry(&first, OPTION.table);
    assert_counts(
        "run 1",
        entry,
        &[
            ("total", 15),
            ("new", 15),
            ("embedded", 6),
            ("errors", 0),
            ("batches", 2),
        ],
    );
    let stopped = first["stopped"]
        .as_str()
        .unwrap_or_else(|| panic!("`stopped` must say why: {first:#}"));
    assert!(
        stopped.contains("budget") || stopped.contains("10"),
        "{stopped}"
    );
    assert_eq!(
        first["usage"]["large"]["promptTokens"],
        json!(6),
        "{first:#}"
    );
    assert_eq!(
        first["usage"]["small"]["promptTokens"],
        json!(6),
        "{first:#}"
    );
    assert_eq!(db.cache_count(), 6, "two committed batches");

    // The next syncs go on where the first stopped: two batches again, then the last one.
    // (Whether their reports count per sync or for the run as a whole is not checked here: the
    // provider's log and the database show what each sync did.)
    let requests_before = provider.requests().len();
    worker.sync();
    assert_eq!(db.cache_count(), 12, "sync 2 also stops after two batches");
    assert_eq!(
        provider.requests().len() - requests_before,
        4,
        "2 batches x 2 models"
    );
    let requests_before = provider.requests().len();
    worker.sync();
    assert_eq!(db.cache_count(), 15);
    assert_eq!(
        provider.requests().len() - requests_before,
        2,
        "the last batch"
    );

    let words: BTreeSet<String> = set_of(&WORDS);
    assert_cache_complete(&mut db, &words);
    assert_each_embedded_once(&provider, &words);

    provider.clear();
    let fourth = worker.sync();
    assert_counts(
        "run 4",
        source_entry(&fourth, OPTION.table),
        &[("new", 0), ("embedded", 0)],
    );
    assert_eq!(fourth["stopped"], json!(null));
    assert!(provider.requests().is_empty());
    assert!(
        !log_lines(&worker, "budget").is_empty(),
        "the worker should log why run 1 stopped"
    );
}
