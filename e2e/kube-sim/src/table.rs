//! `meta.k8s.io/v1` Table responses, which `kubectl get` asks for (`Accept: ...;as=Table`).
//!
//! Columns: Name, then the CRD's `additionalPrinterColumns` (simple `.a.b` JSON paths;
//! array indexes and filters are not evaluated), or a few built-in ones then Age.

use serde_json::{Value, json};

use crate::registry::ResourceType;
use crate::store::get_json_path;

/// Whether the Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 3 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn builtin_columns(t: &ResourceType) -> Vec<(&'static str, &'static str, &'static str)> {
    match t.plural.as_str() {
        "namespaces" => vec![("Status", "string", ".status.phase")],
        "pods" => vec![
            ("Status", "string", ".status.phase"),
            ("Node", "string", ".spec.nodeName"),
        ],
        "statefulsets" | "deployments" => vec![
            ("Replicas", "integer", ".spec.replicas"),
            ("Ready", "integer", ".status.readyReplicas"),
        ],
        "leases" => vec![("Holder", "string", ".spec.holderIdentity")],
        "services" => vec![
            ("Type", "string", ".spec.type"),
            ("Cluster-IP", "string", ".spec.clusterIP"),
        ],
        _ => vec![],
    }
}

/// The column definitions for a type.
pub fn columns(t: &ResourceType, version: &str) -> Vec<(String, String, String)> {
    let mut cols: Vec<(String, String, String)> =
        vec![("Name".into(), "string".into(), ".metadata.name".into())];
    match t.version(version) {
        // A CRD with additionalPrinterColumns gets exactly Name + its columns: the real
        // server (apiextensions tableconvertor) adds no Age of its own; CRDs list it.
        Some(v) if !v.columns.is_empty() => cols.extend(
            v.columns
                .iter()
                .map(|c| (c.name.clone(), c.type_.clone(), c.json_path.clone())),
        ),
        _ => {
            cols.extend(
                builtin_columns(t)
                    .into_iter()
                    .map(|(a, b, c)| (a.into(), b.into(), c.into())),
            );
            cols.push((
                "Age".into(),
                "date".into(),
                ".metadata.creationTimestamp".into(),
            ));
        }
    }
    cols
}

fn cell(obj: &Value, type_: &str, path: &str) -> Value {
    if type_ == "date" {
        return json!(age(get_json_path(obj, path).and_then(Value::as_str)));
    }
    match get_json_path(obj, path) {
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v.clone(),
        Some(Value::Null) | None => Value::Null,
        Some(other) => json!(other.to_string()),
    }
}

fn row_object(obj: &Value, include: &str) -> Value {
    match include {
        "Object" => obj.clone(),
        "None" => Value::Null,
        _ => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or_default()})
        }
    }
}

/// A Table of `objects`; `with_headers` false leaves out column definitions (watch events after the first).
pub fn table(
    t: &ResourceType,
    version: &str,
    objects: &[Value],
    rv: &str,
    include: &str,
    with_headers: bool,
) -> Value {
    let cols = columns(t, version);
    let defs: Vec<Value> = if with_headers {
        cols.iter()
            .map(|(n, ty, _)| json!({"name": n, "type": ty, "format": if n == "Name" { "name" } else { "" }, "description": "", "priority": 0}))
            .collect()
    } else {
        vec![]
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": cols.iter().map(|(_, ty, p)| cell(o, ty, p)).collect::<Vec<_>>(), "object": row_object(o, include)}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;

    #[test]
    fn lease_table_has_holder_column() {
        let lease = builtins()
            .into_iter()
            .find(|t| t.plural == "leases")
            .unwrap();
        let o = json!({"metadata": {"name": "l", "creationTimestamp": "2020-01-01T00:00:00Z"}, "spec": {"holderIdentity": "a"}});
        let t = table(&lease, "v1", &[o], "5", "Metadata", true);
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 3);
        assert_eq!(t["rows"][0]["cells"][0], "l");
        assert_eq!(t["rows"][0]["cells"][1], "a");
        assert!(t["rows"][0]["cells"][2].as_str().unwrap().ends_with('d'));
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
    }
}
