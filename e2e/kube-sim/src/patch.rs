//! The PATCH flavours: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
//! strategic-merge patch. Pure functions over `serde_json::Value`.
//!
//! Strategic-merge patch is implemented for the lists whose merge keys the stand-in
//! knows (see [`crate::registry::builtin_list_type`]; for CRDs the schema's list-map keys, as
//! the real server does not accept strategic merge for custom resources at all), with the
//! directives `$patch: delete|replace|merge`, `$deleteFromPrimitiveList/<f>`,
//! `$setElementOrder/<f>` (honoured) and `$retainKeys`.

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::registry::{ListType, TypeCursor};

/// Applies a JSON patch document.
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let p: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "the server rejected our request due to an error in our request: {e}"
        ))
    })?;
    let mut out = target.clone();
    let invalid = |e: String| {
        // The real server answers a failed `test` op and a bad path with 422 Invalid.
        ApiError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: {e}"),
        )
    };
    for op in p.0 {
        // evanphx/json-patch, which the real server uses, lets `test` of a missing path
        // against null succeed; kube-runtime's finalizer helper relies on it.
        if let json_patch::PatchOperation::Test(t) = &op
            && t.value.is_null()
        {
            match out.pointer(t.path.as_str()) {
                None | Some(Value::Null) => continue,
                Some(_) => return Err(invalid(format!("testing value {} failed", t.path))),
            }
        }
        json_patch::patch(&mut out, &[op]).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(out)
}

/// Applies a JSON merge patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "the server rejected our request due to an error in our request: merge patch must be an object",
        ));
    }
    let mut out = target.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

/// The key values of a list element under `keys` (a missing key reads as null).
pub fn key_of(elem: &Value, keys: &[String]) -> Vec<Value> {
    keys.iter()
        .map(|k| elem.get(k).cloned().unwrap_or(Value::Null))
        .collect()
}

/// Whether two list elements have the same key; a key absent on the patch side is ignored
/// (kubectl's strategic patches carry only the single patchMergeKey).
fn same_key(live: &Value, patch: &Value, keys: &[String]) -> bool {
    keys.iter().enumerate().all(|(i, k)| match patch.get(k) {
        Some(v) => live.get(k) == Some(v),
        None => i > 0,
    })
}

/// Applies a strategic-merge patch.
pub fn strategic_merge(
    target: &Value,
    patch: &Value,
    cursor: TypeCursor<'_>,
) -> Result<Value, ApiError> {
    let Value::Object(p) = patch else {
        return Err(ApiError::bad_request(
            "strategic merge patch must be an object",
        ));
    };
    let mut out = target.clone();
    if !out.is_object() {
        out = Value::Object(Map::new());
    }
    smp_object(out.as_object_mut().expect("object"), p, cursor, true);
    Ok(out)
}

fn smp_object(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    cursor: TypeCursor<'_>,
    root: bool,
) {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = patch
                .iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            return;
        }
        Some("delete") => {
            target.clear();
            return;
        }
        _ => {}
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        target.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (target.get_mut(field), v) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let (Some(Value::Array(list)), Value::Array(order)) = (target.get_mut(field), v) {
                let keys = match cursor.field(field, root).list_type() {
                    ListType::Map(keys) => keys,
                    _ => vec![],
                };
                let pos = |e: &Value| {
                    order
                        .iter()
                        .position(|o| {
                            if keys.is_empty() {
                                o == e
                            } else {
                                same_key(e, o, &keys)
                            }
                        })
                        .unwrap_or(usize::MAX)
                };
                list.sort_by_key(pos);
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let c = cursor.field(k, root);
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(po) if !c.atomic_map() => {
                let entry = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                smp_object(entry.as_object_mut().expect("object"), po, c, false);
            }
            Value::Array(pl) => {
                let merged = smp_list(target.get(k), pl, c);
                target.insert(k.clone(), Value::Array(merged));
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

fn smp_list(target: Option<&Value>, patch: &[Value], cursor: TypeCursor<'_>) -> Vec<Value> {
    let live: Vec<Value> = target
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // A `{"$patch": "replace"}` element replaces the whole list.
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .cloned()
            .collect();
    }
    match cursor.list_type() {
        ListType::Atomic => patch.to_vec(),
        ListType::Set => {
            let mut out = live;
            for e in patch {
                if !out.contains(e) {
                    out.push(e.clone());
                }
            }
            out
        }
        ListType::Map(keys) => {
            let mut out = live;
            let item = cursor.item();
            for e in patch {
                let pos = out.iter().position(|l| same_key(l, e, &keys));
                let directive = e.get("$patch").and_then(Value::as_str);
                match (pos, directive) {
                    (Some(i), Some("delete")) => {
                        out.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => {
                        if let (Value::Object(t), Value::Object(p)) = (&mut out[i], e) {
                            smp_object(t, p, item, false);
                        }
                    }
                    (None, _) => {
                        let mut fresh = Map::new();
                        if let Value::Object(p) = e {
                            smp_object(&mut fresh, p, item, false);
                        }
                        out.push(Value::Object(fresh));
                    }
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "finalizers": ["a"]}, "spec": {"containers": [
            {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "side", "image": "side:1"}
        ], "tolerations": [{"key": "x"}]}})
    }

    #[test]
    fn smp_merges_containers_by_name() {
        let out = strategic_merge(
            &pod(),
            &json!({"spec": {"containers": [{"name": "app", "image": "app:2"}],
                     "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}]}}),
            TypeCursor::Builtin("", ""),
        )
        .unwrap();
        assert_eq!(out["spec"]["containers"][0]["image"], "app:2");
        assert_eq!(
            out["spec"]["containers"][0]["env"][0]["name"], "A",
            "untouched field kept"
        );
        assert_eq!(
            out["spec"]["containers"][1]["image"], "side:1",
            "other element kept"
        );
        assert!(out["spec"].get("$setElementOrder/containers").is_none());
    }

    #[test]
    fn smp_directives() {
        let out = strategic_merge(
            &pod(),
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]},
                    "spec": {"containers": [{"name": "side", "$patch": "delete"}],
                             "tolerations": [{"key": "y"}]}}),
            TypeCursor::Builtin("", ""),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!([]));
        assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "y"}]),
            "atomic list replaced"
        );
    }

    #[test]
    fn smp_finalizers_union() {
        let out = strategic_merge(
            &pod(),
            &json!({"metadata": {"finalizers": ["b"]}}),
            TypeCursor::Builtin("", ""),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
    }

    #[test]
    fn merge_and_json_patch() {
        let out = merge_patch(
            &pod(),
            &json!({"metadata": {"finalizers": null}, "spec": {"x": 1}}),
        )
        .unwrap();
        assert!(out["metadata"].get("finalizers").is_none());
        assert_eq!(out["spec"]["x"], 1);
        let out = json_patch(
            &pod(),
            &json!([{"op": "test", "path": "/metadata/name", "value": "p"},
            {"op": "replace", "path": "/metadata/name", "value": "q"}]),
        )
        .unwrap();
        assert_eq!(out["metadata"]["name"], "q");
        let err = json_patch(
            &pod(),
            &json!([{"op": "test", "path": "/metadata/name", "value": "z"}]),
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        // A missing path tests equal to null (evanphx/json-patch semantics).
        let out = json_patch(
            &pod(),
            &json!([{"op": "test", "path": "/metadata/labels", "value": null},
            {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"]["a"], "b");
        assert!(
            json_patch(
                &out,
                &json!([{"op": "test", "path": "/metadata/labels", "value": null}])
            )
            .is_err()
        );
    }
}
