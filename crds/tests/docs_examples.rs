//! Every JSON and YAML example in README.md and docs/ parses into the type it
//! documents, so the docs cannot drift from the product unnoticed:
//!
//! - protocol envelopes (docs/protocol.md, the CLI's output in docs/agent-sdk.md) decode
//!   as `tether_protocol` envelopes;
//! - gateway configuration (docs/configuration.md, docs/routing.md) parses into
//!   `GatewayConfig`, which refuses unknown fields;
//! - pool manifests and spec fragments parse into `ConnectionPool` with no field lost;
//! - chart values name only keys of `charts/tether/values.schema.json`;
//! - an example that is none of these must be named in `OTHER` with what it is, so a
//!   new example gets a decision rather than silence.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tether_crds::ConnectionPool;
use tether_protocol::{AgentMessage, GatewayMessage};

/// Examples that document something outside this repository's types: (file, first
/// line, what it is).
const OTHER: &[(&str, &str, &str)] = &[(
    "docs/observability.md",
    "otlp:",
    "Prometheus' own prometheus.yml",
)];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// (file, language, body) of every fenced json/yaml block.
fn examples() -> Vec<(String, String, String)> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let rel = file.strip_prefix(root()).unwrap().display().to_string();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(lang) = line.trim_start().strip_prefix("```") else {
                continue;
            };
            let lang = lang.trim().to_owned();
            let mut body = String::new();
            for inner in lines.by_ref() {
                if inner.trim_start().starts_with("```") {
                    break;
                }
                body.push_str(inner);
                body.push('\n');
            }
            if matches!(lang.as_str(), "json" | "yaml" | "yml") {
                out.push((rel.clone(), lang, body));
            }
        }
    }
    out
}

/// Every path of `doc` (objects only) must exist in `parsed`: a field the type does not
/// know would vanish on the round trip.
fn lost_fields(doc: &Value, parsed: &Value, path: &str, out: &mut Vec<String>) {
    if let (Value::Object(d), Value::Object(p)) = (doc, parsed) {
        for (key, value) in d {
            let here = format!("{path}.{key}");
            match p.get(key) {
                Some(next) => lost_fields(value, next, &here, out),
                None => out.push(here),
            }
        }
    }
    if let (Value::Array(d), Value::Array(p)) = (doc, parsed) {
        for (i, (a, b)) in d.iter().zip(p).enumerate() {
            lost_fields(a, b, &format!("{path}[{i}]"), out);
        }
    }
}

fn minimal_pool() -> Value {
    serde_json::json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "acme", "namespace": "tenants"},
        "spec": {
            "tenant": "acme",
            "replicas": {"min": 1, "max": 1},
            "auth": {"jwt": {"secretRef": {"name": "j", "key": "k"}},
                     "apiKeysSecretRef": {"name": "a", "key": "k"}},
        },
    })
}

fn check_pool(doc: &Value) -> Result<(), String> {
    let pool: ConnectionPool = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&pool).unwrap();
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!("fields ConnectionPool does not know: {lost:?}"))
    }
}

/// Keys of a chart values example that the values schema does not define.
fn unknown_values(doc: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(map) = doc else { return };
    for (key, value) in map {
        let here = format!("{path}.{key}");
        match schema["properties"].get(key) {
            Some(sub) => unknown_values(value, sub, &here, out),
            None if schema["additionalProperties"] == Value::Bool(false) => out.push(here),
            None => {}
        }
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn check_json_line(file: &str, line: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}: {line}"))?;
    match file {
        // The CLI's output lines: envelopes from the gateway; a binary frame, which has
        // no envelope, as its length.
        "docs/agent-sdk.md" => {
            if value["type"] == "binary" {
                let ok = value["len"].as_u64().is_some()
                    && value.as_object().is_some_and(|o| o.len() == 2);
                return ok
                    .then_some(())
                    .ok_or_else(|| format!("a binary line is {{type, len}}: {line}"));
            }
            GatewayMessage::decode(line)
                .map(drop)
                .map_err(|e| format!("{e}: {line}"))
        }
        // Upstream events (gateway/src/upstream.rs `Event`).
        "docs/push-api.md" => {
            let kinds = ["message", "request", "connect", "disconnect", "expired"];
            let kind = value["type"].as_str().unwrap_or_default();
            (kinds.contains(&kind) && value["agent_id"].is_string())
                .then_some(())
                .ok_or_else(|| format!("not an upstream event: {line}"))
        }
        _ => {
            if GatewayMessage::decode(line).is_ok() || AgentMessage::decode(line).is_ok() {
                Ok(())
            } else {
                Err(format!("neither a gateway nor an agent envelope: {line}"))
            }
        }
    }
}

fn check(file: &str, lang: &str, body: &str) -> Result<&'static str, String> {
    let first = body
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if let Some((_, _, what)) = OTHER
        .iter()
        .find(|(f, l, _)| *f == file && first.starts_with(l))
    {
        return Ok(what);
    }
    if lang == "json" {
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            check_json_line(file, line)?;
        }
        return Ok("protocol envelopes");
    }
    let doc: Value = serde_yaml::from_str(body).map_err(|e| format!("not YAML: {e}"))?;
    if doc["kind"] == "ConnectionPool" {
        return check_pool(&doc).map(|()| "a pool manifest");
    }
    if doc.get("spec").is_some() {
        let mut pool = minimal_pool();
        merge(&mut pool["spec"], doc["spec"].clone());
        return check_pool(&pool).map(|()| "a pool spec fragment");
    }
    match file {
        "docs/configuration.md" | "docs/routing.md" => {
            serde_yaml::from_str::<tether_config::GatewayConfig>(body)
                .map_err(|e| format!("not a gateway configuration: {e}"))?;
            Ok("gateway configuration")
        }
        "docs/observability.md" | "docs/upgrading.md" | "docs/production.md" | "docs/sizing.md" => {
            let schema: Value = serde_json::from_str(
                &std::fs::read_to_string(root().join("charts/tether/values.schema.json")).unwrap(),
            )
            .unwrap();
            let mut unknown = Vec::new();
            unknown_values(&doc, &schema, "", &mut unknown);
            if unknown.is_empty() {
                Ok("chart values")
            } else {
                Err(format!(
                    "keys the chart's values.schema.json does not define: {unknown:?}"
                ))
            }
        }
        _ => Err("no rule says what this example documents; add one or list it in OTHER".into()),
    }
}

#[test]
fn every_example_in_the_docs_parses_into_the_type_it_documents() {
    let all = examples();
    assert!(all.len() >= 10, "examples found: {}", all.len());
    let mut failures = Vec::new();
    for (file, lang, body) in &all {
        match check(file, lang, body) {
            Ok(what) => eprintln!("{file} ({lang}): {what}"),
            Err(e) => failures.push(format!("{file} ({lang}): {e}\n{body}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_wrong_field_in_an_example_is_caught() {
    let config = "tenant: acme\nlimits:\n  maxConnectionsPerPod: 10\n";
    let err = check("docs/configuration.md", "yaml", config).unwrap_err();
    assert!(err.contains("maxConnectionsPerPod"), "{err}");
    let pool = "apiVersion: tether.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {name: a}\nspec:\n  tenant: a\n  replicas: {min: 1, max: 1}\n  auth: {jwt: {secretRef: {name: j, key: k}}, apiKeysSecretRef: {name: a, key: k}}\n  limits: {maxConnections: 10}\n";
    let err = check("docs/production.md", "yaml", pool).unwrap_err();
    assert!(err.contains(".spec.limits.maxConnections"), "{err}");
    let envelope = r#"{"event":"push","id":"1","data":{}}"#;
    assert!(check("docs/agent-sdk.md", "json", envelope).is_err());
    let values = "monitoring:\n  serviceMonitors: {enabled: true}\n";
    let err = check("docs/observability.md", "yaml", values).unwrap_err();
    assert!(err.contains(".monitoring.serviceMonitors"), "{err}");
}
