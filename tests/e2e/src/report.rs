//! Reading the worker's sync reports and dry-run plans.

use serde_json::Value;

/// The entry of `sources[]` (of a plan or a report) whose table is `table`.
pub fn source_entry<'a>(doc: &'a Value, table: &str) -> &'a Value {
    doc["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no sources[] in {doc:#}"))
        .iter()
        .find(|s| s["table"] == table)
        .unwrap_or_else(|| panic!("no source with table {table:?} in {doc:#}"))
}

/// An integer field of a JSON object, panicking with the object when it is missing.
pub fn num(obj: &Value, key: &str) -> i64 {
    obj[key].as_i64().unwrap_or_else(|| panic!("field {key:?} missing or not an integer in {obj:#}"))
}

/// Asserts that the integer fields of `obj` have the expected values (all checked, then reported
/// together).
pub fn assert_counts(what: &str, obj: &Value, expected: &[(&str, i64)]) {
    let wrong: Vec<String> =
        expected.iter().filter(|(k, v)| obj[*k].as_i64() != Some(*v)).map(|(k, v)| format!("{k}: expected {v}, got {}", obj[*k])).collect();
    assert!(wrong.is_empty(), "{what}: {}\nin {obj:#}", wrong.join("; "));
}
