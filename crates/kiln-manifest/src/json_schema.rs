//! The manifest's JSON Schema (draft 2020-12), rendered from the same tree the validator uses.
//!
//! Editors use it to complete and check `kiln.toml` (e.g. taplo's `#:schema` directive). It is
//! committed as docs/specs/manifest/kiln.schema.json, and a test fails when the file and this
//! output differ. Rules the schema language cannot say (a check's timeout at most its interval,
//! hostnames only on tls services, ...) are the validator's alone.

use serde_json::{json, Map, Value};

use crate::schema::{self, Default, Field, Table, Ty};

/// Named definitions, so that a table used in several places is written once.
fn defs() -> [(&'static str, &'static Table); 11] {
    [
        ("check", &schema::CHECK),
        ("concurrency", &schema::CONCURRENCY),
        ("deploy", &schema::DEPLOY),
        ("metrics", &schema::METRICS),
        ("mount", &schema::MOUNT),
        ("process", &schema::PROCESS),
        ("restart", &schema::RESTART),
        ("scale", &schema::SCALE),
        ("secrets", &schema::SECRETS),
        ("service", &schema::SERVICE),
        ("vm", &schema::VM),
    ]
}

/// The docs header of the committed file (docs/ requires one in every file; JSON has no
/// comments, so it is the schema's `$comment`).
const DOC_HEADER: &str = "Status: built · Owner: manifest · Last reviewed: 2026-11-26";

const NAME_PATTERN: &str = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";

/// The JSON Schema of `kiln.toml`.
pub fn json_schema() -> Value {
    let mut root = table(&schema::MANIFEST);
    let defs: Map<String, Value> = defs()
        .iter()
        .map(|(name, t)| ((*name).to_owned(), table(t)))
        .collect();
    let obj = root.as_object_mut().expect("a table renders as an object");
    obj.insert(
        "$schema".into(),
        "https://json-schema.org/draft/2020-12/schema".into(),
    );
    obj.insert("title".into(), "kiln.toml".into());
    obj.insert("$comment".into(), DOC_HEADER.into());
    obj.insert("$defs".into(), Value::Object(defs));
    root
}

/// [`json_schema`] as the text committed under docs/specs/manifest/.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    s.push('\n');
    s
}

fn reference(t: &'static Table) -> Value {
    let name = defs()
        .iter()
        .find(|(_, d)| std::ptr::eq(*d, t))
        .map(|(n, _)| *n)
        .unwrap_or("unknown");
    json!({ "$ref": format!("#/$defs/{name}") })
}

fn table(t: &'static Table) -> Value {
    let properties: Map<String, Value> = t
        .fields
        .iter()
        .map(|f| (f.name.to_owned(), field(f)))
        .collect();
    let required: Vec<&str> = t
        .fields
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name)
        .collect();
    let mut v = json!({
        "type": "object",
        "description": t.doc,
        "additionalProperties": false,
        "properties": properties,
    });
    if !required.is_empty() {
        v["required"] = json!(required);
    }
    v
}

fn field(f: &Field) -> Value {
    let mut v = ty(f.ty);
    let mut doc = f.doc.to_owned();
    match f.default {
        Some(Default::Str(s)) => v["default"] = json!(s),
        Some(Default::Int(n)) => v["default"] = json!(n),
        Some(Default::Bool(b)) => v["default"] = json!(b),
        Some(Default::Derived(d)) => doc.push_str(&format!(" Default: {d}.")),
        None => {}
    }
    // A `$ref` cannot carry siblings in every validator; wrap it.
    if v.get("$ref").is_some() {
        v = json!({ "allOf": [v] });
    }
    v["description"] = json!(doc);
    v
}

fn ty(t: Ty) -> Value {
    match t {
        Ty::Str => json!({ "type": "string" }),
        Ty::Name => json!({ "type": "string", "pattern": NAME_PATTERN }),
        Ty::Int { min, max } => json!({ "type": "integer", "minimum": min, "maximum": max }),
        Ty::IntStep { min, max, step } => {
            json!({ "type": "integer", "minimum": min, "maximum": max, "multipleOf": step })
        }
        Ty::Bool => json!({ "type": "boolean" }),
        Ty::Duration => json!({
            "type": "string",
            "minLength": 2,
            "pattern": "^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$"
        }),
        Ty::Size => json!({
            "type": "string",
            "pattern": "^[0-9]+ *([mMgGtT][iI]?[bB])$"
        }),
        Ty::Enum(values) => json!({ "type": "string", "enum": values }),
        Ty::Command => json!({
            "oneOf": [
                { "type": "string", "minLength": 1 },
                { "type": "array", "items": { "type": "string" }, "minItems": 1 }
            ]
        }),
        Ty::Names => json!({
            "type": "array",
            "items": { "type": "string", "pattern": NAME_PATTERN },
            "uniqueItems": true
        }),
        Ty::Hostnames => json!({
            "type": "array",
            "items": { "type": "string", "format": "hostname" },
            "uniqueItems": true
        }),
        Ty::Ports => json!({
            "type": "array",
            "items": { "type": "integer", "minimum": 1, "maximum": 65535 },
            "uniqueItems": true
        }),
        Ty::CountOrPercent => json!({
            "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": crate::MAX_COUNT },
                { "type": "string", "pattern": "^([1-9][0-9]?|100)%$" }
            ]
        }),
        Ty::EnvMap => json!({
            "type": "object",
            "propertyNames": { "pattern": "^[A-Za-z_][A-Za-z0-9_]*$" },
            "additionalProperties": { "type": "string" }
        }),
        Ty::RegionCounts => json!({
            "type": "object",
            "propertyNames": { "pattern": NAME_PATTERN },
            "additionalProperties": { "type": "integer", "minimum": 0, "maximum": crate::MAX_COUNT }
        }),
        Ty::Table(t) => reference(t),
        Ty::Tables(t) => json!({ "type": "array", "items": reference(t) }),
        Ty::NamedTables(t) => json!({
            "type": "object",
            "minProperties": 1,
            "propertyNames": { "pattern": NAME_PATTERN },
            "additionalProperties": reference(t)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_of_the_tree_has_a_definition() {
        fn walk(t: &'static Table, seen: &mut Vec<*const Table>) {
            for f in t.fields {
                if let Ty::Table(sub) | Ty::Tables(sub) | Ty::NamedTables(sub) = f.ty {
                    if !seen.contains(&(sub as *const Table)) {
                        seen.push(sub);
                        walk(sub, seen);
                    }
                }
            }
        }
        let mut seen = Vec::new();
        walk(&schema::MANIFEST, &mut seen);
        assert_eq!(seen.len(), defs().len());
        for t in seen {
            assert!(defs().iter().any(|(_, d)| std::ptr::eq(*d, t)));
        }
        let text = json_schema_text();
        assert!(!text.contains("#/$defs/unknown"));
    }
}
