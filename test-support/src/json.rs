//! JSON fixtures: a base object with a test's changes laid over it.

use serde_json::Value;

/// Lays `from` over `into`: objects merge key by key, anything else replaces (as a
/// JSON merge patch does, except that `null` is set rather than removing the key).
pub fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_merge_and_other_values_replace() {
        let mut base = json!({"a": {"b": 1, "c": [1]}, "d": "x"});
        merge(&mut base, json!({"a": {"c": [2], "e": true}, "d": null}));
        assert_eq!(base, json!({"a": {"b": 1, "c": [2], "e": true}, "d": null}));
    }
}
