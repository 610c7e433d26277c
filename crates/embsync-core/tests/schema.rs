//! `schema/embedding-sources.schema.json` and [`Config::parse`] agree.
//!
//! Every file under `tests/config-examples/` is checked by both: the worker's parser and a JSON
//! Schema (draft 2020-12) validator.
//!
//! - `good/`: both accept.
//! - `bad/`: both reject, each file breaking one rule (named by the file), and at the same place
//!   in the document.
//! - `bad-parser-only/`: rules a JSON Schema cannot state (see its README.md): the parser
//!   rejects, the schema accepts. Keeping them here keeps the schema's blind spots listed.
//!
//! The repository's own `embedding-sources.json` and the full configs in README.md are good
//! examples too.

use boon::{Compiler, ErrorKind, SchemaIndex, Schemas, ValidationError};
use embsync_core::config::{Config, ConfigError};
use expect_test::{expect, Expect};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn schema_path() -> PathBuf {
    repo().join("schema/embedding-sources.schema.json")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The schema, compiled. Compiling also checks it against its meta-schema.
struct Validator {
    schemas: Schemas,
    index: SchemaIndex,
}

impl Validator {
    fn new() -> Validator {
        let schema: Value = serde_json::from_str(&read(&schema_path())).expect("the schema is JSON");
        let mut compiler = Compiler::new();
        let mut schemas = Schemas::new();
        compiler.add_resource("file:///embedding-sources.schema.json", schema).expect("a valid location");
        let index = compiler.compile("file:///embedding-sources.schema.json", &mut schemas).unwrap_or_else(|e| panic!("{e:#}"));
        Validator { schemas, index }
    }

    /// `Ok`, or the instance locations (JSON pointers) of every error in the tree.
    fn check(&self, text: &str) -> Result<(), Vec<String>> {
        let instance: Value = serde_json::from_str(text).expect("examples are JSON documents");
        self.schemas.validate(&instance, self.index).map_err(|e| {
            let mut locations = Vec::new();
            collect_locations(&e, &mut locations);
            locations
        })
    }
}

/// An unknown key is reported at its object by the schema and at the key by the parser: both are
/// collected.
fn collect_locations(e: &ValidationError, out: &mut Vec<String>) {
    let at = e.instance_location.to_string();
    if let ErrorKind::AdditionalProperties { got } = &e.kind {
        out.extend(got.iter().map(|key| format!("{at}/{key}")));
    }
    out.push(at);
    for cause in &e.causes {
        collect_locations(cause, out);
    }
}

/// The parser's error path (`sources[1].table`, `.` for the document) as a JSON pointer.
fn pointer(err: &ConfigError) -> String {
    let mut out = String::new();
    for part in err.path.split('.').filter(|p| !p.is_empty()) {
        let (key, index) = match part.split_once('[') {
            Some((key, rest)) => (key, Some(rest.trim_end_matches(']'))),
            None => (part, None),
        };
        if !key.is_empty() {
            out.push('/');
            out.push_str(key);
        }
        if let Some(index) = index {
            out.push('/');
            out.push_str(index);
        }
    }
    out
}

/// Every `*.json` in a folder of examples, sorted by name: (file name, text).
fn examples(folder: &str) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config-examples").join(folder);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), read(&path)))
        .collect();
    files.sort();
    files
}

/// The ```json blocks of README.md that are whole configs (they have a `version`).
fn readme_configs() -> Vec<(String, String)> {
    let readme = read(&repo().join("README.md"));
    readme
        .split("```json\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter(|block| block.contains("\"version\""))
        .enumerate()
        .map(|(i, block)| (format!("README.md config #{}", i + 1), block.to_owned()))
        .collect()
}

/// Both must accept every example; returns the count.
fn assert_both_accept(validator: &Validator, examples: &[(String, String)]) -> usize {
    let mut problems = Vec::new();
    for (name, text) in examples {
        if let Err(e) = Config::parse(text) {
            problems.push(format!("{name}: the parser rejects it: {e}"));
        }
        if let Err(locations) = validator.check(text) {
            problems.push(format!("{name}: the schema rejects it at {locations:?}"));
        }
    }
    assert!(problems.is_empty(), "good configs must pass both:\n{}", problems.join("\n"));
    examples.len()
}

#[test]
fn good_examples_pass_the_parser_and_the_schema() {
    let validator = Validator::new();
    let good = examples("good");
    assert!(good.len() >= 20, "only {} good examples", good.len());
    assert_both_accept(&validator, &good);
}

#[test]
fn the_shipped_config_and_the_readme_configs_pass_both() {
    let validator = Validator::new();
    let mut configs = vec![("embedding-sources.json".to_owned(), read(&repo().join("embedding-sources.json")))];
    let readme = readme_configs();
    assert!(!readme.is_empty(), "README.md shows a whole config in a ```json block");
    configs.extend(readme);
    assert_both_accept(&validator, &configs);
}

#[test]
fn the_shipped_config_points_editors_at_the_schema() {
    let shipped: Value = serde_json::from_str(&read(&repo().join("embedding-sources.json"))).unwrap();
    let reference = shipped["$schema"].as_str().expect("embedding-sources.json has a \"$schema\" string");
    assert!(!reference.contains("://"), "a relative path works offline and follows the checkout: {reference}");
    let target = repo().join(reference).canonicalize().unwrap_or_else(|e| panic!("$schema {reference:?} does not resolve: {e}"));
    assert_eq!(target, schema_path().canonicalize().unwrap());
}

/// Both reject each bad example, and the schema's errors include the field the parser names:
/// they reject it for the same reason, not by accident. The parser's messages are the snapshot.
#[test]
fn bad_examples_fail_the_parser_and_the_schema_at_the_same_field() {
    let validator = Validator::new();
    let bad = examples("bad");
    let mut problems = Vec::new();
    let mut messages = String::new();
    for (name, text) in &bad {
        let parsed = Config::parse(text);
        let checked = validator.check(text);
        match (&parsed, &checked) {
            (Ok(_), _) => problems.push(format!("{name}: the parser accepts it")),
            (_, Ok(())) => problems.push(format!("{name}: the schema accepts it")),
            (Err(e), Err(locations)) => {
                let at = pointer(e);
                if !locations.contains(&at) {
                    problems.push(format!("{name}: the parser rejects {at:?} ({e}) but the schema only {locations:?}"));
                }
                messages.push_str(&format!("{name}: {e}\n"));
            }
        }
    }
    assert!(problems.is_empty(), "bad configs must fail both, at the same field:\n{}", problems.join("\n"));
    assert!(bad.len() >= 60, "only {} bad examples", bad.len());
    check_messages(
        &messages,
        expect![[r#"
            batchApi-as-boolean.json: batchApi: invalid type: boolean `true`, expected a JSON object at line 14 column 18
            batchApi-minValues-0.json: batchApi.minValues: must be at least 1 (the fewest pending values of a model that go through the Batch API)
            batchApi-minValues-string.json: batchApi.minValues: invalid type: string "10000", expected u64 at line 16 column 24
            batchApi-missing-enabled.json: batchApi: missing field `enabled` at line 16 column 3
            batchApi-unknown-key.json: batchApi.threshold: unknown field `threshold`, expected `enabled` or `minValues` at line 16 column 15
            batchSize-0.json: batchSize: 0 is out of range: use 1..=2048 (the provider takes at most 2048 inputs per request)
            batchSize-2049.json: batchSize: 2049 is out of range: use 1..=2048 (the provider takes at most 2048 inputs per request)
            batchSize-fractional.json: batchSize: invalid type: floating point `10.5`, expected u64 at line 14 column 19
            batchSize-negative.json: batchSize: invalid value: integer `-1`, expected u64 at line 14 column 17
            batchSize-string.json: batchSize: invalid type: string "100", expected u64 at line 14 column 20
            column-64-bytes.json: sources[0].column: "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc" is longer than 63 bytes
            column-empty.json: sources[0].column: is empty
            column-not-a-string.json: sources[0].column: invalid type: sequence, expected a string at line 11 column 16
            column-qualified.json: sources[0].column: "config_option.description" is not a valid identifier: '.' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            column-starts-with-digit.json: sources[0].column: "2nd" is not a valid identifier: '2' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            column-with-quote.json: sources[0].column: "label\"--" is not a valid identifier: '"' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            massDeleteMinimum-negative.json: massDeleteMinimum: invalid value: integer `-1`, expected u64 at line 14 column 25
            maxDeleteShare-negative.json: maxDeleteShare: -0.1 is not a share: use a number from 0 to 1
            maxDeleteShare-over-1.json: maxDeleteShare: 1.5 is not a share: use a number from 0 to 1
            maxDeleteShare-percent-string.json: maxDeleteShare: invalid type: string "50%", expected f64 at line 14 column 25
            maxTokensPerRun-0.json: maxTokensPerRun: must be at least 1 (leave it out for no limit)
            maxTokensPerRun-negative.json: maxTokensPerRun: invalid value: integer `-5`, expected u64 at line 14 column 23
            missing-models.json: .: missing field `models` at line 10 column 1
            missing-sources.json: .: missing field `sources` at line 7 column 1
            missing-version.json: .: missing field `version` at line 13 column 1
            model-as-array.json: models.large: invalid type: sequence, expected a model name or {"name": "...", "dimensions": N} at line 5 column 6
            model-deployment-65-chars.json: models.large.deployment: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit
            model-deployment-empty.json: models.large.deployment: "" is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit
            model-deployment-number.json: models.large.deployment: invalid type: integer `3`, expected a string at line 4 column 64
            model-deployment-starts-with-dot.json: models.large.deployment: ".." is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit
            model-deployment-with-slash.json: models.large.deployment: "emb/large" is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit
            model-deployment-with-space.json: models.large.deployment: "emb large" is not an Azure deployment name: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit
            model-dimensions-0.json: models.small.dimensions: must be at least 1
            model-dimensions-fractional.json: models.small.dimensions: invalid type: floating point `512.5`, expected u32 at line 7 column 25
            model-dimensions-negative.json: models.small.dimensions: invalid value: integer `-1`, expected u32 at line 7 column 22
            model-dimensions-over-ada-native.json: models.small.dimensions: 2048 is more than text-embedding-ada-002 produces (1536)
            model-dimensions-over-large-native.json: models.large.dimensions: 3073 is more than text-embedding-3-large produces (3072)
            model-dimensions-over-pgvector.json: models.large.dimensions: 16001 is more than pgvector stores (16000)
            model-dimensions-over-small-native.json: models.small.dimensions: 1537 is more than text-embedding-3-small produces (1536)
            model-dimensions-string.json: models.small.dimensions: invalid type: string "512", expected u32 at line 7 column 25
            model-empty-name.json: models.small: model name is empty
            model-name-not-exact.json: models.small: unknown model "Text-Embedding-3-Small": give its vector size as {"name": "Text-Embedding-3-Small", "dimensions": N}
            model-null.json: models.large: invalid type: null, expected a model name or {"name": "...", "dimensions": N} at line 4 column 17
            model-number.json: models.large: invalid type: integer `3072`, expected a model name or {"name": "...", "dimensions": N} at line 4 column 17
            model-object-blank-name.json: models.small: model name is empty
            model-object-missing-name.json: models.small: missing field `name` at line 7 column 5
            model-object-unknown-key.json: models.small.dims: unknown field `dims`, expected one of `name`, `dimensions`, `pricePerMillionTokens`, `deployment` at line 7 column 12
            model-price-negative.json: models.large.pricePerMillionTokens: -0.13 is not a price: use a number of US dollars, 0 or more
            model-price-string.json: models.large.pricePerMillionTokens: invalid type: string "0.13", expected f64 at line 6 column 37
            model-unknown-name.json: models.small: unknown model "my-model": give its vector size as {"name": "my-model", "dimensions": N}
            model-unknown-object-dimensions-null.json: models.small: unknown model "my-model": give its vector size as {"name": "my-model", "dimensions": N}
            model-unknown-object-without-dimensions.json: models.small: unknown model "my-model": give its vector size as {"name": "my-model", "dimensions": N}
            models-as-array.json: models: invalid type: sequence, expected a JSON object at line 3 column 12
            models-missing-small.json: models: missing field `small` at line 5 column 3
            models-unknown-slot.json: models.medium: unknown field `medium`, expected `large` or `small` at line 6 column 12
            not-an-object.json: .: invalid type: sequence, expected a JSON object at line 1 column 0
            rate-maxConcurrency-0.json: rate.maxConcurrency: 0 is out of range: use 1..=5 (a Worker invocation has six connections, one of which is the database's), or leave it out for 5
            rate-maxConcurrency-6.json: rate.maxConcurrency: 6 is out of range: use 1..=5 (a Worker invocation has six connections, one of which is the database's), or leave it out for 5
            rate-requestsPerMinute-0.json: rate.requestsPerMinute: must be at least 1 (leave it out for no ceiling)
            rate-tokensPerMinute-0.json: rate.tokensPerMinute: must be at least 1 (leave it out for no ceiling)
            rate-tokensPerMinute-string.json: rate.tokensPerMinute: invalid type: string "1M", expected u64 at line 15 column 27
            rate-unknown-key.json: rate.burst: unknown field `burst`, expected one of `maxConcurrency`, `requestsPerMinute`, `tokensPerMinute` at line 16 column 11
            retention-runs-0.json: retention.runs: must be at least 1: the runs table keeps this many finished runs
            retention-runs-string.json: retention.runs: invalid type: string "100", expected u64 at line 15 column 17
            retention-unknown-key.json: retention.days: unknown field `days`, expected `runs` at line 16 column 10
            schema-not-a-string.json: $schema: invalid type: integer `5`, expected a string at line 14 column 14
            source-allowMassDelete-number.json: sources[0].allowMassDelete: invalid type: integer `1`, expected a boolean at line 12 column 26
            source-as-array.json: sources[0]: invalid type: sequence, expected a JSON object at line 8 column 4
            source-changes-unknown.json: sources[0].changes: "triggers" is not a mode: use "scan" or "capture"
            source-enabled-string.json: sources[0].enabled: invalid type: string "true", expected a boolean at line 12 column 23
            source-missing-column.json: sources[0]: missing field `column` at line 11 column 5
            source-missing-name.json: sources[0]: missing field `name` at line 11 column 5
            source-missing-table.json: sources[0]: missing field `table` at line 11 column 5
            source-name-blank.json: sources[0].name: is empty: give the source a name
            source-name-empty.json: sources[0].name: is empty: give the source a name
            source-name-number.json: sources[0].name: invalid type: integer `7`, expected a string at line 9 column 15
            source-name-unicode-blank.json: sources[0].name: is empty: give the source a name
            source-reconcileEvery-no-unit.json: sources[0].reconcileEvery: "24" is not a duration: write a whole number and s, m, h or d, e.g. "24h"
            source-reconcileEvery-number.json: sources[0].reconcileEvery: invalid type: integer `24`, expected a string at line 13 column 26
            source-reconcileEvery-zero.json: sources[0].reconcileEvery: "0h" is not a duration: write a whole number and s, m, h or d, e.g. "24h"
            source-unknown-key.json: sources[0].colour: unknown field `colour`, expected one of `name`, `table`, `column`, `enabled`, `allowMassDelete`, `changes`, `reconcileEvery` at line 12 column 14
            sources-empty.json: sources: is empty: list at least one source
            sources-not-an-array.json: sources: invalid type: map, expected a sequence at line 7 column 13
            table-64-bytes.json: sources[0].table: "tttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttt" is longer than 63 bytes
            table-empty.json: sources[0].table: is empty
            table-leading-dot.json: sources[0].table: ".items" is not a valid table name: use `table` or `schema.table`
            table-non-ascii.json: sources[0].table: "tåble" is not a valid identifier: 'å' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-quoted.json: sources[0].table: "\"config_option\"" is not a valid identifier: '"' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-schema-part-64-bytes.json: sources[0].table: "ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss" is longer than 63 bytes
            table-sql-injection.json: sources[0].table: "x; drop table y" is not a valid identifier: ';' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-starts-with-digit.json: sources[0].table: "1items" is not a valid identifier: '1' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-starts-with-dollar.json: sources[0].table: "$items" is not a valid identifier: '$' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-three-parts.json: sources[0].table: "db.app.items" is not a valid table name: use `table` or `schema.table`
            table-trailing-dot.json: sources[0].table: "app." is not a valid table name: use `table` or `schema.table`
            table-trailing-newline.json: sources[0].table: "config_option\n" is not a valid identifier: '\n' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-with-hyphen.json: sources[0].table: "config-option" is not a valid identifier: '-' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            table-with-space.json: sources[0].table: "config option" is not a valid identifier: ' ' is not allowed (use letters, digits, _ and $, starting with a letter or _)
            top-level-as-array.json: .: invalid type: sequence, expected a JSON object at line 1 column 0
            unknown-top-level-key.json: extra: unknown field `extra`, expected one of `$schema`, `version`, `models`, `batchSize`, `maxTokensPerRun`, `maxDeleteShare`, `massDeleteMinimum`, `vectorIndexes`, `retention`, `rate`, `batchApi`, `sources` at line 14 column 9
            vectorIndexes-as-array.json: vectorIndexes: invalid type: sequence, expected a JSON object at line 14 column 19
            vectorIndexes-as-boolean.json: vectorIndexes: invalid type: boolean `true`, expected a JSON object at line 14 column 23
            vectorIndexes-efConstruction-1001.json: vectorIndexes.efConstruction: 1001 is out of range: use 4..=1000 (pgvector's limits; 64 is a good default)
            vectorIndexes-efConstruction-3.json: vectorIndexes.efConstruction: 3 is out of range: use 4..=1000 (pgvector's limits; 64 is a good default)
            vectorIndexes-enabled-string.json: vectorIndexes.enabled: invalid type: string "yes", expected a boolean at line 15 column 20
            vectorIndexes-m-1.json: vectorIndexes.m: 1 is out of range: use 2..=100 (pgvector's limits; 16 is a good default)
            vectorIndexes-m-101.json: vectorIndexes.m: 101 is out of range: use 2..=100 (pgvector's limits; 16 is a good default)
            vectorIndexes-m-fractional.json: vectorIndexes.m: invalid type: floating point `16.5`, expected u16 at line 16 column 13
            vectorIndexes-missing-enabled.json: vectorIndexes: missing field `enabled` at line 16 column 3
            vectorIndexes-unknown-key.json: vectorIndexes.lists: unknown field `lists`, expected one of `enabled`, `m`, `efConstruction` at line 16 column 11
            version-1-without-dot.json: version: unsupported version "1x": this build reads version 1.x
            version-10.json: version: unsupported version "10": this build reads version 1.x
            version-2.json: version: unsupported version "2.0": this build reads version 1.x
            version-as-number.json: version: invalid type: floating point `1.0`, expected a string at line 2 column 16
            version-null.json: version: invalid type: null, expected a string at line 2 column 17
        "#]],
    );
}

/// What a JSON Schema cannot say is listed, not hidden: the parser rejects these, the schema
/// accepts them. When the schema learns to reject one, move it to `bad/`.
#[test]
fn rules_only_the_parser_checks_are_listed_in_bad_parser_only() {
    let validator = Validator::new();
    let mut problems = Vec::new();
    let mut messages = String::new();
    for (name, text) in examples("bad-parser-only") {
        match Config::parse(&text) {
            Ok(_) => problems.push(format!("{name}: the parser accepts it")),
            Err(e) => messages.push_str(&format!("{name}: {e}\n")),
        }
        if let Err(locations) = validator.check(&text) {
            problems.push(format!("{name}: the schema rejects it too (at {locations:?}): move it to bad/"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    check_messages(
        &messages,
        expect![[r#"
            batchSize-written-with-fraction.json: batchSize: invalid type: floating point `100.0`, expected u64 at line 4 column 20
            duplicate-key.json: .: duplicate field `version` at line 3 column 11
            duplicate-source-name-after-trim.json: sources[1].name: duplicate source name "Titles": names must be unique
            duplicate-source-name.json: sources[1].name: duplicate source name "Titles": names must be unique
            duplicate-table-column-pair.json: sources[1].column: duplicate source app.items.title: each table/column pair may be listed once
            vectorIndexes-efConstruction-below-2m.json: vectorIndexes.efConstruction: 64 is less than 2 * m (96): pgvector needs efConstruction >= 2 * m
        "#]],
    );
}

fn check_messages(actual: &str, expect: Expect) {
    expect.assert_eq(actual);
}

#[test]
fn the_schema_is_valid_draft_2020_12() {
    const META: &str = "https://json-schema.org/draft/2020-12/schema";
    let mut compiler = Compiler::new();
    let mut schemas = Schemas::new();
    let meta = compiler.compile(META, &mut schemas).unwrap_or_else(|e| panic!("the 2020-12 meta-schema is built in: {e:#}"));
    let schema: Value = serde_json::from_str(&read(&schema_path())).unwrap();
    assert_eq!(schema["$schema"], META, "the schema declares draft 2020-12");
    if let Err(e) = schemas.validate(&schema, meta) {
        panic!("the schema does not match the draft 2020-12 meta-schema: {e:#}");
    }
    // The meta-schema check is not vacuous: a misspelt type fails it.
    let mut broken = schema.clone();
    broken["properties"]["batchSize"]["type"] = Value::from("integr");
    assert!(schemas.validate(&broken, meta).is_err(), "the meta-schema must reject \"type\": \"integr\"");
    // Every field has help for editors.
    let undocumented = undocumented_properties(&schema);
    assert!(undocumented.is_empty(), "properties without a description: {undocumented:?}");
}

/// Properties (at any depth) whose schema has no `description`, directly or through a local
/// `$ref`. Conditions (`if`/`then`) only restate properties described elsewhere.
fn undocumented_properties(schema: &Value) -> Vec<String> {
    fn walk(root: &Value, node: &Value, at: &str, out: &mut Vec<String>) {
        let Some(obj) = node.as_object() else { return };
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (key, sub) in props {
                let path = format!("{at}/{key}");
                let target = sub.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')).and_then(|p| root.pointer(p));
                if sub.get("description").is_none() && target.is_none_or(|t| t.get("description").is_none()) {
                    out.push(path.clone());
                }
                walk(root, sub, &path, out);
            }
        }
        if let Some(defs) = obj.get("$defs").and_then(Value::as_object) {
            for (key, sub) in defs {
                walk(root, sub, &format!("{at}/$defs/{key}"), out);
            }
        }
        for key in ["items", "anyOf", "oneOf"] {
            match obj.get(key) {
                Some(Value::Array(subs)) => subs.iter().for_each(|s| walk(root, s, at, out)),
                Some(sub @ Value::Object(_)) => walk(root, sub, at, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, schema, "", &mut out);
    out
}
