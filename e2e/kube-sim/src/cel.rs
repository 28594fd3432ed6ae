//! CEL `x-kubernetes-validations` rules, evaluated with the `cel` crate.
//!
//! Supported: `self`, `oldSelf` (transition rules are skipped when there is no old value,
//! i.e. on create, as the real server does), `message`, `messageExpression`, `reason`,
//! `fieldPath`, and the standard CEL functions and macros the crate provides (`size`,
//! `has`, `all`, `exists`, `matches`, `startsWith`, ...). Not supported: the Kubernetes CEL
//! extension libraries (`quantity`, `url`, `isSorted`, `format` ...) and cost limits; a
//! rule that fails to compile or evaluate is reported as a validation error naming it.

use serde_json::Value;

use crate::error::Cause;

fn type_word(v: &Value) -> &'static str {
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

fn compile(rule: &str) -> Result<cel::Program, String> {
    cel::Program::compile(rule).map_err(|e| format!("compilation failed: {e}"))
}

/// JSON as CEL sees it on a real API server: a schema `integer` is a CEL `int` (int64),
/// so `self.a * 100` and `100 + self.b` type-check. (serde_json hands positive numbers
/// to serializers as u64, which the `cel` crate would turn into `uint`.)
fn to_cel(v: &Value) -> Result<cel::Value, String> {
    cel::to_value(Signed(v)).map_err(|e| e.to_string())
}

struct Signed<'a>(&'a Value);

impl serde::Serialize for Signed<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Number(n) => match n.as_i64() {
                Some(i) => s.serialize_i64(i),
                None => n.serialize(s),
            },
            Value::Array(items) => s.collect_seq(items.iter().map(Signed)),
            Value::Object(map) => s.collect_map(map.iter().map(|(k, v)| (k, Signed(v)))),
            other => other.serialize(s),
        }
    }
}

/// Evaluates one rule; `Some(cause)` when it fails.
pub fn check_rule(rule: &Value, v: &Value, old: Option<&Value>, path: &str) -> Option<Cause> {
    let text = rule.get("rule")?.as_str()?;
    let program = match compile(text) {
        Ok(p) => p,
        Err(e) => return Some(failure(rule, v, path, format!("rule {text:?}: {e}"))),
    };
    let refs = program.references();
    let transition = refs.has_variable("oldSelf");
    if transition && old.is_none() {
        return None;
    }
    let mut ctx = cel::Context::default();
    match to_cel(v) {
        Ok(x) => ctx.add_variable_from_value("self", x),
        Err(e) => return Some(failure(rule, v, path, e)),
    }
    if let Some(o) = old {
        match to_cel(o) {
            Ok(x) => ctx.add_variable_from_value("oldSelf", x),
            Err(e) => return Some(failure(rule, v, path, e)),
        }
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => {
            let msg = rule
                .get("messageExpression")
                .and_then(Value::as_str)
                .and_then(|expr| match compile(expr).ok()?.execute(&ctx).ok()? {
                    cel::Value::String(s) => Some(s.to_string()),
                    _ => None,
                })
                .or_else(|| {
                    rule.get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| format!("failed rule: {text}"));
            Some(failure(rule, v, path, msg))
        }
        Ok(other) => Some(failure(
            rule,
            v,
            path,
            format!("rule {text:?} did not evaluate to a boolean: {other:?}"),
        )),
        Err(e) => Some(failure(
            rule,
            v,
            path,
            format!("rule {text:?} evaluation error: {e}"),
        )),
    }
}

fn failure(rule: &Value, v: &Value, path: &str, msg: String) -> Cause {
    let field = match rule.get("fieldPath").and_then(Value::as_str) {
        Some(fp) if path.is_empty() => fp.trim_start_matches('.').to_string(),
        Some(fp) => format!("{path}{fp}"),
        None => path.to_string(),
    };
    let reason = rule
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("FieldValueInvalid")
        .to_string();
    let message = match reason.as_str() {
        "FieldValueForbidden" => format!("Forbidden: {msg}"),
        "FieldValueRequired" => format!("Required value: {msg}"),
        "FieldValueDuplicate" => format!("Duplicate value: {msg}"),
        _ => format!("Invalid value: \"{}\": {msg}", type_word(v)),
    };
    Cause {
        reason,
        message,
        field,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_integers_are_cel_ints() {
        let rule = json!({"rule": "self.a * (100 + self.b) < self.c * 100", "message": "no room"});
        assert!(check_rule(&rule, &json!({"a": 10, "b": 10, "c": 20}), None, "spec").is_none());
        let cause = check_rule(&rule, &json!({"a": 10, "b": 10, "c": 11}), None, "spec").unwrap();
        assert!(cause.message.contains("no room"), "{cause:?}");
    }

    #[test]
    fn rules_see_self_and_macros() {
        let v = json!({"min": 1, "max": 3, "names": ["a", "b"]});
        let ok = |r: &str| check_rule(&json!({"rule": r}), &v, None, "spec").is_none();
        assert!(ok("self.min <= self.max"));
        assert!(ok("has(self.min) && !has(self.other)"));
        assert!(ok("self.names.all(n, n.size() == 1)"));
        assert!(ok("size(self.names) == 2"));
        assert!(!ok("self.min > self.max"));
    }

    #[test]
    fn failure_uses_message_expression_and_field_path() {
        let rule = json!({"rule": "self.min <= self.max", "messageExpression": "'min ' + string(self.min) + ' too big'",
                          "fieldPath": ".min", "reason": "FieldValueForbidden"});
        let c = check_rule(&rule, &json!({"min": 9, "max": 1}), None, "spec.replicas").unwrap();
        assert_eq!(c.field, "spec.replicas.min");
        assert_eq!(c.reason, "FieldValueForbidden");
        assert_eq!(c.message, "Forbidden: min 9 too big");
        let c = check_rule(&json!({"rule": "self > 1"}), &json!(0), None, "x").unwrap();
        assert_eq!(
            c.message,
            "Invalid value: \"integer\": failed rule: self > 1"
        );
    }

    #[test]
    fn transition_rule_needs_old_value() {
        let rule = json!({"rule": "self >= oldSelf", "message": "may not decrease"});
        assert!(check_rule(&rule, &json!(1), None, "x").is_none());
        assert!(check_rule(&rule, &json!(1), Some(&json!(2)), "x").is_some());
        assert!(check_rule(&rule, &json!(3), Some(&json!(2)), "x").is_none());
    }
}
