//! The `ResourceQuota` admission plugin, for pods: what a namespace's quotas do to a pod
//! create on a real API server.
//!
//! ```text
//!   POST pod ──► every ResourceQuota of the namespace, by name:
//!                  hard cpu/memory (requests.*, limits.*) and a container that does not
//!                  set it ──► 403 "failed quota: <q>: must specify requests.cpu for: <c>"
//!                  used + the pod's usage > hard ──► 403 "exceeded quota: <q>, requested:
//!                  …, used: …, limited: …"
//! ```
//!
//! Only what the product meets is modelled: the object count `pods` and the compute
//! resources (`cpu`/`requests.cpu`, `memory`/`requests.memory`, `limits.cpu`,
//! `limits.memory`); no scopes, no LimitRange defaulting. `used` is computed from the pods
//! stored at admission (non-terminal ones), which is what the quota's `status.used`
//! holds once its controller has caught up; the real plugin reads that status, so on a
//! real server two racing creates can both pass (the quota controller then catches the
//! overage). Pure functions over `serde_json::Value`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::builtin::quantity;
use crate::error::ApiError;

/// The compute resources whose quota requires every container to state them (the
/// real evaluator's "validation set").
const COMPUTE: [&str; 6] = [
    "cpu",
    "memory",
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
];

/// A pod's usage of the resources a quota can limit, by quota resource name.
pub fn pod_usage(pod: &Value) -> BTreeMap<&'static str, f64> {
    let mut usage = BTreeMap::new();
    usage.insert("pods", 1.0);
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let init = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (kind, resource, names) in [
        ("requests", "cpu", ["cpu", "requests.cpu"]),
        ("requests", "memory", ["memory", "requests.memory"]),
        ("limits", "cpu", ["limits.cpu", "limits.cpu"]),
        ("limits", "memory", ["limits.memory", "limits.memory"]),
    ] {
        let of = |c: &Value| -> f64 {
            // A container with only a limit has it as its request too (defaulting).
            let own = c.pointer(&format!("/resources/{kind}/{resource}"));
            let fallback = (kind == "requests")
                .then(|| c.pointer(&format!("/resources/limits/{resource}")))
                .flatten();
            own.or(fallback)
                .and_then(Value::as_str)
                .and_then(quantity)
                .unwrap_or(0.0)
        };
        // Containers run together; init containers one at a time, before them.
        let sum: f64 = containers.iter().map(of).sum();
        let total = init.iter().map(of).fold(sum, f64::max);
        for name in names {
            usage.insert(name, total);
        }
    }
    usage
}

/// The resources of `required` that container `c` does not state (a request, or a limit
/// that defaults it).
fn missing<'a>(c: &Value, required: &[&'a str]) -> Vec<&'a str> {
    required
        .iter()
        .copied()
        .filter(|r| {
            let (kind, resource) = match r.split_once('.') {
                Some((k, res)) => (k, res),
                None => ("requests", *r),
            };
            let set = |k: &str| c.pointer(&format!("/resources/{k}/{resource}")).is_some();
            !(set(kind) || (kind == "requests" && set("limits")))
        })
        .collect()
}

/// A quantity for a message: cores or millicores, bytes in the largest binary unit that
/// divides them.
fn show(resource: &str, v: f64) -> String {
    if resource == "pods" {
        return format!("{}", v.round() as i64);
    }
    if resource.ends_with("cpu") {
        let milli = (v * 1000.0).round() as i64;
        return if milli % 1000 == 0 {
            format!("{}", milli / 1000)
        } else {
            format!("{milli}m")
        };
    }
    let bytes = v.round() as i64;
    for (unit, size) in [("Gi", 1i64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes != 0 && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// Admits (or refuses, as the real plugin does) the creation of `pod` named `name`
/// under `quotas` (the namespace's ResourceQuota objects), with `existing` the pods the
/// namespace holds.
pub fn admit_pod<'a>(
    name: &str,
    pod: &Value,
    quotas: impl IntoIterator<Item = &'a Value>,
    existing: impl IntoIterator<Item = &'a Value>,
) -> Result<(), ApiError> {
    let forbidden = |why: String| {
        ApiError::new(
            403,
            "Forbidden",
            format!("pods \"{name}\" is forbidden: {why}"),
        )
        .details("", "pods", name)
    };
    let mut quotas: Vec<&Value> = quotas.into_iter().collect();
    quotas.sort_by_key(|q| {
        q.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    });
    if quotas.is_empty() {
        return Ok(());
    }
    let requested = pod_usage(pod);
    let mut used: BTreeMap<&'static str, f64> = BTreeMap::new();
    for p in existing {
        let phase = p.pointer("/status/phase").and_then(Value::as_str);
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        for (k, v) in pod_usage(p) {
            *used.entry(k).or_default() += v;
        }
    }
    for q in quotas {
        let qname = q
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let hard: BTreeMap<&str, &str> = q
            .pointer("/spec/hard")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                    .collect()
            })
            .unwrap_or_default();

        // Every container must state each compute resource the quota limits.
        let required: Vec<&str> = COMPUTE
            .iter()
            .copied()
            .filter(|r| hard.contains_key(r))
            .collect();
        let mut lacking: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for c in pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let cname = c.get("name").and_then(Value::as_str).unwrap_or("");
            for r in missing(c, &required) {
                lacking.entry(r).or_default().insert(cname.to_string());
            }
        }
        if !lacking.is_empty() {
            let segments: Vec<String> = lacking
                .iter()
                .map(|(r, cs)| {
                    format!(
                        "{r} for: {}",
                        cs.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                })
                .collect();
            return Err(forbidden(format!(
                "failed quota: {qname}: must specify {}",
                segments.join("; ")
            )));
        }

        // The pod's usage on top of what is used must stay within every limit.
        let mut over: Vec<Excess> = Vec::new();
        for (r, limit) in &hard {
            let Some(ask) = requested.get(r) else {
                continue;
            };
            let Some(max) = quantity(limit) else { continue };
            let have = used.get(r).copied().unwrap_or(0.0);
            // A small epsilon: quantities are decimal, the sum is binary floating point.
            if *ask > 0.0 && have + ask > max + 1e-9 {
                over.push((*r, *ask, have, *limit));
            }
        }
        if !over.is_empty() {
            let list =
                |f: &dyn Fn(&Excess) -> String| over.iter().map(f).collect::<Vec<_>>().join(",");
            return Err(forbidden(format!(
                "exceeded quota: {qname}, requested: {}, used: {}, limited: {}",
                list(&|(r, ask, _, _)| format!("{r}={}", show(r, *ask))),
                list(&|(r, _, have, _)| format!("{r}={}", show(r, *have))),
                list(&|(r, _, _, limit)| format!("{r}={limit}")),
            )));
        }
    }
    Ok(())
}

/// One resource over its quota: name, requested, already used, the hard limit.
type Excess<'a> = (&'a str, f64, f64, &'a str);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(cpu: Option<&str>, memory: Option<&str>) -> Value {
        let mut requests = serde_json::Map::new();
        if let Some(c) = cpu {
            requests.insert("cpu".into(), json!(c));
        }
        if let Some(m) = memory {
            requests.insert("memory".into(), json!(m));
        }
        json!({"spec": {"containers": [{"name": "gateway", "resources": {"requests": requests}}]}})
    }

    fn quota(hard: Value) -> Value {
        json!({"metadata": {"name": "compute"}, "spec": {"hard": hard}})
    }

    fn none<'a>() -> Vec<&'a Value> {
        Vec::new()
    }

    #[test]
    fn no_quota_admits_anything() {
        assert!(admit_pod("p", &pod(None, None), none(), none()).is_ok());
    }

    #[test]
    fn a_compute_quota_requires_requests_of_every_container() {
        let q = quota(json!({"requests.cpu": "1", "requests.memory": "1Gi"}));
        let err = admit_pod("demo-0", &pod(None, Some("64Mi")), [&q], none()).unwrap_err();
        assert_eq!(err.code, 403);
        assert_eq!(
            err.message,
            "pods \"demo-0\" is forbidden: failed quota: compute: must specify requests.cpu for: gateway"
        );
        let err = admit_pod("demo-0", &pod(None, None), [&q], none()).unwrap_err();
        assert!(
            err.message
                .ends_with("must specify requests.cpu for: gateway; requests.memory for: gateway")
        );
        // A limit alone defaults the request.
        let limited = json!({"spec": {"containers": [{"name": "gateway",
            "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}]}});
        assert!(admit_pod("demo-0", &limited, [&q], none()).is_ok());
        // A pod-count quota requires nothing.
        let pods = quota(json!({"pods": "5"}));
        assert!(admit_pod("demo-0", &pod(None, None), [&pods], none()).is_ok());
    }

    #[test]
    fn usage_beyond_the_hard_limit_is_refused_with_the_figures() {
        let q = quota(json!({"requests.cpu": "700m", "requests.memory": "1Gi", "pods": "3"}));
        let first = pod(Some("500m"), Some("108Mi"));
        assert!(admit_pod("demo-0", &first, [&q], none()).is_ok());
        let err = admit_pod("demo-1", &first, [&q], [&first]).unwrap_err();
        assert_eq!(err.code, 403);
        assert_eq!(
            err.message,
            "pods \"demo-1\" is forbidden: exceeded quota: compute, requested: requests.cpu=500m, used: requests.cpu=500m, limited: requests.cpu=700m"
        );
        // Terminal pods use nothing.
        let mut done = first.clone();
        done["status"] = json!({"phase": "Succeeded"});
        assert!(admit_pod("demo-1", &first, [&q], [&done]).is_ok());
        // The pod count.
        let small = pod(Some("1m"), Some("1Mi"));
        let err = admit_pod("demo-3", &small, [&q], [&small, &small, &small]).unwrap_err();
        assert!(
            err.message
                .contains("requested: pods=1, used: pods=3, limited: pods=3"),
            "{}",
            err.message
        );
    }
}
