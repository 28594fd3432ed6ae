//! `meta.k8s.io/v1` Table responses, which `kubectl get` asks for (`Accept: ...;as=Table`).
//!
//! Columns: Name, then the CRD's `additionalPrinterColumns` (JSONPath evaluated by
//! `serde_json_path`, filters such as `.status.conditions[?(@.type=="Ready")].status`
//! included; the first result is shown, typed as the real server's tableconvertor does),
//! or a few built-in ones then Age; Events get the real server's event columns.

use serde_json::{Value, json};

use crate::registry::{PrinterColumn, ResourceType};
use crate::store::get_json_path;

/// Evaluates a printer column's JSONPath (Kubernetes syntax: `.a.b[0].c`, `{.a.b}`,
/// filters `[?(@.k=="v")]`) and returns the first result.
pub fn eval_json_path(obj: &Value, path: &str) -> Option<Value> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(p)
        .trim();
    let expr = if p.starts_with('$') {
        p.to_string()
    } else {
        format!("${p}")
    };
    match serde_json_path::JsonPath::parse(&expr) {
        Ok(jp) => jp.query(obj).first().cloned(),
        // Kubernetes allows names RFC 9535 shorthands do not (e.g. with '-'): plain paths
        // still resolve segment by segment.
        Err(_) => get_json_path(obj, p).cloned(),
    }
}

/// A cell as the real server's CRD tableconvertor types it (`cellForJSONValue`; string
/// columns print any value, as its JSONPath printer does).
fn typed_cell(type_: &str, v: Option<Value>) -> Value {
    let Some(v) = v else {
        return Value::Null;
    };
    match (type_, &v) {
        (_, Value::Null) => Value::Null,
        ("string", Value::String(_)) => v,
        ("string", Value::Number(_) | Value::Bool(_)) => json!(v.to_string()),
        ("string", _) => json!(v.to_string()),
        ("integer", Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map_or(Value::Null, |i| json!(i)),
        ("number", Value::Number(n)) => n.as_f64().map_or(Value::Null, |f| json!(f)),
        ("boolean", Value::Bool(_)) => v,
        ("date", Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(_) => json!(age(Some(s))),
            Err(_) => json!("<invalid>"),
        },
        _ => Value::Null,
    }
}

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

/// The column definitions for a type: (name, type, JSONPath).
pub fn columns(t: &ResourceType, version: &str) -> Vec<(String, String, String)> {
    column_defs(t, version)
        .into_iter()
        .map(|c| (c.name, c.type_, c.json_path))
        .collect()
}

/// The column definitions for a type, with priority, description and format.
fn column_defs(t: &ResourceType, version: &str) -> Vec<PrinterColumn> {
    let col = |name: &str, type_: &str, path: &str, format: &str| PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        json_path: path.into(),
        priority: 0,
        description: String::new(),
        format: format.into(),
    };
    let mut cols = vec![col("Name", "string", ".metadata.name", "name")];
    match t.version(version) {
        // A CRD with additionalPrinterColumns gets exactly Name + its columns: the real
        // server (apiextensions tableconvertor) adds no Age of its own; CRDs list it.
        Some(v) if !v.columns.is_empty() => cols.extend(v.columns.iter().cloned()),
        _ => {
            cols.extend(
                builtin_columns(t)
                    .into_iter()
                    .map(|(a, b, c)| col(a, b, c, "")),
            );
            cols.push(col("Age", "date", ".metadata.creationTimestamp", ""));
        }
    }
    cols
}

fn cell(obj: &Value, type_: &str, path: &str) -> Value {
    let v = if is_simple(path) {
        get_json_path(obj, path).cloned()
    } else {
        eval_json_path(obj, path)
    };
    if type_ == "date" && path == ".metadata.creationTimestamp" {
        return json!(age(v.as_ref().and_then(Value::as_str)));
    }
    typed_cell(type_, v)
}

/// The real server's Event columns (`printEvent` in pkg/printers/internalversion):
/// (name, type, priority).
const EVENT_COLUMNS: [(&str, &str, u8); 10] = [
    ("Last Seen", "string", 0),
    ("Type", "string", 0),
    ("Reason", "string", 0),
    ("Object", "string", 0),
    ("Subobject", "string", 1),
    ("Source", "string", 1),
    ("Message", "string", 0),
    ("First Seen", "string", 1),
    ("Count", "string", 1),
    ("Name", "string", 1),
];

/// One Event row, from the core/v1 form (events.k8s.io/v1 objects are converted first).
fn event_cells(ev: &Value) -> Vec<Value> {
    let str_at = |p: &str| ev.pointer(p).and_then(Value::as_str).unwrap_or("");
    let set = |p: &str| Some(str_at(p)).filter(|x| !x.is_empty());
    let event_time = set("/eventTime");
    let (last, count) = if ev.get("series").is_some_and(|s| s.is_object()) {
        (
            set("/series/lastObservedTime"),
            ev.pointer("/series/count").cloned(),
        )
    } else {
        (
            set("/lastTimestamp").or(event_time),
            ev.get("count").cloned(),
        )
    };
    let first = set("/firstTimestamp").or(event_time);
    let component = set("/source/component").or(set("/reportingComponent"));
    let instance = set("/source/host").or(set("/reportingInstance"));
    let source = match (component, instance) {
        (None, _) => String::new(),
        (Some(c), None) => c.to_string(),
        (Some(c), Some(i)) => format!("{c}, {i}"),
    };
    vec![
        json!(age(last)),
        json!(str_at("/type")),
        json!(str_at("/reason")),
        json!(format!(
            "{}/{}",
            str_at("/involvedObject/kind").to_lowercase(),
            str_at("/involvedObject/name")
        )),
        json!(str_at("/involvedObject/fieldPath")),
        json!(source),
        json!(str_at("/message").trim()),
        json!(age(first)),
        json!(count.and_then(|c| c.as_i64()).unwrap_or(0)),
        json!(str_at("/metadata/name")),
    ]
}

/// A `.a.b` path without indexes or filters (built-in columns and most CRD ones).
fn is_simple(path: &str) -> bool {
    path.starts_with('.')
        && path[1..]
            .split('.')
            .all(|seg| !seg.is_empty() && !seg.contains(['[', ']', '?', '@', '*', '{', '}']))
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
    if t.plural == "events" && (t.group.is_empty() || t.group == "events.k8s.io") {
        let defs: Vec<Value> = if with_headers {
            EVENT_COLUMNS
                .iter()
                .map(|(n, ty, p)| json!({"name": n, "type": ty, "format": if *n == "Name" { "name" } else { "" }, "description": "", "priority": p}))
                .collect()
        } else {
            vec![]
        };
        let rows: Vec<Value> = objects
            .iter()
            .map(|o| {
                let core = crate::events::to_storage(t, o);
                json!({"cells": event_cells(&core), "object": row_object(o, include)})
            })
            .collect();
        return json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "columnDefinitions": defs, "rows": rows});
    }
    let cols = column_defs(t, version);
    let defs: Vec<Value> = if with_headers {
        cols.iter()
            .map(|c| json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority}))
            .collect()
    } else {
        vec![]
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": cols.iter().map(|c| cell(o, &c.type_, &c.json_path)).collect::<Vec<_>>(), "object": row_object(o, include)}))
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

    #[test]
    fn json_path_filters_and_typed_cells() {
        let o = json!({"status": {"conditions": [
            {"type": "Scaling", "status": "False"},
            {"type": "Ready", "status": "True", "observedGeneration": 3}
        ], "total": 4.0, "pods": [{"name": "a"}]}, "spec": {"some-field": "x"}});
        let ready = r#".status.conditions[?(@.type=="Ready")].status"#;
        assert_eq!(cell(&o, "string", ready), json!("True"));
        assert_eq!(cell(&o, "string", &format!("{{{ready}}}")), json!("True"));
        assert_eq!(
            cell(
                &o,
                "integer",
                r#".status.conditions[?(@.type=="Ready")].observedGeneration"#
            ),
            json!(3)
        );
        assert_eq!(
            cell(
                &o,
                "string",
                r#".status.conditions[?(@.type=="Gone")].status"#
            ),
            Value::Null
        );
        assert_eq!(cell(&o, "integer", ".status.total"), json!(4));
        assert_eq!(cell(&o, "string", ".status.pods[0].name"), json!("a"));
        assert_eq!(cell(&o, "boolean", ".status.total"), Value::Null);
        assert_eq!(cell(&o, "string", ".spec.some-field"), json!("x"));
    }

    #[test]
    fn event_rows_follow_the_real_printer() {
        let ev = builtins()
            .into_iter()
            .find(|t| t.plural == "events" && t.group == "events.k8s.io")
            .unwrap();
        let o = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "p.1", "namespace": "ns"},
            "regarding": {"kind": "ConnectionPool", "name": "p"}, "note": "scaled to 3 ",
            "reason": "Scaled", "type": "Normal", "reportingController": "tether-operator",
            "reportingInstance": "op-0", "eventTime": "2020-01-01T00:00:00.000000Z"});
        let t = table(&ev, "v1", &[o], "1", "Metadata", true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "Normal");
        assert_eq!(cells[2], "Scaled");
        assert_eq!(cells[3], "connectionpool/p");
        assert_eq!(cells[5], "tether-operator, op-0");
        assert_eq!(cells[6], "scaled to 3");
        assert!(cells[0].as_str().unwrap().ends_with('d'));
        assert_eq!(t["columnDefinitions"][9]["priority"], 1);
    }
}
