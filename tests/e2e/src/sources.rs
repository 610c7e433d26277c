//! The configured sources and the `EMBEDDING_SOURCES` JSON the tests give the worker.

use serde_json::{json, Value};

use crate::{LARGE_MODEL, SMALL_MODEL};

/// One configured source: display name, table, column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Src {
    pub name: &'static str,
    pub table: &'static str,
    pub column: &'static str,
}

pub const OPTION: Src = Src { name: "Option Descriptions", table: "config_option", column: "description" };
pub const POSITION: Src = Src { name: "Attribute Labels", table: "config_position", column: "attribute_label" };
pub const HTB: Src = Src { name: "HTB Attribute Names", table: "htb_attribute_mapping_zebra_provided", column: "attribute_name_for_htb" };
/// The three sources of the compiled-in `embedding-sources.json`, in order.
pub const DEFAULT_SOURCES: [Src; 3] = [OPTION, POSITION, HTB];

/// An `EMBEDDING_SOURCES` JSON in the documented format.
pub fn sources_json(batch_size: u64, sources: &[Src]) -> String {
    let list: Vec<Value> = sources.iter().map(|s| json!({"name": s.name, "table": s.table, "column": s.column, "enabled": true})).collect();
    json!({
        "version": "1.0",
        "models": {"large": LARGE_MODEL, "small": SMALL_MODEL},
        "batchSize": batch_size,
        "sources": list,
    })
    .to_string()
}
