//! Custom resources against their CRD's structural OpenAPI v3 schema: pruning of unknown
//! fields, defaulting, validation (with the real server's message shapes) and CEL
//! `x-kubernetes-validations`. Pure functions.
//!
//! Order, as in the real server's request pipeline: prune (and drop nulls of non-nullable
//! fields), default, then validate (OpenAPI keywords, then CEL rules).
//!
//! Enforced keywords: type (object, array, string, integer, number, boolean),
//! `x-kubernetes-int-or-string`, nullable, properties, additionalProperties, required,
//! enum, minimum/maximum (+exclusive), minLength/maxLength, pattern, minItems/maxItems,
//! uniqueItems, minProperties/maxProperties, allOf/anyOf/oneOf/not, list-map key
//! uniqueness, `x-kubernetes-preserve-unknown-fields`, `default`. `format` is not checked.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::error::Cause;

/// Prunes unknown fields (those not declared in `properties`, unless the schema preserves
/// unknown fields or declares `additionalProperties`) and drops nulls of non-nullable
/// fields. Returns the pruned fields' paths (for `fieldValidation=Strict|Warn`).
pub fn prune(obj: &mut Value, schema: &Value) -> Vec<String> {
    let mut pruned = Vec::new();
    prune_node(obj, schema, "", true, &mut pruned);
    pruned
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn prune_node(v: &mut Value, schema: &Value, path: &str, root: bool, pruned: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keep_unknown =
                preserves(schema) || schema.get("additionalProperties") == Some(&Value::Bool(true));
            let embedded = root
                || schema
                    .get("x-kubernetes-embedded-resource")
                    .and_then(Value::as_bool)
                    == Some(true);
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_schema = props.and_then(|p| p.get(&k)).or(additional);
                match child_schema {
                    Some(cs) => {
                        let child = m.get_mut(&k).expect("key exists");
                        if child.is_null()
                            && cs.get("nullable").and_then(Value::as_bool) != Some(true)
                        {
                            m.remove(&k);
                            continue;
                        }
                        prune_node(child, cs, &join(path, &k), false, pruned);
                    }
                    None if keep_unknown => {}
                    None => {
                        m.remove(&k);
                        pruned.push(join(path, &k));
                    }
                }
            }
        }
        Value::Array(list) => {
            if let Some(items) = schema.get("items") {
                for (i, e) in list.iter_mut().enumerate() {
                    prune_node(e, items, &format!("{path}[{i}]"), false, pruned);
                }
            }
        }
        _ => {}
    }
}

/// Applies schema `default`s to missing fields (recursively, also inside defaulted values).
pub fn apply_defaults(v: &mut Value, schema: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, ps) in props {
                    if !m.contains_key(k)
                        && let Some(d) = ps.get("default")
                    {
                        m.insert(k.clone(), d.clone());
                    }
                    if let Some(child) = m.get_mut(k) {
                        apply_defaults(child, ps);
                    }
                }
            }
            if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in m.values_mut() {
                    apply_defaults(child, ap);
                }
            }
        }
        Value::Array(list) => {
            if let Some(items) = schema.get("items") {
                for e in list {
                    apply_defaults(e, items);
                }
            }
        }
        _ => {}
    }
}

/// Validates `obj` (and `old`, for CEL transition rules) against the schema.
pub fn validate(obj: &Value, old: Option<&Value>, schema: &Value) -> Vec<Cause> {
    let mut errs = Vec::new();
    validate_node(obj, old, schema, "", true, &mut errs);
    errs
}

/// Go-style rendering of an invalid value in messages.
fn show(v: &Value) -> String {
    match v {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        Value::Null => "\"null\"".into(),
        other => other.to_string(),
    }
}

fn cause(reason: &str, field: &str, message: String) -> Cause {
    Cause {
        reason: reason.into(),
        message,
        field: field.into(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(v: &Value, schema: &Value) -> bool {
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return matches!(type_name(v), "integer" | "string");
    }
    let Some(t) = schema.get("type").and_then(Value::as_str) else {
        return true;
    };
    let actual = type_name(v);
    actual == t
        || (t == "number" && actual == "integer")
        || (v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true))
}

fn validate_node(
    v: &Value,
    old: Option<&Value>,
    schema: &Value,
    path: &str,
    root: bool,
    errs: &mut Vec<Cause>,
) {
    let shown = if path.is_empty() { "<root>" } else { path };
    if !type_ok(v, schema) {
        let t = schema
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("int-or-string");
        errs.push(cause(
            "FieldValueTypeInvalid",
            path,
            format!(
                "Invalid value: {}: {shown} in body must be of type {t}: \"{}\"",
                show(v),
                type_name(v)
            ),
        ));
        return;
    }
    if v.is_null() {
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errs.push(cause(
            "FieldValueNotSupported",
            path,
            format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let excl_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            let excl_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && (x < min || (excl_min && x == min))
            {
                let rel = if excl_min {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                errs.push(cause(
                    "FieldValueInvalid",
                    path,
                    format!(
                        "Invalid value: {v}: {shown} in body should be {rel} {}",
                        schema["minimum"]
                    ),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && (x > max || (excl_max && x == max))
            {
                let rel = if excl_max {
                    "less than"
                } else {
                    "less than or equal to"
                };
                errs.push(cause(
                    "FieldValueInvalid",
                    path,
                    format!(
                        "Invalid value: {v}: {shown} in body should be {rel} {}",
                        schema["maximum"]
                    ),
                ));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                errs.push(cause(
                    "FieldValueTooLong",
                    path,
                    format!("Too long: may not be more than {max} bytes"),
                ));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                errs.push(cause(
                    "FieldValueInvalid",
                    path,
                    format!(
                        "Invalid value: {v}: {shown} in body should be at least {min} chars long"
                    ),
                ));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match compiled(p) {
                    Ok(re) if !re.is_match(s) => errs.push(cause(
                        "FieldValueInvalid",
                        path,
                        format!("Invalid value: {v}: {shown} in body should match '{p}'"),
                    )),
                    Ok(_) => {}
                    Err(e) => errs.push(cause(
                        "FieldValueInvalid",
                        path,
                        format!("Invalid value: {v}: invalid pattern '{p}': {e}"),
                    )),
                }
            }
        }
        Value::Array(list) => {
            let n = list.len() as u64;
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                errs.push(cause(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {n}: must have at most {max} items"),
                ));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                errs.push(cause(
                    "FieldValueInvalid",
                    path,
                    format!("Invalid value: {n}: {shown} in body should have at least {min} items"),
                ));
            }
            let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
            if schema.get("uniqueItems").and_then(Value::as_bool) == Some(true)
                || list_type == Some("set")
            {
                for (i, e) in list.iter().enumerate() {
                    if list[..i].contains(e) {
                        errs.push(cause(
                            "FieldValueDuplicate",
                            &format!("{path}[{i}]"),
                            format!("Duplicate value: {e}"),
                        ));
                    }
                }
            }
            // List-map keys, hashed: duplicates and old-element correlation in one pass
            // each (a pool's status.pods[] has an entry per pod; pairwise scans made every
            // status write quadratic in the pool's size).
            let map_keys: Vec<&str> = if list_type == Some("map") {
                schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if list_type == Some("map") {
                let mut seen = HashSet::with_capacity(list.len());
                for (i, e) in list.iter().enumerate() {
                    if !seen.insert(list_map_key(e, &map_keys)) {
                        let shown_key: Vec<String> = map_keys
                            .iter()
                            .map(|k| format!("\"{k}\":{}", e.get(*k).unwrap_or(&Value::Null)))
                            .collect();
                        errs.push(cause(
                            "FieldValueDuplicate",
                            &format!("{path}[{i}]"),
                            format!(
                                "Duplicate value: map[string]interface {{}}{{{}}}",
                                shown_key.join(", ")
                            ),
                        ));
                    }
                }
            }
            if let Some(items) = schema.get("items") {
                // oldSelf correlation for list items: by key for list-maps, by value for sets.
                let old_list = old.and_then(Value::as_array);
                let old_by_key: HashMap<String, &Value> = match (old_list, list_type) {
                    (Some(ol), Some("map")) => {
                        ol.iter().map(|o| (list_map_key(o, &map_keys), o)).collect()
                    }
                    _ => HashMap::new(),
                };
                for (i, e) in list.iter().enumerate() {
                    let old_e = old_list.and_then(|ol| match list_type {
                        Some("map") => old_by_key.get(&list_map_key(e, &map_keys)).copied(),
                        Some("set") => ol.iter().find(|o| *o == e),
                        _ => None,
                    });
                    validate_node(e, old_e, items, &format!("{path}[{i}]"), false, errs);
                }
            }
        }
        Value::Object(m) => {
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(r) = r.as_str()
                    && !m.contains_key(r)
                {
                    errs.push(cause(
                        "FieldValueRequired",
                        &join(path, r),
                        "Required value".into(),
                    ));
                }
            }
            let n = m.len() as u64;
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && n > max
            {
                errs.push(cause(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {n}: must have at most {max} items"),
                ));
            }
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && n < min
            {
                errs.push(cause(
                    "FieldValueInvalid",
                    path,
                    format!(
                        "Invalid value: {n}: {shown} in body should have at least {min} properties"
                    ),
                ));
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in m {
                if root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    if k == "metadata" {
                        validate_metadata_name(child, props.and_then(|p| p.get("metadata")), errs);
                    }
                    continue;
                }
                if let Some(cs) = props.and_then(|p| p.get(k)).or(additional) {
                    let old_child = old.and_then(|o| o.get(k));
                    validate_node(child, old_child, cs, &join(path, k), false, errs);
                }
            }
        }
        _ => {}
    }
    for (kw, at_least, at_most) in [
        ("allOf", usize::MAX, usize::MAX),
        ("anyOf", 1, usize::MAX),
        ("oneOf", 1, 1),
    ] {
        if let Some(subs) = schema.get(kw).and_then(Value::as_array) {
            let mut passing = 0;
            let mut first_errs = Vec::new();
            for s in subs {
                let mut e = Vec::new();
                validate_node(v, old, s, path, root, &mut e);
                if e.is_empty() {
                    passing += 1;
                } else if first_errs.is_empty() {
                    first_errs = e;
                }
            }
            let ok = if at_least == usize::MAX {
                passing == subs.len()
            } else {
                passing >= at_least && passing <= at_most
            };
            if !ok {
                if kw == "allOf" {
                    errs.extend(first_errs);
                } else {
                    errs.push(cause(
                        "FieldValueInvalid",
                        path,
                        format!(
                            "Invalid value: {}: {shown} in body must match {kw} schemas",
                            show(v)
                        ),
                    ));
                }
            }
        }
    }
    if let Some(not) = schema.get("not") {
        let mut e = Vec::new();
        validate_node(v, old, not, path, root, &mut e);
        if e.is_empty() {
            errs.push(cause(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: {}: {shown} in body should not match the schema in \"not\"",
                    show(v)
                ),
            ));
        }
    }
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        errs.extend(crate::cel::check_rules(rules, v, old, path));
    }
}

/// A schema `pattern` (or a CEL `matches` pattern), compiled once per process (compiling it on every write of every
/// object cost more than the rest of the validation).
pub(crate) fn compiled(pattern: &str) -> Result<regex::Regex, regex::Error> {
    static CACHE: std::sync::LazyLock<parking_lot::Mutex<HashMap<String, regex::Regex>>> =
        std::sync::LazyLock::new(Default::default);
    if let Some(re) = CACHE.lock().get(pattern) {
        return Ok(re.clone());
    }
    let re = regex::Regex::new(pattern)?;
    CACHE.lock().insert(pattern.to_string(), re.clone());
    Ok(re)
}

/// A list-map element's key as a string (its key fields' JSON, in key order), for hashing.
fn list_map_key(e: &Value, keys: &[&str]) -> String {
    let mut out = String::new();
    for k in keys {
        out.push_str(&e.get(*k).unwrap_or(&Value::Null).to_string());
        out.push('\u{0}');
    }
    out
}

fn validate_metadata_name(meta: &Value, schema: Option<&Value>, errs: &mut Vec<Cause>) {
    // The only metadata constraint a CRD schema may express is on metadata.name.
    let (Some(name), Some(s)) = (
        meta.get("name"),
        schema.and_then(|s| s.pointer("/properties/name")),
    ) else {
        return;
    };
    validate_node(name, None, s, "metadata.name", false, errs);
}

/// Drops `metadata` fields that ObjectMeta does not have, as the real server's decoding
/// does for every kind.
pub fn prune_metadata(obj: &mut Value) {
    const KNOWN: &[&str] = &[
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
        "selfLink",
    ];
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        let keep: Map<String, Value> = std::mem::take(m)
            .into_iter()
            .filter(|(k, _)| KNOWN.contains(&k.as_str()))
            .collect();
        *m = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["tenant"], "properties": {
                "tenant": {"type": "string", "maxLength": 8, "pattern": "^[a-z]+$"},
                "replicas": {"type": "object", "properties": {
                    "min": {"type": "integer", "minimum": 0, "default": 1},
                    "max": {"type": "integer", "maximum": 10, "default": 5}},
                    "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min must not exceed max"}]},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": true},
                "immutable": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "is immutable"}]}
            }},
            "status": {"type": "object", "properties": {"n": {"type": "integer"}}}
        }})
    }

    #[test]
    fn prunes_unknown_keeps_preserved() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"},
            "spec": {"tenant": "t", "bogus": 1, "free": {"any": {"x": 1}}, "labels": {"a": "b"}, "mode": null},
            "junk": true});
        let pruned = prune(&mut o, &schema());
        assert_eq!(pruned, vec!["junk", "spec.bogus"]);
        assert_eq!(o["spec"]["free"]["any"]["x"], 1);
        assert_eq!(o["spec"]["labels"]["a"], "b");
        assert!(
            o["spec"].get("mode").is_none(),
            "null of non-nullable field dropped"
        );
        assert_eq!(o["kind"], "K");
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let mut o = json!({"spec": {"tenant": "t", "replicas": {"max": 3}}});
        apply_defaults(&mut o, &schema());
        assert_eq!(o["spec"]["replicas"], json!({"min": 1, "max": 3}));
    }

    fn messages(o: Value, old: Option<Value>) -> Vec<String> {
        validate(&o, old.as_ref(), &schema())
            .into_iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect()
    }

    #[test]
    fn validation_messages_carry_field_paths() {
        let errs = messages(
            json!({"spec": {"tenant": "TooLongName", "replicas": {"min": -1, "max": 11}, "mode": "c", "tags": ["a", "b", "c"], "port": true}}),
            None,
        );
        assert_eq!(
            errs,
            vec![
                "spec.mode: Unsupported value: \"c\": supported values: \"a\", \"b\"",
                "spec.port: Invalid value: true: spec.port in body must be of type int-or-string: \"boolean\"",
                "spec.replicas.max: Invalid value: 11: spec.replicas.max in body should be less than or equal to 10",
                "spec.replicas.min: Invalid value: -1: spec.replicas.min in body should be greater than or equal to 0",
                "spec.tags: Too many: 3: must have at most 2 items",
                "spec.tenant: Too long: may not be more than 8 bytes",
                "spec.tenant: Invalid value: \"TooLongName\": spec.tenant in body should match '^[a-z]+$'",
            ]
        );
        assert_eq!(
            messages(json!({"spec": {}}), None),
            vec!["spec.tenant: Required value"]
        );
        assert_eq!(
            messages(json!({"spec": {"tenant": 5}}), None),
            vec![
                "spec.tenant: Invalid value: 5: spec.tenant in body must be of type string: \"integer\""
            ]
        );
    }

    #[test]
    fn cel_rules_with_self_and_old_self() {
        assert_eq!(
            messages(
                json!({"spec": {"tenant": "a", "replicas": {"min": 4, "max": 3}}}),
                None
            ),
            vec!["spec.replicas: Invalid value: \"object\": min must not exceed max"]
        );
        assert!(
            messages(
                json!({"spec": {"tenant": "a", "replicas": {"min": 1, "max": 3}}}),
                None
            )
            .is_empty()
        );
        // Transition rule: skipped on create, enforced on update.
        assert!(messages(json!({"spec": {"tenant": "a", "immutable": "x"}}), None).is_empty());
        assert_eq!(
            messages(
                json!({"spec": {"tenant": "a", "immutable": "y"}}),
                Some(json!({"spec": {"tenant": "a", "immutable": "x"}}))
            ),
            vec!["spec.immutable: Invalid value: \"string\": is immutable"]
        );
    }
}
