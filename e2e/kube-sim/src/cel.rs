//! CEL `x-kubernetes-validations` rules, evaluated with the `cel` crate.
//!
//! Supported: `self`, `oldSelf` (transition rules are skipped when there is no old value,
//! i.e. on create, as the real server does), `message`, `messageExpression`, `reason`,
//! `fieldPath`, and the standard CEL functions and macros the crate provides (`size`,
//! `has`, `all`, `exists`, `matches`, `startsWith`, ...). Not supported: the Kubernetes CEL
//! extension libraries (`quantity`, `url`, `isSorted`, `format` ...) and cost limits; a
//! rule that fails to compile or evaluate is reported as a validation error naming it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use cel::extractors::This;
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

/// A rule compiled once per thread and kept: the real server compiles a CRD's rules when
/// the CRD is established, not on every write. (Compiling them on every write was the
/// largest cost of a status report, which validates the pool's whole spec: ~20 rules.)
struct Compiled {
    program: cel::Program,
    uses_old_self: bool,
}

thread_local! {
    static PROGRAMS: RefCell<HashMap<String, Rc<Result<Compiled, String>>>> =
        RefCell::new(HashMap::new());
    /// The standard functions, registered once per thread; each evaluation adds its
    /// variables in an inner scope.
    static FUNCTIONS: cel::Context<'static> = functions();
}

fn compile(rule: &str) -> Rc<Result<Compiled, String>> {
    PROGRAMS.with(|cache| {
        if let Some(c) = cache.borrow().get(rule) {
            return c.clone();
        }
        let compiled = Rc::new(
            cel::Program::compile(rule)
                .map(|program| Compiled {
                    uses_old_self: program.references().has_variable("oldSelf"),
                    program,
                })
                .map_err(|e| format!("compilation failed: {e}")),
        );
        cache
            .borrow_mut()
            .insert(rule.to_string(), compiled.clone());
        compiled
    })
}

fn functions() -> cel::Context<'static> {
    let mut ctx = cel::Context::default();
    ctx.add_function("matches", matches);
    ctx
}

/// The standard `matches`, with each pattern compiled once per process (the `cel`
/// crate's compiles it on every call: two rules with `matches` on every write of a
/// pool cost more than the rest of its validation).
fn matches(
    ftx: &cel::FunctionContext,
    This(this): This<Arc<String>>,
    regex: Arc<String>,
) -> Result<bool, cel::ExecutionError> {
    match crate::schema::compiled(&regex) {
        Ok(re) => Ok(re.is_match(&this)),
        Err(err) => Err(ftx.error(format!("'{regex}' not a valid regex:\n{err}"))),
    }
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
    check_rules(std::slice::from_ref(rule), v, old, path)
        .into_iter()
        .next()
}

/// Evaluates the rules of one schema node, in order; the causes of those that fail.
/// `self` (and `oldSelf`, when a rule reads it) is converted once for all of them.
pub fn check_rules(rules: &[Value], v: &Value, old: Option<&Value>, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut to_run = Vec::new();
    for (at, rule) in rules.iter().enumerate() {
        let Some(text) = rule.get("rule").and_then(Value::as_str) else {
            continue;
        };
        let compiled = compile(text);
        match compiled.as_ref() {
            Err(e) => causes.push((at, failure(rule, v, path, format!("rule {text:?}: {e}")))),
            // A transition rule is skipped on create, as the real server does.
            Ok(c) if c.uses_old_self && old.is_none() => {}
            Ok(_) => to_run.push((at, rule, text, compiled)),
        }
    }
    if !to_run.is_empty() {
        let message_reads_old = |rule: &Value| {
            rule.get("messageExpression")
                .and_then(Value::as_str)
                .is_some_and(|e| matches!(compile(e).as_ref(), Ok(c) if c.uses_old_self))
        };
        let needs_old = to_run.iter().any(|(_, rule, _, c)| {
            matches!(c.as_ref(), Ok(c) if c.uses_old_self) || message_reads_old(rule)
        });
        let values = to_cel(v).and_then(|this| {
            let before = match old.filter(|_| needs_old) {
                Some(o) => Some(to_cel(o)?),
                None => None,
            };
            Ok((this, before))
        });
        FUNCTIONS.with(|functions| {
            let mut ctx = functions.new_inner_scope();
            let values = values.map(|(this, before)| {
                ctx.add_variable_from_value("self", this);
                if let Some(b) = before {
                    ctx.add_variable_from_value("oldSelf", b);
                }
            });
            for (at, rule, text, compiled) in &to_run {
                let Ok(c) = compiled.as_ref() else { continue };
                let failed = match &values {
                    Err(e) => Some(failure(rule, v, path, e.clone())),
                    Ok(()) => evaluate(rule, text, &c.program, &ctx, v, path),
                };
                causes.extend(failed.map(|f| (*at, f)));
            }
        });
    }
    causes.sort_by_key(|(at, _)| *at);
    causes.into_iter().map(|(_, c)| c).collect()
}

fn evaluate(
    rule: &Value,
    text: &str,
    program: &cel::Program,
    ctx: &cel::Context<'_>,
    v: &Value,
    path: &str,
) -> Option<Cause> {
    match program.execute(ctx) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => {
            let msg = rule
                .get("messageExpression")
                .and_then(Value::as_str)
                .and_then(|expr| {
                    match compile(expr)
                        .as_ref()
                        .as_ref()
                        .ok()?
                        .program
                        .execute(ctx)
                        .ok()?
                    {
                        cel::Value::String(s) => Some(s.to_string()),
                        _ => None,
                    }
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

    #[test]
    fn a_node_s_rules_fail_in_order_and_matches_uses_its_pattern() {
        let rules = [
            json!({"rule": "string(self.max).matches('^[1-9][0-9]*$')", "message": "not a count"}),
            json!({"rule": "self.max == oldSelf.max", "message": "immutable"}),
            json!({"rule": "self.min <= self.max", "message": "min above max"}),
            json!({"rule": "self.min >", "message": "never compiles"}),
        ];
        let v = json!({"min": 5, "max": 0});
        // On create the transition rule is skipped; every other failure, in order.
        let messages = |old: Option<&Value>| -> Vec<String> {
            check_rules(&rules, &v, old, "spec")
                .into_iter()
                .map(|c| c.message)
                .collect()
        };
        let created = messages(None);
        assert_eq!(created.len(), 3, "{created:?}");
        assert!(created[0].contains("not a count") && created[1].contains("min above max"));
        assert!(created[2].contains("compilation failed"), "{created:?}");
        let updated = messages(Some(&json!({"min": 1, "max": 3})));
        assert_eq!(updated.len(), 4, "{updated:?}");
        assert!(updated[1].contains("immutable"), "{updated:?}");
        // The same rules again (compiled once, cached): the same answers.
        assert_eq!(messages(None), created);
        let ok = json!({"min": 1, "max": 30});
        assert_eq!(check_rules(&rules[..3], &ok, Some(&ok), "spec"), vec![]);
    }
}
